"""Parameter groups for any CNN, built from its structure (`structure.py`): stem, stages, head.

Groups per granularity:

- `"stage"`: stem, one group per stage, head (no stem group when the model has none: AlexNet, VGG);
- `"fastai"`: early body, late body, head (fastai's `_resnet_split` / `_densenet_split` on their models);
- `"block"`: stem, one group per block, head.

`auto_splitter` returns a `ParamGroups` (a list of lists of `nn.Parameter` with `.names`), usable as a fastai
`splitter`. `check_groups` validates any splitter's output; `checked(splitter)` validates it in a Learner.
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ._utils import unwrap_model
from .structure import Structure, Unit, find_structure

__all__ = ["ParamGroups", "auto_splitter", "check_groups", "checked", "group_names", "learner_group_names",
           "GRANULARITIES"]

GRANULARITIES = ("stage", "fastai", "block")


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

    def __repr__(self) -> str:
        "`ParamGroups(6 groups: stem (3 tensors, 9,536), stage1 (...), ..., head (2 tensors, 2,049,000))`"
        parts = [f"{n} ({len(g)} tensor{'s' * (len(g) != 1)}, {sum(p.numel() for p in g):,})"
                 for n, g in zip(self.names, self)]
        if len(parts) > 12:
            parts = parts[:10] + [f"... {len(parts) - 11} more"] + parts[-1:]
        return f"ParamGroups({len(self)} groups: {', '.join(parts)})"


def group_names(groups: Sequence) -> list[str]:
    """The names of `groups` (`ParamGroups.names`), else `group0`, `group1`, ...

    >>> group_names([[], []])
    ['group0', 'group1']
    """
    names = getattr(groups, "names", None)
    if names is not None and len(names) == len(groups):
        return list(names)
    return [f"group{i}" for i in range(len(groups))]


def learner_group_names(learn) -> list[str]:
    """The name of each parameter group of `learn.opt`, body to head: recorded on the optimizer when it is made
    (`GroupLearner`); for a plain fastai `Learner`, found once per optimizer by running its splitter and matching
    the groups by identity (`auto_splitter` names its groups); else `group0`, `group1`, ...

    >>> learner_group_names(Learner(dls, model, splitter=auto_splitter))  # doctest: +SKIP
    ['stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head']
    """
    opt = learn.opt
    names = getattr(opt, "group_names", None)
    if names is None or len(names) != len(opt.param_lists):
        names = opt.group_names = _matched_names(learn)
    return list(names)


def _matched_names(learn) -> list[str]:
    pls = learn.opt.param_lists
    default = group_names(pls)
    try:
        groups = learn.splitter(learn.model)
    except Exception as e:
        warnings.warn(f"could not name the parameter groups: the learner's splitter failed when called again "
                      f"({type(e).__name__}: {e}); they are called group0, group1, ...", stacklevel=3)
        return default
    if not isinstance(groups, Sequence) or len(groups) != len(pls):
        return default
    for g, pg in zip(groups, pls):
        if not isinstance(g, (list, tuple)) or len(g) != len(pg) or any(a is not b for a, b in zip(g, pg)):
            return default
    return group_names(groups)


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


def _timm_members(model: nn.Module, coarse: bool) -> list[list[nn.Parameter]]:
    """The parameter groups timm's own `group_matcher` declares for `model` (and for any timm model inside it, as a
    body), each a list of parameters; [] for a model that is not timm's.

    >>> [len(g) for g in _timm_members(instantiate("timm:resnet18"), coarse=True)][:2]  # doctest: +SKIP
    [3, 12]
    """
    roots, inside = [], set()
    for name, m in model.named_modules():
        if name in inside or any(name.startswith(r + ".") for r, _ in roots if r):
            continue
        if callable(getattr(m, "group_matcher", None)) and hasattr(m, "default_cfg"):
            roots.append((name, m))
            if not name:
                break
    if not roots:
        return []
    try:
        from timm.models._manipulate import group_with_matcher
    except ImportError:
        return []
    out = []
    for name, m in roots:
        try:
            try:
                matcher = m.group_matcher(coarse=coarse)
            except (AssertionError, NotImplementedError):   # no coarse grouping (RDNet): its fine groups, then
                matcher = m.group_matcher(coarse=False)
            lid = group_with_matcher(m.named_parameters(), matcher, reverse=True)
        except Exception as e:
            warnings.warn(f"auto_splitter: timm's group_matcher of {type(m).__name__} ({name or 'the model'}) failed "
                          f"({type(e).__name__}: {e}); its groups are not checked against timm's. Pass your own "
                          "splitter if they must follow timm's grouping", stacklevel=4)
            continue
        params = dict(m.named_parameters())
        members: dict[int, list] = {}
        for n, g in lid.items():
            members.setdefault(g, []).append(params[n])
        out += list(members.values())
    return out


def _components(sets: list[list[nn.Parameter]]) -> list[list[nn.Parameter]]:
    """Overlapping parameter sets joined (union-find by identity): what must end in one group.

    >>> a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    >>> [len(s) for s in _components([[a, b], [b, c], [c]])]
    [3]
    """
    parent: dict[int, int] = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k
    for ps in sets:
        for p in ps[1:]:
            parent[find(id(p))] = find(id(ps[0]))
    out: dict[int, dict] = {}
    for ps in sets:
        for p in ps:
            out.setdefault(find(id(p)), {})[id(p)] = p
    return [list(d.values()) for d in out.values()]


def _snap(groups: list[list[nn.Parameter]], ties: list[list[nn.Parameter]],
          classifier: list) -> tuple[list[list[nn.Parameter]], list[set]]:
    """Never cut a tie (a group of timm's own `group_matcher`, blocks sharing a module): the parameters of a tie
    split across our groups move together: to the head when the tie holds the `classifier` (the head's last
    parameters: they stay last), to the first group when it holds some (the input layer stays first: VOLO's
    `pos_embed`, added after `network.1`, stays in timm's stem with the patch embedding), else to the group holding
    most of them (DenseNet transitions join their dense block). Returns the new groups and, for each, the indices of the groups its parameters came from."""
    last = len(groups) - 1
    where = {id(p): g for g, ps in enumerate(groups) for p in ps}
    clf = {id(p) for p in classifier}
    for ps in _components(ties):
        gs = {where[id(p)] for p in ps if id(p) in where}
        if len(gs) > 1:
            size = {g: sum(p.numel() for p in ps if where.get(id(p)) == g) for g in gs}
            held = last in gs and any(id(p) in clf for p in ps)
            target = last if held else 0 if 0 in gs else max(sorted(gs), key=lambda g: size[g])
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
    if not st.has_params:
        raise ValueError(f"{type(model).__name__} has no parameters: there is nothing to split")
    if not st.traced:
        warnings.warn(f"auto_splitter could not run {type(model).__name__} on the meta device (its forward failed "
                      "there, or it has none): groups follow the registration order of its modules and the head is "
                      "guessed from the last top-level child; check them (find_structure) or pass a splitter",
                      stacklevel=2)
    hit = st.memo.get((granularity, n_groups))  # warm call: the same groups, fresh lists
    if hit is not None:
        return ParamGroups([list(g) for g in hit.values()], names=list(hit))

    stem = [("stem", st.stem)] if any(u.params for u in st.stem) else []
    if granularity == "block" or (granularity == "fastai" and len(st.stages) < 2):
        body = stem + _block_groups(st)
    else:
        body = stem + [(f"stage{i + 1}", s) for i, s in enumerate(st.stages)]
    head = [("head", st.head)] if any(u.params for u in st.head) else []
    named = [(n, [p for u in us for p in u.params]) for n, us in body + head]
    # timm models declare their own grouping and blocks may share a module: never cut one (merging cannot either)
    ties = _timm_members(model, coarse=granularity != "block") + [[p for u in t for p in u.params] for t in st.ties]
    classifier = next((u.params for u in reversed(st.head) if u.params), []) if head else []
    snapped, sources = _snap([g for _, g in named], ties, classifier)
    emptied = {i for i, g in enumerate(snapped) if not g}
    names = []
    for i, src in enumerate(sources):  # a group that absorbed a whole emptied group takes its name too
        span = sorted({i} | (src & emptied))
        names.append(named[span[0]][0] if len(span) == 1 else f"{named[span[0]][0]}-{named[span[-1]][0]}")
    named = [(n, g) for n, g in zip(names, snapped) if g]
    body, head = (named[:-1], named[-1:]) if head and named[-1][0].endswith("head") else (named, [])
    if granularity != "block" and all(n == "head" for n, _ in head):   # (a head that absorbed stages: as found)
        body = _own_names(model, body)

    if granularity == "fastai":
        body = _merge(body, min(2, len(body)))
    named = body + head
    if n_groups is not None:
        if n_groups > len(named):
            raise ValueError(f"n_groups={n_groups} is more than {type(model).__name__} can give at granularity "
                             f"{granularity!r}: at most {len(named)} ({', '.join(n for n, _ in named)})")
        named = _merge(body, n_groups - 1) + head if head and n_groups >= 2 else _merge(named, n_groups)
    groups = ParamGroups([g for _, g in named], names=_unique([n for n, _ in named]))
    st.memo[(granularity, n_groups)] = dict(zip(groups.names, [list(g) for g in groups]))
    return groups


_OWN = re.compile(r"(?:^|\.)(?:stages\.(\d+)|stage(\d+)|layer(\d+))(?:\.|$)")


def _own_names(model: nn.Module, body: list[tuple[str, list]]) -> list[tuple[str, list]]:
    """Stage groups named by the model's own stage numbering where it has one: parameters under timm's `stages.N`,
    HuggingFace's `encoder.stages.N`, torchvision's `layerN` or HRNet's `stageN` are in stage N, and a group is
    `stageN` (or `stageA-stageB`) after the stages it holds, `stem-stageN` when it also holds what comes before
    them. Used only when every group but a leading stem holds some, and no stage is split across groups; otherwise
    the groups keep their names (`stageK`: the K-th run of blocks at one resolution, counted from 1).

    >>> [n for n, _ in _own_names(timm.create_model("efficientvim_m2"), ...)]  # doctest: +SKIP
    ['stem', 'stage0', 'stage1-stage2']
    """
    names = {id(p): n for n, p in model.named_parameters()}
    own = []
    for _, ps in body:
        found = [_OWN.search(names.get(id(p), "")) for p in ps]
        own.append((sorted({int(next(g for g in m.groups() if g is not None)) for m in found if m}),
                    any(m is None for m in found)))
    if len(own) < 2 or any(not nums for nums, _ in own[1:]) or \
            any(a[0][-1] >= b[0][0] for a, b in zip(own, own[1:]) if a[0]):
        return body
    out = []
    for i, ((name, ps), (nums, other)) in enumerate(zip(body, own)):
        stages = "" if not nums else f"stage{nums[0]}" + (f"-stage{nums[-1]}" if nums[-1] != nums[0] else "")
        stem = "stem" if i == 0 and (other or not nums) else ""
        out.append(("-".join(x for x in (stem, stages) if x), ps))
    return out


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
    >>> check_groups(m, [list(m[0].parameters())])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: bad parameter groups for Sequential: missing (never trained): 1.weight, 1.bias; fix the splitter: ...
    """
    model = unwrap_model(model)
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    problems, count = [], {}
    if isinstance(groups, (nn.Parameter, torch.Tensor)) or not hasattr(groups, "__iter__"):
        raise ValueError(f"bad parameter groups for {type(model).__name__}: expected a list of lists of "
                         f"parameters, got {type(groups).__name__}. Return [list(a.parameters()), ...] from the "
                         "splitter")
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
        raise ValueError(f"bad parameter groups for {type(model).__name__}: " + "; ".join(problems) +
                         "; fix the splitter: it must return lists of the model's parameters, each in exactly one")


def checked(splitter: Callable) -> Callable:
    """Wrap any splitter so that its output is validated by `check_groups` when fastai creates the optimizer.
    A splitter that yields its groups (a generator, as plain fastai accepts) is read once: the wrapped splitter
    returns them as a list (a `ParamGroups` is returned as it is, names kept).

    >>> learn = Learner(dls, model, splitter=checked(my_splitter))  # doctest: +SKIP
    >>> len(checked(lambda m: (list(c.parameters()) for c in m.children()))(nn.Sequential(nn.Linear(2, 2))))
    1
    """
    @functools.wraps(splitter)
    def _checked(model):
        groups = splitter(model)
        if not isinstance(groups, (list, tuple, nn.Parameter, torch.Tensor)) and type(groups).__name__ != "L" \
                and hasattr(groups, "__iter__"):
            groups = list(groups)          # a generator: read it once, check and return the same lists
        check_groups(model, groups)
        return groups
    return _checked
