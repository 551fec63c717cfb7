"""The tutorial notebooks run top to bottom on CPU (executed with nbclient in a temporary folder)."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = sorted((Path(__file__).parent.parent / "nbs").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NBS] == ["01_arch_summary.ipynb", "02_product_finetune.ipynb",
                                     "03_freeze_experiments.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NBS, ids=[p.stem for p in NBS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
