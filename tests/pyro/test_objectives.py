"""`fit_posterior`'s objectives and gradients: STL, IW-ELBO (and DReG), against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from flowguides.pyro import AutoFlowGuide, ObjectiveLoss, fit_posterior
from flowguides.spec import FlowSpec, SpecError

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64")

_rng = np.random.default_rng(0)
X = torch.tensor(_rng.normal(size=(15, 2)))
Y = X @ torch.tensor([1.0, -0.5], dtype=torch.float64) + torch.tensor(_rng.normal(size=15))
COV = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + X.T @ X)
MEAN = COV @ X.T @ Y


def regression(x: torch.Tensor, y: torch.Tensor) -> None:
    """Conjugate linear regression: the posterior is Gaussian, so a Laplace start is exact."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), 1.0), obs=y)


def funnel() -> None:
    """Neal's funnel in 2-D: far from Gaussian."""
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 3.0))
    pyro.sample("x", dist.Normal(torch.zeros((), dtype=torch.float64), torch.exp(v / 2)))


def _guide(model, *args, init_scale="laplace"):
    guide = AutoFlowGuide(model, SPEC, init_scale=init_scale)
    guide._setup_if_needed(*args)
    return guide


def _loss(guide, objective, gradient, num_particles=1, num_inner=1):
    options = {"vectorize_particles": True, "max_plate_nesting": guide.max_plate_nesting}
    return ObjectiveLoss(guide.flow, objective, gradient, num_particles, num_inner, **options)


def _gradient(loss, model, guide, seed, *args):
    pyro.set_rng_seed(seed)
    params = list(guide.parameters())
    value = loss.differentiable_loss(model, guide, *args)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
    return float(value.detach()), flat


def _optimum():
    """A guide equal to the closed-form posterior: whitening by its mean and Cholesky factor,
    identity affine and layers."""
    guide = _guide(regression, X, Y)
    fixed = {"shift": MEAN, "scale_tril": torch.linalg.cholesky(COV)}
    return guide.set_preconditioner({f"precondition.{k}": v for k, v in fixed.items()})


def test_stl_gradient_is_zero_for_every_draw_at_the_optimum():
    guide = _optimum()
    reparam = Trace_ELBO(num_particles=1, vectorize_particles=True, max_plate_nesting=1)
    stl, dreg = _loss(guide, "elbo", "stl"), _loss(guide, "iwelbo", "stl", 1, 4)
    for seed in range(5):
        value, g_stl = _gradient(stl, regression, guide, seed, X, Y)
        expected, g_reparam = _gradient(reparam, regression, guide, seed, X, Y)
        assert value == pytest.approx(expected, abs=1e-9)  # same draw, same loss value
        assert float(g_stl.abs().max()) < 1e-8
        assert float(g_reparam.abs().max()) > 1e-2  # the score term: nonzero per draw
        assert float(_gradient(dreg, regression, guide, seed, X, Y)[1].abs().max()) < 1e-8


def test_stl_gradient_is_nonzero_away_from_the_optimum():
    guide = _guide(regression, X, Y, init_scale=1.0)
    _, grad = _gradient(_loss(guide, "elbo", "stl"), regression, guide, 0, X, Y)
    assert float(grad.abs().max()) > 1e-2


def test_reparam_gradient_is_unbiased_at_the_optimum():
    guide = _optimum()
    reparam = Trace_ELBO(num_particles=4096, vectorize_particles=True, max_plate_nesting=1)
    _, single = _gradient(
        Trace_ELBO(num_particles=1, vectorize_particles=True, max_plate_nesting=1),
        regression, guide, 1, X, Y,
    )  # fmt: skip
    _, mean = _gradient(reparam, regression, guide, 0, X, Y)
    assert float(mean.abs().max()) < 0.1 * float(single.abs().max())


def test_iwelbo_with_one_inner_draw_equals_the_elbo():
    guide = _guide(funnel, init_scale=1.0)
    iw = _loss(guide, "iwelbo", "reparam", num_particles=6, num_inner=1)
    elbo = Trace_ELBO(num_particles=6, vectorize_particles=True, max_plate_nesting=0)
    value, g_iw = _gradient(iw, funnel, guide, 3)
    expected, g_elbo = _gradient(elbo, funnel, guide, 3)
    assert value == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(g_iw, g_elbo)


def test_iwelbo_matches_pyros_renyi_elbo_at_alpha_zero():
    guide = _guide(funnel, init_scale=1.0)
    iw = _loss(guide, "iwelbo", "reparam", num_particles=1, num_inner=8)
    renyi = RenyiELBO(alpha=0, num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    value, _ = _gradient(iw, funnel, guide, 4)
    pyro.set_rng_seed(4)
    assert value == pytest.approx(renyi.loss(funnel, guide), rel=1e-10)


def test_iwelbo_is_above_the_elbo_on_a_non_gaussian_posterior():
    guide = _guide(funnel, init_scale=1.0)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        log_w, _ = _loss(guide, "iwelbo", "reparam", 512, 8).log_weights(funnel, guide)
    elbo = float(log_w.mean())
    iwelbo = float((torch.logsumexp(log_w, -1) - math.log(8)).mean())
    assert iwelbo > elbo + 0.05


@pytest.mark.parametrize(
    ("objective", "gradient", "num_inner"),
    [("elbo", "stl", 1), ("iwelbo", "reparam", 4), ("iwelbo", "stl", 4)],
)
def test_a_short_fit_improves_over_its_start(objective, gradient, num_inner):
    fit = fit_posterior(
        funnel, SPEC, num_steps=150, num_particles=4, init_scale=1.0, seed=0, progress=False,
        objective=objective, gradient=gradient, num_inner=num_inner,
    )  # fmt: skip
    assert fit.losses[-15:].mean() < fit.losses[:15].mean() - 0.1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"objective": "iwae"}, r"objective: expected one of \['elbo', 'iwelbo'\], got 'iwae'"),
        ({"gradient": "dreg"}, r"gradient: expected one of \['reparam', 'stl'\], got 'dreg'"),
        ({"objective": "iwelbo", "num_inner": 0}, "num_inner: expected a positive integer"),
        ({"num_inner": 4}, "num_inner: only objective='iwelbo' uses it"),
    ],
)
def test_bad_options_name_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        fit_posterior(funnel, SPEC, num_steps=2, progress=False, **options)


def test_neural_ode_flows_keep_the_default_objective():
    spec = FlowSpec.neural_ode(hidden=[4], solver="rk4", num_steps=2, dtype="float64")
    with pytest.raises(SpecError, match="neural_ode layers train with 'elbo' and 'reparam'"):
        fit_posterior(funnel, spec, num_steps=2, progress=False, gradient="stl")


def test_dreg_refuses_a_model_with_its_own_parameters():
    def model():
        loc = pyro.param("loc", torch.tensor(0.0, dtype=torch.float64))
        pyro.sample("z", dist.Normal(loc, torch.ones(2, dtype=torch.float64)).to_event(1))

    with pytest.raises(ValueError, match="trains the guide only"):
        fit_posterior(model, SPEC, num_steps=2, progress=False, objective="iwelbo",
                      gradient="stl", num_inner=2)  # fmt: skip
