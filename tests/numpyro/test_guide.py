"""`AutoFlowGuide`: NumPyro's autoguide API, the initial location and scale, weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.infer.initialization import init_to_value

from flowguides.numpyro import AutoFlowGuide, LaplaceFallbackWarning
from flowguides.spec import FlowSpec

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[4], dtype="float64")


def model(y=None):
    loc = numpyro.sample("loc", dist.Normal(jnp.zeros(2), 2.0).to_event(1))
    scale = numpyro.sample("scale", dist.HalfNormal(1.0))
    with numpyro.plate("n", 6):
        numpyro.sample("y", dist.Normal(loc[0] + loc[1], scale), obs=y)


Y = np.linspace(-1.0, 2.0, 6)


def test_a_fresh_guide_is_autodiagonalnormal():
    init = init_to_value(values={"loc": jnp.array([0.5, -1.0]), "scale": 2.0})
    key = jax.random.key(0)
    # planar layers start as the exact identity (RealNVP's start permutes the base noise)
    ours = AutoFlowGuide(model, FlowSpec.planar(2, dtype="float64"), init_loc_fn=init)
    theirs = AutoDiagonalNormal(model, init_loc_fn=init)
    svi_ours = SVI(model, ours, optax.adam(1e-3), Trace_ELBO())
    svi_theirs = SVI(model, theirs, optax.adam(1e-3), Trace_ELBO())
    p_ours = svi_ours.get_params(svi_ours.init(key, Y))
    p_theirs = svi_theirs.get_params(svi_theirs.init(key, Y))
    np.testing.assert_allclose(p_ours["auto_affine.loc"], [0.5, -1.0, np.log(2.0)], rtol=1e-12)
    np.testing.assert_allclose(p_ours["auto_affine.loc"], p_theirs["auto_loc"], rtol=1e-12)
    np.testing.assert_allclose(np.exp(p_ours["auto_affine.log_scale"]), 0.1, rtol=1e-12)
    np.testing.assert_allclose(p_theirs["auto_scale"], 0.1, rtol=1e-12)
    # identity layers: the same key gives exactly AutoDiagonalNormal's draws
    draws = ours.sample_posterior(jax.random.key(1), p_ours, Y, sample_shape=(4,))
    expected = theirs.sample_posterior(jax.random.key(1), p_theirs, Y, sample_shape=(4,))
    for name in ("loc", "scale"):
        np.testing.assert_allclose(draws[name], expected[name], rtol=1e-10)


def test_guide_works_with_svi_run_predictive_median_quantiles_and_posterior():
    guide = AutoFlowGuide(model, SPEC)
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO(num_particles=4, vectorize_particles=True))
    result = svi.run(jax.random.key(0), 30, Y, progress_bar=False)
    assert result.losses.shape == (30,) and np.all(np.isfinite(result.losses))
    params = result.params
    assert sorted(guide.get_weights(params)) == sorted(SPEC.parameter_shapes(3))
    predictive = Predictive(model, guide=guide, params=params, num_samples=7)
    assert predictive(jax.random.key(1))["y"].shape == (7, 6)
    draws = Predictive(guide, params=params, num_samples=7)(jax.random.key(1), Y)
    assert draws["loc"].shape == (7, 2) and np.all(draws["scale"] > 0)
    median = guide.median(params)
    q = guide.quantiles(params, [0.1, 0.5, 0.9])
    assert median["loc"].shape == (2,) and q["loc"].shape == (3, 2) and q["scale"].shape == (3,)
    np.testing.assert_allclose(q["loc"][1], median["loc"])
    assert np.all(np.diff(np.asarray(q["loc"]), axis=0) > 0) and float(median["scale"]) > 0
    posterior = guide.get_posterior(params)
    z = posterior.sample(jax.random.key(2), (5,))
    np.testing.assert_allclose(
        posterior.log_prob(z), guide.get_flow(params).log_prob(z), rtol=1e-10
    )
    np.testing.assert_allclose(
        guide.get_transform(params)(jnp.zeros(3)), posterior.transforms[0](jnp.zeros(3))
    )


def test_set_weights_warm_starts_the_next_init():
    guide = AutoFlowGuide(model, SPEC)
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    with pytest.raises(RuntimeError, match="run the guide once"):
        guide.get_weights()
    svi.init(jax.random.key(0), Y)
    weights = {k: v + 0.25 for k, v in guide.get_weights().items()}
    assert guide.set_weights(weights) is guide  # chains, as in Pyro
    initial = guide.initial_params()
    assert sorted(initial) == sorted(f"auto_{name}" for name in weights)
    params = svi.get_params(svi.init(jax.random.key(1), Y))
    for name, value in guide.get_weights(params).items():
        np.testing.assert_allclose(value, weights[name], rtol=1e-12)
        np.testing.assert_allclose(initial[f"auto_{name}"], weights[name], rtol=1e-12)
    with pytest.raises(ValueError, match="'affine.loc': expected shape \\(3,\\), got \\(2,\\)"):
        guide.set_weights({**weights, "affine.loc": np.zeros(2)})


def badly_scaled():
    numpyro.sample("tiny", dist.Normal(0.3, 1e-3))
    numpyro.sample("huge", dist.Normal(-50.0, 100.0))


def flat_at_the_mode():
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.factor("cancel", z**2 / 2)  # a flat log joint in z: zero curvature
    numpyro.sample("w", dist.Normal(1.0, 2.0))


def test_laplace_init_scale_recovers_the_scales_and_warns_where_it_cannot():
    spec = FlowSpec.planar(num_layers=1, dtype="float64")
    guide = AutoFlowGuide(badly_scaled, spec, init_scale="laplace")
    SVI(badly_scaled, guide, optax.adam(1e-3), Trace_ELBO()).init(jax.random.key(0))
    fixed = guide.preconditioner
    np.testing.assert_allclose(fixed["precondition.shift"], [0.3, -50.0], rtol=1e-6)
    np.testing.assert_allclose(fixed["precondition.scale_tril"], np.diag([1e-3, 100.0]), rtol=1e-6)
    w = guide.get_weights()  # the affine and layers start as the identity on whitened values
    np.testing.assert_array_equal(w["affine.loc"], 0.0)
    np.testing.assert_array_equal(w["affine.log_scale"], 0.0)
    guide = AutoFlowGuide(flat_at_the_mode, spec, init_scale="laplace")
    with pytest.warns(
        LaplaceFallbackWarning, match=r"Hessian diagonal is not positive for sites \['z'\]"
    ):
        SVI(flat_at_the_mode, guide, optax.adam(1e-3), Trace_ELBO()).init(jax.random.key(0))
    # not positive definite: the diagonal whitening, held as a (dim,) vector
    np.testing.assert_allclose(
        guide.preconditioner["precondition.scale_tril"], [0.1, 2.0], rtol=1e-5
    )
    fixed = {k: np.asarray(v) * 2.0 for k, v in guide.preconditioner.items()}
    assert guide.set_preconditioner(fixed) is guide  # chains, as in Pyro
    np.testing.assert_allclose(guide.initial_params()["auto_precondition.scale_tril"], [0.2, 4.0])
    assert guide.set_preconditioner(None) is guide and guide.preconditioner is None


def correlated(x, y):
    a = numpyro.sample("a", dist.Normal(0.0, 100.0))
    b = numpyro.sample("b", dist.Normal(0.0, 100.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)


def test_laplace_start_is_the_exact_posterior_of_a_correlated_gaussian():
    # a regression on a raw covariate (mean 500): intercept and slope correlate strongly; the
    # posterior is Gaussian, so a fresh guide with the full-rank Laplace start is exact
    rng = np.random.default_rng(0)
    x = 500.0 + 100.0 * rng.standard_normal(50)
    y = 3.0 + 0.02 * x + rng.standard_normal(50)
    spec = FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64")
    guide = AutoFlowGuide(correlated, spec, init_scale="auto")
    svi = SVI(correlated, guide, optax.adam(1e-3), Trace_ELBO())
    state = svi.init(jax.random.key(0), x, y)
    design = np.stack([np.ones_like(x), x], axis=1)
    precision = design.T @ design + np.eye(2) / 100.0**2
    cov = np.linalg.inv(precision)
    mean = cov @ design.T @ y
    assert cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]) < -0.95
    draws = guide.sample_posterior(jax.random.key(1), svi.get_params(state), sample_shape=(20000,))
    z = np.stack([draws["a"], draws["b"]], axis=1)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(z.mean(0) - mean) / sd < 0.03)  # Monte Carlo error ~0.007 sd
    np.testing.assert_allclose(np.cov(z.T), cov, rtol=0.05)
    # its density is the Gaussian's: check log q at the draws against the closed form
    flow = guide.get_flow(svi.get_params(state))
    log_q = np.asarray(flow.log_prob(z[:5]))
    expected = jax.scipy.stats.multivariate_normal.logpdf(z[:5], mean, cov)
    np.testing.assert_allclose(log_q, expected, rtol=1e-6)


def eight_schools_centred():
    y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", 8):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, 10.0), obs=y)


def test_laplace_refuses_a_funnel_and_auto_takes_laplace_only_where_it_has_a_mode():
    # the centred hierarchy's joint density grows without bound as tau -> 0: no mode
    spec = FlowSpec.planar(num_layers=1, dtype="float64")
    guide = AutoFlowGuide(eight_schools_centred, spec, init_scale="laplace")
    svi = SVI(eight_schools_centred, guide, optax.adam(1e-3), Trace_ELBO())
    with pytest.warns(LaplaceFallbackWarning, match=r"found no mode .*along sites \[.*'tau'"):
        svi.init(jax.random.key(0))
    np.testing.assert_allclose(np.exp(guide.get_weights()["affine.log_scale"]), 0.1)
    # "auto" keeps the Laplace start of a badly scaled posterior that has a mode
    guide = AutoFlowGuide(badly_scaled, spec, init_scale="auto")
    SVI(badly_scaled, guide, optax.adam(1e-3), Trace_ELBO()).init(jax.random.key(0))
    np.testing.assert_allclose(
        guide.preconditioner["precondition.scale_tril"], np.diag([1e-3, 100.0]), rtol=1e-6
    )


def funnel():
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(4), jnp.exp(v / 2)).to_event(1))


def test_auto_start_takes_the_wide_start_on_a_funnel_without_a_mode():
    # the MAP runs down the neck (no mode): the 1.0 start has a far higher ELBO than 0.1
    guide = AutoFlowGuide(funnel, FlowSpec.planar(num_layers=1, dtype="float64"), init_scale="auto")
    SVI(funnel, guide, optax.adam(1e-3), Trace_ELBO()).init(jax.random.key(0))
    weights = guide.get_weights()
    np.testing.assert_allclose(np.exp(weights["affine.log_scale"]), 1.0)


def test_guide_rejects_bad_settings():
    for bad in (-1.0, float("inf"), True, "wide"):  # the checks Pyro's guide runs too
        with pytest.raises(
            ValueError, match="init_scale: expected a positive number, 'laplace' or 'auto'"
        ):
            AutoFlowGuide(model, SPEC, init_scale=bad)
    with pytest.raises(ValueError, match="base: AutoFlowGuide needs base='affine'"):
        AutoFlowGuide(model, FlowSpec.planar(2, base="normal"))
