"""`fastai-groups`: the whole job from the command line.

    fastai-groups summary resnet50 --groups stage
    fastai-groups finetune                      # bundled product photos, real ImageNet weights, offline
    fastai-groups finetune photos/ --arch timm:convnext_atto --no-pretrained --epochs 3
    fastai-groups compare --schedules fine_tune,gradual,two_groups,unfrozen

Bad input (missing folder, fewer than 2 classes, unknown architecture, weights that cannot be found) is a
one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "make_dls", "SCHEDULES"]

DEFAULT_ARCH = "tf_efficientnet_lite0"
SCHEDULES = ("fine_tune_groups", "fine_tune", "gradual", "two_groups", "unfrozen")


class UsageError(Exception):
    "A problem with the user's input: reported in one line, exit status 2."


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def make_dls(path: Optional[Path], size: int = 64, bs: int = 32, valid_pct: float = 0.2, seed: int = 42,
             device=None, augment: bool = True):
    """DataLoaders for a folder with one sub-folder per product (`valid_pct` random split, seeded), or with
    `train/` and `valid/` sub-folders; the bundled product sample when `path` is None. Unreadable images are
    reported by name and skipped. Returns `(dls, path, unreadable)`.

    >>> dls, path, bad = make_dls(None, size=32, bs=16)  # doctest: +SKIP
    """
    from fastai.vision.all import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, RandomSplitter,
                                   Resize, aug_transforms, get_image_files, parent_label)

    from .data import check_image_folder, product_sample
    path = product_sample() if path is None else Path(path)
    try:
        classes, unreadable = check_image_folder(path, warn=False)
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


def _learner(dls, args, splitter=None, fname: Optional[str] = "group_log.csv", cbs=(), train_bn: bool = True):
    from fastai.vision.all import accuracy, error_rate

    from .callbacks import GroupLogger
    from .learner import group_learner
    from .splitters import auto_splitter
    try:
        learn = group_learner(dls, args.arch, pretrained=args.pretrained, weights=args.weights,
                              splitter=splitter or functools.partial(auto_splitter, granularity=args.granularity),
                              metrics=[error_rate, accuracy], cbs=[GroupLogger(fname=fname), *cbs],
                              path=args.out, model_dir=".", train_bn=train_bn)
    except (ValueError, RuntimeError, ImportError, FileNotFoundError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if dls.device.type == "cuda":
        from fastai.callback.channelslast import ChannelsLast  # noqa: F401  (adds Learner.to_channelslast)
        learn.to_channelslast()  # mixed precision and channels-last model and inputs
    return learn


def run_schedule(learn, schedule: str, epochs: int, freeze_epochs: int, lr: float, lr_mult: float = 100) -> None:
    """Train `learn` with one freeze/unfreeze schedule, all with the same epoch budget
    (`freeze_epochs + epochs`):

    - `fine_tune`: fastai's `fine_tune` (frozen body, then everything at `slice(lr/lr_mult, lr)`);
    - `two_groups`: the same with fastai's default two groups (body, head) for non-table models;
    - `gradual`: `GradualUnfreeze`, one more group every `max(1, budget // (groups - 1))` epochs from the head
      back, discriminative rates (with fewer epochs than groups, the earliest groups stay frozen to the end);
    - `unfrozen`: everything trainable from the start, `slice(lr/lr_mult, lr)`;
    - `fine_tune_groups`: the library's recipe (`fastai_groups.recipe`, picked by the study in BENCHMARKS.md) at the
      same budget: `fine_tune_groups(freeze_epochs + epochs - 1, lr)` (best on a `train_bn=False` learner).
    """
    from .callbacks import GradualUnfreeze
    if schedule == "fine_tune_groups":
        from .recipe import fine_tune_groups
        fine_tune_groups(learn, max(1, freeze_epochs + epochs - 1), base_lr=lr, lr_mult=lr_mult)
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


def _results(learn) -> dict:
    vals = learn.recorder.values
    names = learn.recorder.metric_names[1:-1]  # without 'epoch' and 'time'
    last = dict(zip(names, vals[-1])) if vals else {}
    return {"accuracy": float(last.get("accuracy", float("nan"))),
            "error_rate": float(last.get("error_rate", float("nan"))),
            "valid_loss": float(last.get("valid_loss", float("nan"))),
            "accuracy_per_epoch": [float(dict(zip(names, v)).get("accuracy", float("nan"))) for v in vals]}


def _groups_table(learn) -> str:
    from .splitters import group_names
    groups = learn.splitter(learn.model)
    names = group_names(groups)
    rows = ["| group | name | parameters | trainable now |", "|---|---|---:|---:|"]
    for i, (n, ps) in enumerate(zip(names, groups)):
        rows.append(f"| {i} | {n} | {sum(p.numel() for p in ps):,} | "
                    f"{sum(p.numel() for p in ps if p.requires_grad):,} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# Sub-commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_summary(args) -> None:
    from .splitters import auto_splitter
    from .summary import arch_summary
    idxs = [int(i) if i.lstrip("-").isdigit() else i for i in args.idxs] or None
    groups = functools.partial(auto_splitter, granularity=args.groups) if args.groups else None
    try:
        arch_summary(args.arch, idxs, verbose=args.verbose, params=args.params, groups=groups)
    except (ValueError, IndexError, AttributeError, TypeError) as e:
        raise UsageError(str(e)) from None


def cmd_finetune(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from fastai.vision.all import ClassificationInterpretation, set_seed

    out = Path(args.out).resolve()  # learn.path is out: a relative out would be joined twice
    out.mkdir(parents=True, exist_ok=True)
    device = _device(args.cpu)
    set_seed(args.seed, reproducible=True)
    t0 = time.perf_counter()
    dls, path, unreadable = make_dls(args.path, args.size, args.bs, args.valid_pct, args.seed, device)
    args.out = out
    recipe = args.schedule == "fine_tune_groups" and args.freeze_epochs > 0
    learn = _learner(dls, args, train_bn=not recipe)
    t_data = time.perf_counter() - t0
    print(f"data: {path} ({len(dls.train_ds)} train, {len(dls.valid_ds)} valid, {len(dls.vocab)} classes); "
          f"model: {args.arch}; device: {device}")
    t1 = time.perf_counter()
    if args.freeze_epochs:
        run_schedule(learn, args.schedule, args.epochs, args.freeze_epochs, args.lr)
    else:  # fine_tune's second phase only
        learn.unfreeze()
        learn.fit_one_cycle(args.epochs, slice(args.lr / 200, args.lr / 2))
    t_train = time.perf_counter() - t1
    res = _results(learn)

    learn.export(out / "export.pkl")
    fig = learn.group_logger.plot()
    fig.savefig(out / "group_lr.png", dpi=100, bbox_inches="tight")
    interp = ClassificationInterpretation.from_learner(learn)
    interp.plot_confusion_matrix(figsize=(7, 7))
    import matplotlib.pyplot as plt
    plt.gcf().savefig(out / "confusion_matrix.png", dpi=100, bbox_inches="tight")
    plt.close("all")
    n_epochs = args.freeze_epochs + args.epochs
    if recipe:
        p = learn.recipe_plan
        schedule = (f"`fine_tune_groups({p['budget'] - 1}, base_lr={args.lr})` (the budget of `fine_tune` with "
                    f"{args.freeze_epochs} frozen + {args.epochs} epochs; `train_bn=False`): "
                    f"{'norm statistics re-estimated, then ' if p['reestimate'] else ''}{p['head_epochs']} head epochs "
                    f"on the frozen body{' (feature cache)' if p['cached'] else ''}, "
                    + (f"then {p['unfrozen_epochs']} unfrozen epoch(s) at `slice(lr/200, lr/2)`. "
                       if p["unfrozen_epochs"] else "the body never unfrozen. ")
                    + "This recipe ran because the study in BENCHMARKS.md (section `recipes`, `python -m bench "
                    "recipes`) measured it more accurate than fastai's `fine_tune` at less time on every dataset and "
                    "architecture it covers; `--schedule fine_tune` runs fastai's.")
    elif args.freeze_epochs and args.schedule != "fine_tune":
        schedule = f"schedule `{args.schedule}` (see `fastai-groups compare`), {n_epochs} epochs in all."
    elif args.freeze_epochs:
        schedule = (f"`fine_tune({args.epochs}, base_lr={args.lr}, freeze_epochs={args.freeze_epochs})`: "
                    f"{args.freeze_epochs} frozen epoch(s) (head trains, body norm layers too), then all groups at "
                    "`slice(lr/100, lr)` with lr = base_lr/2.")
    else:
        schedule = (f"no frozen epoch: all groups trainable, `fit_one_cycle({args.epochs}, "
                    f"slice({args.lr / 200:g}, {args.lr / 2:g}))` (fine_tune's second phase).")
    report = f"""# fastai-groups fine-tune report

## Data
- folder: `{path}` ({len(dls.vocab)} classes: {', '.join(map(str, dls.vocab))})
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
- accuracy: {res['accuracy']:.4f}, error rate: {res['error_rate']:.4f}, validation loss: {res['valid_loss']:.4f}
- validation accuracy per epoch: {', '.join(f'{a:.4f}' for a in res['accuracy_per_epoch'])}
- confusion matrix: `confusion_matrix.png`; exported learner: `export.pkl`

## Timings
- data and model set-up: {t_data:.1f} s
- training: {t_train:.1f} s for {n_epochs} epochs ({t_train / max(1, n_epochs):.1f} s per epoch)
"""
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps({**res, "train_seconds": t_train, "arch": args.arch}, indent=1))
    print(f"accuracy {res['accuracy']:.4f}, error rate {res['error_rate']:.4f}, training {t_train:.1f} s")
    print(f"wrote {out}/: export.pkl, group_log.csv, group_lr.png, confusion_matrix.png, report.md")


def cmd_compare(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import torch
    from fastai.vision.all import set_seed

    from .splitters import auto_splitter
    out = Path(args.out).resolve()  # learn.path is out: a relative out would be joined twice
    out.mkdir(parents=True, exist_ok=True)
    args.out = out
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown or not schedules:
        raise UsageError(f"unknown schedule(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(SCHEDULES)}")
    device = _device(args.cpu)
    dls, path, _ = make_dls(args.path, args.size, args.bs, args.valid_pct, args.seed, device)
    rows, curves = [], {}
    for s in schedules:
        set_seed(args.seed, reproducible=True)
        splitter = functools.partial(auto_splitter, n_groups=2) if s == "two_groups" else None
        learn = _learner(dls, args, splitter=splitter, fname=f"group_log_{s}.csv", train_bn=s != "fine_tune_groups")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
            run_schedule(learn, s, args.epochs, args.freeze_epochs, args.lr)
        dt = time.perf_counter() - t
        res = _results(learn)
        n_epochs = args.freeze_epochs + args.epochs
        row = {"schedule": s, "groups": len(learn.opt.param_lists), "accuracy": round(res["accuracy"], 4),
               "error_rate": round(res["error_rate"], 4), "s_per_epoch": round(dt / n_epochs, 2)}
        if device.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        rows.append(row)
        curves[s] = res["accuracy_per_epoch"]
        print(f"{s}: accuracy {row['accuracy']:.4f} ({row['s_per_epoch']} s/epoch)")
    table = pd.DataFrame(rows)
    table.to_csv(out / "compare.csv", index=False)
    md = table.to_markdown(index=False) if _has_tabulate() else _markdown(table)
    (out / "compare.md").write_text(f"# Freeze/unfreeze schedules on `{path}` ({args.arch}, {args.size} px, "
                                    f"{args.freeze_epochs}+{args.epochs} epochs, seed {args.seed})\n\n{md}\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, acc in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=s)
    ax.set_xlabel("epoch"), ax.set_ylabel("validation accuracy"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title(f"{args.arch} on {path.name}")
    fig.savefig(out / "compare.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(md)
    print(f"wrote {out}/: compare.csv, compare.md, compare.png")


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
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--cpu", action="store_true", help="use the CPU even when a GPU is present")


def build_parser() -> argparse.ArgumentParser:
    from .splitters import GRANULARITIES
    parser = _Parser(prog="fastai-groups", description="Fine-tune image classifiers with discriminative "
                     "learning rates on automatically found parameter groups.")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    "Entry point of the `fastai-groups` console script."
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    try:
        for name in ("epochs", "freeze_epochs", "size", "bs"):
            if getattr(args, name, 1) is not None and getattr(args, name, 1) < (0 if name == "freeze_epochs" else 1):
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if hasattr(args, "valid_pct") and not 0 < args.valid_pct < 1:
            raise UsageError(f"--valid-pct must be between 0 and 1 (exclusive), got {args.valid_pct}")
        if hasattr(args, "lr") and not args.lr > 0:
            raise UsageError(f"--lr must be positive, got {args.lr}")
        if getattr(args, "path", None) is not None and not args.path.exists():
            raise UsageError(f"{args.path}: no such folder")
        args.func(args)
    except UsageError as e:
        print(f"fastai-groups: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastai-groups: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
