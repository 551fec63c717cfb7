"""Architecture summary, for people: what a model is made of, without data, weights or downloads.

`arch_summary` prints one line per child of a module (seed 001's table); `summary_rows` gives the same rows as
data (index path, name, type, layer count, parameter and trainable counts). The splitters do not read these rows:
they work from the module tree and a meta trace (`structure.py`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._utils import CONTAINERS, unwrap_model
from .arch import Idxs, get_module, instantiate, parse_path, resolve_arch, walk_path
from .splitters import GRANULARITIES, auto_splitter, group_names, learner_group_names

__all__ = ["Row", "summary_rows", "arch_summary", "count_layers", "is_container"]


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------
def is_container(m: nn.Module) -> bool:
    "True for plain `nn.Sequential`, `nn.ModuleList` and `nn.ModuleDict` (not subclasses)."
    return type(m) in CONTAINERS


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
    """One child of the summarised module (`summary_rows`); `arch_summary` prints them.

    >>> r = summary_rows("resnet18")[4]; (r.name, r.type, r.n)  # doctest: +SKIP
    ('layer1', 'Sequential', 2)
    """
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
    path = parse_path(idxs)
    target = walk_path(model, path)
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


def _is_learner(x: Any) -> bool:
    return hasattr(x, "splitter") and hasattr(x, "model")


def _groups_and_names(groups: Any, model: nn.Module) -> tuple[list, list[str]]:
    """The parameter groups `groups` stands for, and their names: a granularity name (`auto_splitter`'s), a
    splitter (called on `model`), a splitter's output, or a fastai `Learner` (its optimizer's groups and recorded
    names, else its splitter's groups)."""
    if isinstance(groups, str):
        if groups not in GRANULARITIES:
            raise ValueError(f"groups={groups!r} is not a granularity: use one of "
                             f"{', '.join(map(repr, GRANULARITIES))}, a splitter, its output or a Learner")
        groups = functools.partial(auto_splitter, granularity=groups)
    if _is_learner(groups):
        learn = groups
        if getattr(learn, "opt", None) is not None:
            return list(learn.opt.param_lists), learner_group_names(learn)
        groups, model = learn.splitter, unwrap_model(learn.model)
    if callable(groups):
        groups = groups(model)
    return list(groups), group_names(groups)


def _group_of_rows(rows: list[Row], groups: Any, model: nn.Module) -> list[str]:
    "Name of the group each row's parameters fall in ('a+b' when it spans several, '-' when it has none)."
    groups, names = _groups_and_names(groups, model)
    where = {}
    for g, ps in enumerate(groups):
        for p in ps:
            where[id(p)] = g
    out = []
    for r in rows:
        gs = sorted({where[id(p)] for p in r.module.parameters() if id(p) in where})
        out.append("+".join(names[g] for g in gs) if gs else "-")
    if any(r.params for r in rows) and all(o == "-" for o in out):
        raise ValueError("the groups hold none of the summarised model's parameters: they were made from another "
                         "model (a class or name is built anew); pass the model itself, or a granularity name such "
                         "as groups='stage'")
    return out


def arch_summary(arch: Any, idxs: Idxs = None, verbose: bool = False, params: bool = False,
                 groups: Any = None) -> None:
    """Print a one-line summary of each child of `arch` (or of the module at `idxs`), as in seed 001:

    `[i ] (name)  Type             : n   layers`; the name column appears only when the children have
    non-numeric names. `verbose=True` lists each child's children beneath it. `params=True` adds the
    parameter count and the trainable state (`yes`/`no`/`partial`). `groups` adds the parameter group of each
    row: a granularity name (`"stage"`, `"fastai"`, `"block"`: `auto_splitter`'s groups), a splitter, its output
    for this model, or a fastai `Learner` (its groups and names; pass the learner as `arch` too). An unknown
    name, or groups that hold none of the model's parameters, raise `ValueError`.

    >>> arch_summary(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    [0 ] Conv2d           : 1   layers
    [1 ] ReLU             : 1   layers
    """
    model = instantiate(arch.model if _is_learner(arch) else arch)
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
