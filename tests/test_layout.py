"""The package's layout rules (design.md): no module imports another's underscore names (except from the private
`_meta` / `_utils`), every name is imported from the module that defines it, no import cycles between modules, no
module over 600 lines, and importing the package loads neither torch nor fastai."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastai_groups"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def _imports(mod: str, top_level_only: bool):
    "(module imported from, names) for every `from .x import ...` in `mod` (module level only, or everywhere)."
    tree = ast.parse((PKG / f"{mod}.py").read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            yield node.module, [a.name for a in node.names]


@pytest.mark.parametrize("mod", MODULES)
def test_no_private_import_across_modules(mod):
    bad = [f"{src}.{n}" for src, names in _imports(mod, top_level_only=False) for n in names
           if n.startswith("_") and src not in ("_meta", "_utils")]
    assert not bad, f"{mod} imports private names of other modules: {bad}"


def test_no_import_cycle():
    graph = {m: {src for src, _ in _imports(m, top_level_only=True)} for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])


@pytest.mark.parametrize("mod", MODULES)
def test_module_size(mod):
    n = len((PKG / f"{mod}.py").read_text().splitlines())
    assert n <= 600, f"{mod}.py has {n} lines: split it by concept"


def test_package_import_is_light_and_every_name_loads():
    code = ("import sys, fastai_groups as f; light = not {'torch', 'fastai'} & set(sys.modules); "
            "[getattr(f, n) for n in f.__all__]; print(light, len(f.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr
    light, n = out.stdout.split()
    assert light == "True" and int(n) > 40


def _defined(mod: str) -> set:
    "Names a module defines itself at top level (functions, classes, assignments), not the ones it imports."
    out = set()
    for node in ast.parse((PKG / f"{mod}.py").read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


@pytest.mark.parametrize("mod", MODULES)
def test_every_name_is_imported_from_its_owner(mod):
    "One owning module per name: no module imports a name that another module merely re-exports."
    bad = [f"{src}.{n}" for src, names in _imports(mod, top_level_only=False) for n in names
           if (PKG / f"{src}.py").exists() and n not in _defined(src)]
    assert not bad, f"{mod} imports names their module does not define: {bad}"
