"""A model's arguments in compiled programs: traced or constant, and the keys compiles cache on;
what a `PosteriorFit` reads off its model (`observed_data`, `log_likelihood`: the fit's
methods of those names).

`fit_posterior` traces the array arguments of a model, so that a compile is reused for new
data of the same shapes. A model that uses a data value in Python (``int(counts.sum())``,
``range(int(T))``, ``if y.max() > 0:``) cannot be traced that way; NumPyro's `SVI.run` and
`MCMC` run it because they close over the arguments. `choose_constants` finds such a model by
tracing it once (abstractly: nothing compiles) and then compiles its arrays in as constants, as
NumPyro does, with one `ConstantArgumentsWarning`; ``static_argnames`` says so up front.

A compiled program bakes in every value the model reads that is not a traced argument: a
module-level or closure array, a default, a static argument. `callable_key` keys a cache entry
on the model's identity and the *contents* of those values, so that changing a global ``y`` and
fitting again compiles anew instead of fitting the old ``y``.

The Pyro backend's ``_model.py`` shares the job (how a fit runs the user's model), not names.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import types
import warnings
from collections.abc import Callable, Collection, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.util import log_likelihood as _numpyro_log_likelihood

from flowguides.core import calls
from flowguides.core.calls import callable_name, first_line, parameter_labels, user_stacklevel

__all__ = [
    "TRACER_ERRORS",
    "ConstantArgumentsWarning",
    "ModelTracingError",
    "as_constants",
    "callable_key",
    "choose_constants",
    "log_likelihood",
    "model_tracing_error",
    "observed_data",
    "split_args",
    "value_key",
]

TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,  # TracerBoolConversionError is a subclass
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)
"""What JAX raises when a traced value is turned into a Python (or numpy) value."""

_LIBRARIES = frozenset(
    {"jax", "jaxlib", "numpy", "numpyro", "scipy", "optax", "flowguides", "funsor", "equinox"}
)
_MAX_DEPTH = 4  # how deep `callable_key` follows the user functions a model calls


class ConstantArgumentsWarning(UserWarning):
    """The model uses an argument's value in Python: its arrays are compiled in as constants."""


class ModelTracingError(TypeError):
    """The model turns a traced value into a Python value even with constant arguments: a
    latent site's value steers Python code, which no traced fit (NumPyro's SVI or MCMC
    either) can run."""


Label = int | str  # a top-level argument: its position in `args` or its key in `kwargs`


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | jax.Array)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host(x: Any) -> Any:
    """A JAX array as numpy (a typed PRNG key stays as it is)."""
    return np.asarray(x) if isinstance(x, jax.Array) and not _is_key(x) else x


def _digest(x: Any) -> tuple | None:
    arr = np.asarray(jax.random.key_data(x) if _is_key(x) else x)
    if arr.dtype == object:  # Python objects: no bytes to hash
        return None
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return ("array", arr.shape, str(arr.dtype), hashlib.blake2b(data, digest_size=16).digest())


def value_key(x: Any) -> Hashable | None:
    """A hashable key for `x` by its contents (arrays by a hash of their bytes), or None where
    `x` is unhashable and holds no arrays this can read (then nothing keyed on it is cached)."""
    if _is_array(x) or isinstance(x, np.generic):
        return _digest(x)
    if isinstance(x, list | tuple):
        parts = tuple(value_key(v) for v in x)
        return None if any(p is None for p in parts) else (type(x).__name__, parts)
    if isinstance(x, dict):
        parts = tuple((value_key(k), value_key(v)) for k, v in x.items())
        return None if any(k is None or v is None for k, v in parts) else ("dict", parts)
    try:
        hash(x)
    except TypeError:
        return None
    return (type(x), x)  # by value, or by identity (the key keeps the object alive)


def _is_user_code(fn: Any) -> bool:
    """Whether `fn` (a function, a module or a class) is the user's, not a library's."""
    if isinstance(fn, types.ModuleType):
        root, filename = fn.__name__.split(".")[0], getattr(fn, "__file__", None) or ""
    elif isinstance(fn, type):
        root = (fn.__module__ or "").split(".")[0]
        filename = getattr(sys.modules.get(fn.__module__), "__file__", None) or ""
    else:
        root = (getattr(fn, "__module__", None) or "").split(".")[0]
        filename = getattr(getattr(fn, "__code__", None), "co_filename", "")
    library = "site-packages" in filename or "dist-packages" in filename
    builtin = root in _LIBRARIES or root in sys.stdlib_module_names or root == "builtins"
    return not (library or builtin)


def _code_names(code: types.CodeType) -> set[str]:
    """Global and attribute names `code` reads, nested functions and comprehensions included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def callable_key(fn: Any, _depth: int = 0, _seen: frozenset = frozenset()) -> Hashable | None:
    """A cache key for `fn`: its identity plus the contents of what its code reads besides its
    arguments (the module-level names in its code, closure cells, defaults, a partial's
    arguments, a bound object's attributes), following the user functions it calls; None when
    some value cannot be keyed by content (then do not cache)."""
    if isinstance(fn, functools.partial):
        parts = [
            ("func", callable_key(fn.func, _depth, _seen)),
            ("args", value_key(fn.args)),
            ("keywords", value_key(fn.keywords)),
        ]
        return None if _missing(parts) else ("partial", *parts)
    if isinstance(fn, types.MethodType):
        names = _code_names(fn.__func__.__code__) if hasattr(fn.__func__, "__code__") else set()
        parts = [
            ("func", callable_key(fn.__func__, _depth, _seen)),
            ("self", _object_key(fn.__self__, names)),
        ]
        return None if _missing(parts) else ("method", *parts)
    if not isinstance(fn, types.FunctionType):
        if isinstance(fn, type) or not callable(fn) or isinstance(fn, types.BuiltinFunctionType):
            return value_key(fn)
        # a callable object (a class with __call__, a NumPyro handler around a model): its
        # __call__ and every attribute it holds
        if id(fn) in _seen or _depth > _MAX_DEPTH:
            return None  # a cycle or too deep: not keyed, so not cached
        attrs = getattr(fn, "__dict__", {})
        call = type(fn).__call__  # a slot wrapper for a C-level __call__: keyed as itself
        parts = [
            ("self", value_key(fn)),
            ("call", callable_key(call, _depth + 1, _seen | {id(fn)})
                     if isinstance(call, types.FunctionType) else ("builtin", call)),
        ]  # fmt: skip
        parts += [
            (n, _free_key(v, set(), _depth, _seen | {id(fn)})) for n, v in sorted(attrs.items())
        ]
        return None if _missing(parts) else ("object", tuple(parts))
    if id(fn) in _seen or _depth > _MAX_DEPTH or not _is_user_code(fn):
        return (types.FunctionType, fn)
    seen = _seen | {id(fn)}
    names = _code_names(fn.__code__)
    parts: list = [
        (name, _free_key(fn.__globals__[name], names, _depth, seen))
        for name in sorted(names)
        if name in fn.__globals__
    ]
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        parts.append((name, _free_key(value, names, _depth, seen)))
    parts.append(("defaults", value_key(fn.__defaults__)))
    parts.append(("kwdefaults", value_key(fn.__kwdefaults__)))
    return None if _missing(parts) else (types.FunctionType, fn, tuple(parts))


def _missing(parts: list[tuple[str, Hashable | None]]) -> bool:
    """Whether some ``(name, key)`` pair of `parts` has no key."""
    return any(key is None for _, key in parts)


def _free_key(value: Any, names: set[str], depth: int, seen: frozenset) -> Hashable | None:
    if isinstance(value, types.ModuleType) or isinstance(value, type):
        if id(value) in seen or depth > _MAX_DEPTH or not _is_user_code(value):
            return ("id", value)
        # the user's own module or class: also what the code reads from it (``config.SHIFT``)
        attrs, seen = vars(value), seen | {id(value)}
        read = [
            (n, _free_key(attrs[n], names, depth + 1, seen)) for n in sorted(names & set(attrs))
        ]
        return None if _missing(read) else ("id", value, tuple(read))
    if callable(value) and not isinstance(value, np.ndarray | jax.Array):
        return callable_key(value, depth + 1, seen)
    return _object_key(value, names)


def _object_key(obj: Any, names: set[str]) -> Hashable | None:
    """`value_key(obj)`, plus, for an object with attributes, the attributes named in
    `names` (what the code reads as ``obj.name``)."""
    key = value_key(obj)
    attrs = getattr(obj, "__dict__", None)
    if key is None or not isinstance(attrs, dict) or isinstance(obj, types.ModuleType):
        return key
    read = tuple((n, value_key(attrs[n])) for n in sorted(names & set(attrs)))
    return None if any(k is None for _, k in read) else (key, read)


def _entries(args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[Label, Any]]:
    return [*enumerate(args), *kwargs.items()]


def split_args(
    args: tuple, kwargs: Mapping[str, Any], constants: Collection[Label] = ()
) -> tuple[list, Hashable | None, Callable[[list], tuple]]:
    """``(arrays, signature, rebuild)``: the array leaves of the arguments not in `constants`
    (traced), a signature of the rest (keyed by content; None if some value cannot be), and
    ``rebuild(arrays) -> (args, kwargs)``. Arrays of `constants` stay numpy constants."""
    plan = []
    arrays: list[jax.Array] = []
    parts: list[Hashable | None] = []
    for label, value in _entries(args, kwargs):
        leaves, treedef = jax.tree_util.tree_flatten(value)
        traced = [_is_array(x) and label not in constants for x in leaves]
        for x, t in zip(leaves, traced, strict=True):
            if t:
                arrays.append(jax.device_put(x))  # jnp.asarray would compile a copy
                parts.append(("traced", arrays[-1].shape, str(arrays[-1].dtype)))
            else:
                parts.append(value_key(x))
        leaves = [None if t else _host(x) for x, t in zip(leaves, traced, strict=True)]
        plan.append((label, treedef, leaves, traced))
    structure = tuple((label, treedef) for label, treedef, _, _ in plan)
    signature = None if any(p is None for p in parts) else (structure, tuple(parts))

    def rebuild(values: list) -> tuple[tuple, dict]:
        it = iter(values)
        out_args, out_kwargs = [], {}
        for label, treedef, leaves, traced in plan:
            filled = [next(it) if t else x for x, t in zip(leaves, traced, strict=True)]
            value = jax.tree_util.tree_unflatten(treedef, filled)
            if isinstance(label, int):
                out_args.append(value)
            else:
                out_kwargs[label] = value
        return tuple(out_args), out_kwargs

    return arrays, signature, rebuild


def as_constants(
    args: tuple, kwargs: Mapping[str, Any], constants: Collection[Label]
) -> tuple[tuple, dict]:
    """`args` and `kwargs` with the JAX arrays of `constants` as numpy arrays: inside a
    compiled program a numpy array stays concrete (``int(counts.sum())`` works), a JAX array
    does not."""

    out_args = tuple(jax.tree.map(_host, a) if i in constants else a for i, a in enumerate(args))
    out_kwargs = {k: jax.tree.map(_host, v) if k in constants else v for k, v in kwargs.items()}
    return out_args, out_kwargs


def _trace_error(
    model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], constants: Collection
) -> Exception | None:
    """The tracer error of tracing `model` (abstractly: nothing compiles) with the arrays
    outside `constants` traced, or None (any other error is the set-up's to report)."""
    arrays, _, rebuild = split_args(args, kwargs, constants)

    def run(values: list) -> None:
        a, k = rebuild(values)
        with handlers.block():
            handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*a, **k)

    try:
        jax.eval_shape(run, arrays)
    except TRACER_ERRORS as exc:
        return exc
    except Exception:  # noqa: BLE001 - not a tracing problem: the set-up reports it
        return None
    return None


def model_tracing_error(model: Callable, exc: Exception, constants: bool = True, *given: Any):
    """The `ModelTracingError` for the tracer error `exc` raised while tracing `model` (with
    its array arguments as `constants` or traced), naming its pandas arguments (in `given`,
    ``(args, kwargs)``) first."""
    foreign = calls.foreign_arguments(model, *given, "jax") if given else None
    if foreign is not None:
        return ModelTracingError(f"{foreign} ({first_line(exc)})")
    if not constants:
        hint = "if the value comes from an argument, name it in static_argnames; if "
    else:
        hint = "its array arguments were constants, so it comes from a latent site: if "
    name = callable_name(model)
    return ModelTracingError(
        f"model {name!r} turns a traced value into a Python value ({first_line(exc)}): "
        f"{hint}it is a latent site's value, it is traced in any gradient fit (NumPyro's SVI "
        "and MCMC too) and cannot set a Python bool, int or float, an if or a loop bound; use "
        "jnp.where or jax.lax.cond"
    )


def choose_constants(
    model: Callable[..., Any],
    args: tuple,
    kwargs: Mapping[str, Any],
    static_argnames: Collection[str] | None = None,
) -> frozenset[Label]:
    """The model arguments to compile in as constants: those named in `static_argnames`, or,
    where tracing the model's array arguments fails with a tracer error, every argument that
    holds an array (with a `ConstantArgumentsWarning`).

    Raises:
        ValueError: a name in `static_argnames` is not an argument of `model`.
        ModelTracingError: the model fails to trace even with every argument constant.
    """
    if isinstance(static_argnames, str):
        static_argnames = [static_argnames]
    names = parameter_labels(model, args, kwargs)
    unknown = [n for n in static_argnames or () if n not in names]
    if unknown:
        raise ValueError(
            f"static_argnames: {unknown} are not arguments of the model (its arguments: "
            f"{list(names)})"
        )
    explicit = frozenset(names[n] for n in static_argnames or ())
    entries = _entries(args, kwargs)
    leaves = jax.tree.leaves([v for _, v in entries])
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return explicit  # set up inside a traced function: its caller decides
    holding = frozenset(
        label for label, v in entries if any(_is_array(x) for x in jax.tree.leaves(v))
    )
    traced_error = _trace_error(model, args, kwargs, explicit)
    if traced_error is None:
        return explicit
    if not holding - explicit:  # every array is a constant already: a latent value's doing
        raise model_tracing_error(model, traced_error, True, args, kwargs) from traced_error
    everything = explicit | holding
    constant_error = _trace_error(model, args, kwargs, everything)
    if constant_error is not None:
        raise model_tracing_error(model, constant_error, True, args, kwargs) from constant_error
    by_label = {label: n for n, label in names.items()}
    shown = sorted(str(by_label.get(label, label)) for label in holding - explicit)
    warnings.warn(
        f"model {callable_name(model)!r} uses the value of an argument in Python "
        f"({first_line(traced_error)}); its array argument(s) {shown} are compiled in as "
        "constants, as NumPyro's SVI and MCMC do, so each new data set compiles anew (a refit "
        f"on the same data does not). Pass static_argnames={shown} to say so up front.",
        ConstantArgumentsWarning,
        stacklevel=user_stacklevel(),
    )
    return everything


def observed_data(fit: Any) -> dict[str, np.ndarray]:
    """``{site: value}`` of every observed site."""
    trace = fit.guide.prototype_trace
    return {
        name: np.asarray(site["value"])
        for name, site in trace.items()
        if site["type"] == "sample" and site["is_observed"]
    }


def log_likelihood(
    fit: Any, draws: Mapping[str, Any], seed: int | None = None
) -> dict[str, np.ndarray]:
    """Pointwise log-likelihood ``{observed site: (S, *obs_shape)}`` of latent `draws`.

    The model runs seeded (`seed`, or one from the fit's generator): a subsampled plate
    (see `flowguides.numpyro._stream.subsampled_plates`) draws its indices from it, the same for every draw."""
    samples = {k: jnp.asarray(v) for k, v in draws.items()}
    model = handlers.seed(handlers.substitute(fit.model, data=fit.model_params), fit._key(seed))
    out = _numpyro_log_likelihood(model, samples, *fit.args, **fit.kwargs)
    return {k: np.asarray(v) for k, v in out.items()}
