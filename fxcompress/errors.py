"""Every error a user can cause is an ``FxCompressError``: it names the module or node and says what to do."""
from __future__ import annotations

import difflib
import functools
import linecache
import os
import re
import traceback
import types
from typing import Iterable

import torch

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
_HERE = os.path.dirname(os.path.abspath(__file__))
# fxcompress/, passes/ and torch are library code; frames anywhere else are the user's.
_LIBRARY_DIRS = (_HERE + os.sep, os.path.join(os.path.dirname(_HERE), "passes") + os.sep,
                 os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


class FxCompressError(Exception):
    """Base class of all errors fxcompress raises for things a user can change."""


class TracingError(FxCompressError):
    """The model's forward could not be traced into an FX graph."""


class TopLevelUntraceable(TracingError):
    """Neither front end captures the model's own forward (or its inputs are not tensors): ``compile`` then
    compiles its pieces (``fxcompress/pieces.py``)."""


class RecipeError(FxCompressError):
    """The recipe names an unknown pass or option, or an option has a bad value."""


class InputError(FxCompressError):
    """The model, example inputs or calibration data are not usable."""


class PassError(FxCompressError):
    """A pass failed or broke an invariant; the message names the pass, the node and a reproducer."""


class VerificationError(PassError):
    """A check after a pass failed: lint, metadata, shapes, numerics or an honest ``modified`` flag."""


class ExportError(FxCompressError):
    """The module could not be exported to ONNX."""


class SaveError(FxCompressError):
    """The module holds something the portable format cannot describe."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    plural = f"{kind}es" if kind.endswith("s") else f"{kind}s"
    return f"unknown {kind} {name!r}.{did_you_mean(name, valid)} Valid {plural}: {', '.join(valid) or '(none)'}."


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_LIBRARY_DIRS) or filename.startswith("<eval_with_key>")


def user_frame_text(frame: types.FrameType | None) -> str | None:
    """The innermost frame from ``frame`` outwards that is the user's code, in a traceback's ``File "...", line N,
    in f`` form with its source line (None when every frame is library code)."""
    while frame is not None and _is_library_file(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return None
    code = frame.f_code
    text = linecache.getline(code.co_filename, frame.f_lineno).strip()
    return f'File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n    {text}'


def user_frame_from_stack_trace(stack_trace: str | None) -> str | None:
    """The innermost ``file:line`` of a node's recorded stack trace that is the user's code, not torch's."""
    if not stack_trace:
        return None
    frames = [m for m in _FRAME.finditer(stack_trace) if not _is_library_file(m["file"])]
    if not frames:
        return None
    last = frames[-1]
    return f"{os.path.basename(last['file'])}:{last['line']}"


def user_frame_from_exception(exc: BaseException) -> tuple[str, int, str, str] | None:
    """The innermost frame of ``exc``'s traceback in the user's code: (file, line, function, source text)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_library_file(f.filename)]
    if not frames:
        return None
    f = frames[-1]
    return f.filename, f.lineno or 0, f.name, (f.line or "").strip()
