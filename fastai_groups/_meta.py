"""Running models without memory: build on the meta device, swap a model's tensors for meta stand-ins, and run
meta forwards at candidate input sizes (private: shared by arch, structure and body).

- `build(make)`: call a constructor with every parameter and buffer on the meta device (no memory, no init cost),
  falling back to real maths with meta storage (constructors that compute with tensors, torchvision's RegNet),
  then to a real build, with a warning.
- `on_meta(model)`: the model's own tensors swapped for meta ones for the duration of a block.
- `config_inputs(model)` / `candidate_inputs(model, n_in)` / `trace_inputs(model)`: the input shapes to try,
  one contract (shapes without the batch dimension), one reader of the model's declared size, one list of sides.
- `meta_run(module, n_in)`: a forward on a meta batch, trying the candidate sizes, with an error summary.
- `meta_trace(model)`: one recorded meta forward (`Trace`: first call of every module, output resolutions, the
  modules that merge several paths, the first use of every parameter), for `structure`. Shape-preserving ops
  (norms, activations, same-shape elementwise maths, LSTMs) run as shape-only stand-ins: meta ops decompose in
  Python (~0.2-2 ms a call), which made a cold split take seconds.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._utils import NORMS, first_tensor, preserve_modes

SIDES = (224, 227, 299, 256, 384, 128, 64, 32)   # square sides tried after the model's own configured size


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
            rg = t.requires_grad if grad is None else grad
            if t.is_meta and (not isinstance(t, nn.Parameter) or t.requires_grad == rg):  # its own stand-in
                meta[id(t)] = t
                continue
            mt = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")  # (empty_like: slow on meta)
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
def candidate_inputs(model: nn.Module, n_in: int) -> list[tuple]:
    """Input shapes to try for `n_in` channels, without the batch dimension: the model's configured size first
    (`config_inputs`), then `SIDES`.

    >>> candidate_inputs(nn.Sequential(nn.Conv2d(1, 4, 3)), 1)[:2]
    [(1, 224, 224), (1, 227, 227)]
    """
    sizes = [tuple(s[1:]) for s in config_inputs(model) if len(s) == 3] + [(s, s) for s in SIDES]
    return [(n_in, *hw) for hw in dict.fromkeys(sizes)]


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
        """Walk the autograd graph of `out` to its leaves (no backward computation). The nodes seen are kept alive
        while walking: older torch (2.6 and 2.8 here) makes a new Python object for a node at each access, and the
        id of one that was freed is reused by the next (the walk then stopped early and missed most parameters)."""
        t = first_tensor(out)
        stack, seen = [t.grad_fn] if t is not None and t.grad_fn is not None else [], {}
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen[id(fn)] = fn
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


# ----------------------------------------------------------------------------------------------------------------
# The recorded trace (for structure)
# ----------------------------------------------------------------------------------------------------------------
def resolution(shape: torch.Size) -> Optional[int]:
    "Spatial size of an activation: H*W for NCHW or NHWC maps, tokens for (B, N, C); None when pooled."
    if len(shape) == 4:
        _, a, b, c = shape
        if b == c or a != b:
            return int(b * c)
        return int(a * b)  # channels last
    if len(shape) == 3:
        return int(shape[1])
    return None


WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)


def accepted_input(m: nn.Module) -> Optional[tuple]:
    "The input (shape without batch, dtype) a Conv1d/2d/3d, Linear or Embedding accepts; None for other modules."
    if isinstance(m, nn.Conv1d):
        return (m.in_channels, 16000), torch.float32  # one second of 16 kHz audio
    if isinstance(m, nn.Conv2d):
        return (m.in_channels, 224, 224), torch.float32
    if isinstance(m, nn.Conv3d):
        return (m.in_channels, 16, 112, 112), torch.float32
    if isinstance(m, nn.Linear):
        return (m.in_features,), torch.float32
    if isinstance(m, nn.Embedding):
        return (64,), torch.long
    return None


def config_inputs(model: nn.Module) -> list[tuple]:
    """Input shapes (without batch) the model declares: timm's `pretrained_cfg`, a HuggingFace `config`
    (`image_size`, `num_channels`), an `image_size` / `img_size` attribute; the first module declaring one wins."""
    for m in model.modules():
        d = vars(m)
        for key in ("pretrained_cfg", "default_cfg"):
            cfg = d.get(key)
            if isinstance(cfg, dict) and cfg.get("input_size"):
                return [tuple(int(i) for i in cfg["input_size"])]
        cfg = d.get("config")
        cfg = getattr(cfg, "vision_config", None) or cfg
        img = getattr(cfg, "image_size", None) if cfg is not None else None
        chans = getattr(cfg, "num_channels", 3) if cfg is not None else 3
        img = img if img is not None else d.get("image_size", d.get("img_size"))
        if isinstance(img, int) and not isinstance(img, bool):
            return [(int(chans), img, img)]
        if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(i, int) for i in img):
            return [(int(chans),) + tuple(img)]
    return []


def trace_inputs(model: nn.Module) -> list[tuple]:
    """Candidate inputs, (shape without batch, dtype): the model's own config, else what its first declared conv (or
    Linear / Embedding) accepts, then common image sizes (only tried after a shape error)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    first = first or next((m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)), None)
    chans = first.in_channels if isinstance(first, nn.Conv2d) else 3
    sizes = [(s, torch.float32) for s in config_inputs(model)]
    guess = accepted_input(first) if first is not None else None
    if guess is not None:
        sizes.append(guess)
    sizes += [((chans, s, s), torch.float32) for s in SIDES]
    return list(dict.fromkeys(sizes))


# ---- the meta trace: one forward on meta tensors, with shape-only stand-ins for slow ops ----
# Ops that return a tensor shaped like their first argument: during the trace they return it as is (on meta every op
# is shape inference, but elementwise ops and norms run through Python decompositions, ~0.2-2 ms a call).
_SAME_SHAPE = frozenset(
    "relu relu_ relu6 gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid "
    "hardsigmoid_ leaky_relu leaky_relu_ elu elu_ selu celu mish softplus hardtanh hardtanh_ prelu "
    "dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout batch_norm layer_norm "
    "group_norm instance_norm rms_norm local_response_norm normalize clamp clamp_ clip clip_ exp exp_ sqrt "
    "rsqrt neg abs erf erf_ sin cos log log_ pow pow_ __pow__ square softmax log_softmax contiguous clone "
    "roll flip".split())
_BINARY = frozenset("add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ mul mul_ __mul__ "
                    "__rmul__ __imul__ div div_ __truediv__ __rtruediv__ __itruediv__ true_divide".split())
_MERGES = frozenset("add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ mul mul_ __mul__ "
                    "__rmul__ __imul__ cat concat concatenate stack hstack vstack addcmul lerp".split())
_SHAPE_WORDS = ("shape", "size", "dim", "channel", "match", "expected", "height", "width", "divisib",
                "multiple", "too small", "kernel", "out of range")


def _is_shape_error(e: BaseException) -> bool:
    "Does `e` look like an input of the wrong size (worth another input size), not a forward that needs data?"
    msg = str(e).lower()
    if "meta" in msg or isinstance(e, NotImplementedError):
        return False
    return isinstance(e, AssertionError) and not msg or any(w in msg for w in _SHAPE_WORDS)


def _norm_like(m: nn.Module) -> bool:
    "A normalisation layer (keeps its input's shape): torch's norms and their subclasses, or a leaf named *Norm*."
    if any(True for c in m.children() for _ in c.parameters()):
        return False
    return isinstance(m, NORMS) or ("Norm" in type(m).__name__ and not m._modules)


def _rnn_stand_in(m: nn.RNNBase) -> Callable:
    "A shape-only forward for an LSTM / GRU / RNN (meta LSTMs decompose every time step)."
    real = m.forward

    def forward(x, hx=None):
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            return real(x, hx)
        d, out = (2 if m.bidirectional else 1), (getattr(m, "proj_size", 0) or m.hidden_size)
        batched = x.dim() == 3
        b = (x.shape[0] if m.batch_first else x.shape[1]) if batched else None
        y = x.new_empty(tuple(x.shape[:-1]) + (d * out,))
        lead = (d * m.num_layers,) + ((b,) if batched else ())
        h = x.new_empty(lead + (out,))
        return (y, (h, x.new_empty(lead + (m.hidden_size,)))) if isinstance(m, nn.LSTM) else (y, h)
    return forward


@dataclass
class Trace:
    "What one meta forward did, per module id: first-call rank, output resolution; merges; first use of parameters."
    how: str = ""                                        # 'complete', 'partial' or '' (nothing ran)
    order: dict = field(default_factory=dict)            # id(module) -> rank of its first call
    res: dict = field(default_factory=dict)              # id(module) -> resolution of its first output
    merging: set = field(default_factory=set)            # ids of modules whose own frame merges 2+ activations
    used: dict = field(default_factory=dict)             # id(original parameter) -> rank at its first use
    error: Optional[BaseException] = None
    failed_in: Optional[nn.Module] = None                # innermost module running when the forward failed
    first_weight: Optional[nn.Module] = None             # first Conv/Linear/Embedding called
    size: tuple = ()
    dtype: torch.dtype = torch.float32
    calls: int = 0


class _Recorder(TorchFunctionMode):
    """Records a meta forward (module hooks + torch functions): the first call of every module, its output
    resolution, the modules whose own frame merges two or more activations (tensors computed from the input: a
    residual add, a concat of branches), and the first use of every parameter. With `fast`, shape-preserving ops
    return their input instead of running (same shapes, no decomposition cost)."""

    def __init__(self, rec: Trace, params: dict, fast: bool, modules: set):
        super().__init__()
        self.rec, self.params, self.fast, self.modules = rec, params, fast, modules
        self.act: dict[int, torch.Tensor] = {}
        self.stack: list[nn.Module] = []
        self.exc0 = None

    def pre(self, m, args):
        if id(m) not in self.modules:          # another thread's module (the hooks are global)
            return
        self.stack.append(m)
        rec = self.rec
        if id(m) not in rec.order:
            rec.order[id(m)] = rec.calls
            rec.calls += 1
            if rec.first_weight is None and isinstance(m, WEIGHT_LAYERS):
                rec.first_weight = m

    def post(self, m, args, out):
        if id(m) not in self.modules:
            return
        if self.stack and self.stack[-1] is m:
            self.stack.pop()
        exc = sys.exc_info()[1]
        if exc is not None and exc is not self.exc0 and self.rec.failed_in is None:
            self.rec.failed_in = m
        if id(m) not in self.rec.res:
            t = first_tensor(out)
            self.rec.res[id(m)] = resolution(t.shape) if t is not None else None

    def _mark(self, out):
        if isinstance(out, torch.Tensor):
            self.act[id(out)] = out
        elif isinstance(out, (list, tuple)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self.act[id(t)] = t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        acts, act, params, used = 0, self.act, self.params, self.rec.used
        for a in (args if not kwargs else tuple(args) + tuple(kwargs.values())):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    k = id(t)
                    if k in act:
                        acts += 1
                    elif k in params and params[k] not in used:
                        used[params[k]] = self.rec.calls - 0.5
        name = getattr(func, "__name__", "")
        if acts >= 2 and name in _MERGES and self.stack:
            self.rec.merging.add(id(self.stack[-1]))
        out = _shape_only(name, args, kwargs) if self.fast and args and isinstance(args[0], torch.Tensor) and \
            args[0].is_floating_point() else None
        if out is None:
            out = func(*args, **kwargs)
        if acts:
            self._mark(out)
        return out


def _broadcast(a: torch.Size, b: torch.Size) -> Optional[torch.Size]:
    "The broadcast of two shapes when one contains the other (the common case), else None."
    if a == b:
        return a
    if len(b) <= len(a) and all(j == 1 or j == i for i, j in zip(a[len(a) - len(b):], b)):
        return a
    if len(a) <= len(b) and all(i == 1 or i == j for i, j in zip(b[len(b) - len(a):], a)):
        return b
    return None


def _shape_only(name: str, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The output of a shape-preserving (or simply shaped) op on floating meta tensor `args[0]`, without running
    it: the input itself when contiguous, else a new contiguous tensor (always viewable, as an op's output is).
    None when the op must run."""
    x = args[0]
    if name in _SAME_SHAPE:
        return x if x.is_contiguous() else x.new_empty(x.shape)
    if name in _BINARY and len(args) == 2 and not kwargs:
        y = args[1]
        if isinstance(y, (int, float)) and not isinstance(y, bool):
            shape = x.shape
        elif isinstance(y, torch.Tensor) and y.dtype == x.dtype:
            shape = _broadcast(x.shape, y.shape)
        else:
            return None
        if shape is None:
            return None
        if name.endswith("_") or name.startswith("__i"):
            return x if shape == x.shape else None
        return x if shape == x.shape and x.is_contiguous() else x.new_empty(shape)
    if name == "mean" and set(kwargs) <= {"dim", "keepdim"} and len(args) <= 3:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
            return None
        dims = {d % x.ndim for d in dims}
        shape = [1 if i in dims else n for i, n in enumerate(x.shape) if keep or i not in dims]
        return x.new_empty(shape)
    if name == "linear":
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if isinstance(w, torch.Tensor) and w.ndim == 2 and x.ndim >= 1 and x.shape[-1] == w.shape[1]:
            return x.new_empty(tuple(x.shape[:-1]) + (w.shape[0],))
        return None
    if name == "scaled_dot_product_attention" and len(args) >= 3 and isinstance(args[2], torch.Tensor):
        return x.new_empty(tuple(x.shape[:-1]) + (args[2].shape[-1],))
    return None


_PLAIN = frozenset((int, float, bool, str, bytes, type(None), torch.dtype, torch.device))


def meta_copy(model: nn.Module) -> tuple[nn.Module, dict]:
    """A structural copy of `model` for tracing: new module objects whose parameters and buffers are meta stand-ins
    (one per tensor, so tied weights and shared modules stay shared; no tensor data copied) and without the model's
    hooks. A forward of the copy never touches `model`, which another thread may be running. Returns the copy and
    `{id(stand-in): original tensor}`. Each module's attributes are copied one level deep (dicts, lists, sets: a
    forward that fills a cache fills the copy's), modules they name are the copies: linear in the number of modules
    (`copy.deepcopy` was most of a cold split).

    >>> m = nn.Linear(2, 3); c, _ = meta_copy(m)
    >>> c.weight.device.type, m.weight.device.type
    ('meta', 'cpu')
    """
    stand, originals, copies = {}, {}, {}

    def tensor(t):
        if t is not None and id(t) not in stand:
            mt = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            stand[id(t)] = nn.Parameter(mt, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else mt
            originals[id(stand[id(t)])] = t
        return None if t is None else stand[id(t)]

    def value(v):
        if type(v) in _PLAIN:
            return v
        if isinstance(v, nn.Module):
            return module(v)
        if type(v) in (list, tuple, set):
            return type(v)(value(x) for x in v)
        return type(v)((k, value(x)) for k, x in v.items()) if type(v) in (dict, OrderedDict) else v

    def module(m):
        if id(m) not in copies:
            c = copies[id(m)] = object.__new__(type(m))
            d = {k: type(v)((n, tensor(t)) for n, t in v.items()) if k in ("_parameters", "_buffers") else
                 type(v)() if k.endswith("hooks") and isinstance(v, dict) else value(v) for k, v in vars(m).items()}
            object.__setattr__(c, "__dict__", d)     # (forward/backward/state-dict hooks left behind)
        return copies[id(m)]

    return module(model), originals


def _run_trace(model: nn.Module, size: tuple, dtype: torch.dtype, fast: bool) -> Trace:
    """One meta forward of `model` (a `meta_copy`) on a batch of 2 inputs of shape `size`; see `Trace`. Only the
    modules of `model` are recorded (module hooks are global: another thread's forward is ignored)."""
    from torch.nn.modules import module as _mod
    rec = Trace(size=size, dtype=dtype)
    patched = []
    if fast:
        for m in model.modules():
            if "forward" in vars(m):
                continue
            if isinstance(m, nn.RNNBase):
                patched.append(m)
                m.forward = _rnn_stand_in(m)
            elif _norm_like(m):
                patched.append(m)
                m.forward = _identity_forward
    try:
        with torch.no_grad(), warnings.catch_warnings():
            model.eval()
            warnings.simplefilter("ignore")
            params = {id(p): id(p) for p in model.parameters()}
            mode = _Recorder(rec, params, fast, {id(m) for m in model.modules()})
            mode.exc0 = sys.exc_info()[1]
            h1 = _mod.register_module_forward_pre_hook(mode.pre)
            h2 = _mod.register_module_forward_hook(mode.post, always_call=True)
            x = torch.empty((2,) + tuple(size), device="meta", dtype=dtype)
            mode.act[id(x)] = x
            try:
                with mode:
                    model(x)
                rec.how = "complete"
            except Exception as e:
                rec.error, rec.how = e, "partial" if rec.calls > 1 else ""
            finally:
                h1.remove()
                h2.remove()
    finally:
        for m in patched:
            del m.forward
    rec.order.pop(id(model), None)
    return rec


def _identity_forward(x, *args, **kwargs):
    "A norm layer's stand-in: its input, made contiguous as a norm's output is."
    return x.contiguous() if isinstance(x, torch.Tensor) else x


def meta_trace(model: nn.Module) -> Trace:
    """The forward of `model` on meta tensors, recorded (`Trace`). One forward in the common case; another input
    only when the first failed on a shape (the first weight layer called tells what it accepts; then other image
    sizes); one more without the fast stand-ins when those may be the cause (`_stand_in_error`). The furthest
    attempt wins."""
    sizes = trace_inputs(model)
    tried, best = set(), None
    twin, originals = meta_copy(model)

    def attempt(size, dtype=torch.float32, fast=True):
        nonlocal best
        tried.add((size, dtype, fast))
        rec = _run_trace(twin, size, dtype, fast)
        if best is None or rec.how == "complete" or (best.how != "complete" and rec.calls > best.calls):
            best = rec
        return rec

    rec = attempt(*sizes[0])
    if rec.how != "complete" and rec.first_weight is not None and rec.failed_in is rec.first_weight:
        acc = accepted_input(rec.first_weight)  # the input layer refused: give it what it accepts
        if acc is not None and (acc[0], acc[1], True) not in tried:
            rec = attempt(*acc)
    retries = 0
    while rec.how != "complete" and rec.error is not None and _is_shape_error(rec.error) and retries < 3:
        nxt = next(((s, dt) for s, dt in sizes if (s, dt, True) not in tried and len(s) == len(best.size)
                    and s[0] == best.size[0]), None)
        if nxt is None:
            break
        rec, retries = attempt(*nxt), retries + 1
    if best.how != "complete" and best.error is not None and _stand_in_error(best.error):
        attempt(best.size, best.dtype, fast=False)
    return _on_original(best, model, twin, originals)


def _on_original(rec: Trace, model: nn.Module, twin: nn.Module, originals: dict) -> Trace:
    "`rec`, recorded on `twin` (`meta_copy(model)`), in terms of `model`'s own modules and parameters."
    mods = {id(c): m for m, c in zip(model.modules(), twin.modules())}     # same tree, same order
    ident = lambda d: {id(mods[k]): v for k, v in d.items() if k in mods}   # noqa: E731
    rec.order, rec.res = ident(rec.order), ident(rec.res)
    rec.merging = {id(mods[k]) for k in rec.merging if k in mods}
    rec.used = {id(originals[k]): v for k, v in rec.used.items() if k in originals}
    rec.failed_in = mods.get(id(rec.failed_in)) if rec.failed_in is not None else None
    rec.first_weight = mods.get(id(rec.first_weight)) if rec.first_weight is not None else None
    return rec


def _stand_in_error(e: BaseException) -> bool:
    """Could the shape-only stand-ins have caused `e`? They keep every shape and dtype, so only a stride problem (a
    `.view` of what should have been a fresh tensor) or an error that is not about shapes nor the meta device."""
    msg = str(e).lower()
    return any(w in msg for w in ("view", "stride", "contiguous")) or not _is_shape_error(e) and "meta" not in msg
