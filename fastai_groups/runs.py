"""Where a command-line run writes: a fresh folder beside `--out`, moved into place at the end, so an interrupted
or failed run leaves the previous results as they were (`Staging`). A run folder lists what it wrote in a manifest
(names and SHA-256 hashes): only files listed there, unchanged since, are ever moved or removed by a later run."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .checks import UsageError

__all__ = ["ARTEFACTS", "MANIFEST", "Staging", "shown", "foreign_files", "write_manifest"]


# ----------------------------------------------------------------------------------------------------------------
# Output folder: written beside --out, moved into place at the end
# ----------------------------------------------------------------------------------------------------------------
#: What the commands write into --out.
ARTEFACTS = ("export.pkl", "group_log.csv", "group_lr.png", "confusion_matrix.png", "report.md", "results.json",
             "compare.csv", "compare.md", "compare.png")
#: The file of a run folder listing what the run wrote (name -> SHA-256): a folder holding anything else, or a listed
#: file changed since, is never replaced.
MANIFEST = ".fastai-groups-manifest.json"


def shown(p: Path) -> str:
    "`p` relative to the working directory when it is below it, else as given."
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(p)


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    "List every file of `folder` with its SHA-256 in `folder/MANIFEST` (a run's own files, written at its end)."
    files = {f.name: _sha256(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"written_by": "fastai-groups", "files": files}, indent=1))


def foreign_files(folder: Path) -> list[str]:
    """Entries of `folder` that a fastai-groups run did not write: not in its manifest, or changed since (all of
    them when there is no readable manifest)."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    return sorted(f.name for f in folder.iterdir() if f.name != MANIFEST and not (
        f.is_file() and not f.is_symlink() and f.name in listed and listed[f.name] == _sha256(f)))


class Staging:
    """A fresh folder beside `out` that a run writes into; `publish()` moves it to `out` at the end, the results
    already there (fastai-groups artefacts only) to `<out>.previous` (replacing an older `<out>.previous`, said
    on the console). `check()` refuses, before anything is written, an `out` that is a file, lies under a file,
    cannot be written or holds other files. Until `publish()`, `out` is untouched.

    >>> st = Staging(Path("runs/finetune")); st.check(); st.open()  # doctest: +SKIP
    """

    def __init__(self, out: Path):
        self.out = Path(out).expanduser().resolve()      # symbolic links followed: the run replaces their target
        self.previous = self.out.with_name(self.out.name + ".previous")
        self.tmp: Optional[Path] = None
        self.made: list[Path] = []   # parent folders created for the run (removed again if nothing is written)
        self.started = False         # training has started: a failure keeps the partial folder

    def check(self, data: Optional[Path] = None) -> None:
        "Refuse, before anything is written, an `out` that cannot take the run (see the class); `data`: the images."
        out, arg = self.out, shown(self.out)
        if data is not None:
            data = Path(data).expanduser().resolve()
            if out == data or data in out.parents:
                raise UsageError(f"--out {arg} lies inside the data folder {shown(data)}: a later run would take it "
                                 f"for a class of images; give an --out outside {shown(data)}")
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
        write_manifest(self.tmp)
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
        if self.tmp is not None and all(f.is_file() and (f.name in ARTEFACTS or f.name.startswith("group_log_"))
                                        for f in self.tmp.iterdir()):   # this run's own, unpublished folder
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
