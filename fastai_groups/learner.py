"""Bodies, models and Learners for fine-tuning any image classifier (fastai's `vision_learner`, for every arch).

- `create_body(arch)`: the feature extractor of any architecture, returning a `(B, C, H, W)` map:
  - timm models: a `TimmBody` calling the model's `forward_features` (channels-last outputs are permuted to
    NCHW; token outputs `(B, N, C)`, and any other output that is not a map (crossvit's list of branch tokens),
    go through the model's own pooling, `forward_head(x, pre_logits=True)`, and come out as `(B, C, 1, 1)`);
  - any other model (torchvision, fastai, your own): the model's own forward, run up to where its classifier
    starts (found by `find_structure`). When the top-level children before the classifier, applied in turn, are
    exactly that forward, the body is `nn.Sequential` of those children (resnet: `conv1 ... layer4`, as fastai);
    otherwise it is a `ForwardBody` that runs the model and stops at the classifier. Either way the classifier's
    parameters are not in the body, auxiliary classifiers (googlenet, inception_v3) are removed, and a global
    pooling done in the model's `forward` (`x.mean([2, 3])`, `F.adaptive_avg_pool2d`) or a flatten before the
    classifier is skipped so the body returns the last feature map.
- `cnn_model(arch, n_out)`: `nn.Sequential(body, create_head(nf, n_out))`, `nf` found on the meta device.
- `group_learner(dls, arch)`: the fastai `Learner`, with `auto_splitter` groups, normalisation from the
  weights' stats, frozen when pretrained.

`create_body` never changes the structure of a model it is given: modules it replaces (the classifier, the first
conv when `n_in != 3`, auxiliary classifiers) are replaced in shallow copies, and the body shares all other
modules and parameters with the model (`weights`, when given with a model, are loaded into it).
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
import warnings
from typing import Any, Callable, Optional, Union

import torch
from fastai.learner import Learner
from fastai.optimizer import Adam
from torch import nn
from torch.overrides import TorchFunctionMode

from .callbacks import learner_group_names
from .head import create_head
from .splitters import _first_tensor, auto_splitter, find_structure, on_meta
from .summary import resolve_arch

__all__ = ["ForwardBody", "TimmBody", "create_body", "feature_shape", "cnn_model", "group_learner", "GroupLearner"]

Cut = Union[None, int, Callable[[nn.Module], nn.Module]]

# Attributes holding auxiliary classifiers (torchvision googlenet / inception_v3): removed from bodies.
AUX_ATTRS = ("aux1", "aux2", "AuxLogits")
_SIZES = (224, 299, 256, 128, 64, 32)


# ----------------------------------------------------------------------------------------------------------------
# Small module utilities
# ----------------------------------------------------------------------------------------------------------------
def _shallow(m: nn.Module) -> nn.Module:
    "A copy of `m` sharing its submodules, parameters and buffers, with its own registries (and hook dicts)."
    new = copy.copy(m)
    for k, v in list(vars(new).items()):
        if k.startswith("_") and isinstance(v, (dict, set)):
            vars(new)[k] = copy.copy(v)
    return new


def _replace(root: nn.Module, name: str, new: Optional[nn.Module]) -> nn.Module:
    """A shallow copy of `root` in which the submodule at dotted `name` is `new`; the modules on the path are
    copied, everything else is shared, `root` is unchanged.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU()); m2 = _replace(m, "1", nn.Identity())
    >>> type(m[1]).__name__, type(m2[1]).__name__, m2[0] is m[0]
    ('ReLU', 'Identity', True)
    """
    if not name:
        raise ValueError("cannot replace the root module")
    *path, last = name.split(".")
    out = parent = _shallow(root)
    for p in path:
        child = _shallow(parent._modules[p])
        parent._modules[p] = child
        parent = child
    if last not in parent._modules:
        raise KeyError(f"{type(parent).__name__} has no submodule {last!r} (in {name!r})")
    parent._modules[last] = new
    return out


def _set_attr(root: nn.Module, **attrs) -> nn.Module:
    "A shallow copy of `root` with plain attributes changed."
    out = _shallow(root)
    for k, v in attrs.items():
        setattr(out, k, v)
    return out


def _is_timm_model(model: nn.Module) -> bool:
    "timm models (and anything built like them) expose `forward_features`."
    return callable(getattr(model, "forward_features", None))


# ----------------------------------------------------------------------------------------------------------------
# Meta-device runs: shapes and structure without memory or compute
# ----------------------------------------------------------------------------------------------------------------
def _input_sizes(module: nn.Module) -> list[tuple[int, int]]:
    "Input sizes to try: the model's own config (timm `pretrained_cfg`, `image_size`/`img_size`), then common ones."
    sizes = []
    for m in module.modules():
        cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            sizes.append(tuple(int(s) for s in cfg["input_size"][1:]))
        img = getattr(m, "image_size", None) or getattr(m, "img_size", None)
        if isinstance(img, numbers.Integral) and not isinstance(img, bool):
            sizes.append((int(img), int(img)))
        elif isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(i, int) for i in img):
            sizes.append(tuple(img))
        if sizes:
            break
    sizes += [(s, s) for s in _SIZES]
    return list(dict.fromkeys(sizes))


class _Usage:
    "What meta forwards used: ids of the modules called, ids of the parameters that reached the output."

    def __init__(self):
        self.called: set[int] = set()
        self.used: set[int] = set()

    def hooks(self, module: nn.Module) -> list:
        return [m.register_forward_pre_hook(lambda mod, args: self.called.add(id(mod))) for m in module.modules()]

    def collect(self, out: Any, leaf_to_param: dict[int, int]) -> None:
        "Walk the autograd graph of `out` to its leaves (no backward computation)."
        t = _first_tensor(out)
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


def _meta_run(module: nn.Module, n_in: int, fn: Optional[Callable] = None, train: bool = False,
              size: Optional[tuple] = None, usage: Optional[_Usage] = None) -> Any:
    """Run `fn(module, x)` (default: `module(x)`) on a meta batch `(2, n_in, H, W)`, with meta copies of the
    parameters and buffers: no memory, no compute, the module's own tensors untouched, training flags restored
    (BatchNorms run in eval mode: same shapes, much faster on meta). Tries the model's configured input size,
    then common sizes. `usage` records the modules called and (in eval mode) the parameters reaching the output."""
    fn = fn or (lambda m, x: m(x))
    modes = [(m, m.training) for m in module.modules()]
    grad = usage is not None and not train
    errors, hooks = [], usage.hooks(module) if usage is not None else []
    try:
        module.train(train)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.training = False
        for hw in ([size] if size is not None else _input_sizes(module)):
            x = torch.empty((2, n_in) + tuple(hw), device="meta")
            try:
                with on_meta(module, grad) as tensors, torch.set_grad_enabled(grad), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = fn(module, x)
            except Exception as e:  # a size the model does not accept: try the next
                errors.append(f"{tuple(hw)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            if grad:
                usage.collect(out, {id(m): i for i, m in tensors.items() if isinstance(m, nn.Parameter)})
            return out
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    raise ValueError(f"could not run {type(module).__name__} on a ({n_in}, H, W) input on the meta device; tried "
                     + "; ".join(errors[:4]))


def feature_shape(body: nn.Module, n_in: int = 3, size: Optional[tuple] = None) -> torch.Size:
    """The shape of `body`'s output for a batch of 2 images with `n_in` channels, found on the meta device: no
    memory allocated, no weights touched, the body's training flags unchanged. `size` (H, W) defaults to the
    model's configured input size, else the first of 224, 299, 256, 128, 64, 32 that the body accepts.

    >>> from torchvision.models import resnet18
    >>> feature_shape(create_body(resnet18, pretrained=False))
    torch.Size([2, 512, 7, 7])
    """
    out = _meta_run(body, n_in, size=size)
    t = _first_tensor(out)
    if t is None:
        raise ValueError(f"{type(body).__name__} returned {type(out).__name__}, not a tensor")
    return t.shape


# ----------------------------------------------------------------------------------------------------------------
# Stopping a forward where the classifier starts
# ----------------------------------------------------------------------------------------------------------------
class _Features(Exception):
    "Raised inside a forward to hand the features out (and skip everything after them)."

    def __init__(self, features: torch.Tensor, kind: str):
        super().__init__(kind)
        self.features, self.kind = features, kind


class _HeadStop(nn.Module):
    "Stands for the first classifier module: its input is the body's output."

    def forward(self, x, *args, **kwargs):
        raise _Features(x, "head")


class _Collapse(TorchFunctionMode):
    """Once `open`, the first torch function that turns a `(B, C, H, W)` map with H*W > 1 into something that is
    no longer a spatial map (a global pooling to 1x1, `mean([2, 3])`, a flatten) stops the forward with that map:
    a global pooling written in `forward` is skipped. Other ops (activations, local pooling) run as usual."""

    def __init__(self):
        super().__init__()
        self.open = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.open and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            x = args[0]
            if x.ndim == 4 and x.shape[2] * x.shape[3] > 1 and (out.ndim < 4 or out.shape[2] * out.shape[3] == 1):
                raise _Features(x, "collapse")
        return out


def _as_map(x: torch.Tensor) -> torch.Tensor:
    "(B, C, H, W) as is; (B, C) -> (B, C, 1, 1); tokens (B, N, C) -> (B, C, N, 1)."
    if x.ndim == 4:
        return x
    if x.ndim == 2:
        return x[:, :, None, None]
    if x.ndim == 3:
        return x.transpose(1, 2)[..., None]
    raise ValueError(f"the body's features have shape {tuple(x.shape)}: expected (B, C, H, W), (B, N, C) or (B, C)")


class ForwardBody(nn.Module):
    """The feature extractor of a classifier: runs `model`'s own forward and returns the input of its classifier.

    `model`'s first classifier module is a stop (`_HeadStop`) and its other classifier modules are `nn.Identity`
    (see `create_body`, which builds it). With `collapse=True` the forward stops earlier, at the first global
    pooling or flatten applied (in `forward` code) to the output of the module named `last` (the last body
    module), so the body returns the feature map rather than its pooled vector. The output is always 4-D: a
    vector `(B, C)` (vit_b_16's class token) becomes `(B, C, 1, 1)`, tokens `(B, N, C)` become `(B, C, N, 1)`.

    >>> from torchvision.models import vit_b_16
    >>> body = create_body(vit_b_16, pretrained=False); type(body).__name__
    'ForwardBody'
    >>> feature_shape(body)
    torch.Size([2, 768, 1, 1])
    """

    def __init__(self, model: nn.Module, last: Optional[str] = None, collapse: bool = False):
        super().__init__()
        self.model, self.last, self.collapse = model, last, collapse
        if collapse and last is None:
            raise ValueError("collapse=True needs the name of the last body module (last=...)")

    def extra_repr(self) -> str:
        return f"last={self.last!r}, collapse={self.collapse}"

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        "The raw features (before making them 4-D) and how they were found ('head' or 'collapse')."
        mode, handle = None, None
        if self.collapse:
            mode = _Collapse()
            handle = self.model.get_submodule(self.last).register_forward_hook(
                lambda m, a, o: setattr(mode, "open", True))
        try:
            if mode is not None:
                with mode:
                    self.model(x)
            else:
                self.model(x)
        except _Features as f:
            return f.features, f.kind
        finally:
            if handle is not None:
                handle.remove()
        raise RuntimeError(f"{type(self.model).__name__}'s forward returned without reaching its classifier: "
                           "the body cannot find its features; pass cut=... to create_body")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, kind = self.features(x)
        if self.collapse and kind != "collapse":
            raise RuntimeError(f"{type(self.model).__name__}'s forward did not pool the output of {self.last!r} "
                               "this time (it did when the body was built): pass cut=... to create_body")
        return _as_map(out)


# ----------------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------------
_TIMM_FMTS = ("NCHW", "NHWC", "tokens", "pooled", "vector", "raw")


class TimmBody(nn.Module):
    """A timm model's feature extractor: `forward_features`, then to a `(B, C, H, W)` map.

    `fmt` says what `forward_features` returns: `"NCHW"` (kept), `"NHWC"` (channels-last: swin and other
    timm families with `output_fmt == "NHWC"`, permuted), `"tokens"` (`(B, N, C)`, ViT-like: pooled by the
    model's own `forward_head(x, pre_logits=True)`, its class token or average with its norm, then
    `(B, C, 1, 1)`), `"pooled"` (anything else, e.g. the list of per-branch tokens of crossvit or the list of
    stage maps of efficientvim: pooled the same way by `forward_head(x, pre_logits=True)`, which must give
    `(B, C)`), `"vector"` (`(B, C)` -> `(B, C, 1, 1)`) or `"raw"` (unchanged). `create_body` picks it.

    >>> import timm
    >>> body = create_body("timm:swin_tiny_patch4_window7_224", pretrained=False); body.fmt
    'NHWC'
    """

    def __init__(self, model: nn.Module, fmt: str = "NCHW"):
        super().__init__()
        if fmt not in _TIMM_FMTS:
            raise ValueError(f"fmt must be one of {_TIMM_FMTS}, got {fmt!r}")
        if not _is_timm_model(model):
            raise TypeError(f"{type(model).__name__} has no forward_features: not a timm model")
        self.model, self.fmt = model, fmt

    def extra_repr(self) -> str:
        return f"fmt={self.fmt!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(x)
        if self.fmt == "NHWC":
            return x.permute(0, 3, 1, 2)
        if self.fmt in ("tokens", "pooled"):
            return self.model.forward_head(x, pre_logits=True)[:, :, None, None]
        if self.fmt == "vector":
            return x[:, :, None, None]
        return x


def _out_desc(out: Any) -> str:
    "A short description of what a forward returned, for error messages."
    if isinstance(out, torch.Tensor):
        return f"shape {tuple(out.shape)}"
    if isinstance(out, (list, tuple)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(_out_desc(o) for o in out[:4])}" + \
            (", ...)" if len(out) > 4 else ")")
    return type(out).__name__


def _head_pools(model: nn.Module, n_in: int, fmt: str, what: str) -> str:
    "`fmt` when the model's own `forward_head(forward_features(x), pre_logits=True)` gives `(B, C)`, else ValueError."
    name = type(model).__name__
    cut = "pass cut=... (an int or a function) to create_body"
    if not callable(getattr(model, "forward_head", None)):
        raise ValueError(f"{name}.forward_features returns {what}, not a (B, C, H, W) map, and the model has no "
                         f"forward_head to pool it: {cut}")
    try:
        out = _meta_run(model, n_in, fn=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))
    except ValueError as e:
        raise ValueError(f"{name}.forward_features returns {what}, not a (B, C, H, W) map, and "
                         f"forward_head(x, pre_logits=True) fails on it ({e}): {cut}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(f"{name}.forward_features returns {what}, not a (B, C, H, W) map, and "
                         f"forward_head(x, pre_logits=True) gives {_out_desc(out)}, not (B, C): {cut}")
    return fmt


def _timm_fmt(model: nn.Module, n_in: int) -> str:
    """What the model's `forward_features` returns (see `TimmBody`). Anything but a map or a vector (tokens, a list
    of branch outputs or of stage maps, another shape) must be pooled to `(B, C)` by the model's `forward_head`."""
    out = _meta_run(TimmBody(model, "raw"), n_in)
    if not isinstance(out, torch.Tensor):
        return _head_pools(model, n_in, "pooled", _out_desc(out))
    shape = out.shape
    if len(shape) == 4:
        fmt = getattr(model, "output_fmt", None)
        fmt = getattr(fmt, "value", fmt)
        if fmt in ("NCHW", "NHWC"):
            return fmt
        nf = getattr(model, "num_features", None)
        if nf is not None and shape[3] == nf and shape[1] != nf:
            return "NHWC"
        return "NCHW"  # timm's default layout
    if len(shape) == 3:
        return _head_pools(model, n_in, "tokens", f"tokens {tuple(shape)}")
    if len(shape) == 2:
        return "vector"
    return _head_pools(model, n_in, "pooled", _out_desc(out))


# ----------------------------------------------------------------------------------------------------------------
# Any other model: cut at the classifier found by find_structure
# ----------------------------------------------------------------------------------------------------------------
def _drop_aux(model: nn.Module) -> nn.Module:
    "Remove auxiliary classifiers (googlenet's aux1/aux2, inception_v3's AuxLogits): set to None, aux_logits off."
    found = [a for a in AUX_ATTRS if isinstance(model._modules.get(a), nn.Module)]
    if not found:
        return model
    model = _shallow(model)
    for a in found:
        model._modules[a] = None
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    return model


class _Probe:
    """Records the calls of `root`'s top-level children during a meta forward of a `ForwardBody`: what each got
    and returned (tensor identity and in-place version), to tell whether those children form a plain chain."""

    def __init__(self, root: nn.Module):
        self.root, self.events, self.handles = root, [], []

    def __enter__(self):
        for name, child in self.root.named_children():
            self.handles.append(child.register_forward_pre_hook(functools.partial(self._pre, name)))
            self.handles.append(child.register_forward_hook(functools.partial(self._post, name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _pre(self, name, module, args):
        t = _first_tensor(args)
        self.events.append(("in", name, id(t), t._version if t is not None else None))

    def _post(self, name, module, args, out):
        t = _first_tensor(out)
        self.events.append(("out", name, id(t), t._version if t is not None else None))


def _run_probe(fb: ForwardBody, n_in: int, train: bool, usage: _Usage) -> dict:
    "Where and how `fb` stops, and the chain of top-level children that led there (`k`: their number, or None)."
    probe = _Probe(fb.model)
    seen = {}

    def run(m, x):
        seen["x"] = (id(x), x._version)
        feats, kind = m.features(x)
        seen.update(stop=(id(feats), feats._version), kind=kind, shape=tuple(feats.shape))
        return feats

    with probe:
        _meta_run(fb, n_in, fn=run, train=train, usage=usage)
    return dict(kind=seen["kind"], shape=seen["shape"], k=_chain_length(fb.model, probe.events, seen["x"],
                                                                        seen["stop"]))


def _chain_length(root: nn.Module, events: list, x: tuple, stop: tuple) -> Optional[int]:
    """k when the forward of `root` up to the stop is exactly `children[:k]` applied in turn (each once, each on
    the previous one's unmodified output, the first on the input, the stop tensor being the last output), and
    nothing else of `root` holds parameters or buffers; else None."""
    if any(p is not None for p in root._parameters.values()) or any(b is not None for b in root._buffers.values()):
        return None
    names = [n for n, _ in root.named_children()]
    expect, k, open_child = x, 0, None
    for kind, name, tid, ver in events:
        if kind == "in":
            if open_child is not None or k >= len(names) or name != names[k] or (tid, ver) != expect:
                return None
            open_child = name
        else:
            if name != open_child:
                return None
            expect, k, open_child = (tid, ver), k + 1, None
    if k == 0 or expect != stop:
        return None
    rest = [c for _, c in list(root.named_children())[k:]]
    if any(True for c in rest for _ in c.parameters()):
        return None
    return k


def _map_shape(shape: tuple) -> torch.Size:
    return _as_map(torch.empty(shape, device="meta")).shape


def _forward_body(model: nn.Module, n_in: int) -> tuple[nn.Module, _Usage, Optional[torch.Size]]:
    """The body of a non-timm model: `nn.Sequential` of its children when that is its forward, else a ForwardBody;
    with what its meta forwards used and its output shape."""
    usage = _Usage()
    st = find_structure(model)
    head = list(st.head)
    if not st.traced:  # before anything else: without a meta forward, neither the head nor the usage is known
        raise ValueError(f"could not run {type(model).__name__} on the meta device to find where its classifier "
                         "starts (its forward needs real values, e.g. `.item()` / `.tolist()`, or other inputs): "
                         "pass cut=... (an int or a function) to create_body")
    if not head:  # no classifier found: the model is a feature extractor already, used whole when it runs on meta
        try:
            out = _meta_run(model, n_in, usage=usage)
            _meta_run(model, n_in, train=True, usage=usage)
        except ValueError as e:
            raise ValueError(f"{type(model).__name__} has no classifier to cut and {e}: pass cut=... (an int or a "
                             "function) to create_body") from None
        t = _first_tensor(out)
        if t is None:
            raise ValueError(f"{type(model).__name__} has no classifier to cut and returns {type(out).__name__}, "
                             "not a tensor: pass cut=... (an int or a function) to create_body")
        return model, usage, t.shape
    if not any(u.params for u in st.units if all(u is not h for h in head)):
        names = ", ".join(u.name or "<root>" for u in head)
        raise ValueError(f"the classifier found in {type(model).__name__} ({names}) holds all its parameters: "
                         "nothing would be left for the body; pass cut=... (an int or a function; `cut=lambda m: m` "
                         "for a model that is a feature extractor already)")
    no_module = [u.name or "<root>" for u in head if u.module is None]
    if no_module:
        raise ValueError(f"{type(model).__name__}'s classifier includes parameters registered directly on "
                         f"{', '.join(no_module)}: cannot cut it automatically; pass cut=... to create_body")
    first = next((u for u in head if u.executed), head[0])
    truncated = model
    for u in head:
        truncated = _replace(truncated, u.name, _HeadStop() if u is first else nn.Identity())
    in_head = {u.name for u in head}
    body_units = [u for u in st.units if u.name not in in_head and u.module is not None and u.executed and u.name]
    last = body_units[-1].name if body_units else None

    fb = ForwardBody(truncated, last=last, collapse=last is not None)
    probes = [_run_probe(fb, n_in, train, usage) for train in (False, True)]
    kinds = {p["kind"] for p in probes}
    if len(kinds) != 1:
        raise ValueError(f"{type(model).__name__}'s forward reaches its classifier differently in training and in "
                         "eval mode: pass cut=... to create_body")
    fb.collapse = kinds == {"collapse"}
    if not fb.collapse:
        fb.last = None
    shape = _map_shape(probes[0]["shape"])
    ks = {p["k"] for p in probes}
    if len(ks) == 1 and None not in ks and len(probes[0]["shape"]) == 4:
        return nn.Sequential(*[c for _, c in truncated.named_children()][:ks.pop()]), usage, shape
    return fb, usage, shape


def _timm_body(model: nn.Module, n_in: int) -> tuple[nn.Module, _Usage, torch.Size]:
    "A TimmBody for `model`, with what its meta forwards used and its output shape."
    usage = _Usage()
    body = TimmBody(model, _timm_fmt(model, n_in))
    shape = _meta_run(body, n_in, usage=usage).shape
    _meta_run(body, n_in, train=True, usage=usage)
    return body, usage, shape


# ----------------------------------------------------------------------------------------------------------------
# Dead modules: parameters a body never uses
# ----------------------------------------------------------------------------------------------------------------
def _prune(body: nn.Module, usage: _Usage) -> nn.Module:
    """Replace by `nn.Identity` the submodules that no meta forward called and whose parameters never reached the
    output (a timm classifier, `conv_head` of a MobileNetV3 or the head norm of a ConvNeXt after
    `forward_features`): parameters the body would carry but never train. Refuses when `usage` recorded no meta
    forward (everything would look dead)."""
    if not any(True for _ in body.parameters()):
        return body
    if not usage.called:
        raise ValueError(f"no meta forward of {type(body).__name__} was recorded: cannot tell which of its modules "
                         "are unused (pruning would remove every parameter)")
    dead: list[str] = []
    for name, m in body.named_modules():
        if not name or any(name.startswith(d + ".") for d in dead):
            continue
        own = list(m.parameters())
        if own and id(m) not in usage.called and not any(id(p) in usage.used for p in own):
            dead.append(name)
    for name in dead:
        body = _replace(body, name, nn.Identity())
    return body


# ----------------------------------------------------------------------------------------------------------------
# Input channels
# ----------------------------------------------------------------------------------------------------------------
def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError(f"n_in != 3 needs a Conv2d first layer; {type(model).__name__} has no Conv2d")


def _adapt_first_conv(model: nn.Module, n_in: int, pretrained: bool) -> nn.Module:
    """`model` (a shallow copy) whose first Conv2d takes `n_in` channels. Pretrained weights are adapted as fastai
    does: 1 channel gets the sum over RGB, 2 channels the first two times 1.5, more channels the RGB weights
    then zeros; without pretrained weights the new kernel gets PyTorch's default Conv2d init."""
    if n_in == 3:
        return model
    name, conv = _first_conv(model)
    if conv.in_channels != 3:
        raise ValueError(f"n_in={n_in}: the first Conv2d ({name}) takes {conv.in_channels} channels, expected 3")
    if conv.groups != 1:
        raise ValueError(f"n_in={n_in}: the first Conv2d ({name}) is grouped (groups={conv.groups}): not supported")
    w = conv.weight.detach()
    with torch.no_grad():
        if not pretrained:
            new = torch.empty(w.shape[0], n_in, *w.shape[2:], dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(new, a=math.sqrt(5))
        elif n_in == 1:
            new = w.sum(dim=1, keepdim=True)
        elif n_in == 2:
            new = w[:, :2] * 1.5
        else:
            new = torch.cat([w, w.new_zeros(w.shape[0], n_in - 3, *w.shape[2:])], dim=1)
    new_conv = _shallow(conv)
    new_conv.in_channels = n_in
    new_conv.weight = nn.Parameter(new.contiguous(), requires_grad=conv.weight.requires_grad)
    model = _replace(model, name, new_conv) if name else new_conv
    if getattr(model, "transform_input", False):  # googlenet/inception_v3 re-normalise 3 RGB channels
        model = _set_attr(model, transform_input=False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------
def _is_timm_factory(fn: Callable) -> bool:
    from .weights import _target
    return getattr(_target(fn), "__module__", "").startswith("timm.")


def _load(arch: Any, pretrained: bool, weights: Any, n_in: int) -> tuple[nn.Module, dict, bool]:
    "The full model with its weights (and n_in channels), its normalisation stats, and whether we built it."
    from .weights import build_model  # lazily: weights.py pulls optional packages
    use_weights = bool(pretrained) or weights is not None
    if isinstance(arch, nn.Module):
        model, stats = build_model(arch, pretrained=use_weights, weights=weights)
        return _adapt_first_conv(model, n_in, use_weights), stats, False
    if isinstance(arch, str):
        arch = resolve_arch(arch)
    if not callable(arch):
        raise TypeError(f"arch must be an nn.Module, an nn.Module subclass, a factory or an architecture name, "
                        f"got {type(arch).__name__}")
    if not use_weights and n_in != 3 and _is_timm_factory(arch):
        model, stats = build_model(functools.partial(arch, in_chans=n_in), pretrained=False)
        return model, stats, True
    model, stats = build_model(arch, pretrained=use_weights, weights=weights)
    return _adapt_first_conv(model, n_in, use_weights), stats, True


def _cut(model: nn.Module, cut: Cut) -> nn.Module:
    "fastai's cut: an int keeps `children[:cut]` as an `nn.Sequential`, a callable returns the body."
    if isinstance(cut, bool):
        raise TypeError("cut must be an int or a callable, not a bool")
    if isinstance(cut, numbers.Integral):
        children = list(model.children())
        if not -len(children) < cut <= len(children) or cut == 0:
            raise ValueError(f"cut={cut} leaves no layer of {type(model).__name__}'s {len(children)} children")
        return nn.Sequential(*children[:cut])
    if callable(cut):
        body = cut(model)
        if not isinstance(body, nn.Module):
            raise TypeError(f"cut(model) returned {type(body).__name__}, not an nn.Module")
        return body
    raise TypeError(f"cut must be None, an int or a callable, got {type(cut).__name__}")


def _create_body(arch: Any, pretrained: bool = True, cut: Cut = None, weights: Any = None,
                 n_in: int = 3) -> tuple[nn.Module, dict, Optional[torch.Size]]:
    "`create_body`, plus the normalisation stats of the weights and the body's output shape (None when cut)."
    if isinstance(n_in, bool) or not isinstance(n_in, numbers.Integral) or n_in < 1:
        raise ValueError(f"n_in must be a positive int, got {n_in!r}")
    model, stats, owned = _load(arch, pretrained, weights, int(n_in))
    model = _drop_aux(model)
    if cut is not None:
        return _cut(model, cut), stats, None
    if _is_timm_model(model):
        if owned and callable(getattr(model, "reset_classifier", None)):
            model.reset_classifier(0)
        body, usage, shape = _timm_body(model, n_in)
    else:
        body, usage, shape = _forward_body(model, n_in)
    body = _prune(body, usage)
    if any(True for _ in model.parameters()) and not any(True for _ in body.parameters()):
        raise ValueError(f"the body found for {type(model).__name__} uses none of its parameters: pass cut=... (an "
                         "int or a function) to create_body")
    return body, stats, shape


def create_body(arch: Any, pretrained: bool = True, cut: Cut = None, weights: Any = None,
                n_in: int = 3) -> nn.Module:
    """The feature extractor of `arch`, returning a `(B, C, H, W)` map, without its classifier.

    `arch`: a model (used with its weights; never modified, the body shares its modules), an `nn.Module`
    class, a factory (`torchvision.models.resnet50`, `functools.partial`, ...) or a name (`"resnet50"`,
    `"timm:convnext_atto"`, `"fastai:xresnet18"`; see `resolve_arch`).
    `pretrained` / `weights`: the weights, from `fastai_groups.weights.build_model` (`weights` may be a local
    file, a state_dict or a torchvision weights name; giving it implies pretrained). `pretrained=False` and
    `weights=None`: random init.
    `cut`: fastai's override: an int keeps `list(model.children())[:cut]` as an `nn.Sequential`, a callable
    `cut(model)` returns the body.
    `n_in`: input channels; the first Conv2d is adapted (pretrained RGB kernels summed for 1 channel, as fastai;
    timm models built without weights get `in_chans=n_in`).

    timm models give a `TimmBody` (`forward_features`, NHWC and tokens handled); others the children before the
    classifier as an `nn.Sequential` when that is exactly the model's forward (resnet: conv1 ... layer4), else a
    `ForwardBody` (see the module docstring). Parameters the body never uses are dropped.

    >>> from torchvision.models import resnet50
    >>> body = create_body(resnet50, pretrained=False); len(body), type(body[7]).__name__
    (8, 'Sequential')
    """
    return _create_body(arch, pretrained, cut, weights, n_in)[0]


def _head_args() -> set[str]:
    return set(inspect.signature(create_head).parameters) - {"nf", "n_out"}


def _join(body: nn.Module, n_out: int, n_in: int, init: Optional[Callable], head_kwargs: dict,
          shape: Optional[torch.Size] = None) -> nn.Sequential:
    "nn.Sequential(body, head), nf read from the body's output on the meta device, only the head initialised."
    unknown = set(head_kwargs) - _head_args()
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(sorted(unknown))}; the head takes "
                        f"{', '.join(sorted(_head_args()))}")
    pool = head_kwargs.get("pool", True)
    shape = feature_shape(body, n_in) if shape is None else shape
    if pool and len(shape) != 4:
        raise ValueError(f"the body returns shape {tuple(shape)} (for a batch of 2), not a (B, C, H, W) feature map: "
                         "pass pool=False for a body that returns (batch, features)")
    if not pool and len(shape) != 2:
        raise ValueError(f"with pool=False the head takes (batch, features), but the body returns shape "
                         f"{tuple(shape)}: use pool=True for a feature map")
    head = create_head(int(shape[1]), n_out, **head_kwargs)
    if init is not None:
        from fastai.torch_core import apply_init
        apply_init(head, init)
    return nn.Sequential(body, head)


def cnn_model(arch: Any, n_out: int, pretrained: bool = False, weights: Any = None, cut: Cut = None, n_in: int = 3,
              init: Optional[Callable] = nn.init.kaiming_normal_, **head_kwargs) -> nn.Sequential:
    """`nn.Sequential(create_body(arch, ...), create_head(nf, n_out, **head_kwargs))`, fastai's
    `create_vision_model` for any architecture. `nf` is read from the body's output on the meta device (no
    memory, the body's training mode untouched); only the head is initialised, with `init` (fastai's
    `apply_init`: Linear weights, zero biases; BatchNorms kept). `head_kwargs`: `create_head`'s arguments.

    >>> from torchvision.models import resnet50
    >>> sum(p.numel() for p in cnn_model(resnet50, 44).parameters())  # seed 003
    25637484
    """
    body, _, shape = _create_body(arch, pretrained=pretrained, cut=cut, weights=weights, n_in=n_in)
    return _join(body, n_out, n_in, init, head_kwargs, shape)


# ----------------------------------------------------------------------------------------------------------------
# Learner
# ----------------------------------------------------------------------------------------------------------------
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


def _with_group_logger(cbs) -> list:
    "`cbs` as a list, plus a `GroupLogger()` unless it has one."
    from fastai.callback.core import Callback
    from .callbacks import GroupLogger
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


class GroupLearner(Learner):
    """The fastai `Learner` that `group_learner` returns: fastai's, plus clear errors where fastai silently does
    something else than asked.

    - `freeze_to(n)` with `n` outside `-len(groups)..len(groups)` raises `IndexError` (fastai freezes nothing or
      everything); a freeze that freezes nothing (`freeze()` on a single group, `freeze_to(-len(groups))`)
      raises `ValueError` (fastai does nothing, silently).
    - A `slice(lo, hi)` learning rate (or any hyper) on a single parameter group, or a list of values of the
      wrong length, raises `ValueError` (fastai uses `hi` silently, or fails with a bare `AssertionError`).

    >>> learn = group_learner(dls, "resnet18", pretrained=False)  # doctest: +SKIP
    >>> learn.freeze_to(9)  # doctest: +SKIP
    IndexError: freeze_to(9): the learner has 6 parameter groups (stem, ..., head); use -6..6
    """

    def create_opt(self):
        super().create_opt()
        self.opt.set_hyper = functools.partial(_checked_set_hyper, self.opt)

    def freeze_to(self, n: int):
        if self.opt is None:
            self.create_opt()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"freeze_to takes an int (the number of groups to freeze), got {type(n).__name__}")
        k = len(self.opt.param_lists)
        names = learner_group_names(self)
        if not -k <= n <= k:
            raise IndexError(f"freeze_to({n}): the learner has {k} parameter groups ({', '.join(names)}); "
                             f"use -{k}..{k}")
        if n != 0 and (n if n >= 0 else k + n) == 0:
            what = "freeze()" if n == -1 else f"freeze_to({n})"
            raise ValueError(f"{what} would freeze nothing: the learner has {k} parameter group"
                             f"{'s' if k > 1 else ''} ({', '.join(names)}); fastai would silently train everything. "
                             "Use a splitter that puts the head in its own last group (auto_splitter does)")
        super().freeze_to(n)

    def save(self, file: Any, with_opt: bool = True, pickle_protocol: int = 2, **torch_save_kwargs) -> Any:
        """fastai's `save` (`{'model': ..., 'opt': ...}` in `path/model_dir/file.pth`, rank 0 only), plus what
        resuming needs and fastai does not keep: the groups (names, sizes), the freeze state (`requires_grad` of
        every parameter, `opt.frozen_idx`) and the `GroupLogger` history. They ride in `state['opt']['fastai_groups']`,
        which fastai's `Optimizer.load_state_dict` ignores, so a plain fastai `Learner` loads the file too. The
        weights are saved without `torch.compile` / `DataParallel` / DDP wrappers. `with_opt=False`: the weights
        only, as fastai. Returns the file's path.

        >>> learn.fit_one_cycle(1, slice(1e-4, 1e-3)); learn.save("epoch0")  # doctest: +SKIP
        >>> fresh = group_learner(dls, "resnet18", pretrained=False).load("epoch0")  # doctest: +SKIP
        >>> fresh.fit_one_cycle(3, slice(1e-4, 1e-3), start_epoch=1)  # as if never interrupted  # doctest: +SKIP
        """
        from fastai.torch_core import rank_distrib
        from fastcore.xtras import join_path_file
        from .summary import unwrap_model
        file = join_path_file(file, self.path / self.model_dir, ext=".pth")
        if rank_distrib():
            return file
        state = unwrap_model(self.model).state_dict()
        if with_opt and self.opt is not None:
            state = {"model": state, "opt": {**self.opt.state_dict(), _CKPT_KEY: _train_state(self)}}
        torch.save(state, file, pickle_protocol=pickle_protocol, **torch_save_kwargs)
        return file

    def load(self, file: Any, device: Any = None, with_opt: bool = True, strict: bool = True,
             **torch_load_kwargs) -> "GroupLearner":
        """fastai's `load`, restoring what `save` kept. With `with_opt` (and a file that has an optimizer state): the
        per-group hypers and optimizer state, the freeze state (whatever this learner's was: it is not re-frozen
        from a schedule) and, into a `GroupLogger` that has recorded nothing yet (a fresh learner), the history; the
        next fit then continues its iteration count. With `with_opt`, a checkpoint of another grouping (number or
        sizes of groups) raises `ValueError` naming both, before anything is changed (fastai only warns and trains
        on; of a plain fastai file only the number of groups is known). Files saved by plain fastai load as with
        fastai (weights, optimizer state); `with_opt=False` loads the weights only. `file`: a name in
        `path/model_dir` (`.pth` added) or a path; `device`, `strict`: as fastai's.

        >>> learn.load("epoch0")  # doctest: +SKIP
        ValueError: checkpoint .../models/epoch0.pth has another grouping than this learner: ...
        """
        from fastai.torch_core import distrib_barrier
        from fastcore.xtras import join_path_file
        from .summary import unwrap_model
        if device is None and hasattr(self.dls, "device"):
            device = self.dls.device
        if self.opt is None:
            self.create_opt()
        file = join_path_file(file, self.path / self.model_dir, ext=".pth")
        distrib_barrier()
        state = _torch_load(file, device, **torch_load_kwargs)
        has_opt = isinstance(state, dict) and set(state) == {"model", "opt"}
        extra = state["opt"].pop(_CKPT_KEY, None) if has_opt else None
        if with_opt and has_opt:
            _check_grouping(self, state["opt"], extra, file)
        weights = state["model"] if has_opt else state
        nn.modules.utils.consume_prefix_in_state_dict_if_present(weights, "_orig_mod.")  # fastai's torch.compile saves
        unwrap_model(self.model).load_state_dict(weights, strict=strict)
        if with_opt and has_opt:
            self.opt.load_state_dict(state["opt"])
            if extra is not None:
                _restore_train_state(self, extra)
        elif with_opt:
            warnings.warn("Saved file doesn't contain an optimizer state.")
        return self

    def export(self, fname: Any = "export.pkl", **kwargs) -> None:
        """fastai's `export` (the learner without data and optimizer state, for inference), keeping the per-group
        hypers and `frozen_idx`: `load_learner` returns a learner whose optimizer has them, with the groups, the
        freeze state (`requires_grad` travels with the parameters) and the `GroupLogger` history.

        >>> learn.export("export.pkl"); load_learner(learn.path / "export.pkl").opt.hypers  # doctest: +SKIP
        """
        saved = self._export_opt = None if self.opt is None else {
            "hypers": [dict(h) for h in self.opt.hypers], "frozen_idx": getattr(self.opt, "frozen_idx", 0)}
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
            self.create_opt()
            for h, kept in zip(self.opt.hypers, exported["hypers"]):
                h.update(kept)
            self.opt.frozen_idx = exported["frozen_idx"]


_CKPT_KEY = "fastai_groups"


def _torch_load(file, device=None, **kwargs):
    "`torch.load` as fastai's `load_model` does it (device, `weights_only` with the numpy types fastai's hypers hold)."
    import numpy as np
    from fastcore.foundation import L
    device = torch.device("cuda", device) if isinstance(device, int) else device or "cpu"
    kwargs.setdefault("weights_only", True)
    np_core = getattr(np, "_core", None) or np.core
    safe = [L, np_core.multiarray.scalar, np.dtype, *[getattr(np.dtypes, d) for d in np.dtypes.__all__]]
    with torch.serialization.safe_globals(safe):
        return torch.load(file, map_location=device, **kwargs)


def _sizes(learn) -> list[list[int]]:
    "(tensors, elements) of each parameter group of `learn.opt`."
    return [[len(pg), sum(p.numel() for p in pg)] for pg in learn.opt.param_lists]


def _train_state(learn) -> dict:
    "What a checkpoint needs beyond fastai's: groups, freeze state, the GroupLogger history (plain Python data)."
    from .callbacks import GroupLogger
    logger = getattr(learn, "group_logger", None)
    return {"names": learner_group_names(learn), "sizes": _sizes(learn),
            "requires_grad": [[bool(p.requires_grad) for p in pg] for pg in learn.opt.param_lists],
            "frozen_idx": int(getattr(learn.opt, "frozen_idx", 0)),
            "logger": logger.state_dict() if isinstance(logger, GroupLogger) else None}


def _describe(names: list, sizes: list) -> str:
    return f"{len(sizes)} groups: " + ", ".join(f"{n} ({t} tensors, {e:,} params)" for n, (t, e) in zip(names, sizes))


def _check_grouping(learn, opt_state: dict, extra: Optional[dict], file) -> None:
    "`ValueError` when the checkpoint's groups are not this learner's (count, or tensors and elements per group)."
    here = _describe(learner_group_names(learn), _sizes(learn))
    if extra is not None:
        if [list(s) for s in extra["sizes"]] == _sizes(learn):
            return
        saved = _describe(extra["names"], extra["sizes"])
    else:                                   # a plain fastai file: only the number of groups is known
        hypers = opt_state.get("hypers", opt_state.get("param_groups"))
        if hypers is None or len(hypers) == len(learn.opt.param_lists):
            return
        saved = f"{len(hypers)} groups (a plain fastai file: no names or sizes)"
    raise ValueError(f"checkpoint {file} has another grouping than this learner: the checkpoint has {saved}; this "
                     f"learner has {here}. Build the learner with the splitter (and model) the checkpoint was saved "
                     "with, or load the weights only with load(..., with_opt=False)")


def _restore_train_state(learn, extra: dict) -> None:
    "Put back the checkpoint's freeze state and, into a GroupLogger that has recorded nothing, its history."
    from .callbacks import GroupLogger
    for pg, flags in zip(learn.opt.param_lists, extra["requires_grad"]):
        for p, flag in zip(pg, flags):
            p.requires_grad_(bool(flag))
    learn.opt.frozen_idx = int(extra["frozen_idx"])
    logger = getattr(learn, "group_logger", None)
    if isinstance(logger, GroupLogger) and extra.get("logger") is not None and not logger._records:
        logger.load_state_dict(extra["logger"])


def _with_fast_frozen(cbs: list, cache: bool) -> list:
    "`cbs` plus a `FeatureCache()` (when `cache`) or a `FastFrozenBody()`, unless one of the kind asked is there."
    from .frozen import FastFrozenBody, FeatureCache
    kind = FeatureCache if cache else FastFrozenBody
    if not any(isinstance(c, kind) or (isinstance(c, type) and issubclass(c, kind)) for c in cbs):
        cbs.append(kind())
    return cbs


def group_learner(dls, arch: Any, n_out: Optional[int] = None, pretrained: bool = True, weights: Any = None,
                  splitter: Optional[Callable] = auto_splitter, cut: Cut = None, train_bn: bool = True,
                  cache_features: bool = False, metrics=None, cbs=None, n_in: int = 3,
                  loss_func: Optional[Callable] = None, opt_func: Callable = Adam, lr: float = 1e-3,
                  normalize: bool = True, init: Optional[Callable] = nn.init.kaiming_normal_, **kwargs):
    """A fastai `Learner` fine-tuning `arch` on `dls`: fastai's `vision_learner` for any architecture.

    - `n_out`: from the data (`get_c(dls)`) when None; a `ValueError` when given and different from the data's.
    - `arch`, `pretrained`, `weights`, `cut`, `n_in`: as in `create_body` (`cut` is honoured, unlike
      `vision_learner`, fastai issue #4027).
    - When `pretrained` (or `weights` given): `Normalize` with the weights' stats (torchvision/ImageNet or the
      timm config) is added to `dls.after_batch` unless one is there (and `normalize`), and the Learner is
      frozen (`learn.freeze()`: all groups but the head; BatchNorms stay trainable with `train_bn`).
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

    body, stats, shape = _create_body(arch, pretrained=pretrained, cut=cut, weights=weights, n_in=n_in)
    model = _join(body, n_out, n_in, init, kwargs, shape)
    use_weights = bool(pretrained) or weights is not None
    if normalize and use_weights:
        _add_norm(dls, stats, n_in)
    cbs = _with_fast_frozen(_with_group_logger(cbs), cache_features)
    learn = GroupLearner(dls, model, loss_func=loss_func, opt_func=opt_func, lr=lr,
                         splitter=splitter or auto_splitter, cbs=cbs, metrics=metrics, train_bn=train_bn,
                         **learner_kwargs)
    if use_weights:
        learn.freeze()  # a ValueError when the splitter gives a single group (freeze() would freeze nothing)
    learn.arch, learn.n_out, learn.pretrained, learn.normalize, learn.stats = arch, n_out, use_weights, normalize, \
        stats
    return learn


from .recipe import fine_tune_groups as _fine_tune_groups  # noqa: E402  (recipe.py needs nothing from here)

GroupLearner.fine_tune_groups = _fine_tune_groups
