"""Per-batch overhead of `GroupLogger`: the same fit with and without it, side by side in one run.

resnet18 (torchvision, random init, 10 classes) at 32 px, batch 16, CPU, `auto_splitter` groups (6 groups), Adam,
all groups trainable; data: random in-memory tensors (no image decoding, so the step is as short as it gets and
any per-batch cost shows). Three Learners with identical models and data: without the logger, with it, and a
second one without it (an A/A control that shows the noise floor of the machine). Each repetition runs one
short epoch (2 batches) of each, the order rotating, after one warm-up epoch each: many short, adjacent epochs
pair up better than few long ones when other processes share the cores.

Two measures:
- end to end: time per batch (from one `before_batch` to the next, or to the end of the epoch: the step, data
  loading and every callback included), the median over repetitions of the paired ratio
  with / without - 1; the same for control / without gives the noise floor;
- direct: time spent inside `GroupLogger.after_batch` (its only per-batch event), per batch, as a fraction of
  the median batch time without the logger. This is the cost itself, free of scheduling noise.
"""
from __future__ import annotations

import copy
import time

from .common import Context, Figure, Section, epoch_timer, fmt_time, md_table, median, quiet

DEFAULT = dict(n_items=32, bs=16, size=32, reps=24)
QUICK = dict(n_items=32, bs=16, size=32, reps=3)


def timed_logger():
    "A `GroupLogger` that also adds up the time spent in its `after_batch`."
    from fastai_groups import GroupLogger

    class TimedGroupLogger(GroupLogger):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.spent = []

        def after_batch(self):
            t = time.perf_counter()
            super().after_batch()
            self.spent.append(time.perf_counter() - t)

    return TimedGroupLogger(show_table=False)


def make_dls(n_items: int, bs: int, size: int):
    "fastai DataLoaders over random in-memory images (10 classes); a one-batch validation set."
    import torch
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_items + bs, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n_items + bs,), generator=g)
    train = list(zip(x[:n_items], y[:n_items]))
    valid = list(zip(x[n_items:], y[n_items:]))
    return DataLoaders(DataLoader(train, bs=bs, shuffle=True, drop_last=True),
                       DataLoader(valid, bs=bs))


def run(ctx: Context) -> Section:
    import torch
    import torchvision
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai_groups import auto_splitter
    cfg = QUICK if ctx.quick else DEFAULT
    sec = Section("logger", "GroupLogger per-batch overhead")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    names = ("without", "with", "control")
    timers = {k: epoch_timer() for k in names}
    logger = timed_logger()
    learners = {}
    for k in names:
        cbs = [timers[k]] + ([logger] if k == "with" else [])
        learners[k] = Learner(make_dls(cfg["n_items"], cfg["bs"], cfg["size"]), copy.deepcopy(model),
                              loss_func=CrossEntropyLossFlat(), splitter=auto_splitter, cbs=cbs)

    def fit(k):
        with learners[k].no_bar(), learners[k].no_logging(), quiet():
            learners[k].fit(1, 1e-3)

    for k in names:  # warm-up epoch each, not timed
        fit(k)
    n_warm = len(logger.spent)
    for r in range(cfg["reps"]):
        for i in range(len(names)):
            fit(names[(r + i) % len(names)])
    per_batch = {k: [median(f[0]["batches"]) for f in timers[k].fits[1:]] for k in names}
    ratios = {k: [a / b for a, b in zip(per_batch[k], per_batch["without"])] for k in ("with", "control")}
    overhead, noise = median(ratios["with"]) - 1, median(ratios["control"]) - 1
    base = median(per_batch["without"])
    inside = median(logger.spent[n_warm:])
    direct = inside / base
    n_groups = len(learners["with"].opt.param_groups)
    n_batches = len(timers["with"].fits[-1][0]["batches"])

    sec.add(f"resnet18, {cfg['size']} px, batch {cfg['bs']}, {n_groups} groups, {n_batches} batches per epoch, "
            f"{cfg['reps']} rotating epochs per Learner after 1 warm-up epoch each.", "")
    sec.add(*md_table(
        ["Learner", "median time per batch", "min over epochs", "paired ratio to `without` (median)",
         "GroupLogger.after_batch per batch"],
        [["without GroupLogger", fmt_time(base), fmt_time(min(per_batch["without"])), "1 (reference)", ""],
         ["with GroupLogger", fmt_time(median(per_batch["with"])), fmt_time(min(per_batch["with"])),
          f"{1 + overhead:.4f}", fmt_time(inside)],
         ["without GroupLogger (A/A control)", fmt_time(median(per_batch["control"])),
          fmt_time(min(per_batch["control"])), f"{1 + noise:.4f}", ""]]))
    sec.add("", f"End to end: {overhead * 100:+.2f}% time per batch with the logger; the A/A control (no logger on "
                f"either side) reads {noise * 100:+.2f}%, the noise floor of this run. Direct cost: "
                f"{fmt_time(inside)} inside the callback per batch = {direct * 100:.3f}% of a batch.")
    sec.figures.append(Figure("GroupLogger overhead per batch (resnet18, 32 px, bs 16), end to end "
                              f"(A/A noise floor {noise * 100:+.2f}%)",
                              fmt_time(median(per_batch["with"])), fmt_time(base), f"{overhead * 100:+.2f}% time",
                              "<= 1%", overhead <= 0.01))
    sec.figures.append(Figure("GroupLogger overhead per batch, time inside the callback", fmt_time(inside),
                              fmt_time(base), f"{direct * 100:+.3f}% time", "<= 1%", direct <= 0.01))
    return sec
