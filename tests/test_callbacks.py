"""GroupLogger and GradualUnfreeze on real fastai Learners (tiny residual CNN, 32 px PNGs)."""
import math
import pickle

import numpy as np
import pandas as pd
import fastai.callback.hook  # noqa: F401  (adds Learner.summary)
import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import load_learner
from torch import nn

from fastai_groups.callbacks import (GradualUnfreeze, GroupLogger, freeze_state, slice_ratios)
from fastai_groups.splitters import auto_splitter
from models import SPLIT3, N_GROUPS, make_learner


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "The tiny model trains fastest on one thread, and a busy 2-core runner makes OpenMP threads spin; restored after."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StepProbe(Callback):
    "Test-only: per training batch, the hypers seen in `before_step` and the requires_grad counts after GroupLogger."
    order = GroupLogger.order + 1

    def __init__(self):
        self.lrs, self.counts, self.n_batches = [], [], 0

    def before_step(self):
        self.lrs.append([h["lr"] for h in self.learn.opt.hypers])

    def after_batch(self):
        if self.learn.training:
            self.n_batches += 1
            self.counts.append([sum(p.numel() for p in pg if p.requires_grad) for pg in self.learn.opt.param_lists])


def per_group(df, col):
    "(n_iters, n_groups) array of `col`."
    return df.pivot(index="iter", columns="group", values=col).to_numpy()


@pytest.fixture(scope="module")
def tuned(image_folder):
    "A 3-group learner after `fine_tune(1)` with a GroupLogger writing groups.csv (shared by several tests)."
    probe = StepProbe()
    learn = make_learner(image_folder, cbs=[GroupLogger("groups.csv"), probe])
    learn.fine_tune(1, base_lr=1e-3)
    return learn, probe


# ----------------------------------------------------------------------------------------------------------- unit
def test_helpers():
    assert slice_ratios(1, 100) == [1.0]
    assert np.allclose(slice_ratios(3, 100), [0.01, 0.1, 1.0])
    assert np.allclose(slice_ratios(5, 16), [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1])
    assert [freeze_state(*a) for a in [(5, 5), (0, 5), (1, 5)]] == ["trainable", "frozen", "partial"]
    with pytest.raises(ValueError):
        GradualUnfreeze(every=0)


# ------------------------------------------------------------------------------------------------------ GroupLogger
def test_fine_tune_rates_states_counts(tuned):
    learn, probe = tuned
    df = learn.group_logger.history
    n_batches = len(learn.dls.train)
    assert list(df.columns[:5]) == ["iter", "epoch", "fit", "group", "name"]
    assert list(df.columns[-3:]) == ["params", "trainable", "state"]
    assert {"lr", "mom", "wd", "sqr_mom", "eps"} <= set(df.columns)
    assert len(df) == 2 * n_batches * N_GROUPS
    assert df["iter"].tolist() == [i for i in range(2 * n_batches) for _ in range(N_GROUPS)]
    assert df.groupby("fit")["iter"].nunique().tolist() == [n_batches, n_batches]
    assert (df["epoch"] == 0).all()
    assert df["name"].iloc[:N_GROUPS].tolist() == auto_splitter(learn.model, granularity="fastai").names

    lr = per_group(df, "lr")
    fit = df.pivot(index="iter", columns="group", values="fit").to_numpy()[:, 0]
    # fine_tune: freeze phase slice(base_lr) -> [lr/10, lr/10, lr]; then slice(base_lr/2/100, base_lr/2)
    assert np.allclose(lr[fit == 0] / lr[fit == 0, -1:], [0.1, 0.1, 1.0])
    assert np.allclose(lr[fit == 1] / lr[fit == 1, -1:], [0.01, 0.1, 1.0])
    # one-cycle starts: lr_max/div, with div=25 in the freeze phase, and div=5, lr_max=base_lr/2 after
    assert math.isclose(lr[fit == 0, -1][0], 1e-3 / 25, rel_tol=1e-9)
    assert math.isclose(lr[fit == 1, -1][0], 1e-3 / 2 / 5, rel_tol=1e-9)
    # the values logged are those the optimizer step used
    assert np.array_equal(lr, np.array(probe.lrs))
    # trainable counts are the model's requires_grad counts at every step; train_bn keeps frozen BN trainable
    assert np.array_equal(per_group(df, "trainable"), np.array(probe.counts))
    state = per_group(df, "state")
    assert (state[fit == 0] == ["partial", "partial", "trainable"]).all()
    assert (state[fit == 1] == "trainable").all()
    assert (per_group(df, "params") == [sum(p.numel() for p in pg) for pg in learn.opt.param_lists]).all()


def test_table_printed_once_per_fit(image_folder, capsys):
    learn = make_learner(image_folder, cbs=[GroupLogger()])
    learn.freeze()
    learn.fit(1, lr=slice(1e-3))
    out = capsys.readouterr().out
    assert out.count("GroupLogger: fit 0") == 1
    assert "stem-stage1" in out and "partial" in out and "1.00e-04" in out
    learn.group_logger.show_table = False
    learn.fit(1, lr=1e-3)
    assert "GroupLogger" not in capsys.readouterr().out


def test_csv_equals_dataframe(tuned):
    learn, _ = tuned
    df = learn.group_logger.history
    csv = pd.read_csv(learn.path / "groups.csv")
    pd.testing.assert_frame_equal(csv, df, check_dtype=False)
    assert len(csv) == len(df)


class CrashAt(Callback):
    "Test-only: an error (not a fastai Cancel*) in the second epoch, so `after_epoch`/`after_fit` never run."
    order = 0

    def before_batch(self):
        if self.learn.training and self.learn.epoch == 1 and self.learn.iter == 1:
            raise RuntimeError("interrupted")


def test_csv_survives_interruption(image_folder):
    learn = make_learner(image_folder, cbs=[GroupLogger("crash.csv", show_table=False)])
    crash = CrashAt()
    with pytest.raises(RuntimeError, match="interrupted"):
        learn.fit(3, lr=1e-3, cbs=crash)
    lg, path = learn.group_logger, learn.path / "crash.csv"
    df = lg.history
    assert df["epoch"].max() == 1                       # one batch of epoch 1 recorded in memory
    pd.testing.assert_frame_equal(pd.read_csv(path), df[df["epoch"] == 0], check_dtype=False)  # on disk: epoch 0
    learn.remove_cb(crash)
    learn.fit(1, lr=1e-3)                               # next fit: new fit index, the file catches up
    df = lg.history
    assert df["fit"].unique().tolist() == [0, 1]
    assert df["iter"].tolist() == [i for i in range(df["iter"].nunique()) for _ in range(N_GROUPS)]
    pd.testing.assert_frame_equal(pd.read_csv(path), df, check_dtype=False)


def test_csv_appended_within_an_epoch(image_folder):
    "With `flush_secs=0` every batch reaches the file: a crash mid-epoch loses nothing already recorded."
    lg = GroupLogger("mid.csv", show_table=False)
    lg.flush_secs = 0
    learn = make_learner(image_folder, cbs=[lg])
    with pytest.raises(RuntimeError, match="interrupted"):
        learn.fit(3, lr=1e-3, cbs=CrashAt())
    df = lg.history
    assert df["epoch"].max() == 1
    pd.testing.assert_frame_equal(pd.read_csv(learn.path / "mid.csv"), df, check_dtype=False)


def test_inert_outside_training(tuned, capsys):
    learn, _ = tuned
    lg = learn.group_logger
    before, n_fit = len(lg.history), lg.state_dict()["n_fit"]
    csv_before = (learn.path / "groups.csv").read_text()
    learn.lr_find(num_it=10, show_plot=False)
    learn.validate()
    learn.get_preds()
    learn.summary()
    assert len(lg.history) == before and lg.state_dict()["n_fit"] == n_fit
    assert (learn.path / "groups.csv").read_text() == csv_before
    assert "GroupLogger" not in capsys.readouterr().out


def test_plot_png(tuned, tmp_path):
    import matplotlib.pyplot as plt
    fig = tuned[0].group_logger.plot()
    out = tmp_path / "groups.png"
    fig.savefig(out)
    plt.close(fig)
    assert out.stat().st_size > 10_000


def test_plot_30_groups(image_folder, tmp_path):
    "30 groups (one per layer), 10 frozen: one legend entry and one freeze band per group, frozen bands shaded."
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + [nn.Conv2d(4, 4, 3, padding=1) for _ in range(28)]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    per_layer = lambda m: [list(c.parameters()) for c in m if any(True for _ in c.parameters())]
    learn = make_learner(image_folder, cbs=[GroupLogger(show_table=False)], splitter=per_layer)
    learn.model = model
    learn.freeze_to(10)
    learn.fit(1, lr=slice(1e-5, 1e-3))
    lrs = learn.group_logger.history.groupby("group")["lr"].first()
    assert lrs.iloc[0] == pytest.approx(1e-5) and lrs.iloc[-1] == pytest.approx(1e-3) and lrs.is_monotonic_increasing
    fig = learn.group_logger.plot()
    ax, axm = fig.axes
    assert len(ax.get_legend().get_texts()) == 30
    assert [t.get_text() for t in axm.get_yticklabels()] == [f"group{i}" for i in range(30)]
    shaded = {round(p.get_y() + 0.5) for p in axm.patches if isinstance(p, Rectangle)}
    assert shaded == set(range(10))  # exactly the frozen groups
    fig.savefig(tmp_path / "g30.png")
    plt.close(fig)
    assert (tmp_path / "g30.png").stat().st_size > 10_000


def test_export_load_and_pickle(tuned, tmp_path):
    learn, _ = tuned
    df = learn.group_logger.history
    learn.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    pd.testing.assert_frame_equal(loaded.group_logger.history, df)
    lg = pickle.loads(pickle.dumps(loaded.group_logger))
    pd.testing.assert_frame_equal(lg.history, df)


def test_frozen_without_train_bn_and_unnamed_groups(image_folder):
    unnamed = lambda m: [list(g) for g in SPLIT3(m)]   # plain lists: no names to find
    probe = StepProbe()
    learn = make_learner(image_folder, cbs=[GroupLogger(show_table=False), probe], splitter=unnamed, train_bn=False)
    learn.freeze()
    learn.fit(1, lr=1e-3)
    df = learn.group_logger.history
    assert (per_group(df, "state") == ["frozen", "frozen", "trainable"]).all()
    assert (per_group(df, "trainable")[:, :2] == 0).all()
    assert np.array_equal(per_group(df, "trainable"), np.array(probe.counts))
    assert df["name"].iloc[:3].tolist() == ["group0", "group1", "group2"]


class FlipAt(Callback):
    "Test-only: freezes a group by hand (requires_grad, no freeze_to) before batch `at` of the first epoch."
    order = 0

    def __init__(self, at):
        self.at = at

    def before_batch(self):
        if self.learn.training and self.learn.iter == self.at and self.learn.epoch == 0:
            for p in self.learn.opt.param_lists[0]:
                p.requires_grad_(False)


def test_scan_every_batch_and_rank(image_folder, monkeypatch):
    probe = StepProbe()
    learn = make_learner(image_folder, cbs=[GroupLogger("g.csv", show_table=False, scan_every_batch=True),
                                            FlipAt(2), probe])
    learn.unfreeze()
    monkeypatch.setenv("RANK", "1")                  # a non-zero rank writes no file
    learn.fit(1, lr=1e-3)
    assert not (learn.path / "g.csv").exists()
    df = learn.group_logger.history
    assert np.array_equal(per_group(df, "trainable"), np.array(probe.counts))
    assert per_group(df, "state")[:, 0].tolist() == ["trainable"] * 2 + ["frozen"] * (len(learn.dls.train) - 2)


def test_freeze_state_reaches_tensorboard(image_folder, tmp_path):
    "With fastai's own TensorBoardCallback, GroupLogger adds only the freeze state (trainable_i), once per batch."
    pytest.importorskip("tensorboard")
    from fastai.callback.tensorboard import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log_dir = tmp_path / "tb"
    learn = make_learner(image_folder, cbs=[GroupLogger(show_table=False),
                                            TensorBoardCallback(log_dir=log_dir, trace_model=False)])
    learn.freeze()
    learn.fit(1, lr=1e-3)
    acc = EventAccumulator(str(log_dir)).Reload()
    tags = set(acc.Tags()["scalars"])
    hypers = {f"{k}_{i}" for i, h in enumerate(learn.opt.hypers) for k in h}
    assert hypers <= tags                                                         # fastai logs these itself
    added = sorted(t for t in tags if t.startswith("trainable_"))
    assert added == ["trainable_0", "trainable_1", "trainable_2"]
    assert len(acc.Scalars("trainable_0")) == len(learn.dls.train)                 # once per training batch
    last = {t: acc.Scalars(t)[-1].value for t in added}
    assert last["trainable_2"] == 1.0 and 0 < last["trainable_0"] < 1


# -------------------------------------------------------------------------------------------------- GradualUnfreeze
def test_gradual_unfreeze_schedule(image_folder, capsys):
    probe = StepProbe()
    learn = make_learner(image_folder, cbs=[GroupLogger(), probe])
    learn.fit_one_cycle(3, slice(1e-4, 1e-2), cbs=GradualUnfreeze())
    df = learn.group_logger.history
    assert np.array_equal(per_group(df, "trainable"), np.array(probe.counts))
    states = df.groupby(["epoch", "group"])["state"].agg(set).unstack().map(lambda s: s.pop() if len(s) == 1 else s)
    assert states.to_numpy().tolist() == [["partial", "partial", "trainable"],
                                          ["partial", "trainable", "trainable"],
                                          ["trainable", "trainable", "trainable"]]
    # the change shows at the first iteration of its epoch
    first = df.groupby("epoch")["iter"].min().tolist()
    assert first == [0, len(learn.dls.train), 2 * len(learn.dls.train)]
    # the slice's rates are kept
    lr = per_group(df, "lr")
    assert np.allclose(lr / lr[:, -1:], [0.01, 0.1, 1.0])
    assert capsys.readouterr().out.count("GroupLogger: fit 0") == 3   # table again at each change


def test_gradual_unfreeze_every_start_lr_mult(image_folder):
    probe = StepProbe()
    learn = make_learner(image_folder, cbs=[GroupLogger(show_table=False), probe])
    learn.fit(2, lr=1e-3, cbs=GradualUnfreeze(every=2, start=2, lr_mult=100))
    df = learn.group_logger.history
    assert (per_group(df, "state") == ["partial", "trainable", "trainable"]).all()   # start=2, next at epoch 2
    assert np.allclose(np.array(probe.lrs), [1e-5, 1e-4, 1e-3])
