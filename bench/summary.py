"""`arch_summary` against `torchinfo.summary` on the same model, in the same run.

What is compared (both print a table; stdout is captured, so printing is in the time for both):
- `vit_giant_patch14_224` (1.0 B parameters): `arch_summary("timm:vit_giant_patch14_224")` given as a factory
  builds the model on the meta device itself (the build is in its time). torchinfo cannot take a factory, so it
  gets an instance built on meta beforehand, and `arch_summary` gets that same instance too (the like-for-like
  ratio). `torchinfo.summary(model)` without an input does no forward pass and reads only parameter shapes, so its
  output on a meta instance is the same as on a real one (checked below on resnet50); a real vit_giant would cost
  4 GB and a long build for an identical table.
- `resnet50` (real instance, random weights): `arch_summary(model)` vs `torchinfo.summary(model)` (no forward),
  and for reference `torchinfo.summary(model, input_size=(1, 3, 224, 224))`, which runs a forward pass to get
  output shapes (something `arch_summary` does not report).
"""
from __future__ import annotations

import contextlib
import io

from .common import Context, Figure, Section, fmt_time, interleave, md_table, median, quiet, speedup

VIT = "timm:vit_giant_patch14_224"
DEFAULT = dict(reps=5)
QUICK = dict(reps=2)


def _text(fn) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def run(ctx: Context) -> Section:
    import torchinfo
    import torchvision
    from fastai_groups import arch_summary, instantiate
    reps = (QUICK if ctx.quick else DEFAULT)["reps"]
    sec = Section("summary", "arch_summary vs torchinfo.summary")

    def silent(fn):
        def call():
            with quiet():
                fn()
        return call

    vit = instantiate(VIT)
    resnet = torchvision.models.resnet50()
    cases = {
        "vit": {"arch_summary (factory, builds on meta)": silent(lambda: arch_summary(VIT)),
                "arch_summary (meta instance)": silent(lambda: arch_summary(vit)),
                "torchinfo.summary (meta instance)": silent(lambda: torchinfo.summary(vit))},
        "resnet": {"arch_summary (instance)": silent(lambda: arch_summary(resnet)),
                   "torchinfo.summary (instance, no input)": silent(lambda: torchinfo.summary(resnet)),
                   "torchinfo.summary (instance, input_size=(1,3,224,224))":
                       silent(lambda: torchinfo.summary(resnet, input_size=(1, 3, 224, 224)))},
    }
    times = {k: interleave(v, reps, warmup=1) for k, v in cases.items()}
    same = _text(lambda: torchinfo.summary(resnet)) == _text(lambda: torchinfo.summary(instantiate("resnet50")))

    sec.add(f"Median of {reps} interleaved calls after one warm-up round; stdout captured for all. Ratio: "
            "torchinfo time / arch_summary time on the same instance.", "")
    rows = []
    for case, label in (("vit", f"`{VIT[5:]}`"), ("resnet", "`resnet50`")):
        t = times[case]
        base = next(k for k in t if k.startswith("arch_summary") and "instance" in k)
        for k, ts in t.items():
            rows.append([label, k, fmt_time(median(ts)), fmt_time(min(ts)),
                         "1 (reference)" if k == base else (f"{median(ts) / median(t[base]):.1f}x arch_summary's time"
                                                            if k.startswith("torchinfo") else "")])
    sec.add(*md_table(["model", "call", "median", "min", "vs arch_summary (same instance)"], rows))
    sec.add("", f"torchinfo's table for a meta-device resnet50 equals the one for a real resnet50: "
                f"{'yes' if same else 'no'} (so the meta instance is a fair stand-in for vit_giant).")
    for case, what in (("vit", "vit_giant_patch14_224, meta instance"), ("resnet", "resnet50 instance")):
        t = times[case]
        ours = median(next(v for k, v in t.items() if k.startswith("arch_summary") and "instance" in k))
        base = median(next(v for k, v in t.items() if k.startswith("torchinfo")))
        sec.figures.append(Figure(f"arch_summary vs torchinfo.summary (no forward), {what}", fmt_time(ours),
                                  fmt_time(base), speedup(ours, base)))
    fac = median(times["vit"]["arch_summary (factory, builds on meta)"])
    sec.add("", f"`arch_summary` from the factory, meta build included: {fmt_time(fac)} for 1.0 B parameters.")
    return sec
