"""Shared pieces of the benchmarks: results, timing, the machine description, Markdown helpers.

Timing rules used everywhere: `time.perf_counter`, several repetitions, warm-up runs excluded, the minimum or
the median reported (each table says which), and when ours and the baseline are compared they run in the same
process, interleaved (A B, B A, A B, ...) so that a change of machine load hits both alike.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

SECTIONS = ("splitter", "summary", "logger", "lite0", "frozen", "gpu", "cli")


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Figure:
    """One headline number: ours against the baseline, as a ratio, with the raw values it comes from.

    `ratio` is a formatted string (`"2.10x faster"`, `"+0.4% time"`); `met` is True/False against `target`,
    None when there is no target or the figure could not be measured."""
    what: str
    ours: str
    baseline: str
    ratio: str
    target: str = ""
    met: Optional[bool] = None


@dataclass
class Section:
    "What one benchmark module reports: Markdown lines for its part of the report, and its headline figures."
    name: str
    title: str
    lines: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    seconds: float = 0.0
    notes: list = field(default_factory=list)   # skipped parts and why, repeated in the final summary

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def skip(self, note: str) -> None:
        "Record a part that did not run, in the section and in the report's list of skipped parts."
        self.notes.append(note)
        self.lines.extend(["", f"*Skipped:* {note}"])


@dataclass
class Context:
    """Run-wide settings and state handed to every section.

    `quick`: tiny settings (smoke test). `deadline`: `time.perf_counter()` value after which optional parts
    (the full Fashion-MNIST runs) are skipped so the default run stays within its budget. `memo`: results
    shared between sections (a fine-tune run used by `lite0` and `frozen` runs once)."""
    quick: bool = False
    deadline: float = float("inf")
    start: float = field(default_factory=time.perf_counter)
    memo: dict = field(default_factory=dict)
    full_n: int = 100
    budget_min: float = 15.0

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def repeat(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    "Seconds taken by each of `reps` calls of `fn`, after `warmup` untimed calls."
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleave(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Seconds per call for each of `fns` (name -> callable), the calls interleaved: repetition `r` runs them in
    order when `r` is even and in reverse order when odd, after `warmup` untimed rounds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t)
    return out


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def mean_std(xs) -> tuple[float, float]:
    "Mean and sample standard deviation (0 for a single value)."
    xs = list(xs)
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_time(s: float) -> str:
    "Seconds as `812 us`, `12.3 ms` or `4.56 s`."
    if s != s:  # nan
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def speedup(ours: float, base: float) -> str:
    "`base / ours` as `2.10x faster` (or `0.80x (slower)`)."
    if not ours or ours != ours or base != base:
        return "n/a"
    r = base / ours
    return f"{r:.2f}x faster" if r >= 1 else f"{r:.2f}x (slower)"


def rss_mb() -> float:
    "Resident memory of this process in MB (Linux), nan elsewhere."
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@contextlib.contextmanager
def quiet():
    "Swallow stdout (summaries, progress tables) so printing is timed but not shown."
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def epoch_timer():
    """A fastai callback recording, for every epoch of every fit, the wall time of the epoch, of its training
    phase and of its validation phase, and the time of each training batch (from one `before_batch` to the next,
    so data loading, the step and every callback are included). `cb.fits` is a list (one per fit) of lists of
    dicts `{"epoch", "train", "valid", "batches", "mode"}`; `mode` is `learn.fast_frozen_mode` at the end of the
    epoch (`""`, `"no_grad"`, `"cached"`; None without `fastai_groups.frozen`)."""
    from fastai.callback.core import Callback

    class EpochTimer(Callback):
        order = -1000  # before every other callback: `before_*` times are taken first
        run_valid = True

        def __init__(self):
            self.fits = []

        def before_fit(self):
            self.fits.append([])

        def before_epoch(self):
            self._e = {"t0": time.perf_counter(), "batches": [], "train": 0.0, "valid": 0.0}

        def before_train(self):
            self._t = time.perf_counter()
            self._b = None

        def before_batch(self):
            now = time.perf_counter()
            if self.training:
                if self._b is not None:
                    self._e["batches"].append(now - self._b)
                self._b = now

        def after_train(self):
            now = time.perf_counter()
            if self._b is not None:
                self._e["batches"].append(now - self._b)
            self._e["train"] = now - self._t

        def before_validate(self):
            self._t = time.perf_counter()

        def after_validate(self):
            self._e["valid"] = time.perf_counter() - self._t

        def after_epoch(self):
            e = self._e
            e["epoch"] = time.perf_counter() - e.pop("t0")
            e["mode"] = getattr(self.learn, "fast_frozen_mode", None)  # fastai_groups.frozen's state, if any
            if self.fits:
                self.fits[-1].append(e)

    return EpochTimer()


# ----------------------------------------------------------------------------------------------------------------
# Machine and report
# ----------------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception as e:  # not installed
        return f"not installed ({type(e).__name__})"


def machine_info() -> list[tuple[str, str]]:
    "(label, value) pairs describing the machine and the software versions."
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",) * 3
    return [
        ("Date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("CPU", f"{cpu_model()}, {os.cpu_count()} logical cores"),
        ("GPU", gpu),
        ("torch threads", f"{torch.get_num_threads()} (torch.set_num_threads), "
                          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"),
        ("Load average at start (1/5/15 min)", " / ".join(f"{x:.2f}" if isinstance(x, float) else x
                                                           for x in load)),
        ("Python", platform.python_version()),
        ("torch", torch.__version__),
        ("torchvision", _version("torchvision")),
        ("fastai", _version("fastai")),
        ("timm", _version("timm")),
        ("torchinfo", _version("torchinfo")),
        ("fastai_groups", _version("fastai_groups")),
    ]


def md_table(headers: list, rows: list) -> list[str]:
    "A Markdown table as lines."
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return out


def error_line(e: BaseException) -> str:
    "A one-line description of an exception for the report."
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


def log(msg: str) -> None:
    "Progress on stderr (the report goes to the Markdown file)."
    print(msg, file=sys.stderr, flush=True)
