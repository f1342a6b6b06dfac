"""Models written for one draw (``X @ b``, ``b[0] + b[1] * x``, Python loops over data) fit:
``vectorize_particles="auto"`` finds that they do not broadcast over a batch of draws and runs
draws one at a time, with one warning; ``False`` does so silently; ``True`` refuses clearly."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import flowguides
from flowguides import diagnose, to_arviz
from flowguides.pyro import AutoFlowGuide, VectorizationWarning, fit_posterior
from flowguides.pyro._model import mismatch
from flowguides.spec import FlowSpec

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64")
NOISE, PRIOR_SD = 0.5, 2.0  # known noise: the posterior of b is Gaussian, in closed form
GEN = torch.Generator().manual_seed(0)
X = torch.randn(30, 3, generator=GEN, dtype=torch.float64)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + NOISE * torch.randn(
    30, generator=GEN, dtype=torch.float64
)
XS = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
YS = 2.0 + 1.5 * XS + NOISE * torch.randn(8, generator=GEN, dtype=torch.float64)


def regression(x, y):  # as users write it: X @ b does not broadcast over draws
    b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[1]), PRIOR_SD).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ b, NOISE), obs=y)


def looped(x, y):  # a Python loop over the data and b[0] + b[1] * x
    b = pyro.sample("b", dist.Normal(x.new_zeros(2), PRIOR_SD).to_event(1))
    for i in range(len(x)):
        pyro.sample(f"obs_{i}", dist.Normal(b[0] + b[1] * x[i], NOISE), obs=y[i])


def posterior(design: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of b for y ~ N(design b, NOISE^2), b ~ N(0, PRIOR_SD^2 I)."""
    eye = torch.eye(design.shape[1], dtype=design.dtype)
    cov = torch.linalg.inv(design.T @ design / NOISE**2 + eye / PRIOR_SD**2)
    return (cov @ design.T @ y / NOISE**2).numpy(), cov.numpy()


def vectorization_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, VectorizationWarning)]


def test_a_regression_with_x_at_b_fits_the_closed_form_posterior_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_posterior(regression, SPEC, X, Y, num_steps=300, num_particles=2, progress=False)
    messages = vectorization_warnings(caught)
    assert len(messages) == 1 and "X @ b" in messages[0] and "RuntimeError" in messages[0]
    assert fit.guide.vectorized is False and np.isfinite(fit.losses).all()
    mean, cov = posterior(X, Y)
    draws = fit.sample(4000, seed=0)["b"]
    sd = np.sqrt(np.diag(cov))  # about 0.09
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.25 * sd.min())
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.15)
    # the remembered choice serves the diagnostics: log p is prior + likelihood, draw by draw
    small, log_p, _ = fit.log_densities(30, seed=1)
    b = torch.as_tensor(small["b"])
    log_lik = dist.Normal(b @ X.T, NOISE).log_prob(Y)
    np.testing.assert_allclose(fit.log_likelihood(small)["obs"], log_lik.numpy(), rtol=1e-12)
    prior = dist.Normal(torch.zeros_like(b), PRIOR_SD).log_prob(b).sum(-1)
    np.testing.assert_allclose(log_p, (prior + log_lik.sum(-1)).numpy(), rtol=1e-12)
    diagnosis = diagnose(fit, num_samples=100, seed=0)
    assert np.isfinite(diagnosis.elbo) and diagnosis.khat < 0.7
    data = to_arviz(fit, num_samples=50, seed=0)
    assert data["log_likelihood"]["obs"].shape == (1, 50, 30)
    # True refuses, naming the option; False agrees with the fit's own choice
    with pytest.raises(ValueError, match="vectorize_particles=True: the model does not broadcast"):
        fit.log_densities(30, seed=1, vectorize_particles=True)
    again = fit.importance_sample(30, seed=1, vectorize_particles=False)[1]
    np.testing.assert_allclose(again, fit.importance_sample(30, seed=1)[1])


def test_a_python_loop_over_data_fits_with_vectorize_particles_false_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one warning
        fit = fit_posterior(
            looped, SPEC, XS, YS, num_steps=200, learning_rate=0.05, num_particles=2,
            init_scale=0.1, vectorize_particles=False, progress=False,
        )  # fmt: skip
        diagnosis = diagnose(fit, num_samples=100, seed=0)
        data = to_arviz(fit, num_samples=30, seed=0)
    assert fit.guide.vectorized is False and np.isfinite(diagnosis.elbo)
    assert data["log_likelihood"]["obs_3"].shape == (1, 30)
    # the plain 0.1 start sits at the prior median 0: only training reaches the posterior
    mean, cov = posterior(torch.stack([torch.ones_like(XS), XS], -1), YS)
    draws = fit.sample(4000, seed=0)["b"]
    sd = np.sqrt(np.diag(cov))
    assert np.abs(mean).min() > 5 * sd.max()  # far from the start
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.3 * sd.min())
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.2)


@pytest.mark.parametrize("model", [regression, looped])
def test_vectorize_particles_true_refuses_a_model_that_does_not_broadcast(model):
    data = (X, Y) if model is regression else (XS, YS)
    with pytest.raises(ValueError, match="vectorize_particles=True: .*one at a time") as info:
        fit_posterior(model, SPEC, *data, num_steps=5, vectorize_particles=True, progress=False)
    assert "(X * b).sum(-1)" in str(info.value)


def test_auto_keeps_a_broadcasting_model_vectorised_subsampled_plate_included():
    def model(x, y):
        b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[1]), PRIOR_SD).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(x.new_ones(())))
        with pyro.plate("data", x.shape[0], subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal((x[idx] * b).sum(-1), s), obs=y[idx])

    guide = AutoFlowGuide(model, SPEC)  # pytest turns any warning into an error
    guide(X, Y)
    assert guide.vectorized is True


def test_a_float64_prior_over_float32_data_is_vectorised_without_a_warning():
    """A 0-d float64 latent times float32 data is float32 (torch's promotion): the log joint
    carries float32 rounding, so together and one at a time are compared at float32's
    tolerance, not float64's (which read the rounding as a broadcasting failure)."""
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    y = 2.0 + 0.3 * x + 0.1 * torch.randn(50, generator=torch.Generator().manual_seed(1))

    def model(x, y):
        zero = torch.tensor(0.0, dtype=torch.float64)
        a = pyro.sample("a", dist.Normal(zero, 10.0))
        b = pyro.sample("b", dist.Normal(zero, 10.0))
        with pyro.plate("n", len(y)):
            pyro.sample("obs", dist.Normal(a + b * x, 0.1), obs=y)

    guide = AutoFlowGuide(model, SPEC)  # pytest turns any warning into an error
    guide(x, y)
    assert guide.vectorized is True
    # a real broadcasting failure still shows at that tolerance
    assert mismatch(torch.tensor([1.0, 5.0]), torch.tensor([1.0, 2.0]), 2.0**-23) is not None


def test_the_fits_spec_says_the_dtype_its_flow_follows(tmp_path):
    """The flow is built in the dtype of the model's latent values: the fit's spec and its
    saved folder say so (a float64 spec, shared with JAX, on float32 latents says float32)."""

    def model(zero):
        pyro.sample("a", dist.Normal(zero, 1.0))
        pyro.sample("b", dist.Normal(zero, 1.0))

    single, double = torch.tensor(0.0), torch.tensor(0.0, dtype=torch.float64)
    fit = fit_posterior(model, SPEC, single, num_steps=3, progress=False)
    assert SPEC.dtype == "float64" and fit.spec.dtype == "float32"
    assert fit.guide.flow.affine.loc.dtype == torch.float32
    folder = flowguides.save(fit, tmp_path / "fit")
    assert json.loads((folder / "spec.json").read_text())["dtype"] == "float32"
    fit = fit_posterior(model, FlowSpec.realnvp(num_layers=1), double, num_steps=3, progress=False)
    assert fit.spec.dtype == "float64" and fit.sample(2)["a"].dtype == np.float64
    assert fit.to_arviz(30, seed=0)["posterior"]["a"].shape == (1, 30)  # the method form


def test_a_site_reparametrised_inside_a_plate_keeps_one_value_per_plate_member():
    """``poutine.reparam`` with `LocScaleReparam` inside a plate: Pyro's init strategy draws
    ``theta`` before the plate broadcasts it, so an `AutoContinuous` prototype held one
    ``theta_decentered`` for the whole plate (latent_dim 3, every group the same effect).
    The guide holds one per group, and the reparametrised ``theta`` (an observed ``Delta``)
    is not data in the ArviZ data."""
    from pyro import poutine
    from pyro.infer.reparam import LocScaleReparam

    y = torch.tensor([3.0, -3.0, 0.5], dtype=torch.float64)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(y.new_ones(()) * 3.0))
        with pyro.plate("groups", 3):
            with poutine.reparam(config={"theta": LocScaleReparam(centered=0.0)}):
                theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("obs", dist.Normal(theta, 0.5), obs=y)

    fit = fit_posterior(model, SPEC, y, num_steps=600, progress=False)
    assert fit.guide.latent_dim == 5
    draws = fit.sample(2000, seed=0)
    assert draws["theta_decentered"].shape == (2000, 3)
    theta = draws["mu"][:, None] + draws["tau"][:, None] * draws["theta_decentered"]
    assert theta.mean(0)[0] - theta.mean(0)[1] > 3.0  # the groups apart, as their data are
    data = fit.to_arviz(30, seed=0)
    assert list(data["observed_data"].data_vars) == ["obs"]


def test_draws_map_through_a_model_that_does_not_broadcast_as_the_loop_evaluates_them():
    """A model written for one draw runs a batch of draws mapped by `torch.func.vmap` where
    set-up found that this agrees with a loop: here the start search's full-data log joint of
    a subsampled model (in chunks of the subsample), equal to the loop's and to the closed
    form. A model that branches in Python on a latent value keeps the loop."""

    def subsampled(x, y):
        b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[1]), PRIOR_SD).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(x[idx] @ b, NOISE), obs=y[idx])

    def branching(x, y):
        b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[1]), PRIOR_SD).to_event(1))
        noise = NOISE if float(b[0]) < 1e6 else 2 * NOISE  # a Python branch on a value
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ b, noise), obs=y)

    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    guide = AutoFlowGuide(subsampled, SPEC)
    with pytest.warns(VectorizationWarning):
        guide(X, Y)
    assert guide.vectorized is False and guide.mappable is True
    with torch.no_grad():
        mapped = guide.start_log_joint(z, (X, Y), {})
        guide.mappable = False
        looped = guide.start_log_joint(z, (X, Y), {})
    prior = dist.Normal(0.0, PRIOR_SD).log_prob(z).sum(-1)
    exact = prior + dist.Normal(z @ X.T, NOISE).log_prob(Y).sum(-1)
    torch.testing.assert_close(looped, exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(mapped, looped, rtol=1e-10, atol=0)

    guide = AutoFlowGuide(branching, SPEC)
    with pytest.warns(VectorizationWarning):
        guide(X, Y)
    assert guide.vectorized is False and guide.mappable is False
    with torch.no_grad():
        batch = guide.batch_log_joint(z, (X, Y))
        one = torch.stack([guide.log_joint(draw, X, Y) for draw in z])
    torch.testing.assert_close(batch, one, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_vectorize_particles_is_named(value):
    with pytest.raises(ValueError, match=r"vectorize_particles: expected 'auto', True or False"):
        AutoFlowGuide(regression, SPEC, vectorize_particles=value)


def test_diagnostics_pass_the_option_only_to_fits_that_take_it():
    class Fit:  # a fit whose log_densities vectorises every model (as NumPyro's vmap does)
        def log_densities(self, num_samples, seed=None):
            rng = np.random.default_rng(seed)
            return (
                {"x": rng.normal(size=num_samples)},
                rng.normal(size=num_samples),
                np.zeros(num_samples),
            )

    class Taking(Fit):
        seen = []

        def log_densities(self, num_samples, seed=None, *, vectorize_particles=None):
            self.seen.append(vectorize_particles)
            return super().log_densities(num_samples, seed)

    assert np.isfinite(diagnose(Fit(), 100, seed=0, vectorize_particles=False).elbo)
    diagnose(Taking(), 100, seed=0, vectorize_particles=False)
    diagnose(Taking(), 100, seed=0)
    assert Taking.seen == [False, None]
    with pytest.raises(ValueError, match="vectorize_particles"):
        diagnose(Fit(), 100, vectorize_particles="sometimes")
