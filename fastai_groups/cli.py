"""`fastai-groups`: the whole job from the command line.

    fastai-groups summary resnet50 --groups stage
    fastai-groups finetune                      # bundled product photos, real ImageNet weights, offline
    fastai-groups finetune photos/ --arch timm:convnext_atto --no-pretrained --epochs 3
    fastai-groups compare --schedules fine_tune_groups,fine_tune,gradual,two_groups,unfrozen

Bad input (missing folder, fewer than 2 classes, unknown architecture, weights that cannot be found, a batch
size or image size that cannot train, an output folder that cannot be written) is a one-line error and exit
status 2, checked before any training (`docs/errors.md` lists them all). A run writes into a fresh folder beside
`--out` and moves it into place at the end: an interrupted or failed run leaves the previous results as they
were. torch, fastai and timm are imported inside the commands, so `--help` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "make_dls", "SCHEDULES"]

from .checks import (UsageError, check_batches, check_data_arg, check_folder, check_numbers, check_size,  # noqa: E402
                     diverged, pick_threads)
from .runs import Staging, shown  # noqa: E402

DEFAULT_ARCH = "tf_efficientnet_lite0"
SCHEDULES = ("fine_tune_groups", "fine_tune", "gradual", "two_groups", "unfrozen")
GRANULARITIES = ("stage", "fastai", "block")  # = splitters.GRANULARITIES, here so that --help needs no torch


def _schedules(args) -> list[str]:
    "The schedules of `compare --schedules`, checked."
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown or not schedules:
        raise UsageError(f"unknown schedule(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(SCHEDULES)}")
    return schedules


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def make_dls(path: Optional[Path], size: int = 64, bs: int = 32, valid_pct: float = 0.2, seed: int = 42,
             device=None, augment: bool = True, folder_check: Optional[tuple] = None):
    """DataLoaders for a folder with one sub-folder per product (`valid_pct` random split, seeded), or with
    `train/` and `valid/` sub-folders; the bundled product sample when `path` is None. Unreadable images are
    reported by name and skipped. `folder_check`: `check_image_folder(path)`'s result when already computed.
    Returns `(dls, path, unreadable)`.

    >>> dls, path, bad = make_dls(None, size=32, bs=16)  # doctest: +SKIP
    """
    from fastai.vision.all import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, RandomSplitter,
                                   Resize, aug_transforms, get_image_files, parent_label)

    from .data import check_image_folder, product_sample
    path = product_sample() if path is None else Path(path)
    try:
        classes, unreadable = folder_check or check_image_folder(path, warn=False)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(str(e)) from None
    for f in unreadable:
        print(f"skipping unreadable image: {f}", file=sys.stderr)
    bad = {Path(f).resolve() for f in unreadable}
    split = (path / "train").is_dir() and (path / "valid").is_dir()
    files = [f for f in get_image_files(path, folders=["train", "valid"] if split else None)
             if f.resolve() not in bad]
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: files,
                      splitter=GrandparentSplitter("train", "valid") if split else RandomSplitter(valid_pct, seed=seed),
                      get_y=parent_label, item_tfms=Resize(size),
                      batch_tfms=aug_transforms(size=size, max_rotate=10.0, max_zoom=1.2) if augment else None)
    dls = block.dataloaders(path, bs=bs, device=device, num_workers=0)
    if len(dls.vocab) < 2:
        raise UsageError(f"{path}: need at least 2 classes with readable images, found {len(dls.vocab)}")
    return dls, path, unreadable


# ----------------------------------------------------------------------------------------------------------------
# Learners and schedules
# ----------------------------------------------------------------------------------------------------------------
def _device(cpu: bool):
    import torch
    return torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")


def _learner(dls, args, splitter=None, fname: Optional[str] = "group_log.csv", cbs=()):
    from fastai.vision.all import accuracy, error_rate

    from .callbacks import EpochLog, GroupLogger, NanStop
    from .learner import group_learner
    from .splitters import auto_splitter
    try:
        learn = group_learner(dls, args.arch, pretrained=args.pretrained, weights=args.weights,
                              splitter=splitter or functools.partial(auto_splitter, granularity=args.granularity),
                              metrics=[error_rate, accuracy],
                              cbs=[GroupLogger(fname=fname), EpochLog(), NanStop(), *cbs],
                              path=args.out, model_dir=".")
    except (ValueError, RuntimeError, ImportError, FileNotFoundError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if dls.device.type == "cuda":
        from fastai.callback.channelslast import ChannelsLast  # noqa: F401  (adds Learner.to_channelslast)
        learn.to_channelslast()  # mixed precision and channels-last model and inputs
    return learn


def run_schedule(learn, schedule: str, epochs: int, freeze_epochs: int, lr: float,
                 lr_mult: Optional[float] = None) -> Optional[dict]:
    """Train `learn` with one freeze/unfreeze schedule, all with the same epoch budget
    (`freeze_epochs + epochs`):

    - `fine_tune`: fastai's `fine_tune` (frozen body, then everything at `slice(lr/lr_mult, lr)`);
    - `two_groups`: the same with fastai's default two groups (body, head) for non-table models;
    - `gradual`: `GradualUnfreeze`, one more group every `max(1, budget // (groups - 1))` epochs from the head
      back, discriminative rates (with fewer epochs than groups, the earliest groups stay frozen to the end);
    - `unfrozen`: everything trainable from the start, `slice(lr/lr_mult, lr)`;
    - `fine_tune_groups`: the library's recipe (`fastai_groups.recipe`, picked by the study in BENCHMARKS.md) at the
      same budget: `fine_tune_groups(freeze_epochs + epochs - 1, lr)`; returns its plan (the others return None).

    `lr_mult`: the spread of the discriminative rates (default: fastai's 100, the recipe's `DEFAULT_LR_MULT`).
    """
    from .callbacks import GradualUnfreeze
    from .recipe import DEFAULT_LR_MULT, fine_tune_groups
    lr_mult = DEFAULT_LR_MULT if lr_mult is None else lr_mult
    if schedule == "fine_tune_groups":
        return fine_tune_groups(learn, max(1, freeze_epochs + epochs - 1), base_lr=lr, lr_mult=lr_mult)
    elif schedule in ("fine_tune", "two_groups"):
        learn.fine_tune(epochs, base_lr=lr, freeze_epochs=freeze_epochs, lr_mult=lr_mult)
    elif schedule == "gradual":
        n = len(learn.opt.param_lists)
        every = max(1, (freeze_epochs + epochs) // max(1, n - 1))
        learn.fit_one_cycle(freeze_epochs + epochs, slice(lr / lr_mult, lr), cbs=GradualUnfreeze(every=every))
    elif schedule == "unfrozen":
        learn.unfreeze()
        learn.fit_one_cycle(freeze_epochs + epochs, slice(lr / lr_mult, lr))
    else:
        raise UsageError(f"unknown schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
    return None


def _recipe_text(p: dict, args) -> str:
    "The report's schedule paragraph for the recipe's plan `p`: what it chose, why, and what was rolled back."
    from .recipe import DEFAULT_LR_MULT
    unfrozen = (f"then {p['unfrozen_epochs']} unfrozen epoch(s) at `slice(lr/{2 * DEFAULT_LR_MULT:g}, lr/2)`"
                + (", **rolled back** (it did not improve validation): the head phase's weights are returned. "
                   if "unfrozen" in p["rolled_back"] else ", kept (validation improved). ")
                if p["unfrozen_epochs"] else "the body never unfrozen. ")
    return (f"`fine_tune_groups({p['budget'] - 1}, base_lr={args.lr})` (the budget of `fine_tune` with "
            f"{args.freeze_epochs} frozen + {args.epochs} epochs). Chosen because {p['why']}: "
            f"{'norm statistics re-estimated, then ' if p['reestimate'] else ''}{p['head_epochs']} head epochs on the "
            f"frozen body with its pretrained norm statistics{' (feature cache)' if p['cached'] else ''}, " + unfrozen
            + "The rule comes from the study in BENCHMARKS.md (section `recipes`, `python -m bench recipes`); "
            "`--schedule fine_tune` runs fastai's.")


def _results(learn, plan: Optional[dict] = None) -> dict:
    """The final model's metrics (the recipe's `plan["result"]` when it rolled a phase back, else the last epoch's)
    and every epoch's (all fits, with phase names); None where a value is NaN."""
    rows = learn.epoch_log.rows
    last = rows[-1] if rows else {}
    if plan and plan.get("rolled_back"):
        last = plan["result"]
    return {"accuracy": last.get("accuracy"), "error_rate": last.get("error_rate"),
            "valid_loss": last.get("valid_loss"), "accuracy_per_epoch": [r.get("accuracy") for r in rows],
            "epochs": rows}


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _groups_table(learn) -> str:
    "The optimizer's groups with the names recorded on the learner (the splitter is not run again)."
    from .splitters import learner_group_names
    groups, names = learn.opt.param_lists, learner_group_names(learn)
    rows = ["| group | name | parameters | trainable now |", "|---|---|---:|---:|"]
    for i, (n, ps) in enumerate(zip(names, groups)):
        rows.append(f"| {i} | {n} | {sum(p.numel() for p in ps):,} | "
                    f"{sum(p.numel() for p in ps if p.requires_grad):,} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# Sub-commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_summary(args) -> None:
    from .summary import arch_summary
    idxs = [int(i) if i.lstrip("-").isdigit() else i for i in args.idxs] or None
    try:
        arch_summary(args.arch, idxs, verbose=args.verbose, params=args.params, groups=args.groups)
    except (ValueError, IndexError, AttributeError, TypeError) as e:
        raise UsageError(str(e)) from None


def _data_name(path: Path, given: Optional[Path]) -> str:
    "The data folder for report.md: by name for the bundled sample, relative to the working directory, else its name."
    if given is None:
        return "the bundled product sample (`fastai_groups.product_sample()`)"
    rel = shown(path)
    return f"`{rel}`" if not Path(rel).is_absolute() else f"`{path.name}`"


def _epoch_table(rows: list) -> str:
    lines = ["| epoch | phase | train loss | valid loss | accuracy |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['epoch']} | {r['phase']} | {_fmt(r.get('train_loss'))} | {_fmt(r.get('valid_loss'))} | "
              f"{_fmt(r.get('accuracy'))} |" for r in rows]
    return "\n".join(lines)


def _start(args) -> None:
    "Threads (torch.set_num_threads, see `pick_threads`) and the seed."
    import torch
    from fastai.vision.all import set_seed
    torch.set_num_threads(args.threads_used[0])
    set_seed(args.seed, reproducible=True)


def cmd_finetune(args) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    from fastai.vision.all import ClassificationInterpretation

    out = args.stage.tmp  # learn.path is the staging folder while training, --out once exported
    device = _device(args.cpu)
    _start(args)
    t0 = time.perf_counter()
    dls, path, unreadable = make_dls(args.path, args.size, args.bs, args.valid_pct, args.seed, device,
                                     folder_check=args.folder_check)
    check_batches(len(dls.train_ds), len(dls.valid_ds), len(dls.train), args)  # as fastai counts
    args.out = out
    learn = _learner(dls, args)
    check_size(learn, args)
    t_data = time.perf_counter() - t0
    name = _data_name(path, args.path).replace("`", "")
    print(f"data: {name} ({len(dls.train_ds)} train, {len(dls.valid_ds)} valid, "
          f"{len(dls.vocab)} classes); model: {args.arch}; device: {device}; threads: {args.threads_used[0]}")
    t1 = time.perf_counter()
    args.stage.started = True
    plan = None
    if args.freeze_epochs:
        plan = run_schedule(learn, args.schedule, args.epochs, args.freeze_epochs, args.lr)
    else:  # fine_tune's second phase only
        learn.unfreeze()
        learn.fit_one_cycle(args.epochs, slice(args.lr / 200, args.lr / 2))
    t_train = time.perf_counter() - t1
    why = diverged(learn, args.lr)
    if why and not (plan and plan["rolled_back"] == ["unfrozen"]):   # the recipe returned its head phase's weights
        raise UsageError(why)
    res = _results(learn, plan)

    learn.path = args.stage.out  # what the exported learner remembers: the final folder, not the staging one
    learn.export(out / "export.pkl")
    fig = learn.group_logger.plot()
    fig.savefig(out / "group_lr.png", dpi=100, bbox_inches="tight")
    with learn.no_bar():  # no extra validation progress bars (two get_preds) after the training table
        ClassificationInterpretation.from_learner(learn).plot_confusion_matrix(figsize=(7, 7))
    import matplotlib.pyplot as plt
    plt.gcf().savefig(out / "confusion_matrix.png", dpi=100, bbox_inches="tight")
    plt.close("all")
    n_epochs = args.freeze_epochs + args.epochs
    if plan:
        schedule = _recipe_text(plan, args)
    elif args.freeze_epochs and args.schedule != "fine_tune":
        schedule = f"schedule `{args.schedule}` (see `fastai-groups compare`), {n_epochs} epochs in all."
    elif args.freeze_epochs:
        schedule = (f"`fine_tune({args.epochs}, base_lr={args.lr}, freeze_epochs={args.freeze_epochs})`: "
                    f"{args.freeze_epochs} frozen epoch(s) (head trains, body norm layers too), then all groups at "
                    "`slice(lr/100, lr)` with lr = base_lr/2.")
    else:
        schedule = (f"no frozen epoch: all groups trainable, `fit_one_cycle({args.epochs}, "
                    f"slice({args.lr / 200:g}, {args.lr / 2:g}))` (fine_tune's second phase).")
    threads, why = args.threads_used
    load = " / ".join(f"{x:.2f}" for x in args.load_at_start) if args.load_at_start else "n/a"
    report = f"""# fastai-groups fine-tune report

## Data
- folder: {_data_name(path, args.path)} ({len(dls.vocab)} classes: {', '.join(map(str, dls.vocab))})
- {len(dls.train_ds)} training and {len(dls.valid_ds)} validation images, {args.size} px, batch size {args.bs}
- unreadable images skipped: {len(unreadable)}

## Model
- architecture: `{args.arch}`, pretrained: {learn.pretrained}, device: {device}
- parameters: {sum(p.numel() for p in learn.model.parameters()):,}

## Groups (`{args.granularity}` granularity)
{_groups_table(learn)}

## Schedule
{schedule}
Per-group learning rates and freeze state, batch by batch: `group_log.csv`, `group_lr.png`.

## Results
- accuracy: {_fmt(res['accuracy'])}, error rate: {_fmt(res['error_rate'])}, validation loss: {_fmt(res['valid_loss'])}
- confusion matrix: `confusion_matrix.png`; exported learner: `export.pkl`; these figures: `results.json`

{_epoch_table(res['epochs'])}

## Timings
- data and model set-up: {t_data:.1f} s
- training: {t_train:.1f} s for {n_epochs} epochs ({t_train / max(1, n_epochs):.1f} s per epoch)
- torch threads: {threads} ({why}); load average at start (1/5/15 min): {load}
"""
    (out / "report.md").write_text(report)
    results = {**res, "train_seconds": t_train, "arch": args.arch, "threads": threads,
               "load_average_at_start": list(args.load_at_start or [])}
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    print(f"accuracy {_fmt(res['accuracy'])}, error rate {_fmt(res['error_rate'])}, training {t_train:.1f} s")
    return ["export.pkl", "group_log.csv", "group_lr.png", "confusion_matrix.png", "report.md", "results.json"]


def cmd_compare(args) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import torch
    from fastai.vision.all import set_seed

    from .splitters import auto_splitter
    schedules = _schedules(args)
    out = args.out = args.stage.tmp
    device = _device(args.cpu)
    _start(args)
    dls, path, _ = make_dls(args.path, args.size, args.bs, args.valid_pct, args.seed, device,
                            folder_check=args.folder_check)
    check_batches(len(dls.train_ds), len(dls.valid_ds), len(dls.train), args)  # as fastai counts
    rows, curves = [], {}
    for s in schedules:
        set_seed(args.seed, reproducible=True)
        splitter = functools.partial(auto_splitter, n_groups=2) if s == "two_groups" else None
        learn = _learner(dls, args, splitter=splitter, fname=f"group_log_{s}.csv")
        if not rows:
            check_size(learn, args)
            args.stage.started = True
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
            plan = run_schedule(learn, s, args.epochs, args.freeze_epochs, args.lr)
        dt = time.perf_counter() - t
        res = _results(learn, plan)
        n_epochs = args.freeze_epochs + args.epochs
        why = None if plan and plan["rolled_back"] == ["unfrozen"] else diverged(learn, args.lr)
        rnd = lambda x: None if x is None or why else round(x, 4)  # noqa: E731
        row = {"schedule": s, "groups": len(learn.opt.param_lists), "accuracy": rnd(res["accuracy"]),
               "error_rate": rnd(res["error_rate"]), "s_per_epoch": round(dt / n_epochs, 2)}
        if device.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        rows.append(row)
        if why:
            row["note"] = "diverged (loss NaN)"
            print(f"{s}: {why}", file=sys.stderr)
            continue
        curves[s] = [math.nan if a is None else a for a in res["accuracy_per_epoch"]]
        print(f"{s}: accuracy {_fmt(row['accuracy'])} ({row['s_per_epoch']} s/epoch)")
    table = pd.DataFrame(rows)
    table.to_csv(out / "compare.csv", index=False)
    md = table.to_markdown(index=False) if _has_tabulate() else _markdown(table)
    (out / "compare.md").write_text(f"# Freeze/unfreeze schedules on {_data_name(path, args.path)} ({args.arch}, "
                                    f"{args.size} px, {args.freeze_epochs}+{args.epochs} epochs, seed {args.seed})"
                                    f"\n\n{md}\n")
    from .plots import plot_compare
    fig = plot_compare(curves, args.freeze_epochs, f"{args.arch} on {path.name}")
    fig.savefig(out / "compare.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(md)
    return ["compare.csv", "compare.md", "compare.png"]


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def _markdown(df) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse already exits 2; keep it to one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _train_options(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("path", nargs="?", type=Path, default=None,
                   help="folder with one sub-folder per product (or train/ and valid/); default: bundled sample")
    p.add_argument("--arch", default=DEFAULT_ARCH, help=f"architecture (default {DEFAULT_ARCH}, offline weights)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from pretrained weights (default yes)")
    p.add_argument("--weights", default=None, help="a local state_dict file to start from")
    p.add_argument("--epochs", type=int, default=2, help="unfrozen epochs (default 2)")
    p.add_argument("--freeze-epochs", type=int, default=1, help="frozen epochs first (default 1)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--bs", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="base learning rate of the head (default 2e-3)")
    p.add_argument("--valid-pct", type=float, default=0.2, help="validation share without train/valid (0.2)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--data", type=Path, default=None, help="the data folder, as an option (same as the positional "
                   "folder)")
    p.add_argument("--out", default=out, help=f"output folder (default {out}); the run writes into "
                   "<out>.partial-XXXX and moves it to <out> at the end; results already in <out> are moved to "
                   "<out>.previous (an older <out>.previous is removed); an interrupted or failed run leaves <out> "
                   "as it was")
    p.add_argument("--cpu", action="store_true", help="use the CPU even when a GPU is present")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: OMP_NUM_THREADS, "
                   "else physical cores minus the other processes running now, at least 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastai-groups", description="Fine-tune image classifiers with discriminative "
                     "learning rates on automatically found parameter groups.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"fastai-groups {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("summary", help="print an architecture summary", description="Print arch_summary.")
    p.add_argument("arch", help="torchvision name (resnet50), timm name (timm:convnext_tiny) or xresnet18")
    p.add_argument("idxs", nargs="*", help="path to a submodule: indices or attribute names")
    p.add_argument("--verbose", action="store_true", help="list each child's children")
    p.add_argument("--params", action="store_true", help="add parameter counts and trainable state")
    p.add_argument("--groups", choices=GRANULARITIES, default=None, help="add each row's parameter group")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("finetune", help="fine-tune a product-image classifier",
                       description="Fine-tune on auto_splitter groups with the recipe fine_tune_groups (--schedule "
                                   "fine_tune: fastai's); write the exported learner, group log, plots and report.md "
                                   "into --out.")
    _train_options(p, "runs/finetune")
    p.add_argument("--granularity", choices=GRANULARITIES, default="stage", help="parameter groups (stage)")
    p.add_argument("--schedule", choices=SCHEDULES, default="fine_tune_groups",
                   help="training schedule (default fine_tune_groups: the recipe of BENCHMARKS.md)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="compare freeze/unfreeze schedules",
                       description="Train one learner per schedule with the same data split, seed and epoch "
                                   "budget; write compare.csv, compare.md and compare.png into --out.")
    _train_options(p, "runs/compare")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated, from {', '.join(SCHEDULES)}")
    p.add_argument("--granularity", choices=GRANULARITIES, default="stage", help="parameter groups (stage)")
    p.add_argument("--quiet", action="store_true", help="hide per-schedule training output")
    p.set_defaults(func=cmd_compare)
    return parser


def _end_bar(stage: Optional[Staging]) -> None:
    "End the line of a progress bar cut short, so that the message starts on its own line."
    if stage is not None and stage.started:
        print(flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    "Entry point of the `fastai-groups` console script."
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    stage = None
    try:
        args = build_parser().parse_args(argv)
        check_numbers(args)
        check_data_arg(args)
        if hasattr(args, "schedules"):
            _schedules(args)
        if hasattr(args, "out"):  # a training command: check --out, then write beside it
            args.threads_used = pick_threads(args.threads)
            args.load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
            stage = Staging(Path(args.out))
            stage.check(data=getattr(args, "path", None))
            check_folder(args)
            args.stage = stage
            stage.open()
        written = args.func(args)
        if stage is not None:
            for note in stage.publish():
                print(note)
            print(f"wrote {shown(stage.out)}/: {', '.join(written)}")
    except UsageError as e:
        _end_bar(stage)
        print(f"fastai-groups: error: {e}{stage.fail_note() if stage else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_bar(stage)
        print(f"fastai-groups: interrupted{stage.fail_note(always=True) if stage else ''}", file=sys.stderr)
        return 130
    except BaseException:
        if stage is not None:  # a bug: the traceback follows, after where the partial run is
            print(f"fastai-groups: failed{stage.fail_note(always=True)}", file=sys.stderr)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
