"""The fine-tuning recipe picked by the study in `bench/recipes.py` (tables in BENCHMARKS.md): `fine_tune_groups`.

`fine_tune_groups(learn, epochs, base_lr)` spends the budget of fastai's `fine_tune(epochs)` (1 frozen + `epochs`
unfrozen passes with autograd through the whole body) on what the study found most accurate: a long head phase on
the frozen body. By default (the study's pick, `train_bn=False`): `2 * (epochs + 1)` head epochs on the fast frozen
body, whose norm layers keep their pretrained statistics, and the body is never unfrozen. Options, each measured
in the study:

1. **norm re-estimation** (`reestimate=True`, "AdaBN"): the body's BatchNorm running statistics are reset and
   re-computed in one forward pass over the training data, without gradients (`reestimate_norm_stats`);
2. **head phase**: `fit_one_cycle(head_epochs, base_lr)` with the body frozen, on the fast frozen body
   (`train_bn=False`: no autograd through the body, about a third of a training pass per epoch) or on the feature
   cache when the training data are deterministic (`check_cacheable`);
3. **unfrozen phase** (`unfrozen_epochs=N`, default 0): `unfreeze()`, then `fit_one_cycle` at
   `slice(base_lr / 2 / lr_mult, base_lr / 2)` spread over the groups (fastai's `fine_tune` rule), the norm layers
   kept in inference mode on the fast path (`keep_norm_stats`: unfreezing then does not shift the head's features).

Each phase is its own fit, so the `GroupLogger` history and plot show them in turn (`fit` column): the
re-estimation fit has every group frozen and no optimizer step, then the head phase, then the unfrozen phase.
fastai's own `Learner.fine_tune` is untouched.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any, Iterator, Optional

import torch
from fastai.callback.core import Callback, CancelBatchException, CancelValidException
from fastai.learner import Learner
from torch import nn

from .cache import FeatureCache, check_cacheable
from .frozen import FastFrozenBody, body_of, norm_layers

__all__ = ["fine_tune_groups", "recipe_plan", "reestimate_norm_stats", "ReestimateNorms", "KeepNormStats",
           "FORWARD_COST"]

#: Cost of a forward-only epoch (fast frozen body, re-estimation) counted against the budget, in training passes
#: (forward + backward through the body). Conservative: measured 0.30-0.35 on tf_efficientnet_lite0 on CPU.
FORWARD_COST = 0.5
#: Unfrozen epochs of the default recipe (the rest of the budget goes to the head phase); see `recipe_plan`. The study
#: (BENCHMARKS.md, `recipes`) found unfreezing within fastai's budget lost accuracy against a longer head phase.
DEFAULT_UNFROZEN = 0
#: Default `base_lr` of the recipe (picked by the study).
DEFAULT_LR = 2e-3


# ----------------------------------------------------------------------------------------------------------------
# Norm statistics re-estimation
# ----------------------------------------------------------------------------------------------------------------
def _running_norms(module: nn.Module) -> list[nn.Module]:
    "Norm layers that keep running statistics (BatchNorm; InstanceNorm only with `track_running_stats`)."
    return [m for m in norm_layers(module) if getattr(m, "running_mean", None) is not None]


@contextlib.contextmanager
def _norm_pass(module: nn.Module, norms: list) -> Iterator[None]:
    """Inside: `module` in eval mode except `norms`, in training mode with reset statistics and a cumulative average
    (`momentum=None`), so one pass leaves the population statistics of the data seen. Modes and momenta restored."""
    modes = [(m, m.training) for m in module.modules()]
    moms = [(m, m.momentum) for m in norms]
    try:
        module.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        yield
    finally:
        for m, mom in moms:
            m.momentum = mom
        for m, t in modes:
            m.training = t


def _plain(x: Any) -> Any:
    "fastai's tensor subclasses (`TensorImage`) as plain tensors: the body's forward is timed as in training."
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


def _check_max_batches(max_batches: Optional[int]) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")


class ReestimateNorms(Callback):
    """Turn a fit into a norm-statistics pass: each training batch runs the body once without gradients, in eval
    mode except its norm layers (reset first, then a cumulative average), and is cancelled before the loss, so
    no optimizer step is taken and no weight changes. Validation is skipped. Used by `reestimate_norm_stats` on a
    `Learner`, so the pass is a fit of its own in the `Recorder` and the `GroupLogger`.

    Example: `learn.fit(1, cbs=ReestimateNorms())` (see `reestimate_norm_stats`, which also freezes every group so
    the logger shows that nothing trains)."""
    order = FastFrozenBody.order + 1

    def __init__(self, dl=None, max_batches: Optional[int] = None):
        _check_max_batches(max_batches)
        self.dl, self.max_batches = dl, max_batches
        self.n_batches, self._pass = 0, None

    def before_fit(self):
        self.body = body_of(self.learn.model)
        self.norms = _running_norms(self.body)
        self.n_batches = 0

    def before_train(self):
        if self.dl is not None:
            self.learn.dl = self.dl
        self._pass = _norm_pass(self.body, self.norms)
        self._pass.__enter__()

    def before_batch(self):
        if not self.training:
            return
        if self.max_batches is None or self.n_batches < self.max_batches:
            with torch.no_grad():
                self.body(_plain(self.learn.xb[0]))
            self.n_batches += 1
        self.learn.yb = ()            # the Recorder records no loss for this batch
        raise CancelBatchException()

    def after_train(self):
        self._close()

    def before_validate(self):
        raise CancelValidException()

    def after_fit(self):
        self._close()

    def _close(self):
        if self._pass is not None:
            self._pass.__exit__(None, None, None)
            self._pass = None


class KeepNormStats(Callback):
    """Keep the body's norm layers in inference mode while it trains (their affine weights still train; their
    running statistics neither move nor are replaced by batch statistics), so unfreezing does not change the
    features the head was trained on. Example: `learn.fit_one_cycle(1, slice(1e-5, 1e-3), cbs=KeepNormStats())`."""
    order = FastFrozenBody.order + 1

    def before_train(self):
        for m in _running_norms(body_of(self.learn.model)):
            m.eval()


def reestimate_norm_stats(learn_or_model: Any, dl=None, max_batches: Optional[int] = None) -> int:
    """Re-estimate the running statistics of the body's norm layers ("AdaBN"): reset them, then one forward pass
    over `dl` without gradients, in eval mode except the norm layers (training mode, cumulative average), so they
    end up with the statistics of this data. Weights never change; dropout and stochastic depth are off.

    - `learn_or_model` a fastai `Learner` of `nn.Sequential(body, head)`: the body's norm layers, over `dl`
      (default `learn.dls.train`, with its augmentation, as training sees it). The pass is a fit of its own (one
      epoch, validation skipped) with every parameter group frozen while it runs, so the `GroupLogger` shows it;
      the freeze state is put back after. Fast frozen body / feature cache callbacks sit it out.
    - an `nn.Module`: its own norm layers (pass the body), over `dl` (any iterable of batches `(x, ...)` or `x`).
    - `max_batches`: stop after that many batches (default: the whole of `dl`).

    Returns the number of norm layers re-estimated (0: nothing to do, e.g. a LayerNorm-only body).

    >>> reestimate_norm_stats(learn)              # doctest: +SKIP
    49
    >>> reestimate_norm_stats(learn.model[0], learn.dls.train, max_batches=10)  # doctest: +SKIP
    49
    """
    _check_max_batches(max_batches)
    if isinstance(learn_or_model, Learner):
        return _reestimate_learner(learn_or_model, dl, max_batches)
    if not isinstance(learn_or_model, nn.Module):
        raise TypeError(f"reestimate_norm_stats takes a fastai Learner or an nn.Module, got "
                        f"{type(learn_or_model).__name__}")
    if dl is None:
        raise ValueError("reestimate_norm_stats(model, dl): pass the data to estimate the statistics on (dl=...)")
    module = learn_or_model
    norms = _running_norms(module)
    if not norms:
        return 0
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    n = 0
    with _norm_pass(module, norms), torch.no_grad():
        for b in dl:
            if max_batches is not None and n >= max_batches:
                break
            x = b[0] if isinstance(b, (tuple, list)) else b
            module(_plain(x).to(device))
            n += 1
    if n == 0:
        raise ValueError("reestimate_norm_stats: dl yielded no batch; the statistics were reset but not re-estimated")
    return len(norms)


def _reestimate_learner(learn: Learner, dl, max_batches: Optional[int]) -> int:
    body = body_of(learn.model)
    norms = _running_norms(body)
    if not norms:
        return 0
    if learn.opt is None:
        learn.create_opt()
    flags = [p.requires_grad for p in learn.model.parameters()]
    frozen_idx = getattr(learn.opt, "frozen_idx", 0)
    skip = [cb for cb in learn.cbs if isinstance(cb, FastFrozenBody)]
    cb = ReestimateNorms(dl=dl, max_batches=max_batches)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # fastai warns that the whole model is frozen: that is the point
            learn.opt.freeze_to(len(learn.opt.param_lists))
            for p in learn.model.parameters():       # norm layers too: nothing trains in this fit
                p.requires_grad_(False)
        with learn.removed_cbs(skip):
            learn.fit(1, lr=learn.lr, cbs=[cb])
    finally:
        for p, f in zip(learn.model.parameters(), flags):
            p.requires_grad_(f)
        learn.opt.frozen_idx = frozen_idx
    if cb.n_batches == 0:
        raise ValueError("reestimate_norm_stats: the training data yielded no batch; the statistics were reset but "
                         "not re-estimated")
    return len(norms)


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
def _int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"fine_tune_groups: {name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _positive(name: str, v: Any) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok:
        raise ValueError(f"fine_tune_groups: {name} must be a finite number > 0, got {v!r} (e.g. base_lr=2e-3)")
    return float(v)


def recipe_plan(epochs: int, fast: bool, head_epochs: Optional[int] = None,
                unfrozen_epochs: Optional[int] = None, reestimate: Optional[bool] = None) -> dict:
    """The phases `fine_tune_groups(epochs)` runs, and their cost in training passes (fastai's `fine_tune(epochs)`
    costs `epochs + 1`: its frozen epoch back-propagates through the body for the BatchNorms, `train_bn=True`).

    `fast`: the head phase runs on the fast frozen body (`train_bn=False`): a head epoch and the re-estimation pass
    each cost `FORWARD_COST` (a forward without autograd). Otherwise (`train_bn=True`) a head epoch costs a pass.
    Defaults: no re-estimation, `DEFAULT_UNFROZEN` unfrozen epochs (fewer when `epochs` is small), and as many head
    epochs as the rest of the budget pays for.

    >>> recipe_plan(3, fast=True)
    {'reestimate': False, 'head_epochs': 8, 'unfrozen_epochs': 0, 'passes': 4.0, 'budget': 4}
    >>> recipe_plan(3, fast=True, unfrozen_epochs=1, reestimate=True)
    {'reestimate': True, 'head_epochs': 5, 'unfrozen_epochs': 1, 'passes': 4.0, 'budget': 4}
    >>> recipe_plan(3, fast=False)
    {'reestimate': False, 'head_epochs': 4, 'unfrozen_epochs': 0, 'passes': 4.0, 'budget': 4}
    """
    epochs = _int("epochs", epochs, 1)
    budget = epochs + 1
    U = min(DEFAULT_UNFROZEN, epochs - 1) if unfrozen_epochs is None else _int("unfrozen_epochs", unfrozen_epochs, 0)
    R = False if reestimate is None else bool(reestimate)
    cost = FORWARD_COST if fast else 1.0
    if head_epochs is None:
        H = max(1, int((budget - U - R * FORWARD_COST) / cost + 1e-9))
    else:
        H = _int("head_epochs", head_epochs, 1)
    return {"reestimate": R, "head_epochs": H, "unfrozen_epochs": U,
            "passes": round(U + H * cost + R * FORWARD_COST, 3), "budget": budget}


def _cacheable(learn) -> bool:
    try:
        check_cacheable(learn.dls, learn.cbs)
        return True
    except ValueError:
        return False


def _head_phase_cbs(learn, fast: bool, cache: Optional[bool]) -> tuple[list, list, bool]:
    "(callbacks to add, callbacks to remove, cached) for the head phase."
    ffbs = [cb for cb in learn.cbs if isinstance(cb, FastFrozenBody)]
    caches = [cb for cb in ffbs if isinstance(cb, FeatureCache)]
    if not fast:
        return [], [], False
    use = _cacheable(learn) if cache is None else bool(cache)
    verbose = all(getattr(cb, "verbose", True) for cb in ffbs)
    if use:
        if cache:
            check_cacheable(learn.dls, learn.cbs)       # the clear reason when asked for and impossible
        return ([] if caches else [FeatureCache(verbose=verbose)]), [], True
    plain = [cb for cb in ffbs if not isinstance(cb, FeatureCache)]
    return ([] if plain else [FastFrozenBody(verbose=verbose)]), caches, False


def fine_tune_groups(learn: Learner, epochs: int, base_lr: float = DEFAULT_LR, head_epochs: Optional[int] = None,
                     unfrozen_epochs: Optional[int] = None, lr_mult: float = 100, reestimate: Optional[bool] = None,
                     cache: Optional[bool] = None, keep_norm_stats: Optional[bool] = None, **kwargs) -> dict:
    """Fine-tune with the library's recipe, within the budget of fastai's `fine_tune(epochs)`: train the head long
    on the frozen body (by default `2 * (epochs + 1)` epochs on the fast frozen body, never unfrozen), optionally
    after re-estimating the body's norm statistics and followed by `unfrozen_epochs` with discriminative learning
    rates over the groups (see the module docstring and `recipe_plan`). Picked by the study in `bench/recipes.py`
    (BENCHMARKS.md, "recipes").

    - `epochs`: the budget, as in `fine_tune(epochs)`: at most `epochs + 1` training passes (`recipe_plan`).
    - `base_lr`: the head phase's peak lr; the unfrozen phase peaks at `base_lr / 2` on the head and
      `base_lr / 2 / lr_mult` on the first group (fastai's rule).
    - `head_epochs`, `unfrozen_epochs`, `reestimate`: override the plan (then the budget is yours).
    - `keep_norm_stats`: in the unfrozen phase keep the body's norm layers in inference mode (`KeepNormStats`);
      default: on the fast path (`train_bn=False`).
    - `cache`: use the `FeatureCache` in the head phase; default: when the training data are deterministic
      (`check_cacheable`) and the body runs on the fast path. With random augmentation the fast frozen body is used.
    - `train_bn` (of the learner) either way: with `train_bn=True` the frozen body's BatchNorms train in the head
      phase (fastai's meaning), so head epochs cost a full pass and there are fewer of them.
    - other keyword arguments go to every `fit_one_cycle` (`wd`, `cbs`, ...).

    Returns the plan that ran (`recipe_plan`'s dict plus `cached`); also kept as `learn.recipe_plan`.

    >>> learn = group_learner(dls, "timm:tf_efficientnet_lite0", train_bn=False, metrics=accuracy)  # doctest: +SKIP
    >>> learn.fine_tune_groups(3)  # doctest: +SKIP
    {'reestimate': False, 'head_epochs': 8, 'unfrozen_epochs': 0, 'passes': 4.0, 'budget': 4, 'cached': False}
    """
    epochs = _int("epochs", epochs, 1)
    base_lr = _positive("base_lr", base_lr)
    lr_mult = _positive("lr_mult", lr_mult)
    if not isinstance(learn, Learner):
        raise TypeError(f"fine_tune_groups takes a fastai Learner, got {type(learn).__name__}")
    fast = not getattr(learn, "train_bn", True)
    if not fast:
        warnings.warn("fine_tune_groups: this learner has train_bn=True, so the head phase trains the frozen body's "
                      "BatchNorms (a full pass per epoch, fewer epochs); the study's pick, 13 to 32 points better, "
                      "runs on the fast frozen body: build the learner with group_learner(..., train_bn=False)",
                      stacklevel=2)
    if cache and not fast:
        raise ValueError("fine_tune_groups: cache=True needs a learner with train_bn=False (with train_bn=True the "
                         "frozen body's norm layers train, so its features cannot be cached)")
    plan = recipe_plan(epochs, fast, head_epochs, unfrozen_epochs, reestimate)
    learn.freeze()
    add, remove, cached = _head_phase_cbs(learn, fast, cache)
    plan["cached"] = cached
    learn.recipe_plan = plan
    if plan["reestimate"]:
        reestimate_norm_stats(learn)
    with learn.added_cbs(add), learn.removed_cbs(remove):
        learn.fit_one_cycle(plan["head_epochs"], base_lr, **kwargs)
    if plan["unfrozen_epochs"]:
        learn.unfreeze()
        lr = base_lr / 2
        keep = fast if keep_norm_stats is None else bool(keep_norm_stats)
        plan["keep_norm_stats"] = keep
        with learn.added_cbs([KeepNormStats()] if keep else []):
            learn.fit_one_cycle(plan["unfrozen_epochs"], slice(lr / lr_mult, lr), pct_start=0.3, div=5.0, **kwargs)
    return plan
