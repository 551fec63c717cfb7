"""The `fastai-groups` command line, run as a user would (subprocess): every sub-command on (a slice of) the
bundled product photos, every artefact written, bad input as a one-line error with exit status 2."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fastai_groups import product_sample

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
ROOT = Path(__file__).resolve().parents[1]


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


def _popen(*args, env=ENV, **kw) -> subprocess.Popen:
    """The CLI as a background process that Ctrl-C (SIGINT) reaches: a shell's background job inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt."""
    return subprocess.Popen([sys.executable, "-m", "fastai_groups.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _interrupt(p: subprocess.Popen) -> str:
    "Send Ctrl-C, wait for the process to end (killed if it does not) and return its stderr."
    p.send_signal(signal.SIGINT)
    try:
        return p.communicate(timeout=300)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _strict_json(text: str):
    "json.loads that refuses NaN and Infinity (which are not JSON)."
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))


@pytest.mark.slow
def test_finetune_writes_every_artefact(photos, tmp_path):
    out = tmp_path / "runs" / "run"  # given relative to the working directory, as a user types it
    r = run("finetune", "--data", photos, "--epochs", 1, "--freeze-epochs", 1, "--size", 32, "--bs", 8,
            "--threads", 1, "--out", "runs/run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("export.pkl", "group_log.csv", "group_lr.png", "confusion_matrix.png", "report.md", "results.json"):
        assert (out / f).stat().st_size > 0, f
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run"]  # no staging folder left
    log = pd.read_csv(out / "group_log.csv")
    report = (out / "report.md").read_text()
    assert "`fine_tune_groups(1, base_lr=0.002)`" in report and "BENCHMARKS.md" in report   # the recipe ran
    assert set(log["fit"]) == set(range(log["fit"].nunique())) and log["name"].iloc[-1] == "head"
    for section in ("## Data", "## Model", "## Groups", "## Schedule", "## Results", "## Timings"):
        assert section in report
    # every epoch, the frozen one too, with its phase; threads and load; no absolute path
    n_epochs = len(_strict_json((out / "results.json").read_text())["epochs"])   # the recipe's head epochs
    for k in range(1, n_epochs + 1):
        assert re.search(rf"^\| {k} \| frozen \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", report, re.M), report
    assert "torch threads: 1 (--threads); load average at start (1/5/15 min): " in report
    assert str(tmp_path) not in report and str(photos) not in report and f"`{photos.name}`" in report
    assert r.stdout.splitlines()[-1] == ("wrote runs/run/: export.pkl, group_log.csv, group_lr.png, "
                                         "confusion_matrix.png, report.md, results.json")
    res = _strict_json((out / "results.json").read_text())
    assert 0 <= res["accuracy"] <= 1 and "GroupLogger: fit 0" in r.stdout  # the freeze table was shown
    assert [e["phase"] for e in res["epochs"]] == ["frozen"] * n_epochs and len(res["accuracy_per_epoch"]) == n_epochs
    assert n_epochs == 4   # fine_tune_groups(1): the budget of 1 frozen + 1 epochs, 4 head epochs on the fast path
    assert res["threads"] == 1 and len(res["load_average_at_start"]) == 3
    # every progress bar belongs to a training epoch: none for the confusion matrix's predictions
    assert not re.findall(r"(?<!: )\|-+\| 0\.00% \[0/", r.stdout), r.stdout[-3000:]
    from fastai.learner import load_learner
    learn = load_learner(out / "export.pkl")  # the exported learner predicts a photo
    assert learn.path == out.resolve()  # the final folder, not the staging one
    photo = next(p for p in sorted(photos.rglob("*.png")))
    label, _, probs = learn.predict(photo)
    assert label in learn.dls.vocab and len(probs) == 3

    # a rerun into the same --out: the first results move to runs/run.previous, nothing is mixed
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    r = run("finetune", photos, "--epochs", 1, "--freeze-epochs", 0, "--size", 32, "--bs", 8, "--out", "runs/run",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "previous results moved to runs/run.previous" in r.stdout
    assert {f.name: f.read_bytes() for f in (tmp_path / "runs" / "run.previous").iterdir()} == first
    assert len(_strict_json((out / "results.json").read_text())["epochs"]) == 1  # the new run's
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run", "run.previous"]

    # Ctrl-C during training: both folders untouched, the partial run named on one line
    before = {d: {f.name: f.read_bytes() for f in (tmp_path / "runs" / d).iterdir()} for d in ("run", "run.previous")}
    p = _popen("finetune", photos, "--epochs", 50, "--freeze-epochs", 0, "--size", 32, "--bs", 8, "--out", "runs/run",
               cwd=tmp_path, env={**ENV, "PYTHONUNBUFFERED": "1"})
    started = False
    for line in p.stdout:  # the freeze table is printed when training starts, epoch 0's row when it ends
        started = started or "GroupLogger: fit 0" in line  # (it may follow a progress bar on the same line)
        if started and re.match(r"\s*0\s+[\d.]+\s", line.split("\r")[-1]):
            break                                          # an epoch is done: its log rows follow at once
    time.sleep(1)
    err = _interrupt(p)
    assert p.returncode == 130 and "Traceback" not in err, err
    partial = [d.name for d in (tmp_path / "runs").iterdir() if d.name.startswith("run.partial-")]
    assert len(partial) == 1 and (tmp_path / "runs" / partial[0] / "group_log.csv").exists()
    assert err.strip().splitlines()[-1] == ("fastai-groups: interrupted (runs/run left as it was; the partial run is "
                                            f"in runs/{partial[0]})")
    assert before == {d: {f.name: f.read_bytes() for f in (tmp_path / "runs" / d).iterdir()}
                      for d in ("run", "run.previous")}


def test_out_through_a_symbolic_link(photos, tmp_path):
    "An --out that is a link to an empty folder: the run lands in the folder it points to, the link stays."
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    r = run("finetune", photos, "--epochs", 1, "--freeze-epochs", 0, "--size", 32, "--bs", 8, "--threads", 1,
            "--out", "link", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]          # no partial folder left


def test_run_folders_are_known_by_their_manifest(tmp_path):
    "Only files a run listed, unchanged, are the library's: an edited report or a user's export.pkl is not."
    from fastai_groups.runs import MANIFEST, foreign_files, write_manifest
    (tmp_path / "report.md").write_text("# a run\n")
    (tmp_path / "export.pkl").write_bytes(b"learner")
    assert foreign_files(tmp_path) == ["export.pkl", "report.md"]                  # no manifest: nothing is ours
    write_manifest(tmp_path)
    assert (tmp_path / MANIFEST).is_file() and foreign_files(tmp_path) == []
    (tmp_path / "report.md").write_text("# my notes on the run\n")                  # edited by the user since
    (tmp_path / "notes.txt").write_text("mine\n")
    assert foreign_files(tmp_path) == ["notes.txt", "report.md"]


def test_interrupt_during_start_up(tmp_path):
    "Ctrl-C while torch and fastai are imported: one line, exit 130, nothing left behind."
    p = _popen("finetune", "--out", "runs/x", cwd=tmp_path)
    t = time.time()
    while not list(tmp_path.glob("runs/x.partial-*")) and time.time() - t < 60:  # the run has started
        time.sleep(0.01)
    err = _interrupt(p)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["fastai-groups: interrupted (runs/x left as it was)"]
    assert list(tmp_path.iterdir()) == []  # neither the staging folder nor the runs/ it created


def _error_rows() -> list:
    "(command, message) of every row of docs/errors.md's table."
    rows = []
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        cells = re.findall(r"`([^`]*(?:`[^`|]*`[^`]*)*)`", line.split("|")[2]) if line.startswith("| ") else []
        if line.startswith("| ") and cells and cells[0].startswith("fastai-groups "):
            rows.append((cells[0], line.rstrip(" |").rsplit("| `", 1)[1][:-1]))
    return rows


@pytest.fixture(scope="module")
def user_folder(photos, tmp_path_factory):
    "A working directory as docs/errors.md describes it: photos/, notes.txt (a file), mine/notes.txt, mymodel/export.pkl."
    cwd = tmp_path_factory.mktemp("user")
    shutil.copytree(photos, cwd / "photos")
    (cwd / "notes.txt").write_text("a file\n")
    (cwd / "mine").mkdir()
    (cwd / "mine" / "notes.txt").write_text("the user's own\n")
    (cwd / "mymodel").mkdir()
    (cwd / "mymodel" / "export.pkl").write_bytes(b"the user's own fastai export")
    return cwd


def test_errors_table_has_every_row():
    assert len(_error_rows()) == 27


@pytest.mark.parametrize("command,message", _error_rows(), ids=lambda x: x[:60] if x.startswith("fastai") else "")
def test_errors_table(command, message, user_folder):
    "Each row of docs/errors.md: exactly that line on stderr, exit status 2, no traceback, no folder left."
    before = sorted(p.name for p in user_folder.iterdir())
    r = run(*shlex.split(command)[1:], cwd=user_folder)
    lines = [l for l in r.stderr.splitlines() if l.startswith("fastai-groups")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    pattern = re.escape(message).replace("XXXXXXXX", r"\w{8}").replace(re.escape("..."), ".*")
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), (lines, message)
    after = sorted(p.name for p in user_folder.iterdir())
    left = [n for n in after if n not in before]
    if "partial run is in" in message:  # training had started: its partial folder is kept, --out is not created
        assert len(left) == 1 and left[0].startswith("nan.partial-")
        shutil.rmtree(user_folder / left[0])
    else:
        assert left == []


def test_fast_start_imports_no_torch():
    "--help, a sub-command's --help and argument errors answer without importing torch or fastai."
    code = ("import sys\nimport fastai_groups\nassert 'torch' not in sys.modules\nfrom fastai_groups import cli\n"
            "for argv in (['--help'], ['finetune', '--help'], ['compare', '--help'], ['finetune', '--bs', '1'],\n"
            "             ['compare', '--lr', 'inf'], ['finetune', '--bogus']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'fastai' in sys.modules, 'timm' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "False False False"
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastai_groups.cli", "--help"], capture_output=True,
                       text=True, env=ENV, timeout=120)  # the console script's own path
    imported = {l.rsplit("|", 1)[-1].strip() for l in r.stderr.splitlines() if l.startswith("import time:")}
    assert r.returncode == 0 and "fastai_groups" in imported and "torch" not in imported


def test_package_names_resolve_lazily():
    import fastai_groups
    from fastai_groups import cli, splitters
    assert all(getattr(fastai_groups, n) is not None for n in fastai_groups.__all__)
    assert set(fastai_groups.__all__) <= set(dir(fastai_groups))
    assert cli.GRANULARITIES == splitters.GRANULARITIES
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastai_groups.nope


def test_pick_threads(monkeypatch):
    from fastai_groups.checks import pick_threads
    assert pick_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert pick_threads(None) == (2, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, why = pick_threads(None)
    assert 1 <= n <= os.cpu_count() and why.startswith("auto: ") and "other running processes" in why
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])   # another process using a core now
    try:
        time.sleep(0.5)
        n2, why2 = pick_threads(None)
        busy = float(why2.split(" minus ")[1].split()[0])
        assert busy >= 1 and n2 == max(1, int(why2.split()[1]) - round(busy)), why2
    finally:
        burner.kill()
        burner.wait()


@pytest.mark.slow
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


@pytest.mark.parametrize("args,msg", [  # more in docs/errors.md (test_errors_table)
    (["summary", "resnet50", "layer9"], "no child named 'layer9'"),
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


@pytest.mark.slow
def test_unreadable_images_are_reported_and_skipped(tmp_path, photos):
    data = tmp_path / "messy"
    shutil.copytree(photos, data)
    bad = next((data).iterdir()) / "broken.png"
    bad.write_bytes(b"not a png")
    r = run("finetune", data, "--epochs", 1, "--freeze-epochs", 0, "--size", 32, "--bs", 8, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "broken.png" in r.stderr


def test_offline_hub_weights_from_the_local_cache(tmp_path):
    "Offline, timm weights already in the Hugging Face cache load at once (the network check does not block them)."
    code = """
import sys, timm, torch
from safetensors.torch import save_file
from pathlib import Path
cache = Path(sys.argv[1])
snap = cache / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
snap.mkdir(parents=True)
(cache / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
(cache / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
sd = {k: torch.randn_like(v) if v.is_floating_point() else v
      for k, v in timm.create_model("resnet18").state_dict().items()}
save_file(sd, str(snap / "model.safetensors"))
from fastai_groups.weights import build_model, _hub_unreachable
assert _hub_unreachable() is not None, "this test needs a machine without network"
model, stats = build_model("timm:resnet18")
print(all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if k in sd))
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hub")], capture_output=True, text=True,
                       env={**ENV, "HF_HUB_CACHE": str(tmp_path / "hub")}, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[-1] == "True", r.stderr[-2000:]
