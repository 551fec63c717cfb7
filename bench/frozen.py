"""The frozen phase: fastai's frozen epoch against our fast frozen body and feature cache; accuracy per freeze mode.

Timing (resnet34 with random weights, no offline ImageNet weights here, and tf_efficientnet_lite0 with its real
weights; 128 px, batch 32, a class-balanced subset of the bundled sample; one `learn.fit(1)` = one epoch, training
plus validation), every variant frozen with `learn.freeze()`:
- fastai default: `vision_learner(..., train_bn=True)` (its default): the body's BatchNorms train, so autograd
  records and back-propagates through the whole body;
- fastai `train_bn=False` + `BnFreeze`: what fastai can do with its own flags (the plain path the fast body must
  equal; for reference);
- ours, fast frozen body: `group_learner(..., train_bn=False)` with `FastFrozenBody` (no autograd in the body,
  norm layers in inference mode);
- ours, feature cache: `FeatureCache` (body run once per item, then only the head trains). Its first epoch builds
  the cache and is reported apart; "epochs 2+" are the following epochs.
One warm-up epoch per Learner (the cache Learner's warm-up is its first, cache-building, epoch), then interleaved
repetitions (each round runs every variant once, the order reversed every other round). Reported: the minimum
epoch time (other processes sharing the cores can only add time; the median is shown beside it).

Accuracy: `fine_tune` of lite0 on the whole bundled sample at 64 px with each freeze mode, same seeds, so speed
is never bought with a silent accuracy loss (runs shared with the `lite0` section).
"""
from __future__ import annotations

import time

from .common import Context, Figure, Section, epoch_timer, fmt_time, log, md_table, mean_std, median, quiet, speedup
from .learners import KINDS, LITE0, fastai_learner, folder_dls, frozen_module, our_learner
from .lite0 import DEFAULT as LITE0_DEFAULT, QUICK as LITE0_QUICK, compare, table

DEFAULT = dict(size=128, bs=32, n_train=128, n_valid=32, reps=4, lr=1e-3)
QUICK = dict(size=64, bs=32, n_train=32, n_valid=32, reps=1, lr=1e-3)

VARIANTS = {
    "fastai": "fastai default freeze (`train_bn=True`)",
    "fastai_bnfreeze": "fastai `train_bn=False` + `BnFreeze`",
    "fast": "ours: fast frozen body (`train_bn=False`)",
    "cache": "ours: feature cache, epochs 2+",
}


def mode_str(mode) -> str:
    "`learn.fast_frozen_mode` for the report: None when no fast-path callback is attached."
    return "no callback" if mode is None else f"`{mode}`" if mode else "off"


def _learners(model: str, cfg: dict, with_cache: bool) -> dict:
    "The frozen Learners to time for `model` ('resnet34' or LITE0), each on its own DataLoaders, with a timer."
    import torchvision
    from fastai.callback.training import BnFreeze
    from fastai_groups import product_sample
    path = product_sample()
    fastai_arch = LITE0 if model == LITE0 else getattr(torchvision.models, model)
    ours_arch, pretrained = (f"timm:{LITE0}", True) if model == LITE0 else (model, False)

    def dls():
        return folder_dls(path, cfg["size"], cfg["bs"], cfg["n_train"], cfg["n_valid"])

    out = {"fastai": fastai_learner(dls(), fastai_arch, cfg["lr"], cbs=[epoch_timer()]),
           "fastai_bnfreeze": fastai_learner(dls(), fastai_arch, cfg["lr"], cbs=[epoch_timer(), BnFreeze()],
                                             train_bn=False),
           "fast": our_learner(dls(), ours_arch, cfg["lr"], pretrained, train_bn=False, cbs=[epoch_timer()])}
    if with_cache:
        out["cache"] = our_learner(dls(), ours_arch, cfg["lr"], pretrained, train_bn=False, cache=True,
                                   cbs=[epoch_timer()])
    for learn in out.values():
        learn.freeze()
    return out


def _timer(learn):
    return next(cb for cb in learn.cbs if type(cb).__name__ == "EpochTimer")


def time_model(model: str, cfg: dict, with_cache: bool) -> dict:
    "Per variant: epoch times (s) of the timed repetitions, train/valid phase times, the fast-path mode seen."
    learners = _learners(model, cfg, with_cache)

    def fit(k):
        learn = learners[k]
        with learn.no_bar(), learn.no_logging(), quiet():
            learn.fit(1, cfg["lr"])

    fill = None
    for k in learners:  # warm-up round; the cache Learner comes last, its first epoch builds the cache
        t = time.perf_counter()
        fit(k)
        if k == "cache":
            fill = time.perf_counter() - t
    names = list(learners)
    for r in range(cfg["reps"]):
        for k in (names if r % 2 == 0 else names[::-1]):
            fit(k)
    out = {}
    for k, learn in learners.items():
        epochs = [f[0] for f in _timer(learn).fits[1:]]
        out[k] = {"epoch": [e["epoch"] for e in epochs], "train": median(e["train"] for e in epochs),
                  "valid": median(e["valid"] for e in epochs), "mode": epochs[-1]["mode"],
                  "batches": len(epochs[-1]["batches"])}
    if fill is not None:
        out["cache"]["fill"] = fill
    return out


def timing(ctx: Context, sec: Section, cfg: dict, with_cache: bool) -> None:
    sec.add(f"**Frozen-epoch time**, {cfg['size']} px, batch {cfg['bs']}, {cfg['n_train']} train + "
            f"{cfg['n_valid']} valid images of the sample; {cfg['reps']} interleaved epochs per variant after one "
            "warm-up epoch each; ratios use the minimum epoch time. `mode` is `learn.fast_frozen_mode` after the "
            "epoch (`no callback`: no fast-path callback attached).", "")
    for model in ("resnet34", LITE0):
        log(f"  frozen epochs: {model}")
        res = time_model(model, cfg, with_cache)
        base = min(res["fastai"]["epoch"])
        rows = []
        for k, r in res.items():
            ep = min(r["epoch"])
            rows.append([VARIANTS[k], fmt_time(ep), fmt_time(median(r["epoch"])), fmt_time(r["train"]),
                         fmt_time(r["valid"]), mode_str(r["mode"]),
                         "1 (reference)" if k == "fastai" else speedup(ep, base)])
        sec.add(f"`{model}`:", "", *md_table(["variant", "epoch (min)", "epoch (median)", "train phase (median)",
                                              "valid phase (median)", "mode", "vs fastai default (min)"], rows), "")
        if "cache" in res:
            sec.add(f"Feature cache, first epoch (computes the features of all {cfg['n_train'] + cfg['n_valid']} "
                    f"images, then trains the head): {fmt_time(res['cache']['fill'])}.", "")
        fast = min(res["fast"]["epoch"])
        sec.figures.append(Figure(f"frozen epoch, fast frozen body vs fastai default, `{model}` {cfg['size']} px",
                                  fmt_time(fast), fmt_time(base), speedup(fast, base), ">= 1.8x",
                                  base / fast >= 1.8))
        fb = min(res["fastai_bnfreeze"]["epoch"])
        sec.figures.append(Figure(f"frozen epoch, fast frozen body vs fastai `train_bn=False` + `BnFreeze`, "
                                  f"`{model}` {cfg['size']} px", fmt_time(fast), fmt_time(fb), speedup(fast, fb)))
        if "cache" in res:
            c = min(res["cache"]["epoch"])
            sec.figures.append(Figure(f"frozen epochs 2+, feature cache vs fastai default, `{model}` {cfg['size']} px",
                                      fmt_time(c), fmt_time(base), speedup(c, base), ">= 10x", base / c >= 10))


def accuracy(ctx: Context, sec: Section, with_cache: bool) -> None:
    from fastai_groups import product_sample
    cfg = LITE0_QUICK if ctx.quick else LITE0_DEFAULT
    kinds = ("fastai", "ours", "ours_plain", "ours_fast") + (("ours_cache",) if with_cache else ())
    res = compare(ctx, "sample", product_sample(), kinds, cfg)
    sec.add(f"**Accuracy per freeze mode**: lite0 `fine_tune({cfg['epochs']}, {cfg['lr']})` on the bundled sample, "
            f"{cfg['size']} px, seeds {tuple(cfg['seeds'])}; the frozen epoch is where the modes differ. Fast-path "
            "mode seen in the frozen epoch (`learn.fast_frozen_mode`): " + ", ".join(
                f"{k}: {mode_str(rs[0]['frozen_mode'])}" for k, rs in res.items()) + ".", "", *table(res, cfg["seeds"]))
    ref_m, ref_s = mean_std(r["acc"] for r in res["ours"])
    m, s = mean_std(r["acc"] for r in res["ours_fast"])
    sec.figures.append(Figure("fine_tune accuracy, fast frozen body (`train_bn=False`) vs fastai's freeze "
                              "(`train_bn=True`), both `group_learner`, lite0 on the sample",
                              f"{m * 100:.1f} ± {s * 100:.1f}%", f"{ref_m * 100:.1f} ± {ref_s * 100:.1f}%",
                              f"{(m - ref_m) * 100:+.1f} points", "no loss beyond 1 std", (m - ref_m) >= -max(s, ref_s)))
    equal = {}
    for k in ("ours_fast", "ours_cache"):
        if k in res:
            equal[k] = all(a["acc"] == b["acc"] for a, b in zip(res[k], res["ours_plain"]))
            sec.figures.append(Figure(f"fine_tune accuracy per seed, {KINDS[k][0]} vs the plain `train_bn=False` + "
                                      "`BnFreeze` path (lite0, sample)",
                                      ", ".join(f"{r['acc'] * 100:.1f}" for r in res[k]),
                                      ", ".join(f"{r['acc'] * 100:.1f}" for r in res["ours_plain"]),
                                      "identical" if equal[k] else "different", "identical", equal[k]))
    sec.add("", "Reading the table: `ours` (`train_bn=True`) and the three `train_bn=False` rows differ by freeze "
                "mode only. With `train_bn=True` the frozen epoch also adapts the body's BatchNorm statistics and "
                "affine parameters to the data (grayscale product photos, far from ImageNet); with "
                "`train_bn=False` (fastai's `BnFreeze` semantics, Keras' rule) it does not. The fast paths must "
                "reproduce the plain `train_bn=False` + `BnFreeze` run: per-seed accuracies "
                + ("are identical." if equal and all(equal.values()) else
                   "differ: " + ", ".join(k for k, v in equal.items() if not v) + " (see the table)."))


def run(ctx: Context) -> Section:
    cfg = QUICK if ctx.quick else DEFAULT
    sec = Section("frozen", "The frozen phase: fast frozen body and feature cache vs fastai's frozen epoch")
    frozen = frozen_module()
    if frozen is None:
        sec.skip("fastai_groups.frozen is not available (ImportError): the fast frozen body and the feature cache "
                 "cannot be measured; the rows below are `train_bn=False` alone")
    with_cache = frozen is not None and hasattr(frozen, "FeatureCache")
    if frozen is not None and not with_cache:
        sec.skip("feature cache: fastai_groups.frozen has no FeatureCache")
    timing(ctx, sec, cfg, with_cache)
    accuracy(ctx, sec, with_cache)
    return sec
