"""`PosteriorFit.neutra`: NUTS through the fitted flow (NeuTraReparam) on a funnel."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from flowguides.pyro import NeuTraResult, fit_posterior
from flowguides.spec import FlowSpec, SpecError


def funnel():
    """Neal's funnel in 3-D: ``v ~ N(0, 3)``, ``x_i ~ N(0, exp(v / 2))``."""
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 3.0))
    with pyro.plate("d", 2):
        pyro.sample("x", dist.Normal(torch.zeros((), dtype=torch.float64), torch.exp(v / 2)))


@pytest.fixture(scope="module")
def fit():
    pyro.clear_param_store()
    spec = FlowSpec.realnvp(num_layers=4, hidden=[16], dtype="float64")
    return fit_posterior(funnel, spec, num_steps=500, init_scale=1.0, seed=0, progress=False)


def test_neutra_recovers_the_funnels_log_scale(fit):
    # 1,000 draws (an ESS of v about 400): the sd's Monte Carlo error is about 3.5%, so a 10%
    # band is about three errors wide (300 draws left it at 1.5 errors: seed-to-seed flaky).
    # 1,000 warmup steps: after 300, step-size adaptation still left runs whose sd read 2.6-3.4
    # (fits at seeds 0-1, NeuTra seeds 0-2); after 1,000, 2.73-2.98 on the same six
    result = fit.neutra(num_warmup=1000, num_samples=1000, seed=2, progress=False)
    assert isinstance(result, NeuTraResult)
    assert result.reparam_site == "v_shared_latent"  # NUTS sampled the flow's base noise
    assert {k: v.shape for k, v in result.samples.items()} == {
        k: v.shape for k, v in fit.sample(1000, seed=0).items()
    }
    assert np.std(result.samples["v"]) == pytest.approx(3.0, rel=0.1)
    assert result.diverging.shape == (1, 1000)
    assert result.ess["v"].shape == () and float(result.ess["v"]) > 30
    assert result.r_hat["x"].shape == (2,) and float(result.r_hat["v"]) < 1.1
    assert all(p.requires_grad for p in fit.guide.parameters())  # unfrozen again
    posterior = result.to_arviz().posterior
    assert posterior["v"].shape == (1, 1000) and posterior["x"].shape == (1, 1000, 2)


def test_neutra_leaves_the_flow_weights_unchanged(fit):
    before = {k: v.copy() for k, v in fit.guide.get_weights().items()}
    fit.neutra(num_warmup=20, num_samples=20, num_chains=2, seed=0, progress=False)
    for name, value in fit.guide.get_weights().items():
        np.testing.assert_array_equal(value, before[name])


def test_neutra_refuses_neural_ode_flows_and_bad_budgets(fit):
    with pytest.raises(ValueError, match="num_samples: expected a positive integer, got 0"):
        fit.neutra(num_samples=0)
    for bad in (1.0, 0, True, "0.9"):
        with pytest.raises(ValueError, match=r"target_accept_prob: expected a number in \(0, 1\)"):
            fit.neutra(num_samples=10, target_accept_prob=bad)
    spec = FlowSpec.neural_ode(hidden=[4], solver="rk4", num_steps=2, dtype="float64")
    ode = fit_posterior(funnel, spec, num_steps=2, init_scale=1.0, progress=False)
    with pytest.raises(SpecError, match="ODE solve and its adjoint per step"):
        ode.neutra(num_samples=10)


def test_neutra_runs_a_float32_guide_on_a_float64_likelihood():
    """The way users write it: ``Normal(0., 10.)`` makes a float32 latent (and a float32
    guide), the data are float64, so the log density and NUTS's positions are float64."""
    pyro.clear_param_store()
    y = torch.linspace(-1.0, 3.0, 20, dtype=torch.float64)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    fit = fit_posterior(model, FlowSpec.planar(num_layers=2), y, num_steps=200, progress=False)
    assert fit.guide.flow.affine.loc.dtype == torch.float32
    result = fit.neutra(num_warmup=100, num_samples=200, seed=0, progress=False)
    # the conjugate posterior: mean 100 * sum(y) / (100 n + 1), sd sqrt(100 / (100 n + 1))
    n = len(y)
    mean, sd = 100 * float(y.sum()) / (100 * n + 1), (100 / (100 * n + 1)) ** 0.5
    assert abs(result.samples["mu"].mean() - mean) < 0.5 * sd
    assert fit.guide.flow.affine.loc.dtype == torch.float32  # the fit's own flow is untouched
