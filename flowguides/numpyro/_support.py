"""Latent sites whose support depends on other latent sites (``x ~ Uniform(0, a)`` with `a`
latent): found at set-up (`dynamic_sites`), and constrained by replaying the model
(`constrain_by_replay`), so each draw's transform is the support at that draw's upstream
values.

NumPyro's `AutoContinuous.__call__` constrains every site by the support its prototype trace
saw; for such a site that puts draws outside their support (an infinite loss at the first
step). Its `sample_posterior` already replays the model (NumPyro's `constrain_fn`); the guide's
own call does the same here, for models that need it only. The Pyro guide mirrors this in
`flowguides.pyro._support`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost

from flowguides.numpyro._model import value_key

__all__ = [
    "constrain_by_replay",
    "constraint_key",
    "data_elements",
    "dynamic_call",
    "dynamic_sites",
    "on_device",
    "replayed",
    "supports_key",
]

_SHIFTS = (0.0, 0.5, -0.75)  # unconstrained offsets at which supports are compared


def data_elements(args: tuple, kwargs: Mapping[str, Any]) -> int:
    """Elements of a model's arguments (arrays, traced or compiled in as constants)."""
    leaves = jax.tree.leaves((args, dict(kwargs)))
    return sum(math.prod(np.shape(x)) if hasattr(x, "shape") else 1 for x in leaves)


def on_device(x: Any, dtype: Any = None) -> jax.Array:
    """`x` (an array, or a host value) as a JAX array of `dtype` (None: its own), copied to the
    device without compiling: ``jnp.asarray`` of a host array compiles a program per shape."""
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype))


def constrain_by_replay(
    model: Callable[..., Any], args: tuple, kwargs: dict, unconstrained: Mapping[str, Any]
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(values, log_dets)``: each latent site's constrained value, by the transform of its
    support where the model, replayed at the values before it, draws it; and that transform's
    log |det J| summed over the site's event dimensions."""
    values: dict[str, jax.Array] = {}
    log_dets: dict[str, jax.Array] = {}

    def substitute_fn(site: dict) -> Any:
        name = site["name"]
        if site["type"] != "sample" or site["is_observed"] or name not in unconstrained:
            return None
        u = unconstrained[name]
        transform = biject_to(site["fn"].support)
        value = transform(u)
        ladj = transform.log_abs_det_jacobian(u, value)
        event_dim = site["fn"].event_dim
        values[name] = value
        log_dets[name] = sum_rightmost(ladj, jnp.ndim(ladj) - jnp.ndim(value) + event_dim)
        return value

    with handlers.block(hide_fn=lambda msg: msg["type"] != "param"):  # the model's params
        seeded = handlers.seed(model, jax.random.key(0))
        handlers.substitute(seeded, substitute_fn=substitute_fn)(*args, **kwargs)
    return values, log_dets


def replayed(model: Callable[..., Any], key: jax.Array, trace: Mapping[str, dict]) -> Callable:
    """`model` seeded with `key` and replayed at a guide's `trace`, with the trace's sampled
    values also substituted: `numpyro.contrib.control_flow.cond` applies ``substitute`` inside
    its branches but not ``replay``, so a latent site sampled there would draw its own value
    (a log joint at the prior's draw, not the guide's); elsewhere the two set the same value."""
    values = {n: s["value"] for n, s in trace.items() if s["type"] == "sample"}
    return handlers.replay(handlers.substitute(handlers.seed(model, key), data=values), trace)


def dynamic_sites(
    model: Callable[..., Any], args: tuple, kwargs: dict, init_locs: Mapping[str, Any],
    prototype: Mapping[str, dict],
) -> tuple[str, ...]:  # fmt: skip
    """The latent sites whose support changes when the other latent values move (compared at
    a few unconstrained offsets from `init_locs`); empty at once where no latent support holds
    an array (a bound that is a Python number cannot move)."""
    if not any(_bounds(prototype[n]["fn"].support) for n in init_locs):
        return ()
    if any(isinstance(u, jax.core.Tracer) for u in init_locs.values()):
        return tuple(init_locs)  # cannot compare inside a trace: replay every site
    seen: dict[str, list] = {n: [] for n in init_locs}
    for shift in _SHIFTS:
        moved = {n: jnp.asarray(u) + shift for n, u in init_locs.items()}
        trace: dict = {}

        def record(site: dict, trace: dict = trace, moved: dict = moved) -> Any:
            if site["type"] == "sample" and site["name"] in moved and not site["is_observed"]:
                trace[site["name"]] = site["fn"].support
                return biject_to(site["fn"].support)(moved[site["name"]])
            return None

        with handlers.block():
            handlers.substitute(handlers.seed(model, jax.random.key(0)), substitute_fn=record)(
                *args, **kwargs
            )
        for n in init_locs:
            seen[n].append(_bounds(trace.get(n)))
    return tuple(n for n, b in seen.items() if any(not _same(b[0], x) for x in b[1:]))


def dynamic_call(guide: Any, args: tuple, kwargs: dict) -> dict:
    """`AutoContinuous.__call__` for a guide with dynamic supports: the
    latent draw unpacked, constrained by `constrain_by_replay`, each site a ``Delta`` carrying
    ``-log |det J|`` (NumPyro's own convention)."""
    latent = guide._sample_latent(*args, **kwargs)
    unpacked = guide._unpack_latent(latent)
    values, log_dets = constrain_by_replay(guide.model, args, kwargs, unpacked)
    result = {}
    for name in unpacked:
        event_dim = guide.prototype_trace[name]["fn"].event_dim
        log_density = 0.0 if numpyro.get_mask() is False else -log_dets[name]
        delta = dist.Delta(values[name], log_density=log_density, event_dim=event_dim)
        result[name] = numpyro.sample(name, delta)
    return result


def _bounds(constraint: Any) -> list:
    """The array-valued attributes of a constraint, nested constraints' included."""
    if constraint is None:
        return []
    out = []
    for value in vars(constraint).values():
        if isinstance(value, constraints.Constraint):
            out += _bounds(value)
        elif not (value is None or callable(value) or isinstance(value, int | float | bool | str)):
            out.append(jnp.asarray(value))
    return out


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(x.shape == y.shape and bool(jnp.all((x == y) | (jnp.isnan(x) & jnp.isnan(y))))
               for x, y in zip(a, b, strict=True))  # fmt: skip


def constraint_key(value: Any) -> Hashable | None:
    """A constraint (or a value it holds) by content: its type and attributes, arrays by a
    hash of their bytes; None where some part cannot be keyed."""
    if not isinstance(value, constraints.Constraint):
        return value_key(value)
    parts = [(k, constraint_key(v)) for k, v in sorted(vars(value).items())]
    return None if any(p is None for _, p in parts) else (type(value), tuple(parts))


def supports_key(guide: Any) -> Hashable | None:
    """A set-up guide's latent supports by content: a support whose bounds come from the data
    (``Uniform(0, y.max())``) is fixed in the guide's prototype, so it keys the compile."""
    trace = guide.prototype_trace
    parts = [constraint_key(trace[name]["fn"].support) for name in guide._init_locs]
    return None if any(p is None for p in parts) else tuple(parts)
