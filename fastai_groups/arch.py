"""Architectures: from whatever the user gave (a model, a class, a factory, a name) to a module, and paths in it.

- `resolve_arch(name)`: a factory for `"resnet50"`, `"xresnet18"`, `"timm:convnext_tiny"`, ...
- `instantiate(arch)`: a module for any `arch` (classes and factories built on the meta device: no memory, no
  download).
- `get_module(arch, idxs)`: the submodule at an index path (`[4, 0]`, `"layer1.0"`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

from torch import nn

from ._meta import build
from ._utils import accepts, needs_args, unwrap_model

__all__ = ["resolve_arch", "instantiate", "get_module", "parse_path", "walk_path", "unwrap_model", "Idxs"]

Idx = Union[int, str]
Idxs = Union[None, int, str, Sequence[Idx]]


# ----------------------------------------------------------------------------------------------------------------
# Turning whatever the user gave into a module
# ----------------------------------------------------------------------------------------------------------------
def resolve_arch(name: str) -> Callable[..., nn.Module]:
    """A factory for an architecture name.

    `"timm:NAME"` is a timm model, `"torchvision:NAME"` a torchvision one, `"fastai:NAME"` a fastai model
    (`xresnet18`, ...). A bare name is looked up in torchvision's classification models, then fastai's
    vision models, then timm's registry.

    >>> resolve_arch("resnet18")(weights=None).fc.out_features
    1000
    """
    if not isinstance(name, str):
        raise TypeError(f"an architecture name must be a str, not {type(name).__name__}")
    source, _, arch = name.rpartition(":")
    source = source.lower()
    if source not in ("", "timm", "torchvision", "tv", "fastai"):
        raise ValueError(f"unknown model source {source!r} in {name!r}: use 'timm:', 'torchvision:' or 'fastai:'")
    if source in ("", "torchvision", "tv"):
        import torchvision.models as tvm
        if arch in tvm.list_models(module=tvm):
            return tvm.get_model_builder(arch)
    if source in ("", "fastai"):
        from fastai.vision.models import xresnet
        fn = getattr(xresnet, arch, None) if arch in xresnet.__all__ and arch.startswith("x") else None
        if callable(fn):
            return fn
    if source in ("", "timm"):
        try:
            import timm
        except ImportError:
            if source == "timm":
                raise ImportError(f"{name!r} needs timm: pip install 'fastai-groups[timm]'") from None
        else:
            if timm.is_model(arch):
                return functools.partial(timm.create_model, arch)
    where = {"": "torchvision, fastai or timm", "tv": "torchvision"}.get(source, source)
    raise ValueError(f"unknown architecture {name!r}: not found in {where}. "
                     "Examples: 'resnet50', 'xresnet18', 'timm:convnext_tiny'")


def _call_factory(fn: Callable) -> nn.Module:
    kwargs = {}
    target = fn.func if isinstance(fn, functools.partial) else fn
    given = fn.keywords if isinstance(fn, functools.partial) else {}
    if accepts(target, "pretrained") and "pretrained" not in given:
        kwargs["pretrained"] = False
    if accepts(target, "weights") and "weights" not in given:
        kwargs["weights"] = None
    missing = [n for n in needs_args(fn) if n not in kwargs]
    if missing:
        what = fn.__name__ if hasattr(fn, "__name__") else repr(fn)
        raise TypeError(f"{what} needs arguments ({', '.join(missing)}): pass an instance, e.g. {what}({missing[0]}=...), "
                        f"or a functools.partial that fills them in")
    return fn(**kwargs)


def instantiate(arch: Any, meta: bool = True) -> nn.Module:
    """A module for `arch`: a module (returned as is, wrappers removed), an `nn.Module` subclass, a factory
    (function, `functools.partial`, lambda; called with `pretrained=False` / `weights=None` when it takes them)
    or an architecture name (see `resolve_arch`). Classes and factories are built on the meta device when
    `meta` is true: no parameter memory, no download.

    >>> instantiate("resnet18").fc.weight.device.type
    'meta'
    """
    if isinstance(arch, nn.Module):
        return unwrap_model(arch)
    if isinstance(arch, str):
        arch = resolve_arch(arch)
    if isinstance(arch, type):
        if not issubclass(arch, nn.Module):
            raise TypeError(f"{arch.__name__} is not an nn.Module subclass")
        missing = needs_args(arch.__init__)[1:]  # drop self
        if missing:
            raise TypeError(f"{arch.__name__} needs arguments ({', '.join(missing)}): pass an instance, "
                            f"e.g. {arch.__name__}({missing[0]}=...), or functools.partial({arch.__name__}, ...)")
        return build(arch, meta, arch.__name__)
    if callable(arch):
        model = build(functools.partial(_call_factory, arch), meta, getattr(arch, '__name__', repr(arch)))
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory {getattr(arch, '__name__', arch)!r} returned {type(model).__name__}, "
                            "not an nn.Module")
        return unwrap_model(model)
    raise TypeError(f"expected an nn.Module, an nn.Module subclass, a factory or an architecture name, "
                    f"got {type(arch).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Walking a path
# ----------------------------------------------------------------------------------------------------------------
def parse_path(idxs: Idxs) -> list[Idx]:
    if idxs is None:
        return []
    if isinstance(idxs, bool):
        raise TypeError("idxs must be an int, a str or a list of them, not a bool")
    if isinstance(idxs, int):
        return [idxs]
    if isinstance(idxs, str):
        return [int(s) if s.lstrip("-").isdigit() else s for s in idxs.split(".") if s != ""]
    if isinstance(idxs, (list, tuple)):
        out: list[Idx] = []
        for i in idxs:
            if isinstance(i, bool) or not isinstance(i, (int, str)):
                raise TypeError(f"each index must be an int or a str, got {i!r}")
            out += parse_path(i)
        return out
    raise TypeError(f"idxs must be None, an int, a str or a list of them, got {type(idxs).__name__}")


def _fmt_path(path: Sequence[Idx]) -> str:
    return "[" + ", ".join(repr(p) for p in path) + "]"


def walk_path(model: nn.Module, path: Sequence[Idx]) -> nn.Module:
    m, walked = model, []
    for i in path:
        children = list(m.named_children())
        here = f"{type(m).__name__} at {_fmt_path(walked)}"
        if isinstance(i, int):
            if not children:
                raise IndexError(f"{here} is a leaf ({type(m).__name__} has no children): cannot index it with {i}")
            if not -len(children) <= i < len(children):
                raise IndexError(f"index {i} out of range for {here}: valid indices are 0..{len(children) - 1}")
            m = children[i][1]
        else:
            names = [n for n, _ in children]
            if i not in names:
                shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                raise AttributeError(f"{here} has no child named {i!r}" +
                                     (f"; its children are: {shown}" if names else " (it is a leaf)"))
            m = dict(children)[i]
        walked.append(i)
    return m


def get_module(arch: Any, idxs: Idxs) -> nn.Module:
    """The submodule of `arch` at `idxs`: child indices and/or attribute names, e.g. `[4, 0]`, `"layer1.0"`
    or `["layer1", 0]`. Factories and classes are built on the meta device (structure only); pass an instance
    to get a module you can run.

    >>> type(get_module("resnet18", [4, 0])).__name__
    'BasicBlock'
    """
    return walk_path(instantiate(arch), parse_path(idxs))


