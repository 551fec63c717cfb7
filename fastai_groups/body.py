"""Bodies: the feature extractor of any image classifier, returning a `(B, C, H, W)` map (fastai's `create_body`,
for every architecture).

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

`create_body` never changes the structure of a model it is given: modules it replaces (the classifier, the first
conv when `n_in != 3`, auxiliary classifiers) are replaced in shallow copies, and the body shares all other
modules and parameters with the model (`weights`, when given with a model, are loaded into it).
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._meta import Usage, meta_run
from ._utils import first_tensor, replace, set_attr, shallow, unwrap_callable
from .arch import resolve_arch
from .structure import find_structure
from .weights import build_model, known_stats

__all__ = ["ForwardBody", "TimmBody", "create_body", "feature_shape", "build_body", "AUX_ATTRS", "Cut"]

Cut = Union[None, int, Callable[[nn.Module], nn.Module]]

# Attributes holding auxiliary classifiers (torchvision googlenet / inception_v3): removed from bodies.
AUX_ATTRS = ("aux1", "aux2", "AuxLogits")


def _is_timm_model(model: nn.Module) -> bool:
    "timm models (and anything built like them) expose `forward_features`."
    return callable(getattr(model, "forward_features", None))


def feature_shape(body: nn.Module, n_in: int = 3, size: Optional[tuple] = None) -> torch.Size:
    """The shape of `body`'s output for a batch of 2 images with `n_in` channels, found on the meta device: no
    memory allocated, no weights touched, the body's training flags unchanged. `size` (H, W) defaults to the
    model's configured input size, else the first of `_meta.SIDES` (224, 227, 299, 256, 384, 128, 64, 32) that the body accepts.

    >>> from torchvision.models import resnet18
    >>> feature_shape(create_body(resnet18, pretrained=False))
    torch.Size([2, 512, 7, 7])
    """
    out = meta_run(body, n_in, size=size)
    t = first_tensor(out)
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
        out = meta_run(model, n_in, fn=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))
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
    out = meta_run(TimmBody(model, "raw"), n_in)
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
    model = shallow(model)
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
        t = first_tensor(args)
        self.events.append(("in", name, id(t), t._version if t is not None else None))

    def _post(self, name, module, args, out):
        t = first_tensor(out)
        self.events.append(("out", name, id(t), t._version if t is not None else None))


def _run_probe(fb: ForwardBody, n_in: int, train: bool, usage: Usage) -> dict:
    "Where and how `fb` stops, and the chain of top-level children that led there (`k`: their number, or None)."
    probe = _Probe(fb.model)
    seen = {}

    def run(m, x):
        seen["x"] = (id(x), x._version)
        feats, kind = m.features(x)
        seen.update(stop=(id(feats), feats._version), kind=kind, shape=tuple(feats.shape))
        return feats

    with probe:
        meta_run(fb, n_in, fn=run, train=train, usage=usage)
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


def _forward_body(model: nn.Module, n_in: int) -> tuple[nn.Module, Usage, Optional[torch.Size]]:
    """The body of a non-timm model: `nn.Sequential` of its children when that is its forward, else a ForwardBody;
    with what its meta forwards used and its output shape."""
    usage = Usage()
    st = find_structure(model)
    head = list(st.head)
    if not st.traced:  # before anything else: without a meta forward, neither the head nor the usage is known
        raise ValueError(f"could not run {type(model).__name__} on the meta device to find where its classifier "
                         "starts (its forward needs real values, e.g. `.item()` / `.tolist()`, or other inputs): "
                         "pass cut=... (an int or a function) to create_body")
    if not head:  # no classifier found: the model is a feature extractor already, used whole when it runs on meta
        try:
            out = meta_run(model, n_in, usage=usage)
            meta_run(model, n_in, train=True, usage=usage)
        except ValueError as e:
            raise ValueError(f"{type(model).__name__} has no classifier to cut and {e}: pass cut=... (an int or a "
                             "function) to create_body") from None
        t = first_tensor(out)
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
        truncated = replace(truncated, u.name, _HeadStop() if u is first else nn.Identity())
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


def _timm_body(model: nn.Module, n_in: int) -> tuple[nn.Module, Usage, torch.Size]:
    "A TimmBody for `model`, with what its meta forwards used and its output shape."
    usage = Usage()
    body = TimmBody(model, _timm_fmt(model, n_in))
    shape = meta_run(body, n_in, usage=usage).shape
    meta_run(body, n_in, train=True, usage=usage)
    return body, usage, shape


# ----------------------------------------------------------------------------------------------------------------
# Dead modules: parameters a body never uses
# ----------------------------------------------------------------------------------------------------------------
def _prune(body: nn.Module, usage: Usage) -> nn.Module:
    """Replace by `nn.Identity` the submodules that no meta forward called and whose parameters never reached the
    output (a timm classifier, `conv_head` of a MobileNetV3 or the head norm of a ConvNeXt after
    `forward_features`): parameters the body would carry but never train. Refuses when `usage` recorded no meta
    forward (everything would look dead)."""
    if not any(True for _ in body.parameters()):
        return body
    if not usage.called:
        raise ValueError(f"no meta forward of {type(body).__name__} was recorded: cannot tell which of its modules "
                         "are unused (pruning would remove every parameter)")
    dead = _dead(body, usage)
    for name in dead:
        body = replace(body, name, nn.Identity())
    return body


def _warn_dropped(model: nn.Module, body: nn.Module, usage: Usage) -> None:
    """Say which parametrised modules of a (non-timm) body are dropped although they are not the classifier: the
    forward never used them before the cut (the classifier found by `find_structure`)."""
    st = find_structure(model)
    head = {id(p) for u in st.head for p in u.params}
    names = {id(m): n for n, m in model.named_modules()}
    mods = dict(body.named_modules())
    dropped = [names.get(id(mods[d]), d) for d in _dead(body, usage)
               if any(id(p) not in head for p in mods[d].parameters())]
    dropped += [u.name for u in st.head if u.params and u.module is not None and not u.executed and st.complete]
    if dropped:
        warnings.warn(f"create_body: {', '.join(dropped)} of {type(model).__name__} hold parameters its forward never "
                      "uses before the classifier: left out of the body (pass cut=... to keep them)", stacklevel=4)


def _dead(body: nn.Module, usage: Usage) -> list[str]:
    "Names of the outermost submodules of `body` that hold parameters no meta forward used."
    dead: list[str] = []
    for name, m in body.named_modules():
        if not name or any(name.startswith(d + ".") for d in dead):
            continue
        own = list(m.parameters())
        if own and id(m) not in usage.called and not any(id(p) in usage.used for p in own):
            dead.append(name)
    return dead


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
    new_conv = shallow(conv)
    new_conv.in_channels = n_in
    new_conv.weight = nn.Parameter(new.contiguous(), requires_grad=conv.weight.requires_grad)
    model = replace(model, name, new_conv) if name else new_conv
    if getattr(model, "transform_input", False):  # googlenet/inception_v3 re-normalise 3 RGB channels
        model = set_attr(model, transform_input=False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------
def _is_timm_factory(fn: Callable) -> bool:
    return getattr(unwrap_callable(fn), "__module__", "").startswith("timm.")


def _load(arch: Any, pretrained: Optional[bool], weights: Any, n_in: int) -> tuple[nn.Module, Optional[dict], bool]:
    """The full model with its weights (and n_in channels), its normalisation stats, and whether we built it.

    A model instance is taken with the weights it has: its stats are the known ones (`known_stats`: `weights=`,
    its timm config, torchvision's/fastai's ImageNet) when `pretrained=True` or `weights` is given, else None
    (as given: nothing is known about its weights). Names, classes and factories: `pretrained=None` means True."""
    if isinstance(arch, nn.Module):
        model, _ = build_model(arch, weights=weights)
        stats = None if pretrained is None and weights is None else known_stats(model, weights)[0]
        return _adapt_first_conv(model, n_in, pretrained is not False or weights is not None), stats, False
    use_weights = pretrained is not False or weights is not None
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


def build_body(arch: Any, pretrained: Optional[bool] = None, cut: Cut = None, weights: Any = None,
               n_in: int = 3) -> tuple[nn.Module, Optional[dict], Optional[torch.Size]]:
    """`create_body`, plus the normalisation stats of the weights (None when unknown: a model instance taken as
    given, or one whose weights' stats are not known) and the body's output shape (None when cut)."""
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
        _warn_dropped(model, body, usage)
    body = _prune(body, usage)
    if any(True for _ in model.parameters()) and not any(True for _ in body.parameters()):
        raise ValueError(f"the body found for {type(model).__name__} uses none of its parameters: pass cut=... (an "
                         "int or a function) to create_body")
    return body, stats, shape


def create_body(arch: Any, pretrained: Optional[bool] = None, cut: Cut = None, weights: Any = None,
                n_in: int = 3) -> nn.Module:
    """The feature extractor of `arch`, returning a `(B, C, H, W)` map, without its classifier.

    `arch`: a model (used with its weights; never modified, the body shares its modules), an `nn.Module`
    class, a factory (`torchvision.models.resnet50`, `functools.partial`, ...) or a name (`"resnet50"`,
    `"timm:convnext_atto"`, `"fastai:xresnet18"`; see `resolve_arch`).
    `pretrained` / `weights`: the weights, from `fastai_groups.weights.build_model` (`weights` may be a local
    file, a state_dict or a torchvision weights name; giving it implies pretrained). `pretrained=None` (default):
    the published weights for a name, class or factory; a model instance keeps the weights it has.
    `pretrained=False` and `weights=None`: random init (for an instance, only a new first conv when `n_in != 3`).
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
    return build_body(arch, pretrained, cut, weights, n_in)[0]
