"""Check gin values against the annotations of the parameters they bind, before anything runs.

``Trainer.steps = "ten"`` or ``Trainer.steps = 5.5`` would otherwise fail (or, worse, work
oddly) deep inside a job, after the run folder and the Aim run exist. The check is deliberately
narrow: only the plain types a gin literal can have (bool, int, float, str/Path, None, tuples,
lists, dicts and unions of them) are checked; references (``@x``), macros (``%X``) and any other
annotation pass unchecked. Like Python's numeric tower, an int is accepted where a float is
expected; a bool is never taken for a number.

Ranges: a parameter annotated ``Annotated[int, AtLeast(1)]`` also refuses smaller literals
(``Trainer.steps = -5``), checked at the same point, so a value out of range exits 2 before the
run folder exists, like a wrong type. The function's own check stays for calls from Python.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CANNOT_TELL = object()


def annotation(fn: Callable, param: str) -> Any:
    """The resolved annotation of ``fn``'s (a function's or a class's ``__init__``) parameter,
    or None when it has none or it cannot be resolved."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that names something not importable here: check nothing
        return None
    return hints.get(param)


@dataclass(frozen=True)
class AtLeast:
    """Metadata for ``Annotated[int, AtLeast(1)]``: the smallest value the parameter accepts."""

    bound: float

    def problem(self, value: Any) -> str | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < self.bound:
            return f"got {value!r}, must be >= {self.bound:g}"
        return None


@dataclass(frozen=True)
class WritesFolder:
    """Metadata for ``Annotated[str | None, WritesFolder("why")]``: the parameter names a folder the
    run writes to. The dashboard confines such bindings to its runs folder (``write_locations``),
    so the list of write locations is these annotations, never a list kept by hand."""

    why: str


def write_locations(configurables: dict[str, Callable]) -> dict[str, str]:
    """``{"<configurable>.<param>": why}`` for every parameter annotated ``WritesFolder``, over
    ``configurables`` (name -> function or class)."""
    found = {}
    for name, fn in configurables.items():
        target = fn.__init__ if inspect.isclass(fn) else fn
        try:
            hints = typing.get_type_hints(target, include_extras=True)
        except Exception:
            continue
        for param, hint in hints.items():
            for meta in getattr(hint, "__metadata__", ()):
                if isinstance(meta, WritesFolder):
                    found[f"{name}.{param}"] = meta.why
    return found


def range_problem(fn: Callable, param: str, value: Any) -> str | None:
    """Why ``value`` is out of the range ``fn``'s parameter declares with ``AtLeast``, or None."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hint = typing.get_type_hints(target, include_extras=True).get(param)
    except Exception:
        return None
    for meta in getattr(hint, "__metadata__", ()):
        problem = meta.problem(value) if isinstance(meta, AtLeast) else None
        if problem:
            return problem
    return None


def type_problem(value: Any, expected: Any, is_marker: Callable[[Any], bool]) -> str | None:
    """Why ``value`` (a parsed gin literal) does not fit ``expected``, or None when it fits or
    cannot be judged. ``is_marker`` says whether a value is a reference/macro placeholder."""
    if expected is None or _fits(value, expected, is_marker):
        return None
    hint = ""
    if isinstance(value, str) and _fits(_number(value), expected, is_marker):
        hint = f" (write {value} without quotes)"
    return f"got {type(value).__name__} {value!r}, expected {describe(expected)}{hint}"


def describe(expected: Any) -> str:
    """``int | None``, ``tuple[float, float]``: the annotation as a user reads it."""
    if isinstance(expected, type) and not typing.get_args(expected):
        return expected.__name__
    return str(expected).replace("typing.", "").replace("pathlib.", "")


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return _CANNOT_TELL


def _fits(value: Any, expected: Any, is_marker: Callable[[Any], bool]) -> bool:
    if is_marker(value) or expected is Any:
        return True
    if value is _CANNOT_TELL:
        return False
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a, is_marker) for a in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected in (str, Path, os.PathLike):
        return isinstance(value, str)
    if expected in (tuple, list) or origin in (tuple, list):
        return isinstance(value, (tuple, list)) and _items_fit(value, args, origin, is_marker)
    if expected is dict or origin is dict:
        return isinstance(value, dict)
    return True  # callables, classes, objects: not a literal's business


def _items_fit(value, args: tuple, origin, is_marker) -> bool:
    if not args:
        return True
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return len(value) == len(args) and all(_fits(v, a, is_marker) for v, a in zip(value, args))
    return all(_fits(v, args[0], is_marker) for v in value)
