"""One spec, two backends: the same spec and weights give the same numbers in torch and JAX.

Weights are drawn at random (not the identity initialisation), written into a torch flow,
read back by name and loaded into the JAX flow; both then score the same points and push the
same base noise forward. float64 throughout.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowguides import FlowSpec, NeuralODESpec, PlanarSpec, RealNVPSpec

pytestmark = [pytest.mark.torch, pytest.mark.jax]

torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

from flowguides import numpyro as fg_numpyro  # noqa: E402
from flowguides import pyro as fg_pyro  # noqa: E402

ODE = dict(hidden=(8,), solver="dopri5", rtol=1e-10, atol=1e-10, max_steps=10_000)
SPECS = {
    "planar": FlowSpec(layers=[PlanarSpec(repeat=3)], dtype="float64"),
    "realnvp": FlowSpec(
        layers=[RealNVPSpec(repeat=3, hidden=(8, 8), activation="gelu", permutation="random")],
        dtype="float64",
    ),
    "realnvp-leaky": FlowSpec(
        layers=[RealNVPSpec(repeat=2, hidden=(6,), activation="leaky_relu")],
        dtype="float64",
        base="normal",
    ),
    "neural_ode": FlowSpec(layers=[NeuralODESpec(**ODE)], dtype="float64"),
    "mixed": FlowSpec(
        layers=[
            PlanarSpec(repeat=2),
            RealNVPSpec(repeat=2, hidden=(8,), activation="elu"),
            NeuralODESpec(activation="softplus", **ODE),
        ],
        dtype="float64",
    ),
}
TOLERANCE = {"neural_ode": 1e-6, "mixed": 1e-6}


def random_weights(spec: FlowSpec, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: 0.4 * rng.standard_normal(shape) for name, shape in spec.parameter_shapes(dim).items()
    }


@pytest.mark.parametrize("name", list(SPECS))
def test_same_weights_same_numbers(name: str) -> None:
    spec, dim, tol = SPECS[name], 3, TOLERANCE.get(name, 1e-8)
    weights = random_weights(spec, dim, seed=1)
    t_flow = fg_pyro.set_weights(fg_pyro.build_flow(spec, dim), weights)
    j_flow = fg_numpyro.set_weights(fg_numpyro.build_flow(spec, dim), fg_pyro.get_weights(t_flow))

    back = fg_numpyro.get_weights(j_flow)
    assert list(back) == list(spec.parameter_shapes(dim))
    for key, value in weights.items():
        np.testing.assert_array_equal(back[key], value)

    rng = np.random.default_rng(2)
    eps = rng.standard_normal((5, dim))
    x = 1.5 * rng.standard_normal((5, dim))
    with torch.no_grad():
        t_y, t_ladj = t_flow.forward_and_log_det(torch.as_tensor(eps))
        t_lp = t_flow.log_prob(torch.as_tensor(x))
    j_y, j_ladj = j_flow.forward_and_log_det(jnp.asarray(eps))
    j_lp = j_flow.log_prob(jnp.asarray(x))

    np.testing.assert_allclose(np.asarray(j_y), t_y.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(j_ladj), t_ladj.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(j_lp), t_lp.numpy(), rtol=0, atol=tol)
    assert np.ptp(t_lp.numpy()) > 1e-3  # the weights are far from the identity
