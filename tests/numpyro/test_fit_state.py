"""What a NumPyro fit carries besides the guide's weights: the model's own ``numpyro.param``
sites through save/load, subsampled plates, and compiled chunks that never mix two guides."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import flowguides
from flowguides.diagnostics import arviz_major_version
from flowguides.io import LoadError
from flowguides.numpyro import fit_posterior
from flowguides.numpyro import io as numpyro_io
from flowguides.numpyro import posterior as posterior_module

SPEC = {"layers": [{"type": "planar"}], "dtype": "float64"}
FAST = {"num_steps": 200, "learning_rate": 0.05, "init_scale": 0.1, "progress": False}


def type2_ml(y):
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    with numpyro.plate("groups", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(0.0, tau))
        numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def test_the_models_param_sites_survive_save_and_load(tmp_path):
    y = jnp.asarray(np.random.default_rng(0).normal(0.0, 3.0, size=10))
    fit = fit_posterior(type2_ml, SPEC, y, **FAST)
    assert fit.subsampled_plates == []  # its plate "groups" sees all the data
    tau = float(fit.params["tau"])
    assert abs(tau - 1.0) > 0.3  # learned away from its initial value (else the test is void)
    loaded = flowguides.load(
        flowguides.save(fit, tmp_path / "fit"), backend="numpyro", model=type2_ml, model_args=(y,)
    )
    assert float(loaded.params["tau"]) == pytest.approx(tau, rel=1e-12)
    _, log_p, log_q = fit.log_densities(50, seed=4)
    _, loaded_p, loaded_q = loaded.log_densities(50, seed=4)
    np.testing.assert_allclose(loaded_p, log_p, rtol=1e-10)
    np.testing.assert_allclose(loaded_q, log_q, rtol=1e-10)

    spec, weights, meta = numpyro_io.export_state(fit)
    for bad, match in (
        ({"sigma": np.ones(())}, r"\['sigma'\].*\['tau'\]"),
        ({"tau": np.ones(3)}, r"'tau'.*\(3,\)"),
    ):
        with pytest.raises(LoadError, match=match):
            numpyro_io.import_state(
                spec, weights, {**meta, "model_params": bad}, model=type2_ml, model_args=(y,)
            )


X = np.random.default_rng(1).normal(size=(200, 3))
Y = (np.random.default_rng(2).random(200) < 1 / (1 + np.exp(-X @ np.array([1.0, -1.0, 0.5])))) * 1.0


def subsampled_logistic(x, y=None):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(3), 2.0).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=25) as idx:
        numpyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=None if y is None else y[idx])


def test_a_subsampled_plate_is_reported_seeded_and_left_out_of_arviz():
    fit = fit_posterior(subsampled_logistic, SPEC, jnp.asarray(X), jnp.asarray(Y), **FAST)
    assert fit.subsampled_plates == ["data"]
    first, second = fit.log_densities(40, seed=3), fit.log_densities(40, seed=3)
    np.testing.assert_array_equal(first[1], second[1])  # the subsample indices are seeded too
    assert not np.array_equal(first[1], fit.log_densities(40, seed=4)[1])
    loglik = fit.log_likelihood(first[0], seed=5)
    assert loglik["y"].shape == (40, 25)
    np.testing.assert_array_equal(loglik["y"], fit.log_likelihood(first[0], seed=5)["y"])
    data = flowguides.to_arviz(fit, num_samples=40, seed=0)
    # ArviZ 0.x: InferenceData.groups() lists them; 1.x: a DataTree whose children they are
    groups = set(data.groups() if arviz_major_version() == 0 else data.children)
    assert {"posterior", "sample_stats"} <= groups
    assert not groups & {"observed_data", "log_likelihood"}


def two_latents(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_a_cached_chunk_never_runs_another_start_kinds_guide():
    """A chunk traced for a plain-start guide must not train a Laplace-start one (whose
    whitening it does not read), nor the reverse; one with the same start is reused."""
    y = np.random.default_rng(0).normal(5.0, 1.0, size=20)
    exact = y.sum() / (y.size + 0.01)  # mu's posterior mean under the N(0, 10^2) prior
    plain = fit_posterior(two_latents, SPEC, y, **FAST)
    laplace = fit_posterior(two_latents, SPEC, y, **{**FAST, "init_scale": "laplace"})
    traces = posterior_module._TRACES["posterior"]
    again = fit_posterior(two_latents, SPEC, y, **FAST)
    assert posterior_module._TRACES["posterior"] == traces  # the plain chunk was reused
    assert plain.guide.preconditioner is None and laplace.guide.preconditioner is not None
    for fit in (plain, laplace, again):
        assert float(fit.sample(2000, seed=1)["mu"].mean()) == pytest.approx(exact, abs=0.15)
    np.testing.assert_array_equal(again.losses, plain.losses)
