"""Checks of the command line's input before any training (one line, the problem and the fix, exit status 2), the
thread count, and the guards during training (a NaN loss stops the run; the per-epoch log of the report).
torch and fastai are imported inside the functions that need them, so a bad flag answers at once."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

__all__ = ["UsageError", "pick_threads", "check_numbers", "check_data_arg", "check_folder", "check_batches",
           "check_size", "diverged"]


class UsageError(Exception):
    "A problem with the user's input: reported in one line, exit status 2."


# ----------------------------------------------------------------------------------------------------------------
# Threads and checks before training
# ----------------------------------------------------------------------------------------------------------------
def _physical_cores() -> int:
    try:
        import psutil
        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    n = cores or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        n = min(n, len(os.sched_getaffinity(0)))
    return max(1, n)


def pick_threads(threads: Optional[int]) -> tuple[int, str]:
    """The number of CPU threads for torch and where it comes from: `--threads`, else `OMP_NUM_THREADS`, else
    the physical cores this process may use minus the other processes running right now (at least 1), so that a
    shared machine is not oversubscribed. "Right now" is Linux's count of runnable tasks (`/proc/loadavg`), not the
    1-minute load average, which still counts a command that has just finished (two runs back to back would get one
    thread); elsewhere the load average.

    >>> pick_threads(3)
    (3, '--threads')
    """
    if threads:
        return threads, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = _physical_cores()
    busy, what = _busy()
    return max(1, cores - round(busy)), f"auto: {cores} physical cores minus {busy:g} {what}"


def _busy() -> tuple[float, str]:
    "(how many cores other processes use now, what was counted)."
    try:
        runnable = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        return float(max(0, runnable - 1)), "other running processes"        # minus this process
    except (OSError, ValueError, IndexError):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return round(load, 2), "load (1-minute average)"


def check_numbers(args) -> None:
    "Numeric options, before anything is imported."
    for name in ("epochs", "freeze_epochs", "size", "bs", "threads"):
        v = getattr(args, name, None)
        if name == "freeze_epochs" and v is not None and v < 0:
            raise UsageError(f"--freeze-epochs must be >= 0, got {v}")
        if name != "freeze_epochs" and v is not None and v < 1:
            raise UsageError(f"--{name} must be positive, got {v}")
    if hasattr(args, "bs") and args.bs < 2:
        raise UsageError(f"--bs {args.bs}: the head's BatchNorm layers need at least 2 images per batch: "
                         "use --bs 2 or more")
    if hasattr(args, "size") and args.size < 2:
        raise UsageError(f"--size {args.size}: fastai's Resize and augmentation need at least 2 pixels: "
                         "use --size 32 or more")
    if hasattr(args, "valid_pct") and not 0 < args.valid_pct < 1:
        raise UsageError(f"--valid-pct must be between 0 and 1 (exclusive), got {args.valid_pct}")
    if hasattr(args, "lr") and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive finite number (default 2e-3), got {args.lr}")


def check_data_arg(args) -> None:
    "The data folder, given positionally or as --data (both: they must agree)."
    if not hasattr(args, "data"):
        return
    if args.data is not None and args.path is not None and args.data.resolve() != args.path.resolve():
        raise UsageError(f"two data folders given, {args.path} and --data {args.data}: give one")
    args.path = args.path if args.path is not None else args.data
    if args.path is not None and not args.path.exists():
        raise UsageError(f"{args.path}: no such folder")


def check_folder(args) -> None:
    """The data folder's layout and image counts, before torch and fastai are imported: the batch checks of
    `check_batches` from the counts (fastai's `RandomSplitter` puts `int(valid_pct * n)` images in valid)."""
    from .data import check_image_folder, class_folders, is_image, product_sample
    path = product_sample() if args.path is None else args.path
    try:
        args.folder_check = check_image_folder(path, warn=False)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(str(e)) from None
    bad = set(args.folder_check[1])
    count = lambda d: sum(is_image(f) and f not in bad for c in class_folders(d) for f in c.iterdir())  # noqa: E731
    if (path / "train").is_dir() and (path / "valid").is_dir():
        n_train, n_valid = count(path / "train"), count(path / "valid")
    else:
        n = count(path)
        n_valid = int(args.valid_pct * n)
        n_train = n - n_valid
    check_batches(n_train, n_valid, n_train // args.bs, args)  # fastai drops the last incomplete batch


def check_batches(n_train: int, n_valid: int, n_batches: int, args) -> None:
    "At least one full training batch and one validation image."
    split = args.path is not None and (args.path / "train").is_dir() and (args.path / "valid").is_dir()
    if n_valid == 0:
        n = n_train + n_valid
        fix = "put images into valid/" if split else \
            f"use --valid-pct {math.ceil(100 / max(1, n)) / 100:g} or more"
        raise UsageError(f"--valid-pct {args.valid_pct:g} leaves no validation image out of {n}: {fix}")
    if n_train < 2:
        raise UsageError(f"only {n_train} training image(s) (need at least 2): add images"
                         + ("" if split else " or lower --valid-pct"))
    if n_batches == 0:
        raise UsageError(f"--bs {args.bs} is larger than the {n_train} training images (fastai drops the last "
                         f"incomplete batch, so nothing would train): use --bs {n_train} or less")


def check_size(learn, args) -> None:
    "A forward of the model at `--size` on the meta device (no memory, no compute): too small a size is an error."
    import torch

    from ._meta import on_meta

    def fits(size: int) -> Optional[Exception]:
        try:
            with on_meta(learn.model), torch.no_grad():
                learn.model(torch.empty(2, 3, size, size, device="meta"))
        except Exception as e:
            return e
        return None

    err = fits(args.size)
    if err is None:
        return
    sizes = (8, 16, 32, 64, 128, 224, 256, 299, 384, 512)
    ok = next((s for s in sizes if fits(s) is None), None)
    why = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    fix = f"use --size {ok}, the smallest of {', '.join(map(str, sizes))} it accepts" if ok else \
        "pick a size the model accepts"
    raise UsageError(f"--size {args.size} does not fit {args.arch} ({why.rstrip('.')}): {fix}")


def diverged(learn, lr: float) -> Optional[str]:
    "The one-line message for a run that `NanStop` stopped, else None."
    if not learn.nan_stop.diverged:
        return None
    epoch, batch = len(learn.epoch_log.rows) + 1, learn.nan_stop.diverged
    return (f"the training loss became NaN or infinite in epoch {epoch} (batch {batch}): training stopped; "
            f"lower --lr (was {lr:g}, default 2e-3)")
