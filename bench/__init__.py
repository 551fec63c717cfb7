"""Benchmarks of fastai_groups against the fastai baseline: `python -m bench` writes `BENCHMARKS.md`.

One module per topic (`splitter`, `summary`, `logger`, `lite0`, `frozen`, `gpu`), each with a `run(ctx)`
function returning a `Section`; `bench/__main__.py` runs them in one process and writes the report.

OpenMP threads: when this package is imported before torch, `OMP_WAIT_POLICY` defaults to `PASSIVE`. On a
shared 2-core machine the default (active spin-waiting) makes a 2-thread step up to 30x slower whenever another
process holds a core, which drowns every ratio in noise; passive waiting keeps steps steady. It applies to
ours and to fastai alike, and the report states the value in effect. Set the variable yourself to override.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
