"""Neural-ODE flows: properties, identity at init, solvers, Hutchinson, max_steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jax_properties import check_identity, check_report, perturbed, transform_report

from flowguides.numpyro.build import Flow, build_flow
from flowguides.spec import FlowSpec

X = np.random.default_rng(1).normal(size=(2, 4, 3))


def test_neural_ode_properties_and_identity_at_init():
    spec = FlowSpec.neural_ode(hidden=[5], solver="rk4", num_steps=6, dtype="float64")
    fresh = build_flow(spec, 3, seed=0)
    check_identity(transform_report(fresh, X, light=True), X)
    flow = perturbed(fresh, 0.3)
    r = transform_report(flow, X, light=True)
    # rk4's backward solve inverts the forward one only to the method's accuracy
    check_report(r, X, tol=2e-4)
    # batch shapes () and (3,) agree with (2, 4); jit and non-jit agree
    y0, ladj0 = flow.forward_and_log_det(jnp.asarray(X[0, 0]))
    assert y0.shape == (3,) and ladj0.shape == ()
    np.testing.assert_allclose(y0, r["y"][0, 0], rtol=1e-12)
    y3, ladj3 = flow.forward_and_log_det(jnp.asarray(X[0, :3]))
    np.testing.assert_allclose(y3, r["y"][0, :3], rtol=1e-12)
    np.testing.assert_allclose(ladj3, r["ladj"][0, :3], rtol=1e-12)


def test_adaptive_solvers_invert_to_tolerance_and_agree_with_each_other():
    results = []
    for solver in ("dopri5", "tsit5"):
        spec = FlowSpec.neural_ode(hidden=[5], solver=solver, rtol=1e-9, atol=1e-9, dtype="float64")
        flow = perturbed(build_flow(spec, 3, seed=0), 0.3)
        y, ladj = flow.forward_and_log_det(jnp.asarray(X))
        x_back, ladj_inv = flow.inverse_and_log_det(y)
        np.testing.assert_allclose(x_back, X, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ladj_inv, -ladj, rtol=1e-6, atol=1e-7)
        results.append((y, ladj))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-8)


def test_hutchinson_trace_is_unbiased():
    exact = FlowSpec.neural_ode(hidden=[5], solver="euler", num_steps=3, dtype="float64")
    noisy = exact.model_copy(
        update={"layers": (exact.layers[0].model_copy(update={"trace": "hutchinson"}),)}
    )
    params = perturbed(build_flow(exact, 3, seed=0), 0.5).params
    x = jnp.asarray(X[0, 0])
    ladj_exact = Flow(exact, 3, params).forward_and_log_det(x)[1]
    flow = Flow(noisy, 3, params)
    keys = jax.random.split(jax.random.key(0), 4000)
    estimates = jax.jit(jax.vmap(lambda k: flow.forward_and_log_det(x, k)[1]))(keys)
    assert np.std(estimates) > 0  # the noise is really used
    standard_error = np.std(estimates) / np.sqrt(len(keys))
    assert abs(np.mean(estimates) - ladj_exact) < 4 * standard_error
    same = flow.forward_and_log_det(x, keys[0])[1]  # one key, one fixed noise draw
    np.testing.assert_allclose(same, estimates[0], rtol=1e-12)


def test_exceeding_max_steps_raises_a_clear_error():
    spec = FlowSpec.neural_ode(hidden=[5], rtol=1e-12, atol=1e-12, max_steps=2, dtype="float64")
    flow = perturbed(build_flow(spec, 3, seed=0), 1.0)
    with pytest.raises(Exception, match="max_steps=2"):
        jax.block_until_ready(flow.forward_and_log_det(jnp.asarray(X)))


def test_backsolve_adjoint_gradients_match_backpropagation():
    grads = []
    for adjoint in (False, True):
        spec = FlowSpec.neural_ode(
            hidden=[4], rtol=1e-9, atol=1e-9, adjoint=adjoint, dtype="float64"
        )
        flow = perturbed(build_flow(spec, 3, seed=0), 0.3)

        def loss(params: dict, spec: FlowSpec = spec) -> jax.Array:
            y, ladj = Flow(spec, 3, params).forward_and_log_det(jnp.asarray(X))
            return jnp.sum(jnp.sin(y)) + jnp.sum(ladj)

        grads.append(jax.jit(jax.grad(loss))(flow.params))
    for name, value in grads[0].items():
        np.testing.assert_allclose(grads[1][name], value, rtol=1e-5, atol=1e-7)
