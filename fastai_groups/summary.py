"""Architecture summary: what a model is made of, without data, weights or downloads.

`arch_summary` prints one line per child of a module (seed 001's table); `summary_rows` gives the same
rows as data, shared by the printer and the splitters; `get_module` walks an index path.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn

__all__ = ["Row", "summary_rows", "arch_summary", "get_module", "instantiate", "unwrap_model", "resolve_arch",
           "count_layers", "is_container"]

Idx = Union[int, str]
Idxs = Union[None, int, str, Sequence[Idx]]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ----------------------------------------------------------------------------------------------------------------
# Turning whatever the user gave into a module
# ----------------------------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside `torch.compile`, `nn.DataParallel` and `DistributedDataParallel` wrappers.

    >>> m = nn.Linear(2, 2); unwrap_model(nn.DataParallel(m)) is m
    True
    """
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        return model


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


def _needs_args(fn: Callable) -> list[str]:
    "Names of the parameters of `fn` that have no default and are not *args/**kwargs."
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                                   p.KEYWORD_ONLY)]


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _call_factory(fn: Callable) -> nn.Module:
    kwargs = {}
    target = fn.func if isinstance(fn, functools.partial) else fn
    given = fn.keywords if isinstance(fn, functools.partial) else {}
    if _accepts(target, "pretrained") and "pretrained" not in given:
        kwargs["pretrained"] = False
    if _accepts(target, "weights") and "weights" not in given:
        kwargs["weights"] = None
    missing = [n for n in _needs_args(fn) if n not in kwargs]
    if missing:
        what = fn.__name__ if hasattr(fn, "__name__") else repr(fn)
        raise TypeError(f"{what} needs arguments ({', '.join(missing)}): pass an instance, e.g. {what}({missing[0]}=...), "
                        f"or a functools.partial that fills them in")
    return fn(**kwargs)


@contextlib.contextmanager
def _params_to_meta() -> Iterator[None]:
    "Every parameter and buffer registered inside this block is moved to the meta device (tensor maths stays real)."
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


def _build(make: Callable[[], nn.Module], meta: bool) -> nn.Module:
    "Run `make` on the meta device when possible (no memory, no init cost), else normally."
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
        with _params_to_meta():
            return make()
    except TypeError:
        raise
    except Exception:
        return make()


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
        missing = _needs_args(arch.__init__)[1:]  # drop self
        if missing:
            raise TypeError(f"{arch.__name__} needs arguments ({', '.join(missing)}): pass an instance, "
                            f"e.g. {arch.__name__}({missing[0]}=...), or functools.partial({arch.__name__}, ...)")
        return _build(arch, meta)
    if callable(arch):
        model = _build(functools.partial(_call_factory, arch), meta)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory {getattr(arch, '__name__', arch)!r} returned {type(model).__name__}, "
                            "not an nn.Module")
        return unwrap_model(model)
    raise TypeError(f"expected an nn.Module, an nn.Module subclass, a factory or an architecture name, "
                    f"got {type(arch).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Walking a path
# ----------------------------------------------------------------------------------------------------------------
def _as_path(idxs: Idxs) -> list[Idx]:
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
            out += _as_path(i)
        return out
    raise TypeError(f"idxs must be None, an int, a str or a list of them, got {type(idxs).__name__}")


def _fmt_path(path: Sequence[Idx]) -> str:
    return "[" + ", ".join(repr(p) for p in path) + "]"


def _walk(model: nn.Module, path: Sequence[Idx]) -> nn.Module:
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
    return _walk(instantiate(arch), _as_path(idxs))


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------
def is_container(m: nn.Module) -> bool:
    "True for plain `nn.Sequential`, `nn.ModuleList` and `nn.ModuleDict` (not subclasses)."
    return type(m) in _CONTAINERS


def count_layers(m: nn.Module) -> int:
    """The seed's layer count: direct children of a plain Sequential/ModuleList/ModuleDict, the number of leaf
    modules of anything else (empty plain containers are not layers), 1 for a leaf.

    >>> count_layers(nn.Sequential(nn.Linear(1, 1), nn.Sequential(nn.ReLU(), nn.ReLU())))
    2
    """
    if is_container(m):
        return len(m._modules)
    if not m._modules:
        return 1
    return sum(1 for s in m.modules() if not s._modules and not is_container(s))


@dataclass
class Row:
    "One child of the summarised module."
    index: int            # position among the children
    path: tuple           # index path from the model's root (ints)
    name: str             # attribute name ('layer1', or '0' in a Sequential)
    qualname: str         # dotted name from the model's root ('layer1', '0.8')
    type: str             # class name
    n_layers: int         # the seed's layer count
    params: int           # parameters (elements) in this child
    trainable: int        # of which require grad
    module: nn.Module     # the child itself
    children: tuple       # class names of its own children (verbose view)

    @property
    def state(self) -> str:
        "'yes', 'no' or 'partial' (torchinfo/Keras trainable column); '-' when it has no parameters."
        if self.params == 0:
            return "-"
        return "yes" if self.trainable == self.params else "no" if self.trainable == 0 else "partial"


def _unique_params(m: nn.Module) -> list[nn.Parameter]:
    return list(m.parameters())


def summary_rows(arch: Any, idxs: Idxs = None) -> list[Row]:
    """The rows `arch_summary` prints, as data: one `Row` per child of the module at `idxs`.

    >>> [r.name for r in summary_rows("resnet18")][:4]
    ['conv1', 'bn1', 'relu', 'maxpool']
    """
    model = instantiate(arch)
    path = _as_path(idxs)
    target = _walk(model, path)
    # ints for the path from the root, dotted name for the prefix
    int_path, names, m = [], [], model
    for i in path:
        children = list(m.named_children())
        j = i if isinstance(i, int) else [n for n, _ in children].index(i)
        j = j % len(children)
        int_path.append(j)
        names.append(children[j][0])
        m = children[j][1]
    prefix = ".".join(names)
    rows = []
    for k, (name, child) in enumerate(target.named_children()):
        ps = _unique_params(child)
        rows.append(Row(index=k, path=tuple(int_path + [k]), name=name,
                        qualname=f"{prefix}.{name}" if prefix else name, type=type(child).__name__,
                        n_layers=count_layers(child), params=sum(p.numel() for p in ps),
                        trainable=sum(p.numel() for p in ps if p.requires_grad), module=child,
                        children=tuple(type(c).__name__ for c in child.children())))
    return rows


def _group_of_rows(rows: list[Row], groups: Any, model: nn.Module) -> list[str]:
    "Name of the group each row's parameters fall in ('a+b' when it spans several, '-' when it has none)."
    from .splitters import group_names as _names
    if hasattr(groups, "splitter") and hasattr(groups, "model"):  # a fastai Learner
        groups, model = groups.splitter, groups.model
        model = unwrap_model(model)
    if callable(groups):
        groups = groups(model)
    names = _names(groups)
    where = {}
    for g, ps in enumerate(groups):
        for p in ps:
            where[id(p)] = g
    out = []
    for r in rows:
        gs = sorted({where[id(p)] for p in r.module.parameters() if id(p) in where})
        out.append("+".join(names[g] for g in gs) if gs else "-")
    return out


def arch_summary(arch: Any, idxs: Idxs = None, verbose: bool = False, params: bool = False,
                 groups: Any = None) -> None:
    """Print a one-line summary of each child of `arch` (or of the module at `idxs`), as in seed 001:

    `[i ] (name)  Type             : n   layers`; the name column appears only when the children have
    non-numeric names. `verbose=True` lists each child's children beneath it. `params=True` adds the
    parameter count and the trainable state (`yes`/`no`/`partial`). `groups` (a splitter such as
    `auto_splitter`, its output, or a fastai `Learner`) adds the parameter group of each row.

    >>> arch_summary(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    [0 ] Conv2d           : 1   layers
    [1 ] ReLU             : 1   layers
    """
    model = instantiate(arch if not (hasattr(arch, "splitter") and hasattr(arch, "model")) else arch.model)
    rows = summary_rows(model, idxs)
    show_names = any(not r.name.isdigit() for r in rows)
    width = max((len(r.name) + 2 for r in rows), default=0) + 2
    group_col = _group_of_rows(rows, groups, model) if groups is not None else None
    lines = []
    for k, r in enumerate(rows):
        line = f"[{r.index:<2}] "
        if show_names:
            line += f"({r.name})".ljust(width)
        line += f"{r.type:<17}: {r.n_layers:<3} layers"
        if params:
            line += f"  {r.params:>12,}  {r.state:<7}"
        if group_col is not None:
            line += f"  {group_col[k]}"
        lines.append(line)
        if verbose:
            lines += [f"      {c}" for c in r.children]
    print("\n".join(lines))
