"""What flowguides reads off a user's callables and the call stack, without a framework.

A model's parameters by position or keyword (`parameter_labels`), why a call cannot bind to
a model's signature (`call_error`), a callable's name (`callable_name`), an error's first line
(`first_line`) and the `stacklevel` of a warning that names the user's own line
(`user_stacklevel`). Imports neither torch nor jax.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FIT_OPTIONS",
    "INFER_OPTIONS",
    "callable_name",
    "call_error",
    "first_line",
    "foreign_arguments",
    "parameter_labels",
    "user_stacklevel",
    "warn_shadowed_options",
]

# The keyword options of `fit_posterior` and `infer` (both backends; the rest of their
# keywords go to the model), and names users bring from Pyro, NumPyro and optimisers.
FIT_OPTIONS = (
    "num_steps", "learning_rate", "num_particles", "clip_norm", "init_loc_fn", "init_scale",
    "seed", "progress", "static_argnames", "vectorize_particles", "objective", "gradient",
    "num_inner", "control_variate", "devices",
)  # fmt: skip
INFER_OPTIONS = ("num_steps", "num_draws", "neutra", "seed", "progress", "fit_options")
_ALIASES = {
    "progress_bar": "progress", "rng_seed": "seed", "rng_key": "seed", "random_state": "seed",
    "lr": "learning_rate", "step_size": "learning_rate", "steps": "num_steps",
    "n_steps": "num_steps", "num_iterations": "num_steps", "iterations": "num_steps",
    "particles": "num_particles", "n_particles": "num_particles", "num_samples": "num_draws",
}  # fmt: skip

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


def _option_hint(keyword: str) -> str:
    option = _ALIASES.get(keyword) or next(
        iter(difflib.get_close_matches(keyword, FIT_OPTIONS + INFER_OPTIONS, n=1, cutoff=0.75)),
        None,
    )
    nuts = ""  # NUTS's own budget: infer takes it in its neutra= dict
    if keyword in ("num_warmup", "num_samples", "num_chains", "target_accept_prob"):
        nuts = f"; NUTS's {keyword} goes to infer as neutra={{{keyword!r}: ...}}"
    if option is None:
        return nuts
    return f"; did you mean flowguides' option {option!r}?{nuts}"


def _unwrap(fn: Any) -> Any:
    """The user's function inside Pyro's and NumPyro's effect handlers (Pyro wraps it in a
    partial of its ``_context_wrap``; NumPyro's handlers keep it as ``.fn``)."""
    for _ in range(64):
        inner = fn
        while isinstance(inner, functools.partial):
            inner = inner.func
        if fn is not inner and getattr(inner, "__name__", "") == "_context_wrap" and fn.args:
            fn = fn.args[-1]
        elif type(fn).__module__.startswith(("numpyro.", "pyro.")) and callable(
            getattr(fn, "fn", None)
        ):
            fn = fn.fn
        else:
            break
    return fn


def call_error(
    model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]
) -> TypeError | None:
    """A `TypeError` that says why ``model(*args, **kwargs)`` cannot bind to `model`'s
    signature (a keyword it does not take, with the flowguides option it resembles; a missing
    or extra argument), or None where the call binds (or `model` has no signature)."""
    model = _unwrap(model)
    try:
        sig = inspect.signature(model)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        label = f"model {callable_name(model)}{sig}"
        params = sig.parameters.values()
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            unknown = [k for k in kwargs if k not in sig.parameters]
            if unknown:
                return TypeError(
                    f"{label}: does not take the keyword {unknown[0]!r} (keywords that "
                    f"fit_posterior and infer do not take themselves go to the model)"
                    f"{_option_hint(unknown[0])}"
                )
        return TypeError(
            f"{label}: cannot be called with {len(args)} positional argument(s) and the "
            f"keywords {sorted(kwargs)}: {exc}"
        )
    return None


def foreign_arguments(
    model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], backend: str
) -> str | None:
    """Where a model's set-up failed: a sentence naming its arguments of a type that the
    backend's operations do not mix with traced or differentiated values (pandas objects,
    whose arithmetic converts the other operand to NumPy; for ``backend="torch"`` also NumPy
    arrays, which torch distributions do not take), with the conversion to use; None where
    no argument is of such a type."""
    names = {label: name for name, label in parameter_labels(_unwrap(model), args, kwargs).items()}
    entries = [*enumerate(args), *kwargs.items()]
    found = []
    for label, value in entries:
        name = names.get(label, f"argument {label}" if isinstance(label, int) else label)
        inner = value.items() if isinstance(value, dict) else ()  # a dict of data: its values
        for where, item in [(name, value), *((f"{name}[{k!r}]", v) for k, v in inner)]:
            kind = type(item)
            if kind.__module__.split(".")[0] == "pandas":
                found.append((where, f"a pandas {kind.__name__}"))
            elif backend == "torch" and kind.__module__ == "numpy" and kind.__name__ == "ndarray":
                found.append((where, "a NumPy array"))
            elif _numbers(item):
                found.append((where, f"a Python {kind.__name__} of numbers"))
    if not found:
        return None
    listed = f"model {callable_name(_unwrap(model))!r}: " + ", ".join(
        f"{name!r} is {what}" for name, what in found
    )
    if backend == "torch":
        return (
            f"{listed}: torch distributions and autograd take tensors; pass torch.as_tensor(x) "
            "(x.to_numpy() first for pandas), or convert inside the model"
        )
    if all(what.startswith("a Python") for _, what in found):
        return (
            f"{listed}: JAX arithmetic does not take Python lists or tuples; pass "
            "jnp.asarray(x), or convert inside the model"
        )
    return (
        f"{listed}: pandas arithmetic with a traced JAX value converts that value to NumPy, "
        "which JAX cannot do; pass x.to_numpy() (jnp.asarray(x) for a list), or convert "
        "inside the model (jnp.asarray)"
    )


def _numbers(value: Any) -> bool:
    """Whether `value` is a non-empty list or tuple (nested too) of Python numbers."""
    if not isinstance(value, list | tuple) or not value:
        return False
    return all(
        _numbers(v) if isinstance(v, list | tuple) else isinstance(v, int | float) for v in value
    )


def warn_shadowed_options(fit: Callable[..., Any], model: Any, options: Mapping[str, Any]) -> None:
    """Warn where `model` has an argument named like one of `fit`'s own options that the
    call leaves to the model unbound, and that the user set on `fit` or the model requires:
    `fit` took the value, the model never sees it. `options`: `fit`'s arguments (its
    ``locals()`` before any other), ``args`` and ``kwargs`` those passed on to the model."""
    args, kwargs = options.get("args", ()), options.get("kwargs", {})
    try:
        parameters = inspect.signature(_unwrap(model)).parameters
        bound = inspect.signature(_unwrap(model)).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):  # not introspectable, or a call that does not bind
        return
    own = inspect.signature(fit).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    shadowed = [
        name
        for name, p in parameters.items()
        if name in own and name not in ("model", "spec", "args", "kwargs") and name not in bound
        and p.kind in kinds and (p.default is p.empty or options[name] is not own[name].default)
    ]  # fmt: skip
    if shadowed:
        warnings.warn(
            f"model {callable_name(_unwrap(model))!r}: its argument(s) {shadowed} have the names "
            f"of {fit.__name__} options, so {fit.__name__} takes them and the model gets its "
            f"default (or none): bind the model's first (functools.partial(model, "
            f"{shadowed[0]}=...)) or rename them",
            UserWarning,
            stacklevel=3,
        )
