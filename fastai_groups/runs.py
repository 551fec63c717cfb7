"""Where a command-line run writes: a fresh folder beside `--out`, moved into place at the end, so an interrupted
or failed run leaves the previous results as they were (`Staging`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .checks import UsageError

__all__ = ["ARTEFACTS", "Staging", "shown", "foreign_files"]


# ----------------------------------------------------------------------------------------------------------------
# Output folder: written beside --out, moved into place at the end
# ----------------------------------------------------------------------------------------------------------------
#: What the commands write into --out; a folder holding anything else is not replaced.
ARTEFACTS = ("export.pkl", "group_log.csv", "group_lr.png", "confusion_matrix.png", "report.md", "results.json",
             "compare.csv", "compare.md", "compare.png")


def shown(p: Path) -> str:
    "`p` relative to the working directory when it is below it, else as given."
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(p)


def foreign_files(folder: Path) -> list[str]:
    "Entries of `folder` that no fastai-groups command writes."
    return sorted(f.name for f in folder.iterdir() if not (f.is_file() and (
        f.name in ARTEFACTS or (f.name.startswith("group_log_") and f.suffix == ".csv"))))


class Staging:
    """A fresh folder beside `out` that a run writes into; `publish()` moves it to `out` at the end, the results
    already there (fastai-groups artefacts only) to `<out>.previous` (replacing an older `<out>.previous`, said
    on the console). `check()` refuses, before anything is written, an `out` that is a file, lies under a file,
    cannot be written or holds other files. Until `publish()`, `out` is untouched.

    >>> st = Staging(Path("runs/finetune")); st.check(); st.open()  # doctest: +SKIP
    """

    def __init__(self, out: Path):
        self.out = Path(out).expanduser().absolute()
        self.previous = self.out.with_name(self.out.name + ".previous")
        self.tmp: Optional[Path] = None
        self.made: list[Path] = []   # parent folders created for the run (removed again if nothing is written)
        self.started = False         # training has started: a failure keeps the partial folder

    def check(self) -> None:
        out, arg = self.out, shown(self.out)
        for parent in [out, *out.parents]:
            if parent.exists() and not parent.is_dir():
                where = "is a file" if parent == out else f"lies under {shown(parent)}, which is a file"
                raise UsageError(f"--out {arg} {where}, not a folder: give another --out")
            if parent.exists():
                break
        parent = next(p for p in out.parents if p.exists())  # the staging folder is made beside out
        try:  # a real attempt: permission bits say nothing to root, nor about read-only or special file systems
            os.rmdir(tempfile.mkdtemp(prefix=".fastai-groups-probe-", dir=parent))
        except OSError as e:
            raise UsageError(f"--out {arg}: cannot write into {shown(parent)} ({e.strerror}): "
                             "give another --out") from None
        for folder, fix in ((out, "give another --out or an empty folder"),
                            (self.previous, f"move {shown(self.previous)} away or give another --out")):
            if folder.is_dir() and foreign_files(folder):
                names = foreign_files(folder)
                raise UsageError(f"{shown(folder)} holds files fastai-groups did not write ({', '.join(names[:3])}"
                                 f"{', ...' if len(names) > 3 else ''}) and would be replaced: {fix}")

    def open(self) -> Path:
        "Create the parents of `out` and the staging folder `<out>.partial-XXXX`; return the latter."
        missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        try:
            for p in reversed(missing):
                p.mkdir()
                self.made.append(p)
            self.tmp = Path(tempfile.mkdtemp(prefix=self.out.name + ".partial-", dir=self.out.parent))
            umask = os.umask(0)
            os.umask(umask)
            self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the results folder should not be
        except OSError as e:
            self.discard()
            raise UsageError(f"--out {shown(self.out)}: cannot create it ({e.strerror}): give another --out") from None
        return self.tmp

    def publish(self) -> list[str]:
        "Move the staging folder to `out` (the old `out` to `<out>.previous`); return what to tell the user."
        notes = []
        if self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
        if self.out.exists():
            if self.previous.exists():
                shutil.rmtree(self.previous)  # fastai-groups artefacts only (check), the results before last
                notes.append(f"removed the older {shown(self.previous)}")
            self.out.rename(self.previous)
            notes.append(f"previous results moved to {shown(self.previous)}")
        self.tmp.rename(self.out)
        self.tmp = None
        return notes

    def discard(self) -> None:
        "Remove the staging folder (and created parents) of a run that stopped before training."
        if self.tmp is not None and not foreign_files(self.tmp):
            shutil.rmtree(self.tmp)
            self.tmp = None
        for p in reversed(self.made):
            with contextlib.suppress(OSError):
                p.rmdir()  # only if still empty

    def fail_note(self, always: bool = False) -> str:
        """What a failed or interrupted run left: nothing (staging folder removed before training), or the
        partial folder (kept once training started); `out` is untouched either way."""
        if not self.started:
            self.discard()
        if not (self.started or always):
            return ""
        kept = f"; the partial run is in {shown(self.tmp)}" if self.tmp is not None else ""
        return f" ({shown(self.out)} left as it was{kept})"
