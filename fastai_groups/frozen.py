"""Fast training while the body is frozen: inference-mode norm layers, no autograd through the body.

A fine-tuning model is `nn.Sequential(body, head)` (`cnn_model`, `group_learner`, fastai's `vision_learner`).
While every parameter of the body is frozen (`train_bn=False`, then `learn.freeze()`), nothing the body computes
needs a gradient and its statistics should not move (Keras' rule: a frozen base model runs in inference mode).
`FastFrozenBody` puts the body's norm layers (BatchNorm, InstanceNorm, ...: every layer with running statistics)
in eval mode exactly while the body is fully frozen; autograd records nothing there, since nothing in it requires
grad. `freeze`, `freeze_to`, `unfreeze` and `GradualUnfreeze` switch it on and off. Results equal fastai's
`train_bn=False` + `BnFreeze`. With `train_bn=True` (fastai's default) the body's BatchNorms train, so it stays
off and nothing changes. `FeatureCache` (cache.py) also caches the frozen body's outputs.

Both publish their state on the learner for people and tests: `learn.fast_frozen` (bool), `learn.fast_frozen_mode`
(`""`, `"no_grad"` or `"cached"`) and `learn.fast_frozen_info` (a one-line description, `""` when off), print one
line when the state changes, and give the `GroupLogger` table its `body:` line through `freeze_note()`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from fastai.callback.core import Callback
from fastai.callback.training import BnFreeze
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ._utils import say, unwrap_model
from .callbacks import GradualUnfreeze, notify_freeze_change

__all__ = ["FastFrozenBody", "body_of", "body_frozen", "norm_layers", "GetBody"]

GetBody = Callable[[nn.Module], nn.Module]
_MISSING = object()


def body_of(model: nn.Module, get_body: Optional[GetBody] = None) -> nn.Module:
    """The body of a fine-tuning model `nn.Sequential(body, head)`, through `torch.compile`, `DataParallel` and
    `DistributedDataParallel` wrappers; `get_body(model)` instead when given (for other models: the module must be
    the first one applied to the model's input, e.g. `lambda m: m.features` for torchvision's VGG).

    >>> body_of(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2)))
    Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
    """
    inner = unwrap_model(model)
    if get_body is not None:
        body = get_body(inner)
        if not isinstance(body, nn.Module):
            raise TypeError(f"get_body returned {type(body).__name__}, not an nn.Module")
        return body
    if not isinstance(inner, nn.Sequential) or len(inner) != 2:
        what = f"nn.Sequential of {len(inner)} modules" if isinstance(inner, nn.Sequential) else type(inner).__name__
        raise TypeError(f"the fast frozen body needs learn.model = nn.Sequential(body, head) (as cnn_model, "
                        f"group_learner and fastai's vision_learner build it), got {what}; for another model pass "
                        "get_body=lambda m: m.<body> (the module applied first to the input)")
    return inner[0]


def norm_layers(module: nn.Module) -> list[nn.Module]:
    """Layers whose train/eval mode matters for statistics: BatchNorm (1d/2d/3d, Sync, timm's BatchNormAct),
    InstanceNorm. LayerNorm and GroupNorm have no running statistics and behave the same in both modes.

    >>> len(norm_layers(nn.Sequential(nn.BatchNorm2d(3), nn.LayerNorm(3), nn.InstanceNorm2d(3))))
    2
    """
    return [m for m in module.modules() if isinstance(m, _NormBase)]


def body_frozen(params: Sequence[nn.Parameter]) -> bool:
    """Whether no parameter requires grad (a body without parameters counts as frozen).

    >>> body_frozen(list(nn.Linear(2, 2).requires_grad_(False).parameters()))
    True
    """
    return not any(p.requires_grad for p in params)


class _OneCall:
    """Stands in for `module.forward` for exactly one call: it puts the original forward back first (so an exception
    inside leaves nothing behind), then returns `fn(original_forward, *args, **kwargs)`."""

    def __init__(self, module: nn.Module, fn: Callable):
        self.module, self.fn = module, fn
        self.prev = module.__dict__.get("forward", _MISSING)
        module.__dict__["forward"] = self

    def restore(self) -> None:
        d = self.module.__dict__
        if d.get("forward") is self:
            if self.prev is _MISSING:
                del d["forward"]
            else:
                d["forward"] = self.prev

    def __call__(self, *args, **kwargs):
        self.restore()
        return self.fn(self.module.forward, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# FastFrozenBody
# ----------------------------------------------------------------------------------------------------------------
class FastFrozenBody(Callback):
    """Run a fully frozen body without autograd and with its norm layers in inference mode.

    While every parameter of the body (`learn.model[0]` of `nn.Sequential(body, head)`) has `requires_grad=False`,
    autograd records nothing in the body (nothing there requires grad) and its norm layers with running statistics
    (BatchNorm, InstanceNorm) are put in eval mode: their statistics neither move nor normalise with batch statistics
    (fastai's `BnFreeze` for the frozen body, Keras' frozen-BN rule). Losses and weights equal a plain fastai run
    with `train_bn=False` and `BnFreeze`. As soon as any body parameter trains again (`unfreeze`, `freeze_to`,
    `GradualUnfreeze`) the body runs with autograd and training-mode norm layers, as plain fastai.

    With `train_bn=True` (fastai's default) a frozen body's BatchNorm layers still train, so it stays off and nothing
    changes. The state is re-read at the start of each training epoch (after `GradualUnfreeze`, which runs before
    it) and, at a batch, whenever `learn.opt` or `learn.opt.frozen_idx` changed; call `refresh()` after flipping
    `requires_grad` by hand. Validation is untouched (fastai runs it in eval mode without grad anyway). Active in
    `lr_find` (which then sees the model the fit trains; silently), inert in `get_preds` / `validate`.
    The body's forward is never replaced (so `torch.compile`d and `nn.DataParallel` models work as they are).

    State on the learner: `learn.fast_frozen` (bool), `learn.fast_frozen_mode` (`""` or `"no_grad"`),
    `learn.fast_frozen_info` (one line for logs, `""` when off); a line is printed when the state changes.

    Args:
        get_body: for a model that is not `nn.Sequential(body, head)`: returns its body, the module applied first
            to the input. Example: `FastFrozenBody(get_body=lambda m: m.features)`.
        verbose: print a line when the fast path switches on or off. Example: `verbose=False`.

    Example::

        learn = group_learner(dls, resnet34, train_bn=False, cbs=FastFrozenBody())   # pretrained: frozen
        learn.fine_tune(3, 1e-3)   # frozen epoch: fast path on; after unfreeze(): off
        learn.fast_frozen          # False after the unfrozen fit
    """
    order, run_valid = GradualUnfreeze.order + 0.5, False   # after TrainEval and GradualUnfreeze, before GroupLogger
    leads = 0       # with several instances in `learn.cbs`, the first of the highest `leads` acts (FeatureCache: 1)

    def __init__(self, get_body: Optional[GetBody] = None, verbose: bool = True):
        self.get_body, self.verbose = get_body, verbose
        self.on = False
        self._body: Optional[nn.Module] = None
        self._keep_forward = False
        self._params: list = []
        self._norms: list = []
        self._evald: list = []          # norm layers this callback put in eval mode during the current epoch
        self._sig: Any = None
        self._call: Optional[_OneCall] = None
        self._quiet, self._announced, self._epoch_start = False, False, False

    # ------------------------------------------------------------------------------------------------ events
    def before_fit(self):
        "Pick the leading instance (a `FeatureCache` leads a plain `FastFrozenBody`); the body is found at training."
        self._uninstall()
        self._body, self._sig, self._evald = None, None, []
        same = [cb for cb in self.learn.cbs if isinstance(cb, FastFrozenBody)]
        self.run = max(same, key=lambda cb: cb.leads) is self   # the first of the highest `leads`
        self._quiet = not self.verbose or hasattr(self.learn, "lr_finder")
        for k, v in (("fast_frozen", False), ("fast_frozen_mode", ""), ("fast_frozen_info", "")):
            if not hasattr(self.learn, k):
                setattr(self.learn, k, v)

    def before_train(self):
        "Re-read the freeze state (fastai's `TrainEvalCallback` has just put the whole model in training mode)."
        if self._body is None:
            self._bind()
        self._evald, self._epoch_start = [], True
        try:
            self._check(force=True)
            if self.on:
                self._eval_norms()
            self._prepare_epoch()
        finally:
            self._epoch_start = False
        self._publish()
        if self._announced != self.on:
            self._announce(self.on)

    def before_batch(self):
        "Cheap re-check of the freeze state (the optimizer or `frozen_idx` changed)."
        self._check()

    def after_batch(self):
        self._uninstall()

    def after_cancel_batch(self):
        self._uninstall()

    def after_fit(self):
        self._uninstall()
        self._evald = []

    # ------------------------------------------------------------------------------------------------ public
    def freeze_note(self) -> str:
        "One line on how the body runs now, for the `GroupLogger` table (`\"\"` when off or not the acting instance)."
        return self._info() if self.run else ""

    def refresh(self) -> bool:
        "Re-read `requires_grad` of the body now (after changing it by hand mid-epoch); returns the state."
        if self._body is None:
            self._bind()
        self._check(force=True)
        if self.on and getattr(self.learn, "training", False):
            self._eval_norms()
        return self.on

    # ------------------------------------------------------------------------------------------------ hooks
    def _prepare_epoch(self) -> None:
        "Called at the start of each training epoch, once the state is known."

    def _release(self) -> None:
        "Called when the body becomes trainable."

    def _mode(self) -> str:
        return "no_grad" if self.on else ""

    def _info(self) -> str:
        if not self.on:
            return ""
        return f"fast frozen (no autograd, {len(self._norms)} norm layers in inference mode)"

    def _message(self, on: bool) -> str:
        if on:
            return (f"body fully frozen -> forward without autograd, {len(self._norms)} norm layers in inference "
                    "mode")
        return "body trainable -> autograd and training-mode norm layers restored"

    # ------------------------------------------------------------------------------------------------ internals
    def _bind(self) -> None:
        self._body = body_of(self.learn.model, self.get_body)
        self._params = list(self._body.parameters())
        self._norms = norm_layers(self._body)
        # under torch.compile the body's forward must stay the same object (a new one per batch recompiles every
        # batch), and nn.DataParallel replicas would call the original module; nothing in a fully frozen body
        # requires grad, so autograd records nothing there without no_grad either
        self._keep_forward = _forward_must_stay(self.learn.model, self._body)

    def _signature(self) -> tuple:
        opt = self.learn.opt
        return id(opt), getattr(opt, "frozen_idx", None), id(self._body)

    def _check(self, force: bool = False) -> None:
        sig = self._signature()
        if not force and sig == self._sig:
            return
        self._sig = sig
        frozen = body_frozen(self._params)
        if frozen != self.on:
            self._switch(frozen)

    def _switch(self, on: bool) -> None:
        self.on = on
        if on:
            if getattr(self.learn, "training", False):
                self._eval_norms()
        else:
            self._restore_norms()
            self._release()
        self._publish()
        if not self._epoch_start:          # at an epoch start, before_train announces once the epoch is prepared
            self._announce(on)
        notify_freeze_change(self.learn, self)

    def _announce(self, on: bool) -> None:
        if self._quiet:
            return
        self._announced = on
        say(f"{type(self).__name__}: {self._message(on)}")

    def _publish(self) -> None:
        self.learn.fast_frozen = self.on
        self.learn.fast_frozen_mode = self._mode()
        self.learn.fast_frozen_info = self._info()

    def _eval_norms(self) -> None:
        for m in self._norms:
            if m.training:
                m.eval()
                self._evald.append(m)

    def _restore_norms(self) -> None:
        "Back to training mode (mid-epoch), except layers that fastai's `BnFreeze`, if present, keeps in eval."
        if getattr(self.learn, "training", False):
            bn_freeze = any(isinstance(cb, BnFreeze) for cb in self.learn.cbs)
            for m in self._evald:
                ps = list(m.parameters())
                if not (bn_freeze and ps and body_frozen(ps)):
                    m.train()
        self._evald = []

    def _install(self, fn: Callable) -> None:
        self._uninstall()
        self._call = _OneCall(self._body, fn)

    def _uninstall(self) -> None:
        if self._call is not None:
            self._call.restore()
            self._call = None


def _forward_must_stay(model: nn.Module, body: nn.Module) -> bool:
    """Whether the body's `forward` must not be swapped: `model` (or the body) runs under `torch.compile`, or through
    `nn.DataParallel` (its replicas would call the original module). DistributedDataParallel calls the module itself.

    >>> _forward_must_stay(nn.DataParallel(nn.Sequential(nn.Linear(2, 2))), nn.Linear(2, 2))
    True
    """
    for m in (model, body):
        while True:
            if isinstance(getattr(m, "_orig_mod", None), nn.Module) or isinstance(m, nn.DataParallel):
                return True
            if not isinstance(m, nn.parallel.DistributedDataParallel):
                break
            m = m.module
    return False

