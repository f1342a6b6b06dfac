"""Build a JAX flow from a `FlowSpec`; read and write its weights by the spec's names.

A [`Flow`][flowguides.numpyro.build.Flow] is a small pytree: the spec and `dim` are static,
the parameters a flat dict ``{name: array}`` keyed exactly as ``spec.parameter_shapes(dim)``.
[`FlowTransform`][flowguides.numpyro.build.FlowTransform] is the whole flow (layers, then the
affine) as one numpyro `Transform`, used by the guide and by `Flow` alike. `Flow`'s methods
raise `flowguides.core.MaxStepsExceededError` where an adaptive solve runs out of steps
(see `flowguides.numpyro.ode.solver_errors`).

The public names match `flowguides.pyro.build` except framework-only ones: here
`FlowTransform` (the whole flow as one numpyro `Transform`), `init_params` and
`as_weight_arrays` (a JAX flow's weights are a pytree built apart from it) and
`check_flow_tolerances` (a JAX layer is rebuilt at every call, so the flow checks its
tolerances once, when built); there the torch modules `Affine` and `Precondition` and the Pyro
distribution `FlowDistribution`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.stats import norm

from flowguides.core import PRECONDITION, as_spec, check_tolerances, check_weights
from flowguides.numpyro._base import FlowLayerTransform, as_init_random
from flowguides.numpyro.coupling import RealNVP, init_realnvp
from flowguides.numpyro.ode import NeuralODE, init_neural_ode, solver_errors
from flowguides.numpyro.planar import Planar, init_planar
from flowguides.spec import FlowSpec, SpecError

__all__ = [
    "Flow",
    "FlowTransform",
    "as_weight_arrays",
    "build_flow",
    "check_flow_tolerances",
    "get_weights",
    "init_params",
    "set_weights",
]

_LAYERS = {
    "planar": (Planar, init_planar),
    "realnvp": (RealNVP, init_realnvp),
    "neural_ode": (NeuralODE, init_neural_ode),
}


class FlowTransform(FlowLayerTransform):
    """The layers of `spec` in order, then ``x = loc + exp(log_scale) * y`` when affine, then
    the fixed ``shift + scale_tril @ x`` when `params` hold the `PRECONDITION` keys
    (``shift + scale_tril * x`` for a diagonal whitening, whose `scale_tril` is a vector).

    Args:
        params: the flat dict keyed by ``spec.parameter_shapes(dim)`` (plus `PRECONDITION`).
        spec: the `FlowSpec`.
        dim: the event size.
        key: the PRNG key for Hutchinson noise (split between neural-ODE layers), or None.
    """

    def layers(self) -> list[FlowLayerTransform]:
        """One transform per entry of ``spec.layers``."""
        keys = [None] * len(self.spec.layers)
        if self.key is not None:
            keys = list(jax.random.split(self.key, len(keys)))
        out = []
        for i, (layer, key) in enumerate(zip(self.spec.layers, keys, strict=True)):
            prefix = f"layers.{i}."
            params = {k[len(prefix) :]: v for k, v in self.params.items() if k.startswith(prefix)}
            out.append(_LAYERS[layer.type][0](params, layer, self.dim, key))
        return out

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        ladj = jnp.zeros(x.shape[:-1], x.dtype)
        for layer in self.layers():
            x, part = layer.forward_and_log_det(x)
            ladj = ladj + part
        if self.spec.base == "affine":
            log_scale = self.params["affine.log_scale"]
            x = self.params["affine.loc"] + jnp.exp(log_scale) * x
            ladj = ladj + jnp.sum(log_scale)
        if PRECONDITION[1] in self.params:  # the fixed whitening of a Laplace start
            tril = self.params[PRECONDITION[1]]
            x = self.params[PRECONDITION[0]] + (x * tril if tril.ndim == 1 else x @ tril.T)
            ladj = ladj + jnp.sum(jnp.log(tril if tril.ndim == 1 else jnp.diagonal(tril)))
        return x, ladj

    def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        ladj = jnp.zeros(y.shape[:-1], y.dtype)
        if PRECONDITION[1] in self.params:
            tril = self.params[PRECONDITION[1]]
            centred = y - self.params[PRECONDITION[0]]
            if tril.ndim == 1:  # a diagonal whitening, stored as its vector
                y = centred / tril
                ladj = ladj - jnp.sum(jnp.log(tril))
            else:
                tril_b = jnp.broadcast_to(tril, (*centred.shape[:-1], *tril.shape))
                y = jax.scipy.linalg.solve_triangular(tril_b, centred[..., None], lower=True)
                y = y[..., 0]
                ladj = ladj - jnp.sum(jnp.log(jnp.diagonal(tril)))
        if self.spec.base == "affine":
            log_scale = self.params["affine.log_scale"]
            y = (y - self.params["affine.loc"]) * jnp.exp(-log_scale)
            ladj = ladj - jnp.sum(log_scale)
        for layer in reversed(self.layers()):
            y, part = layer.inverse_and_log_det(y)
            ladj = ladj + part
        return y, ladj


@jax.tree_util.register_pytree_node_class
class Flow:
    """A flow on ``R^dim``: standard-normal base pushed through `FlowTransform`.

    Attributes:
        spec: the `FlowSpec` (static).
        dim: the event size (static).
        params: ``{name: jax.Array}`` in ``spec.parameter_shapes(dim)`` order.
    """

    def __init__(self, spec: FlowSpec, dim: int, params: Mapping[str, jax.Array]) -> None:
        self.spec = spec
        self.dim = dim
        self.params = dict(params)

    def tree_flatten(self) -> tuple[tuple[dict], tuple[FlowSpec, int]]:
        return (self.params,), (self.spec, self.dim)

    @classmethod
    def tree_unflatten(cls, aux: tuple[FlowSpec, int], children: tuple[dict]) -> Flow:
        return cls(aux[0], aux[1], children[0])

    def transform(self, key: jax.Array | None = None) -> FlowTransform:
        """The flow as a numpyro `Transform` (base noise -> data)."""
        return FlowTransform(self.params, self.spec, self.dim, key)

    def distribution(self, key: jax.Array | None = None) -> dist.TransformedDistribution:
        """The flow as a numpyro `TransformedDistribution` with event shape ``(dim,)``."""
        base = dist.Normal(jnp.zeros(self.dim, _dtype(self.spec)), 1.0).to_event(1)
        return dist.TransformedDistribution(base, self.transform(key))

    @solver_errors()
    def forward_and_log_det(
        self, eps: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Base noise ``(..., dim)`` -> ``(x, log|det dx/deps|)``."""
        return self.transform(key).forward_and_log_det(eps)

    @solver_errors()
    def inverse_and_log_det(
        self, x: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Data ``(..., dim)`` -> ``(eps, log|det deps/dx|)``."""
        return self.transform(key).inverse_and_log_det(x)

    def log_prob(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """``log q(x)`` by the inverse pass, shape ``x.shape[:-1]``."""
        eps, ladj = self.inverse_and_log_det(jnp.asarray(x), key)
        return jnp.sum(norm.logpdf(eps), axis=-1) + ladj

    def sample_and_log_prob(
        self, sample_shape: Sequence[int] = (), seed: int | jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Draws ``(*sample_shape, dim)`` and their log-density from the same forward pass.

        Args:
            sample_shape: the batch shape of the draws.
            seed: an int or a PRNG key. JAX has no global random state, so None means key 0
                (the same draws every call; Pyro's None draws from torch's global RNG).
        """
        key = _as_key(seed)
        k_eps, k_noise = jax.random.split(key)
        shape = (*tuple(sample_shape), self.dim)
        eps = jax.random.normal(k_eps, shape, _dtype(self.spec))
        x, ladj = self.forward_and_log_det(eps, k_noise)
        return x, jnp.sum(norm.logpdf(eps), axis=-1) - ladj

    def sample(
        self, sample_shape: Sequence[int] = (), seed: int | jax.Array | None = None
    ) -> jax.Array:
        """Draws ``(*sample_shape, dim)``; `seed` as in `sample_and_log_prob`."""
        return self.sample_and_log_prob(sample_shape, seed)[0]


def _dtype(spec: FlowSpec) -> jnp.dtype:
    if spec.dtype == "float64" and not jax.config.jax_enable_x64:
        raise SpecError(
            "dtype: the spec asks for float64, but JAX's 64-bit mode is off; call "
            "numpyro.enable_x64() (or set JAX_ENABLE_X64=1) before using JAX, or use "
            "dtype='float32'"
        )
    return jnp.float64 if spec.dtype == "float64" else jnp.float32


def _as_key(seed: int | jax.Array | None) -> jax.Array:
    if seed is None:
        return jax.random.key(0)
    if isinstance(seed, int | np.integer):
        return jax.random.key(int(seed))
    return seed


def init_params(spec: FlowSpec, dim: int, key: jax.Array) -> dict[str, jax.Array]:
    """Fresh parameters (every layer the identity, affine ``loc = 0``, ``log_scale = 0``)."""
    shapes = spec.parameter_shapes(dim)
    dtype = _dtype(spec)
    params: dict[str, jax.Array] = {}
    rng = as_init_random(key)  # numpy on the host for a concrete key: no XLA compile
    for i, layer in enumerate(spec.layers):
        init = _LAYERS[layer.type][1](layer, dim, rng, dtype)
        params.update({f"layers.{i}.{name}": value for name, value in init.items()})
    if spec.base == "affine":
        params["affine.loc"] = np.zeros((dim,), dtype)
        params["affine.log_scale"] = np.zeros((dim,), dtype)
    return {name: jnp.asarray(params[name], dtype) for name in shapes}


def build_flow(spec: FlowSpec | Mapping[str, Any], dim: int, *, seed: int = 0) -> Flow:
    """A new flow on ``R^dim`` from `spec`, the identity map at initialisation.

    Args:
        spec: a `FlowSpec` or its dict form.
        dim: the event size; `spec.check_dim` says why it is too small for a layer.
        seed: seeds the random initial weights.

    Returns:
        The `Flow`.

    Warns:
        ToleranceWarning: a float32 neural-ODE layer asks an adaptive solver for ``rtol`` or
            ``atol`` below `FLOAT32_MIN_TOLERANCE` (use ``dtype="float64"`` for tighter solves).

    Example:
        >>> flow = build_flow(FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64"), 2)
        >>> float(flow.log_prob(jnp.zeros(2)))  # identity at init: a standard normal
        -1.8378770664093453
    """
    spec = as_spec(spec)
    spec.check_dim(dim)
    check_flow_tolerances(spec)
    return Flow(spec, dim, init_params(spec, dim, jax.random.key(seed)))


def check_flow_tolerances(spec: FlowSpec) -> None:
    """Warn (`ToleranceWarning`) for each float32 neural-ODE layer with too tight a tolerance."""
    for layer in spec.layers:
        if layer.type == "neural_ode":
            check_tolerances(layer, spec.dtype)


def get_weights(flow: Flow) -> dict[str, np.ndarray]:
    """The flow's weights as numpy arrays, in ``spec.parameter_shapes(dim)`` order."""
    return {name: np.asarray(flow.params[name]) for name in flow.spec.parameter_shapes(flow.dim)}


def set_weights(flow: Flow, weights: Mapping[str, Any]) -> Flow:
    """A new `Flow` holding `weights` (and `flow`'s preconditioner, if any); the names and
    shapes must be exactly the spec's.

    Raises:
        ValueError: a name is missing or unknown, or an array has the wrong shape.
    """
    fixed = {k: flow.params[k] for k in PRECONDITION if k in flow.params}
    return Flow(flow.spec, flow.dim, {**as_weight_arrays(flow.spec, flow.dim, weights), **fixed})


def as_weight_arrays(spec: FlowSpec, dim: int, weights: Mapping[str, Any]) -> dict[str, jax.Array]:
    """`weights` as arrays of the spec's dtype, after `flowguides.core.check_weights`."""
    check_weights(spec, dim, weights)
    return {name: jnp.asarray(weights[name], _dtype(spec)) for name in spec.parameter_shapes(dim)}
