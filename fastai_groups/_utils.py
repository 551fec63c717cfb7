"""Small helpers shared by the modules of the package (private: not part of the API).

Wrappers (`unwrap_model`, `unwrap_callable`), tensors in nested outputs (`first_tensor`), callable inspection
(`needs_args`, `accepts`), module types (`CONTAINERS`, `NORMS`), train/eval flags (`preserve_modes`) and
copy-on-write surgery of module trees (`shallow`, `replace`, `set_attr`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


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


def unwrap_callable(fn: Callable) -> Callable:
    """The function under `functools.partial` chains.

    >>> unwrap_callable(functools.partial(functools.partial(print, 1), 2)) is print
    True
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def first_tensor(x: Any) -> Optional[torch.Tensor]:
    """The first tensor in `x` (a tensor, or lists/tuples/dicts of them, depth first); None when there is none.

    >>> first_tensor([None, (torch.zeros(1),)]).shape
    torch.Size([1])
    """
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for o in x:
            t = first_tensor(o)
            if t is not None:
                return t
    if isinstance(x, dict):
        return first_tensor(list(x.values()))
    return None


def needs_args(fn: Callable) -> list[str]:
    "Names of the parameters of `fn` that have no default and are not *args/**kwargs."
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                                   p.KEYWORD_ONLY)]


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` has a parameter called `name`.

    >>> accepts(lambda weights=None: 0, "weights")
    True
    """
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def preserve_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule's own `training` flag is put back on exit, whatever the block did.

    >>> m = nn.Sequential(nn.Dropout()).train()
    >>> with preserve_modes(m): _ = m.eval()
    >>> m[0].training
    True
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def shallow(m: nn.Module) -> nn.Module:
    "A copy of `m` sharing its submodules, parameters and buffers, with its own registries (and hook dicts)."
    new = copy.copy(m)
    for k, v in list(vars(new).items()):
        if k.startswith("_") and isinstance(v, (dict, set)):
            vars(new)[k] = copy.copy(v)
    return new


def replace(root: nn.Module, name: str, new: Optional[nn.Module]) -> nn.Module:
    """A shallow copy of `root` in which the submodule at dotted `name` is `new`; the modules on the path are
    copied, everything else is shared, `root` is unchanged.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU()); m2 = replace(m, "1", nn.Identity())
    >>> type(m[1]).__name__, type(m2[1]).__name__, m2[0] is m[0]
    ('ReLU', 'Identity', True)
    """
    if not name:
        raise ValueError("cannot replace the root module")
    *path, last = name.split(".")
    out = parent = shallow(root)
    for p in path:
        child = shallow(parent._modules[p])
        parent._modules[p] = child
        parent = child
    if last not in parent._modules:
        raise KeyError(f"{type(parent).__name__} has no submodule {last!r} (in {name!r})")
    parent._modules[last] = new
    return out


def set_attr(root: nn.Module, **attrs) -> nn.Module:
    "A shallow copy of `root` with plain attributes changed."
    out = shallow(root)
    for k, v in attrs.items():
        setattr(out, k, v)
    return out


def say(msg: str, quiet: bool = False) -> None:
    "Print `msg` on rank 0 only (and not when `quiet`)."
    from fastai.torch_core import rank_distrib
    if not quiet and rank_distrib() == 0:
        print(msg)


def fmt_bytes(n: float) -> str:
    """`n` bytes in the largest unit that keeps a value >= 1 (B, KiB, MiB, GiB, TiB).

    >>> fmt_bytes(0), fmt_bytes(1000), fmt_bytes(1536), fmt_bytes(3 * 2**30)
    ('0 B', '1000 B', '1.5 KiB', '3.0 GiB')
    """
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
