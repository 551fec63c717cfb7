"""Start-up of the `fastai-groups` command line against importing fastai.

What is measured: the wall time of a fresh `python -m fastai_groups.cli ...` process (this checkout, through
`PYTHONPATH`) for `--help`, a sub-command's `--help`, an argument error caught by argparse (`--bogus`) and one
caught by our own checks (`--bs 1`), each interleaved with the baseline `python -c "import fastai.vision.all"`,
the import any fastai script starts with (the CLI used to pay it, and more, before answering `--help`). Target:
under 1 s for `--help` and the argument errors. Process start included in both, median reported.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .common import Context, Figure, Section, fmt_time, interleave, md_table, median

ROOT = Path(__file__).resolve().parents[1]
CASES = {"fastai-groups --help": ["--help"],
         "fastai-groups finetune --help": ["finetune", "--help"],
         "fastai-groups finetune --bogus (argparse error)": ["finetune", "--bogus"],
         "fastai-groups finetune --bs 1 (our check)": ["finetune", "--bs", "1"]}
BASELINE = 'python -c "import fastai.vision.all"'


def _call(argv: list) -> callable:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return lambda: subprocess.run([sys.executable, *argv], env=env, capture_output=True, check=False)


def run(ctx: Context) -> Section:
    reps = 2 if ctx.quick else 5
    sec = Section("cli", "fastai-groups start-up (--help, argument errors) vs importing fastai")
    fns = {name: _call(["-m", "fastai_groups.cli", *argv]) for name, argv in CASES.items()}
    fns[BASELINE] = _call(["-c", "import fastai.vision.all"])
    times = interleave(fns, reps, warmup=1)
    base = median(times[BASELINE])
    sec.add(f"Median wall time of {reps} fresh processes each, interleaved with the baseline, after one warm-up "
            "round (file cache warm). Ratio: baseline time / command time.", "")
    rows = []
    for name, ts in times.items():
        t = median(ts)
        rows.append([f"`{name}`", fmt_time(t), fmt_time(min(ts)),
                     "1 (baseline)" if name == BASELINE else f"{base / t:.1f}x faster"])
    sec.add(*md_table(["command", "median", "min", "vs baseline"], rows))
    for name in CASES:
        t = median(times[name])
        sec.figures.append(Figure(f"`{name}` wall time", fmt_time(t), fmt_time(base), f"{base / t:.1f}x faster",
                                  target="< 1 s", met=t < 1.0))
    return sec
