"""The source tree shows its design: short files, no private names imported across modules, and no imports of the
project's own modules hidden inside functions (the way cycles get broken by hand).  The few such imports that
remain are listed here, so the list can only shrink: an entry that is gone fails the test until it is removed."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
TREES = ("fxcompress", "passes", "golden_models")
MAX_LINES = 600
# (file, imported module) pairs still imported inside a function: the pass registry seen from the core, the
# golden models package seen from the core and the benchmarks, the bench runner seen from the training script.
REMAINING_LOCAL = {
    ("fxcompress/cli.py", "fxcompress.passes"), ("fxcompress/cli.py", "fxcompress.passes.pruning.lib.channel_deps"),
    ("fxcompress/cli.py", "bench"), ("fxcompress/cli.py", "bench.measure"),
    ("fxcompress/recipe.py", "fxcompress.passes"),
    ("fxcompress/golden.py", "fxcompress.golden_models"), ("fxcompress/golden.py", "fxcompress.golden_models.digits"),
    ("fxcompress/golden.py", "data"), ("fxcompress/golden.py", "golden_models.digits"),
    ("fxcompress/bench/training.py", "fxcompress.golden_models"),
    ("fxcompress/bench/runner.py", "fxcompress.golden_models"),
    ("fxcompress/bench/runner.py", "fxcompress.golden_models.digits"),
    ("fxcompress/bench/low_rank.py", "fxcompress.golden_models"),
    ("fxcompress/bench/quantization.py", "fxcompress.golden_models"),
    ("golden_models/digits.py", "fxcompress.errors"), ("golden_models/__init__.py", "fxcompress.errors"),
    ("golden_models/train.py", "fxcompress.bench.runner"), ("golden_models/train.py", "fxcompress.golden"),
}


def _files() -> list[pathlib.Path]:
    return sorted(p for tree in TREES for p in (ROOT / tree).rglob("*.py"))


def _internal(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] == "fxcompress"


def test_every_source_file_is_short():
    long = {str(p.relative_to(ROOT)): n for p in _files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_private_names_imported_across_modules():
    found = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _internal(node):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, f"private names imported from another module: {found}"


def test_no_new_imports_of_the_project_inside_functions():
    found = set()
    for path in _files():
        rel = str(path.relative_to(ROOT))
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and _internal(node):
                    found.add((rel, node.module or ""))
                elif isinstance(node, ast.Import):
                    found |= {(rel, a.name) for a in node.names if a.name.split(".")[0] == "fxcompress"}
    assert found - REMAINING_LOCAL == set(), f"imports of the project inside functions: {found - REMAINING_LOCAL}"
    assert REMAINING_LOCAL - found == set(), f"gone now, remove from REMAINING_LOCAL: {REMAINING_LOCAL - found}"
