"""Every Python block of the README runs as written, in order, in one namespace (from a scratch directory that
holds the recipes), and the shell commands it shows name real recipes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 7
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - name the block that failed
            pytest.fail(f"README python block {i} fails: {type(exc).__name__}: {exc}\n{block}")
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "int8.onnx").is_file()


def test_readme_commands_name_shipped_recipes():
    for block in _blocks("bash"):
        for recipe in re.findall(r"--recipe (\S+\.toml)", block):
            assert (ROOT / recipe).is_file(), recipe
