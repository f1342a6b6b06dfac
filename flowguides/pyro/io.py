"""The Pyro side of portable save/load (see `flowguides.io`): export and import state.

The public names match `flowguides.numpyro.io`; `import_state` also takes
`vectorize_particles` (as `AutoFlowGuide` does; NumPyro guides always vectorise particles).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyro
import torch
from torch.distributions import transform_to

from flowguides.core import LoadError, SaveError
from flowguides.core.state import (
    check_sites,
    density_fields,
    density_meta,
    kind_of,
    posterior_meta,
)
from flowguides.pyro.build import Flow, build_flow, get_weights, set_weights
from flowguides.pyro.density import DensityFit
from flowguides.pyro.guide import AutoFlowGuide
from flowguides.pyro.posterior import PosteriorFit
from flowguides.spec import FlowSpec

__all__ = ["export_state", "import_state"]


def _guide_sites(guide: AutoFlowGuide) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        name: (tuple(site["value"].shape), str(site["fn"].support))
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
    }


def _model_param_names(guide: AutoFlowGuide) -> list[str]:
    """The model's own ``pyro.param`` sites (learned with the guide), in the model's order."""
    return [name for name, site in guide.model_trace.nodes.items() if site["type"] == "param"]


def _export_model_params(fit: PosteriorFit) -> dict[str, np.ndarray]:
    """The fitted values the fit holds (`PosteriorFit.model_params`), not the param store's."""
    out = {}
    for name in _model_param_names(fit.guide):
        if name not in fit.model_params:
            raise SaveError(
                f"save: the model's param site {name!r} was not in Pyro's param store when the "
                "fit was made; its fitted value cannot be saved"
            )
        out[name] = fit.model_params[name].cpu().numpy()
    return out


def _import_model_params(guide: AutoFlowGuide, saved: Mapping[str, np.ndarray]) -> None:
    """Set the saved (constrained) values in the param store, under the model's constraints."""
    names = _model_param_names(guide)
    unknown = [name for name in saved if name not in names]
    if unknown:
        raise LoadError(
            f"load: saved model param(s) {unknown} are not param sites of the model "
            f"(it has {names})"
        )
    store = pyro.get_param_store()
    unconstrained, constraint = dict(store.named_parameters()), store.get_state()["constraints"]
    for name, value in saved.items():
        current = store[name]
        if tuple(current.shape) != tuple(np.shape(value)):
            raise LoadError(
                f"load: model param {name!r} has shape {tuple(current.shape)} in the model, "
                f"{tuple(np.shape(value))} when saved"
            )
        new = torch.as_tensor(np.asarray(value), dtype=current.dtype, device=current.device)
        with torch.no_grad():  # in place: a pyro.module's weights are the store's own tensors
            unconstrained[name].copy_(transform_to(constraint[name]).inv(new))


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
        fixed = guide.preconditioner
        if fixed is not None:
            fixed = {k: v.detach().cpu().numpy() for k, v in fixed.items()}
        meta = posterior_meta(
            guide.latent_dim, _guide_sites(guide), obj.losses, _export_model_params(obj), fixed
        )
        return obj.spec, guide.get_weights(), meta
    raise SaveError(f"save: cannot save a {type(obj).__name__}")


def import_state(
    spec: FlowSpec,
    weights: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    model: Callable[..., Any] | None = None,
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
    vectorize_particles: bool | str = "auto",
) -> Any:
    """Rebuild a saved object in Pyro: a `Flow`, a `DensityFit` or (given `model`) a
    `PosteriorFit` whose guide holds the saved weights (`vectorize_particles` as in
    `AutoFlowGuide`). A saved diagonal whitening is a ``(dim,)`` vector; an older folder's
    ``(dim, dim)`` matrix loads as it was. The model's saved ``pyro.param`` values are set in
    Pyro's param store (an older folder holds none: the store keeps what it has)."""
    kind, dim = kind_of(meta), meta["dim"]
    if kind == "posterior":
        if model is None:
            raise LoadError(
                "load: a saved posterior needs the model and the arguments it was fitted with: "
                "load(path, model=..., model_args=(...), model_kwargs={...})"
            )
        kwargs = dict(model_kwargs or {})
        guide = AutoFlowGuide(model, spec, vectorize_particles=vectorize_particles)
        guide._setup_if_needed(*model_args, **kwargs)
        check_sites(meta, _guide_sites(guide))
        guide.set_weights(weights).set_preconditioner(meta.get("precondition"))
        _import_model_params(guide, meta.get("model_params", {}))
        losses = np.asarray(meta.get("losses", []), dtype=float)
        return PosteriorFit(guide, model, spec, losses, tuple(model_args), kwargs)
    flow = set_weights(build_flow(spec, dim), weights)
    if kind == "flow":
        return flow
    fields = density_fields(meta)
    return DensityFit(flow, spec, **fields)
