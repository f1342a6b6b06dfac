"""Fits move between backends: save in one, load in the other, get the same numbers.

A density trained in Pyro and loaded into NumPyro (and back) scores points alike; a posterior
fitted in one backend (with its Laplace whitening) and loaded onto the same model written in the
other pushes the same base noise to the same constrained draws. float64 throughout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import flowguides
from flowguides import FlowSpec
from flowguides.demo import two_moons
from flowguides.io import LoadError

pytestmark = [pytest.mark.torch, pytest.mark.jax]
torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as pdist  # noqa: E402

from flowguides import numpyro as fg_numpyro  # noqa: E402
from flowguides import pyro as fg_pyro  # noqa: E402

SPEC = FlowSpec.realnvp(num_layers=3, hidden=[8], dtype="float64")
Y = [1.2, -0.3, 0.8, 2.1]


def pyro_model() -> None:
    # sites run in the order z, scale, p (not sorted): both backends pack in model order
    y = torch.tensor(Y, dtype=torch.float64)
    z = pyro.sample("z", pdist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
    scale = pyro.sample("scale", pdist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)))
    pyro.sample("p", pdist.Beta(torch.tensor(2.0, dtype=torch.float64), 2.0))
    with pyro.plate("data", len(Y)):
        pyro.sample("y", pdist.Normal(z, scale), obs=y)


def numpyro_model() -> None:
    y = jnp.asarray(Y)
    z = numpyro.sample("z", ndist.Normal(0.0, 2.0))
    scale = numpyro.sample("scale", ndist.HalfNormal(1.0))
    numpyro.sample("p", ndist.Beta(2.0, 2.0))
    with numpyro.plate("data", len(Y)):
        numpyro.sample("y", ndist.Normal(z, scale), obs=y)


@pytest.mark.parametrize("trained_in", ["pyro", "numpyro"])
def test_density_round_trip_across_backends(tmp_path, trained_in: str) -> None:
    other = "numpyro" if trained_in == "pyro" else "pyro"
    backend = fg_pyro if trained_in == "pyro" else fg_numpyro
    fit = backend.fit_density(two_moons(300), SPEC, num_steps=30, progress=False)
    folder = flowguides.save(fit, tmp_path / "fit")
    there = flowguides.load(folder, backend=other)
    back = flowguides.load(flowguides.save(there, tmp_path / "back"), backend=trained_in)
    x = two_moons(50, seed=5)
    np.testing.assert_allclose(there.log_prob(x), fit.log_prob(x), rtol=0, atol=1e-8)
    np.testing.assert_allclose(back.log_prob(x), fit.log_prob(x), rtol=0, atol=1e-8)
    np.testing.assert_allclose(there.mean, fit.mean)
    assert np.ptp(fit.log_prob(x)) > 0.1


@pytest.mark.parametrize("trained_in", ["pyro", "numpyro"])
def test_a_flow_matching_fit_keeps_its_objective_coupling_and_history(tmp_path, trained_in):
    other = "numpyro" if trained_in == "pyro" else "pyro"
    backend = fg_pyro if trained_in == "pyro" else fg_numpyro
    spec = FlowSpec.neural_ode(hidden=[8], solver="rk4", num_steps=2, dtype="float64")
    fit = backend.fit_density(
        two_moons(64), spec, num_steps=4, objective="flow_matching", coupling="ot",
        batch_size=32, progress=False,
    )  # fmt: skip
    assert fit.history  # the solves' step counts
    for where in (trained_in, other):
        loaded = flowguides.load(flowguides.save(fit, tmp_path / where), backend=where)
        assert (loaded.objective, loaded.coupling) == ("flow_matching", "ot")
        assert set(loaded.history) == set(fit.history)
        for name, value in fit.history.items():
            np.testing.assert_array_equal(loaded.history[name], value)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_auto_orientation_is_the_density_direction_in_fit_density(tmp_path, backend) -> None:
    """``orientation="auto"`` (the default) fits a density exactly as ``"density"`` would, not
    as ``"sampling"``, and the fit records and saves the orientation it used."""
    fg = fg_pyro if backend == "pyro" else fg_numpyro
    data, x = two_moons(300), two_moons(50, seed=5)
    assert SPEC.layers[0].orientation == "auto"

    def fit_as(orientation: str | None):
        layer = SPEC.layers[0]
        layers = (
            layer if orientation is None else layer.model_copy(update={"orientation": orientation}),
        )
        return fg.fit_density(
            data, SPEC.model_copy(update={"layers": layers}), num_steps=30, progress=False
        )

    fit = fit_as(None)
    assert fit.spec.layers[0].orientation == "density"
    saved = json.loads((flowguides.save(fit, tmp_path / "fit") / "spec.json").read_text())
    assert saved["layers"][0]["orientation"] == "density"
    np.testing.assert_allclose(fit.log_prob(x), fit_as("density").log_prob(x), rtol=0, atol=1e-10)
    assert np.abs(fit.log_prob(x) - fit_as("sampling").log_prob(x)).max() > 1e-3


def _draws_from_noise(fit, eps: np.ndarray) -> dict[str, np.ndarray]:
    """Push base noise through the fit's flow and constrain it, in the fit's own backend."""
    guide = fit.guide
    if fit.backend == "pyro":
        flow = guide.get_flow()
        with torch.no_grad():
            latent, _ = flow.forward_and_log_det(torch.as_tensor(eps))
            return {k: v.numpy() for k, v in guide.constrain(latent).items()}
    flow = guide.get_flow(fit.params)
    latent, _ = flow.forward_and_log_det(jnp.asarray(eps))
    out = jax.vmap(lambda z: guide._unpack_and_constrain(z, fit.params))(latent)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("trained_in", ["pyro", "numpyro"])
def test_posterior_moves_to_the_same_model_in_the_other_backend(tmp_path, trained_in: str) -> None:
    other = "numpyro" if trained_in == "pyro" else "pyro"
    backend = fg_pyro if trained_in == "pyro" else fg_numpyro
    model = pyro_model if trained_in == "pyro" else numpyro_model
    # the Laplace start: the guide's fixed whitening map travels with the weights
    fit = backend.fit_posterior(model, SPEC, num_steps=40, init_scale="laplace", progress=False)
    assert fit.spec.layers[0].orientation == "sampling"  # "auto" in a posterior fit
    folder = flowguides.save(fit, tmp_path / "posterior")
    there = flowguides.load(
        folder, backend=other, model=numpyro_model if other == "numpyro" else pyro_model
    )
    assert there.latent_shapes == fit.latent_shapes
    fixed = fit.guide.preconditioner
    assert (
        fixed is not None
        and float(np.abs(np.tril(np.asarray(fixed["precondition.scale_tril"]), -1)).max()) > 0
    )
    for name, value in there.guide.preconditioner.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(fixed[name]))
    eps = np.random.default_rng(0).standard_normal((20, 3))
    ours, theirs = _draws_from_noise(fit, eps), _draws_from_noise(there, eps)
    assert set(ours) == set(theirs) == {"z", "scale", "p"}
    for name in ours:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(there.losses, fit.losses)


def test_posterior_onto_a_different_model_is_refused(tmp_path) -> None:
    fit = fg_pyro.fit_posterior(pyro_model, SPEC, num_steps=5, init_scale=0.3, progress=False)
    folder = flowguides.save(fit, tmp_path / "posterior")

    def renamed() -> None:
        numpyro.sample("w", ndist.Normal(0.0, 1.0))
        numpyro.sample("scale", ndist.HalfNormal(1.0))
        numpyro.sample("p", ndist.Beta(2.0, 2.0))

    with pytest.raises(LoadError, match=r"latent sites \['w', 'scale', 'p'\] differ"):
        flowguides.load(folder, backend="numpyro", model=renamed)
    with pytest.raises(LoadError, match=r"needs the model and the arguments .*model_args=\(...\)"):
        flowguides.load(folder, backend="numpyro")
