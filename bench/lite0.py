"""Fine-tuning `tf_efficientnet_lite0` (real ImageNet weights): `group_learner` vs fastai's `vision_learner`.

`fine_tune(epochs)` at 64 px (1 frozen epoch, then `epochs` unfrozen with `slice(lr/100, lr)`), the same lr for
both, batch 32, on the bundled product sample (480 train / 120 valid Fashion-MNIST images) and, when the Debian
package is installed and the time budget allows, on a larger Fashion-MNIST subset (`fashion_mnist(n_per_class=N)`:
N per class in train and in valid). Same data split, same seeds (`set_seed(seed, reproducible=True)` before
building data and Learner), no augmentation (squish resize only), the same normalisation (timm config of
lite0: mean = std = 0.5), the same weights (the offline lite0 ImageNet state_dict). Only the Learner differs:
fastai gives timm models 2 groups (body, head); ours splits by `auto_splitter` (stem, 4 stages, head).
Runs are interleaved: for each seed, fastai then ours.

Time per epoch: the fine-tune runs' epoch times are shown, but a run lasts long enough for the load of other
processes to change in between, so the time comparison is measured apart: both Learners unfrozen, one warm-up
epoch each, then `reps` interleaved epochs each (order reversed every other round), minimum reported.
"""
from __future__ import annotations

from .common import Context, Figure, Section, fmt_time, interleave, log, md_table, mean_std, median, quiet
from .learners import KINDS, LITE0, build, finetune, folder_dls

DEFAULT = dict(seeds=(0, 1, 2), size=64, epochs=3, bs=32, lr=2e-3, n_train=None, n_valid=None, reps=3)
QUICK = dict(seeds=(0,), size=32, epochs=1, bs=32, lr=2e-3, n_train=64, n_valid=32, reps=1)


def compare(ctx: Context, data: str, path, kinds, cfg: dict) -> dict:
    "Run every kind for every seed (interleaved) and return {kind: [result per seed]}."
    out = {k: [] for k in kinds}
    for seed in cfg["seeds"]:
        for k in kinds:
            out[k].append(finetune(ctx, k, data, path, seed, cfg["size"], cfg["epochs"], cfg["bs"], cfg["lr"],
                                   cfg["n_train"], cfg["n_valid"]))
    return out


def table(res: dict, seeds) -> list[str]:
    "Markdown rows: accuracy mean ± std (and per seed), frozen / unfrozen epoch times (median over seeds)."
    base = res.get("fastai")
    rows = []
    for k, rs in res.items():
        m, s = mean_std(r["acc"] for r in rs)
        fz, uf = median(r["frozen_epoch"] for r in rs), median(r["unfrozen_epoch"] for r in rs)
        rel = ""
        if base and k != "fastai":
            bfz, buf = median(r["frozen_epoch"] for r in base), median(r["unfrozen_epoch"] for r in base)
            rel = f"{fz / bfz:.2f} / {uf / buf:.2f}"
        rows.append([KINDS[k][0], f"{m * 100:.1f} ± {s * 100:.1f}",
                     ", ".join(f"{r['acc'] * 100:.1f}" for r in rs), fmt_time(fz), fmt_time(uf),
                     rel or "1 (reference)", fmt_time(median(r["total"] for r in rs))])
    return md_table(["Learner", "accuracy % (mean ± std)", f"per seed {tuple(seeds)}", "frozen epoch",
                     "unfrozen epoch", "epoch time vs fastai (frozen / unfrozen)", "fine_tune total"], rows)


def epoch_times(path, cfg: dict) -> dict:
    "Unfrozen epoch times (s), fastai vs ours, interleaved (see the module docstring): {kind: [seconds]}."
    from fastai.torch_core import set_seed
    log("  unfrozen epochs, interleaved: fastai vs ours")
    learners = {}
    for k in ("fastai", "ours"):
        set_seed(0, reproducible=True)
        learners[k] = build(k, folder_dls(path, cfg["size"], cfg["bs"], cfg["n_train"], cfg["n_valid"]), LITE0,
                            cfg["lr"])
        learners[k].unfreeze()

    def epoch(learn):
        def call():
            with learn.no_bar(), learn.no_logging(), quiet():
                learn.fit(1, cfg["lr"] / 2)
        return call

    return interleave({k: epoch(v) for k, v in learners.items()}, cfg["reps"], warmup=1)


def accuracy_figure(res: dict, label: str) -> Figure:
    f, o = res["fastai"], res["ours"]
    fm, fs = mean_std(r["acc"] for r in f)
    om, os_ = mean_std(r["acc"] for r in o)
    return Figure(f"lite0 fine_tune accuracy, {label}", f"{om * 100:.1f} ± {os_ * 100:.1f}%",
                  f"{fm * 100:.1f} ± {fs * 100:.1f}%", f"{(om - fm) * 100:+.1f} points", "gain > 1 std",
                  (om - fm) > max(fs, os_))


def run(ctx: Context) -> Section:
    from fastai_groups import fashion_mnist, product_sample
    cfg = QUICK if ctx.quick else DEFAULT
    sec = Section("lite0", "tf_efficientnet_lite0 fine-tuning: group_learner vs vision_learner")
    kinds = ("fastai", "ours")
    sample = product_sample()
    res = compare(ctx, "sample", sample, kinds, cfg)
    n_items = res["ours"][0]["n_items"]
    sec.add(f"`fine_tune({cfg['epochs']}, {cfg['lr']})`, {cfg['size']} px, batch {cfg['bs']}, seeds "
            f"{tuple(cfg['seeds'])}; epoch times include validation, median over seeds; std is the sample "
            "standard deviation over seeds.", "",
            f"**Bundled product sample** ({n_items} images, train + valid):", "", *table(res, cfg["seeds"]))
    sec.figures.append(accuracy_figure(res, "product sample"))
    times = epoch_times(sample, cfg)
    fe, oe = min(times["fastai"]), min(times["ours"])
    sec.add("", f"**Time per unfrozen epoch**, interleaved ({cfg['reps']} epochs each after a warm-up epoch, "
                f"training + validation of the sample): fastai {fmt_time(fe)} (median {fmt_time(median(times['fastai']))}"
                f"), ours {fmt_time(oe)} (median {fmt_time(median(times['ours']))}): ours takes {oe / fe:.2f}x "
                "fastai's time.")
    sec.figures.append(Figure("lite0 unfrozen epoch time (interleaved, min), product sample", fmt_time(oe),
                              fmt_time(fe), f"{oe / fe:.2f}x time", "equal time"))
    sec.add("", "Normalisation in the DataLoaders (seed 0): " + "; ".join(
        f"{KINDS[k][0]}: {rs[0]['norm']}" for k, rs in res.items()) + ". fastai's `vision_learner` adds the timm "
        "config's `Normalize` only with `pretrained=True` (which would download); with `pretrained=False` the bench "
        "adds that same `Normalize` itself.")

    if ctx.quick or ctx.full_n <= 0:
        sec.skip("full Fashion-MNIST fine-tunes: not run with --quick or --full-n 0")
        return sec
    n_full = 20 * ctx.full_n
    spent = sum(r["total"] for rs in res.values() for r in rs)
    estimate = spent * n_full / n_items
    if estimate * 1.2 > ctx.time_left():  # 20% margin: the estimate scales by item count only
        sec.skip(f"Fashion-MNIST with {ctx.full_n} images per class: estimated {estimate / 60:.1f} min "
                 f"(from the sample runs, scaled by size) but {max(ctx.time_left(), 0) / 60:.1f} min of the "
                 f"{ctx.budget_min:g}-min budget are left; run `python -m bench --only lite0 --budget 30` for it")
        return sec
    try:
        path = fashion_mnist(n_per_class=ctx.full_n)
    except FileNotFoundError as e:
        sec.skip(f"full Fashion-MNIST: the Debian package is not installed ({e})")
        return sec
    full = compare(ctx, f"fmnist{ctx.full_n}", path, kinds, cfg)
    sec.add("", f"**Fashion-MNIST subset** (`fashion_mnist(n_per_class={ctx.full_n})`: {ctx.full_n} train and "
                f"{ctx.full_n} valid images per class, {full['ours'][0]['n_items']} images):", "",
            *table(full, cfg["seeds"]))
    sec.figures.append(accuracy_figure(full, f"Fashion-MNIST {ctx.full_n}/class"))
    return sec
