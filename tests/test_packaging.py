"""The library as people install and look it up: the version, a wheel installed into a fresh environment (not
editable) that runs the main command, the API reference built from the docstrings, and type hints a type checker
accepts on the public API."""
import inspect
import os
import subprocess
import sys
import tomllib
import venv
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import fastai_groups

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}


def test_version_is_the_metadata_one():
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert fastai_groups.__version__ == version("fastai-groups") == expected == "0.2.0"
    r = subprocess.run([sys.executable, "-m", "fastai_groups.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"fastai-groups {expected}"
    assert f"## [{expected}]" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.slow
def test_wheel_installs_and_runs_the_main_command(tmp_path):
    "sdist and wheel by `python -m build`; the wheel alone, in a fresh venv (the heavy dependencies from this one)."
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel = next(dist.glob("fastai_groups-0.2.0-*.whl"))
    assert next(dist.glob("fastai_groups-0.2.0.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for part in ("fastai_groups/py.typed", "fastai_groups/data/LICENSE-fashion-mnist.txt", "licenses/LICENSE"):
        assert any(n.endswith(part) for n in names), (part, names)
    assert any(n.startswith("fastai_groups/data/") and n.endswith((".zip", ".tar.gz", ".npz", ".png"))
               for n in names), names                                   # the bundled product photos
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)]
    r = subprocess.run(pip, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    run = lambda *a: subprocess.run(a, capture_output=True, text=True, cwd=tmp_path, env=ENV)  # noqa: E731
    r = run(str(py), "-c", "import fastai_groups as f; print(f.__file__, f.__version__)")
    where, ver = r.stdout.split()
    assert Path(where).is_relative_to(env_dir) and ver == "0.2.0", r.stdout + r.stderr   # the wheel, not the tree
    r = run(str(env_dir / "bin" / "fastai-groups"), "finetune", "--epochs", "1", "--out", "run", "--threads", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "export.pkl").is_file()


def test_api_reference_builds_without_warnings(tmp_path):
    "The README's command (pdoc) builds the reference from the docstrings, every public name on the page."
    r = subprocess.run([sys.executable, "-m", "pdoc", "fastai_groups", "-o", tmp_path], capture_output=True,
                       text=True, env={**ENV, "PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [l for l in r.stderr.splitlines() if l.startswith("Warn")] == []
    page = (tmp_path / "fastai_groups.html").read_text()
    missing = [n for n in fastai_groups.__all__ if f'id="{n}"' not in page]
    assert missing == []


def test_every_public_callable_has_a_docstring_with_an_example():
    bare = []
    for n in fastai_groups.__all__:
        obj = getattr(fastai_groups, n)
        if callable(obj):
            doc = inspect.getdoc(obj) or ""
            if not any(k in doc for k in (">>>", "Example", "::")):
                bare.append(n)
    assert bare == []


def test_public_api_type_checks():
    "mypy accepts the calls the README shows (tests/typing/api_usage.py) against the package's own hints (py.typed)."
    assert (ROOT / "fastai_groups" / "py.typed").is_file()
    r = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                        "--no-incremental", str(ROOT / "tests" / "typing" / "api_usage.py")], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
