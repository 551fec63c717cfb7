"""Running models without memory: build on the meta device, swap a model's tensors for meta stand-ins, and run
meta forwards at candidate input sizes (private: shared by arch, structure and body).

- `build(make)`: call a constructor with every parameter and buffer on the meta device (no memory, no init cost),
  falling back to real maths with meta storage (constructors that compute with tensors, torchvision's RegNet),
  then to a real build, with a warning.
- `on_meta(model)`: the model's own tensors swapped for meta ones for the duration of a block.
- `candidate_inputs(model, n_in)`: the input shapes to try, one contract: shapes without the batch dimension.
- `meta_run(module, n_in)`: a forward on a meta batch, trying the candidate sizes, with an error summary.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ._utils import first_tensor, preserve_modes

SIDES = (224, 227, 299, 256, 128, 64, 32)   # square input sides tried after the model's own configured size


# ----------------------------------------------------------------------------------------------------------------
# Building on meta
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def params_to_meta() -> Iterator[None]:
    """Every parameter and buffer registered inside this block is moved to the meta device (tensor maths stays
    real). A patch of `nn.Module.register_parameter` / `register_buffer` for the block only (see the package
    docstring)."""
    reg_p, reg_b = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self, name, param):
        reg_p(self, name, param)
        if param is not None:
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    def register_buffer(self, name, tensor, persistent=True):
        reg_b(self, name, tensor if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_p, reg_b


def build(make: Callable[[], nn.Module], meta: bool = True, what: str = "the model") -> nn.Module:
    """Run `make` on the meta device when possible (no memory, no init cost), else with real maths and meta
    storage, else normally (with a warning: memory and init time are spent). `TypeError`s (wrong arguments) are
    raised as they are.

    >>> build(lambda: nn.Linear(2, 2)).weight.device.type
    'meta'
    """
    if not meta:
        return make()
    try:
        with torch.device("meta"):
            return make()
    except TypeError:
        raise
    except Exception:
        pass
    try:  # constructors that compute with tensors in __init__ (torchvision's RegNet): real maths, meta storage
        with params_to_meta():
            return make()
    except TypeError:
        raise
    except Exception as e:
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    warnings.warn(f"could not build {what} on the meta device ({err}); built it for real instead (its memory and "
                  "initialisation are spent): pass a model instance to avoid this", stacklevel=3)
    return make()


# ----------------------------------------------------------------------------------------------------------------
# Meta stand-ins for a model's tensors
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def on_meta(model: nn.Module, grad: Optional[bool] = None) -> Iterator[dict]:
    """Swap every parameter and buffer of `model` for a meta stand-in and put the originals back afterwards, slot
    by slot: a forward inside costs no memory and leaves the model's tensors untouched. One stand-in per tensor, so
    tied weights and modules shared under several names (timm's coat) stay tied. Stand-in parameters require grad
    as the originals do, or as `grad` says. Yields `{id(original): stand-in}`. (Not `torch.func.functional_call`:
    it restores a module reachable by two names wrongly, leaving meta tensors in the model, pytorch#164759.)

    >>> m = nn.Linear(2, 3)
    >>> with on_meta(m): m(torch.empty(1, 2, device="meta")).device.type
    'meta'
    """
    slots = [(store, n, t) for m in model.modules() for store in (m._parameters, m._buffers)  # each module once
             for n, t in store.items() if t is not None]
    meta: dict[int, torch.Tensor] = {}
    for _, _, t in slots:
        if id(t) not in meta:
            mt = torch.empty_like(t, device="meta")
            rg = t.requires_grad if grad is None else grad
            meta[id(t)] = nn.Parameter(mt, requires_grad=rg) if isinstance(t, nn.Parameter) else mt
    try:
        for store, n, t in slots:
            store[n] = meta[id(t)]
        yield meta
    finally:
        for store, n, t in slots:
            store[n] = t


# ----------------------------------------------------------------------------------------------------------------
# Candidate inputs
# ----------------------------------------------------------------------------------------------------------------
def _configured(model: nn.Module) -> tuple[Optional[int], list[tuple[int, int]]]:
    """(channels, [(H, W)]) from the first module that declares its input: timm's `pretrained_cfg` /
    `default_cfg` `input_size`, else an `image_size` / `img_size` attribute."""
    for m in model.modules():
        cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            c, *hw = (int(s) for s in cfg["input_size"])
            return c, [tuple(hw)]
        img = getattr(m, "image_size", None) or getattr(m, "img_size", None)
        if isinstance(img, numbers.Integral) and not isinstance(img, bool):
            return None, [(int(img), int(img))]
        if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(i, int) for i in img):
            return None, [tuple(img)]
    return None, []


def candidate_inputs(model: nn.Module, n_in: Optional[int] = None) -> list[tuple]:
    """Input shapes to try, without the batch dimension: the model's configured size first (timm's config,
    `image_size`), then `SIDES`; channels `n_in` when given, else the configured ones (TResNet's first conv sees 48
    channels after its space-to-depth stem), the first conv's, then 3. A model whose first weight layer is a
    `Linear` gets a flat vector.

    >>> candidate_inputs(nn.Sequential(nn.Conv2d(1, 4, 3)))[:2]
    [(1, 224, 224), (1, 227, 227)]
    """
    cfg_c, sizes = _configured(model)
    sizes = list(dict.fromkeys(sizes + [(s, s) for s in SIDES]))
    if n_in is not None:
        return [(n_in, *hw) for hw in sizes]
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear))), None)
    if isinstance(first, nn.Linear):
        return [(first.in_features,)]
    chans = [c for c in (cfg_c, first.in_channels if isinstance(first, nn.Conv2d) else None, 3) if c is not None]
    return [(c, *hw) for c in dict.fromkeys(chans) for hw in sizes]


# ----------------------------------------------------------------------------------------------------------------
# Meta forwards
# ----------------------------------------------------------------------------------------------------------------
class Usage:
    "What meta forwards used: ids of the modules called, ids of the parameters that reached the output."

    def __init__(self):
        self.called: set[int] = set()
        self.used: set[int] = set()

    def hooks(self, module: nn.Module) -> list:
        return [m.register_forward_pre_hook(lambda mod, args: self.called.add(id(mod))) for m in module.modules()]

    def collect(self, out: Any, leaf_to_param: dict[int, int]) -> None:
        "Walk the autograd graph of `out` to its leaves (no backward computation)."
        t = first_tensor(out)
        stack, seen = [t.grad_fn] if t is not None and t.grad_fn is not None else [], set()
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold the leaf
            if var is not None and id(var) in leaf_to_param:
                self.used.add(leaf_to_param[id(var)])
            stack += [f for f, _ in fn.next_functions]


def meta_run(module: nn.Module, n_in: int, fn: Optional[Callable] = None, train: bool = False,
             size: Optional[tuple] = None, usage: Optional[Usage] = None) -> Any:
    """Run `fn(module, x)` (default: `module(x)`) on a meta batch `(2, n_in, H, W)`, with meta copies of the
    parameters and buffers: no memory, no compute, the module's own tensors untouched, training flags restored
    (BatchNorms run in eval mode: same shapes, much faster on meta). Tries `size` (H, W) when given, else the
    candidate inputs. `usage` records the modules called and (in eval mode) the parameters reaching the output.
    A `ValueError` summarising the failures when no size runs."""
    fn = fn or (lambda m, x: m(x))
    grad = usage is not None and not train
    errors, hooks = [], usage.hooks(module) if usage is not None else []
    try:
        with preserve_modes(module):
            module.train(train)
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.training = False
            for shape in ([(n_in, *size)] if size is not None else candidate_inputs(module, n_in)):
                x = torch.empty((2, *shape), device="meta")
                try:
                    with on_meta(module, grad) as tensors, torch.set_grad_enabled(grad), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out = fn(module, x)
                except Exception as e:  # a size the model does not accept: try the next
                    errors.append(f"{tuple(shape[1:])}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    continue
                if grad:
                    usage.collect(out, {id(m): i for i, m in tensors.items() if isinstance(m, nn.Parameter)})
                return out
    finally:
        for h in hooks:
            h.remove()
    raise ValueError(f"could not run {type(module).__name__} on a ({n_in}, H, W) input on the meta device; tried "
                     + "; ".join(errors[:4]))
