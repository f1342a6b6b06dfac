"""Deterministic sites (``numpyro.deterministic`` / ``pyro.deterministic``), the way users write
them: `fit.sample` and every `infer` route return them beside the latent sites, equal to the
model's expression at each draw."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.diagnostics import UnreliableFitWarning

__all__: list[str] = []

Y = np.random.default_rng(3).normal(1.0, 1.0, size=30)


def _setup(backend: str):
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import fit_posterior, infer

        pyro.clear_param_store()
        y = torch.tensor(Y)

        def model(y):
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
            log_s = pyro.sample("log_s", dist.Normal(0.0, 1.0))
            pyro.deterministic("shifted", mu + 2.0 * log_s)
            with pyro.plate("n", len(y)):
                pyro.sample("y", dist.Normal(mu, torch.exp(log_s)), obs=y)

    else:
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        from flowguides.numpyro import fit_posterior, infer

        y = jnp.asarray(Y)

        def model(y):
            mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
            log_s = numpyro.sample("log_s", dist.Normal(0.0, 1.0))
            numpyro.deterministic("shifted", mu + 2.0 * log_s)
            with numpyro.plate("n", len(y)):
                numpyro.sample("y", dist.Normal(mu, jnp.exp(log_s)), obs=y)

    return model, y, fit_posterior, infer


@pytest.mark.parametrize(
    "backend",
    [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro", marks=pytest.mark.jax)],
)
def test_sample_and_infer_return_deterministic_sites(backend: str) -> None:
    model, y, fit_posterior, infer = _setup(backend)
    spec = FlowSpec.planar(num_layers=1, dtype="float64")
    fit = fit_posterior(model, spec, y, num_steps=100, progress=False)
    draws = fit.sample(500, seed=1)
    assert set(draws) == {"mu", "log_s", "shifted"}
    np.testing.assert_allclose(draws["shifted"], draws["mu"] + 2.0 * draws["log_s"], rtol=1e-6)
    # the PSIS route (resampled guide draws) and the NUTS route (after NUTS) alike
    for steps, options in ((100, {}), (1, {"learning_rate": 1e-12, "init_scale": 1.0})):
        result = infer(
            model, spec, y, num_steps=steps, num_draws=500, progress=False, fit_options=options,
            neutra={"num_warmup": 30, "num_samples": 30},
        )  # fmt: skip
        d = result.draws
        assert set(d) == {"mu", "log_s", "shifted"}, result.route
        np.testing.assert_allclose(d["shifted"], d["mu"] + 2.0 * d["log_s"], rtol=1e-6)
        if steps == 1:  # the untrained flow: k-hat sends it to NUTS
            assert result.mcmc is not None and result.draws is result.mcmc.samples
    # `fit.neutra` lays its samples out as `fit.sample` does, and its ArviZ data holds them
    run = fit.neutra(num_warmup=20, num_samples=20, num_chains=2, seed=0, progress=False)
    assert set(run.samples) == {"mu", "log_s", "shifted"}
    s = run.samples
    np.testing.assert_allclose(s["shifted"], s["mu"] + 2.0 * s["log_s"], rtol=1e-6)
    assert run.to_arviz()["posterior"]["shifted"].shape == (2, 20)
    # and so does the fit's own ArviZ data (draws with their weights), where the data are
    data = fit.to_arviz(100, seed=2)
    post = {k: np.asarray(data["posterior"][k])[0] for k in ("mu", "log_s", "shifted")}
    np.testing.assert_allclose(post["shifted"], post["mu"] + 2.0 * post["log_s"], rtol=1e-6)
    assert list(data["observed_data"].data_vars) == ["y"]
    with warnings.catch_warnings():  # a 100-step fit: reliable or not, the plumbing is the same
        warnings.simplefilter("ignore", UnreliableFitWarning)
        resampled = fit.resample(100, seed=3)  # PSIS-resampled draws and moments carry them too
    r = resampled.draws
    np.testing.assert_allclose(r["shifted"], r["mu"] + 2.0 * r["log_s"], rtol=1e-6)
    expected = resampled.mean["mu"] + 2.0 * resampled.mean["log_s"]
    assert resampled.mean["shifted"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "backend",
    [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro", marks=pytest.mark.jax)],
)
def test_deterministic_sites_of_event_shaped_latents_come_from_one_batched_run(backend: str):
    """A vector latent with event dimensions beside a data plate: its deterministic sites
    (a vector, a scalar and one no draw moves) come from one run of the model over all draws,
    with no `VectorizationWarning` (which the suite raises as an error): Pyro's `Predictive`
    counted the event dimension as a batch dimension and fell back to one draw at a time."""
    rows = np.random.default_rng(0).normal(size=(5, 3))
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import fit_posterior

        pyro.clear_param_store()
        p, data = pyro, torch.tensor(rows)
        normal, zero = dist.Normal, torch.tensor(0.0, dtype=torch.float64)
    else:
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        from flowguides.numpyro import fit_posterior

        p, data, normal, zero = numpyro, jnp.asarray(rows), dist.Normal, 0.0

    def model(y):
        theta = p.sample("theta", normal(zero, 2.0).expand([3]).to_event(1))
        p.deterministic("doubled", 2.0 * theta)
        p.deterministic("total", theta.sum(-1))
        p.deterministic("rows", zero + y.shape[0])
        with p.plate("n", y.shape[0]):
            p.sample("y", normal(theta, 1.0).to_event(1), obs=y)

    fit = fit_posterior(model, FlowSpec.planar(num_layers=2, dtype="float64"), data,
                        num_steps=50, progress=False)  # fmt: skip
    draws = fit.sample(400, seed=0)
    assert draws["doubled"].shape == (400, 3) and draws["total"].shape == (400,)
    np.testing.assert_allclose(draws["doubled"], 2.0 * draws["theta"], rtol=1e-12)
    np.testing.assert_allclose(draws["total"], draws["theta"].sum(-1), rtol=1e-12)
    np.testing.assert_array_equal(draws["rows"], np.full(400, 5.0))


@pytest.mark.parametrize(
    "backend",
    [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro", marks=pytest.mark.jax)],
)
def test_a_deterministic_site_inside_a_subsampled_plate_is_left_out_with_a_warning(backend):
    """Inside a plate that subsamples, a deterministic site holds one random minibatch of rows
    (the one key 0 drew, in NumPyro), which the draws laid out as rows 0, 1, ... of the data;
    it is left out, by name, and the sites outside the plate stay."""
    from flowguides.core import SubsampledSiteWarning

    x = np.random.default_rng(1).normal(size=200)
    y = 1.0 + 2.0 * x
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import fit_posterior

        pyro.clear_param_store()
        p, (x, y) = pyro, (torch.tensor(x), torch.tensor(y))
    else:
        import jax.numpy as jnp
        import numpyro as p
        import numpyro.distributions as dist

        from flowguides.numpyro import fit_posterior

        x, y = jnp.asarray(x), jnp.asarray(y)

    def model(x, y):
        a = p.sample("a", dist.Normal(0.0, 3.0))
        b = p.sample("b", dist.Normal(0.0, 3.0))
        p.deterministic("a_plus_b", a + b)
        with p.plate("n", 200, subsample_size=20) as idx:
            mu = p.deterministic("mu", a + b * x[idx])
            p.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    fit = fit_posterior(model, FlowSpec.planar(num_layers=1, dtype="float64"), x, y,
                        num_steps=30, progress=False)  # fmt: skip
    with pytest.warns(SubsampledSiteWarning, match=r"'mu' \(plate 'n'\) sit inside a plate"):
        draws = fit.sample(100, seed=0)
    assert set(draws) == {"a", "b", "a_plus_b"}
    np.testing.assert_allclose(draws["a_plus_b"], draws["a"] + draws["b"], rtol=1e-12)
