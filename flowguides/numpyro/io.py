"""The NumPyro side of portable save/load (see `flowguides.io`): export and import state.

A Laplace start's whitening is saved in ``meta.json`` as it is held: a ``(dim, dim)`` matrix
(full rank) or a ``(dim,)`` vector (diagonal). Files written before diagonal whitenings were
vectors hold a diagonal ``(dim, dim)`` matrix above `FULL_RANK_MAX_DIM`; it loads as its
diagonal vector.

The public names match `flowguides.pyro.io`; `import_state` takes no `vectorize_particles`
(NumPyro guides always vectorise particles). `use_compilation_cache` writes the compiled
programs to disk (JAX's persistent cache), a NumPyro matter only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from numpyro import handlers

from flowguides.core import FULL_RANK_MAX_DIM, PRECONDITION, LoadError, SaveError
from flowguides.core.state import (
    check_sites,
    density_fields,
    density_meta,
    kind_of,
    posterior_meta,
)
from flowguides.numpyro._model import as_constants
from flowguides.numpyro.build import Flow, build_flow, get_weights, set_weights
from flowguides.numpyro.density import DensityFit
from flowguides.numpyro.guide import AutoFlowGuide
from flowguides.numpyro.posterior import TRAINING_PRNG, PosteriorFit
from flowguides.spec import FlowSpec

__all__ = ["export_state", "import_state", "use_compilation_cache"]


def _guide_sites(guide: AutoFlowGuide) -> dict[str, tuple[tuple[int, ...], str]]:
    """Latent sites in the guide's packing order (as Pyro's: model order): shape, support."""
    trace = guide.prototype_trace
    return {
        name: (tuple(np.shape(trace[name]["value"])), str(trace[name]["fn"].support))
        for name in guide._init_locs  # the packing order: the order the model runs
    }


def _model_param_shapes(guide: AutoFlowGuide) -> dict[str, tuple[int, ...]]:
    """The model's own ``numpyro.param`` sites (learned with the guide): shapes, model order."""
    trace = guide.prototype_trace
    return {n: tuple(np.shape(s["value"])) for n, s in trace.items() if s["type"] == "param"}


def _import_model_params(
    guide: AutoFlowGuide, params: dict[str, Any], saved: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """`params` with the saved (constrained, as `PosteriorFit.params` holds them) values."""
    shapes = _model_param_shapes(guide)
    unknown = [name for name in saved if name not in shapes]
    if unknown:
        raise LoadError(
            f"load: saved model param(s) {unknown} are not param sites of the model "
            f"(it has {list(shapes)})"
        )
    out = dict(params)
    for name, value in saved.items():
        if tuple(np.shape(value)) != shapes[name]:
            raise LoadError(
                f"load: model param {name!r} has shape {shapes[name]} in the model, "
                f"{tuple(np.shape(value))} when saved"
            )
        dtype = jnp.result_type(guide.prototype_trace[name]["value"])
        out[name] = jnp.asarray(value, dtype)
    return out


def export_state(obj: Any) -> tuple[FlowSpec, dict[str, np.ndarray], dict[str, Any]]:
    """``(spec, weights, meta)`` of a `Flow`, `DensityFit` or `PosteriorFit`."""
    if isinstance(obj, Flow):
        return obj.spec, get_weights(obj), {"kind": "flow", "dim": obj.dim}
    if isinstance(obj, DensityFit):
        saved = {"objective": obj.objective, "coupling": obj.coupling, "history": obj.history}
        meta = density_meta(obj.flow.dim, obj.mean, obj.std, obj.losses, **saved)
        return obj.spec, get_weights(obj.flow), meta
    if isinstance(obj, PosteriorFit):
        guide = obj.guide
        model_params = {n: np.asarray(obj.params[n]) for n in _model_param_shapes(guide)}
        meta = posterior_meta(
            guide.latent_dim, _guide_sites(guide), obj.losses, model_params, guide.preconditioner
        )
        return obj.spec, guide.get_weights(obj.params), meta
    raise SaveError(f"save: cannot save a {type(obj).__name__}")


def import_state(
    spec: FlowSpec,
    weights: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    model: Callable[..., Any] | None = None,
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Rebuild a saved object in NumPyro: a `Flow`, a `DensityFit` or (given `model`) a
    `PosteriorFit` whose parameters are the saved weights and the model's saved
    ``numpyro.param`` values (constrained, as `PosteriorFit.params` holds them; a folder
    without them leaves those sites at the model's initial values)."""
    kind, dim = kind_of(meta), meta["dim"]
    if kind == "posterior":
        if model is None:
            raise LoadError(
                "load: a saved posterior needs the model and the arguments it was fitted with: "
                "load(path, model=..., model_args=(...), model_kwargs={...})"
            )
        kwargs = dict(model_kwargs or {})
        guide = AutoFlowGuide(model, spec)
        # the key kind `fit_posterior` sets up with: the set-up program it compiled is reused
        key = jax.random.key(0, impl=TRAINING_PRNG)
        handlers.seed(guide._setup_prototype, key)(*model_args, **kwargs)
        check_sites(meta, _guide_sites(guide))
        guide.set_preconditioner(_whitening(meta.get("precondition"), guide.latent_dim))
        params = guide.set_weights(weights).initial_params()
        params = _import_model_params(guide, params, meta.get("model_params", {}))
        losses = np.asarray(meta.get("losses", []), dtype=float)
        args, kwargs = as_constants(tuple(model_args), kwargs, guide._constants)
        return PosteriorFit(guide, model, spec, params, losses, args, kwargs)
    flow = set_weights(build_flow(spec, dim), weights)
    if kind == "flow":
        return flow
    fields = density_fields(meta)
    return DensityFit(flow, spec, **fields)


def _whitening(fixed: Mapping[str, Any] | None, dim: int) -> Mapping[str, Any] | None:
    """`fixed` with an old file's diagonal ``(dim, dim)`` whitening as its ``(dim,)`` vector."""
    if fixed is None or PRECONDITION[1] not in fixed:
        return fixed
    tril = np.asarray(fixed[PRECONDITION[1]], dtype=float)
    if dim > FULL_RANK_MAX_DIM and tril.shape == (dim, dim) and not np.any(np.tril(tril, -1)):
        return {**fixed, PRECONDITION[1]: np.diagonal(tril).copy()}
    return fixed


def use_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in `path` for every program a fit compiles,
    however quick or small, so a later process loads them (see the conventions page); returns
    the directory, absolute. `path` is created where missing; None:
    ``$XDG_CACHE_HOME/flowguides/jax`` (``~/.cache/flowguides/jax`` without ``XDG_CACHE_HOME``)."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowguides/jax"
    directory = Path(home if path is None else path).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no minimum
    compilation_cache.reset_cache()  # JAX reads the setting once per process: read it anew
    return directory
