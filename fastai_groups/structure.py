"""The structure of any CNN: stem, stages and head, from the module tree and one meta-device trace.

The model is cut into *units*: containers and whole models are opened, blocks (residual, inverted-residual,
transformer, dense layers, ...) are kept whole; a module whose own forward merges several paths (a residual add, a
concat of branches: seen by the trace) is a block, never opened. One forward pass on meta tensors (no memory, no
data; `_meta.meta_trace`) gives the forward order of the units (first call, or first use of their parameters: a
root `logit_scale` read on the logits goes last) and the resolution of their outputs: a block that changes the
resolution opens a new stage. Units after the last feature map form the head. When the trace stops early, the
units it did not reach are placed by registration order (those registered before the input layer last), with a
warning naming them. `find_structure(model)` returns a `Structure`; the splitters build groups from it.
"""
from __future__ import annotations

import functools
import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ._meta import Trace, meta_trace
from ._utils import CONTAINERS, NORMS
from .arch import instantiate

__all__ = ["Unit", "Structure", "find_structure", "forget_structure"]


# ----------------------------------------------------------------------------------------------------------------
# Units: the atoms a split never cuts
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Unit:
    """An atomic piece of the model: a module kept whole, or the parameters registered directly on an opened module.

    >>> find_structure("resnet18").stages[0][0]  # doctest: +SKIP
    Unit('layer1.0', BasicBlock, block, 6 tensors, 73,984 elements, res=3136)
    """
    name: str                         # qualified name ('' for the root's own parameters)
    module: Optional[nn.Module]       # None for direct parameters
    params: list                      # parameters first owned by this unit, in registration order
    block: bool = False               # a block (residual, transformer, dense layer, ...), kept whole
    cls: str = ""                     # class name of the module
    order: float = math.inf           # forward order (first call)
    res: Optional[int] = None         # spatial size (H*W, or tokens) of its output; None if pooled/unknown
    executed: bool = False
    shared: list = field(default_factory=list, repr=False)  # parameters it holds that another unit owns

    def __repr__(self) -> str:
        "`Unit('layer1.0', Bottleneck, block, 12 tensors, 75,008 elements, res=3136)`: no module, no tensors."
        kind = "block" if self.block else "layer" if self.module is not None else "direct params"
        res = f", res={self.res}" if self.res is not None else ""
        n = len(self.params)
        return (f"Unit({self.name!r}, {self.cls}, {kind}, {n} tensor{'s' * (n != 1)}, "
                f"{sum(p.numel() for p in self.params):,} elements{res})")


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
            return not any(isinstance(d, NORMS) for d in m.modules() if d._parameters)
        return True

    def count_blocks(self, m: nn.Module) -> int:
        """Blocks directly reachable below `m`: containers count by their contents, and so does a child that
        itself holds 2+ blocks; any other child counts 1 if it is a block."""
        k = id(m)
        if k not in self.nblocks:
            total = 0
            for c in m.children():
                inner = self.count_blocks(c)
                total += inner if (inner >= 2 or isinstance(c, CONTAINERS)) else int(self.is_block(c))
            self.nblocks[k] = total
        return self.nblocks[k]

    def model_like(self, m: nn.Module) -> bool:
        """A whole model rather than a block: it holds 2+ blocks, or a container of 3+ parameterised layers
        (VGG's `features`). A body wrapped as Sequential(body, head) is opened like the root when model-like."""
        if self.count_blocks(m) >= 2:
            return True
        return any(isinstance(d, CONTAINERS) and sum(self.param_owners(c) > 0 for c in d.children()) >= 3
                   for d in m.modules())

    def opens(self, m: nn.Module, root: bool, in_sequence: bool = False) -> bool:
        """Is `m` opened into its children, or kept whole? Opened: the root, plain containers, container
        subclasses that hold blocks (a DenseNet dense block, a RegNet stage), stage wrappers (a module with a
        container of 2+ blocks), and modules holding 2+ blocks that are not themselves an element of a sequence
        (a block in a sequence stays whole even when it holds sub-blocks, such as RepViT's token/channel mixers)."""
        if not m._modules:
            return False
        if root or type(m) in CONTAINERS:
            return True
        n = self.count_blocks(m)
        if isinstance(m, CONTAINERS):
            return n >= 1
        if any(isinstance(c, CONTAINERS) and self.count_blocks(c) >= 2 for c in m.children()):
            return True
        return n >= 2 and not in_sequence


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _units(model: nn.Module, merging: frozenset = frozenset()) -> list[Unit]:
    """The units of `model`, in registration order. `merging`: ids of the modules whose forward merges several paths
    (from the meta trace): blocks, never opened unless they are the root, a whole model or a container."""
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
        merges = id(m) in merging and not wrapper and not isinstance(m, CONTAINERS)
        if not merges and shape.opens(m, wrapper, in_sequence):
            direct = own(m._parameters.values())
            for p in direct:  # one unit each: a root's cls_token is read first, its logit_scale / proj last
                units.append(Unit(name, None, [p], cls=type(m).__name__))
            before = bool(direct)
            for cname, c in m.named_children():
                n = _numel(c)
                dominant = wrapper and not before and n > 0 and not isinstance(c, CONTAINERS) and \
                    shape.model_like(c)
                before = before or n > 0
                visit(c, f"{name}.{cname}" if name else cname, dominant, isinstance(m, CONTAINERS))
        else:
            block = shape.is_block(m) or merges and shape.param_owners(m) >= 2
            ps = list(m.parameters())
            mine = own(ps)
            ids = {id(p) for p in mine} if len(mine) < len(ps) else None
            shared = [p for p in ps if id(p) not in ids] if ids is not None else []
            units.append(Unit(name, m, mine, block=block, cls=type(m).__name__, shared=shared))

    visit(model, "", True)
    return units


# ----------------------------------------------------------------------------------------------------------------
# Forward order, from the meta trace
# ----------------------------------------------------------------------------------------------------------------
def _place(units: list[Unit], rec: Trace) -> tuple[list[Unit], list[str]]:
    """Fill the units from the trace and sort them in forward order: a unit's place is its module's first call or
    the first use of one of its parameters, whichever comes first (a root `logit_scale` used on the logits goes
    after the classifier; a module never called whose parameters are read goes where they are read). Units the
    trace never reached keep their place after the unit registered before them; after a partial trace, those
    registered before the first unit called (a classifier declared first) go last. Returns the sorted units and,
    after a partial trace, a description of the units that had to be placed."""
    for u in units:
        first = [rec.used[id(p)] for p in u.params if id(p) in rec.used]
        if u.module is not None and id(u.module) in rec.order:
            first.append(rec.order[id(u.module)])
            u.res = rec.res.get(id(u.module))
        u.executed = bool(first)
        u.order = min(first) if first else math.inf
    partial = rec.how != "complete"
    ran = [(u.order, i) for i, u in enumerate(units) if u.executed and u.params]
    anchor = min(ran)[1] if ran else None  # the first parametrised unit called: the input layer
    keyed, last, k, before_first, placed = [], -math.inf, 0, [], []
    for i, u in enumerate(units):
        if u.executed:
            last, k = u.order, 0
            keyed.append(((u.order, 0, i), u))
        elif partial and anchor is not None and i < anchor and u.params:
            before_first.append(u)
            keyed.append(((math.inf, 1, i), u))
        else:
            k += 1
            keyed.append(((last, k, i), u))
            if partial and u.params:
                placed.append(u)
    out = [u for _, u in sorted(keyed, key=lambda t: t[0])]
    notes = []
    if partial and anchor is None:
        notes.append("none of its parametrised modules ran: all follow registration order")
    elif partial and placed:
        notes.append("placed after the module registered before them: " + ", ".join(u.name for u in placed))
    if before_first:
        notes.append(f"registered before {units[anchor].name or 'the root'} (the first one called), so put last, "
                     "with the head: " + ", ".join(u.name or "<root>" for u in before_first))
    return out, notes


def _share(units: list[Unit]) -> tuple[list[Unit], list[list[Unit]]]:
    """Modules used in several places (timm's coat: conv position encodings registered on the root and called inside
    every block of a stage) go where they are first used: each shared parameter moves to the unit, among those holding
    it, that runs first. A block that also holds it is tied to that unit (a split that separated them would cut the
    block). Units left without parameters by a move are dropped. Returns the units (forward order kept) and the ties.

    >>> _share(find_structure("timm:coat_lite_tiny").units)[1][0]  # doctest: +SKIP
    [Unit('serial_blocks1.0', SerialBlock, block, ...), Unit('serial_blocks1.1', SerialBlock, block, ...)]
    """
    holders: dict[int, list[Unit]] = {}
    for u in units:
        for p in u.shared:
            holders.setdefault(id(p), []).append(u)
    if not holders:
        return units, []
    owner = {id(p): u for u in units for p in u.params if id(p) in holders}
    rank = {id(u): i for i, u in enumerate(units)}
    parent = {id(u): u for u in units}

    def root(u):
        while parent[id(u)] is not u:
            u = parent[id(u)]
        return u
    emptied = set()
    for k, users in holders.items():
        first = min([owner[k]] + users, key=lambda u: rank[id(u)])
        if first is not owner[k]:
            p = next(q for q in owner[k].params if id(q) == k)
            owner[k].params = [q for q in owner[k].params if id(q) != k]
            first.params.append(p)
            emptied.add(id(owner[k]))
        for u in users + [owner[k]]:
            if u is not first and u.block and (u.params or id(u) not in emptied):
                parent[id(root(u))] = root(first)
    units = [u for u in units if u.params or id(u) not in emptied]
    ties: dict[int, list[Unit]] = {}
    for u in units:
        ties.setdefault(id(root(u)), []).append(u)
    return units, [t for t in ties.values() if len(t) > 1]


# ----------------------------------------------------------------------------------------------------------------
# Structure: stem, stages, tail, head
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Structure:
    """Where the stem, stages and head of a model are (lists of units, in forward order): `find_structure`.

    >>> find_structure("resnet18")  # doctest: +SKIP
    Structure(stem=[conv1, bn1, relu, maxpool], stages=4 (2, 2, 2, 2 units), head=[avgpool, fc], traced=complete)
    """
    units: list
    stem: list = field(default_factory=list)
    stages: list = field(default_factory=list)   # list of lists of units
    head: list = field(default_factory=list)
    ties: list = field(default_factory=list)     # lists of units a split keeps together (they share a module)
    traced: bool = False      # a forward on meta tensors ran (at least partly)
    complete: bool = False    # ... and ran to the end
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # the splitters' groups, per options

    @functools.cached_property
    def has_params(self) -> bool:
        return any(u.params for u in self.units)

    @property
    def blocks(self) -> list:
        return [u for s in self.stages for u in s if u.block]

    def n_params(self, units) -> int:
        return sum(p.numel() for u in units for p in u.params)

    def __repr__(self) -> str:
        """`Structure(stem=[conv1, bn1, relu, maxpool], stages=4 (3, 4, 6, 3 units), head=[avgpool, fc],
        traced=complete)`: unit names and counts (a unit's own repr has its class and size)."""
        def names(units, k=6):
            shown = [u.name or "<root>" for u in units[:k]]
            return "[" + ", ".join(shown) + (f", ... ({len(units) - k} more)" if len(units) > k else "") + "]"
        sizes = tuple(len(s) for s in self.stages)
        sizes = ", ".join(map(str, sizes[:12])) + (", ..." if len(sizes) > 12 else "")
        traced = "complete" if self.complete else "partial" if self.traced else "no"
        return (f"Structure(stem={names(self.stem)}, stages={len(self.stages)} ({sizes} units), "
                f"head={names(self.head)}, traced={traced})")


def _root_name(u: Unit) -> str:
    return u.name.split(".", 1)[0]


def _parent(u: Unit) -> str:
    return u.name.rsplit(".", 1)[0] if "." in u.name else ""


def find_structure(model: Any) -> Structure:
    """Stem, stages and head of `model` (any `arch` accepted by `instantiate`), without touching its weights.
    Cached per model object until the model changes (`_Cached`): a warm call costs microseconds.

    >>> s = find_structure("resnet18"); [u.name for u in s.stem], len(s.stages), [u.name for u in s.head]
    (['conv1', 'bn1', 'relu', 'maxpool'], 4, ['avgpool', 'fc'])
    """
    model = instantiate(model)
    hit = _CACHE.get(model)
    if hit is not None and hit.valid(model):
        return hit.st
    st = _find_structure(model)
    _remember(model, st)
    return st


class _Cached:
    """A structure cached for one model, and what tells it is still the model's: registering a module, parameter or
    buffer anywhere in the model (`model.fc = nn.Linear(...)`, `model.layer1[0] = ...`, `add_module`,
    `register_parameter`: torch's global registration hooks, `_registered`) drops it at once; at each call the
    model's own children and its first and last parameter slots are compared (`del model.fc`, `to_empty()` and other
    conversions that rebuild the parameters). Edits behind `nn.Module`'s back below the root (writing `_modules`
    directly) are not seen: `forget_structure(model)`."""

    __slots__ = ("st", "children", "ends")

    def __init__(self, model: nn.Module, st: Structure):
        owners = [m for m in model.modules() if m._parameters]
        self.st, self.children = st, tuple(model._modules.values())
        self.ends = [(m._parameters, n, p) for m in dict.fromkeys(owners[:1] + owners[-1:])
                     for n, p in m._parameters.items()]

    def valid(self, model: nn.Module) -> bool:
        return tuple(model._modules.values()) == self.children and all(d.get(n) is p for d, n, p in self.ends)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, _Cached]" = weakref.WeakKeyDictionary()
_WATCH: dict[int, dict] = {}   # id(module) -> {id(model): weakref(model)} for every cached model holding it
_FINAL: "weakref.WeakKeyDictionary[nn.Module, weakref.finalize]" = weakref.WeakKeyDictionary()
_HOOKS: list = []
_LOCK = threading.RLock()   # re-entrant: a model's finalizer (_unwatch) may run during a garbage collection


def _registered(module: nn.Module, name: str, value: Any) -> None:
    "Torch's registration hook: a module, parameter or buffer was set on `module`; models holding it are re-traced."
    refs = _WATCH.get(id(module))
    if refs:
        with _LOCK:
            stale = [r() for r in list(refs.values())]
        for m in stale:
            if m is not None:
                _CACHE.pop(m, None)
    return None


def _remember(model: nn.Module, st: Structure) -> None:
    "Cache `st` for `model` and watch its modules (hooks installed on first use; entries removed with the model)."
    with _LOCK:
        if not _HOOKS:
            from torch.nn.modules import module as _mod
            _HOOKS.extend([_mod.register_module_module_registration_hook(_registered),
                           _mod.register_module_parameter_registration_hook(_registered),
                           _mod.register_module_buffer_registration_hook(_registered)])
    old = _FINAL.get(model)
    if old is not None:
        old()                                   # the previous structure's watch entries go now
    ids, key, ref = [id(m) for m in model.modules()], id(model), weakref.ref(model)
    with _LOCK:
        for i in ids:
            _WATCH.setdefault(i, {})[key] = ref
    _CACHE[model] = _Cached(model, st)
    _FINAL[model] = weakref.finalize(model, _unwatch, ids, key)


def _unwatch(ids: list, key: int) -> None:
    with _LOCK:
        for i in ids:
            d = _WATCH.get(i)
            if d is not None:
                d.pop(key, None)
                if not d:
                    del _WATCH[i]


def forget_structure(model: nn.Module) -> None:
    """Drop the structure cached for `model` (after editing its module tree behind `nn.Module`'s back).

    >>> m = nn.Sequential(nn.Linear(2, 2)); _ = find_structure(m); forget_structure(m); m in _CACHE
    False
    """
    _CACHE.pop(model, None)


def _find_structure(model: nn.Module) -> Structure:
    rec = meta_trace(model)
    units = _units(model, frozenset(rec.merging))
    traced, complete = bool(rec.how), rec.how == "complete"
    units, notes = _place(units, rec)
    units, ties = _share(units)
    st = Structure(units=units, ties=ties, traced=traced, complete=complete)
    if traced and not complete and notes:
        e, msg = rec.error, str(rec.error).splitlines()[0][:120] if str(rec.error) else ""
        where = next((n for n, m in model.named_modules() if m is rec.failed_in), None) if rec.failed_in else None
        warnings.warn(f"auto_splitter: the meta forward of {type(model).__name__} stopped"
                      f"{f' in {where}' if where else ''} ({type(e).__name__}: {msg}); the modules it did not reach "
                      f"were placed by registration order: {'; '.join(notes)}. Check the groups (find_structure) "
                      "or pass a splitter", stacklevel=4)
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
            if seen and any(u.params and (u.executed or not complete) for u in units[h:]):
                head_start = h
    if head_start is None:
        # structural: the last top-level child with parameters, if it holds no block and follows the last block
        last_p = max((i for i, u in enumerate(units) if u.params and (u.executed or not complete)), default=-1)
        top = _root_name(units[last_p]) if last_p >= 0 else ""
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
