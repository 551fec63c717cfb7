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

import os
import sys
import time
from pathlib import Path

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
    run_zoo(ctx, sec)
    if not ctx.quick:
        rows = [[name, blocks, fmt_time(c), f"{c / blocks * 1e3:.2f} ms", fmt_time(w)]
                for name, blocks, c, w in depth_times()]
        sec.add("", "Cost with depth (one thread; min of 2 cold splits on fresh meta instances, median of 20 warm "
                    "calls): the cold time per block stays flat from resnet18 to a 1,002-block CIFAR ResNet.", "",
                *md_table(["model", "blocks", "cold", "cold per block", "warm"], rows))
    return sec


# ----------------------------------------------------------------------------------------------------------------
# The slowest models of the zoo (tests/test_zoo.py, issue 13): cold and warm, before and after
# ----------------------------------------------------------------------------------------------------------------
# the ten slowest cold splits of the zoo at 9ce964c (seed 20261202), built on the meta device
ZOO_SLOWEST = ["timm:sequencer2d_m", "timm:maxvit_pico_rw_256", "timm:swinv2_cr_small_ns_256", "timm:hieradet_small",
               "timm:mobilenetv5_300m", "timm:hrnet_w64", "timm:iformer_l2_distilled", "hf:levit", "hf:cvt",
               "hf:swinv2"]
QUICK_ZOO = ["timm:sequencer2d_m", "hf:cvt"]
BEFORE_REF = os.environ.get("BENCH_SPLITTER_BEFORE", "9ce964c")  # main before issue 13's fixes


def _zoo_model(name: str):
    "A fresh meta instance of a zoo model ('timm:NAME' or 'hf:MODEL_TYPE', from its default config)."
    import torch
    from torch import nn

    class HF(nn.Module):  # pixel_values in, logits out (as in tests/test_zoo.py)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    source, _, arch = name.partition(":")
    with torch.device("meta"):
        if source == "hf":
            import transformers
            from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as M
            cls = M[arch][0] if isinstance(M[arch], (tuple, list)) else M[arch]
            return HF(getattr(transformers, cls)(transformers.AutoConfig.for_model(arch))).eval()
        import timm
        return timm.create_model(arch, pretrained=False)


def zoo_times(names: list, cold_reps: int = 3, warm_reps: int = 10) -> dict:
    "{name: (cold, warm)} in seconds: min of `cold_reps` cold splits (fresh instances), median of warm ones."
    import torch
    from fastai_groups import auto_splitter, instantiate
    torch.set_num_threads(1)
    auto_splitter(instantiate("resnet18"))  # warm-up
    out = {}
    for name in names:
        try:
            cold = []
            for _ in range(cold_reps):
                model = _zoo_model(name)
                t = time.perf_counter()
                auto_splitter(model)
                cold.append(time.perf_counter() - t)
        except Exception as e:  # a package missing or a model that does not build here
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            continue
        warm = []
        for _ in range(warm_reps):
            t = time.perf_counter()
            auto_splitter(model)
            warm.append(time.perf_counter() - t)
        out[name] = (min(cold), median(warm))
    return out


def _times_at(ref: str, names: list, reps: dict) -> dict:
    "`zoo_times` run in a subprocess against the package as it was at git `ref` (extracted to a temp dir)."
    import json
    import subprocess
    import tempfile
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git -C {root} archive {ref} fastai_groups | tar -x -C {tmp}", shell=True, check=True,
                       capture_output=True)
        code = ("import json, sys; from bench.splitter import zoo_times; "
                f"print(json.dumps(zoo_times({names!r}, {reps['cold_reps']}, {reps['warm_reps']})))")
        env = dict(os.environ, PYTHONPATH=f"{tmp}{os.pathsep}{root}", OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed")
        return json.loads(res.stdout.strip().splitlines()[-1])


def run_zoo(ctx: Context, sec: Section) -> None:
    "Add the zoo table (slowest models, cold and warm, before and after) to `sec`."
    names = QUICK_ZOO if ctx.quick else ZOO_SLOWEST
    reps = dict(cold_reps=1, warm_reps=3) if ctx.quick else dict(cold_reps=3, warm_reps=10)
    after = zoo_times(names, **reps)
    try:
        before = _times_at(BEFORE_REF, names, reps)
    except Exception as e:
        before = {}
        sec.skip(f"zoo 'before' column: could not run the package at {BEFORE_REF} ({e})")

    def cell(r, i):
        return fmt_time(r[i]) if isinstance(r, (list, tuple)) else ("-" if r is None else "fails")
    rows = [[f"`{n}`", cell(before.get(n), 0), cell(after[n], 0), cell(before.get(n), 1), cell(after[n], 1)]
            for n in names]
    sec.add("", f"Slowest models of the zoo (`tests/test_zoo.py`), 1 thread: cold split (min of {reps['cold_reps']}, "
                f"fresh meta instance each) and warm split (median of {reps['warm_reps']}), before (`{BEFORE_REF}`) "
                "and after issue 13's fixes (one meta trace per model, shape-only stand-ins for norms, "
                "activations, elementwise maths, attention and LSTMs).", "")
    sec.add(*md_table(["model", "cold before", "cold after", "warm before", "warm after"], rows))
    slow = max((n for n in names if isinstance(after[n], (list, tuple))), key=lambda n: after[n][0], default=None)
    if slow is not None:
        sec.figures.append(Figure(f"slowest zoo cold split (`{slow}`)", fmt_time(after[slow][0]),
                                  cell(before.get(slow), 0), "", "< 1 s", after[slow][0] < 1.0))


# ----------------------------------------------------------------------------------------------------------------
# Cost per block with depth (issue 21): torchvision ResNets, then CIFAR ResNets up to 1,002 blocks
# ----------------------------------------------------------------------------------------------------------------
def cifar_resnet(n: int):
    "A CIFAR ResNet of 6n+2 layers (3n BasicBlocks) on the meta device."
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    def stage(cin, cout, stride):
        down = None if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down), *[BasicBlock(cout, cout) for _ in range(n - 1)])
    with torch.device("meta"):
        return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             stage(16, 16, 1), stage(16, 32, 2), stage(32, 64, 2),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


DEPTHS = [("resnet18", 8), ("resnet50", 16), ("resnet152", 50), ("cifar:18", 54), ("cifar:90", 270),
          ("cifar:200", 600), ("cifar:334", 1002)]


def depth_times(cold_reps: int = 2, warm_reps: int = 20) -> list:
    "[(name, blocks, cold s, warm s)]: min of cold splits on fresh instances, median of warm ones."
    import torch
    from fastai_groups import auto_splitter, instantiate
    torch.set_num_threads(1)
    auto_splitter(instantiate("resnet18"))
    out = []
    for name, blocks in DEPTHS:
        make = (lambda: cifar_resnet(int(name[6:]))) if name.startswith("cifar:") else (lambda: instantiate(name))
        cold = []
        for _ in range(cold_reps):
            model = make()
            t = time.perf_counter()
            auto_splitter(model)
            cold.append(time.perf_counter() - t)
        warm = []
        for _ in range(warm_reps):
            t = time.perf_counter()
            auto_splitter(model)
            warm.append(time.perf_counter() - t)
        label = f"CIFAR ResNet-{6 * int(name[6:]) + 2}" if name.startswith("cifar:") else name
        out.append((label, blocks, min(cold), median(warm)))
    return out
