"""GroupLogger and GradualUnfreeze on real fastai Learners (tiny residual CNN, 32 px PNGs)."""
import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import fastai.callback.hook  # noqa: F401  (adds Learner.summary)
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import load_learner
from torch import nn

from fastai_groups.callbacks import GradualUnfreeze, GroupLogger, freeze_state
from fastai_groups.lr_find import slice_ratios
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
    ax, axm = fig.axes[0], fig.axes[-1]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:30] == [f"{i}: group{i}" for i in range(30)]
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


# ------------------------------------------------------------------------------- CSV file: append, refuse, check
class BatchCount(Callback):
    "Test-only: counts training batches."
    def __init__(self):
        self.n = 0

    def after_batch(self):
        self.n += self.learn.training


def test_csv_appends_across_learners(image_folder, tmp_path):
    "A new Learner (as in a new process, fastai's plain `load`) continues the file: rows kept, iter/fit go on."
    path = tmp_path / "run.csv"
    first = make_learner(image_folder, cbs=[GroupLogger(path, show_table=False)])
    first.fit(2, lr=1e-3)
    before = pd.read_csv(path)
    n_iter = before["iter"].nunique()
    second = make_learner(image_folder, cbs=[GroupLogger(path, show_table=False)])
    second.fit(1, lr=1e-3)
    after = pd.read_csv(path)
    assert len(after) == len(before) + len(second.group_logger.history)
    pd.testing.assert_frame_equal(after.iloc[:len(before)], before)           # the first run's rows, untouched
    new = after.iloc[len(before):]
    assert new["iter"].tolist() == [i for i in range(n_iter, n_iter + n_iter // 2) for _ in range(N_GROUPS)]
    assert set(new["fit"]) == {1} and set(second.group_logger.history["fit"]) == {1}
    pd.testing.assert_frame_equal(new.reset_index(drop=True), second.group_logger.history, check_dtype=False)


def test_csv_append_false_refuses_an_existing_file(image_folder, tmp_path):
    path = tmp_path / "run.csv"
    make_learner(image_folder, cbs=[GroupLogger(path, show_table=False)]).fit(1, lr=1e-3)
    text = path.read_text()
    count = BatchCount()
    learn = make_learner(image_folder, cbs=[GroupLogger(path, show_table=False, append=False), count])
    with pytest.raises(FileExistsError, match=r"GroupLogger: .*run.csv already exists and append=False .*nothing "
                                              r"was changed: move or delete the file, pick another name, or use "
                                              r"append=True"):
        learn.fit(1, lr=1e-3)
    assert count.n == 0 and path.read_text() == text
    new = tmp_path / "new.csv"
    make_learner(image_folder, cbs=[GroupLogger(new, show_table=False, append=False)]).fit(1, lr=1e-3)
    assert len(pd.read_csv(new)) == 4 * N_GROUPS      # a new file: fine


def test_csv_of_something_else_is_refused(image_folder, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    count = BatchCount()
    learn = make_learner(image_folder, cbs=[GroupLogger(path, show_table=False), count])
    with pytest.raises(ValueError, match=r"other.csv exists but is not a GroupLogger log \(no iter and fit columns\); "
                                         r"give another file name, or move that file away"):
        learn.fit(1, lr=1e-3)
    assert count.n == 0 and path.read_text() == "a,b\n1,2\n"


def test_csv_other_optimizer_merges_columns(image_folder, tmp_path):
    "SGD's log (lr, mom, wd), then Adam's (sqr_mom, eps too) into the same file: every row, the union of columns."
    from fastai.optimizer import SGD
    path = tmp_path / "mixed.csv"
    make_learner(image_folder, cbs=[GroupLogger(path, show_table=False)], opt_func=SGD).fit(1, lr=1e-3)
    sgd = pd.read_csv(path)
    assert "eps" not in sgd.columns
    adam = make_learner(image_folder, cbs=[GroupLogger(path, show_table=False)])
    adam.fit(1, lr=1e-3)
    both = pd.read_csv(path)
    assert len(both) == len(sgd) + len(adam.group_logger.history)
    assert list(both.columns[:5]) == ["iter", "epoch", "fit", "group", "name"]
    assert list(both.columns[-3:]) == ["params", "trainable", "state"]
    assert set(both.columns) == set(sgd.columns) | set(adam.group_logger.history.columns)
    assert both["eps"].iloc[:len(sgd)].isna().all() and both["eps"].iloc[len(sgd):].notna().all()
    pd.testing.assert_frame_equal(both.iloc[:len(sgd)][list(sgd.columns)], sgd)
    assert both["iter"].is_monotonic_increasing
    adam.fit(1, lr=1e-3)                                  # same columns now: plain appends
    assert len(pd.read_csv(path)) == len(both) + 4 * N_GROUPS


@pytest.mark.parametrize("where", ["under_a_file", "sys"])
def test_unwritable_log_raises_before_training(image_folder, tmp_path, where):
    "Checked in before_fit: no batch is trained (tests run as root: a path under a file, and /sys, are unwritable)."
    (tmp_path / "file.txt").write_text("not a folder")
    fname = tmp_path / "file.txt" / "log.csv" if where == "under_a_file" else "log.csv"
    count = BatchCount()
    learn = make_learner(image_folder, cbs=[GroupLogger(fname, show_table=False), count])
    if where == "sys":
        learn.path = Path("/sys")
    with pytest.raises(OSError, match=r"GroupLogger cannot write its CSV file /.*log.csv: .*; give GroupLogger a "
                                      r"writable file, e.g. GroupLogger\('.*log.csv'\)"):
        learn.fit(1, lr=1e-3)
    assert count.n == 0


def test_log_path_relative_absolute_and_in_the_table(image_folder, tmp_path, monkeypatch, capsys):
    "A name goes under learn.path (the data folder); an absolute path or Path.cwd()/... as given; the table says."
    monkeypatch.chdir(tmp_path)
    for fname, where in (("rel.csv", image_folder / "rel.csv"), (tmp_path / "abs.csv", tmp_path / "abs.csv"),
                         (Path.cwd() / "sub" / "cwd.csv", tmp_path / "sub" / "cwd.csv")):
        learn = make_learner(image_folder, cbs=[GroupLogger(fname)])
        learn.fit(1, lr=1e-3)
        assert where.exists() and len(pd.read_csv(where)) == 4 * N_GROUPS
        first = capsys.readouterr().out.strip().splitlines()[0]
        assert first == f"GroupLogger: fit 0, epoch 0, iter 0, logging to {where}"
    assert not (tmp_path / "rel.csv").exists() and not (image_folder / "abs.csv").exists()


def test_table_starts_on_its_own_line(image_folder, capsys):
    "fastai's console progress bar leaves the cursor on its line: the table starts on a new one."
    learn = make_learner(image_folder, cbs=[GroupLogger()])
    learn.add_cb(ProgressCallback())
    learn.fit(1, lr=1e-3)
    out = capsys.readouterr().out
    assert out.count("GroupLogger: fit 0") == 1 and "\nGroupLogger: fit 0" in out


# ------------------------------------------------------------------------------------------ epochs and the plot
def _artists(fig):
    lines = {l.get_gid(): l for a in fig.axes for l in a.get_lines() if l.get_gid()}
    texts = {t.get_gid(): t.get_text() for a in fig.axes for t in a.texts if t.get_gid()}
    return lines, texts


def test_epochs_metrics_and_state(image_folder):
    "At each epoch end: the last iteration and recorder's losses and metrics (plain floats), kept in the state."
    from fastai.metrics import accuracy
    learn = make_learner(image_folder, cbs=[GroupLogger(show_table=False)], metrics=accuracy)
    learn.fine_tune(2, base_lr=1e-3)
    lg = learn.group_logger
    ep = lg.epochs
    assert list(ep.columns) == ["iter", "epoch", "fit", "train_loss", "valid_loss", "accuracy"]
    assert ep[["iter", "epoch", "fit"]].values.tolist() == [[3, 0, 0], [7, 0, 1], [11, 1, 1]]   # 4 batches/epoch
    assert np.allclose(ep[["train_loss", "valid_loss", "accuracy"]].iloc[1:].to_numpy(), learn.recorder.values)
    lg2 = GroupLogger()
    lg2.load_state_dict(lg.state_dict())
    pd.testing.assert_frame_equal(lg2.epochs, ep)


def test_plot_fine_tune_partial_phases_metric(image_folder):
    "fine_tune with train_bn=True: the body is partial (dashed), phases named, accuracy on its own panel."
    import matplotlib.pyplot as plt
    from fastai.metrics import accuracy
    learn = make_learner(image_folder, cbs=[GroupLogger(show_table=False)], metrics=accuracy)
    learn.fine_tune(2, base_lr=1e-3)
    fig = learn.group_logger.plot()
    lines, texts = _artists(fig)
    assert lines["lr:0:partial"].get_linestyle() == "--" and lines["lr:2:trainable"].get_linestyle() == "-"
    assert "lr:2:partial" not in lines and "lr:0:frozen" not in lines
    assert texts["phase:0"] == "fit 0: frozen\n(1 of 3 groups trains)"
    assert texts["phase:1"] == "fit 1: unfrozen\n(all 3 groups train)"
    assert [lines[f"marker:{g}"].get_marker() for g in range(3)] == ["o", "s", "D"]    # overlapping curves apart
    assert texts["end:0,1"] == "stem-stage1 = stage2-stage3  (same lr)"               # same lr in the frozen fit
    assert {texts["end:0"], texts["end:1"], texts["end:2"]} == {"stem-stage1", "stage2-stage3", "head"}
    metric_ax = lines["metric"].axes
    assert metric_ax is not fig.axes[0] and metric_ax.get_ylabel() == "valid accuracy"
    assert np.allclose(lines["metric"].get_ydata(), learn.group_logger.epochs["accuracy"])
    assert len(lines["metric"].get_xdata()) == 3
    plt.close(fig)


def test_plot_frozen_dotted_and_gradual(image_folder):
    import matplotlib.pyplot as plt
    learn = make_learner(image_folder, cbs=[GroupLogger(show_table=False)], train_bn=False)
    learn.freeze()
    learn.fit(1, lr=1e-3)
    learn.fit_one_cycle(3, slice(1e-5, 1e-3), cbs=GradualUnfreeze())
    fig = learn.group_logger.plot()
    lines, texts = _artists(fig)
    assert lines["lr:0:frozen"].get_linestyle() == ":"
    assert texts["phase:0"] == "fit 0: frozen\n(1 of 3 groups trains)"
    assert texts["phase:1"] == "fit 1: gradual unfreezing\n(1\u21923 of 3 groups train)"
    assert lines["metric"].axes.get_ylabel() == "valid_loss"           # no metric given: the validation loss
    plt.close(fig)


def test_csv_follows_learn_path_after_export(image_folder, tmp_path):
    "A relative name is resolved at each fit: a learner moved elsewhere (load_learner, new path) logs there."
    learn = make_learner(image_folder, cbs=[GroupLogger("moved.csv", show_table=False)])
    learn.fit(1, lr=1e-3)
    learn.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    loaded.dls = learn.dls
    loaded.path = tmp_path
    loaded.fit(1, lr=1e-3)
    assert len(pd.read_csv(image_folder / "moved.csv")) == 4 * N_GROUPS                # left as it was
    assert pd.read_csv(tmp_path / "moved.csv")["fit"].tolist() == [0] * 12 + [1] * 12  # the whole history
