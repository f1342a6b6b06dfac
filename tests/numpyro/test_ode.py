"""Neural-ODE flows: properties, identity at init, solvers, Hutchinson, max_steps; analytic
fields, RNODE regularisers, STEER, NFE counts, flow matching, tolerances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm

from flowguides.core import MaxStepsExceededError, ToleranceWarning
from flowguides.numpyro import ode as ode_module
from flowguides.numpyro.build import Flow, build_flow, check_flow_tolerances
from flowguides.numpyro.ode import NeuralODE, flow_matching_loss, solver_errors, training_solves
from flowguides.spec import FlowSpec, NeuralODESpec
from tests.numpyro._jax_properties import perturbed

X = np.random.default_rng(1).normal(size=(2, 4, 3))


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


def test_exceeding_max_steps_raises_the_core_error_naming_the_field():
    """The same class as Pyro's: the eager methods translate Equinox's run-time error."""
    spec = FlowSpec.neural_ode(hidden=[5], rtol=1e-12, atol=1e-12, max_steps=2, dtype="float64")
    flow = perturbed(build_flow(spec, 3, seed=0), 1.0)
    for call in (
        lambda: flow.log_prob(X),
        lambda: flow.forward_and_log_det(jnp.asarray(X)),
        lambda: flow.sample_and_log_prob((4,), seed=1),
    ):
        with pytest.raises(MaxStepsExceededError, match=r"max_steps: .*max_steps=2 steps") as info:
            jax.block_until_ready(call())
        assert info.value.__cause__ is not None  # chains Equinox's error
    jitted = jax.jit(lambda x: flow.log_prob(x))  # a compiled caller wraps its own call
    with pytest.raises(MaxStepsExceededError, match="loosen rtol/atol"), solver_errors():
        jax.block_until_ready(jitted(X))
    with pytest.raises(ZeroDivisionError), solver_errors():  # other errors pass through
        1 / 0  # noqa: B018
    roomy = FlowSpec.neural_ode(hidden=[5], rtol=1e-12, atol=1e-12, dtype="float64")
    assert np.all(np.isfinite(Flow(roomy, 3, flow.params).log_prob(X)))


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


# -- analytic vector fields, regularisers, STEER, NFE, tolerances ----------------------------
DIM = 3
TIGHT = {"solver": "dopri5", "rtol": 1e-10, "atol": 1e-10, "hidden": ()}


def analytic(weight=None, bias=None, gate_bias=0.0, key=None, **fields) -> NeuralODE:
    """A one-layer field ``f = (weight z + bias) * sigmoid(gate_bias)`` (time terms zero)."""
    zero = jnp.zeros((DIM,))
    params = {
        "net.0.weight": jnp.zeros((DIM, DIM)) if weight is None else jnp.asarray(weight),
        "net.0.bias": zero if bias is None else jnp.asarray(bias),
        "net.0.gate_weight": zero,
        "net.0.gate_bias": jnp.full((DIM,), gate_bias),
        "net.0.time_bias": zero,
    }
    return NeuralODE(params, NeuralODESpec(**{**TIGHT, **fields}), DIM, key)


def test_constant_field_shifts_with_zero_log_det_and_closed_form_regularisers():
    v = np.array([1.0, -2.0, 0.5])
    ode = analytic(bias=v, t1=1.5)  # f = sigmoid(0) v = v / 2
    z = np.random.default_rng(0).normal(size=(4, DIM))
    y, ladj, reg = ode.solve(jnp.asarray(z))
    z_back, _, reg_back = ode.solve(y, inverse=True)
    np.testing.assert_allclose(y, z + 0.75 * v, rtol=1e-10)
    np.testing.assert_allclose(ladj, 0.0, atol=1e-12)
    np.testing.assert_allclose(z_back, z, rtol=1e-10)
    for r in (reg, reg_back):  # a backwards solve reports the same (positive) integrals
        np.testing.assert_allclose(r["kinetic"], np.full(4, 1.5 * np.sum((0.5 * v) ** 2)))
        np.testing.assert_allclose(r["jacobian"], 0.0, atol=1e-12)


def test_linear_field_log_det_trajectory_and_regularisers():
    """``f = s W z``: ``y = expm(t1 s W) z``, log-det ``t1 s tr(W)``, kinetic energy
    ``∫ |s W z(t)|² dt`` (Simpson's rule on the exact path), Jacobian term ``t1 s² |W|_F²``."""
    rng = np.random.default_rng(3)
    weight, g, t1 = 0.7 * rng.normal(size=(DIM, DIM)), 0.4, 0.8
    a = weight / (1.0 + np.exp(-g))
    z = rng.normal(size=(2, DIM))
    y, ladj, reg = analytic(weight=weight, gate_bias=g, t1=t1).solve(jnp.asarray(z))
    np.testing.assert_allclose(y, z @ expm(t1 * a).T, rtol=1e-8)
    np.testing.assert_allclose(ladj, np.full(2, t1 * np.trace(a)), rtol=1e-9)
    np.testing.assert_allclose(reg["jacobian"], np.full(2, t1 * np.sum(a * a)), rtol=1e-9)
    times = np.linspace(0.0, t1, 2001)
    speed = np.array([np.sum((z @ expm(s * a).T @ a.T) ** 2, axis=-1) for s in times])
    simpson = np.ones(2001)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    np.testing.assert_allclose(reg["kinetic"], simpson @ speed * (t1 / 2000) / 3, rtol=1e-8)


def test_regularisers_vanish_for_the_zero_field_and_not_otherwise():
    spec = FlowSpec.neural_ode(hidden=[5], solver="rk4", num_steps=3, dtype="float64")
    fresh = build_flow(spec, DIM, seed=0)
    layer_spec = spec.layers[0]

    def regularisers(flow: Flow) -> dict:
        params = {k[len("layers.0.") :]: v for k, v in flow.params.items() if "layers.0." in k}
        return NeuralODE(params, layer_spec, DIM).solve(jnp.asarray(X[0]))[2]

    zero, random = regularisers(fresh), regularisers(perturbed(fresh, 0.5))
    for name in ("kinetic", "jacobian"):
        np.testing.assert_array_equal(zero[name], 0.0)
        assert np.all(np.asarray(random[name]) > 0)


def test_training_solves_add_the_weighted_penalty_only_when_asked():
    rng = np.random.default_rng(4)
    weight, z = 0.5 * rng.normal(size=(DIM, DIM)), jnp.asarray(rng.normal(size=(3, DIM)))
    plain = analytic(weight=weight, solver="rk4", num_steps=4)
    with training_solves() as records:
        y, ladj = plain.forward_and_log_det(z)
    assert [set(r) for r in records] == [{"nfe", "backward"}]  # weights 0: no penalty
    assert int(records[0]["nfe"]) == 16  # rk4: 4 evaluations x 4 steps
    weighted = analytic(
        weight=weight, solver="rk4", num_steps=4, kinetic_weight=0.3, jacobian_weight=2.0
    )
    _, _, reg = weighted.solve(z)
    with training_solves() as records:
        y_train, ladj_train = weighted.forward_and_log_det(z)
    np.testing.assert_allclose(records[0]["penalty"], 0.3 * reg["kinetic"] + 2.0 * reg["jacobian"])
    np.testing.assert_allclose(y_train, y, rtol=1e-12)
    np.testing.assert_allclose(ladj_train, ladj, rtol=1e-12)
    assert not ode_module.in_training_solves()


def test_steer_draws_the_training_end_time_and_evaluation_uses_t1():
    z = jnp.zeros((1, DIM))

    @jax.jit
    def ends(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # f = (1, 0, 0): the first coordinate of the end point is the end time
        ode = analytic(bias=[2.0, 0.0, 0.0], t1=2.0, steer=0.5, solver="rk4", num_steps=2, key=key)
        with training_solves():
            forward, back = ode.forward_and_log_det(z)[0], ode.inverse_and_log_det(z)[0]
        return forward[0, 0], back[0, 0], ode.forward_and_log_det(z)[0][0, 0]

    forward, back, evaluation = jax.vmap(ends)(jax.random.split(jax.random.key(0), 20))
    assert np.all((forward >= 1.0) & (forward <= 3.0)) and np.ptp(forward) > 0.5
    np.testing.assert_allclose(back, -forward, rtol=1e-12)  # one key, one end time
    np.testing.assert_allclose(evaluation, 2.0, rtol=1e-12)
    with pytest.raises(ValueError, match="steer=0.5 .* got key=None"), training_solves():
        analytic(bias=[2.0, 0.0, 0.0], steer=0.5, solver="rk4", num_steps=2).forward_and_log_det(z)


def test_nfe_counts_every_field_evaluation(monkeypatch):
    """The recorded count equals the calls diffrax makes to the field (counted by a callback)."""
    calls = []
    field = ode_module.vector_field

    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return field(*args)

    monkeypatch.setattr(ode_module, "vector_field", counted)
    rng = np.random.default_rng(5)
    ode = analytic(weight=rng.normal(size=(DIM, DIM)), rtol=1e-6, atol=1e-6, kinetic_weight=1.0)
    with training_solves() as records:
        jax.block_until_ready(ode.forward_and_log_det(jnp.asarray(rng.normal(size=(4, DIM)))))
    assert int(records[0]["nfe"]) == len(calls) > 7


def test_flow_matching_loss_vanishes_for_the_exact_field():
    """Data = base shifted by d, sigma_min = 0: the target is d everywhere, i.e. ``f = d / t1``."""
    d = np.array([1.0, -1.0, 3.0])
    ode = analytic(bias=2.0 * d / 0.5, t1=0.5)  # f = sigmoid(0) 4 d = d / t1
    rng = np.random.default_rng(6)
    x0, t = jnp.asarray(rng.normal(size=(50, DIM))), jnp.asarray(rng.uniform(size=50))
    assert float(flow_matching_loss(ode, x0 + d, x0, t, sigma_min=0.0)) < 1e-24
    wrong = flow_matching_loss(ode, x0 + 2 * d, x0, t, sigma_min=0.0)
    np.testing.assert_allclose(wrong, np.sum(d**2) / 0.25, rtol=1e-12)


def test_float32_tolerance_warning():
    with pytest.warns(ToleranceWarning, match="rtol=1e-08.*float64"):
        build_flow(FlowSpec.neural_ode(hidden=[4], rtol=1e-8, atol=1e-5), DIM)
    check_flow_tolerances(FlowSpec.neural_ode())  # the float32 default: no warning
    check_flow_tolerances(FlowSpec.neural_ode(rtol=1e-8, dtype="float64"))
    check_flow_tolerances(FlowSpec.neural_ode(solver="rk4", num_steps=2, rtol=1e-9))
