"""The Pathfinder anchor's workaround for jaxlib's batched LAPACK kernels keeps every value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.anchors_jax import _one_at_a_time


def _factors(a, b):
    q, r = jnp.linalg.qr(a)
    return r, jnp.linalg.inv(a) @ b


def test_one_at_a_time_maps_the_batch_and_keeps_the_values():
    a = jax.random.normal(jax.random.key(0), (6, 3, 3)) + 3 * jnp.eye(3)
    b = jnp.arange(3.0)  # not batched: closed over, not mapped
    batched = jax.vmap(_factors, in_axes=(0, None))
    mapped = jax.vmap(_one_at_a_time(_factors), in_axes=(0, None))
    for want, got in zip(batched(a, b), mapped(a, b), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # every factorisation in the mapped program is of one matrix, inside a loop over the batch
    shapes = _factorised_shapes(jax.make_jaxpr(mapped)(a, b).jaxpr)
    assert shapes and all(shape == (3, 3) for shape in shapes), shapes
    assert (6, 3, 3) in _factorised_shapes(jax.make_jaxpr(batched)(a, b).jaxpr)


def _factorised_shapes(jaxpr) -> list[tuple]:
    """Input shapes of the QR and LU factorisations in `jaxpr` and the programs it calls."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("qr", "lu"):
            out.append(tuple(eqn.invars[0].aval.shape))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            out += _factorised_shapes(sub)
    return out
