"""`fit_posterior`'s objectives and gradients: STL, IW-ELBO (and DReG), against closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import RenyiELBO, Trace_ELBO

from flowguides.numpyro import AutoFlowGuide, ObjectiveLoss, fit_posterior
from flowguides.spec import FlowSpec, SpecError

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64")

_rng = np.random.default_rng(0)
X = _rng.normal(size=(15, 2))
Y = X @ np.array([1.0, -0.5]) + _rng.normal(size=15)
COV = np.linalg.inv(np.eye(2) + X.T @ X)
MEAN = COV @ X.T @ Y


def regression(x, y):
    """Conjugate linear regression: the posterior is Gaussian, ``N(MEAN, COV)``."""
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(x @ beta, 1.0), obs=y)


def funnel():
    """Neal's funnel in 2-D: far from Gaussian."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))


def _guide(model, *args, init_scale="laplace"):
    guide = AutoFlowGuide(model, SPEC, init_scale=init_scale)
    with handlers.seed(rng_seed=0):
        guide._setup_prototype(*args)
    return guide


def _optimum():
    """A guide equal to the closed-form posterior: whitening by its mean and Cholesky factor,
    identity affine and layers."""
    guide = _guide(regression, X, Y)
    fixed = {"shift": MEAN, "scale_tril": np.linalg.cholesky(COV)}
    return guide.set_preconditioner({f"precondition.{k}": v for k, v in fixed.items()})


def _gradients(loss, model, guide, *args):
    """``seed -> (loss, flattened gradient)`` at the guide's initial parameters (one compile)."""

    @jax.jit
    def value_and_grad(params, key):
        return jax.value_and_grad(lambda p: loss.loss(key, p, model, guide, *args))(params)

    def at(seed: int) -> tuple[float, jax.Array]:
        out, grads = value_and_grad(guide.initial_params(), jax.random.key(seed))
        return float(out), jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)])

    return at


def _gradient(loss, model, guide, seed, *args):
    return _gradients(loss, model, guide, *args)(seed)


def test_stl_gradient_is_zero_for_every_draw_at_the_optimum():
    guide = _optimum()
    reparam = Trace_ELBO(num_particles=2)  # splits its key as ObjectiveLoss does (not 1)
    stl = ObjectiveLoss("elbo", "stl", 2, 1)
    dreg = ObjectiveLoss("iwelbo", "stl", 1, 4)
    stl, reparam, dreg = (_gradients(f, regression, guide, X, Y) for f in (stl, reparam, dreg))
    for seed in range(5):
        value, g_stl = stl(seed)
        expected, g_reparam = reparam(seed)
        assert value == pytest.approx(expected, abs=1e-9)  # same draws, same loss value
        assert float(jnp.max(jnp.abs(g_stl))) < 1e-8
        assert float(jnp.max(jnp.abs(g_reparam))) > 1e-2  # the score term: nonzero per draw
        assert float(jnp.max(jnp.abs(dreg(seed)[1]))) < 1e-8


def test_stl_gradient_is_nonzero_away_from_the_optimum():
    guide = _guide(regression, X, Y, init_scale=1.0)
    _, grad = _gradient(ObjectiveLoss("elbo", "stl", 1, 1), regression, guide, 0, X, Y)
    assert float(jnp.max(jnp.abs(grad))) > 1e-2


def test_reparam_gradient_is_unbiased_at_the_optimum():
    guide = _optimum()
    _, single = _gradient(Trace_ELBO(num_particles=1), regression, guide, 1, X, Y)
    _, mean = _gradient(Trace_ELBO(num_particles=4096), regression, guide, 0, X, Y)
    assert float(jnp.max(jnp.abs(mean))) < 0.1 * float(jnp.max(jnp.abs(single)))


def test_iwelbo_with_one_inner_draw_equals_the_elbo():
    guide = _guide(funnel, init_scale=1.0)
    value, g_iw = _gradient(ObjectiveLoss("iwelbo", "reparam", 6, 1), funnel, guide, 3)
    expected, g_elbo = _gradient(Trace_ELBO(num_particles=6), funnel, guide, 3)
    assert value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(g_iw, g_elbo, rtol=1e-10, atol=1e-12)


def test_iwelbo_is_above_the_elbo_on_a_non_gaussian_posterior():
    guide = _guide(funnel, init_scale=1.0)
    loss = ObjectiveLoss("iwelbo", "reparam", 512, 8)
    weights = jax.jit(lambda key, p: loss.log_weights(key, p, funnel, guide)[0])
    log_w = weights(jax.random.key(0), guide.initial_params())
    elbo = float(jnp.mean(log_w))
    iwelbo = float(jnp.mean(jax.nn.logsumexp(log_w, -1) - jnp.log(8)))
    assert iwelbo > elbo + 0.05
    # the same bound as NumPyro's RenyiELBO(alpha=0) (its own keys, so in expectation)
    renyi = RenyiELBO(alpha=0, num_particles=8)
    keys = jax.random.split(jax.random.key(1), 512)
    params = guide.initial_params()
    theirs = jax.jit(jax.vmap(lambda k: renyi.loss(k, params, funnel, guide)))(keys)
    assert -float(jnp.mean(theirs)) == pytest.approx(iwelbo, abs=0.1)


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
        loc = numpyro.param("loc", jnp.zeros(2))
        numpyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    with pytest.raises(ValueError, match="trains the guide only"):
        fit_posterior(model, SPEC, num_steps=2, progress=False, objective="iwelbo",
                      gradient="stl", num_inner=2, init_scale=1.0)  # fmt: skip
