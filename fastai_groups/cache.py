"""`FeatureCache`: compute the frozen body's outputs once per item and train the head from them.

A `FastFrozenBody` (frozen.py) that, while the body is fully frozen, serves the training epochs (and validation
inside a fit) from features computed once per item; `check_cacheable` says why some data cannot be cached.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from fastai.callback.mixup import MixHandler
from fastai.torch_core import get_random_states, set_random_states, to_device
from torch import nn

from ._utils import fmt_bytes, preserve_modes, say
from .frozen import FastFrozenBody, GetBody

__all__ = ["FeatureCache", "check_cacheable", "random_transforms"]

_STOCHASTIC = ("DropPath", "StochasticDepth", "DropBlock")


def _stochastic_modules(module: nn.Module) -> list[str]:
    "Names of the types of dropout / stochastic-depth modules with a non-zero rate (they make training outputs random)."
    out = []
    for m in module.modules():
        name = type(m).__name__
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            out.append(name)
        elif any(s in name for s in _STOCHASTIC) and (getattr(m, "drop_prob", 0) or getattr(m, "p", 0)):
            out.append(name)
    return sorted(set(out))


_FASTAI = ("fastai.", "fastcore.", "fasttransform.")


def _pipelines(dl) -> list[tuple[str, Any]]:
    "(where, pipeline) of every transform pipeline `dl` applies: dataset transforms, item, before / after batch."
    pipes = [(f"dataset tfms[{i}]", getattr(tl, "tfms", None))
             for i, tl in enumerate(getattr(getattr(dl, "dataset", None), "tls", None) or [])]
    return pipes + [(nm, getattr(dl, nm, None)) for nm in ("after_item", "before_batch", "after_batch")]


def _function_of(t) -> Optional[Callable]:
    "The function a plain fastai `Transform(f)` wraps (`get_y=parent_label`, a lambda in `batch_tfms`), else None."
    from fastai.data.core import Transform
    if type(t) is not Transform:
        return None
    enc = getattr(t, "encodes", None)
    return getattr(enc, "_f", None) or getattr(enc, "__wrapped__", None) or enc


def _declared(t, declared: Sequence) -> bool:
    "The user says `t` is deterministic: `deterministic = True` on its class or itself, or listed in `declared`."
    types = tuple(d for d in declared if isinstance(d, type))
    return getattr(t, "deterministic", None) is True or isinstance(t, types) or any(t is d for d in declared)


def _resize_is_random(t, dl, k: int) -> Optional[str]:
    """Why `Resize` `t` (at position `k` of `dl.after_item`) crops or pads at random on the training set, else None:
    with method 'crop' / 'pad' it places the crop at random on items not at the target's aspect ratio, decided from
    the items' sizes (fastai's own `Resize` on a point at either extreme of its random placement)."""
    import copy
    from fastai.vision.core import TensorPoint
    if t.method == "squish":
        return None
    probe = copy.copy(t)                                 # never touch the user's transform
    ds, before = dl.dataset, dl.after_item.fs[:k]
    seen: set = set()
    for i in range(len(ds)):
        size, name = _item_size(ds, i, before)
        if size is None:
            return f"method={t.method!r} on items of unknown size"
        if size in seen:
            continue
        seen.add(size)
        outs = []
        for pcts in ((0.0, 0.0), (1 - 1e-9, 1 - 1e-9)):
            probe.pcts = pcts
            outs.append(probe.encodes(TensorPoint(torch.tensor([[0.0, 0.0]]), img_size=size)))
        if not torch.equal(*outs):
            return (f"method={t.method!r} {t.method}s at random the images not at the target's aspect ratio, e.g. "
                    f"{name} ({size[0]}x{size[1]}); use Resize(size, method='squish')")
    return None


def _item_size(ds, i: int, before: Sequence) -> tuple[Optional[tuple], str]:
    "(width, height) of item `i` of `ds` where `Resize` gets it (after `before`), and a name for messages."
    from PIL import Image
    item = ds.items[i] if hasattr(ds, "items") and not before else None
    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(item) as im:                  # reads the header only
                return tuple(im.size), str(item)
        except Exception:
            pass
    x = ds[i]
    for t in before:
        x = t(x, split_idx=0)
    x = x[0] if isinstance(x, tuple) else x
    size = getattr(x, "size", None)
    return (tuple(size), f"item {i}") if isinstance(size, tuple) and len(size) == 2 else (None, f"item {i}")


def _why_random(t, dl, where: str, k: int) -> Optional[str]:
    "Why transform `t` (position `k` of pipeline `where` of `dl`) may be random on the training set, else None."
    from fastai.vision.augment import RandTransform, Resize
    if getattr(t, "split_idx", None) == 1:               # runs on the validation set only
        return None
    if isinstance(t, Resize) and where == "after_item":
        return _resize_is_random(t, dl, k)
    if isinstance(t, RandTransform):
        return None if getattr(t, "p", 1) == 0 else "a fastai RandTransform, random on the training set"
    f = _function_of(t)
    if f is not None:                                    # a function: a getter in the dataset tfms, else unknown
        if where.startswith("dataset") or getattr(f, "__module__", "").startswith(_FASTAI):
            return None
        return "a function not known to be deterministic"
    if type(t).__module__.startswith(_FASTAI):           # fastai's other transforms draw nothing
        return None
    return "not known to be deterministic"


def random_transforms(dl, deterministic: Sequence = ()) -> list[str]:
    """`name: reason` of each transform `dl` applies to the training set that may be random, as `FeatureCache`
    decides it from the pipeline (dataset transforms, `after_item`, `before_batch`, `after_batch`). Deterministic:
    transforms that do not run on the training set (`split_idx == 1`), fastai `RandTransform`s with `p == 0`,
    `Resize(method='squish')`, `Resize` crop / pad when every training image already has the target's aspect
    ratio, fastai's other transforms, functions in the dataset transforms (getters such as `get_y`), and what the
    user declares: `deterministic = True` on a transform's class or instance, or listed in `deterministic`
    (classes or instances). Anything else may be random.

    >>> random_transforms(ImageDataLoaders.from_folder(path, batch_tfms=Flip()).train)  # doctest: +SKIP
    ['Flip (after_batch): a fastai RandTransform, random on the training set']
    """
    out = []
    for where, pipe in _pipelines(dl):
        for k, t in enumerate(getattr(pipe, "fs", None) or []):
            why = None if _declared(t, deterministic) else _why_random(t, dl, where, k)
            if why is not None:
                name = getattr(t, "name", None) if _function_of(t) is not None else type(t).__name__
                out.append(f"{name} ({where}): {why}")
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    "Leave Python's, numpy's and torch's random states as they were: work done inside does not shift training."
    states = get_random_states()
    try:
        yield
    finally:
        set_random_states(**states)


def _draw_loader_seed() -> None:
    """Iterating a fastai `DataLoader` builds a torch `DataLoader` iterator, which draws its base seed (one int64)
    from torch's global generator; the cached loader draws it too, so the random stream that follows (the head's
    dropout) is the one of a plain run."""
    torch.empty((), dtype=torch.int64).random_()


def _skip_forward(forward: Callable, x, *args, **kwargs):
    "The body's input is already its output (cached features)."
    return x


# ----------------------------------------------------------------------------------------------------------------
# FeatureCache
# ----------------------------------------------------------------------------------------------------------------
def check_cacheable(dls, cbs: Sequence = (), deterministic: Sequence = ()) -> None:
    """Raise a `ValueError` naming the cause when `FeatureCache` cannot cache `dls`: a transform of the training set
    that may be random (decided from the pipeline, see `random_transforms`; `deterministic`: transform classes or
    instances the user declares deterministic), a `MixUp` / `CutMix` callback in `cbs`, several inputs, a loader
    without batch size or on a non-indexed dataset.

    >>> check_cacheable(ImageDataLoaders.from_folder(path, batch_tfms=Flip()))  # doctest: +SKIP
    ValueError: FeatureCache: dls.train applies transforms that may be random: Flip (after_batch): ...
    """
    pre = "FeatureCache: "
    if getattr(dls, "n_inp", 1) != 1:
        raise ValueError(pre + f"the data has {dls.n_inp} inputs; the cache supports one (the image)")
    mix = [type(cb).__name__ for cb in cbs if isinstance(cb, MixHandler)]
    if mix:
        raise ValueError(pre + f"{', '.join(mix)} mixes the training batches at random: cached features would freeze "
                         "one mix; remove it for the frozen phase, or train without the cache")
    for name in ("train", "valid"):
        dl = getattr(dls, name)
        if not getattr(dl, "indexed", False) or getattr(dl, "bs", None) is None:
            raise ValueError(pre + f"dls.{name} must be an indexed (map-style) DataLoader with a batch size")
    found = random_transforms(dls.train, deterministic)
    if found:
        raise ValueError(pre + f"dls.train applies transforms that may be random: {'; '.join(found)}. Cached "
                         "features would freeze one random view: train the frozen phase without them (e.g. "
                         "item_tfms=Resize(size, method='squish'), no batch_tfms augmentation) or without the cache; "
                         "a transform that is deterministic can be declared: `deterministic = True` on its class, "
                         "or FeatureCache(deterministic=[MyTransform])")


class _Store:
    "Features and targets of every item of the train and valid datasets, in dataset order."

    def __init__(self, key: tuple, parts: dict, nbytes: int):
        self.key, self.parts, self.nbytes = key, parts, nbytes

    def describe(self) -> str:
        n = " + ".join(f"{len(f)} {k}" for k, (f, _) in self.parts.items())
        return f"{n} items, {fmt_bytes(self.nbytes)}"


class _CachedLoader:
    """Yields the batches `dl` would yield, in the same order (it draws the indices from `dl`'s own random state,
    the way iterating `dl` would), made of cached features; when the cache stops being usable in the middle of an
    epoch, the remaining batches are loaded from `dl`'s pipeline as usual. Other attributes are `dl`'s."""

    def __init__(self, dl, feats: torch.Tensor, ys: tuple, cache: "FeatureCache"):
        self.dl, self.feats, self.ys, self.cache = dl, feats, ys, cache
        self.last_was_features = False

    def __len__(self) -> int:
        return len(self.dl)

    def __getattr__(self, k):
        if k.startswith("__") or k in ("dl", "feats", "ys", "cache", "last_was_features"):
            raise AttributeError(k)
        return getattr(self.dl, k)

    def __iter__(self):
        dl = self.dl
        dl.randomize()
        dl.before_iter()
        idxs = list(dl.get_idxs())
        _draw_loader_seed()
        bs = dl.bs
        for i in range(0, len(idxs), bs):
            chunk = idxs[i:i + bs]
            if len(chunk) < bs and dl.drop_last:
                break
            if self.cache._feeding():
                t = torch.as_tensor(chunk, dtype=torch.long, device=self.feats.device)
                self.last_was_features = True
                yield (self.feats[t], *[y[t] for y in self.ys])
            else:
                self.last_was_features = False
                b = dl.do_batch([it for it in map(dl.do_item, chunk) if it is not None])
                if dl.device is not None:
                    b = to_device(b, dl.device)
                yield dl.after_batch(b)
        self.last_was_features = False
        dl.after_iter()


class FeatureCache(FastFrozenBody):
    """Compute the frozen body's outputs once per item and train the head from them.

    When a training epoch starts with the body fully frozen (see `FastFrozenBody`), the body is run once over every
    item of `dls.train` and `dls.valid` (in dataset order, without shuffling, in inference mode: norm layers use
    their running statistics, dropout / stochastic depth in the body are off, with a notice when the body has any)
    and the features and targets are kept. Each epoch then draws the batches the training loader would have drawn
    (same indices, same order, from the loader's own random state) from the cache: the body is skipped, the images
    are not even loaded, and the head's weights come out as in a plain run (`train_bn=False` + `BnFreeze`).
    Validation inside the fit reads the cache too; `learn.validate()` / `get_preds()` outside a fit, and `lr_find`,
    use the images as usual (with the fast frozen body in `lr_find`).

    The cache is dropped as soon as a body parameter trains again (`unfreeze`, `freeze_to`, `GradualUnfreeze`:
    checked when an epoch starts and, cheaply, at each batch; mid-epoch, the rest of the epoch loads images), and
    rebuilt when the body's weights change in place (`learn.load`, an optimizer step: seen through the tensors'
    version counters), the datasets are replaced, their items change (a list of files edited in place: the key
    holds a hash of `dataset.items`) or a transform is added to / removed from their pipelines. Otherwise it lives
    across fits (a second frozen `fit` reuses it); `clear()` frees it, and it is never pickled (`learn.export`).
    After changing an item's file on disk, or a transform's settings in place, call `clear()`.

    Refusals (`ValueError`, see `check_cacheable`): a transform of the training set that may be random, decided
    from the pipeline, not from samples (cached features would freeze one random view: train the frozen phase with
    deterministic data, e.g. `Resize(size, method="squish")` and no augmentation, or drop the cache). Known to be
    deterministic: fastai `RandTransform`s with `p=0` or that run on the validation set only, `Resize` with
    `method="squish"` or on training images already at the target's aspect ratio (read from the files), fastai's
    other transforms, functions in the dataset transforms (`get_x` / `get_y`). Any other transform is refused by
    name until declared: `deterministic = True` as a class (or instance) attribute, or
    `FeatureCache(deterministic=[MyTransform])`. Also refused: `MixUp` / `CutMix`, several inputs, a
    `torch.compile`d or `nn.DataParallel` model (the cache swaps the body's forward per batch; `FastFrozenBody`
    works there).

    Memory: features and targets of all items must fit in `max_bytes` (measured on the first batch). When they do
    not, a notice is printed and training continues without the cache on the fast frozen body (no autograd,
    inference-mode norm layers): the cache is only an optimisation, so a run is never stopped for it.

    It is a `FastFrozenBody` (same state attributes; `learn.fast_frozen_mode == "cached"` while cached); with both in
    `learn.cbs` only the `FeatureCache` acts. Features are computed in float32 outside `autocast`.

    Args:
        max_bytes: most bytes the cache may take (features + targets, all items). Example: `max_bytes=512 * 2**20`.
        device: where the cache is kept; default: where the features are computed (the data's device). Example:
            `device="cpu"` to keep GPU memory free (batches are moved to the GPU as they are drawn).
        get_body: as in `FastFrozenBody`.
        verbose: print a line when the cache is built, dropped, or does not fit.
        deterministic: transform classes or instances to treat as deterministic (your own, known not to draw
            random numbers). Example: `deterministic=[MyCenterCrop]`.

    Example::

        dls = ImageDataLoaders.from_folder(path, item_tfms=Resize(128, method="squish"))   # no augmentation
        learn = group_learner(dls, resnet34, train_bn=False, cbs=FeatureCache(max_bytes=2**30))
        learn.fit_one_cycle(5, 1e-3)    # the body runs once per image, then only the head trains
        learn.feature_cache.nbytes
    """
    order, run_valid, leads = FastFrozenBody.order, True, 1

    def __init__(self, max_bytes: int = 2 * 2**30, device: Any = None, get_body: Optional[GetBody] = None,
                 verbose: bool = True, deterministic: Sequence = ()):
        super().__init__(get_body=get_body, verbose=verbose)
        self.deterministic = list(deterministic) if isinstance(deterministic, (list, tuple)) else [deterministic]
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes, self.device = int(max_bytes), device
        self.store: Optional[_Store] = None
        self._too_big: Any = None     # key of weights/data that did not fit: not retried until it changes
        self._usable, self._dropped, self._serving = False, False, False
        self._loaders: dict = {}

    @property
    def nbytes(self) -> int:
        "Bytes held by the cache (0 when empty)."
        return self.store.nbytes if self.store is not None else 0

    def clear(self) -> None:
        "Free the cache."
        self.store, self._loaders = None, {}

    def __getstate__(self):
        "Never pickle the cache (`learn.export`)."
        state = dict(self.__dict__)
        state.update(store=None, _loaders={}, _call=None)
        return state

    # ------------------------------------------------------------------------------------------------ events
    def before_fit(self):
        super().before_fit()
        self._serving = False
        self._usable = not hasattr(self.learn, "lr_finder") and not hasattr(self.learn, "gather_preds")

    def before_validate(self):
        "Inside a fit, validate from the cache too."
        if self._serving and self.on and self._valid() and self.learn.dl is self.learn.dls.valid:
            self.learn.dl = self._loader("valid", self.learn.dls.valid)

    def before_batch(self):
        if self.training:
            self._check()
        if self._batch_is_features():
            self._install(_skip_forward)

    def after_fit(self):
        super().after_fit()
        self._serving = False

    # ------------------------------------------------------------------------------------------------ hooks
    def _prepare_epoch(self) -> None:
        "Build or check the cache and serve this epoch from it (not when another callback replaced `learn.dl`)."
        self._serving = False
        if not (self.on and self._usable and self.learn.dl is self.learn.dls.train):
            return
        if self._keep_forward:
            raise ValueError("FeatureCache: learn.model runs under torch.compile or nn.DataParallel, where the cache "
                             "cannot skip the body (its forward must stay as it is); train the frozen phase on the "
                             "bare model, or use FastFrozenBody instead of the cache")
        if not self._valid():
            if self.store is not None:
                self.clear()
                self._announced = None          # say it again once rebuilt
            self._build()
        if self._valid():
            self.learn.dl = self._loader("train", self.learn.dls.train)
            self._serving = True

    def _release(self) -> None:
        self._dropped, self._serving = self.store is not None, False
        self.clear()

    def _mode(self) -> str:
        if not self.on:
            return ""
        return "cached" if self._serving else "no_grad"

    def _info(self) -> str:
        if self.on and self._serving:
            return f"cached features ({self.store.describe()}), body not run"
        return super()._info()

    def _message(self, on: bool) -> str:
        if on and self._serving:
            return (f"body fully frozen -> features computed once ({self.store.describe()}); the head trains from "
                    "the cache")
        if not on and self._dropped:
            return "body trainable -> feature cache dropped, autograd and training-mode norm layers restored"
        return super()._message(on)

    # ------------------------------------------------------------------------------------------------ internals
    def _batch_is_features(self) -> bool:
        dl = getattr(self.learn, "dl", None)
        return isinstance(dl, _CachedLoader) and dl.last_was_features

    def _feeding(self) -> bool:
        "Asked by the cached loader before each batch: serve features?"
        self._check()
        return self.on and self._serving and self.store is not None

    def _key(self) -> tuple:
        """What the cached features depend on: the body's tensors (identity and in-place version), the datasets
        (identity, length, their items: a list of files changed in place counts) and their transforms."""
        body = self._body
        tensors = tuple((id(t), t._version) for t in (*body.parameters(), *body.buffers()))
        dls = self.learn.dls
        data = tuple((id(dl.dataset), len(dl.dataset), _items_key(dl.dataset),
                      tuple(id(t) for _, pipe in _pipelines(dl) for t in getattr(pipe, "fs", None) or []))
                     for dl in (dls.train, dls.valid))
        return id(body), tensors, data

    def _valid(self) -> bool:
        return self.store is not None and self.store.key == self._key()

    def _loader(self, name: str, dl) -> _CachedLoader:
        cached = self._loaders.get(name)
        if cached is None or cached.dl is not dl:
            feats, ys = self.store.parts[name]
            cached = self._loaders[name] = _CachedLoader(dl, feats, ys, self)
        return cached

    def _build(self) -> bool:
        "Compute and keep the features; False (with a notice) when they do not fit in `max_bytes`."
        key = self._key()
        if self._too_big == key:
            return False
        check_cacheable(self.learn.dls, self.learn.cbs, self.deterministic)
        dls = self.learn.dls
        n = {name: len(getattr(dls, name).dataset) for name in ("train", "valid")}
        stoch = _stochastic_modules(self._body)
        if stoch:
            say(f"FeatureCache: the body's {', '.join(stoch)} are off in the cached features (inference mode); "
                 "the uncached frozen body applies them", self._quiet)
        parts, total = {}, 0
        with _rng_preserved(), torch.no_grad(), _inference_mode(self._body):
            for name in ("train", "valid"):
                out = self._compute(getattr(dls, name), n[name], n_all=sum(n.values()))
                if out is None:
                    self._too_big = key
                    return False
                parts[name] = out[:2]
                total += out[2]
        self.store, self._too_big = _Store(key, parts, total), None
        return True

    def _compute(self, dl, n: int, n_all: int):
        "(features, targets, nbytes) of every item of `dl.dataset`, in order; None when they would not fit."
        src = dl.new(shuffle=False, drop_last=False)
        body_device = next(iter(self._params), torch.empty(0)).device
        feats, ys, pos = None, [], 0
        for b in src:
            b = to_device(b, body_device)
            x = b[0].as_subclass(torch.Tensor) if isinstance(b[0], torch.Tensor) else b[0]
            f = self._body(x)
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"FeatureCache: the body returned {type(f).__name__}; a tensor is needed")
            if feats is None:
                per_item = f[0].nbytes + sum(t[0].nbytes for t in b[1:] if isinstance(t, torch.Tensor))
                need = per_item * n_all
                if need > self.max_bytes:
                    say(f"FeatureCache: the features need {fmt_bytes(need)} ({n_all} items x {per_item:,} "
                         f"bytes) > max_bytes = {fmt_bytes(self.max_bytes)}; training without the cache, on "
                         "the fast frozen body. Raise max_bytes, or lower the image size, to cache", self._quiet)
                    return None
                dev = torch.device(self.device) if self.device is not None else f.device
                feats = torch.empty((n, *f.shape[1:]), dtype=f.dtype, device=dev)
                ys = [[] for _ in b[1:]]
            if pos + len(f) > n:
                raise ValueError(f"FeatureCache: the loader gave more than the dataset's {n} items")
            feats[pos:pos + len(f)] = f.to(feats.device)
            for acc, t in zip(ys, b[1:]):
                acc.append(t.to(feats.device))
            pos += len(f)
        if pos != n:
            raise ValueError(f"FeatureCache: the loader gave {pos} of the dataset's {n} items (skipped items?); "
                             "the cache needs every item")
        if feats is None:                      # an empty dataset (no validation set)
            return torch.empty(0), (), 0
        ys = tuple(torch.cat(acc) for acc in ys)
        return feats, ys, feats.nbytes + sum(y.nbytes for y in ys)


def _items_key(ds) -> Any:
    "A fingerprint of `ds.items` (files, rows): changes when the items are replaced, added or removed in place."
    items = getattr(ds, "items", None)
    if items is None:
        return None
    try:
        if hasattr(items, "to_numpy"):                       # a DataFrame (from_df)
            import pandas as pd
            return id(items), len(items), int(pd.util.hash_pandas_object(items).sum())
        return id(items), len(items), hash(tuple(items))
    except TypeError:                                        # unhashable items: identity of each
        return id(items), len(items), tuple(map(id, items))


@contextlib.contextmanager
def _inference_mode(module: nn.Module) -> Iterator[None]:
    "`module.eval()` inside, every submodule's own `training` flag restored after."
    with preserve_modes(module):
        module.eval()
        yield
