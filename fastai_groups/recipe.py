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
           "FORWARD_COST", "UNFREEZE_FROM", "DEFAULT_LR", "DEFAULT_LR_MULT", "FORWARDED"]

#: Cost of a forward-only epoch (fast frozen body, re-estimation) counted against the budget, in training passes
#: (forward + backward through the body). Conservative: measured 0.30-0.35 on tf_efficientnet_lite0 on CPU.
FORWARD_COST = 0.5
#: Training images per class from which the default plan unfreezes the body after the head phase (`recipe_plan`).
#: From the scale curve of the study (BENCHMARKS.md, `recipes`): the unfrozen phase lost to the head-only phase at
#: every size measured (50 to 1,000 per class, lite0), by less as data grew; a line through that gap in log(images
#: per class) crosses zero at 1,700 to 4,100 per class depending on the seeds included. A weak extrapolation, so
#: above it the unfrozen phase is tried and kept only if validation improves.
UNFREEZE_FROM = 3000
#: Default `base_lr` of the recipe (picked by the study).
DEFAULT_LR = 2e-3
#: Default spread of the unfrozen phase's rates: the first group trains at `1 / DEFAULT_LR_MULT` of the head's.
DEFAULT_LR_MULT = 100.0


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


def _norm_stats(norms: list) -> list:
    "A copy of the running statistics of `norms` (to put back when a pass saw no batch)."
    return [(m, m.running_mean.clone(), m.running_var.clone(),
             None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]


def _put_back(stats: list) -> None:
    for m, mean, var, n in stats:
        m.running_mean.copy_(mean), m.running_var.copy_(var)
        if n is not None:
            m.num_batches_tracked.copy_(n)


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
    n, saved = 0, _norm_stats(norms)
    with _norm_pass(module, norms), torch.no_grad():
        for b in dl:
            if max_batches is not None and n >= max_batches:
                break
            x = b[0] if isinstance(b, (tuple, list)) else b
            module(_plain(x).to(device))
            n += 1
    if n == 0:
        _put_back(saved)
        raise ValueError("reestimate_norm_stats: dl yielded no batch; the statistics are left as they were")
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
    cb, saved = ReestimateNorms(dl=dl, max_batches=max_batches), _norm_stats(norms)
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
        _put_back(saved)
        raise ValueError("reestimate_norm_stats: the training data yielded no batch; the statistics are left as they "
                         "were")
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


def recipe_plan(epochs: int, per_class: Optional[float] = None, head_epochs: Optional[int] = None,
                unfrozen_epochs: Optional[int] = None, reestimate: Optional[bool] = None) -> dict:
    """The phases `fine_tune_groups(epochs)` runs, their cost in training passes, and why. fastai's `fine_tune(epochs)`
    costs `epochs + 1` passes; a head epoch on the frozen body (no autograd through it, norm layers in inference
    mode) and the re-estimation pass each cost `FORWARD_COST`, an unfrozen epoch one pass.

    The default plan decides from the data: with at least `UNFREEZE_FROM` training images per class (`per_class`),
    half the budget goes to an unfrozen phase (`max(1, (epochs + 1) // 2)` epochs, discriminative rates), kept only
    if it improves the validation result; below that, or when `per_class` is unknown, the whole budget goes to the
    head phase (`2 * (epochs + 1)` epochs) and the body is never unfrozen (the scale curve in BENCHMARKS.md,
    `recipes`). `head_epochs`, `unfrozen_epochs`, `reestimate` override (then the budget is yours).

    >>> recipe_plan(3, per_class=100)["head_epochs"], recipe_plan(3, per_class=100)["unfrozen_epochs"]
    (8, 0)
    >>> {k: recipe_plan(3, per_class=5000)[k] for k in ("head_epochs", "unfrozen_epochs", "passes", "budget")}
    {'head_epochs': 4, 'unfrozen_epochs': 2, 'passes': 4.0, 'budget': 4}
    """
    epochs = _int("epochs", epochs, 1)
    budget = epochs + 1
    R = False if reestimate is None else bool(reestimate)
    if unfrozen_epochs is not None:
        U = _int("unfrozen_epochs", unfrozen_epochs, 0)
        why = f"unfrozen_epochs={U} as asked"
    elif per_class is not None and per_class >= UNFREEZE_FROM:
        U = max(1, budget // 2)
        why = (f"{per_class:,.0f} training images per class >= {UNFREEZE_FROM:,}: the body is unfrozen after the head "
               "phase and kept only if validation improves")
    else:
        U = 0
        why = (f"{per_class:,.0f} training images per class < {UNFREEZE_FROM:,}" if per_class is not None else
               "images per class unknown") + ": the head trains on the frozen body, which is never unfrozen"
    if head_epochs is None:
        H = max(1, int((budget - U - R * FORWARD_COST) / FORWARD_COST + 1e-9))
    else:
        H = _int("head_epochs", head_epochs, 1)
    return {"reestimate": R, "head_epochs": H, "unfrozen_epochs": U,
            "passes": round(U + (H + R) * FORWARD_COST, 3), "budget": budget, "why": why}


#: keyword arguments of `fit_one_cycle` that `fine_tune_groups` forwards to every phase (the rest it sets itself)
FORWARDED = ("wd", "moms", "cbs", "div", "div_final", "pct_start", "reset_opt")


def _fit_kwargs(kwargs: dict) -> dict:
    "The keyword arguments for `fit_one_cycle`, refused before any training when the recipe sets them or they are unknown."
    own = {"n_epoch": "epochs", "lr_max": "base_lr", "start_epoch": "nothing: each phase starts at epoch 0"}
    for k in kwargs:
        if k in own:
            raise ValueError(f"fine_tune_groups: {k}= is set by the recipe; use {own[k]}")
        if k not in FORWARDED:
            raise TypeError(f"fine_tune_groups got an unexpected keyword argument {k!r}; it forwards "
                            f"{', '.join(FORWARDED)} to fit_one_cycle")
    return dict(kwargs)


def _n_classes(dls) -> Optional[int]:
    "The number of classes of a single-label classification task (`dls.vocab`), else None."
    vocab = getattr(dls, "vocab", None)
    try:
        return len(vocab) if vocab is not None and not isinstance(vocab[0], (list, tuple)) else None
    except Exception:
        return None


def _check_learner(learn: Learner, fit_cbs) -> Optional[float]:
    """Refuse, before anything trains, what the recipe cannot run as planned; returns training images per class
    (None when the task has no classes)."""
    from .callbacks import GradualUnfreeze
    from .splitters import learner_group_names
    if not isinstance(learn, Learner):
        raise TypeError(f"fine_tune_groups takes a fastai Learner, got {type(learn).__name__}")
    if learn.opt is None:
        learn.create_opt()
    k = len(learn.opt.param_lists)
    if k < 2:
        raise ValueError(f"fine_tune_groups needs the head in a parameter group of its own, but the learner has 1 group "
                         f"({', '.join(learner_group_names(learn))}), so freeze() would freeze nothing: build it with "
                         "splitter=auto_splitter (or group_learner)")
    cbs = [*learn.cbs, *([] if fit_cbs is None else fit_cbs if isinstance(fit_cbs, (list, tuple)) else [fit_cbs])]
    fights = sorted({type(c).__name__ for c in cbs if isinstance(c, GradualUnfreeze) or
                     (isinstance(c, type) and issubclass(c, GradualUnfreeze))})
    if fights:
        raise ValueError(f"fine_tune_groups decides when the body is frozen, but {', '.join(fights)} in the callbacks "
                         f"changes it too: remove it (learn.remove_cb), or train with fit_one_cycle and it")
    dl = learn.dls.train
    if len(dl) == 0:
        raise ValueError(f"fine_tune_groups: the training data give no batch ({len(dl.dataset)} items, batch size "
                         f"{dl.bs}{', drop_last' if getattr(dl, 'drop_last', False) else ''}): lower bs, or add images")
    n_classes = _n_classes(learn.dls)
    if n_classes is not None and n_classes < 2:
        raise ValueError(f"fine_tune_groups: the data have {n_classes} class ({', '.join(map(str, learn.dls.vocab))}); "
                         "a classifier needs at least 2 (one folder per class)")
    return len(dl.dataset) / n_classes if n_classes else None


def _monitor(learn: Learner) -> tuple[str, bool]:
    """(name, higher is better) of what decides a phase: the first metric, else the validation loss (fastai's
    `TrackerCallback` rule: lower is better for a loss or an error)."""
    names = list(learn.recorder.metric_names[1:-1])     # train_loss, valid_loss, metrics..., (time dropped)
    if len(names) > 2:
        return names[2], not ("loss" in names[2] or "error" in names[2])
    return "valid_loss", False


def _result(learn: Learner) -> dict:
    "The last epoch's validation figures of the last fit: {valid_loss: ..., metric: ...}."
    vals = learn.recorder.values[-1] if learn.recorder.values else []
    names = list(learn.recorder.metric_names[1:-1])
    return {n: float(v) for n, v in zip(names[1:], vals[1:])}


def _worse(before: dict, after: dict, name: str, higher: bool) -> Optional[str]:
    "Why `after` is no improvement on `before` (None when it is better)."
    loss = after.get("valid_loss", float("nan"))
    if not math.isfinite(loss):
        return f"its validation loss is {loss}"
    b, a = before.get(name, float("nan")), after.get(name, float("nan"))
    if not math.isfinite(a) or (math.isfinite(b) and (a <= b if higher else a >= b)):
        return f"validation {name} {b:.4g} -> {a:.4g}"
    return None


@contextlib.contextmanager
def _norms_frozen_with_body(learn: Learner) -> Iterator[None]:
    """Inside: a frozen group's norm layers are frozen too (`train_bn=False`), whatever the learner's `train_bn`, so
    the head phase runs on the fast frozen body with the pretrained statistics; after: `train_bn` as it was, and the
    freeze state re-applied with it (fastai's meaning for whatever the user runs next)."""
    from fastai.torch_core import norm_bias_params

    def force_train(on: bool) -> None:      # fastai's `Learner.create_opt` rule for train_bn
        for p in norm_bias_params(learn.model, False):
            if on:
                learn.opt.state[p]["force_train"] = True
            else:
                learn.opt.state[p].pop("force_train", None)

    train_bn = learn.train_bn
    force_train(False)
    learn.train_bn = False
    try:
        yield
    finally:
        learn.train_bn = train_bn
        force_train(bool(train_bn))
        learn.opt.freeze_to(learn.opt.frozen_idx)


def _snapshot(learn: Learner) -> dict:
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


def _roll_back(learn: Learner, weights: dict, phase: str, why: str, fix: str) -> None:
    "Put the weights from before `phase` back, with one warning."
    learn.model.load_state_dict(weights)
    warnings.warn(f"fine_tune_groups: the {phase} made the model worse ({why}); rolled back to the weights before "
                  f"it. {fix}", stacklevel=3)


def _say(learn, msg: str) -> None:
    from ._utils import say
    say(msg, quiet=hasattr(learn, "lr_finder"))


def _cache_served(learn: Learner) -> bool:
    "Whether a `FeatureCache` holds features now (it served the head phase)."
    return any(isinstance(cb, FeatureCache) and cb.nbytes > 0 for cb in learn.cbs)


def _head_phase_cbs(learn, cache: Optional[bool]) -> tuple[list, list]:
    "(callbacks to add, callbacks to remove) for the head phase: the fast frozen body, or the feature cache."
    from fastai.callback.training import BnFreeze
    try:
        body_of(learn.model)
    except TypeError:           # not nn.Sequential(body, head): fastai's BnFreeze keeps the frozen norms in eval
        if cache:
            raise ValueError("fine_tune_groups: cache=True needs learn.model = nn.Sequential(body, head) "
                             "(cnn_model, group_learner)") from None
        return ([] if any(isinstance(cb, BnFreeze) for cb in learn.cbs) else [BnFreeze()]), []
    ffbs = [cb for cb in learn.cbs if isinstance(cb, FastFrozenBody)]
    caches = [cb for cb in ffbs if isinstance(cb, FeatureCache)]
    verbose = all(getattr(cb, "verbose", True) for cb in ffbs)
    if cache or (cache is None and _cacheable(learn)):
        if cache:
            check_cacheable(learn.dls, learn.cbs)       # the clear reason when asked for and impossible
        return ([] if caches else [FeatureCache(verbose=verbose)]), []
    plain = [cb for cb in ffbs if not isinstance(cb, FeatureCache)]
    return ([] if plain else [FastFrozenBody(verbose=verbose)]), caches


def _cacheable(learn) -> bool:
    try:
        check_cacheable(learn.dls, learn.cbs)
        return True
    except ValueError:
        return False


def fine_tune_groups(learn: Learner, epochs: int, base_lr: float = DEFAULT_LR, head_epochs: Optional[int] = None,
                     unfrozen_epochs: Optional[int] = None, lr_mult: float = DEFAULT_LR_MULT,
                     reestimate: Optional[bool] = None, cache: Optional[bool] = None,
                     keep_norm_stats: Optional[bool] = None, **kwargs) -> dict:
    """Fine-tune with the library's recipe, within the budget of fastai's `fine_tune(epochs)`, deciding from the data
    whether to unfreeze (`recipe_plan`; picked by the study in `bench/recipes.py`, BENCHMARKS.md "recipes"):

    1. head phase: the head trains on the frozen body, whose norm layers keep their pretrained statistics (the fast
       frozen body, or the feature cache when the training data are deterministic), whatever the learner's
       `train_bn` (which keeps its fastai meaning for `fine_tune` and `fit_one_cycle`);
    2. with enough images per class (`UNFREEZE_FROM`): the unfrozen phase, every group at discriminative rates
       `slice(base_lr / 2 / lr_mult, base_lr / 2)`, norm statistics kept (`KeepNormStats`); it is kept only if the
       validation result (first metric, else loss) improves, else the head phase's weights come back.

    One line says what it chose and why. A phase whose validation loss is not finite, or that made the result worse,
    is rolled back to the weights before it, with a warning: the returned model is never worse on validation than
    its own head phase.

    - `epochs`: the budget, as in `fine_tune(epochs)`: at most `epochs + 1` training passes (`recipe_plan`).
    - `base_lr`: the head phase's peak lr; the unfrozen phase peaks at `base_lr / 2` on the head.
    - `head_epochs`, `unfrozen_epochs`, `reestimate` (`reestimate_norm_stats` first: AdaBN): override the plan.
    - `keep_norm_stats`: the body's norm layers in inference mode in the unfrozen phase (default True).
    - `cache`: the `FeatureCache` in the head phase; default: when the training data are deterministic.
    - other keyword arguments (`wd`, `moms`, `cbs`, `div`, `pct_start`, ...: `FORWARDED`) go to every `fit_one_cycle`.

    Returns the plan that ran (`recipe_plan`'s dict plus `cached`, `rolled_back` (the phases undone), `result` (the
    returned model's validation figures)); also kept as `learn.recipe_plan`.

    >>> learn = group_learner(dls, "timm:tf_efficientnet_lite0", metrics=accuracy)  # doctest: +SKIP
    >>> learn.fine_tune_groups(3)["why"]  # doctest: +SKIP
    '100 training images per class < 3,000: the head trains on the frozen body, which is never unfrozen'
    """
    epochs = _int("epochs", epochs, 1)
    base_lr = _positive("base_lr", base_lr)
    lr_mult = _positive("lr_mult", lr_mult)
    fit_kw = _fit_kwargs(kwargs)
    per_class = _check_learner(learn, fit_kw.get("cbs"))
    plan = recipe_plan(epochs, per_class, head_epochs, unfrozen_epochs, reestimate)
    unfrozen_kw = {"pct_start": 0.3, "div": 5.0, **fit_kw}
    add, remove = _head_phase_cbs(learn, cache)
    plan.update(cached=False, rolled_back=[], keep_norm_stats=True if keep_norm_stats is None else bool(keep_norm_stats))
    learn.recipe_plan = plan
    _say(learn, f"fine_tune_groups({epochs}): {plan['why']} (head {plan['head_epochs']} epochs"
                f"{', then unfrozen ' + str(plan['unfrozen_epochs']) if plan['unfrozen_epochs'] else ''})")
    with _norms_frozen_with_body(learn):
        learn.freeze()
        if plan["reestimate"]:
            reestimate_norm_stats(learn)
        start = _snapshot(learn)
        with learn.added_cbs(add), learn.removed_cbs(remove):
            learn.fit_one_cycle(plan["head_epochs"], base_lr, **fit_kw)
            plan["cached"] = _cache_served(learn)
        head = _result(learn)
        if not math.isfinite(head.get("valid_loss", float("nan"))):
            _roll_back(learn, start, "head phase", f"its validation loss is {head.get('valid_loss')}",
                       f"Lower base_lr (it was {base_lr:g}).")
            plan["rolled_back"].append("head")
            plan["unfrozen_epochs"] = 0
        plan["result"] = head
        if plan["unfrozen_epochs"]:
            name, higher = _monitor(learn)
            before = _snapshot(learn)
            learn.unfreeze()
            lr = base_lr / 2
            with learn.added_cbs([KeepNormStats()] if plan["keep_norm_stats"] else []):
                learn.fit_one_cycle(plan["unfrozen_epochs"], slice(lr / lr_mult, lr), **unfrozen_kw)
            after = _result(learn)
            worse = _worse(head, after, name, higher)
            if worse is None:
                plan["result"] = after
                _say(learn, f"fine_tune_groups: unfrozen phase kept (validation {name} "
                            f"{head.get(name, float('nan')):.4g} -> {after.get(name, float('nan')):.4g})")
            else:
                learn.freeze()
                _roll_back(learn, before, "unfrozen phase", worse, "The head phase's weights are returned.")
                plan["rolled_back"].append("unfrozen")
    return plan
