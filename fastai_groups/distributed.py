"""Run fastai's distributed data parallel training (`learn.distrib_ctx()`) in CPU processes (gloo backend).

fastai's own DDP support works with `auto_splitter` and `GroupLogger` as it is on GPUs (nccl): launch the script
with `torchrun --nproc_per_node=N script.py` or `accelerate launch script.py` and train inside
`with learn.distrib_ctx(): ...`. In CPU processes (fastai 2.8.12, accelerate 1.x) it fails three ways:

1. fastai's `DistributedDL._broadcast` (fastai/distributed.py, the line
   `t = LongTensor(t).cuda() # nccl only works with cuda tensors`) moves the shuffled indices to CUDA before
   `torch.distributed.broadcast`: "Found no NVIDIA driver on your system" without a GPU, and gloo wants CPU
   tensors anyway. `patch_cpu_broadcast()` replaces that method with one that broadcasts a CPU tensor when the
   process group's backend is a CPU one (gloo, mpi) or CUDA is unavailable, and calls fastai's own method otherwise,
   so nothing changes on GPUs / nccl. Drop the patch once fastai's `_broadcast` picks the device from the backend.
2. Without `cpu=True` (passed on to `accelerate.Accelerator`) accelerate sets up no process group and no
   `DistributedDataParallel` on a machine without GPU ("'ResNet' object has no attribute 'device'" in
   `DistributedTrainer.before_fit`), and picks nccl on a GPU machine.
3. `distrib_ctx`'s default `sync_bn=True` converts BatchNorm to `nn.SyncBatchNorm`, which only runs on GPUs
   ("SyncBatchNorm layers only work with GPU modules").

`cpu_distrib_ctx(learn)` fixes all three (patch, `cpu=True`, `sync_bn=False`). fastai.distributed itself cannot be
imported without accelerate (NameError on `Accelerator`), so this module imports it only when a function needs it
and raises an `ImportError` that says `pip install accelerate`.

Freezing and DDP: `DistributedDataParallel` all-reduces only the gradients of the parameters that required grad
when it was built; a parameter unfrozen later keeps a rank-local gradient and the ranks drift apart
(Lightning issue #20340, `BackboneFinetuning`), and one frozen later makes DDP wait for a gradient that never comes.
fastai builds the DDP wrapper at the start of every fit (`DistributedTrainer.before_fit`), so
`freeze()` / `unfreeze()` / `freeze_to()` *between* fits (`fine_tune`, or a frozen fit then an unfrozen one) is
safe. A freeze change *during* a fit (`GradualUnfreeze`) is not, on GPUs as on CPUs: add `DDPRewrap()` to the
fit's callbacks, it re-builds the wrapper whenever the set of trainable parameters changed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.learner import Learner
from torch.nn.parallel import DistributedDataParallel

__all__ = ["CPU_BACKENDS", "cpu_collectives", "patch_cpu_broadcast", "unpatch_cpu_broadcast", "cpu_distrib_ctx",
           "DDPRewrap"]

CPU_BACKENDS = ("gloo", "mpi")   # process-group backends that take CPU tensors
_fastai_broadcast: Optional[Callable] = None   # fastai's `DistributedDL._broadcast`, kept by `patch_cpu_broadcast`


def _fastai_distributed():
    "fastai.distributed (it adds `Learner.distrib_ctx`); in fastai 2.8 it fails to import without accelerate."
    try:
        import fastai.distributed
    except (ImportError, NameError) as e:
        raise ImportError("fastai's distributed training needs accelerate: pip install accelerate") from e
    return fastai.distributed


def cpu_collectives() -> bool:
    """Whether collectives of the default process group take CPU tensors: its backend is gloo or mpi, or CUDA is
    unavailable. False when no process group is initialised (nothing to decide then: fastai's code runs).

    >>> cpu_collectives()   # no process group in this process
    False
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return str(dist.get_backend()) in CPU_BACKENDS or not torch.cuda.is_available()


def _cpu_aware_broadcast(self, t: list, rank: int) -> list:
    "`DistributedDL._broadcast` with the tensor on CPU for gloo/mpi (or no CUDA); fastai's own method otherwise."
    if not cpu_collectives():
        return _fastai_broadcast(self, t, rank)
    x = torch.as_tensor(t, dtype=torch.long)
    dist.broadcast(x, rank)
    return x.tolist()


_cpu_aware_broadcast.__fastai_groups_patch__ = True


def patch_cpu_broadcast() -> bool:
    """Replace fastai's `DistributedDL._broadcast` (CUDA tensors only) by a device-aware version. Idempotent: returns
    True when it patched, False when the patch was already in place. GPU/nccl runs go on through fastai's method.
    Raises `ImportError` without accelerate.

    >>> patch_cpu_broadcast() in (True, False); patch_cpu_broadcast()
    True
    False
    """
    global _fastai_broadcast
    ddl = _fastai_distributed().DistributedDL
    if getattr(ddl._broadcast, "__fastai_groups_patch__", False):
        return False
    _fastai_broadcast = ddl._broadcast
    ddl._broadcast = _cpu_aware_broadcast
    return True


def unpatch_cpu_broadcast() -> bool:
    """Put fastai's `DistributedDL._broadcast` back. Returns whether the patch was in place.

    >>> _ = patch_cpu_broadcast(); unpatch_cpu_broadcast(), unpatch_cpu_broadcast()
    (True, False)
    """
    ddl = _fastai_distributed().DistributedDL
    if not getattr(ddl._broadcast, "__fastai_groups_patch__", False):
        return False
    ddl._broadcast = _fastai_broadcast
    return True


@contextlib.contextmanager
def cpu_distrib_ctx(learn: Learner, sync_bn: bool = False, **kwargs: Any) -> Iterator[Learner]:
    """`learn.distrib_ctx()` for CPU processes: patches `DistributedDL._broadcast` (`patch_cpu_broadcast`; fastai's
    method is put back on exit unless the patch was already in place), then enters `learn.distrib_ctx(sync_bn=False, cpu=True, **kwargs)`, so
    accelerate starts a gloo process group from the `torchrun` environment and wraps the model in
    `DistributedDataParallel` at each fit. Launched without `torchrun` (no `WORLD_SIZE`), it trains in this process
    alone, as fastai's `distrib_ctx` does.

    Args:
        learn: the Learner to train; `auto_splitter` groups and a `GroupLogger` work unchanged (the logger writes
            its CSV on rank 0 only).
        sync_bn: must stay False: `nn.SyncBatchNorm` only runs on GPUs. BatchNorm statistics are then per rank;
            DDP copies rank 0's buffers to every rank at each training step.
        kwargs: `accelerate.Accelerator` arguments (`gradient_accumulation_steps`, `kwargs_handlers`, ...), except
            `cpu` (always True here) and fastai's `in_notebook` (its `setup_distrib` is CUDA/nccl only).

    Example (`torchrun --nproc_per_node=2 train.py`)::

        learn = Learner(dls, model, splitter=auto_splitter, cbs=GroupLogger("groups.csv"))
        with cpu_distrib_ctx(learn):
            learn.fine_tune(2, 1e-3)
    """
    if sync_bn:
        raise ValueError("sync_bn=True is not supported in CPU processes: nn.SyncBatchNorm only takes GPU inputs")
    if kwargs.get("in_notebook"):
        raise ValueError("in_notebook=True is not supported in CPU processes: fastai's setup_distrib uses CUDA and "
                         "nccl; start the processes with `torchrun` (or `accelerate launch`) instead")
    kwargs.pop("in_notebook", None)
    if kwargs.pop("cpu", True) is not True:
        raise ValueError("cpu_distrib_ctx always runs with cpu=True; use learn.distrib_ctx() for GPUs")
    patched = patch_cpu_broadcast()
    try:
        with learn.distrib_ctx(sync_bn=False, cpu=True, **kwargs) as ctx:
            yield ctx
    finally:
        if patched:
            unpatch_cpu_broadcast()


class DDPRewrap(Callback):
    """Re-build the `DistributedDataParallel` wrapper when the set of trainable parameters changed during a fit
    (`GradualUnfreeze`, `freeze_to` in a callback), so newly unfrozen parameters are all-reduced too and the ranks
    keep identical weights (the failure of Lightning issue #20340). Inert outside distributed training.

    Checked at the start of every training epoch and after `before_batch` when the optimizer's `frozen_idx` moved;
    every rank changes its freeze state at the same point, so every rank re-builds at the same point.
    Works on GPUs and CPUs alike. Example::

        with learn.distrib_ctx():   # or cpu_distrib_ctx(learn)
            learn.fit_one_cycle(4, slice(1e-5, 1e-3), cbs=[GradualUnfreeze(), DDPRewrap()])
    """
    order = 90    # after the callbacks that change the freeze state (GradualUnfreeze: 61); the forward pass comes later

    def __init__(self) -> None:
        self.n_rewraps = 0
        self._flags: Optional[tuple] = None
        self._frozen_idx = None

    def _ddp(self) -> Optional[DistributedDataParallel]:
        m = self.learn.model
        return m if isinstance(m, DistributedDataParallel) else None

    def _state(self) -> tuple:
        return tuple(p.requires_grad for p in self._ddp().module.parameters())

    def before_fit(self) -> None:
        "Remember which parameters the wrapper built by `DistributedTrainer` (order 11) all-reduces."
        self._flags = self._state() if self._ddp() is not None else None
        self._frozen_idx = getattr(self.learn.opt, "frozen_idx", None)

    def before_train(self) -> None:
        "Re-build the wrapper if a callback (`GradualUnfreeze`) changed the freeze state for this epoch."
        self._check()

    def before_batch(self) -> None:
        "Same check, only at a batch where the optimizer's `frozen_idx` moved (a `freeze_to` in mid-epoch)."
        if self.training and getattr(self.learn.opt, "frozen_idx", None) != self._frozen_idx:
            self._check()

    def _check(self) -> None:
        if self._flags is None or self._ddp() is None:
            return
        self._frozen_idx = getattr(self.learn.opt, "frozen_idx", None)
        flags = self._state()
        if flags == self._flags:
            return
        trainer = next((cb for cb in self.learn.cbs if isinstance(cb, _fastai_distributed().DistributedTrainer)), None)
        if trainer is None:
            raise RuntimeError("DDPRewrap: the model is a DistributedDataParallel but the Learner has no "
                               "DistributedTrainer; train inside learn.distrib_ctx() or cpu_distrib_ctx(learn)")
        # a new wrapper (same kwargs, from the same Accelerator); the old one's reducer is inert once its last
        # backward is finished, and is freed with it
        self.learn.model = trainer.accelerator.prepare(self.learn.model.module)
        self._flags = flags
        self.n_rewraps += 1
