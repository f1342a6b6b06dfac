"""`fit_posterior` and `fit_density`: closed-form posteriors, densities, errors, the NaN guard."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from flowguides.core import MaxStepsExceededError, NonFiniteLossError, split_indices
from flowguides.pyro import (
    DensityFit,
    NonFiniteValidationError,
    PosteriorFit,
    VectorizationWarning,
    fit_density,
    fit_posterior,
)
from flowguides.pyro.build import Flow
from flowguides.spec import FlowSpec

SPECS = {
    "planar": FlowSpec.planar(num_layers=4, dtype="float64"),
    "realnvp": FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64"),
    "neural_ode": FlowSpec.neural_ode(hidden=[8], solver="rk4", num_steps=2, dtype="float64"),
}

# conjugate linear regression with correlated covariates: a 2-D correlated Gaussian posterior
_rng = np.random.default_rng(0)
_x1 = _rng.normal(size=15)
X = torch.tensor(np.c_[_x1, 0.8 * _x1 + 0.6 * _rng.normal(size=15)])
Y = X @ torch.tensor([1.0, -0.5], dtype=torch.float64) + torch.tensor(_rng.normal(size=15))
PRECISION = torch.eye(2, dtype=torch.float64) + X.T @ X
COV = torch.linalg.inv(PRECISION)
MEAN = COV @ X.T @ Y

# two coins, Beta(1, 1) priors: Beta(1 + heads, 1 + tails) posteriors
FLIPS = torch.tensor(np.c_[_rng.random(30) < 0.7, _rng.random(30) < 0.2], dtype=torch.float64)


def regression(x, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), 1.0), obs=y)


def coins(flips):
    p = pyro.sample("p", dist.Beta(torch.ones(2, dtype=torch.float64), 1.0).to_event(1))
    with pyro.plate("flips", len(flips)):
        pyro.sample("y", dist.Bernoulli(p).to_event(1), obs=flips)


@pytest.fixture(scope="module", params=list(SPECS))
def regression_fit(request) -> PosteriorFit:
    return fit_posterior(
        regression, SPECS[request.param], X, Y, num_steps=600, num_particles=16, progress=False
    )


def test_correlated_gaussian_posterior(regression_fit):
    draws = regression_fit.sample(20000, seed=1)["beta"]
    assert draws.shape == (20000, 2)
    sd = COV.diagonal().sqrt().numpy()
    assert np.abs((draws.mean(0) - MEAN.numpy()) / sd).max() < 0.05
    # every covariance entry within 10% of the posterior sd product
    error = (np.cov(draws.T) - COV.numpy()) / np.outer(sd, sd)
    assert np.abs(error).max() < 0.1, error


def test_importance_weights_are_nearly_constant_when_the_fit_is_good(regression_fit):
    """``log p(x, z) - log q(z)`` equals ``log p(x)`` for the exact posterior."""
    log_evidence = torch.distributions.MultivariateNormal(
        torch.zeros(15, dtype=torch.float64), torch.eye(15, dtype=torch.float64) + X @ X.T
    ).log_prob(Y)
    draws, log_w = regression_fit.importance_sample(2000, seed=2)
    assert draws["beta"].shape == (2000, 2) and log_w.shape == (2000,)
    assert abs(float(np.log(np.mean(np.exp(log_w))) - log_evidence)) < 0.05
    assert regression_fit.elbo(2000, seed=2) <= float(log_evidence) + 1e-3
    assert np.std(log_w) < 0.3


def test_posterior_fit_helpers(regression_fit):
    assert regression_fit.backend == "pyro"
    assert regression_fit.losses.shape == (600,)
    assert regression_fit.latent_shapes == {"beta": (2,)}
    np.testing.assert_array_equal(regression_fit.observed_data()["y"], Y.numpy())
    draws = regression_fit.sample(7, seed=0)
    log_lik = regression_fit.log_likelihood(draws)["y"]
    expected = dist.Normal(torch.as_tensor(draws["beta"]) @ X.T, 1.0).log_prob(Y).numpy()
    np.testing.assert_allclose(log_lik, expected, rtol=1e-12)
    draws2, log_p, log_q = regression_fit.log_densities(7, seed=0)
    np.testing.assert_array_equal(draws2["beta"], draws["beta"])
    beta = torch.as_tensor(draws["beta"])
    prior = dist.Normal(0.0, 1.0).log_prob(beta).sum(-1)
    np.testing.assert_allclose(log_p, (prior + torch.as_tensor(expected).sum(-1)).numpy())
    if regression_fit.spec.layers[0].type == "neural_ode":  # rk4, 2 steps: 8 evaluations
        assert set(regression_fit.history) == {"nfe_forward", "nfe_backward"}
        np.testing.assert_array_equal(regression_fit.history["nfe_forward"], np.full(600, 8))
        np.testing.assert_array_equal(regression_fit.history["nfe_backward"], np.full(600, 8))
    else:
        assert regression_fit.history == {}
    flow = regression_fit.guide.get_flow()
    # a fixed-step ODE solve backwards inverts the forward solve only up to its step error
    tol = 1e-3 if flow.spec.layers[0].type == "neural_ode" else 1e-8
    with torch.no_grad():
        np.testing.assert_allclose(log_q, flow.log_prob(beta).numpy(), atol=tol)


@pytest.mark.parametrize("name", list(SPECS))
def test_beta_bernoulli_posterior_mean(name):
    fit = fit_posterior(coins, SPECS[name], FLIPS, num_steps=300, progress=False)
    draws = fit.sample(20000, seed=1)["p"]
    heads = FLIPS.sum(0).numpy()
    expected = (1 + heads) / (2 + len(FLIPS))
    assert ((draws > 0) & (draws < 1)).all()
    assert np.abs(draws.mean(0) - expected).max() < 0.02


def test_constrained_sites_give_finite_losses_and_draws_in_the_support():
    data = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)

    def model():
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)))
        p = pyro.sample("p", dist.Beta(torch.tensor(2.0, dtype=torch.float64), 2.0))
        w = pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=torch.float64)))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(p.unsqueeze(-1) * w, sigma.unsqueeze(-1)), obs=data)

    # p.unsqueeze(-1) * w broadcasts a batch of draws (S, 1, 3) that the data plate expands to
    # (S, S, 3): evaluated at once, the likelihood would count S times; "auto" finds it
    with pytest.warns(VectorizationWarning, match="one at a time"):
        fit = fit_posterior(model, SPECS["realnvp"], num_steps=50, num_particles=2, progress=False)
    assert fit.guide.vectorized is False
    assert np.isfinite(fit.losses).all()
    draws = fit.sample(500, seed=0)
    assert (draws["sigma"] > 0).all() and ((draws["p"] > 0) & (draws["p"] < 1)).all()
    assert draws["w"].shape == (500, 3)
    np.testing.assert_allclose(draws["w"].sum(-1), 1.0)
    assert np.isfinite(fit.importance_sample(100, seed=0)[1]).all()


@pytest.mark.filterwarnings("ignore:Encountered")  # Pyro's own warning about the inf factor
def test_non_finite_loss_stops_and_keeps_the_last_finite_weights():
    calls = {"n": 0}

    def model():
        x = pyro.sample("x", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
        calls["n"] += 1
        bad = calls["n"] > 12
        pyro.factor("boom", torch.full(x.shape[:-1], float("inf") if bad else 0.0))

    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|-inf) at step \d+") as info:
        fit_posterior(model, SPECS["realnvp"], num_steps=100, progress=False, init_scale=0.1)
    error = info.value
    assert 0 < error.step < 100
    assert len(error.fit.losses) == error.step and np.isfinite(error.fit.losses).all()
    params = list(error.fit.guide.parameters())
    for kept, good in zip(params, error.last_good, strict=True):
        torch.testing.assert_close(kept.detach(), good)


def test_fit_posterior_adds_the_rnode_penalty():
    spec = FlowSpec.neural_ode(
        hidden=[8], solver="rk4", num_steps=2, dtype="float64", kinetic_weight=1.0, steer=0.5
    )
    fit = fit_posterior(regression, spec, X, Y, num_steps=30, progress=False)
    penalty = fit.history["regularization"]
    assert penalty.shape == (30,) and np.isfinite(penalty).all()
    assert penalty[0] == 0.0 and (penalty[1:] > 0).all()  # the field starts at zero
    assert np.isfinite(fit.losses).all()


def test_rnode_lowers_the_kinetic_energy_of_a_density_fit():
    data = two_moons(600, 2)
    energies = []
    for weight in (0.0, 1.0):
        spec = FlowSpec.neural_ode(
            hidden=[16], solver="rk4", num_steps=2, dtype="float64", kinetic_weight=weight
        )
        fit = fit_density(
            data, spec, num_steps=80, batch_size=64, learning_rate=1e-2, progress=False
        )
        assert ("regularization" in fit.history) == (weight > 0)
        assert (fit.history["nfe_forward"] == 8).all() and (fit.history["nfe_backward"] == 8).all()
        x = torch.as_tensor((data - fit.mean) / fit.std)
        with torch.no_grad():
            y, _ = fit.flow.affine.inverse_and_log_det(x)
            energies.append(float(fit.flow.layers[0].solve(y, inverse=True)[2]["kinetic"].mean()))
    assert energies[1] < 0.5 * energies[0], energies


def two_moons(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, np.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.c_[x, y] * 3 + 10 + rng.normal(scale=0.1, size=(n, 2))


def test_fit_density_beats_a_gaussian():
    train, test = two_moons(1500, 0), two_moons(1000, 1)
    spec = FlowSpec.realnvp(num_layers=4, hidden=[16, 16], dtype="float64")
    fit = fit_density(train, spec, num_steps=600, learning_rate=5e-3, patience=300, progress=False)
    assert isinstance(fit.flow, Flow) and fit.backend == "pyro"
    gaussian = torch.distributions.MultivariateNormal(
        torch.as_tensor(train.mean(0)), torch.as_tensor(np.cov(train.T))
    )
    baseline = float(gaussian.log_prob(torch.as_tensor(test)).mean())
    assert float(fit.log_prob(test).mean()) > baseline + 0.5
    assert len(fit.losses["train"]) >= len(fit.losses["val"]) > 0
    assert fit.sample(10, seed=0).shape == (10, 2)


def test_fit_density_validates_at_the_first_and_last_step_and_refuses_no_finite_one():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(200, 2)) * [1.0, 3.0] + [0.0, 5.0]
    spec = FlowSpec.realnvp(num_layers=1, hidden=[8], dtype="float64")
    settings = {"num_steps": 10, "learning_rate": 1e-2, "progress": False}
    assert len(fit_density(data, spec, **settings).losses["val"]) == 2  # after steps 0 and 9
    bad = data.copy()
    bad[split_indices(len(bad), 0.1, 0)[1][0]] = 1e200  # a held-out row that overflows
    with pytest.raises(NonFiniteValidationError, match="validation loss was not finite") as err:
        fit_density(bad, spec, standardize=False, **settings)
    assert isinstance(err.value.fit, DensityFit) and len(err.value.fit.losses["train"]) == 10


def test_density_log_prob_includes_the_standardisation():
    """With an identity flow, log_prob is the standardised normal's, Jacobian included."""
    data = np.random.default_rng(0).normal(size=(50, 2)) * [3.0, 0.5] + [1.0, -2.0]
    fit = fit_density(
        data, FlowSpec.planar(num_layers=1, dtype="float64"), num_steps=1, progress=False
    )
    fit.flow.affine.loc.data.zero_()
    fit.flow.affine.log_scale.data.zero_()
    with torch.no_grad():
        fit.flow.layers[0].u.data.copy_(
            np.log(np.e - 1)
            * fit.flow.layers[0].w
            / (fit.flow.layers[0].w ** 2).sum(-1, keepdim=True)
        )
    expected = (
        dist.Normal(torch.as_tensor(fit.mean), torch.as_tensor(fit.std))
        .log_prob(torch.as_tensor(data))
        .sum(-1)
    )
    np.testing.assert_allclose(fit.log_prob(data), expected.numpy(), rtol=1e-10)
    draws = fit.sample(4000, seed=0)
    np.testing.assert_allclose(draws.std(0), fit.std, rtol=0.1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.ones(5), "expected a 2-D array"),
        (np.ones((2, 3, 4)), r"expected a 2-D array \(n_points, dim\), got shape \(2, 3, 4\)"),
        (np.array([[0.0, 1.0], [np.nan, 1.0], [0.0, np.inf]]), r"rows \[1, 2\]"),
    ],
)
def test_fit_density_rejects_bad_data(data, message):
    with pytest.raises(ValueError, match=message):
        fit_density(data, SPECS["planar"], num_steps=1, progress=False)


def test_fit_density_non_finite_loss_keeps_the_last_finite_weights(monkeypatch):
    calls = {"n": 0}
    original = Flow.log_prob

    def flaky(self, x):
        calls["n"] += 1
        out = original(self, x)
        return out * float("nan") if calls["n"] > 5 else out

    monkeypatch.setattr(Flow, "log_prob", flaky)
    data = np.random.default_rng(0).normal(size=(40, 2))
    with pytest.raises(NonFiniteLossError) as info:
        fit_density(data, SPECS["realnvp"], num_steps=50, validation_fraction=0.0, progress=False)
    assert isinstance(info.value.fit, DensityFit)
    for kept, good in zip(info.value.fit.flow.parameters(), info.value.last_good, strict=True):
        torch.testing.assert_close(kept.detach(), good)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 0}, "num_steps: expected a positive integer, got 0"),
        ({"learning_rate": -1.0}, "learning_rate: expected a positive number"),
        ({"num_particles": 0}, "num_particles: expected a positive integer"),
    ],
)
def test_fit_posterior_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_posterior(regression, SPECS["planar"], X, Y, progress=False, **kwargs)


def gaussian_2d():
    scale = torch.tensor([1.0, 2.0], dtype=torch.float64)
    pyro.sample("x", dist.Normal(torch.zeros(2, dtype=torch.float64), scale).to_event(1))


def test_losses_are_the_negative_elbo_without_the_rnode_penalty():
    """The zeroed last layer makes the field, so the penalty and its gradient, zero at the
    start: a weighted and an unweighted fit take the same first step, so their second step
    sees the same parameters and draws. There the penalty is positive, and the losses agree:
    neither includes it (the weighted one would be larger by it)."""
    fits = {}
    for weight in (0.0, 5.0):
        spec = FlowSpec.neural_ode(
            hidden=[4], solver="rk4", num_steps=2, kinetic_weight=weight, dtype="float64"
        )
        fits[weight] = fit_posterior(
            gaussian_2d, spec, num_steps=3, num_particles=3, init_scale=1.0,
            learning_rate=0.05, progress=False,
        )  # fmt: skip
    penalty = fits[5.0].history["regularization"]
    assert penalty[0] == 0.0 and penalty[1] > 1e-4
    np.testing.assert_allclose(fits[5.0].losses[:2], fits[0.0].losses[:2], rtol=0, atol=1e-9)


TIGHT_FEW_STEPS = {"rtol": 1e-12, "atol": 1e-12, "max_steps": 2, "dtype": "float64"}


def test_an_adaptive_solve_out_of_max_steps_raises_max_steps_exceeded_in_training():
    data = np.random.default_rng(0).normal(size=(64, 2)) * [1.0, 0.3]
    spec = FlowSpec.neural_ode(hidden=[8], **TIGHT_FEW_STEPS)
    with pytest.raises(MaxStepsExceededError, match="max_steps=2"):
        fit_density(data, spec, num_steps=50, learning_rate=0.05, progress=False)
    with pytest.raises(MaxStepsExceededError, match="max_steps=2"):
        fit_posterior(
            gaussian_2d, spec, num_steps=50, learning_rate=0.05, init_scale=1.0,
            progress=False,
        )  # fmt: skip


def test_trainer_steps_as_per_tensor_adam_and_restores_the_weights_before_a_non_finite_loss():
    from flowguides.core import learning_rate_at
    from flowguides.pyro._training import Trainer, _all_finite

    target = [
        torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
        torch.eye(2, dtype=torch.float64),
    ]
    start = [torch.zeros(3, dtype=torch.float64), torch.full((2, 2), 0.3, dtype=torch.float64)]
    ours = [p.clone().requires_grad_(True) for p in start]
    ref = [p.clone().requires_grad_(True) for p in start]
    trainer = Trainer(ours, 20, 0.1, None)
    optim = torch.optim.Adam(ref, lr=0.1, foreach=False)  # the per-tensor reference
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: learning_rate_at(s, 20, 0.1) / 0.1)

    def loss(params):
        return sum(
            ((p - t) ** 2 * (i + 1)).sum()
            for i, (p, t) in enumerate(zip(params, target, strict=True))
        )

    before = []
    for step in range(5):
        before = [p.detach().clone() for p in ours]
        trainer.step(step, loss(ours), lambda: None)
        optim.zero_grad()
        loss(ref).backward()
        optim.step()
        sched.step()
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-12)
    assert not torch.equal(ours[0].detach(), start[0])  # the steps moved the weights
    moved = [p.detach().clone() for p in ours]
    with pytest.raises(NonFiniteLossError):
        trainer.step(5, loss(ours) * float("nan"), lambda: None)
    for kept, good, last in zip(ours, trainer.last_good, before, strict=True):
        torch.testing.assert_close(kept.detach(), last, rtol=0, atol=0)  # before the last step
        torch.testing.assert_close(good, last, rtol=0, atol=0)
    assert not torch.equal(moved[0], before[0])

    grads = [torch.ones(3), torch.zeros(2, 2)]
    assert _all_finite(grads)
    grads[1][1, 0] = float("inf")
    assert not _all_finite(grads)
    assert not _all_finite([torch.ones(2, dtype=torch.float64), torch.tensor([float("nan")])])
