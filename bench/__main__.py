"""`python -m bench [--quick] [--only NAME[,NAME]] [--out BENCHMARKS.md]`: ours against fastai, one process, one report.

Sections (see each module's docstring for what exactly is compared): `splitter`, `summary`, `logger`, `lite0`,
`frozen`, `gpu`, `cli`. They run in the order cli, splitter, summary, logger, frozen, gpu, lite0 (lite0 last: its optional
full Fashion-MNIST runs use whatever remains of the time budget) and are reported in the order above. A section
that fails is reported with its error and the others still run; the exit status is 1 then.

`--quick`: tiny settings (smoke test, under 2 minutes). Default settings are sized to finish in under 15 minutes
on 2 CPU cores; `--budget` minutes is the deadline after which the optional full Fashion-MNIST runs are skipped.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
import traceback

from . import common
from .common import SECTIONS, Context, Section, error_line, log, md_table

RUN_ORDER = ("cli", "splitter", "summary", "logger", "frozen", "gpu", "lite0")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--only", default="", help=f"comma-separated sections among {', '.join(SECTIONS)}")
    p.add_argument("--out", default="BENCHMARKS.md", help="Markdown report to write (default: BENCHMARKS.md)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--budget", type=float, default=15.0,
                   help="minutes; optional parts (full Fashion-MNIST) are skipped when they would not fit")
    p.add_argument("--full-n", type=int, default=100,
                   help="images per class (train and valid) of the Fashion-MNIST run in `lite0`; 0 skips it")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose among {', '.join(SECTIONS)}")
    args.sections = [s for s in RUN_ORDER if not only or s in only]
    return args


def run_section(name: str, ctx: Context) -> tuple[Section, bool]:
    "Run one section; on an error, a section holding the error (and the traceback on stderr)."
    t = time.perf_counter()
    log(f"[bench] {name} ...")
    ok = True
    try:
        sec = importlib.import_module(f"bench.{name}").run(ctx)
    except Exception as e:
        traceback.print_exc()
        sec = Section(name, name)
        sec.skip(f"{name} failed: {error_line(e)}")
        ok = False
    sec.seconds = time.perf_counter() - t
    log(f"[bench] {name} done in {sec.seconds:.1f} s")
    return sec, ok


def render(args, info, sections: dict, total: float, cpu: float, argv) -> str:
    "The Markdown report."
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cmd = "python -m bench" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    lines = ["# Benchmarks: fastai_groups against the fastai baseline", "",
             f"Written by `{cmd}` (bench/; see each module's docstring for the exact protocol). Ours and fastai "
             "run side by side in one process, on the same data and model; timings use `time.perf_counter`, "
             "warm-up excluded, several repetitions (interleaved when two things are compared) and report the "
             "median (or min, where said). Ratios are `fastai time / our time` (\"x faster\") unless stated.", "",
             *(["**--quick run: tiny settings for a smoke test; the figures below are not meaningful.**", ""]
               if args.quick else []),
             "## Machine", "", *md_table(["", ""], info),
             f"| Load average at end (1/5/15 min) | {' / '.join(f'{x:.2f}' for x in load) if load else 'n/a'} |",
             f"| Settings | {'--quick' if args.quick else 'default'}, sections: {', '.join(sections)} |",
             f"| Total run time | {total / 60:.1f} min ({total:.0f} s) wall; {cpu / 60:.1f} min CPU time of "
             f"this process (all threads) |", "",
             "The load average counts other processes sharing the machine: above the number of cores, absolute "
             "times are inflated, while ratios of interleaved runs stay comparable.", "",
             "## Key figures", ""]
    figs = [(n, f) for n, s in sections.items() for f in s.figures]
    mark = {True: "yes", False: "**no**", None: ""}
    lines += md_table(["section", "figure", "ours", "baseline", "ratio", "target", "met"],
                      [[n, f.what, f.ours, f.baseline, f.ratio, f.target, mark[f.met]] for n, f in figs])
    notes = [f"- `{n}`: {note}" for n, s in sections.items() for note in s.notes]
    if notes:
        lines += ["", "## Skipped or not available", "", *notes]
    for name in SECTIONS:
        if name in sections:
            s = sections[name]
            lines += ["", f"## {name}: {s.title}", "", f"*Section time: {s.seconds:.0f} s.*", "", *s.lines]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    start, cpu0 = time.perf_counter(), time.process_time()
    info = common.machine_info()
    ctx = Context(quick=args.quick, start=start, deadline=start + args.budget * 60 - 30, full_n=args.full_n,
                  budget_min=args.budget)
    sections, failed = {}, False
    for name in args.sections:
        sec, ok = run_section(name, ctx)
        sections[name] = sec
        failed |= not ok
    total = time.perf_counter() - start
    ordered = {n: sections[n] for n in SECTIONS if n in sections}
    with open(args.out, "w") as f:
        f.write(render(args, info, ordered, total, time.process_time() - cpu0, argv))
    log(f"[bench] wrote {args.out} in {total / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
