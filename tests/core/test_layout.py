"""The source tree shows its design: short files, no private names imported across modules, and no imports of the
project's own modules hidden inside functions (the way cycles get broken by hand): the import tree is the folder
tree."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
TREES = ("fxcompress", "passes", "golden_models")
MAX_LINES = 600


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


def test_no_imports_of_the_project_inside_functions():
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
    assert not found, f"imports of the project inside functions: {sorted(found)}"


def test_pass_libraries_never_import_a_pass():
    found = []
    for path in sorted((ROOT / "passes").glob("*/lib/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fxcompress.passes."):
                parts = node.module.split(".")
                if len(parts) >= 4 and parts[3] != "lib":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
    assert not found, f"pass libraries importing a pass: {found}"
