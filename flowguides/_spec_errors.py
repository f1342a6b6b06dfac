"""Flow-spec errors: pydantic's validation errors rewritten as one line per field,
``field.path: expected X, got Y``."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import ValidationError

__all__ = ["describe_errors"]

_INT_FIELDS = ("repeat", "num_steps", "max_steps", "seed")


def _format_loc(loc: tuple[Any, ...], tags: Collection[str]) -> str:
    """``('layers', 2, 'realnvp', 'hidden', 0)`` -> ``layers[2].hidden[0]``."""
    out = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif k == 2 and loc[0] == "layers" and part in tags:
            continue  # pydantic's discriminator tag, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(loc: str, err: dict[str, Any], tags: Collection[str]) -> str:
    """One line ``field.path: expected X, got Y`` for one pydantic error."""
    kind, value = err["type"], err.get("input")
    ctx = err.get("ctx", {})
    if kind == "value_error":  # our own validators write "field: message"
        msg = str(ctx.get("error", err["msg"]))
        field, _, rest = msg.partition(": ")
        return f"{loc}.{field}: {rest}" if loc and field != loc else msg
    if kind == "extra_forbidden":
        return f"{loc}: unknown field (got value {value!r})"
    if kind == "union_tag_invalid":
        tag = ctx.get("tag", value)
        return f"{loc}.type: expected one of {sorted(tags)}, got {tag!r}"
    if kind == "union_tag_not_found":
        return f"{loc}.type: missing; expected one of {sorted(tags)}"
    if kind == "literal_error":
        return f"{loc}: expected one of {ctx.get('expected')}, got {value!r}"
    if kind == "greater_than" and ctx.get("gt") == 0:
        integer = loc.endswith("]") or loc.rsplit(".", 1)[-1] in _INT_FIELDS
        what = "integer" if integer else "number"
        return f"{loc}: expected a positive {what}, got {value!r}"
    if kind == "greater_than_equal":
        return f"{loc}: expected a number >= {ctx.get('ge')}, got {value!r}"
    if kind == "missing":
        return f"{loc}: required field is missing"
    msg = err["msg"].replace("tuple", "list")
    return f"{loc}: {msg[0].lower()}{msg[1:]}, got {value!r}"


def describe_errors(tags: Collection[str], exc: ValidationError) -> list[str]:
    """One line per error of `exc`; `tags` are the layer types (pydantic's discriminator tags,
    left out of field paths)."""
    return [_describe(_format_loc(tuple(e["loc"]), tags), e, tags) for e in exc.errors()]
