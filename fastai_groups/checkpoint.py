"""Checkpoints that resume: fastai's `save`/`load`/`export` files, plus what resuming needs and fastai drops.

Beyond fastai's `{'model': ..., 'opt': ...}`, a checkpoint keeps the groups (names, sizes), the freeze state
(`requires_grad` of every parameter, `opt.frozen_idx`) and the state of every callback that has `state_dict` /
`load_state_dict` (the `GroupLogger` history) and the random states (generators and loaders' shuffling, so that a
resumed fit draws what the uninterrupted one drew). They ride in `state['opt']['fastai_groups']`, which fastai's
`Optimizer.load_state_dict` ignores, so plain fastai loads these files too. (fastai's `save_model`/`load_model`
are not used underneath: the extras must be inside the optimizer state they write, and the grouping must be
checked before anything is loaded.) `GroupLearner.save`, `load` and `export` call these functions.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from fastai.torch_core import num_distrib
from torch import nn

from ._utils import unwrap_model
from .splitters import learner_group_names

__all__ = ["save_checkpoint", "load_checkpoint", "export_state", "restore_export", "CKPT_KEY"]

CKPT_KEY = "fastai_groups"


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


def _read_checkpoint(file, device=None, **kwargs):
    """`_torch_load`, with one line naming `file` when it is empty, not a PyTorch file, or truncated / damaged
    (torch says `EOFError` with no message, `IndexError`, or a zip error without the file name)."""
    import os
    import pickle
    if not isinstance(file, (str, os.PathLike)) or not os.path.isfile(file):
        return _torch_load(file, device, **kwargs)         # buffers, and torch's own error for a missing file
    size = os.path.getsize(file)
    if size == 0:
        raise ValueError(f"{file} is empty (0 bytes), not a checkpoint: the save that wrote it did not finish; "
                         "save again with learn.save, or load another file")
    with open(file, "rb") as f:
        head = f.read(16)
    if not head.startswith((b"PK\x03\x04", b"\x80")):   # torch.save: a zip archive (or, before torch 1.6, a pickle)
        raise ValueError(f"{file} is not a PyTorch checkpoint (it starts with {head!r}); load a file written by "
                         "learn.save or torch.save")
    try:
        return _torch_load(file, device, **kwargs)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise ValueError(f"{file} is truncated or damaged ({size:,} bytes; torch cannot read it: "
                             "UnpicklingError); save it again, or load an earlier checkpoint") from None
        raise ValueError(f"{file} holds Python objects besides weights, which torch.load(weights_only=True) refuses "
                         "(an export .pkl? read it with load_learner); if you trust the file, pass "
                         "weights_only=False") from None
    except (EOFError, RuntimeError, OSError, KeyError, IndexError, ValueError) as e:
        if isinstance(e, RuntimeError) and not any(w in str(e) for w in ("PytorchStreamReader", "EOF", "corrupt")):
            raise                                           # e.g. a CUDA file on a machine without CUDA
        raise ValueError(f"{file} is truncated or damaged ({size:,} bytes; torch cannot read it: {type(e).__name__}); "
                         "save it again, or load an earlier checkpoint") from None


def _sizes(learn) -> list[list[int]]:
    "(tensors, elements) of each parameter group of `learn.opt`."
    return [[len(pg), sum(p.numel() for p in pg)] for pg in learn.opt.param_lists]


def _stateful(learn) -> dict:
    "The callbacks of `learn` that can save and restore their state, by name."
    return {cb.name: cb for cb in learn.cbs
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))}


def _train_state(learn) -> dict:
    "What a checkpoint needs beyond fastai's: groups, freeze state, callback states (plain Python data)."
    return {"names": learner_group_names(learn), "sizes": _sizes(learn),
            "requires_grad": [[bool(p.requires_grad) for p in pg] for pg in learn.opt.param_lists],
            "frozen_idx": int(getattr(learn.opt, "frozen_idx", 0)),
            "callbacks": {name: cb.state_dict() for name, cb in _stateful(learn).items()},
            "random": _random_state(learn)}


def _loaders(learn) -> list:
    "The fastai `DataLoader`s of `learn.dls` (each shuffles with its own `rng`)."
    return [dl for dl in getattr(getattr(learn, "dls", None), "loaders", None) or [] if hasattr(dl, "rng")]


def _random_state(learn) -> dict:
    """Python's, numpy's, torch's (CPU and CUDA) generators (fastai's `get_random_states`) and the `rng` of each of
    `learn.dls`' loaders (their shuffling), as plain data `torch.load(weights_only=True)` reads."""
    from fastai.torch_core import get_random_states
    st = get_random_states()
    kind, keys, pos, has_gauss, gauss = st["numpy_state"]
    return {"random": st["random_state"], "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": st["torch_state"], "cuda": list(st["torch_cuda_state"]),
            "loaders": [dl.rng.getstate() for dl in _loaders(learn)]}


def _restore_random_state(learn, saved: dict) -> None:
    """Put back the generators `_random_state` saved (fastai's `set_random_states`; cudnn flags kept as they are, the
    CUDA states only on as many GPUs) and the loaders' `rng`s (when `learn.dls` has as many loaders)."""
    import numpy as np
    from fastai.torch_core import get_random_states, set_random_states
    now = get_random_states()
    kind, keys, pos, has_gauss, gauss = saved["numpy"]
    cuda = saved["cuda"] if len(saved["cuda"]) == len(now["torch_cuda_state"]) else now["torch_cuda_state"]
    cuda = [t.cpu() for t in cuda]                      # `load(device=...)` maps every tensor there
    set_random_states(random_state=_tuples(saved["random"]),
                      numpy_state=(kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss),
                      torch_state=saved["torch"].cpu(), torch_cuda_state=cuda,
                      torch_deterministic=now["torch_deterministic"], torch_benchmark=now["torch_benchmark"])
    dls = _loaders(learn)
    if len(dls) == len(saved["loaders"]):
        for dl, st in zip(dls, saved["loaders"]):
            dl.rng.setstate(_tuples(st))


def _tuples(x):
    "`random.setstate` needs tuples where a round trip may give lists."
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


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
    "Put back the checkpoint's freeze state and the states of the callbacks that saved one."
    for pg, flags in zip(learn.opt.param_lists, extra["requires_grad"]):
        for p, flag in zip(pg, flags):
            p.requires_grad_(bool(flag))
    learn.opt.frozen_idx = int(extra["frozen_idx"])
    saved = dict(extra.get("callbacks") or {})
    if extra.get("logger") is not None:           # files of fastai_groups 0.1.0
        saved.setdefault("group_logger", extra["logger"])
    for name, cb in _stateful(learn).items():
        if saved.get(name) is not None:
            cb.load_state_dict(saved[name])
    if extra.get("random") is not None and num_distrib() <= 1:   # DDP: each process keeps its own streams
        _restore_random_state(learn, extra["random"])


def save_checkpoint(learn, file, with_opt: bool = True, pickle_protocol: int = 2, **torch_save_kwargs) -> None:
    "Write `learn`'s checkpoint to `file` (rank 0 only): see `GroupLearner.save`."
    from fastai.torch_core import rank_distrib
    if rank_distrib():
        return
    state = unwrap_model(learn.model).state_dict()
    if with_opt and learn.opt is not None:
        state = {"model": state, "opt": {**learn.opt.state_dict(), CKPT_KEY: _train_state(learn)}}
    torch.save(state, file, pickle_protocol=pickle_protocol, **torch_save_kwargs)


def load_checkpoint(learn, file, device: Any = None, with_opt: bool = True, strict: bool = True,
                    **torch_load_kwargs) -> None:
    "Load `file` into `learn`: see `GroupLearner.load`."
    from fastai.torch_core import distrib_barrier
    if device is None and hasattr(learn.dls, "device"):
        device = learn.dls.device
    if learn.opt is None:
        learn.create_opt()
    distrib_barrier()
    state = _read_checkpoint(file, device, **torch_load_kwargs)
    has_opt = isinstance(state, dict) and set(state) == {"model", "opt"}
    extra = state["opt"].pop(CKPT_KEY, None) if has_opt else None
    if with_opt and has_opt:
        _check_grouping(learn, state["opt"], extra, file)
    weights = state["model"] if has_opt else state
    nn.modules.utils.consume_prefix_in_state_dict_if_present(weights, "_orig_mod.")  # fastai's torch.compile saves
    model = unwrap_model(learn.model)
    _check_weights(model, weights, strict, file)
    model.load_state_dict(weights, strict=strict)
    if with_opt and has_opt:
        learn.opt.load_state_dict(state["opt"])
        if extra is not None:
            _restore_train_state(learn, extra)
    elif with_opt:
        warnings.warn("Saved file doesn't contain an optimizer state.")


def _check_weights(model: nn.Module, weights: dict, strict: bool, file) -> None:
    """Refuse, before any tensor is written, weights that do not fit `model`: a tensor of another shape (torch would
    raise only after copying every tensor that fits), or with `strict`, tensors missing or unexpected."""
    own = model.state_dict()
    shapes = [f"{k}: file {tuple(v.shape)}, learner {tuple(own[k].shape)}" for k, v in weights.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in weights] if strict else []
    unexpected = [k for k in weights if k not in own] if strict else []
    if not (shapes or missing or unexpected):
        return
    parts = [f"{len(x)} {what} ({'; '.join(x[:2])}{'; ...' if len(x) > 2 else ''})" for x, what in (
        (shapes, "tensors of another shape"), (missing, "tensors missing"), (unexpected, "unexpected tensors")) if x]
    hint = (" (another number of classes?)" if shapes and all(k.startswith(str(len(model) - 1) + ".") for k in
            (s.split(":")[0] for s in shapes)) and isinstance(model, nn.Sequential) else "")
    raise ValueError(f"checkpoint {file} does not fit this learner's model{hint}: {', '.join(parts)}; nothing was "
                     "loaded: build the learner as the one that saved it")


def export_state(learn) -> Optional[dict]:
    "What `export` keeps of the optimizer (its per-group hypers and `frozen_idx`), None without an optimizer."
    if learn.opt is None:
        return None
    return {"hypers": [dict(h) for h in learn.opt.hypers], "frozen_idx": getattr(learn.opt, "frozen_idx", 0)}


def restore_export(learn, exported: dict) -> None:
    "In `load_learner`: an optimizer with the hypers and `frozen_idx` that `export_state` kept."
    learn.create_opt()
    for h, kept in zip(learn.opt.hypers, exported["hypers"]):
        h.update(kept)
    learn.opt.frozen_idx = exported["frozen_idx"]
