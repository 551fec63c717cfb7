"""The `fastai-groups` command line, run as a user would (subprocess): every sub-command on (a slice of) the
bundled product photos, every artefact written, bad input as a one-line error with exit status 2."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fastai_groups import product_sample

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}


def run(*args, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastai_groups.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    "Three product classes of the bundled sample, 12 photos each, one folder per product (the seed's layout)."
    src = product_sample(tmp_path_factory.mktemp("sample"))
    dest = tmp_path_factory.mktemp("photos")
    for cls in sorted(p.name for p in (src / "train").iterdir())[:3]:
        (dest / cls).mkdir()
        for f in sorted((src / "train" / cls).glob("*.png"))[:12]:
            shutil.copy(f, dest / cls / f.name)
    return dest


def test_help_on_every_subcommand():
    for sub in ([], ["summary"], ["finetune"], ["compare"]):
        r = run(*sub, "--help")
        assert r.returncode == 0 and "usage: fastai-groups" in r.stdout


def test_summary_with_groups():
    r = run("summary", "resnet50", "--groups", "stage")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("[0 ] (conv1)    Conv2d           : 1   layers") and lines[0].endswith("stem")
    assert lines[4].endswith("stage1") and lines[9].endswith("head")


def test_summary_path_and_params():
    r = run("summary", "timm:convnext_atto", "stages", "0", "--params", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[0 ] (downsample)") and "yes" in r.stdout


def test_summary_xresnet_seed_output():
    r = run("summary", "xresnet18")
    assert r.stdout.splitlines()[0] == "[0 ] ConvLayer        : 3   layers"


def test_finetune_writes_every_artefact(photos, tmp_path):
    out = tmp_path / "runs" / "run"  # given relative to the working directory, as a user types it
    r = run("finetune", photos, "--epochs", 1, "--freeze-epochs", 1, "--size", 32, "--bs", 8,
            "--out", "runs/run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("export.pkl", "group_log.csv", "group_lr.png", "confusion_matrix.png", "report.md", "results.json"):
        assert (out / f).stat().st_size > 0, f
    log = pd.read_csv(out / "group_log.csv")
    report = (out / "report.md").read_text()
    assert "`fine_tune_groups(1, base_lr=0.002)`" in report and "BENCHMARKS.md" in report   # the recipe ran
    assert set(log["fit"]) == set(range(log["fit"].nunique())) and log["name"].iloc[-1] == "head"
    for section in ("## Data", "## Model", "## Groups", "## Schedule", "## Results", "## Timings"):
        assert section in report
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["accuracy"] <= 1 and "GroupLogger: fit 0" in r.stdout  # the freeze table was shown
    from fastai.learner import load_learner
    learn = load_learner(out / "export.pkl")  # the exported learner predicts a photo
    photo = next(p for p in sorted(photos.rglob("*.png")))
    label, _, probs = learn.predict(photo)
    assert label in learn.dls.vocab and len(probs) == 3


def test_compare_table(photos, tmp_path):
    out = tmp_path / "cmp"
    r = run("compare", photos, "--schedules", "fine_tune,two_groups,gradual,unfrozen,fine_tune_groups", "--epochs", 1,
            "--freeze-epochs", 1, "--size", 32, "--bs", 8, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    table = pd.read_csv(out / "compare.csv")
    assert list(table["schedule"]) == ["fine_tune", "two_groups", "gradual", "unfrozen", "fine_tune_groups"]
    assert (table.set_index("schedule").loc["two_groups", "groups"] == 2)
    assert (table["groups"] >= 2).all() and table["accuracy"].between(0, 1).all()
    assert (out / "compare.png").stat().st_size > 0 and "| schedule" in (out / "compare.md").read_text()


@pytest.mark.parametrize("args,msg", [
    (["finetune", "/no/such/folder"], "no such folder"),
    (["summary", "resnet9000"], "unknown architecture 'resnet9000'"),
    (["summary", "resnet50", "layer9"], "no child named 'layer9'"),
    (["compare", "--schedules", "sometimes"], "unknown schedule(s) sometimes"),
    (["finetune", "--epochs", "0"], "--epochs must be positive"),
    (["finetune", "--valid-pct", "1.5"], "--valid-pct must be between 0 and 1 (exclusive), got 1.5"),
    (["compare", "--lr", "0"], "--lr must be positive, got 0.0"),
    (["finetune", "--arch", "resnet9000", "--epochs", "1"], "unknown architecture 'resnet9000'"),
])
def test_bad_input_is_one_line_exit_2(args, msg):
    r = run(*args)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("fastai-groups")]
    assert len(err) == 1 and msg in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_one_class_folder(tmp_path, photos):
    one = tmp_path / "one"
    shutil.copytree(next(photos.iterdir()), one / "only_class")
    r = run("finetune", one)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "class" in r.stderr


def test_unreadable_images_are_reported_and_skipped(tmp_path, photos):
    data = tmp_path / "messy"
    shutil.copytree(photos, data)
    bad = next((data).iterdir()) / "broken.png"
    bad.write_bytes(b"not a png")
    r = run("finetune", data, "--epochs", 1, "--freeze-epochs", 0, "--size", 32, "--bs", 8, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "broken.png" in r.stderr
