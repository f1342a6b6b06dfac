"""The Taylor control variate of a subsampled model's log joint (`fit_posterior`'s
``control_variate``).

A model whose plates subsample (``numpyro.plate(..., subsample_size=n)``) gives an unbiased but
noisy estimate ``f_B(u)`` of the full log joint ``F(u)`` at each step (``u`` the packed
unconstrained latents, ``B`` the step's indices). The difference estimator (Bardenet et al.
2017, Quiroz et al. 2019; NumPyro's ``HMCECS`` with its ``taylor_proxy``) subtracts the Taylor
expansion ``T_B`` of ``f_B`` around a fixed point ``u0`` (the full-data MAP) and adds back its
exact full-data expectation ``T_F``:

    f_B(u) - T_B(u) + T_F(u),   E_B[T_B(u)] = T_F(u) for every u,

so the estimate stays unbiased while its noise shrinks to that of the Taylor remainder (third
order in ``u - u0`` for the second-order expansion). ``T_F`` needs the full data's value,
gradient and Hessian at ``u0``, which the start search computes anyway (`laplace_search`);
``T_B`` the batch's (same indices) value and gradient at ``u0`` and one reverse-mode
Hessian-vector product along ``u - u0`` (reverse mode only, like the start search, so a model
with ``jax.custom_vjp`` functions works). Above `FULL_RANK_MAX_DIM` latent dimensions (no
``d x d`` Hessian) the expansion is second order where the start search found the full-data
Hessian sparse (a plate's intercepts: `flowguides.core.hessian`; `sparse_quadratic`), else
first order.

The expansion point and its full-data terms are SVI parameters of the training model (named
after `CONTROL_VARIATE_PREFIX`), fixed by the optimiser like a Laplace start's whitening, so a
compiled training chunk serves any data of the same shapes, and `initial_state`, the SVI
state before any step, holds them from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState
from numpyro.infer.util import potential_energy, transform_fn

from flowguides.core import CONTROL_VARIATE_PREFIX
from flowguides.core.hessian import Blocks
from flowguides.numpyro._stream import subsampled
from flowguides.numpyro._training import HISTORY, RecordingELBO, default_float

__all__ = [
    "control_variate_model",
    "initial_optimizer_state",
    "initial_state",
    "public_params",
    "reference_params",
    "sparse_quadratic",
    "split3",
    "supports_control_variate",
    "with_control_variate",
]

_FACTOR = f"{CONTROL_VARIATE_PREFIX}factor"


def initial_optimizer_state(optim: Any, params: Mapping[str, Any]) -> tuple:
    """``optim.init(params)`` for NumPyro's wrapper of a `make_optimizer` optimiser without an
    XLA compile: every entry (step counter, Adam's moments and counts) starts at zero."""
    step, (_, state) = jax.eval_shape(optim.init, params)
    zeros = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), state)
    return jax.device_put(0), (params, zeros)  # NumPyro's counter: jnp.array(0), weakly typed


def reference_params(out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fixed SVI parameters of the control variate from `laplace_search`'s output (which
    ran on the full data): the expansion point (the MAP), the negative log joint there, its
    gradient and, where the search formed it, its Hessian."""
    names = {"loc": "loc_map", "energy": "energy_map", "grad": "grad_map", "hess": "hess"}
    names.update({k: k for k in out if k == "hess_rows" or k.startswith("hess_block_")})
    return {
        f"{CONTROL_VARIATE_PREFIX}{k}": np.asarray(out[v]) for k, v in names.items() if v in out
    }


def control_variate_model(
    training: Callable[..., Any],
    model: Callable[..., Any],
    init_locs: Mapping[str, Any],
    reference: Mapping[str, np.ndarray],
    blocks: Blocks | None = None,
) -> Callable[..., Any]:
    """`training` (the model as it trains: its subsampled plates drawing indices) with the
    factor ``T_F(u) - T_B(u)`` added, `model` (the user's) evaluating ``f_B`` on the drawn
    indices. `init_locs` are the guide's unconstrained latent sites, in its packing order;
    `reference` the `reference_params`; `blocks` the layout of a sparse Hessian's terms
    (`sparse_quadratic`)."""
    names = list(init_locs)  # packed in this order (as NumPyro's AutoContinuous packs)
    shapes = [jnp.shape(init_locs[name]) for name in names]
    ends = np.cumsum([int(np.prod(shape)) for shape in shapes]).tolist()

    def unravel(v: jax.Array) -> dict[str, jax.Array]:
        parts = jnp.split(v, ends[:-1])
        return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}

    def ravel(values: Mapping[str, jax.Array]) -> jax.Array:
        return jnp.concatenate([jnp.reshape(values[name], -1) for name in names])

    dense = f"{CONTROL_VARIATE_PREFIX}hess" in reference
    second_order = dense or f"{CONTROL_VARIATE_PREFIX}hess_rows" in reference

    def fixed(name: str) -> jax.Array:
        key = f"{CONTROL_VARIATE_PREFIX}{name}"
        return jax.lax.stop_gradient(numpyro.param(key, reference[key]))

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with handlers.trace() as trace:
            out = training(*args, **kwargs)
        # the step's indices, and the model's own `param` values (as SVI set them)
        plates = {
            name: site["value"]
            for name, site in trace.items()
            if (site["type"] == "plate" and site["args"][1] is not None) or site["type"] == "param"
        }
        unconstrained = {
            name: biject_to(trace[name]["fn"].support).inv(trace[name]["value"]) for name in names
        }
        u = ravel(unconstrained)
        loc, energy, grad = fixed("loc"), fixed("energy"), fixed("grad")
        delta = u - loc

        def batch(v: jax.Array) -> jax.Array:  # f_B at v, on this step's indices
            params = {**unravel(v), **plates}
            with handlers.block():
                return -potential_energy(model, args, kwargs, params)

        # reverse mode only (as training itself): a model's jax.custom_vjp functions work
        (value, slope), pullback = jax.vjp(jax.value_and_grad(batch), loc)
        if second_order:  # H_B delta, a reverse Hessian-vector product at u0
            curvature = pullback((jnp.zeros_like(value), delta))[0]
            if dense:
                quadratic = delta @ (fixed("hess") @ delta)
            else:
                terms = [fixed(f"hess_block_{f}") for f in range(len(blocks.families))]
                quadratic = sparse_quadratic(fixed("hess_rows"), terms, blocks, delta)
            full = -energy - grad @ delta - 0.5 * quadratic
            expansion = value + slope @ delta + 0.5 * delta @ curvature
        else:
            full = -energy - grad @ delta
            expansion = value + slope @ delta
        numpyro.factor(_FACTOR, full - expansion)
        return out

    return wrapped


def sparse_quadratic(
    rows: jax.Array, terms: Sequence[jax.Array], blocks: Blocks, delta: jax.Array
) -> jax.Array:
    """``delta' H delta`` for a Hessian known by its sparse form (`flowguides.core.hessian`):
    the singletons' full `rows` ``(s, d)`` (twice against `delta`, less their block counted
    twice) and, per family of `blocks`, its blocks ``(G, k, k)`` in `terms`."""
    index = blocks.singletons
    single = delta[index]
    out = 2.0 * single @ (rows @ delta) - single @ (rows[:, index] @ single)
    for idx, block in zip(blocks.families, terms, strict=True):
        part = delta[idx]  # (G, k)
        out = out + jnp.einsum("gq,gqp,gp->", part, block, part)
    return out


def public_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The SVI parameters without the control variate's fixed terms (`fit.params`)."""
    return {k: v for k, v in params.items() if not k.startswith(CONTROL_VARIATE_PREFIX)}


def supports_control_variate(prototype_trace: Mapping[str, Any]) -> str | None:
    """None where the control variate applies to the model of `prototype_trace`, else why
    not: a ``numpyro.mutable`` site (state the inner evaluation would update). A latent
    inside a subsampled plate never reaches here: `AutoContinuous` refuses local latents."""
    for name, site in prototype_trace.items():
        if site["type"] == "mutable":
            return f"the model has a numpyro.mutable site {name!r}"
    return None


def with_control_variate(
    control_variate: str,
    train: Callable[..., Any],
    model: Callable[..., Any],
    guide: Any,
) -> tuple[Callable[..., Any], dict[str, np.ndarray] | None]:
    """``(training model, reference)`` for `fit_posterior`'s `control_variate`: `train` with
    the control variate and its `reference_params`, or ``(train, None)`` where it is off or
    does not apply (``"auto"``: silently where the model subsamples nothing, has a mutable
    site or the start search found no mode; ``"taylor"``: a `ValueError` saying why). Its
    derivatives are those the start search took of the same model (gradient and reverse
    Hessian-vector products at the MAP), so a model that set up traces them.

    Args:
        control_variate: ``"auto"``, ``"taylor"`` or ``"none"``.
        train: the model as it trains (`training_model`).
        model: the user's model.
        guide: the set-up `AutoFlowGuide` (its prototype trace and start search).
    """
    trace = guide.prototype_trace
    subsamples = subsampled(trace)
    if control_variate == "none" or (control_variate == "auto" and not subsamples):
        return train, None
    why = (
        "the model subsamples no plate (no plate with a subsample_size below its size), so "
        "there is no minibatch noise to reduce"
        if not subsamples
        else supports_control_variate(trace)
    )
    if why is None and guide._reference is None:
        why = (
            "it expands around the full-data MAP, which the start search did not find "
            f"(init_scale={guide.init_scale!r}; it searches with 'auto' or 'laplace')"
        )
    if why is None:
        reference, blocks = guide._reference, guide._blocks
        return control_variate_model(train, model, guide._init_locs, reference, blocks), reference
    if control_variate == "taylor":
        raise ValueError(f"control_variate='taylor': {why}; use control_variate='none'")
    return train, None


split3 = jax.jit(lambda key: tuple(jax.random.split(key, 3)))  # one program, not one per op


def initial_state(
    svi: SVI,
    guide: Any,
    key: jax.Array,
    args: tuple,
    kwargs: dict,
    reference: dict[str, np.ndarray] | None = None,
) -> SVIState:
    """`svi.init` without its eager pass through the guide and the model (an XLA compile per
    distinct operation): the guide's set-up fixes every parameter, all unconstrained, so the
    state is `initial_optimizer_state` of `guide.initial_params()` and the control variate's
    `reference` terms, if any (`control_variate_model`). The keys split as in
    `SVI.init`. A model with its own `param` or `mutable` sites takes `svi.init`. The guide
    is set up already (with the key `SVI.init` would give it). With a `RecordingELBO`, the
    state carries a zero history entry as SVI mutable state (where each step's records go)."""
    kinds = {site["type"] for site in guide.prototype_trace.values()}
    if kinds & {"param", "mutable"}:
        state = svi.init(key, *args, **kwargs)
    else:
        fixed = jax.tree.map(jax.numpy.asarray, reference or {})
        params = {**guide.initial_params(), **fixed}
        identity = biject_to(constraints.real)
        svi.constrain_fn = partial(transform_fn, dict.fromkeys(params, identity))
        state = SVIState(initial_optimizer_state(svi.optim, params), None, split3(key)[0])
    if isinstance(svi.loss, RecordingELBO):
        zeros = svi.loss.entries(np.zeros((), np.int32), np.zeros((), default_float()))
        state = state._replace(mutable_state={HISTORY: zeros})
    return state
