"""`build_flow`, `get_weights`/`set_weights` and the `Flow` object."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowguides.numpyro import Flow, build_flow, get_weights, set_weights
from flowguides.spec import FlowSpec, NeuralODESpec, PlanarSpec, RealNVPSpec, SpecError

SPEC = FlowSpec(
    layers=[PlanarSpec(repeat=2), RealNVPSpec(repeat=2, hidden=(4,)), NeuralODESpec(hidden=(4,))],
    dtype="float64",
)


def test_weights_are_named_and_shaped_as_the_spec_says():
    flow = build_flow(SPEC, 3)
    weights = get_weights(flow)
    shapes = SPEC.parameter_shapes(3)
    assert list(weights) == list(shapes)
    assert {k: v.shape for k, v in weights.items()} == dict(shapes)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in weights.values())
    assert build_flow(FlowSpec.planar(2), 3).params["layers.0.u"].dtype == jnp.float32


def test_set_weights_round_trip_returns_a_new_flow():
    flow = build_flow(SPEC, 3, seed=0)
    other = build_flow(SPEC, 3, seed=1)
    copied = set_weights(flow, get_weights(other))
    assert copied is not flow
    for name, value in get_weights(other).items():
        np.testing.assert_array_equal(get_weights(copied)[name], value)
    assert not np.array_equal(get_weights(flow)["layers.0.w"], get_weights(other)["layers.0.w"])


def test_set_weights_names_the_bad_parameter():
    flow = build_flow(SPEC, 3)
    weights = get_weights(flow)
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['affine.loc'\]"):
        set_weights(flow, {k: v for k, v in weights.items() if k != "affine.loc"})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['layers.9.u'\]"):
        set_weights(flow, {**weights, "layers.9.u": np.zeros(3)})
    bad = {**weights, "layers.1.net.0.weight": np.zeros((2, 4, 2))}
    with pytest.raises(ValueError, match=r"'layers.1.net.0.weight': expected shape \(2, 4, 1\)"):
        set_weights(flow, bad)


def test_build_flow_checks_dim_and_accepts_a_dict():
    with pytest.raises(SpecError, match="realnvp layer needs dim >= 2, got dim=1"):
        build_flow(FlowSpec.realnvp(num_layers=1), 1)
    flow = build_flow(FlowSpec.planar(1).to_dict(), 2)
    assert flow.spec == FlowSpec.planar(1) and flow.dim == 2


def test_samples_carry_their_log_density_and_flows_are_pytrees():
    spec = FlowSpec(layers=[PlanarSpec(repeat=2), RealNVPSpec(hidden=(4,))], dtype="float64")
    flow = Flow(spec, 3, {k: v + 0.3 for k, v in build_flow(spec, 3).params.items()})

    @jax.jit
    def both(flow: Flow) -> tuple[jax.Array, jax.Array, jax.Array]:
        x, log_q = flow.sample_and_log_prob((5, 2), seed=jax.random.key(3))
        return x, log_q, flow.log_prob(x), flow.distribution().log_prob(x)

    x, log_q, log_prob, dist_log_prob = both(flow)
    assert x.shape == (5, 2, 3) and log_q.shape == (5, 2)
    np.testing.assert_allclose(log_q, log_prob, rtol=1e-10)
    np.testing.assert_allclose(flow.sample((5, 2), seed=jax.random.key(3)), x, rtol=1e-12)
    assert flow.distribution().event_shape == (3,)
    np.testing.assert_allclose(dist_log_prob, log_prob, rtol=1e-10)


def test_sample_defaults_mirror_pyro_with_key_zero_for_no_seed():
    """``sample_shape=()`` gives one draw; JAX has no global RNG, so ``seed=None`` is key 0."""
    flow = Flow(SPEC, 3, {k: v + 0.3 for k, v in build_flow(SPEC, 3).params.items()})
    x, log_q = flow.sample_and_log_prob()
    assert x.shape == (3,) and log_q.shape == ()
    np.testing.assert_array_equal(x, flow.sample_and_log_prob(seed=0)[0])
    np.testing.assert_array_equal(flow.sample(), x)
    assert not np.allclose(flow.sample(seed=1), x)

    def loss(params: dict) -> jax.Array:  # reparametrised: gradients reach the weights
        draws, log_q = Flow(SPEC, 3, params).sample_and_log_prob((4,), seed=2)
        return jnp.sum(draws) + jnp.sum(log_q)

    grads = jax.grad(loss)(flow.params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads.values())


def test_float64_spec_without_jax_x64_names_the_fix():
    import os
    import subprocess
    import sys

    code = (
        "from flowguides import FlowSpec, SpecError\n"
        "from flowguides.numpyro import build_flow\n"
        "try:\n    build_flow(FlowSpec.planar(dtype='float64'), 2)\n"
        "except SpecError as e:\n    print(e)\n"
    )
    env = {**os.environ, "JAX_ENABLE_X64": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "dtype: the spec asks for float64" in out.stdout, out.stderr
    assert "numpyro.enable_x64()" in out.stdout


@pytest.mark.parametrize("kind", ["full", "diagonal"])
def test_preconditioner_round_trips_and_its_log_det_matches_the_jacobian(kind):
    from flowguides.core import PRECONDITION

    rng = np.random.default_rng(0)
    if kind == "full":
        tril = np.tril(rng.normal(size=(3, 3)), -1) + np.diag([0.5, 2.0, 1e-2])
    else:  # a diagonal whitening, held as its (dim,) vector
        tril = np.array([0.5, 2.0, 1e-2])
    spec = SPEC.model_copy(update={"layers": SPEC.layers[:2]})  # exact inverses, no ODE solve
    fixed = dict(zip(PRECONDITION, (rng.normal(size=3), tril), strict=True))
    flow = Flow(spec, 3, {**build_flow(spec, 3, seed=0).params, **fixed})
    assert list(get_weights(flow)) == list(spec.parameter_shapes(3))  # not a spec weight
    assert PRECONDITION[1] in set_weights(flow, get_weights(flow)).params  # kept by set_weights
    eps = jnp.asarray(rng.normal(size=(2, 4, 3)))
    x, ladj = flow.forward_and_log_det(eps)
    back, inv_ladj = flow.inverse_and_log_det(x)
    np.testing.assert_allclose(back, eps, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(inv_ladj, -ladj, rtol=1e-10)
    jac = jax.jacfwd(lambda e: flow.forward_and_log_det(e)[0])(eps[0, 0])
    np.testing.assert_allclose(ladj[0, 0], np.linalg.slogdet(np.asarray(jac))[1], rtol=1e-8)
    if kind == "diagonal":  # the same map as the diagonal matrix
        matrix = Flow(spec, 3, {**flow.params, PRECONDITION[1]: jnp.diag(tril)})
        np.testing.assert_allclose(matrix.forward_and_log_det(eps)[0], x, rtol=1e-12)
