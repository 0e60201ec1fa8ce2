"""Recipes: a list of passes given as dicts ``{"pass": NAME, **options}``, pass objects, or a TOML file.

A TOML recipe holds ``[[passes]]`` tables with the same keys::

    [[passes]]
    pass = "fold_bn"

Shorthand names (``SHORTHANDS`` in ``fxcompress.passes``) expand into several fine-grained passes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import tomllib

from fxcompress.passes import PASSES, SHORTHANDS

from .errors import RecipeError, did_you_mean, unknown_name_message
from .pass_base import Pass


def _registry() -> tuple[dict[str, type[Pass]], dict[str, Any]]:

    return PASSES, SHORTHANDS


def load_toml(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe file {str(path)!r} is not valid TOML: {exc}.") from exc
    extra = [k for k in data if k != "passes"]
    if extra:
        raise RecipeError(f"recipe file {str(path)!r} has unknown top-level key {extra[0]!r}."
                          f"{did_you_mean(extra[0], ['passes'])} A recipe holds only [[passes]] tables.")
    passes = data.get("passes")
    if not isinstance(passes, list) or not passes:
        raise RecipeError(f"recipe file {str(path)!r} has no [[passes]] tables. Example:\n"
                          f'[[passes]]\npass = "fold_bn"')
    return passes


def build(recipe: Any) -> list[Pass]:
    """Pass objects from a recipe: a list of dicts / Pass objects, or the path of a TOML file."""
    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_toml(recipe)
    if isinstance(recipe, (Pass, dict)):
        recipe = [recipe]
    if not isinstance(recipe, Iterable):
        raise RecipeError(f"a recipe is a list of passes or a TOML path, got {type(recipe).__name__}.")
    passes, shorthands = _registry()
    out: list[Pass] = []
    for i, entry in enumerate(recipe):
        if isinstance(entry, Pass):
            out.append(entry)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("pass"), str):
            raise RecipeError(f"recipe entry #{i} must be a pass object or a dict with a 'pass' name, "
                              f"e.g. {{'pass': 'fold_bn'}}; got {entry!r}.")
        options = {k: v for k, v in entry.items() if k != "pass"}
        name = entry["pass"]
        if name in passes:
            out.append(passes[name].from_options(options))
        elif name in shorthands:
            out.extend(shorthands[name](options))
        else:
            raise RecipeError(unknown_name_message("pass", name, [*passes, *shorthands]))
    return out
