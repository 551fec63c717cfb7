"""Data and Learners for the fine-tuning benchmarks, built the same way for ours and for fastai.

- Data: image folders (`train/<class>/*.png`, `valid/<class>/*.png`), optionally a class-balanced subset, resized
  with `Resize(size, method="squish")` (deterministic, so the feature cache may be used), no batch augmentation,
  `num_workers=0` (worker processes would compete with the 2 torch threads).
- fastai: `vision_learner(dls, arch, pretrained=False)`; for `tf_efficientnet_lite0` the offline ImageNet weights
  are loaded into its timm body (`learn.model[0].model`) and `Normalize` is added with the timm config's stats,
  which is what `vision_learner(pretrained=True)` would do (with `pretrained=False` fastai adds no `Normalize`).
- ours: `group_learner(dls, arch, ...)` (default `auto_splitter`; it adds `Normalize` from the weights' stats).
- `finetune(ctx, kind, ...)`: one `fine_tune` run, memoised in `ctx.memo` so sections share runs.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Optional

from .common import Context, epoch_timer, log, median, quiet

LITE0 = "tf_efficientnet_lite0"

#: fine-tune kinds: (label in the report, description)
KINDS = {
    "fastai": ("fastai `vision_learner`", "2 groups (body, head), `train_bn=True`"),
    "ours": ("ours `group_learner`", "auto_splitter groups, `train_bn=True` (fastai's freeze)"),
    "ours_fast": ("ours, fast frozen body", "`group_learner(train_bn=False)`: body without autograd, BN in eval"),
    "ours_cache": ("ours, fast frozen + feature cache", "`train_bn=False, cache_features=True`"),
    "ours_plain": ("ours, `train_bn=False` + `BnFreeze`, no fast path", "the plain path the fast one must equal"),
}

_LITE0_SD: dict = {}


def lite0_weights() -> dict:
    "The offline ImageNet weights of `tf_efficientnet_lite0` (timm keys), read once."
    if "sd" not in _LITE0_SD:
        from fastai_groups import lite0_state_dict
        _LITE0_SD["sd"] = lite0_state_dict()
    return _LITE0_SD["sd"]


def _balanced(path: Path, split: str, n: Optional[int]) -> list:
    "The files of `path/split`, classes taken in turn (first file of each class, then the second, ...), first `n`."
    classes = sorted(d for d in (path / split).iterdir() if d.is_dir())
    per_class = [sorted(c.glob("*.png"), key=lambda p: (len(p.stem), p.stem)) for c in classes]
    items = [f for row in zip(*per_class) for f in row]
    longest = max(map(len, per_class), default=0)
    if any(len(p) != longest for p in per_class):  # unequal classes: append the rest in class order
        seen = set(items)
        items += [f for p in per_class for f in p if f not in seen]
    return items if n is None else items[:n]


def folder_dls(path: Path, size: int, bs: int = 32, n_train: Optional[int] = None, n_valid: Optional[int] = None,
               device=None):
    "fastai DataLoaders on an image folder (or a balanced subset of it): squish-resized to `size`, no augmentation."
    from fastai.vision.all import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, Resize, ResizeMethod,
                                   parent_label)
    path = Path(path)
    items = _balanced(path, "train", n_train) + _balanced(path, "valid", n_valid)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: items,
                      splitter=GrandparentSplitter(train_name="train", valid_name="valid"), get_y=parent_label,
                      item_tfms=Resize(size, method=ResizeMethod.Squish))
    return block.dataloaders(path, bs=bs, num_workers=0, device=device)


def frozen_module():
    "`fastai_groups.frozen` (fast frozen body, feature cache), or None when it cannot be imported."
    try:
        from fastai_groups import frozen
        return frozen
    except ImportError:
        return None


def fastai_learner(dls, arch, lr: float, cbs=(), n_out=None, train_bn: bool = True, loss_func=None):
    """fastai's `vision_learner` without downloads. `arch`: `LITE0` (a timm name: the offline ImageNet weights are
    loaded into the body and the timm config's `Normalize` is added) or a torchvision builder (random weights)."""
    from fastai.vision.all import Normalize, accuracy, vision_learner
    metrics = accuracy if n_out is None else None
    learn = vision_learner(dls, arch, pretrained=False, normalize=False, metrics=metrics, cbs=list(cbs), lr=lr,
                           n_out=n_out, train_bn=train_bn, loss_func=loss_func)
    if arch == LITE0:
        from fastai_groups import load_state_dict
        timm_model = learn.model[0].model
        load_state_dict(timm_model, lite0_weights())
        cfg = timm_model.pretrained_cfg
        dls.add_tfms([Normalize.from_stats(cfg["mean"], cfg["std"])], "after_batch")
    return learn


def our_learner(dls, arch, lr: float, pretrained: bool, train_bn: bool = True, cache: bool = False, cbs=(),
                n_out=None, fast: Optional[bool] = None, loss_func=None):
    """`group_learner` with a silent `GroupLogger` (it would print freeze tables).

    `fast` (default: `not train_bn`): the fast frozen body; when `group_learner` does not attach `FastFrozenBody`
    itself, it is added here (from `fastai_groups.frozen`, when that module exists); `fast=False` removes it (the
    plain path). `cache=True` (with `train_bn=False`): the feature cache, `cache_features=True`, else the
    `FeatureCache` callback added here; `ImportError` when neither exists."""
    from fastai.vision.all import accuracy
    from fastai_groups import GroupLogger
    from fastai_groups.learner import group_learner
    cbs = [GroupLogger(show_table=False), *cbs]
    metrics = accuracy if n_out is None else None
    kw = dict(pretrained=pretrained, train_bn=train_bn, metrics=metrics, lr=lr, n_out=n_out, loss_func=loss_func)
    frozen = frozen_module()
    fast = (not train_bn) if fast is None else fast
    learn = None
    if cache:
        try:
            learn = group_learner(dls, arch, cbs=cbs, cache_features=True, **kw)
        except NotImplementedError:
            if frozen is None:
                raise ImportError("no feature cache: group_learner(cache_features=True) is not implemented and "
                                  "fastai_groups.frozen cannot be imported") from None
            from fastai_groups.cache import FeatureCache
            learn = group_learner(dls, arch, cbs=[*cbs, FeatureCache(verbose=False)], **kw)
    else:
        learn = group_learner(dls, arch, cbs=cbs, **kw)
    if frozen is not None:
        attached = [cb for cb in learn.cbs if isinstance(cb, frozen.FastFrozenBody)]
        if fast and not attached:
            learn.add_cb(frozen.FastFrozenBody(verbose=False))
        elif not fast and not cache:
            learn.remove_cbs(attached)
    return learn


def normalize_stats(dls) -> str:
    "The `Normalize` of `dls.after_batch` as `mean=(...) std=(...)`, or `none`."
    from fastai.data.transforms import Normalize
    norms = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    if not norms:
        return "none"
    fmt = lambda t: "(" + ", ".join(f"{float(v):.3f}" for v in t.flatten()) + ")"  # noqa: E731
    return "; ".join(f"mean={fmt(n.mean)} std={fmt(n.std)}" for n in norms)


def callback_names(learn) -> list[str]:
    return [type(cb).__name__ for cb in learn.cbs]


def build(kind: str, dls, arch, lr: float, cbs=(), pretrained: bool = True, n_out=None):
    "The Learner of fine-tune `kind` (see `KINDS`); `pretrained` only concerns ours (fastai's gets lite0 weights)."
    if kind == "fastai":
        return fastai_learner(dls, arch, lr, cbs, n_out=n_out)
    ours_arch = f"timm:{arch}" if arch == LITE0 else arch
    if kind == "ours":
        return our_learner(dls, ours_arch, lr, pretrained, train_bn=True, cbs=cbs, n_out=n_out)
    if kind == "ours_fast":
        return our_learner(dls, ours_arch, lr, pretrained, train_bn=False, cbs=cbs, n_out=n_out)
    if kind == "ours_cache":
        return our_learner(dls, ours_arch, lr, pretrained, train_bn=False, cache=True, cbs=cbs, n_out=n_out)
    if kind == "ours_plain":
        from fastai.callback.training import BnFreeze
        return our_learner(dls, ours_arch, lr, pretrained, train_bn=False, fast=False, cbs=[*cbs, BnFreeze()],
                           n_out=n_out)
    raise ValueError(f"unknown kind {kind!r}")


def warm_up(size: int, bs: int) -> None:
    "One untimed forward/backward of a lite0 at this input size, so one-off kernel set-up is not in any timing."
    import timm
    import torch
    m = timm.create_model(LITE0, num_classes=10)
    x = torch.randn(bs, 3, size, size)
    m(x).sum().backward()
    m.eval()
    with torch.no_grad():
        m(x)


def finetune(ctx: Context, kind: str, data: str, path: Path, seed: int, size: int, epochs: int, bs: int,
             lr: float, n_train: Optional[int] = None, n_valid: Optional[int] = None) -> dict:
    """`learn.fine_tune(epochs, lr)` of lite0 with fine-tune `kind` on `path`, seeded with fastai's
    `set_seed(seed, reproducible=True)` before the data and the Learner are built. Returns the final accuracy,
    the frozen epoch's time, the median unfrozen epoch time, the total time, and the Learner's callbacks.
    Memoised in `ctx.memo` (the `lite0` and `frozen` sections share runs)."""
    key = ("finetune", kind, data, seed, size, epochs, bs, lr, n_train, n_valid)
    if key in ctx.memo:
        return ctx.memo[key]
    from fastai.torch_core import set_seed
    if ("warm_up", size, bs) not in ctx.memo:  # first run at this size: kernel set-up outside the timings
        warm_up(size, bs)
        ctx.memo[("warm_up", size, bs)] = True
    log(f"  fine_tune({epochs}) {kind} on {data}, seed {seed}")
    set_seed(seed, reproducible=True)
    dls = folder_dls(path, size, bs, n_train, n_valid)
    timer = epoch_timer()
    learn = build(kind, dls, LITE0, lr, cbs=[timer])
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(), quiet():
        learn.fine_tune(epochs, lr)
    total = time.perf_counter() - t
    res = {"acc": float(learn.recorder.values[-1][2]), "total": total, "norm": normalize_stats(dls),
           "frozen_epoch": timer.fits[0][0]["epoch"],
           "frozen_train": timer.fits[0][0]["train"],
           "unfrozen_epoch": median(e["epoch"] for e in timer.fits[1]),
           "unfrozen_train": median(e["train"] for e in timer.fits[1]),
           "frozen_mode": timer.fits[0][0]["mode"],
           "n_items": len(dls.train_ds) + len(dls.valid_ds), "cbs": callback_names(learn)}
    del learn, dls
    gc.collect()
    ctx.memo[key] = res
    return res
