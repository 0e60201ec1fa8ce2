"""Option checking every pass shares: values against the ``__init__`` annotations, and name patterns.

Each pass's options are the arguments of its ``__init__``; their annotations are the contract.  ``Pass`` wraps every
subclass's ``__init__`` so that a value of the wrong type (``per_channel="no"``, ``epochs=2.5``, ``exclude=[3]``) is a
``RecipeError`` naming the pass, the option, the expected type and the value, before the pass sees it::

    insert_observers: option 'per_channel' must be a bool (true or false), got 'no' (str).

``matching`` resolves name patterns (``exclude``, per-module ``ratio`` dicts): a pattern is a module name, a prefix
of one (``layer1`` covers ``layer1.0.conv1``) or an ``fnmatch`` pattern; a pattern that matches nothing is an error
naming the closest names, never an option silently ignored.
"""
from __future__ import annotations

import collections.abc
import fnmatch
import functools
import numbers
import types
import typing
from typing import Any, Callable, Iterable

from .errors import RecipeError, did_you_mean

_NONE = type(None)


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` describes (bool is not an int; an int is a float)."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is _NONE:
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint in (Callable, collections.abc.Callable) or origin is collections.abc.Callable:
        return callable(value)
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, list if origin is list else (list, tuple)):
            return False
        return not args or all(conforms(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(conforms(v, a) for v, a in zip(value, args)))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(conforms(k, args[0]) and conforms(v, args[1])
                                                             for k, v in value.items()))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not read: the pass's own checks apply


def describe(hint: Any) -> str:
    """A hint in words: ``a bool (true or false)``, ``an integer or None``, ``a list of strings``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is None or hint is _NONE:
        return "None"
    words = {bool: "a bool (true or false)", int: "an integer", float: "a number", str: "a string",
             Callable: "a callable", collections.abc.Callable: "a callable"}
    if hint in words:
        return words[hint]
    if origin is collections.abc.Callable:
        return "a callable"
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        kind = {list: "a list", tuple: "a tuple"}.get(origin, "a list")
        return f"{kind} of {_plural(args[0])}" if args and args[0] is not Ellipsis else kind
    if origin is dict:
        return f"a dict of {_plural(args[0])} to {_plural(args[1])}" if args else "a dict"
    return f"a {getattr(hint, '__name__', str(hint))}"


def _plural(hint: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "bools"}.get(hint, describe(hint))


def typed_init(owner: str | Callable[[], str], init: Callable) -> Callable:
    """``init`` with every argument checked against its annotation first (``owner``: the pass name, or a function
    giving it)."""
    hints: dict[str, Any] | None = None

    @functools.wraps(init)
    def checked(self, *args: Any, **kwargs: Any) -> None:
        nonlocal hints
        if hints is None:
            hints = typing.get_type_hints(init)
        import inspect

        bound = inspect.signature(init).bind(self, *args, **kwargs)
        name = owner() if callable(owner) else owner
        for key, value in list(bound.arguments.items())[1:]:
            hint = hints.get(key)
            param = bound.signature.parameters[key]
            if hint is None or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if not conforms(value, hint):
                raise RecipeError(f"{name}: option {key!r} must be {describe(hint)}, got {value!r} "
                                  f"({type(value).__name__}).")
        init(self, *args, **kwargs)

    checked.__fxc_typed__ = True
    return checked


def check_value(owner: str, key: str, value: Any, hint: Any) -> None:
    """A RecipeError when ``value`` does not conform to ``hint`` (options that arrive as ``**kwargs``)."""
    if not conforms(value, hint):
        raise RecipeError(f"{owner}: option {key!r} must be {describe(hint)}, got {value!r} "
                          f"({type(value).__name__}).")


def as_patterns(owner: str, key: str, value: str | Iterable[str]) -> tuple[str, ...]:
    """A tuple of pattern strings from one string or a list of them."""
    patterns = (value,) if isinstance(value, str) else tuple(value)
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise RecipeError(f"{owner}: {key} must be module names or patterns (non-empty strings), got {bad[0]!r}.")
    return patterns


def matches(name: str, pattern: str) -> bool:
    """``name`` is the module ``pattern`` names, lies inside it, or matches it as an fnmatch pattern."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def check_patterns(owner: str, key: str, patterns: Iterable[str], names: Iterable[str]) -> None:
    """A RecipeError for the first pattern that matches none of ``names``."""
    names = sorted(set(names))
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise RecipeError(f"{owner}: {key} pattern {pattern!r} matches no module.{did_you_mean(pattern, names)} "
                              f"Modules: {shown or '(none)'}. Patterns are module names, their prefixes, or fnmatch "
                              f"patterns such as 'layer1.*'.")
