"""Parameter groups for any CNN, found from its structure: stem, stages, head.

The model is cut into *units*: containers are opened, blocks (residual, inverted-residual, transformer,
dense layers, ...) are kept whole. A forward pass on meta tensors (no memory, no data) gives the forward order
of the units and the resolution of their outputs: a block that changes the resolution opens a new stage.
Units after the last feature map form the head. Groups are then built per granularity:

- `"stage"`: stem, one group per stage, head;
- `"fastai"`: early body, late body, head (fastai's `_resnet_split` / `_densenet_split` on their models);
- `"block"`: stem, one group per block, head.

`auto_splitter` returns a `ParamGroups` (a list of lists of `nn.Parameter` with `.names`), usable as a fastai
`splitter`. `check_groups` validates any splitter's output.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .summary import instantiate, unwrap_model

__all__ = ["ParamGroups", "Unit", "Structure", "find_structure", "auto_splitter", "check_groups", "checked", "on_meta",
           "group_names", "GRANULARITIES"]

GRANULARITIES = ("stage", "fastai", "block")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


class ParamGroups(list):
    """A list of parameter groups (each a list of `nn.Parameter`) that also carries a name per group.

    >>> g = ParamGroups([[nn.Parameter(torch.zeros(1))]], names=["head"]); g.names
    ['head']
    """

    def __init__(self, groups=(), names: Optional[Sequence[str]] = None):
        super().__init__(list(g) for g in groups)
        self.names = list(names) if names is not None else [f"group{i}" for i in range(len(self))]
        if len(self.names) != len(self):
            raise ValueError(f"{len(self.names)} names for {len(self)} groups")


def group_names(groups: Sequence) -> list[str]:
    "The names of `groups` (`ParamGroups.names`), else `group0`, `group1`, ..."
    names = getattr(groups, "names", None)
    if names is not None and len(names) == len(groups):
        return list(names)
    return [f"group{i}" for i in range(len(groups))]


# ----------------------------------------------------------------------------------------------------------------
# Units: the atoms a split never cuts
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Unit:
    "An atomic piece of the model: a module kept whole, or the parameters registered directly on an opened module."
    name: str                         # qualified name ('' for the root's own parameters)
    module: Optional[nn.Module]       # None for direct parameters
    params: list                      # parameters first owned by this unit, in registration order
    block: bool = False               # a block (residual, transformer, dense layer, ...), kept whole
    cls: str = ""                     # class name of the module
    order: float = math.inf           # forward order (first call)
    res: Optional[int] = None         # spatial size (H*W, or tokens) of its output; None if pooled/unknown
    executed: bool = False


class _Shape:
    "Cached structural facts about modules (ids are only valid while the model lives)."

    def __init__(self):
        self.owners: dict[int, int] = {}
        self.nblocks: dict[int, int] = {}

    def param_owners(self, m: nn.Module) -> int:
        "How many modules of the subtree (itself included) hold parameters directly."
        k = id(m)
        if k not in self.owners:
            self.owners[k] = (1 if m._parameters and any(p is not None for p in m._parameters.values()) else 0) + \
                sum(self.param_owners(c) for c in m.children())
        return self.owners[k]

    def is_block(self, m: nn.Module) -> bool:
        """A block: a composite of 3+ parameterised modules, or of 2 weight layers (a residual block without norm
        layers, an MLP), or of 2+ where some child is itself composite. Conv+norm(+act) and linear+norm pairs are
        layers, not blocks."""
        n = self.param_owners(m)
        if n < 2:
            return False
        if n == 2 and all(self.param_owners(c) <= 1 for c in m.children()):
            return not any(isinstance(d, _NORMS) for d in m.modules() if d._parameters)
        return True

    def count_blocks(self, m: nn.Module) -> int:
        """Blocks directly reachable below `m`: containers count by their contents, and so does a child that
        itself holds 2+ blocks; any other child counts 1 if it is a block."""
        k = id(m)
        if k not in self.nblocks:
            total = 0
            for c in m.children():
                inner = self.count_blocks(c)
                total += inner if (inner >= 2 or isinstance(c, _CONTAINERS)) else int(self.is_block(c))
            self.nblocks[k] = total
        return self.nblocks[k]

    def model_like(self, m: nn.Module) -> bool:
        """A whole model rather than a block: it holds 2+ blocks, or a container of 3+ parameterised layers
        (VGG's `features`). A body wrapped as Sequential(body, head) is opened like the root when model-like."""
        if self.count_blocks(m) >= 2:
            return True
        return any(isinstance(d, _CONTAINERS) and sum(self.param_owners(c) > 0 for c in d.children()) >= 3
                   for d in m.modules())

    def opens(self, m: nn.Module, root: bool, in_sequence: bool = False) -> bool:
        """Is `m` opened into its children, or kept whole? Opened: the root, plain containers, container
        subclasses that hold blocks (a DenseNet dense block, a RegNet stage), stage wrappers (a module with a
        container of 2+ blocks), and modules holding 2+ blocks that are not themselves an element of a sequence
        (a block in a sequence stays whole even when it holds sub-blocks, such as RepViT's token/channel mixers)."""
        if not m._modules:
            return False
        if root or type(m) in _CONTAINERS:
            return True
        n = self.count_blocks(m)
        if isinstance(m, _CONTAINERS):
            return n >= 1
        if any(isinstance(c, _CONTAINERS) and self.count_blocks(c) >= 2 for c in m.children()):
            return True
        return n >= 2 and not in_sequence


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _units(model: nn.Module) -> list[Unit]:
    shape, units, seen = _Shape(), [], set()

    def own(params):
        out = []
        for p in params:
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def visit(m: nn.Module, name: str, wrapper: bool, in_sequence: bool = False):
        # `wrapper`: the root, or the first child holding parameters of a wrapper when it is a whole model (a body
        # inside Sequential(body, head), fastai's TimmBody(model), our ForwardBody): opened like the root, however
        # large the head that follows it
        if shape.opens(m, wrapper, in_sequence):
            direct = own(m._parameters.values())
            if direct:
                units.append(Unit(name, None, direct, cls=type(m).__name__))
            before = bool(direct)
            for cname, c in m.named_children():
                n = _numel(c)
                dominant = wrapper and not before and n > 0 and not isinstance(c, _CONTAINERS) and \
                    shape.model_like(c)
                before = before or n > 0
                visit(c, f"{name}.{cname}" if name else cname, dominant, isinstance(m, _CONTAINERS))
        else:
            units.append(Unit(name, m, own(m.parameters()), block=shape.is_block(m), cls=type(m).__name__))

    visit(model, "", True)
    return units


# ----------------------------------------------------------------------------------------------------------------
# Meta trace: forward order and output resolution
# ----------------------------------------------------------------------------------------------------------------
def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for o in x:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(x, dict):
        return _first_tensor(list(x.values()))
    return None


def _resolution(shape: torch.Size) -> Optional[int]:
    "Spatial size of an activation: H*W for NCHW or NHWC maps, tokens for (B, N, C); None when pooled."
    if len(shape) == 4:
        _, a, b, c = shape
        if b == c or a != b:
            return int(b * c)
        return int(a * b)  # channels last
    if len(shape) == 3:
        return int(shape[1])
    return None


def _input_sizes(model: nn.Module) -> list[tuple]:
    "Candidate input shapes (without batch): the model's own config first, then common sizes."
    chans, first = 3, None
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)):
            first = m
            break
    if isinstance(first, nn.Linear):
        return [(first.in_features,)]
    if isinstance(first, nn.Conv2d):
        chans = first.in_channels
    sizes = []
    for cfg_name in ("pretrained_cfg", "default_cfg"):  # timm's own input size (and channels: TResNet's first conv
        cfg = getattr(model, cfg_name, None)          # sees 48 channels after its space-to-depth stem)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            sizes.append(tuple(cfg["input_size"]))
    img = getattr(model, "image_size", None) or getattr(model, "img_size", None)
    sides = [img] if isinstance(img, int) else []
    sides += [224, 227, 299, 256, 64, 32]
    for c in dict.fromkeys([chans, 3]):
        if isinstance(img, (tuple, list)) and len(img) == 2:
            sizes.append((c,) + tuple(img))
        sizes += [(c, s, s) for s in sides]
    return list(dict.fromkeys(sizes))


@contextlib.contextmanager
def on_meta(model: nn.Module, grad: Optional[bool] = None):
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


def _trace(model: nn.Module, units: list[Unit]) -> str:
    """Fill `order`, `res`, `executed` of the units from a forward pass on meta tensors: 'complete', 'partial'
    (it failed after some units ran: the furthest attempt is kept) or '' (nothing ran)."""
    mods = [(u, u.module) for u in units if u.module is not None]
    counter = [0]

    def hook(u):
        def pre(mod, args):
            if not u.executed:
                u.executed, u.order = True, counter[0]
                counter[0] += 1
        def post(mod, args, out):
            t = _first_tensor(out)
            if t is not None and u.res is None:
                u.res = _resolution(t.shape)
        return pre, post

    handles, modes = [], [(m, m.training) for m in model.modules()]
    try:
        for u, m in mods:
            pre, post = hook(u)
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        model.eval()
        best = (0, None)  # (units reached, snapshot) of the furthest failed attempt
        for size in _input_sizes(model):
            for u in units:
                u.executed, u.order, u.res = False, math.inf, None
            counter[0] = 0
            x = torch.empty((2,) + size, device="meta")
            try:
                with torch.no_grad(), warnings.catch_warnings(), on_meta(model):
                    warnings.simplefilter("ignore")
                    model(x)
                return "complete"
            except Exception:
                # a forward that fails late (a head that does not fit the body, a fixed input size) still tells
                # the order and resolution of what ran before it
                if counter[0] > best[0]:
                    best = (counter[0], [(u.executed, u.order, u.res) for u in units])
        for u, snap in zip(units, best[1] or [(False, math.inf, None)] * len(units)):
            u.executed, u.order, u.res = snap
        return "partial" if best[0] > 0 else ""
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode


def _forward_sort(units: list[Unit]) -> list[Unit]:
    "Units in forward order; units never called keep their place after the unit registered before them."
    keyed, last, k = [], -1.0, 0
    for i, u in enumerate(units):
        if u.executed:
            last, k = u.order, 0
            keyed.append(((u.order, 0, i), u))
        else:
            k += 1
            keyed.append(((last, k, i), u))
    return [u for _, u in sorted(keyed, key=lambda t: t[0])]


# ----------------------------------------------------------------------------------------------------------------
# Structure: stem, stages, tail, head
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Structure:
    "Where the stem, stages and head of a model are (lists of units, in forward order)."
    units: list
    stem: list = field(default_factory=list)
    stages: list = field(default_factory=list)   # list of lists of units
    head: list = field(default_factory=list)
    traced: bool = False      # a forward on meta tensors ran (at least partly)
    complete: bool = False    # ... and ran to the end

    @property
    def blocks(self) -> list:
        return [u for s in self.stages for u in s if u.block]

    def n_params(self, units) -> int:
        return sum(p.numel() for u in units for p in u.params)


def _root_name(u: Unit) -> str:
    return u.name.split(".", 1)[0]


def _parent(u: Unit) -> str:
    return u.name.rsplit(".", 1)[0] if "." in u.name else ""


def find_structure(model: Any) -> Structure:
    """Stem, stages and head of `model` (any `arch` accepted by `instantiate`), without touching its weights.

    >>> s = find_structure("resnet18"); [u.name for u in s.stem], len(s.stages), [u.name for u in s.head]
    (['conv1', 'bn1', 'relu', 'maxpool'], 4, ['avgpool', 'fc'])
    """
    model = instantiate(model)
    key = (tuple(map(id, model.modules())), tuple(map(id, model.parameters())))
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    st = _find_structure(model)
    _CACHE[model] = (key, st)
    return st


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _find_structure(model: nn.Module) -> Structure:
    units = _units(model)
    how = _trace(model, units)
    traced, complete = bool(how), how == "complete"
    units = _forward_sort(units)
    st = Structure(units=units, traced=traced, complete=complete)
    if not any(u.params for u in units):
        return st

    block_idx = [i for i, u in enumerate(units) if u.block]
    last_block = block_idx[-1] if block_idx else -1

    # head: what follows the last feature map (pooling, classifier), never a block
    head_start = None
    if traced:
        feats = [i for i, u in enumerate(units) if u.res is not None and u.res > 1]
        if feats:
            h = feats[-1] + 1  # a block after the last feature map is a classifier block (timm's MLP heads)
            # a partial trace must have seen the switch from feature maps to pooled outputs
            seen = complete or (h < len(units) and units[h].executed)
            if seen and any(u.params for u in units[h:]):
                head_start = h
    if head_start is None:
        # structural: the last top-level child with parameters, if it holds no block and follows the last block
        last_p = max(i for i, u in enumerate(units) if u.params)
        top = _root_name(units[last_p])
        same = [i for i, u in enumerate(units) if _root_name(u) == top]
        if top and last_p > last_block and not any(units[i].block for i in same) and same[0] > last_block:
            head_start = same[0]
            # pooling/flatten units without parameters just before it belong to the head too
            while head_start - 1 > last_block and not units[head_start - 1].params and \
                    units[head_start - 1].res is None and traced:
                head_start -= 1
    if head_start is None:
        head_start = len(units)
    body, st.head = units[:head_start], units[head_start:]

    # blocks; a model without any (VGG, AlexNet, a plain Sequential) uses its parameterised units
    blocks = [i for i, u in enumerate(body) if u.block]
    if not blocks:
        blocks = [i for i, u in enumerate(body) if u.params]
        for i in blocks:
            body[i].block = True
    if not blocks:
        st.stem = body
        return st

    # stem: units before the first block whose class repeats (a one-off composite stem is still stem)
    counts: dict[str, int] = {}
    for i in blocks:
        counts[body[i].cls] = counts.get(body[i].cls, 0) + 1
    first = next((i for i in blocks if counts[body[i].cls] >= 2), blocks[0])
    st.stem = body[:first]

    # stages: a block whose output resolution differs from the previous block's opens a new stage;
    # units between two blocks go with the next block; units after the last block (tail) with the last stage
    stages, cur, pending, prev = [], [], [], None
    for u in body[first:]:
        if not u.block or (complete and not u.executed):  # never called (an auxiliary head): goes along
            pending.append(u)
            continue
        if prev is not None:
            if u.res is not None and prev.res is not None:
                new = u.res != prev.res
            else:
                new = _parent(u) != _parent(prev)
            if new:
                stages.append(cur)
                cur = []
        cur += pending + [u]
        pending, prev = [], u
    stages.append(cur + pending)
    st.stages = stages
    return st


# ----------------------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------------------
def _merge(groups: list[tuple[str, list]], k: int) -> list[tuple[str, list]]:
    "Merge neighbouring (name, items) groups into `k` groups, as evenly (by count) as possible."
    n = len(groups)
    if k > n:
        raise ValueError(f"asked for {k} groups but the structure gives at most {n}")
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    out, i = [], 0
    for s in sizes:
        part = groups[i:i + s]
        i += s
        name = part[0][0] if len(part) == 1 else f"{part[0][0]}-{part[-1][0]}"
        out.append((name, [x for _, xs in part for x in xs]))
    return out


def _block_groups(st: Structure) -> list[tuple[str, list]]:
    groups, cur = [], []
    for stage in st.stages:
        for u in stage:
            cur.append(u)
            if u.block:
                groups.append((u.name or u.cls, cur))
                cur = []
    if cur:  # tail after the last block
        if groups:
            groups[-1] = (groups[-1][0], groups[-1][1] + cur)
        else:
            groups.append(("body", cur))
    return groups


def _timm_snap(model: nn.Module, groups: list[list[nn.Parameter]], coarse: bool,
               has_head: bool) -> tuple[list[list[nn.Parameter]], list[set]]:
    """Never cut a group of timm's own `group_matcher`: params of a timm group split across ours move together.
    Returns the new groups and, for each, the indices of the groups its parameters came from."""
    last = len(groups) - 1 if has_head else None
    roots, inside = [], set()
    for name, m in model.named_modules():
        if name in inside or any(name.startswith(r + ".") for r, _ in roots if r):
            continue
        if callable(getattr(m, "group_matcher", None)) and hasattr(m, "default_cfg"):
            roots.append((name, m))
            if not name:
                break
    unchanged = (groups, [{g} for g in range(len(groups))])
    if not roots:
        return unchanged
    try:
        from timm.models._manipulate import group_with_matcher
    except ImportError:
        return unchanged
    where = {id(p): g for g, ps in enumerate(groups) for p in ps}
    for _, m in roots:
        try:
            lid = group_with_matcher(m.named_parameters(), m.group_matcher(coarse=coarse), reverse=True)
        except Exception:
            continue
        params = dict(m.named_parameters())
        members: dict[int, list] = {}
        for n, g in lid.items():
            members.setdefault(g, []).append(params[n])
        for ps in members.values():
            gs = {where[id(p)] for p in ps if id(p) in where}
            if len(gs) > 1:
                # the classifier stays last (a timm group holding it and a neck goes to the head);
                # otherwise the group holding most of it wins (DenseNet transitions join their dense block)
                size = {g: sum(p.numel() for p in ps if where.get(id(p)) == g) for g in gs}
                target = last if last in gs else max(sorted(gs), key=lambda g: size[g])
                for p in ps:
                    if id(p) in where:
                        where[id(p)] = target
    out: list[list] = [[] for _ in groups]
    sources: list[set] = [set() for _ in groups]
    for g, ps in enumerate(groups):
        for p in ps:
            out[where[id(p)]].append(p)
            sources[where[id(p)]].add(g)
    return out, sources


def auto_splitter(model: nn.Module, *, granularity: str = "stage", n_groups: Optional[int] = None) -> ParamGroups:
    """Parameter groups for any CNN, body to head, as a fastai splitter.

    `granularity`: `"stage"` (stem, one group per stage, head), `"fastai"` (early body, late body, head) or
    `"block"` (stem, one group per block, head). `n_groups=k` merges neighbouring groups of that granularity
    into exactly `k` (a `ValueError` if the structure gives fewer). Use `functools.partial` to pass options:

    >>> from torchvision.models import resnet18
    >>> auto_splitter(resnet18()).names
    ['stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head']
    >>> learn = Learner(dls, model, splitter=partial(auto_splitter, granularity="fastai"))  # doctest: +SKIP
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if n_groups is not None and (not isinstance(n_groups, int) or isinstance(n_groups, bool) or n_groups < 1):
        raise ValueError(f"n_groups must be a positive int, got {n_groups!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"auto_splitter takes a model (nn.Module), got {type(model).__name__}")
    model = unwrap_model(model)
    st = find_structure(model)
    if not any(u.params for u in st.units):
        raise ValueError(f"{type(model).__name__} has no parameters: there is nothing to split")
    if not st.traced:
        warnings.warn(f"auto_splitter could not run {type(model).__name__} on the meta device (its forward failed "
                      "there, or it has none): groups follow the registration order of its modules and the head is "
                      "guessed from the last top-level child; check them (find_structure) or pass a splitter",
                      stacklevel=2)

    stem = [("stem", st.stem)] if any(u.params for u in st.stem) else []
    if granularity == "block" or (granularity == "fastai" and len(st.stages) < 2):
        body = stem + _block_groups(st)
    else:
        body = stem + [(f"stage{i + 1}", s) for i, s in enumerate(st.stages)]
    head = [("head", st.head)] if any(u.params for u in st.head) else []
    named = [(n, [p for u in us for p in u.params]) for n, us in body + head]
    # timm models declare their own grouping: never cut one of its groups (then merge, which cannot cut either)
    snapped, sources = _timm_snap(model, [g for _, g in named], coarse=granularity != "block", has_head=bool(head))
    emptied = {i for i, g in enumerate(snapped) if not g}
    names = []
    for i, src in enumerate(sources):  # a group that absorbed a whole emptied group takes its name too
        span = sorted({i} | (src & emptied))
        names.append(named[span[0]][0] if len(span) == 1 else f"{named[span[0]][0]}-{named[span[-1]][0]}")
    named = [(n, g) for n, g in zip(names, snapped) if g]
    body, head = (named[:-1], named[-1:]) if head and named[-1][0].endswith("head") else (named, [])

    if granularity == "fastai":
        body = _merge(body, min(2, len(body)))
    named = body + head
    if n_groups is not None:
        if n_groups > len(named):
            raise ValueError(f"n_groups={n_groups} is more than {type(model).__name__} can give at granularity "
                             f"{granularity!r}: at most {len(named)} ({', '.join(n for n, _ in named)})")
        named = _merge(body, n_groups - 1) + head if head and n_groups >= 2 else _merge(named, n_groups)
    return ParamGroups([g for _, g in named], names=_unique([n for n, _ in named]))


def _unique(names: list[str]) -> list[str]:
    "Names made unique: a later duplicate gets `_2`, `_3`, ... (the generated 'stem' and 'head' keep theirs)."
    out, seen = [], set()
    fixed = {i for i, n in enumerate(names) if (i == 0 and n == "stem") or (i == len(names) - 1 and n == "head")}
    taken = {names[i] for i in fixed}
    for i, n in enumerate(names):
        name, k = n, 2
        while i not in fixed and (name in seen or name in taken):
            name, k = f"{n}_{k}", k + 1
        seen.add(name)
        out.append(name)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def check_groups(model: nn.Module, groups: Any) -> None:
    """Raise `ValueError` naming every missing or duplicated parameter, every item that is not an
    `nn.Parameter` and every empty group in a splitter's output `groups` for `model`.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> check_groups(m, [list(m[0].parameters())])
    Traceback (most recent call last):
    ...
    ValueError: bad parameter groups for Sequential: missing (never trained): 1.weight, 1.bias
    """
    model = unwrap_model(model)
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    problems, count = [], {}
    if isinstance(groups, (nn.Parameter, torch.Tensor)) or not hasattr(groups, "__iter__"):
        raise ValueError(f"bad parameter groups for {type(model).__name__}: expected a list of lists of "
                         f"parameters, got {type(groups).__name__}")
    groups = list(groups)
    if not groups:
        problems.append("no groups at all")
    for g, grp in enumerate(groups):
        if isinstance(grp, (nn.Module, torch.Tensor)) or not isinstance(grp, (list, tuple)) and \
                not type(grp).__name__ == "L":
            problems.append(f"group {g} is a {type(grp).__name__}, not a list of parameters")
            continue
        if len(grp) == 0:
            problems.append(f"group {g} is empty")
        for k, p in enumerate(grp):
            if not isinstance(p, nn.Parameter):
                problems.append(f"group {g} item {k} is a {type(p).__name__}, not an nn.Parameter")
                continue
            count[id(p)] = count.get(id(p), 0) + 1
            if id(p) not in names:
                problems.append(f"group {g} item {k} is not a parameter of this model")
    missing = [n for i, n in names.items() if i not in count]
    dup = [names.get(i, "?") for i, c in count.items() if c > 1]
    if missing:
        problems.append("missing (never trained): " + ", ".join(missing))
    if dup:
        problems.append("duplicated (stepped twice): " + ", ".join(dup))
    if problems:
        raise ValueError(f"bad parameter groups for {type(model).__name__}: " + "; ".join(problems))


def checked(splitter: Callable) -> Callable:
    """Wrap any splitter so that its output is validated by `check_groups` when fastai creates the optimizer.

    >>> learn = Learner(dls, model, splitter=checked(my_splitter))  # doctest: +SKIP
    """
    @functools.wraps(splitter)
    def _checked(model):
        groups = splitter(model)
        check_groups(model, groups)
        return groups
    return _checked
