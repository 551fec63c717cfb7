"""`auto_splitter` time per model on meta-device models, and the number of groups per granularity.

For each model: the model is built on the meta device with `fastai_groups.instantiate` (no parameter memory, no
download); a *cold* call is `auto_splitter` on a fresh instance (the structure is found: summary rows and a
forward on meta tensors), a *warm* call is a second call on the same instance (`auto_splitter` caches the
structure per model object). The memory check: every parameter is on the meta device, and the resident memory of
the process is read before and after the section (a 6.7B-parameter model would need 27 GB in float32; the machine
has less).

There is no fastai baseline for the split time: fastai's splitters are hand-written per architecture
(`model_meta`) and run on real models. The point of this table is that any model splits in well under a second
with no memory.
"""
from __future__ import annotations

import time

from .common import Context, Figure, Section, fmt_time, md_table, median, rss_mb

# torchvision models named in issue 3, then the largest timm models that build on meta
MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t",
          "timm:vit_giant_patch14_224", "timm:vit_7b_patch16_dinov3"]
QUICK_MODELS = ["resnet50", "mobilenet_v2"]
DEFAULT = dict(cold_reps=5, warm_reps=20)
QUICK = dict(cold_reps=2, warm_reps=3)


def time_model(name: str, cold_reps: int, warm_reps: int) -> dict:
    "Instantiate and split one model (see the module docstring); times in seconds."
    from fastai_groups import GRANULARITIES, auto_splitter, instantiate
    inst, cold = [], []
    model = None
    for _ in range(cold_reps):
        t = time.perf_counter()
        model = instantiate(name)
        inst.append(time.perf_counter() - t)
        t = time.perf_counter()
        groups = auto_splitter(model)
        cold.append(time.perf_counter() - t)
    warm = []
    for _ in range(warm_reps):
        t = time.perf_counter()
        auto_splitter(model)
        warm.append(time.perf_counter() - t)
    counts = {g: len(auto_splitter(model, granularity=g)) for g in GRANULARITIES}
    params = list(model.parameters())
    return {"name": name, "params": sum(p.numel() for p in params), "meta": all(p.is_meta for p in params),
            "inst": median(inst), "cold": median(cold), "cold_min": min(cold), "warm": median(warm),
            "counts": counts, "stage_names": list(getattr(groups, "names", []) or [])}


def run(ctx: Context) -> Section:
    from fastai_groups import GRANULARITIES, auto_splitter, instantiate
    cfg = QUICK if ctx.quick else DEFAULT
    models = QUICK_MODELS if ctx.quick else MODELS
    sec = Section("splitter", "auto_splitter: split time on meta-device models, groups per granularity")
    auto_splitter(instantiate("resnet18"))  # warm-up: first-call imports and set-up are not timed
    rss0 = rss_mb()
    results = [time_model(m, cfg["cold_reps"], cfg["warm_reps"]) for m in models]
    rss1 = rss_mb()

    sec.add(f"Median of {cfg['cold_reps']} cold calls (each on a fresh meta instance; min in brackets) and of "
            f"{cfg['warm_reps']} warm calls (same instance, structure cached). Granularity columns: number of "
            "parameter groups `auto_splitter(model, granularity=...)` returns.", "")
    rows = []
    for r in results:
        rows.append([f"`{r['name']}`", f"{r['params'] / 1e6:,.1f} M", fmt_time(r["inst"]),
                     f"{fmt_time(r['cold'])} ({fmt_time(r['cold_min'])})", fmt_time(r["warm"]),
                     *[r["counts"][g] for g in GRANULARITIES], "yes" if r["meta"] else "**no**"])
    sec.add(*md_table(["model", "params", "build on meta", "cold split", "warm split",
                       *[f"groups `{g}`" for g in GRANULARITIES], "all params on meta"], rows))
    sec.add("", "Stage-granularity group names: " + "; ".join(
        f"`{r['name']}`: {', '.join(r['stage_names'])}" for r in results) + ".")
    biggest = max(results, key=lambda r: r["params"])
    sec.add("", f"Memory: resident set {rss0:,.0f} MB before the first model, {rss1:,.0f} MB after the last "
                f"(+{rss1 - rss0:,.0f} MB, Python objects of the module trees); the largest model, "
                f"`{biggest['name']}`, has {biggest['params'] / 1e9:.2f} B parameters "
                f"({biggest['params'] * 4 / 2**30:.1f} GiB in float32), all on the meta device.")
    for name in dict.fromkeys(("resnet50", biggest["name"])):
        r = next((x for x in results if x["name"] == name), None)
        if r is not None:
            sec.figures.append(Figure(f"auto_splitter cold split, `{name}` (meta)", fmt_time(r["cold"]),
                                      "none (fastai has no automatic splitter)",
                                      f"warm call {fmt_time(r['warm'])}"))
    return sec
