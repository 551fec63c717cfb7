"""The fine-tuning Learner: `group_learner(dls, arch)` is fastai's `vision_learner` for any architecture, and
returns a `GroupLearner`, a fastai `Learner` that records its group names and refuses what fastai would silently
do otherwise (freezing nothing, a `slice` over one group). Checkpoint extras live in `checkpoint.py`.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import warnings
from typing import Any, Callable, Optional, Sequence, Union  # Sequence, Union: create_head's annotations in the @delegates signature

import torch
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastcore.meta import delegates
from torch import nn

from ._utils import say, unwrap_model
from .body import Cut, build_body
from .callbacks import GroupLogger
from .checkpoint import export_state, load_checkpoint, restore_export, save_checkpoint
from .frozen import FastFrozenBody
from .cache import FeatureCache
from .head import create_head, join_head
from .recipe import DEFAULT_LR, DEFAULT_LR_MULT, fine_tune_groups
from .splitters import auto_splitter, group_names, learner_group_names
from .weights import known_stats

__all__ = ["group_learner", "GroupLearner"]



def _add_norm(dls, stats: dict, n_in: int) -> None:
    """Add `Normalize` with the weights' stats to `dls.after_batch`, unless one is there already (fastai's rule;
    a warning when that one uses other stats)."""
    from fastai.data.transforms import Normalize
    mean, std = tuple(float(v) for v in stats["mean"]), tuple(float(v) for v in stats["std"])
    present = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    if present:
        t = present[0]
        have = [tuple(float(v) for v in x.flatten()) if isinstance(x, torch.Tensor) else None for x in (t.mean, t.std)]
        if have[0] is not None and (len(have[0]) != len(mean) or not torch.allclose(
                torch.tensor(have[0] + have[1]), torch.tensor(mean + std), atol=1e-4)):
            warnings.warn(f"the DataLoaders already normalise with mean={have[0]}, std={have[1]}, but the weights "
                          f"expect mean={mean}, std={std}; keeping the DataLoaders' Normalize", stacklevel=3)
        return
    if len(mean) != n_in:
        warnings.warn(f"not normalising: the weights' stats have {len(mean)} channels but n_in={n_in}; add your "
                      "own Normalize to the DataLoaders' batch_tfms", stacklevel=3)
        return
    dls.add_tfms([Normalize.from_stats(mean, std)], "after_batch")


def _instance_note(model: nn.Module, frozen: bool, stats: Optional[dict], weights: Any) -> str:
    "The line saying what `group_learner` did with a model instance (`stats`: {} when `normalize=False`)."
    name = f"{type(unwrap_model(model)).__name__} instance"
    if not frozen:
        return (f"{name} taken as given: not frozen, no Normalize added; pass pretrained=True to freeze its body "
                "(and normalise with its weights' stats)")
    if stats is None:
        norm = ("no Normalize added (the stats its weights expect are unknown: add Normalize.from_stats(mean, std) "
                "to the DataLoaders' batch_tfms)")
    elif not stats:
        norm = "no Normalize added (normalize=False)"
    else:
        norm = f"normalised with {known_stats(model, weights)[1]}"
    return f"{name} taken as pretrained: body frozen, {norm}"


def _with_group_logger(cbs) -> list:
    "`cbs` as a list, plus a `GroupLogger()` unless it has one."
    from fastai.callback.core import Callback
    cbs = [] if cbs is None else [cbs] if isinstance(cbs, (Callback, type)) else list(cbs)
    if not any(isinstance(c, GroupLogger) or (isinstance(c, type) and issubclass(c, GroupLogger)) for c in cbs):
        cbs.append(GroupLogger())
    return cbs


def _checked_set_hyper(opt, k, v) -> None:
    """fastai's `Optimizer.set_hyper`, refusing what it would do silently or with a bare `AssertionError`: a
    `slice(lo, hi)` over a single group (fastai quietly uses `hi`) and a list with one value per group of another
    optimizer."""
    n = len(opt.param_lists)
    if isinstance(v, slice) and v.start and n == 1 and v.start != v.stop:
        raise ValueError(f"{k}=slice({v.start:g}, {v.stop:g}) spreads discriminative values over parameter groups, "
                         f"but the optimizer has a single group (fastai would silently use {v.stop:g}): pass one "
                         "value, or use a splitter that gives several groups (auto_splitter)")
    if isinstance(v, (list, tuple)) and len(v) not in (1, n):
        raise ValueError(f"{len(v)} values for {k} but the optimizer has {n} parameter groups: give one value, a "
                         f"slice, or {n} values")
    type(opt).set_hyper(opt, k, v)


def _is_auto_splitter(f) -> bool:
    "Whether `f` is `auto_splitter`, possibly in `functools.partial` or `functools.wraps` wrappers (`checked`)."
    for _ in range(8):
        if f is auto_splitter:
            return True
        f = getattr(f, "func", None) or getattr(f, "__wrapped__", None)
    return False


class GroupLearner(Learner):
    """The fastai `Learner` that `group_learner` returns: fastai's, plus clear errors where fastai silently does
    something else than asked.

    - `freeze_to(n)` accepts `-(k-1)..k` for `k` groups; outside `-k..k` it raises `IndexError` (fastai freezes
      nothing or everything); a freeze that freezes nothing (`freeze()` on a single group, `freeze_to(-len(groups))`)
      raises `ValueError` (fastai does nothing, silently).
    - A `slice(lo, hi)` learning rate (or any hyper) on a single parameter group, or a list of values of the
      wrong length, raises `ValueError` (fastai uses `hi` silently, or fails with a bare `AssertionError`).

    >>> learn = group_learner(dls, "resnet18", pretrained=False)  # doctest: +SKIP
    >>> learn.freeze_to(9)  # doctest: +SKIP
    IndexError: freeze_to(9): the learner has 6 parameter groups (stem, ..., head); use -5..6: ...
    """

    def create_opt(self):
        """fastai's, recording the group names of the splitter's output on the optimizer (`learn.group_names`,
        read by the logger, the freeze table, checkpoints and the CLI: the splitter runs once per optimizer)."""
        splitter, out = self.splitter, []
        self.splitter = lambda model: out.append(splitter(model)) or out[-1]
        try:
            super().create_opt()
        finally:
            self.splitter = splitter
        names = getattr(out[-1], "names", None) if out else None
        self.opt.group_names = group_names(self.opt.param_lists) if names is None else list(names)
        # fastai's Optimizer has no hook for checking hypers: its set_hyper is wrapped on this instance (see the
        # package docstring's list of patches)
        self.opt.set_hyper = functools.partial(_checked_set_hyper, self.opt)

    @property
    def group_names(self) -> list[str]:
        "The name of each parameter group of the optimizer, body to head (`auto_splitter`'s, else `group0`, ...)."
        return learner_group_names(self)

    def freeze_to(self, n: int):
        if self.opt is None:
            self.create_opt()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"freeze_to takes an int (the number of groups to freeze), got {type(n).__name__}")
        k = len(self.opt.param_lists)
        names = ", ".join(learner_group_names(self))
        ok = f"-{k - 1}..{k}" if k > 1 else "0..1"
        rule = "freeze_to(n) freezes the first n groups, freeze_to(-n) trains only the last n, freeze_to(0) trains all"
        if not -k <= n <= k:
            raise IndexError(f"freeze_to({n}): the learner has {k} parameter group{'s' if k > 1 else ''} ({names}); "
                             f"use {ok}: {rule}")
        if n == -k:
            what = "freeze()" if n == -1 else f"freeze_to({n})"
            if k == 1:
                fix = ("auto_splitter found no separate head in this model: pass a model whose last child is the head, "
                       "or a splitter of your own" if _is_auto_splitter(self.splitter) else
                       "Use a splitter that puts the head in its own last group (auto_splitter does)")
                raise ValueError(f"{what} would freeze nothing: the learner has 1 parameter group ({names}); fastai "
                                 f"would silently train everything. {fix}")
            raise ValueError(f"{what} would freeze nothing: the learner has {k} parameter groups ({names}) and "
                             f"{what} trains the last {k}, that is all of them; use {ok}: {rule}")
        super().freeze_to(n)

    def fine_tune_groups(self, epochs: int, base_lr: float = DEFAULT_LR, head_epochs: Optional[int] = None,
                         unfrozen_epochs: Optional[int] = None, lr_mult: float = DEFAULT_LR_MULT,
                         reestimate: Optional[bool] = None, cache: Optional[bool] = None,
                         keep_norm_stats: Optional[bool] = None, **kwargs) -> dict:
        """The library's recipe within fastai's `fine_tune(epochs)` budget: a head phase on the frozen body, then,
        when the data are large enough, an unfrozen phase at discriminative rates kept only if validation improves
        (`fastai_groups.recipe.fine_tune_groups`, which documents every argument). Returns the plan that ran.

        >>> learn = group_learner(dls, "tf_efficientnet_lite0", metrics=accuracy)  # doctest: +SKIP
        >>> learn.fine_tune_groups(3)["unfrozen_epochs"]  # doctest: +SKIP
        0
        """
        return fine_tune_groups(self, epochs, base_lr, head_epochs, unfrozen_epochs, lr_mult, reestimate, cache,
                                keep_norm_stats, **kwargs)

    def save(self, file: Any, with_opt: bool = True, pickle_protocol: int = 2, **torch_save_kwargs) -> Any:
        """fastai's `save` (`{'model': ..., 'opt': ...}` in `path/model_dir/file.pth`, rank 0 only), plus what
        resuming needs and fastai does not keep (`checkpoint.py`): the groups (names, sizes), the freeze state
        (`requires_grad` of every parameter, `opt.frozen_idx`), the state of every callback with `state_dict`
        (the `GroupLogger` history) and the random states (Python, numpy, torch CPU and CUDA generators, and the
        shuffling `rng` of each loader of `dls`). A plain fastai `Learner` loads the file too. The weights are
        saved without `torch.compile` / `DataParallel` / DDP wrappers. `with_opt=False`: the weights only, as
        fastai. Returns the file's path.

        >>> learn.fit_one_cycle(1, slice(1e-4, 1e-3)); learn.save("epoch0")  # doctest: +SKIP
        >>> fresh = group_learner(dls, "resnet18", pretrained=False).load("epoch0")  # doctest: +SKIP
        >>> fresh.fit_one_cycle(3, slice(1e-4, 1e-3), start_epoch=1)  # doctest: +SKIP
        """
        from fastcore.xtras import join_path_file
        file = join_path_file(file, self.path / self.model_dir, ext=".pth")
        save_checkpoint(self, file, with_opt, pickle_protocol, **torch_save_kwargs)
        return file

    def load(self, file: Any, device: Any = None, with_opt: bool = True, strict: bool = True,
             **torch_load_kwargs) -> "GroupLearner":
        """fastai's `load`, restoring what `save` kept. With `with_opt` (and a file that has an optimizer state): the
        per-group hypers and optimizer state, the freeze state (whatever this learner's was: it is not re-frozen
        from a schedule), the callbacks' states (the `GroupLogger` history: the next fit continues its
        iteration count) and the random states `save` kept (the global generators, changed by `load`, and the
        loaders' shuffling; not under DDP, where each process keeps its own). So a fit saved at the end of an
        epoch (`SaveModelCallback(every_epoch=True, with_opt=True)`) and resumed in a new learner on the same data
        with `fit_one_cycle(n, start_epoch=k)` gives the weights of the uninterrupted fit, bit for bit on CPU
        (shuffling, augmentation and dropout draw the same numbers; on GPU, up to non-deterministic kernels).
        With `with_opt`, a checkpoint of another grouping (number or sizes of groups) raises `ValueError` naming
        both, before anything is changed (fastai only warns and trains on; of a plain fastai
        file only the number of groups is known). Files saved by plain fastai load as with fastai (weights,
        optimizer state); `with_opt=False` loads the weights only. `file`: a name in `path/model_dir` (`.pth`
        added) or a path; `device`, `strict`: as fastai's.

        >>> learn.load("epoch0")  # doctest: +SKIP
        ValueError: checkpoint .../models/epoch0.pth has another grouping than this learner: ...
        """
        from fastcore.xtras import join_path_file
        file = join_path_file(file, self.path / self.model_dir, ext=".pth")
        load_checkpoint(self, file, device, with_opt, strict, **torch_load_kwargs)
        return self

    def export(self, fname: Any = "export.pkl", **kwargs) -> None:
        """fastai's `export` (the learner without data and optimizer state, for inference), keeping the per-group
        hypers and `frozen_idx`: `load_learner` returns a learner whose optimizer has them, with the groups, the
        freeze state (`requires_grad` travels with the parameters) and the `GroupLogger` history.

        >>> learn.export("export.pkl"); load_learner(learn.path / "export.pkl").opt.hypers  # doctest: +SKIP
        """
        saved = self._export_opt = export_state(self)
        try:
            super().export(fname, **kwargs)
        finally:
            del self._export_opt
            if saved is not None and self.opt is not None:   # fastai's export rebuilds this learner's optimizer
                self.opt.frozen_idx = saved["frozen_idx"]

    def __setstate__(self, state: dict) -> None:
        "fastai's, then (in `load_learner`) an optimizer with the hypers and `frozen_idx` that `export` kept."
        exported = state.pop("_export_opt", None)
        super().__setstate__(state)
        if exported is not None:                    # unpickled by load_learner: the optimizer `export` described
            restore_export(self, exported)


def _with_fast_frozen(cbs: list, cache: bool) -> list:
    "`cbs` plus a `FeatureCache()` (when `cache`) or a `FastFrozenBody()`, unless one of the kind asked is there."
    kind = FeatureCache if cache else FastFrozenBody
    if not any(isinstance(c, kind) or (isinstance(c, type) and issubclass(c, kind)) for c in cbs):
        cbs.append(kind())
    return cbs


@delegates(Learner.__init__, but=["dls", "model", "loss_func", "opt_func", "lr", "splitter", "cbs", "metrics",
                                  "train_bn"])
@delegates(create_head, keep=True, but=["nf", "n_out"])   # help(group_learner) lists the head's and Learner's options
def group_learner(dls, arch: Any, n_out: Optional[int] = None, pretrained: Optional[bool] = None, weights: Any = None,
                  splitter: Optional[Callable] = auto_splitter, cut: Cut = None, train_bn: bool = True,
                  cache_features: bool = False, metrics=None, cbs=None, n_in: int = 3,
                  loss_func: Optional[Callable] = None, opt_func: Callable = Adam, lr: float = 1e-3,
                  normalize: bool = True, init: Optional[Callable] = nn.init.kaiming_normal_, **kwargs) -> GroupLearner:
    """A fastai `Learner` fine-tuning `arch` on `dls`: fastai's `vision_learner` for any architecture.

    - `n_out`: from the data (`get_c(dls)`) when None; a `ValueError` when given and different from the data's.
    - `arch`, `pretrained`, `weights`, `cut`, `n_in`: as in `create_body` (`cut` is honoured, unlike
      `vision_learner`, fastai issue #4027).
    - Pretrained (a name, class or factory with `pretrained=None`/`True`, or `weights` given): `Normalize` with
      the weights' stats (torchvision/ImageNet or the timm config) is added to `dls.after_batch` unless one is
      there (and `normalize`), and the Learner is frozen (`learn.freeze()`: all groups but the head; BatchNorms
      stay trainable with `train_bn`).
    - A model instance is taken as given by default (`pretrained=None`: its weights may be random or the user's):
      not frozen, no `Normalize`. `pretrained=True` (or `weights=`) freezes its body and adds `Normalize` when
      its weights' stats are known (`known_stats`: `weights=`, the timm config, torchvision's/fastai's ImageNet),
      none otherwise. Either way one line says what was done.
    - `splitter`: parameter groups, `auto_splitter` by default (None means `auto_splitter` too).
    - `train_bn`: fastai's meaning (a frozen group's norm layers keep training). With `train_bn=False` a frozen
      body is fully frozen and runs on the fast path (`FastFrozenBody`: no autograd, norm layers in inference
      mode), switched on and off by `freeze`/`freeze_to`/`unfreeze`/`GradualUnfreeze`; with `train_bn=True` the
      fast path never engages and training is fastai's.
    - `cache_features`: also cache the frozen body's features (`FeatureCache`: the body runs once per item, then
      only the head trains). Needs `train_bn=False` and deterministic training data (no random augmentation).
    - `cbs`: a `GroupLogger()` and a `FastFrozenBody()` (or `FeatureCache()`) are added unless one is given.
    - other keyword arguments: `create_head`'s (`lin_ftrs`, `ps`, `concat_pool`, `y_range`, ...) and the
      `Learner`'s (`path`, `model_dir`, `wd`, `wd_bn_bias`, `moms`, `default_cbs`).

    >>> learn = group_learner(dls, "timm:tf_efficientnet_lite0", metrics=accuracy)  # doctest: +SKIP
    >>> learn.fine_tune(2, 1e-3)  # doctest: +SKIP
    """
    from fastai.data.transforms import get_c

    if cache_features and train_bn:
        raise ValueError("cache_features=True needs train_bn=False: with train_bn=True the frozen body's norm layers "
                         "train, so its features change at every step and cannot be cached")
    c = get_c(dls)
    if n_out is None:
        if not c:
            raise ValueError("n_out was not given and could not be read from the data (dls.c): pass n_out=...")
        n_out = c
    elif c and n_out != c:
        raise ValueError(f"n_out={n_out} but the data has {c} classes (dls.c): drop n_out, or fix the data")
    learner_args = set(inspect.signature(Learner.__init__).parameters) - {
        "self", "dls", "model", "loss_func", "opt_func", "lr", "splitter", "cbs", "metrics", "train_bn"}
    learner_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in learner_args}

    body, stats, shape = build_body(arch, pretrained=pretrained, cut=cut, weights=weights, n_in=n_in)
    model = join_head(body, n_out, n_in, init, kwargs, shape)
    instance = isinstance(arch, nn.Module)
    use_weights = weights is not None or (pretrained is not False if not instance else bool(pretrained))
    if normalize and use_weights and stats is not None:
        _add_norm(dls, stats, n_in)
    if instance and (pretrained is not False or weights is not None):
        say(_instance_note(arch, use_weights, stats if normalize else {}, weights))
    cbs = _with_fast_frozen(_with_group_logger(cbs), cache_features)
    learn = GroupLearner(dls, model, loss_func=loss_func, opt_func=opt_func, lr=lr,
                         splitter=splitter or auto_splitter, cbs=cbs, metrics=metrics, train_bn=train_bn,
                         **learner_kwargs)
    if use_weights:
        learn.freeze()  # a ValueError when the splitter gives a single group (freeze() would freeze nothing)
    learn.n_out, learn.pretrained = n_out, use_weights
    return learn

