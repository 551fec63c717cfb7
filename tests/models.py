"""Tiny models, data and learner builders that several test modules share (frozen/cache tests: a 3-block
conv body on 64 random 32 px images of two classes; callbacks/lr_find tests: a tiny resnet)."""
import contextlib
import io
import random
from functools import partial

import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import GrandparentSplitter, get_image_files, parent_label
from fastai.learner import Learner
from fastai.torch_core import set_seed
from fastai.vision.data import ImageBlock, ImageDataLoaders
from fastai.vision.learner import create_head, create_vision_model
from torch import nn
from torchvision.models import resnet18

from fastai_groups import arch_summary
from fastai_groups.callbacks import GradualUnfreeze
from fastai_groups.frozen import body_of, norm_layers
from fastai_groups.splitters import auto_splitter

N_TRAIN, N_VALID, BS = 64, 16, 16


def make_dls(root, batch_tfms=None):
    block = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(),
                      get_y=parent_label, batch_tfms=batch_tfms)
    return block.dataloaders(root, bs=BS, num_workers=0)


def tiny_body() -> nn.Sequential:
    "Conv-BN-ReLU x 3 (16, 32, 64 channels): fast enough to train unfrozen in a test."
    def block(ni, nf, stride):
        return nn.Sequential(nn.Conv2d(ni, nf, 3, stride, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), block(16, 32, 2),
                         block(32, 64, 2))


def tiny_model() -> nn.Sequential:
    return nn.Sequential(tiny_body(), create_head(64, 2))


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.features, self.classifier = tiny_body(), create_head(64, 2)

    def forward(self, x):
        return self.classifier(self.features(x))


def three_groups(m):
    "first half of the body | second half | head"
    body = list(m[0])
    half = len(body) // 2
    return [[p for c in body[:half] for p in c.parameters()], [p for c in body[half:] for p in c.parameters()],
            list(m[1].parameters())]


def make_learn(dls, cbs=(), train_bn=False, seed=0, resnet=False):
    "A frozen Learner (3 groups) on `nn.Sequential(body, head)`: resnet18 (fastai's model) or the tiny CNN."
    set_seed(seed)
    model = create_vision_model(resnet18, 2, pretrained=False) if resnet else tiny_model()
    learn = Learner(dls, model, splitter=three_groups, train_bn=train_bn, cbs=list(cbs))
    learn.freeze()
    return learn


def fit(learn, n_epoch=1, lr=1e-3, seed=1, cbs=None):
    "Same batches (the train loader's own random state reset) and the same torch random stream for every run."
    learn.dls.train.rng = random.Random(0)
    set_seed(seed)
    with learn.no_bar(), learn.no_logging():
        learn.fit(n_epoch, lr, cbs=cbs)


class Probe(Callback):
    "Per training batch: epoch, iter, body output requires grad, body norm layers training, learn.fast_frozen_mode."
    order = 100

    def before_fit(self):
        self.rows, self.valid_rows, self.out = [], [], None
        self.hook = body_of(self.learn.model).register_forward_hook(lambda m, i, o: setattr(self, "out", o))

    def after_pred(self):
        norms = norm_layers(body_of(self.learn.model))
        row = (self.epoch, self.iter, self.out.requires_grad, any(m.training for m in norms),
               getattr(self.learn, "fast_frozen_mode", None))
        (self.rows if self.training else self.valid_rows).append(row)

    def after_fit(self):
        self.hook.remove()


class CountItems(Callback):
    "Items run through the body's first conv (a cached batch skips the whole body, its children included)."
    def before_fit(self):
        if not hasattr(self, "n"):
            self.n = 0
        self.hook = body_of(self.learn.model)[0].register_forward_hook(lambda m, i, o: self._add(len(o)))

    def _add(self, k):
        self.n += k

    def after_fit(self):
        self.hook.remove()


class FreezeSchedule(Callback):
    "Calls `learn.freeze_to(n)` at the start of each epoch (before FastFrozenBody looks), like GradualUnfreeze."
    order = GradualUnfreeze.order

    def __init__(self, plan):
        self.plan = plan

    def before_train(self):
        self.learn.freeze_to(self.plan[self.epoch])


class UnfreezeAt(Callback):
    "Unfreezes everything after training batch `it` of the first epoch (mid-epoch)."
    def __init__(self, it):
        self.it = it

    def after_batch(self):
        if self.training and self.epoch == 0 and self.iter == self.it:
            self.learn.unfreeze()


def n_params(ps) -> int:
    "Elements of a module's parameters, or of a list of parameters."
    ps = ps.parameters() if isinstance(ps, nn.Module) else ps
    return sum(p.numel() for p in ps)


SPLIT3 = partial(auto_splitter, granularity="fastai")


N_GROUPS = 3


# ------------------------------------------------------------------------------------------------------- fixtures
def _conv_bn(ci, co, stride):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())


class ResBlock(nn.Module):
    def __init__(self, ci, co, stride):
        super().__init__()
        self.a = _conv_bn(ci, co, stride)
        self.b = nn.Sequential(nn.Conv2d(co, co, 3, 1, 1, bias=False), nn.BatchNorm2d(co))
        self.down = (nn.Sequential(nn.Conv2d(ci, co, 1, stride, bias=False), nn.BatchNorm2d(co))
                     if stride != 1 or ci != co else nn.Identity())

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + self.down(x))


def tiny_resnet(n_out=3):
    "stem, three one-block stages, BN + linear head: 3 groups at granularity 'fastai'."
    body = nn.Sequential(_conv_bn(3, 8, 2), nn.Sequential(ResBlock(8, 8, 1)), nn.Sequential(ResBlock(8, 16, 2)),
                         nn.Sequential(ResBlock(16, 32, 2)))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(32), nn.Linear(32, n_out))
    return nn.Sequential(body, head)


def make_learner(root, cbs=(), splitter=SPLIT3, **kwargs):
    torch.manual_seed(0)
    dls = ImageDataLoaders.from_folder(root, train="train", valid="valid", bs=8, num_workers=0)
    learn = Learner(dls, tiny_resnet(), splitter=splitter, cbs=list(cbs), **kwargs)
    learn.remove_cb(ProgressCallback)
    return learn


class AlexNet(nn.Module):
    "The user-written AlexNet of seed 002 (attributes feats, clf)."

    def __init__(self, num_classes=1000):
        super().__init__()
        self.feats = nn.Sequential(
            nn.Conv2d(3, 96, 11, 4, 0), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, 1, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(384, 384, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.clf = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                                 nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

    def forward(self, inp):
        return self.clf(torch.flatten(self.feats(inp), 1))


def summary_text(*args, **kwargs) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        arch_summary(*args, **kwargs)
    return buf.getvalue()


def timm_smallest() -> dict:
    """{timm family: its smallest model} from tests/timm_smallest.json (written by tests/make_timm_smallest.py with
    the newest timm), restricted to the families and models the installed timm has (an older timm, at the lower end
    of the supported range, has fewer)."""
    import json
    from pathlib import Path

    import timm
    table = json.loads((Path(__file__).parent / "timm_smallest.json").read_text())
    families, models = set(timm.list_modules()), set(timm.list_models())
    return {f: m for f, m in table.items() if f in families and m in models}
