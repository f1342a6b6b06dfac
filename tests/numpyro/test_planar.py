"""Planar layers: properties, the u-hat invertibility, the exact inverse and its gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from flowguides.numpyro.build import build_flow, get_weights
from flowguides.numpyro.planar import Planar, planar_u_hat, solve_planar
from flowguides.spec import FlowSpec, PlanarSpec
from tests.numpyro._jax_properties import perturbed, transform_report

SPEC = FlowSpec.planar(num_layers=3, dtype="float64")
X = np.random.default_rng(1).normal(size=(2, 4, 3))


def test_planar_matches_the_conventions_in_numpy():
    flow = perturbed(build_flow(SPEC, 3, seed=2), 0.7, seed=3)
    w = get_weights(flow)
    z, ladj = X.copy(), np.zeros(X.shape[:-1])
    for r in range(3):
        u, wr, b = w["layers.0.u"][r], w["layers.0.w"][r], w["layers.0.b"][r]
        wu = wr @ u
        u_hat = u + (np.log1p(np.exp(wu)) - 1 - wu) * wr / (wr @ wr)
        th = np.tanh(z @ wr + b)
        z = z + u_hat * th[..., None]
        ladj += np.log(np.abs(1 + (1 - th**2) * (u_hat @ wr)))
    z = w["affine.loc"] + np.exp(w["affine.log_scale"]) * z
    ladj += w["affine.log_scale"].sum()
    y, got = transform_report(flow, X)["y"], transform_report(flow, X)["ladj"]
    np.testing.assert_allclose(y, z, rtol=1e-12)
    np.testing.assert_allclose(got, ladj, rtol=1e-12)


def test_u_hat_keeps_the_layer_invertible():
    rng = np.random.default_rng(0)
    for _ in range(20):
        u, w = rng.normal(size=3) * 2, rng.normal(size=3) * 2
        assert float(jnp.dot(planar_u_hat(jnp.asarray(u), jnp.asarray(w)), w)) > -1


def test_inverse_is_exact_where_newton_alone_struggles():
    # u_hat.w close to -1 (nearly flat at a = 0) and points far out along w
    w = jnp.asarray([[1.0, 0.0]])
    params = {"u": jnp.asarray([[-20.0, 0.0]]), "w": w, "b": jnp.asarray([0.3])}
    t = Planar(params, PlanarSpec(repeat=1), 2)
    y = jnp.asarray([[0.0, 1.0], [1e-3, 0.0], [-40.0, 2.0], [300.0, -1.0]])
    x, ladj = jax.jit(t.inverse_and_log_det)(y)
    y_back, ladj_fwd = t.forward_and_log_det(x)
    np.testing.assert_allclose(y_back, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj, -ladj_fwd, rtol=1e-10, atol=1e-12)


def test_gradients_through_the_inverse_match_finite_differences():
    c, s = jnp.asarray([0.5, -0.9, 3.0]), jnp.asarray([0.2, -1.5, 4.0])
    check_grads(jax.jit(solve_planar), (c, s), order=1, modes=("rev",), eps=1e-6)
    flow = perturbed(build_flow(SPEC, 3, seed=4), 0.5)

    @jax.jit
    def inverse_objective(params: dict) -> jax.Array:
        t = Planar(
            {k[len("layers.0.") :]: v for k, v in params.items() if k.startswith("layers.0.")},
            SPEC.layers[0],
            3,
        )
        x, ladj = t.inverse_and_log_det(jnp.asarray(X))
        return jnp.sum(jnp.sin(x)) + jnp.sum(ladj)

    check_grads(inverse_objective, (flow.params,), order=1, modes=("rev",), eps=1e-6)
