"""Pyro fits beyond the guide: the model's own params saved, seeded evaluations, clear errors.

Small models and few steps: these check plumbing (what is saved, what repeats), not accuracy.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

import flowguides
from flowguides import FlowSpec
from flowguides.io import MODEL_PARAM_PREFIX
from flowguides.pyro import fit_posterior

SPEC = FlowSpec.realnvp(num_layers=1, hidden=[4])
Y = torch.tensor([0.3, -1.2, 2.5, 1.1, -0.4, 3.0])


def type2_model(y):
    tau = pyro.param("tau", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("groups", len(y)):
        theta = pyro.sample("theta", dist.Normal(0.0, tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def test_save_load_restores_the_models_params_in_a_new_session(tmp_path):
    fit = fit_posterior(type2_model, SPEC, Y, num_steps=60, init_scale=0.5, progress=False)
    tau = float(pyro.param("tau").detach())
    assert abs(tau - 1.0) > 1e-3  # learned: a restore of the initial value would not pass
    before = fit.log_densities(40, seed=4)
    path = flowguides.save(fit, tmp_path / "fit")
    _, _, meta = flowguides.io.read_folder(path)
    np.testing.assert_allclose(meta["model_params"]["tau"], tau)
    assert MODEL_PARAM_PREFIX + "tau" not in meta.get("sites", [])

    pyro.clear_param_store()  # as in a new session
    loaded = flowguides.load(path, backend="pyro", model=type2_model, model_args=(Y,))
    assert float(pyro.param("tau").detach()) == pytest.approx(tau, rel=1e-12)
    after = loaded.log_densities(40, seed=4)
    np.testing.assert_allclose(after[0]["theta"], before[0]["theta"], rtol=1e-10)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-10)
    np.testing.assert_allclose(after[2], before[2], rtol=1e-10)


def test_load_restores_a_pyro_modules_weights_into_the_module(tmp_path):
    """``pyro.module`` (default ``update_module_params=False``) registers the module's own
    parameters in the param store, and the model runs the module: loading writes the saved
    values into those tensors, so the module itself computes with the fitted weights."""
    torch.manual_seed(0)
    x = torch.linspace(-2.0, 2.0, 30).unsqueeze(-1)
    y = torch.sin(2.0 * x).squeeze(-1)
    net = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))

    def model(x, y):
        pyro.module("net", net)
        b = pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("d", len(x)):
            pyro.sample("obs", dist.Normal(net(x).squeeze(-1) + b.sum(-1), 0.1), obs=y)

    pyro.clear_param_store()
    fit = fit_posterior(model, SPEC, x, y, num_steps=100, init_scale=0.1, progress=False)
    fitted = {k: v.detach().clone() for k, v in net.state_dict().items()}
    path = flowguides.save(fit, tmp_path / "fit")
    pyro.clear_param_store()  # as in a new session, with a fresh network
    for p in net.parameters():
        torch.nn.init.normal_(p)
    flowguides.load(path, backend="pyro", model=model, model_args=(x, y))
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, fitted[name], rtol=0, atol=0)
    assert pyro.param("net$$$0.weight") is net[0].weight


def test_save_after_the_param_store_is_cleared_writes_the_fitted_value(tmp_path):
    fit = fit_posterior(type2_model, SPEC, Y, num_steps=20, init_scale=0.5, progress=False)
    tau = float(pyro.param("tau").detach())
    pyro.clear_param_store()  # the fit holds its fitted values (was: a SaveError)
    _, _, meta = flowguides.io.read_folder(flowguides.save(fit, tmp_path / "fit"))
    assert float(meta["model_params"]["tau"]) == pytest.approx(tau) and tau != 1.0


X = torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
LABELS = (X.sum(-1) > 0).double()


def subsampled(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", len(x), subsample_size=8) as idx:
        pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])


def test_subsampled_model_log_densities_repeat_with_a_seed_and_arviz_leaves_data_out():
    fit = fit_posterior(
        subsampled, SPEC, X, LABELS, num_steps=5, init_scale=0.5, progress=False,
        vectorize_particles=False,
    )  # fmt: skip
    assert fit.subsampled_plates == ["data"]
    first, again = fit.log_densities(30, seed=7), fit.log_densities(30, seed=7)
    np.testing.assert_array_equal(first[0]["w"], again[0]["w"])
    np.testing.assert_array_equal(first[1], again[1])  # the model's subsample repeats too
    other = fit.log_densities(30, seed=8)
    assert not np.array_equal(first[1], other[1])
    state = torch.get_rng_state()
    fit.log_densities(5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone

    data = flowguides.to_arviz(fit, num_samples=30, seed=0)
    groups = set(data.groups() if flowguides.diagnostics.arviz_major_version() == 0 else data)
    assert {"posterior", "sample_stats"} <= groups
    assert not groups & {"observed_data", "log_likelihood"}


@pytest.mark.filterwarnings("ignore:Singular sample detected")  # torch, drawing inits
def test_wishart_latent_names_the_site_and_suggests_lkj():
    def model(x):
        prec = pyro.sample(
            "precision", dist.Wishart(torch.tensor(10.0), torch.eye(2, dtype=torch.float64))
        )
        with pyro.plate("data", len(x)):
            pyro.sample(
                "x",
                dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), precision_matrix=prec),
                obs=x,
            )

    with pytest.raises(NotImplementedError, match=r"site 'precision': its support Positive.*LKJ"):
        fit_posterior(
            model, SPEC, torch.zeros(4, 2, dtype=torch.float64), num_steps=1, progress=False
        )


def test_a_fit_repeats_by_its_seed_and_gives_the_callers_random_state_back():
    """`fit_posterior` and `fit_density` seed Pyro's global random state (torch, numpy,
    random) for themselves and restore the caller's: a simulation study's draws between fits
    go on as without them (they repeated the same data set after every fit)."""
    import random

    def model():
        pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    def draws() -> list:  # numpy's legacy global API: what such a study calls
        return [np.random.normal(), random.random(), float(torch.randn(()))]  # noqa: NPY002

    def reseed() -> None:
        np.random.seed(5)  # noqa: NPY002
        random.seed(5)
        torch.manual_seed(5)

    reseed()
    expected = draws() + draws()
    reseed()
    got = draws()
    first = fit_posterior(model, SPEC, num_steps=20, progress=False, seed=3)
    flowguides.pyro.fit_density(np.random.default_rng(0).normal(size=(50, 2)), SPEC, num_steps=5)
    got += draws()
    assert got == expected
    again = fit_posterior(model, SPEC, num_steps=20, progress=False, seed=3)
    np.testing.assert_array_equal(first.losses, again.losses)


def test_a_fit_reads_its_own_fitted_params_after_the_param_store_changes(tmp_path):
    """Pyro's param store is global: ``pyro.clear_param_store()`` before the next fit (as Pyro's
    tutorials do), or a fit of a model with a param of the same name, changed what an earlier
    fit's deterministic sites, log joint, log-likelihood and NeuTra read (its draws' ``shifted -
    mu`` became the param's initial 1.0). The fit holds its fitted values (`model_params`)."""

    def model(y, pull=2.0):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        shift = pyro.param("shift", torch.tensor(1.0), constraint=constraints.positive)
        pyro.deterministic("shifted", mu + shift)
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)
        pyro.sample("shift_prior", dist.Normal(pull, 0.05), obs=shift)

    spec = FlowSpec.planar(num_layers=2)
    pyro.clear_param_store()
    fit = fit_posterior(model, spec, Y, num_steps=300, learning_rate=0.05, progress=False)
    shift = float(fit.model_params["shift"])
    assert abs(shift - 2.0) < 0.2 and shift == float(pyro.param("shift").detach())  # from 1.0
    draws = fit.sample(200, seed=0)
    log_lik = fit.log_likelihood(draws)["y"]
    log_p = fit.log_densities(100, seed=1)[1]
    for change in ("clear", "refit"):
        pyro.clear_param_store()
        if change == "refit":  # another model's param of the same name, fitted to 5
            fit_posterior(model, spec, Y, pull=5.0, num_steps=50, learning_rate=0.05,
                          progress=False)  # fmt: skip
            assert float(pyro.param("shift").detach()) > 3.0
        again = fit.sample(200, seed=0)
        np.testing.assert_allclose(again["shifted"], again["mu"] + shift, rtol=1e-5)
        np.testing.assert_allclose(fit.log_likelihood(again)["y"], log_lik, rtol=1e-5)
        np.testing.assert_allclose(fit.log_densities(100, seed=1)[1], log_p, rtol=1e-5)
    run = fit.neutra(num_warmup=10, num_samples=10, seed=0, progress=False)
    np.testing.assert_allclose(run.samples["shifted"], run.samples["mu"] + shift, rtol=1e-5)
    _, _, meta = flowguides.io.read_folder(flowguides.save(fit, tmp_path / "fit"))
    assert float(meta["model_params"]["shift"]) == pytest.approx(shift)  # not the store's


def test_deterministic_sites_one_draw_at_a_time_leave_the_global_rng_alone():
    """A model that does not broadcast over a batch of draws has its deterministic sites
    computed by Pyro's `Predictive`, one draw at a time, which reads the global random state:
    `fit.sample` and `fit.deterministic` must leave the caller's state as it was."""
    from flowguides.pyro import VectorizationWarning

    x = torch.linspace(-1.0, 1.0, 12)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 5.0).to_event(1))
        mean = pyro.deterministic("mean", w[..., 0:1] + w[..., 1:2] * x)
        with pyro.plate("N", len(x)):
            pyro.sample("y", dist.Normal(mean, 0.3), obs=y)

    with pytest.warns(VectorizationWarning, match="does not broadcast"):
        fit = fit_posterior(model, SPEC, x, y=0.5 + 1.5 * x, num_steps=5, progress=False)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    draws = fit.sample(10, seed=0)
    assert draws["mean"].shape == (10, 12)
    assert torch.equal(torch.get_rng_state(), state)
    values = fit.deterministic({"w": draws["w"]})
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_allclose(values["mean"], draws["mean"], rtol=1e-6)
