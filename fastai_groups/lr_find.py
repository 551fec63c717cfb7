"""`group_lr_find`: fastai's learning-rate finder for discriminative rates, every group following the ratios of
`slice(lr/lr_mult, lr)`; `GroupLRFinder` is the sweep as a callback. (fastai's `LRFinder` accepts lists of start
and end lrs, but its `ParamScheduler` then calls the list: a `TypeError` in fastai 2.8. So the sweep is one
`SchedExp` over arrays of per-group lrs, inside fastai's `LRFinder`.)
"""
from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np
import torch
from fastai.callback.schedule import LRFinder, SchedExp, valley
from fastai.learner import Learner
from fastai.torch_core import tensor
from fastcore.basics import even_mults

__all__ = ["GroupLRFinder", "group_lr_find", "slice_ratios"]


def slice_ratios(n: int, lr_mult: float) -> list[float]:
    """The lr of each of `n` groups relative to the last one, as fastai spreads `slice(lr/lr_mult, lr)`
    (`even_mults`: geometric steps from `1/lr_mult` to `1`).

    >>> [round(r, 4) for r in slice_ratios(3, 100)]
    [0.01, 0.1, 1.0]
    """
    if n < 1:
        raise ValueError(f"need at least one group, got {n}")
    if n == 1:
        return [1.0]
    return [float(r) for r in even_mults(1 / lr_mult, 1.0, n)]


class GroupLRFinder(LRFinder):
    """fastai's `LRFinder` where the sweep sets the last group's lr and every other group follows the ratios of
    `slice(lr/lr_mult, lr)`. It registers as `learn.lr_finder`, so callbacks that stay inert in `lr_find`
    (`GroupLogger`, TensorBoard, W&B) stay inert here too. See `group_lr_find` for the arguments.

    Example: `learn.fit(100, cbs=GroupLRFinder(lr_mult=100))`, as `group_lr_find(learn)` does."""

    def __init__(self, lr_mult: float = 100, start_lr: float = 1e-7, end_lr: float = 10, num_it: int = 100,
                 stop_div: bool = True):
        super().__init__(start_lr=start_lr, end_lr=end_lr, num_it=num_it, stop_div=stop_div)
        self.lr_mult, self.start_lr, self.end_lr = lr_mult, start_lr, end_lr

    @property
    def name(self):
        return "lr_finder"

    def before_fit(self):
        "Build the per-group exponential schedules, then save the model like fastai's `LRFinder`."
        r = np.array(slice_ratios(len(self.learn.opt.param_lists), self.lr_mult))
        self.scheds = {"lr": SchedExp(self.start_lr * r, self.end_lr * r)}
        super().before_fit()


def group_lr_find(learn: Learner, lr_mult: float = 100, start_lr: float = 1e-7, end_lr: float = 10,
                  num_it: int = 100, stop_div: bool = True, show_plot: bool = True,
                  suggest_funcs: Sequence[Callable] | Callable | None = (valley,)):
    """Learning-rate range test for discriminative rates: like `learn.lr_find()`, but the sweep sets the last
    group's lr and every group `i` of `n` gets `lr * slice_ratios(n, lr_mult)[i]`, exactly what
    `fit_one_cycle(..., slice(lr/lr_mult, lr))` will use. Model and optimizer are restored afterwards.

    Args:
        learn: the `Learner` (with its parameter groups, e.g. `splitter=auto_splitter`).
        lr_mult: ratio between the last and the first group's lr. Example: `lr_mult=100` for `slice(lr/100, lr)`.
        start_lr: the last group's lr at the start of the sweep. Example: `1e-7`.
        end_lr: the last group's lr at the end of the sweep. Example: `10`.
        num_it: number of iterations of the sweep. Example: `100`.
        stop_div: stop when the loss diverges (4x the best smoothed loss).
        show_plot: plot the loss against the last group's lr, with the suggestions.
        suggest_funcs: fastai suggestion functions (`valley`, `slide`, `minimum`, `steep`), or None.

    Returns:
        A `SuggestedLRs` named tuple (one field per suggestion function) of lrs for the last group, or None when
        `suggest_funcs` is None. Example: `lr = group_lr_find(learn).valley; learn.fit_one_cycle(3, slice(lr/100, lr))`.
    """
    n_epoch = num_it // len(learn.dls.train) + 1
    cb = GroupLRFinder(lr_mult=lr_mult, start_lr=start_lr, end_lr=end_lr, num_it=num_it, stop_div=stop_div)
    with learn.no_logging():
        learn.fit(n_epoch, cbs=cb)
    rec = learn.recorder
    n = len(learn.opt.param_lists) if learn.opt is not None else 1
    xlabel = (f"learning rate of the last group (usually the head)\nthe first group gets {lr_mult:g} times less, "
              "the groups between are spaced evenly on a log scale" if n > 1 else "learning rate")
    if suggest_funcs is None:
        if show_plot:
            _plot_sweep(rec, xlabel)
        return None
    lrs = tensor([float(o) for o in rec.lrs[num_it // 10:-5]])
    losses = tensor([float(o) for o in rec.losses[num_it // 10:-5]])
    nan = torch.nonzero(torch.isnan(losses))
    if len(nan):
        lrs, losses = lrs[:int(nan[0])], losses[:int(nan[0])]
    funcs = suggest_funcs if isinstance(suggest_funcs, (list, tuple)) else (suggest_funcs,)
    nms = [getattr(f, "func", f).__name__ for f in funcs]
    found = [f(lrs, losses, num_it) for f in funcs]
    if show_plot:
        _plot_sweep(rec, xlabel, [p for _, p in found], nms)
    return collections.namedtuple("SuggestedLRs", nms)(*[lr for lr, _ in found])


def _plot_sweep(rec, xlabel: str, suggestions=None, nms=None):
    import matplotlib.pyplot as plt
    rec.plot_lr_find(suggestions=suggestions, nms=nms)
    plt.gca().set_xlabel(xlabel)
