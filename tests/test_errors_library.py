"""Every user mistake the library's public functions handle gives one clear line (problem + fix): one test per row
of docs/errors_library.md (the test asserts the message; it does not read the doc). Real models and data: a
TinyNet on the `image_folder` PNGs, a 2-layer nn.Sequential."""
import warnings

import numpy as np
import pytest
import torch
from fastai.callback.mixup import MixUp
from fastai.vision.all import Brightness, Flip, ImageDataLoaders, RandomErasing, Resize, Transform, TensorImage
from PIL import Image
from torch import nn

from fastai_groups import FeatureCache, GradualUnfreeze, arch_summary, auto_splitter, check_cacheable, \
    check_groups, check_image_folder, checked, fine_tune_groups, group_learner, reestimate_norm_stats
from test_checkpoint import TinyNet

torch.set_num_threads(1)


def seq():
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))


def dls_of(root, **kwargs):
    return ImageDataLoaders.from_folder(root, train="train", valid="valid", num_workers=0, **{"bs": 6, **kwargs})


def learner(root, tmp, **kwargs):
    kwargs = {"pretrained": False, "lin_ftrs": [16], "path": tmp, **kwargs}
    return group_learner(dls_of(root), TinyNet, **kwargs)


def with_opt(learn):
    learn.create_opt()
    return learn


def frozen(learn):
    learn.freeze()
    return learn


def keep(b):
    "A batch transform that is a plain function."
    return b


def write(tmp, name, data: bytes):
    f = tmp / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return f


def plain_learner(root):
    "A plain fastai Learner (one parameter group) on TinyNet, with train_bn=False."
    from fastai.learner import Learner
    return Learner(dls_of(root), TinyNet(), train_bn=False)


def quiet_fit(learn, **kwargs):
    with learn.no_bar(), learn.no_logging():
        return learn.fine_tune_groups(2, **kwargs)


def ten_classes(root, tmp):
    "`learner(root, tmp)` with a head of 10 classes."
    learn = learner(root, tmp)
    learn.model[1][-1] = nn.Linear(16, 10)
    learn.create_opt()
    return learn


def load_bytes(root, tmp, name, data: bytes):
    "`learn.load(name)` of a file `models/name.pth` holding `data`."
    write(tmp / "models", f"{name}.pth", data)
    return learner(root, tmp).load(name)


def saved_bytes(root, tmp):
    return with_opt(learner(root, tmp)).save("good").read_bytes()


class Perturb(Transform):
    "Adds 1 to 10% of the batches: random, and not a fastai RandTransform."
    order = 99

    def encodes(self, x: TensorImage):
        return x + float(torch.rand(()) < 0.1)


def folder(tmp, layout: dict, size=(32, 32), dtype=np.uint8):
    "`layout`: {'train/a': 3, ...} -> that many PNGs of `size` (w, h) per folder."
    for sub, n in layout.items():
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full(size[::-1], 7, dtype)).save(tmp / sub / f"{i}.png")
    return tmp


# (id, call(root, tmp) that makes the mistake, exception type or "warn" or "print", start of the message)
ROWS = [
    # auto_splitter
    ("auto_splitter-granularity", lambda r, t: auto_splitter(seq(), granularity="blocks"), ValueError,
     "granularity must be one of"),
    ("auto_splitter-n_groups", lambda r, t: auto_splitter(seq(), n_groups=0), ValueError,
     "n_groups must be a positive int, got 0"),
    ("auto_splitter-not-a-model", lambda r, t: auto_splitter([nn.Linear(2, 2)]), TypeError,
     "auto_splitter takes a model (nn.Module), got list"),
    ("auto_splitter-no-params", lambda r, t: auto_splitter(nn.Sequential(nn.ReLU())), ValueError,
     "Sequential has no parameters: there is nothing to split"),
    ("auto_splitter-too-many", lambda r, t: auto_splitter(TinyNet(), n_groups=9), ValueError,
     "n_groups=9 is more than TinyNet can give at granularity 'stage': at most 5 (stem, stage1, stage2, stage3, head)"),
    # check_groups / checked
    ("check_groups-not-a-list", lambda r, t: check_groups(seq(), nn.Linear(2, 2).weight), ValueError,
     "bad parameter groups for Sequential: expected a list of lists of parameters, got Parameter"),
    ("check_groups-no-groups", lambda r, t: check_groups(seq(), []), ValueError,
     "bad parameter groups for Sequential: no groups at all"),
    ("check_groups-module", lambda r, t: check_groups((m := seq()), [m[0], list(m[1].parameters())]), ValueError,
     "bad parameter groups for Sequential: group 0 is a Linear, not a list of parameters"),
    ("check_groups-empty", lambda r, t: check_groups((m := seq()), [list(m.parameters()), []]), ValueError,
     "bad parameter groups for Sequential: group 1 is empty"),
    ("check_groups-tensor", lambda r, t: check_groups((m := seq()), [list(m.parameters()) + [torch.zeros(1)]]),
     ValueError, "bad parameter groups for Sequential: group 0 item 4 is a Tensor, not an nn.Parameter"),
    ("check_groups-foreign", lambda r, t: check_groups((m := seq()), [list(m.parameters()) +
                                                                    [nn.Parameter(torch.zeros(1))]]),
     ValueError, "bad parameter groups for Sequential: group 0 item 4 is not a parameter of this model"),
    ("check_groups-missing", lambda r, t: check_groups((m := seq()), [list(m[0].parameters())]), ValueError,
     "bad parameter groups for Sequential: missing (never trained): 1.weight, 1.bias"),
    ("check_groups-duplicated", lambda r, t: check_groups((m := seq()), [list(m.parameters()), [m[0].weight]]),
     ValueError, "bad parameter groups for Sequential: duplicated (stepped twice): 0.weight"),
    ("checked-bad-splitter", lambda r, t: with_opt(learner(r, t, splitter=checked(lambda m: [list(
        m[1].parameters())]))), ValueError, "bad parameter groups for Sequential: missing (never trained): 0."),
    # group_learner and its learner
    ("group_learner-cache-train_bn", lambda r, t: learner(r, t, cache_features=True), ValueError,
     "cache_features=True needs train_bn=False"),
    ("group_learner-n_out", lambda r, t: learner(r, t, n_out=5), ValueError,
     "n_out=5 but the data has 3 classes (dls.c): drop n_out, or fix the data"),
    ("group_learner-arch-name", lambda r, t: group_learner(dls_of(r), "resnet_18", pretrained=False), ValueError,
     "unknown architecture 'resnet_18': not found in"),
    ("group_learner-arch-source", lambda r, t: group_learner(dls_of(r), "tim:resnet18", pretrained=False),
     ValueError, "unknown model source 'tim' in 'tim:resnet18': use 'timm:', 'torchvision:' or 'fastai:'"),
    ("group_learner-n_in", lambda r, t: learner(r, t, n_in=0), ValueError, "n_in must be a positive int, got 0"),
    ("group_learner-instance", lambda r, t: group_learner(dls_of(r), TinyNet(), lin_ftrs=[16], path=t), "print",
     "TinyNet instance taken as given: not frozen, no Normalize added; pass pretrained=True to freeze its body"),
    ("group_learner-instance-stats", lambda r, t: group_learner(dls_of(r), TinyNet(), pretrained=True,
                                                                lin_ftrs=[16], path=t), "print",
     "TinyNet instance taken as pretrained: body frozen, no Normalize added (the stats its weights expect are "
     "unknown: add Normalize.from_stats(mean, std) to the DataLoaders' batch_tfms)"),
    # arch_summary
    ("arch_summary-groups-name", lambda r, t: arch_summary(TinyNet, groups="stages"), ValueError,
     "groups='stages' is not a granularity: use one of 'stage', 'fastai', 'block', a splitter, its output or a "
     "Learner"),
    ("arch_summary-groups-foreign", lambda r, t: arch_summary(TinyNet, groups=auto_splitter(TinyNet())), ValueError,
     "the groups hold none of the summarised model's parameters"),
    ("fit-slice-one-group", lambda r, t: learner(r, t, splitter=lambda m: [list(m.parameters())]).fit(
        1, slice(1e-4, 1e-2)), ValueError, "lr=slice(0.0001, 0.01) spreads discriminative values over parameter "
     "groups, but the optimizer has a single group"),
    ("fit-lr-list", lambda r, t: learner(r, t).fit(1, [1e-3, 1e-2]), ValueError,
     "2 values for lr but the optimizer has 5 parameter groups: give one value, a slice, or 5 values"),
    ("freeze_to-type", lambda r, t: learner(r, t).freeze_to(1.5), TypeError,
     "freeze_to takes an int (the number of groups to freeze), got float"),
    ("freeze_to-range", lambda r, t: learner(r, t).freeze_to(9), IndexError,
     "freeze_to(9): the learner has 5 parameter groups (stem, stage1, stage2, stage3, head); use -4..5"),
    ("freeze-nothing", lambda r, t: learner(r, t, splitter=lambda m: [list(m.parameters())]).freeze(), ValueError,
     "freeze() would freeze nothing: the learner has 1 parameter group (group0)"),
    # GroupLearner.load
    ("load-empty", lambda r, t: load_bytes(r, t, "empty", b""), ValueError,
     "{t}/models/empty.pth is empty (0 bytes), not a checkpoint: the save that wrote it did not finish; save again "
     "with learn.save, or load another file"),
    ("load-text", lambda r, t: load_bytes(r, t, "notes", b"epoch 1 loss 0.3\n"), ValueError,
     "{t}/models/notes.pth is not a PyTorch checkpoint (it starts with b'epoch 1 loss 0.3'); load a file written "
     "by learn.save or torch.save"),
    ("load-truncated", lambda r, t: load_bytes(r, t, "cut", saved_bytes(r, t)[:5000]), ValueError,
     "{t}/models/cut.pth is truncated or damaged (5,000 bytes; torch cannot read it: "),
    ("load-pickled-objects", lambda r, t: (torch.save({"x": Perturb()}, t / "obj.pth"), learner(r, t).load(
        t / "obj")), ValueError, "{t}/obj.pth holds Python objects besides weights, which "
     "torch.load(weights_only=True) refuses (an export .pkl? read it with load_learner)"),
    ("load-other-grouping", lambda r, t: (with_opt(learner(r, t)).save("five"), learner(
        r, t, splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())]).load("five")), ValueError,
     "checkpoint {t}/models/five.pth has another grouping than this learner: the checkpoint has 5 groups"),
    # FeatureCache / check_cacheable
    ("FeatureCache-max_bytes", lambda r, t: FeatureCache(max_bytes=0), ValueError, "max_bytes must be > 0, got 0"),
    ("check_cacheable-RandomErasing", lambda r, t: check_cacheable(dls_of(r, batch_tfms=RandomErasing(p=0.2))),
     ValueError, "FeatureCache: dls.train applies transforms that may be random: RandomErasing (after_batch): a "
     "fastai RandTransform, random on the training set. Cached features would freeze one random view"),
    ("check_cacheable-Flip", lambda r, t: check_cacheable(dls_of(r, batch_tfms=Flip(p=0.05))), ValueError,
     "FeatureCache: dls.train applies transforms that may be random: Flip (after_batch)"),
    ("check_cacheable-Brightness", lambda r, t: check_cacheable(dls_of(r, batch_tfms=Brightness(p=0.05))),
     ValueError, "FeatureCache: dls.train applies transforms that may be random: Brightness (after_batch)"),
    ("check_cacheable-user-transform", lambda r, t: check_cacheable(dls_of(r, batch_tfms=Perturb())), ValueError,
     "FeatureCache: dls.train applies transforms that may be random: Perturb (after_batch): not known to be "
     "deterministic"),
    ("check_cacheable-function", lambda r, t: check_cacheable(dls_of(r, batch_tfms=keep)), ValueError,
     "FeatureCache: dls.train applies transforms that may be random: keep (after_batch): a function not known "
     "to be deterministic"),
    ("check_cacheable-Resize-crop", lambda r, t: check_cacheable(dls_of(folder(
        t, {"train/a": 2, "train/b": 2, "valid/a": 1, "valid/b": 1}, size=(48, 32)), item_tfms=Resize(32))),
     ValueError, "FeatureCache: dls.train applies transforms that may be random: Resize (after_item): "
     "method='crop' crops at random the images not at the target's aspect ratio, e.g. "),
    ("check_cacheable-MixUp", lambda r, t: check_cacheable(dls_of(r), [MixUp()]), ValueError,
     "FeatureCache: MixUp mixes the training batches at random: cached features would freeze one mix"),
    ("FeatureCache-fit-random", lambda r, t: learner(r, t, train_bn=False, cache_features=True).fit(1), None, None),
    # fine_tune_groups (the recipe): checked before anything trains; a phase that hurts is rolled back
    ("fine_tune_groups-one-group", lambda r, t: fine_tune_groups(plain_learner(r), 2), ValueError,
     "fine_tune_groups needs the head in a parameter group of its own, but the learner has 1 group (group0), so "
     "freeze() would freeze nothing: build it with splitter=auto_splitter (or group_learner)"),
    ("fine_tune_groups-gradual", lambda r, t: learner(r, t, cbs=GradualUnfreeze()).fine_tune_groups(2), ValueError,
     "fine_tune_groups decides when the body is frozen, but GradualUnfreeze in the callbacks changes it too"),
    ("fine_tune_groups-no-batch", lambda r, t: group_learner(dls_of(folder(t, {"train/a": 24, "train/b": 24,
     "valid/a": 2, "valid/b": 2}), bs=64), TinyNet, pretrained=False, lin_ftrs=[16]).fine_tune_groups(2), ValueError,
     "fine_tune_groups: the training data give no batch (48 items, batch size 64, drop_last): lower bs, or add images"),
    ("fine_tune_groups-one-class", lambda r, t: group_learner(dls_of(folder(t, {"train/a": 12, "valid/a": 2})), TinyNet,
     n_out=1, pretrained=False, lin_ftrs=[16]).fine_tune_groups(2), ValueError,
     "fine_tune_groups: the data have 1 class (a); a classifier needs at least 2 (one folder per class)"),
    ("fine_tune_groups-lr_max", lambda r, t: learner(r, t).fine_tune_groups(2, lr_max=1e-3), ValueError,
     "fine_tune_groups: lr_max= is set by the recipe; use base_lr"),
    ("fine_tune_groups-unknown-kwarg", lambda r, t: learner(r, t).fine_tune_groups(2, lr_mul=10), TypeError,
     "fine_tune_groups got an unexpected keyword argument 'lr_mul'; it forwards wd, moms, cbs, div, div_final, "
     "pct_start, reset_opt to fit_one_cycle"),
    ("fine_tune_groups-diverged", lambda r, t: quiet_fit(learner(r, t), base_lr=1e12), "warn",
     "fine_tune_groups: the head phase made the model worse (its validation loss is nan); rolled back to the "
     "weights before it. Lower base_lr (it was 1e+12)."),
    ("reestimate-no-batch", lambda r, t: reestimate_norm_stats(group_learner(dls_of(folder(t, {"train/a": 2,
     "train/b": 2, "valid/a": 1, "valid/b": 1}), bs=8), TinyNet, pretrained=False, lin_ftrs=[16])), ValueError,
     "reestimate_norm_stats: the training data yielded no batch; the statistics are left as they were"),
    ("load-other-shapes", lambda r, t: (ten_classes(r, t).save("ten"), learner(r, t).load("ten", with_opt=False)),
     ValueError, "checkpoint {t}/models/ten.pth does not fit this learner's model (another number of classes?): 2 "
     "tensors of another shape (1.8.weight: file (10, 16), learner (3, 16); 1.8.bias: file (10,), learner (3,)); "
     "nothing was loaded: build the learner as the one that saved it"),
    ("FeatureCache-too-small", lambda r, t: frozen(learner(r, t, train_bn=False, cbs=FeatureCache(
        max_bytes=1000))).fit(1),
     "print", "FeatureCache: the features need 48.4 KiB (48 items x 1,032 bytes) > max_bytes = 1000 B; training "
     "without the cache"),
    # check_image_folder
    ("check_image_folder-missing", lambda r, t: check_image_folder(t / "nope"), ValueError, "{t}/nope: no such folder"),
    ("check_image_folder-file", lambda r, t: check_image_folder(write(t, "a.png", b"x")), ValueError,
     "{t}/a.png is a file, not a folder of class sub-folders"),
    ("check_image_folder-one-class", lambda r, t: check_image_folder(folder(t, {"train/a": 2})), ValueError,
     "{t}/train needs at least 2 class sub-folders holding images (found only 'a'); put the images of each class "
     "in their own sub-folder"),
    ("check_image_folder-unreadable-class", lambda r, t: check_image_folder(
        (folder(t, {"a": 2, "b": 1}), write(t / "b", "0.png", b"not a png"))[0]), ValueError,
     "{t}: class folder(s) without readable images: b"),
    ("check_image_folder-valid-class", lambda r, t: check_image_folder(folder(
        t, {"train/a": 1, "train/b": 1, "valid/c": 1})), ValueError,
     "{t}/valid: class folder(s) missing from train/: c"),
    ("check_image_folder-unreadable-file", lambda r, t: check_image_folder(
        (folder(t, {"a": 2, "b": 2}), write(t / "b", "9.png", b"not a png"))[0]), "warn",
     "1 unreadable image file(s) in {t}: {t}/b/9.png"),
    ("check_image_folder-16-bit", lambda r, t: check_image_folder(folder(t, {"a": 2, "b": 2}, dtype=np.uint16)),
     "warn", "4 image(s) in {t} are 16- or 32-bit greyscale ({t}/a/0.png, {t}/a/1.png, {t}/b/0.png and 1 more): "
     "fastai's conversion to RGB clips them to a handful of grey levels; convert them to 8-bit first"),
]
ROWS = [r for r in ROWS if r[2] is not None]


@pytest.mark.parametrize("call,kind,start", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_message(image_folder, tmp_path, capsys, call, kind, start):
    start = start.replace("{t}", str(tmp_path))
    if kind == "warn":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(image_folder, tmp_path)
        msgs = [str(w.message) for w in caught]
        assert any(m.startswith(start) for m in msgs), msgs
    elif kind == "print":
        call(image_folder, tmp_path)
        out = capsys.readouterr().out
        assert start in out, out
    else:
        with pytest.raises(kind) as e:
            call(image_folder, tmp_path)
        msg = str(e.value)
        assert msg.startswith(start), msg
        assert "\n" not in msg, msg
