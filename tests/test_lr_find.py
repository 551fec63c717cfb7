"""group_lr_find (fastai_groups/lr_find.py) on a real fastai Learner (tiny residual CNN, 32 px PNGs)."""

import numpy as np
import torch
from fastai.callback.core import Callback

from fastai_groups.callbacks import GroupLogger
from fastai_groups.lr_find import group_lr_find, slice_ratios
from models import make_learner


# ---------------------------------------------------------------------------------------------------- group_lr_find
class SweepProbe(Callback):
    "Test-only: per-group lrs at every step, recorded even during lr_find."
    def __init__(self):
        self.lrs = []

    def before_step(self):
        self.lrs.append([float(h["lr"]) for h in self.learn.opt.hypers])


def test_group_lr_find(image_folder):
    import matplotlib.pyplot as plt
    sweep = SweepProbe()
    learn = make_learner(image_folder, cbs=[GroupLogger(), sweep])
    learn.fit(1, lr=1e-3)
    n_rows = len(learn.group_logger.history)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    hypers = [dict(h) for h in learn.opt.hypers]
    sweep.lrs.clear()
    res = group_lr_find(learn, lr_mult=100, start_lr=1e-6, end_lr=1, num_it=12, stop_div=False)
    assert plt.gca().get_xlabel() == ("learning rate of the last group (usually the head)\nthe first group gets 100 "
                                      "times less, the groups between are spaced evenly on a log scale")
    plt.close("all")
    lrs = np.array(sweep.lrs)
    assert len(lrs) == 12
    assert np.allclose(lrs / lrs[:, -1:], slice_ratios(3, 100))
    assert np.allclose(lrs[:, -1], 1e-6 * (1e6) ** (np.arange(12) / 12))
    assert res.valley > 0 and hasattr(res, "_fields")
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in weights.items())
    assert [dict(h) for h in learn.opt.hypers] == hypers
    assert len(learn.group_logger.history) == n_rows and not hasattr(learn, "lr_finder")
