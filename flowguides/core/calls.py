"""What flowguides reads off a user's callables and the call stack, without a framework.

A model's parameters by position or keyword (`parameter_labels`), a callable's name
(`callable_name`), an error's first line (`first_line`) and the `stacklevel` of a warning
that names the user's own line (`user_stacklevel`). Imports neither torch nor jax.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["callable_name", "first_line", "parameter_labels", "user_stacklevel"]

_PACKAGE = str(Path(__file__).parents[1])


def parameter_labels(
    fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, int | str]:
    """``{name: label}`` of `fn`'s parameters for a call with `args` and `kwargs`: a
    positional one's position in `args` where it is passed there, else its name (keyword-only
    parameters and the keys of `kwargs` by name); empty where `fn` has no signature."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names: dict[str, int | str] = {}
    position = 0
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names[p.name] = position if position < len(args) else p.name
            position += 1
        elif p.kind == p.KEYWORD_ONLY:
            names[p.name] = p.name
    names.update({k: k for k in kwargs})
    return names


def user_stacklevel() -> int:
    """The `stacklevel`, for a warning raised by the caller, of the first frame outside
    flowguides and installed packages."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_PACKAGE) or "-packages" in name or name.startswith("<")):
            break
        frame, level = frame.f_back, level + 1
    return level


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, or its class name where it has none."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def callable_name(fn: Any) -> str:
    """`fn`'s ``__name__``, or its class's name (a callable object)."""
    return getattr(fn, "__name__", type(fn).__name__)
