"""Callbacks that make parameter groups visible and schedulable during fastai training.

- `GroupLogger`: records, for every training batch and every parameter group of `learn.opt`, the hyper-parameters
  in effect for that step (`lr`, `mom`, `wd`, ...) and the freeze state read from `requires_grad`; exposes them as a
  long DataFrame (`learn.group_logger.history`), an optional CSV file written as training goes, a table printed at
  the start of each fit, and a plot.
- `GradualUnfreeze`: ULMFiT-style schedule that unfreezes one more group (head backwards) every few epochs.
- `notify_freeze_change(learn)`: how callbacks tell each other that the freeze state changed.

Order (fastai 2.8 sorts callbacks by `order` alone: there is no `run_after`/`run_before`): `ParamScheduler` (60)
sets the hypers, then `GradualUnfreeze` (61) may re-spread them and changes the freeze state at epoch starts,
then `FastFrozenBody` / `FeatureCache` (61.5) read the freeze state, then `GroupLogger` (62) records the values
the step used.

Fastai itself only keeps the last group's lr (`Recorder.lrs`); its TensorBoard / W&B callbacks log every hyper of
every group (`lr_0`, `mom_1`, ...) but no freeze state, which is what `GroupLogger` adds to them (`trainable_{i}`).
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import TerminateOnNaNCallback
from fastai.callback.schedule import ParamScheduler
from fastai.learner import Learner
from fastai.torch_core import rank_distrib

from .lr_find import slice_ratios
from .splitters import learner_group_names

__all__ = ["GroupLogger", "GradualUnfreeze", "freeze_state", "notify_freeze_change", "EpochLog", "NanStop"]

TRAINABLE, PARTIAL, FROZEN = "trainable", "partial", "frozen"
_FIXED_HEAD = ("iter", "epoch", "fit", "group", "name")
_FIXED_TAIL = ("params", "trainable", "state")


def freeze_state(trainable: int, params: int) -> str:
    """`"trainable"` when every element of a group requires grad, `"frozen"` when none does, `"partial"` otherwise
    (typically a frozen group whose BatchNorm layers stay trainable, fastai's `train_bn=True`).

    >>> freeze_state(10, 10), freeze_state(0, 10), freeze_state(3, 10)
    ('trainable', 'frozen', 'partial')
    """
    if trainable == params:
        return TRAINABLE
    return FROZEN if trainable == 0 else PARTIAL


def notify_freeze_change(learn: Learner, sender: Optional[Callback] = None) -> None:
    """Tell the callbacks of `learn` that the freeze state (`requires_grad`) has just changed: each one that defines
    `after_freeze_change()` (other than `sender`) has it called. fastai 2.8 cannot dispatch an event of its own
    (`Learner.__call__` only takes fastai's event names), so this is the one notification the callbacks here use.

    >>> learn.freeze_to(-2); notify_freeze_change(learn)  # doctest: +SKIP
    """
    for cb in list(learn.cbs):
        if cb is not sender and callable(getattr(cb, "after_freeze_change", None)):
            cb.after_freeze_change()


def _is_hyper(v) -> bool:
    "Numbers only: optimizer flags (`amsgrad`, `foreach`, ...) are constant noise for a log."
    return isinstance(v, (Real, np.number)) and not isinstance(v, (bool, np.bool_))


def _active(cb: Callback) -> bool:
    "A real training run: not `lr_find`, not `get_preds` / `summary` (they add `GatherPredsCallback`)."
    return not hasattr(cb.learn, "lr_finder") and not hasattr(cb.learn, "gather_preds")


@dataclass(frozen=True)
class _Layout:
    "What stays constant between freeze changes: hyper keys, names, sizes, trainable counts and states per group."
    keys: tuple
    names: tuple
    params: tuple
    trainable: tuple
    state: tuple


class GroupLogger(Callback):
    """Log the hyper-parameters and the freeze state of every parameter group at every training batch.

    One row per (iteration, group) in `learn.group_logger.history`, with columns `iter` (global training iteration,
    counted across fits), `epoch`, `fit` (0-based index of the fit call: `fine_tune`'s frozen and unfrozen phases
    are fits 0 and 1), `group`, `name` (from a splitter that names its groups, such as `auto_splitter`, else
    `group{i}`), every numeric hyper of `learn.opt.hypers[i]` (`lr`, `mom`, `wd`, `sqr_mom`, `eps`, ...), `params`
    (parameter elements), `trainable` (elements that require grad) and `state` (`trainable`, `frozen`, or `partial`
    for a frozen group whose BatchNorm stays trainable). `learn.group_logger.epochs`: one row per epoch with
    `learn.recorder`'s losses and metrics at its end (read once per epoch), used by `plot`.

    Values are read in `after_batch`, after every `before_batch` (where `ParamScheduler` sets them) and after the
    optimizer step: they are the values the step used. The freeze state comes from `requires_grad`, never from
    `opt.frozen_idx`; it is re-read at the start of each fit and of each training epoch, at a batch where
    `opt.frozen_idx` or the optimizer changed (a `freeze_to` from another callback), when `refresh()` is called
    (`GradualUnfreeze` does), or at every batch with `scan_every_batch=True`. Inert during `lr_find`,
    `learn.summary()`, `get_preds`, `validate`; files are written on rank 0 only.

    Args:
        fname: CSV file the history is also written to, appended at each epoch end, at the end of each fit and
            every `flush_secs` (30 s) within an epoch, so an interrupted run keeps its log. A relative name is
            taken under `learn.path` (the data folder, as fastai's `CSVLogger`); an absolute path (such as
            `Path.cwd()/"groups.csv"`) as given. The freeze table's first line names the file. Checked before
            training starts (folder created, file opened for append): an unwritable location raises `OSError`.
            Example: `GroupLogger("groups.csv")`.
        append: an existing file is continued (the default): its rows are kept and the `iter` and `fit`
            counters go on from its last row, so a new Learner (a new process, fastai's `load`) adds to the log;
            columns that differ (another optimizer's hypers) are merged, the file rewritten with the union of
            columns and every row. `append=False` starts a new file and refuses, with `FileExistsError` before
            training, when one exists (nothing is deleted). Example: `GroupLogger("run2.csv", append=False)`.
        show_table: print a table of the groups (name, params, trainable, state, lr of the first step) at the
            start of each fit and whenever the freeze state changes within a fit, with a `body:` line when the
            fast frozen body or the feature cache is on. Example: `show_table=False`.
        scan_every_batch: re-read `requires_grad` at every batch instead of at the events above, for code that
            flips `requires_grad` by hand in the middle of an epoch (costs a pass over the parameters per batch).

    Example::

        learn = Learner(dls, model, splitter=auto_splitter, cbs=GroupLogger("groups.csv"))
        learn.fine_tune(3, 1e-3)
        learn.group_logger.history.query("group == 0")[["iter", "lr", "state"]]
        learn.group_logger.plot().savefig("lrs.png")
    """
    order, run_valid = ParamScheduler.order + 2, False
    flush_secs = 30.0  # within an epoch, the CSV file is appended at most this often (and at each epoch end)

    def __init__(self, fname: Optional[str | os.PathLike] = None, show_table: bool = True,
                 scan_every_batch: bool = False, append: bool = True):
        self.fname, self.show_table, self.scan_every_batch = fname, show_table, scan_every_batch
        self.append, self._path = append, None   # _path: the CSV file, resolved and checked at the first fit
        self._epochs: list = []        # (last iter, epoch, fit, metric names, values) at each epoch end
        self._records: list = []       # (iter, epoch, fit, layout index, hyper values of all groups, flattened)
        self._layouts: list = []       # _Layout, referenced by index from the records
        self._n_iter, self._n_fit = 0, 0
        self._written, self._csv_cols, self._flushed = 0, None, time.monotonic()
        self._reset_fit()

    def _reset_fit(self):
        self._in_fit, self._layout, self._sig, self._flags, self._numels = False, None, None, None, None
        self._names, self._table_due, self._extra = None, False, ()

    # ---------------------------------------------------------------------------------------------------- events
    def before_fit(self):
        "Decide whether this is a real training run; the fit itself starts at its first `before_train`."
        self._reset_fit()
        self.run = _active(self)
        if self.run and self.fname and rank_distrib() == 0 and self._resolve() != self._path:
            self._bind()                 # first fit, or `learn.path` changed (e.g. after `load_learner`)

    def before_train(self):
        "Start a fit (`validate`/`get_preds` call `before_fit` too, but never `before_train`), re-read freeze state."
        if not self._in_fit:
            self._in_fit, self._fit_idx = True, self._n_fit
            self._n_fit += 1
            self._names = learner_group_names(self.learn)
            self._extra = self._loggers()
            self._table_due = True
        self.refresh()

    def after_batch(self):
        "Record this step's hypers per group (plain Python values, no tensor reads)."
        if not self._in_fit:
            return
        opt = self.learn.opt
        if self.scan_every_batch or self._sig != (id(opt), getattr(opt, "frozen_idx", None)):
            self.refresh()
        lay = self._layouts[self._layout]
        vals = tuple([h.get(k) for h in opt.hypers for k in lay.keys])
        self._records.append((self._n_iter, self.learn.epoch, self._fit_idx, self._layout, vals))
        self._n_iter += 1
        if self._table_due:
            self._table_due = False
            if self.show_table and rank_distrib() == 0:
                notes = [cb.freeze_note() for cb in self.learn.cbs if callable(getattr(cb, "freeze_note", None))]
                # on its own line: fastai's console progress bar leaves the cursor at the end of its line
                print("\n" + "\n".join([self.table(len(self._records) - 1)] + [f"body: {n}" for n in notes if n]))
        if self._extra:
            self._log_extra(lay)
        if self.fname and time.monotonic() - getattr(self, "_flushed", 0.0) > self.flush_secs:
            self.flush()  # long epochs: an interrupted run keeps all but the last `flush_secs` on disk

    def after_epoch(self):
        "Keep the epoch's losses and metrics (`learn.recorder`, plain floats), append the new rows to the CSV file."
        if self._in_fit:
            rec = getattr(self.learn, "recorder", None)
            vals = list(getattr(self.learn, "final_record", None) or ()) if rec is not None else []
            names = list(rec.metric_names[1:1 + len(vals)]) if vals else []
            keep = [(n, float(v)) for n, v in zip(names, vals) if _is_hyper(v)]
            self._epochs.append((self._n_iter - 1, self.learn.epoch, self._fit_idx,
                                 tuple(n for n, _ in keep), tuple(v for _, v in keep)))
            self.flush()

    def after_fit(self):
        "Append the new rows to the CSV file and close the fit."
        if self._in_fit:
            self.flush()
        self._reset_fit()

    # ----------------------------------------------------------------------------------------------- freeze state
    def after_freeze_change(self) -> None:
        "Told by `notify_freeze_change`: re-read the freeze state now."
        self.refresh()

    def refresh(self) -> bool:
        """Re-read `requires_grad` (and the hyper keys) of every group; start a new layout when anything changed,
        and print the table again at the next batch when the freeze state changed within the fit. Returns whether
        anything changed. Call it after changing `requires_grad` by hand in the middle of an epoch."""
        if not self._in_fit:
            return False
        opt = self.learn.opt
        pls, hypers = opt.param_lists, opt.hypers
        if self._sig is None or self._sig[0] != id(opt):
            self._numels = None                                        # a new optimizer: sizes to recount
        self._sig = (id(opt), getattr(opt, "frozen_idx", None))       # cheap trigger only, never the state
        flags = tuple(tuple(p.requires_grad for p in pg) for pg in pls)
        keys = self._hyper_keys(hypers)
        prev = self._layouts[self._layout] if self._layout is not None else None
        if prev is not None and flags == self._flags and keys == prev.keys:
            return False
        if self._numels is None:
            self._numels = [[p.numel() for p in pg] for pg in pls]
        params = tuple(sum(ns) for ns in self._numels)
        trainable = tuple(sum(n for n, f in zip(ns, fs) if f) for ns, fs in zip(self._numels, flags))
        state = tuple(freeze_state(t, n) for t, n in zip(trainable, params))
        self._flags = flags
        self._layouts.append(_Layout(keys, tuple(self._names), params, trainable, state))
        self._layout = len(self._layouts) - 1
        if prev is not None and (prev.trainable != trainable):
            self._table_due = True
        return True

    @staticmethod
    def _hyper_keys(hypers) -> tuple:
        keys = []
        for h in hypers:
            keys += [k for k, v in h.items() if k not in keys and _is_hyper(v)]
        return tuple(sorted(keys, key=lambda k: k != "lr"))   # lr first, then the optimizer's own order

    # ------------------------------------------------------------------------------------ tensorboard / wandb
    def _loggers(self) -> tuple:
        "fastai's TensorBoard/W&B callbacks already log every hyper per group (`lr_0`, ...); add the freeze state."
        out = []
        tb = getattr(self.learn, "tensor_board", None)
        if tb is not None and getattr(tb, "run", False) and hasattr(tb, "writer"):
            out.append("tensor_board")
        wb = getattr(self.learn, "wandb", None)
        if wb is not None and getattr(wb, "run", False) and hasattr(wb, "_wandb_step"):
            out.append("wandb")
        return tuple(out)

    def _log_extra(self, lay: _Layout):
        fracs = {f"trainable_{i}": (t / n if n else 0.0) for i, (t, n) in enumerate(zip(lay.trainable, lay.params))}
        if "tensor_board" in self._extra:
            writer = self.learn.tensor_board.writer
            for k, v in fracs.items():
                writer.add_scalar(k, v, self.learn.train_iter)
        if "wandb" in self._extra:
            import wandb
            wandb.log(fracs, step=self.learn.wandb._wandb_step)

    # -------------------------------------------------------------------------------------------------- output
    def _columns(self, layouts=None) -> list[str]:
        keys = []
        for lay in (self._layouts if layouts is None else layouts):
            keys += [k for k in lay.keys if k not in keys]
        return [*_FIXED_HEAD, *keys, *_FIXED_TAIL]

    def _frame(self, start: int = 0) -> pd.DataFrame:
        "Rows of the records from `start` on; vectorised per layout (layouts are used in contiguous runs)."
        cols = self._columns()
        recs = self._records[start:]
        ints = ("iter", "epoch", "fit", "group", "params", "trainable")
        if not recs:
            return pd.DataFrame({c: pd.Series(dtype="int64" if c in ints else float if c not in ("name", "state")
                                              else object) for c in cols})
        head = np.array([r[:4] for r in recs], dtype=np.int64)          # iter, epoch, fit, layout
        cuts = np.flatnonzero(np.diff(head[:, 3])) + 1
        parts = []
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(recs)]):
            lay = self._layouts[head[a, 3]]
            m, n, nk = b - a, len(lay.names), len(lay.keys)
            vals = np.array([r[4] for r in recs[a:b]], dtype=float).reshape(m, n, nk)   # None -> nan
            part = {c: np.repeat(head[a:b, j], n) for j, c in enumerate(("iter", "epoch", "fit"))}
            part["group"] = np.tile(np.arange(n, dtype=np.int64), m)
            part["name"] = np.tile(np.array(lay.names, dtype=object), m)
            for j, k in enumerate(lay.keys):
                part[k] = vals[:, :, j].ravel()
            for k in _FIXED_TAIL:
                part[k] = np.tile(np.array(getattr(lay, k), dtype=np.int64 if k != "state" else object), m)
            parts.append(pd.DataFrame(part))
        df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        return df.reindex(columns=cols)

    @property
    def history(self) -> pd.DataFrame:
        "All recorded rows: one per (training iteration, group), see the class docstring for the columns."
        return self._frame()

    @property
    def epochs(self) -> pd.DataFrame:
        """One row per training epoch: `iter` (its last iteration), `epoch`, `fit`, and what `learn.recorder` had at
        the epoch's end (`train_loss`, `valid_loss`, the metrics such as `accuracy`)."""
        cols = ["iter", "epoch", "fit"]
        for *_, names, _ in self._epochs:
            cols += [n for n in names if n not in cols]
        return pd.DataFrame([{"iter": i, "epoch": e, "fit": f, **dict(zip(ns, vs))}
                             for i, e, f, ns, vs in self._epochs], columns=cols)

    def state_dict(self) -> dict:
        """The history and the counters as plain Python data (lists, ints, floats, str): what
        `GroupLearner.save` stores in a checkpoint, loadable with `torch.load(weights_only=True)`.

        Example: `lg2 = GroupLogger(); lg2.load_state_dict(learn.group_logger.state_dict())`."""
        num = lambda v: None if v is None else float(v)
        return {"records": [[i, e, f, k, [num(v) for v in vals]] for i, e, f, k, vals in self._records],
                "layouts": [{k: list(getattr(lay, k)) for k in _Layout.__dataclass_fields__} for lay in self._layouts],
                "n_iter": self._n_iter, "n_fit": self._n_fit,
                "epochs": [[i, e, f, list(ns), list(vs)] for i, e, f, ns, vs in self._epochs]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the history and the counters by `state` (from `state_dict`): the next fit continues its
        iteration and fit numbers. The CSV file, if any, is checked again at the next fit: an existing one is
        continued (the rows of this history are taken to be in it already), a missing one written from this history."""
        self._layouts = [_Layout(**{k: tuple(v) for k, v in lay.items()}) for lay in state["layouts"]]
        self._records = [(int(i), int(e), int(f), int(k), tuple(vals)) for i, e, f, k, vals in state["records"]]
        self._n_iter, self._n_fit = int(state["n_iter"]), int(state["n_fit"])
        self._epochs = [(int(i), int(e), int(f), tuple(ns), tuple(vs)) for i, e, f, ns, vs in state.get("epochs", [])]
        self._written, self._csv_cols, self._path = 0, None, None

    def _resolve(self) -> Path:
        return Path(self.learn.path, Path(self.fname).expanduser()).absolute()

    def _bind(self):
        """Resolve and check the CSV file before training: create its folder, open it for append, and continue an
        existing file (counters from its last row) or refuse it (`append=False`). One line for each mistake."""
        path = self._resolve()
        fix = f"give GroupLogger a writable file, e.g. GroupLogger({str(Path.cwd() / path.name)!r})"
        if path.is_dir():
            raise IsADirectoryError(f"GroupLogger cannot write its CSV file {path}: it is a folder; {fix}")
        existed = path.exists() and path.stat().st_size > 0
        if existed and not self.append:
            raise FileExistsError(f"GroupLogger: {path} already exists and append=False would start a new log; "
                                  "nothing was changed: move or delete the file, pick another name, or use "
                                  "append=True to continue it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            with open(path, "a"):
                pass
            if created:
                path.unlink()                        # only a check: the file is written at the first flush
        except OSError as e:
            raise OSError(f"GroupLogger cannot write its CSV file {path}: {e.strerror or e}; {fix}") from None
        self._path, self._csv_cols = path, None
        if existed:
            cols, last = _csv_tail(path)
            if not {"iter", "fit"} <= set(cols):
                raise ValueError(f"GroupLogger: {path} exists but is not a GroupLogger log (no iter and fit "
                                 "columns); give another file name, or move that file away")
            self._csv_cols, self._written = cols, len(self._records)  # rows held already come from that file
            if last is not None:
                self._n_iter = max(self._n_iter, int(float(last[cols.index("iter")])) + 1)
                self._n_fit = max(self._n_fit, int(float(last[cols.index("fit")])) + 1)

    def flush(self):
        """Write the rows not yet in the CSV file (rank 0 only); when new columns appear (another optimizer's hypers)
        the file is rewritten with all its rows and the union of the columns."""
        if not self.fname or rank_distrib() != 0 or self._written >= len(self._records):
            return
        if self._path is None:
            self._bind()
        path, cols = self._path, self._columns()
        if self._csv_cols is None or not path.exists():
            self._frame().to_csv(path, index=False)
            self._csv_cols = cols
        elif set(cols) <= set(self._csv_cols):
            self._frame(self._written).reindex(columns=self._csv_cols).to_csv(path, mode="a", header=False,
                                                                             index=False)
        else:       # new columns (another optimizer's hypers): rewrite with every row and the union of columns
            cols = _union(self._csv_cols, cols)
            tmp = path.with_name(path.name + ".tmp")
            pd.concat([pd.read_csv(path), self._frame(self._written)], ignore_index=True).reindex(
                columns=cols).to_csv(tmp, index=False)
            os.replace(tmp, path)
            self._csv_cols = cols
        self._written, self._flushed = len(self._records), time.monotonic()

    def table(self, record: int = -1) -> str:
        "The groups at a recorded iteration (default: the last) as printed at the start of a fit."
        it, ep, fit, li, vals = self._records[record]
        lay = self._layouts[li]
        nk = len(lay.keys)
        lrs = [dict(zip(lay.keys, vals[g * nk:(g + 1) * nk])).get("lr") for g in range(len(lay.names))]
        w = max([4] + [len(n) for n in lay.names])
        where = f", logging to {self._path}" if self.fname and self._path is not None else ""
        lines = [f"GroupLogger: fit {fit}, epoch {ep}, iter {it}{where}",
                 f"{'group':>5}  {'name':<{w}}  {'params':>12}  {'trainable':>12}  {'state':<9}  {'lr':>9}"]
        for g, name in enumerate(lay.names):
            lr = f"{lrs[g]:.2e}" if lrs[g] is not None else "-"
            lines.append(f"{g:>5}  {name:<{w}}  {lay.params[g]:>12,}  {lay.trainable[g]:>12,}  "
                         f"{lay.state[g]:<9}  {lr:>9}")
        return "\n".join(lines)

    def plot(self, figsize: Optional[tuple] = None):
        """Per-group lr against iterations (log scale; solid where the group trains, dashed where partial, dotted
        where frozen; a marker per group and labels at the line ends), each fit labelled by its phase (frozen /
        unfrozen / gradual unfreezing), the validation metric of each epoch in a panel below it, and a freeze
        map (`plots.plot_group_lr`, which also draws a saved CSV). Returns the matplotlib Figure.

        Example: `learn.group_logger.plot().savefig("group_lr.png", dpi=120)`."""
        from .plots import plot_group_lr
        return plot_group_lr(self.history, self.epochs, figsize)


def _union(a: list, b: list) -> list:
    "Columns of two logs: the fixed ones first and last, the hypers of both in between."
    fixed = (*_FIXED_HEAD, *_FIXED_TAIL)
    keys = list(dict.fromkeys(c for c in [*a, *b] if c not in fixed))
    return [*_FIXED_HEAD, *keys, *_FIXED_TAIL]


def _csv_tail(path: Path) -> tuple[list, Optional[list]]:
    "The header and the last row of a CSV file, reading only its two ends."
    with open(path, newline="") as f:
        cols = next(csv.reader([f.readline()]), [])
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(max(0, end - 65536))
        lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    last = next(csv.reader([lines[-1]]), None) if len(lines) > 1 or (lines and end > 65536) else None
    return cols, last if last != cols else None


class GradualUnfreeze(Callback):
    """ULMFiT-style gradual unfreezing: at the start of a fit only the last `start` groups train, then every
    `every` epochs one more group, from the head backwards, through `learn.freeze_to(-k)`.

    `freeze_to` keeps the per-group rates (a `slice` passed to `fit_one_cycle`) and honours `learn.train_bn`
    (BatchNorm of frozen groups stays trainable); like fastai's, it clears the optimizer state. The schedule follows
    `learn.epoch`, so a resumed fit (`start_epoch`) starts at the right stage. Apply it to one fit
    (`fit_one_cycle(5, slice(1e-5, 1e-3), cbs=GradualUnfreeze())`), not to `fine_tune`, whose second fit would
    start frozen again. Other callbacks are told of each change (`notify_freeze_change`): a `GroupLogger`'s history
    shows it at that iteration.

    Args:
        every: epochs between two unfreezes. Example: `every=2` unfreezes a group at epochs 2, 4, ...
        start: groups trainable in the first epoch, counted from the head; default 1 (`freeze_to(-1)`).
            Example: `start=2` trains the head and the last body group first.
        lr_mult: if given, the lrs are re-spread at every batch as `slice(lr/lr_mult, lr)` would, `lr` being the
            last group's current (scheduled) lr, so every group's rate follows the schedule. Example: `lr_mult=2.6**4`.
    """
    order, run_valid = ParamScheduler.order + 1, False

    def __init__(self, every: int = 1, start: Optional[int] = None, lr_mult: Optional[float] = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if start is not None and start < 1:
            raise ValueError(f"start must be >= 1, got {start}")
        if lr_mult is not None and lr_mult <= 0:
            raise ValueError(f"lr_mult must be > 0, got {lr_mult}")
        self.every, self.start, self.lr_mult = every, start, lr_mult
        self._k = None

    def before_fit(self):
        "Inert in `lr_find`, `get_preds`, `summary`."
        self._k = None
        self.run = _active(self)

    def n_trainable(self, epoch: int, n_groups: int) -> int:
        "How many groups (from the head) train at `epoch`."
        return min(n_groups, (self.start or 1) + epoch // self.every)

    def before_train(self):
        "Freeze up to the groups of this epoch's stage."
        n = len(self.learn.opt.param_lists)
        k = self.n_trainable(self.learn.epoch, n)
        if k == self._k:
            return
        self._k = k
        self.learn.freeze_to(-k if k < n else 0)
        notify_freeze_change(self.learn, self)

    def before_batch(self):
        "Re-spread the lrs (after `ParamScheduler` set them) when `lr_mult` is given."
        if self.lr_mult is None:
            return
        opt = self.learn.opt
        n = len(opt.hypers)
        if n > 1:
            top = opt.hypers[-1]["lr"]
            opt.set_hyper("lr", [top * r for r in slice_ratios(n, self.lr_mult)])


def _finite(x) -> Optional[float]:
    "A float for JSON: None instead of NaN/inf (which JSON cannot hold) or a value that is not a number."
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class EpochLog(Callback):
    """Every training epoch's recorder values across fits (fastai's `Recorder` forgets earlier fits), with the epoch's
    phase (`frozen`, `partly frozen (k of n groups trainable)`, `unfrozen`): `learn.epoch_log.rows`.

    Example: `learn = Learner(dls, model, cbs=EpochLog()); learn.fine_tune(1); learn.epoch_log.rows[-1]["phase"]`."""
    order = 51  # after the Recorder (50) has stored the epoch's values
    run_valid = False

    def __init__(self):
        self.rows, self.n_fits, self.new_fit, self.trained = [], 0, False, False

    def before_fit(self):  # get_preds runs before_fit/after_epoch too, but never a training phase
        self.new_fit = True

    def after_train(self):
        self.n_fits += self.new_fit
        self.new_fit, self.trained = False, True

    def after_epoch(self):
        if not self.trained:
            return
        self.trained = False
        rec = self.learn.recorder
        vals = dict(zip(rec.metric_names[1:-1], rec.values[-1])) if rec.values else {}
        n, frozen = len(self.opt.param_lists), self.opt.frozen_idx
        phase = "unfrozen" if frozen == 0 else "frozen" if frozen >= n - 1 else \
            f"partly frozen ({n - frozen} of {n} groups trainable)"
        self.rows.append({"epoch": len(self.rows) + 1, "fit": self.n_fits - 1, "phase": phase,
                          **{k: _finite(v) for k, v in vals.items()}})


class NanStop(TerminateOnNaNCallback):
    """fastai's `TerminateOnNaNCallback`, remembering where the training loss became NaN/inf (`diverged`: the batch,
    1-based within its epoch) and cancelling later fits too: `learn.nan_stop`.

    Example: `learn.fit(1, 1e9, cbs=NanStop()); learn.nan_stop.diverged`."""
    run_valid = False  # training losses only (get_preds(with_loss=True) gives one loss per item)

    def __init__(self):
        self.diverged = None

    def before_fit(self):
        if self.diverged:
            raise CancelFitException

    def after_batch(self):
        try:
            super().after_batch()
        except CancelFitException:
            self.diverged = self.iter + 1
            raise
