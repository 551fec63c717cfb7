"""Tests of the fast frozen body and the feature cache (fastai_groups/frozen.py): small resnet18 at 32 px, 64 images."""
import random

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.training import BnFreeze
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import GrandparentSplitter, get_image_files, parent_label
from fastai.learner import Learner
from fastai.torch_core import set_seed
from fastai.vision.augment import Flip
from fastai.vision.data import ImageBlock
from fastai.vision.learner import create_head, create_vision_model
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from fastai_groups.callbacks import GradualUnfreeze
from fastai_groups.frozen import FastFrozenBody, FeatureCache, body_of, norm_layers, random_transforms

N_TRAIN, N_VALID, BS = 64, 16, 16


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    "Two classes of 32x32 RGB PNGs (class a: darker top half), 64 train and 16 valid."
    root = tmp_path_factory.mktemp("frozen_imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN // 2), ("valid", N_VALID // 2)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                if c == "a":
                    a[:16] //= 3
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def make_dls(root, batch_tfms=None):
    block = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(),
                      get_y=parent_label, batch_tfms=batch_tfms)
    return block.dataloaders(root, bs=BS, num_workers=0)


@pytest.fixture(scope="module")
def dls(image_dir):
    return make_dls(image_dir)


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


# --------------------------------------------------------------------------------------------------- fast path
def test_switches_with_freeze_state(dls, capsys):
    learn = make_learn(dls, [FastFrozenBody(), Probe()])
    fit(learn, 4, cbs=FreezeSchedule([-1, 0, -2, -1]))   # frozen body, all trainable, partial, frozen body
    by_epoch = {}
    for ep, _, rg, train_norms, mode in learn.probe.rows:
        by_epoch.setdefault(ep, set()).add((rg, train_norms, mode))
    assert by_epoch == {0: {(False, False, "no_grad")}, 1: {(True, True, "")}, 2: {(True, True, "")},
                        3: {(False, False, "no_grad")}}
    # validation untouched: eval mode and no grad, whatever the state
    assert {(rg, tn) for _, _, rg, tn, _ in learn.probe.valid_rows} == {(False, False)}
    out = capsys.readouterr().out
    assert out.count("FastFrozenBody: body fully frozen") == 2 and out.count("FastFrozenBody: body trainable") == 1
    assert learn.fast_frozen and "fast frozen" in learn.fast_frozen_info
    assert "forward" not in vars(learn.model[0])          # nothing left on the body after the fit


def test_gradual_unfreeze_and_mid_epoch_unfreeze(dls):
    learn = make_learn(dls, [FastFrozenBody(verbose=False), Probe()])
    fit(learn, 2, cbs=GradualUnfreeze(every=1))
    assert [(r[0], r[2], r[3]) for r in learn.probe.rows if r[1] == 0] == [(0, False, False), (1, True, True)]
    learn.freeze()
    fit(learn, 1, cbs=UnfreezeAt(1))                       # unfreeze after batch 1: autograd and BN train from batch 2
    assert [(r[2], r[3], r[4]) for r in learn.probe.rows] == [(False, False, "no_grad")] * 2 + [(True, True, "")] * 2
    assert not learn.fast_frozen


def test_train_bn_true_is_fastai(dls):
    learn = make_learn(dls, [FastFrozenBody(), Probe()], train_bn=True)
    fit(learn, 1)
    assert {r[2:] for r in learn.probe.rows} == {(True, True, "")}
    assert learn.fast_frozen is False


def test_fast_path_equals_plain_bnfreeze(dls):
    plain = make_learn(dls, [BnFreeze()])
    fast = make_learn(dls, [FastFrozenBody(verbose=False)])
    fit(plain, 2)
    fit(fast, 2)
    np.testing.assert_allclose([float(v) for v in fast.recorder.losses], [float(v) for v in plain.recorder.losses],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(fast.recorder.values, dtype=float),
                               np.array(plain.recorder.values, dtype=float), rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(plain.model.state_dict().items(), fast.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), k


def test_needs_sequential_body_head(dls):
    learn = Learner(dls, NotSequential(), cbs=FastFrozenBody())
    with pytest.raises(TypeError, match=r"nn.Sequential\(body, head\).*get_body"):
        fit(learn, 1)
    learn = Learner(dls, NotSequential(), cbs=[FastFrozenBody(get_body=lambda m: m.features, verbose=False),
                                               FeatureCache(get_body=lambda m: m.features, verbose=False)])
    learn.model.features.requires_grad_(False)
    fit(learn, 1)
    assert learn.fast_frozen_mode == "cached"
    assert learn.fast_frozen_info == "cached features (64 train + 16 valid items, 1.3 MiB), body not run"
    learn.remove_cb(FeatureCache)
    fit(learn, 1)
    assert learn.fast_frozen_info == "fast frozen (no autograd, 3 norm layers in inference mode)"


# --------------------------------------------------------------------------------------------------- cache
def test_cache_equals_plain_and_hits_once(dls, capsys):
    "resnet18 (fastai's model): one epoch from the cache gives the plain run's losses, metrics and head weights."
    plain = make_learn(dls, [BnFreeze()], resnet=True)
    cached = make_learn(dls, [FeatureCache(), CountItems()], resnet=True)
    fit(plain, 1)
    fit(cached, 1)
    out = capsys.readouterr().out
    assert "FeatureCache: body fully frozen -> features computed once (64 train + 16 valid items" in out
    assert cached.count_items.n == N_TRAIN + N_VALID                 # body run once per item
    assert cached.fast_frozen_mode == "cached" and cached.feature_cache.nbytes > 0
    np.testing.assert_allclose([float(v) for v in cached.recorder.losses], [float(v) for v in plain.recorder.losses],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(cached.recorder.values, dtype=float),
                               np.array(plain.recorder.values, dtype=float), rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(plain.model[1].state_dict().items(), cached.model[1].state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), k
    fit(cached, 1)                                                   # a second frozen fit reuses the cache
    assert cached.count_items.n == N_TRAIN + N_VALID
    cached.get_preds()                                               # outside a fit: images, as usual
    assert cached.count_items.n == N_TRAIN + 2 * N_VALID


def test_cache_dropped_on_unfreeze_and_rebuilt_on_new_weights(dls, capsys):
    learn = make_learn(dls, [FeatureCache(), CountItems(), Probe()])
    fit(learn, 1)
    store = learn.feature_cache.store
    assert store is not None
    with torch.no_grad():
        learn.model[0][0].weight.mul_(1.0)                            # in place: the cached features are stale
    fit(learn, 1)
    assert learn.feature_cache.store is not store and learn.count_items.n == 2 * (N_TRAIN + N_VALID)
    learn.unfreeze()
    fit(learn, 1)
    assert learn.feature_cache.store is None and learn.fast_frozen_mode == ""
    assert {r[2:4] for r in learn.probe.rows} == {(True, True)}
    assert learn.count_items.n == 3 * (N_TRAIN + N_VALID)
    assert "feature cache dropped" in capsys.readouterr().out


def test_cache_mid_epoch_unfreeze_loads_images(dls):
    learn = make_learn(dls, [FeatureCache(verbose=False), CountItems(), Probe()])
    fit(learn, 1, cbs=UnfreezeAt(1))
    assert [(r[2], r[4]) for r in learn.probe.rows] == [(False, "cached")] * 2 + [(True, "")] * 2
    # build (64 + 16), then the 2 last training batches and the validation from images
    assert learn.count_items.n == N_TRAIN + N_VALID + 2 * BS + N_VALID


def test_cache_memory_limit_falls_back(dls, capsys):
    learn = make_learn(dls, [FeatureCache(max_bytes=10_000), Probe()])
    fit(learn, 1)
    out = capsys.readouterr().out
    assert "FeatureCache: the features need" in out and "> max_bytes" in out and "training without the cache" in out
    assert learn.feature_cache.store is None
    assert {r[2:] for r in learn.probe.rows} == {(False, False, "no_grad")}


def test_cache_refuses_random_augmentation(image_dir):
    dls = make_dls(image_dir, batch_tfms=Flip(p=0.5))
    assert random_transforms(dls.train) == ["Flip (after_batch): a fastai RandTransform, random on the training set"]
    learn = make_learn(dls, [FeatureCache()])
    with pytest.raises(ValueError, match=r"may be random: Flip \(after_batch\).*Resize\(size, method='squish'\)"):
        fit(learn, 1)
    assert "forward" not in vars(learn.model[0])


def test_cache_leads_fast_frozen_body(dls):
    learn = make_learn(dls, [FastFrozenBody(), FeatureCache(verbose=False), CountItems()])
    fit(learn, 2)                                                    # body run once per item over 2 epochs
    assert learn.fast_frozen_mode == "cached" and learn.count_items.n == N_TRAIN + N_VALID
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(max_bytes=0)
