"""The Taylor control variate of a subsampled model's log joint (`fit_posterior`'s
``control_variate``): the Pyro counterpart of `flowguides.numpyro._control`, same estimator.

A model whose plates subsample gives an unbiased but noisy estimate ``f_B(u)`` of the full log
joint ``F(u)`` at each step. The difference estimator (Bardenet et al. 2017, Quiroz et al. 2019;
NumPyro's ``HMCECS`` with its ``taylor_proxy``) subtracts the Taylor expansion ``T_B`` of
``f_B`` around the full-data MAP ``u0`` and adds back its exact full-data expectation ``T_F``:
``f_B(u) - T_B(u) + T_F(u)``, unbiased for every ``u``, its noise that of the Taylor remainder.
``T_F`` takes the full data's value, gradient and Hessian at ``u0`` from the start search;
``T_B`` is the step's minibatch (the same plate indices, replayed) at ``u0``: its value, its
gradient and, second order, one Hessian-vector product per particle. Above
`FULL_RANK_MAX_DIM` latent dimensions (no ``d x d`` Hessian) second order where the start
search found the full-data Hessian sparse (a plate's intercepts: `flowguides.core.hessian`;
`sparse_quadratic`), else first order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.poutine.util import site_is_subsample

from flowguides.core import CONTROL_VARIATE_PREFIX
from flowguides.core.hessian import Blocks
from flowguides.pyro._model import log_joint_at

__all__ = [
    "control_variate_model",
    "mapped_factor",
    "minibatch_factor",
    "reference_terms",
    "sparse_quadratic",
    "with_control_variate",
]


def reference_terms(out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The control variate's fixed terms from `laplace_search`'s output (run on the full
    data): the MAP, the negative log joint there, its gradient and, where formed, its Hessian,
    dense (``hess``) or sparse (``hess_rows``, ``hess_block_<f>``: `sparse_quadratic`)."""
    names = {"loc": "loc_map", "energy": "energy_map", "grad": "grad_map", "hess": "hess"}
    names.update({k: k for k in out if k == "hess_rows" or k.startswith("hess_block_")})
    return {k: out[v].detach() for k, v in names.items() if v in out}


def second_order(reference: Mapping[str, torch.Tensor]) -> bool:
    """Whether the terms hold the full-data Hessian, dense or sparse."""
    return "hess" in reference or "hess_rows" in reference


def sparse_quadratic(
    rows: torch.Tensor, terms: Sequence[torch.Tensor], blocks: Blocks, delta: torch.Tensor
) -> torch.Tensor:
    """``delta' H delta`` per row of `delta` ``(..., d)`` for a Hessian known by its sparse
    form (`flowguides.core.hessian`): the singletons' full `rows` ``(s, d)`` (twice against
    `delta`, less their block counted twice) and, per family of `blocks`, its blocks
    ``(G, k, k)`` in `terms`."""
    index = torch.as_tensor(blocks.singletons, device=delta.device)
    single = delta[..., index]
    out = 2.0 * (single * (delta @ rows.T)).sum(-1) - (single * (single @ rows[:, index].T)).sum(-1)
    for idx, block in zip(blocks.families, terms, strict=True):
        part = delta[..., torch.as_tensor(idx, device=delta.device)]  # (..., G, k)
        out = out + torch.einsum("...gq,gqp,...gp->...", part, block, part)
    return out


def control_variate_model(
    model: Callable[..., Any], guide: Any, reference: Mapping[str, torch.Tensor]
) -> Callable[..., Any]:
    """`model` with the factor ``T_F(u) - T_B(u)`` added (one value per particle where the
    ELBO runs its particles at once, under its outermost plate). `guide` is the set-up
    `AutoFlowGuide` (its sites, packing and plate nesting); `reference` the `reference_terms`."""
    loc = reference["loc"]
    names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    sizes = {name: int(torch.Size(guide._unconstrained_shapes[name]).numel()) for name in names}
    nest = guide.max_plate_nesting

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with poutine.trace() as capture:
            out = model(*args, **kwargs)
        trace = capture.trace
        indices = {
            name: site["value"]
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and site_is_subsample(site)
        }
        parts = []
        for name in names:
            site = trace.nodes[name]
            u = biject_to(site["fn"].support).inv(site["value"])
            parts.append(u.reshape(-1, sizes[name]))
        delta = torch.cat(parts, -1) - loc  # (particles, d): one row per particle run here
        batch = poutine.condition(model, data=indices)  # this step's minibatch
        factor = minibatch_factor(batch, guide, reference, delta, args, kwargs)
        shape = (factor.shape[0], *([1] * nest)) if _particle_plate(trace) else ()
        pyro.factor(f"{CONTROL_VARIATE_PREFIX}factor", factor.reshape(shape))
        return out

    return wrapped


def minibatch_factor(
    batch: Callable[..., Any],
    guide: Any,
    reference: Mapping[str, torch.Tensor],
    delta: torch.Tensor,
    args: tuple,
    kwargs: Mapping[str, Any],
) -> torch.Tensor:
    """``T_F(u) - T_B(u)`` at ``u = loc + delta`` for draws ``delta (S, d)`` sharing one
    minibatch: `batch` is the model with that minibatch's plate indices fixed. One value and
    gradient of the minibatch's log joint at the MAP, and second order one Hessian-vector
    product per draw; the factor's gradient in `delta` is ``-(grad + H delta) - (g_B + H_B
    delta)`` as the expansion's, whatever graph `delta` comes from."""
    loc, second = reference["loc"], second_order(reference)
    point = loc.clone().requires_grad_(True)
    with torch.enable_grad():
        value = log_joint_at(batch, guide.split_latent(point), args, kwargs)
        (slope,) = torch.autograd.grad(value, point, create_graph=second)
        products = None
        if second:  # H_B delta per draw
            rows = delta.detach()
            products = torch.stack(
                [torch.autograd.grad(slope, point, row, retain_graph=True)[0] for row in rows]
            )
    return _factor(reference, guide._blocks, delta, value.detach(), slope.detach(), products)


def _factor(
    reference: Mapping[str, torch.Tensor],
    blocks: Blocks | None,
    delta: torch.Tensor,
    value: torch.Tensor,
    slope: torch.Tensor,
    products: torch.Tensor | None,
) -> torch.Tensor:
    """``T_F - T_B`` at ``loc + delta`` from the minibatch's log joint at the MAP, its gradient
    and (second order) ``H_B delta`` per draw, all constants: the quadratic term then has the
    value ``delta' H_B delta / 2`` and the gradient ``H_B delta``."""
    expansion = value + (delta * slope).sum(-1)
    full = -reference["energy"] - delta @ reference["grad"]
    if products is not None:
        expansion = expansion + (delta * products).sum(-1)
        expansion = expansion - 0.5 * (delta.detach() * products).sum(-1)
        if "hess" in reference:
            full = full - 0.5 * ((delta @ reference["hess"]) * delta).sum(-1)
        else:
            terms = [reference[f"hess_block_{f}"] for f in range(len(blocks.families))]
            full = full - 0.5 * sparse_quadratic(reference["hess_rows"], terms, blocks, delta)
    return full - expansion


def mapped_factor(
    model: Callable[..., Any],
    guide: Any,
    reference: Mapping[str, torch.Tensor],
    latent: torch.Tensor,
    indices: Mapping[str, torch.Tensor],
    args: tuple,
    kwargs: Mapping[str, Any],
) -> torch.Tensor:
    """``T_F(u) - T_B(u)`` of each draw ``u`` of `latent` ``(S, d)`` on its own minibatch
    (`indices`: each subsampled plate's ``(S, subsample_size)``), mapped by `torch.func.vmap`:
    per draw, the minibatch's log joint at the MAP, its gradient (`torch.func.grad`) and,
    second order, its Hessian times ``u - loc`` (the gradient of that gradient's product with
    ``u - loc``). The value and the gradient in `latent` are those of `minibatch_factor` of
    each draw."""
    loc, second = reference["loc"], second_order(reference)
    delta = latent - loc

    def at(point: torch.Tensor, idx: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = poutine.condition(model, data=dict(idx))
        return log_joint_at(batch, guide.split_latent(point), args, kwargs)

    def terms(step: torch.Tensor, idx: Mapping[str, torch.Tensor]) -> tuple:
        slope_value = torch.func.grad_and_value(lambda point: at(point, idx))
        if not second:
            slope, value = slope_value(loc)
            return value, slope, torch.zeros_like(step)

        def along(point: torch.Tensor) -> tuple:  # (slope . step, (slope, value))
            slope, value = slope_value(point)
            return slope @ step, (slope, value)

        # reverse over reverse: about half the time of forward over reverse here
        product, (slope, value) = torch.func.grad(along, has_aux=True)(loc)
        return value, slope, product

    with pyro.validation_enabled(False):  # its checks branch in Python on values
        value, slope, products = torch.func.vmap(terms)(delta.detach(), dict(indices))
    return _factor(reference, guide._blocks, delta, value, slope, products if second else None)


def _particle_plate(trace: Any) -> bool:
    """Whether the model ran under the ELBO's vectorised particle plate."""
    return any(
        frame.name == "num_particles_vectorized"
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
    )


def with_control_variate(
    control_variate: str, model: Callable[..., Any], guide: Any
) -> tuple[Callable[..., Any], bool]:
    """``(training model, on)`` for `fit_posterior`'s `control_variate`: `model` with the
    control variate, or `model` itself where it is off or does not apply (``"auto"``:
    silently where the model subsamples nothing, the start search could not run it on the
    full data or found no mode; ``"taylor"``: a `ValueError` saying why)."""
    subsampled = any(
        site_is_subsample(site) and 0 < (site["fn"].subsample_size or 0) < site["fn"].size
        for site in guide.model_trace.nodes.values()
    )
    if control_variate == "none" or (control_variate == "auto" and not subsampled):
        return model, False
    why = None
    if not subsampled:
        why = (
            "the model subsamples no plate (no plate with a subsample_size below its size), so "
            "there is no minibatch noise to reduce"
        )
    elif guide._chunks is None:
        why = (
            "the start search could not run the model on the full data (a latent site inside "
            "a subsampled plate, or a sequential plate whose size is not a multiple of its "
            "subsample_size), so there is no full-data MAP to expand around"
        )
    elif guide._reference is None:
        why = (
            "it expands around the full-data MAP, which the start search did not find "
            f"(init_scale={guide.init_scale!r}; it searches with 'auto' or 'laplace')"
        )
    if why is None:
        return control_variate_model(model, guide, guide._reference), True
    if control_variate == "taylor":
        raise ValueError(f"control_variate='taylor': {why}; use control_variate='none'")
    return model, False
