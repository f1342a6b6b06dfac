"""The base class every flowguides transform shares: fused primitives, numpyro plumbing.

A subclass implements `forward_and_log_det` and `inverse_and_log_det`; this class derives
numpyro's `__call__`, `_inverse`, `log_abs_det_jacobian` and `call_with_intermediates` from
them. `call_with_intermediates` returns the forward log-determinant as the intermediate, so a
`TransformedDistribution` scores its own samples without running the inverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform

__all__ = ["FlowLayerTransform", "batched_dot"]


class FlowLayerTransform(Transform):
    """A bijection of ``R^dim`` whose parameters are a flat dict of arrays (a pytree).

    Args:
        params: the layer's arrays keyed by their names without the ``layers.{i}.`` prefix.
        spec: the layer spec (static).
        dim: the event size (static).
        key: a PRNG key for layers that need noise (Hutchinson traces), else None.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(
        self,
        params: Mapping[str, jax.Array],
        spec: Any,
        dim: int,
        key: jax.Array | None = None,
    ) -> None:
        self.params = dict(params)
        self.spec = spec
        self.dim = dim
        self.key = key

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det dy/dx|)`` for a batch ``(..., dim)``; the log-det has shape ``(...)``."""
        raise NotImplementedError

    def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(x, log|det dx/dy|)`` for a batch ``(..., dim)``; the log-det has shape ``(...)``."""
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_and_log_det(x)[0]

    def _inverse(self, y: jax.Array) -> jax.Array:
        return self.inverse_and_log_det(y)[0]

    def call_with_intermediates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.forward_and_log_det(x)

    def log_abs_det_jacobian(
        self, x: jax.Array, y: jax.Array, intermediates: jax.Array | None = None
    ) -> jax.Array:
        if intermediates is not None:
            return intermediates
        return self.forward_and_log_det(x)[1]

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (self.params, self.key), (("params", "key"), {"spec": self.spec, "dim": self.dim})


def batched_dot(x: jax.Array, v: jax.Array) -> jax.Array:
    """``x @ v`` over the last axis of a batch ``(..., dim)`` and a vector ``(dim,)``."""
    return jnp.sum(x * v, axis=-1)
