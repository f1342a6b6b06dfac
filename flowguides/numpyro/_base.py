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
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform

__all__ = ["FlowLayerTransform", "InitRandom", "as_init_random", "batched_dot"]


class InitRandom:
    """The random draws of initial weights, from one PRNG key.

    A concrete key seeds numpy on the host: initialisation then compiles nothing (drawing the
    weights as one jitted program would be a compile of its own, comparable to the training
    step's; see the benchmarks page for compile times). A traced key (set-up inside `jit`)
    draws with `jax.random`, splitting the key per call.
    """

    def __init__(self, key: jax.Array) -> None:
        self._key: jax.Array | None = None
        self._rng: np.random.Generator | None = None
        if isinstance(key, jax.core.Tracer):
            self._key = key
            return
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        self._rng = np.random.default_rng(np.asarray(key).ravel().tolist())

    def _next(self) -> jax.Array:
        self._key, key = jax.random.split(self._key)
        return key

    def uniform(self, shape: tuple[int, ...], dtype: Any, low: float, high: float) -> Any:
        if self._rng is None:
            return jax.random.uniform(self._next(), shape, dtype, low, high)
        return self._rng.uniform(low, high, shape).astype(dtype)

    def normal(self, shape: tuple[int, ...], dtype: Any) -> Any:
        if self._rng is None:
            return jax.random.normal(self._next(), shape, dtype)
        return self._rng.standard_normal(shape).astype(dtype)


def as_init_random(key: jax.Array | InitRandom) -> InitRandom:
    """`key` itself if it is an `InitRandom`, else a new one seeded by the PRNG key."""
    return key if isinstance(key, InitRandom) else InitRandom(key)


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
