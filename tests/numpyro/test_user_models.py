"""Models written the way NumPyro users write them: data values used in Python, data read from
globals and closures, and the guards around training (non-finite gradients and validation)."""

from __future__ import annotations

import types
import warnings

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from flowguides.core import split_indices
from flowguides.numpyro import (
    ConstantArgumentsWarning,
    ModelTracingError,
    NonFiniteGradientError,
    NonFiniteValidationError,
    build_flow,
    fit_density,
    fit_posterior,
)
from flowguides.numpyro import posterior as posterior_module

SPEC = {"layers": [{"type": "planar"}], "dtype": "float64"}
FAST = {"num_steps": 300, "learning_rate": 0.05, "progress": False}


def multinomial(counts):
    p = numpyro.sample("p", dist.Dirichlet(jnp.ones(3)))
    numpyro.sample("obs", dist.Multinomial(total_count=int(counts.sum()), probs=p), obs=counts)


def loop(y, T):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    for t in range(int(T)):
        numpyro.sample(f"y_{t}", dist.Normal(mu, 1.0), obs=y[t])


def branch(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    if y.max() > 0:  # observed only when some value is positive
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _mean(fit, site: str) -> float:
    return float(fit.sample(4000, seed=1)[site].mean())


def test_models_that_use_data_values_in_python_fit_with_constant_arguments():
    counts = np.array([30, 50, 20])
    with pytest.warns(ConstantArgumentsWarning, match=r"'multinomial'.*\['counts'\]") as seen:
        fit = fit_posterior(multinomial, SPEC, counts, **FAST)  # the Laplace start runs too
    assert len([w for w in seen if w.category is ConstantArgumentsWarning]) == 1
    exact = (1 + counts) / (3 + counts.sum())  # the Dirichlet(1 + counts) posterior mean
    np.testing.assert_allclose(fit.sample(4000, seed=1)["p"].mean(0), exact, atol=0.02)

    y = np.array([1.0, 2.0, 3.0, 2.0])  # conjugate: mu | y ~ N(sum y / (T + 1), ...)
    with pytest.warns(ConstantArgumentsWarning, match=r"\['T', 'y'\]"):
        fit = fit_posterior(loop, SPEC, y, np.array(4), init_scale=0.1, **FAST)
    assert set(fit.observed_data()) == {f"y_{t}" for t in range(4)}
    assert abs(_mean(fit, "mu") - y.sum() / 5) < 0.05
    # the paths after training take the constant arguments too
    _, log_p, log_q = fit.log_densities(50, seed=0)
    assert np.all(np.isfinite(log_p - log_q))
    assert fit.log_likelihood(fit.sample(5, seed=0))["y_3"].shape == (5,)


def test_static_argnames_says_so_up_front_and_compiles_once_per_data_set():
    settings = {**FAST, "init_scale": 0.1, "static_argnames": ["y"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantArgumentsWarning)
        seen_data = fit_posterior(branch, SPEC, np.full(6, 3.0), **settings)
        traces = posterior_module._TRACES["posterior"]
        again = fit_posterior(branch, SPEC, np.full(6, 3.0), **settings)
        assert posterior_module._TRACES["posterior"] == traces  # the same data: reused
        no_data = fit_posterior(branch, SPEC, np.full(6, -3.0), **settings)
        assert posterior_module._TRACES["posterior"] == traces + 1  # new data: compiled anew
    assert abs(_mean(seen_data, "mu") - 18.0 / 7) < 0.05
    assert abs(_mean(again, "mu") - 18.0 / 7) < 0.05
    assert abs(_mean(no_data, "mu")) < 0.05  # the prior: the branch was not taken
    with pytest.raises(ValueError, match=r"static_argnames: \['x'\] are not arguments"):
        fit_posterior(branch, SPEC, np.ones(6), static_argnames=["x"])


def latent_in_python():
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    if z > 0:  # a latent value in Python: no traced fit can run this
        numpyro.sample("x", dist.Normal(z, 1.0), obs=1.0)


def test_a_latent_value_used_in_python_is_a_clear_error_not_a_tracer_error():
    with pytest.raises(ModelTracingError, match="'latent_in_python'.*latent site's value"):
        fit_posterior(latent_in_python, SPEC, num_steps=5, progress=False)


Y_GLOBAL = np.zeros(5)


def test_a_refit_after_the_data_changes_fits_the_new_data():
    offset = 0.0

    def reads_a_global_and_a_closure():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", 5):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=Y_GLOBAL + offset)

    def posterior_mean() -> float:  # exact: N(sum y / 6, 1 / 6), sd 0.41; the data move it 8
        fit = fit_posterior(reads_a_global_and_a_closure, SPEC, init_scale=0.1, **FAST)
        return _mean(fit, "mu")

    assert abs(posterior_mean()) < 0.5
    Y_GLOBAL[:] = 10.0  # in place: the same array object, new contents
    try:
        assert abs(posterior_mean() - 50.0 / 6) < 0.5
        offset = -20.0  # rebinds the closure cell of the same function
        assert abs(posterior_mean() + 50.0 / 6) < 0.5
        traces = posterior_module._TRACES["posterior"]
        assert abs(posterior_mean() + 50.0 / 6) < 0.5
        assert posterior_module._TRACES["posterior"] == traces  # unchanged data: compile reused
    finally:
        Y_GLOBAL[:] = 0.0


def test_a_refit_after_a_setting_in_the_users_module_or_class_changes_fits_the_new_setting():
    """A compiled program bakes in what the model reads from the user's own module
    (``config.SHIFT``) or class (``Settings.SHIFT``): the cache keys on those values too."""
    config = types.ModuleType("user_config")  # as `import user_config as config`
    config.SHIFT = 0.0

    class Settings:
        SHIFT = 0.0

    def model():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", 5):
            numpyro.sample("y", dist.Normal(mu + config.SHIFT + Settings.SHIFT, 1.0), obs=Y_GLOBAL)

    def posterior_mean() -> float:  # exact: N(-5 shift / 6, 1 / 6), sd 0.41
        return _mean(fit_posterior(model, SPEC, init_scale=0.1, **FAST), "mu")

    assert abs(posterior_mean()) < 0.5
    config.SHIFT = 10.0
    assert abs(posterior_mean() + 50.0 / 6) < 0.5
    config.SHIFT, Settings.SHIFT = 0.0, -10.0
    assert abs(posterior_mean() - 50.0 / 6) < 0.5
    traces = posterior_module._TRACES["posterior"]
    assert abs(posterior_mean() - 50.0 / 6) < 0.5
    assert posterior_module._TRACES["posterior"] == traces  # unchanged settings: compile reused


def test_a_latent_site_inside_cond_is_fitted_at_the_guides_values():
    """`numpyro.contrib.control_flow.cond` substitutes but does not replay inside its
    branches: the ELBO and the log densities must still score the guide's value there, not a
    prior draw of the model's own (which fitted mu's sd at 0.01 instead of 0.31)."""
    from numpyro.contrib.control_flow import cond

    def model(y, tight):
        mu = cond(tight, lambda _: numpyro.sample("mu", dist.Normal(0.0, 2.0)),
                  lambda _: numpyro.sample("mu", dist.Normal(0.0, 5.0)), None)  # fmt: skip
        numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = jnp.asarray(np.random.default_rng(0).normal(1.0, 1.0, 10))
    fit = fit_posterior(model, SPEC, y, True, num_steps=600, progress=False)
    mu = fit.sample(4000, seed=0)["mu"]
    precision = 1 / 4 + 10  # exact: N(sum y / precision, 1 / precision)
    assert abs(mu.mean() - float(y.sum()) / precision) < 0.05
    assert abs(mu.std() - precision**-0.5) < 0.05
    _, log_p, log_q = fit.log_densities(500, seed=1)
    assert np.std(log_p - log_q) < 0.2  # scored at the guide's draws: near-constant weights


def nan_gradient_above_two():
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    # finite everywhere; above z = 2 its gradient is inf * 0 = NaN (sqrt at 0, times 0)
    numpyro.factor("kink", 0.01 * jnp.sqrt(jnp.maximum(2.0 - z, 0.0)))


def test_a_nan_gradient_with_a_finite_loss_stops_with_finite_parameters():
    with pytest.raises(NonFiniteGradientError, match="gradient became NaN") as info:
        fit_posterior(nan_gradient_above_two, SPEC, num_steps=500, init_scale=1.0, progress=False)
    err = info.value
    losses = err.fit.losses
    assert np.all(np.isfinite(losses[: err.step + 1]))  # the loss itself stayed finite
    assert all(np.all(np.isfinite(np.asarray(v))) for v in err.fit.params.values())


def test_fit_density_validates_at_the_first_and_last_step_and_refuses_no_finite_one():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(200, 2)) * [1.0, 3.0] + [0.0, 5.0]
    spec = {"layers": [{"type": "realnvp", "hidden": [8]}], "dtype": "float64"}
    settings = {"num_steps": 10, "learning_rate": 1e-2, "progress": False}
    fit = fit_density(data, spec, **settings)
    assert len(fit.losses["val"]) == 2  # after steps 0 and 9
    start = build_flow(spec, 2, seed=0)
    moved = [not np.allclose(fit.flow.params[k], v) for k, v in start.params.items()]
    assert any(moved)  # trained, not the initial flow
    # a held-out row whose log-density overflows: no validation loss is finite
    bad = data.copy()
    val_rows = split_indices(len(bad), 0.1, 0)[1]
    bad[val_rows[0]] = 1e200
    with pytest.raises(NonFiniteValidationError, match="validation loss was not finite"):
        fit_density(bad, spec, standardize=False, **settings)  # the same compiled chunk


_exp = jnp.exp  # a library callable object under a user's own name


def test_a_model_calling_a_jax_function_through_its_own_alias_fits_and_caches():
    """``exp = jnp.exp`` then ``exp(v / 2)``: the cache key follows the alias (a callable
    object whose ``__call__`` is a C-level slot) without recursing, and a second fit of the
    same model reuses the compiled program."""

    def funnel():
        v = numpyro.sample("v", dist.Normal(0.0, 3.0))
        with numpyro.plate("d", 2):
            numpyro.sample("x", dist.Normal(0.0, _exp(v / 2)))

    fit = fit_posterior(funnel, SPEC, num_steps=20, progress=False)
    traces = dict(posterior_module._TRACES)
    again = fit_posterior(funnel, SPEC, num_steps=20, progress=False)
    assert dict(posterior_module._TRACES) == traces
    assert np.isfinite(fit.losses).all() and np.isfinite(again.losses).all()


def test_a_minibatch_model_draws_fast_unbiased_indices_and_fits_the_full_posterior():
    """A plate with ``subsample_size``: training draws indices with replacement where the
    plate is at least `WITH_REPLACEMENT_RATIO` times the batch, a uniform subset without
    replacement below; the fit matches the closed-form full-data posterior."""
    from numpyro import handlers

    from flowguides.core import WITH_REPLACEMENT_RATIO
    from flowguides.numpyro._stream import training_model

    y = jnp.asarray(np.random.default_rng(3).normal(1.5, 1.0, size=2000))

    def model(y, batch):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("data", y.shape[0], subsample_size=batch) as idx:
            numpyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])

    for batch in (20, 1000):
        trace = handlers.trace(handlers.seed(training_model(model, True), 0)).get_trace(y, batch)
        idx = np.asarray(trace["data"]["value"])
        assert idx.shape == (batch,) and idx.min() >= 0 and idx.max() < 2000
        assert trace["obs"]["scale"] == pytest.approx(2000 / batch)
        if 2000 < WITH_REPLACEMENT_RATIO * batch:  # the subset: no index twice
            assert len(set(idx.tolist())) == batch
    fit = fit_posterior(model, SPEC, y, 20, num_steps=1500, seed=0, progress=False)
    draws = np.asarray(fit.sample(4000, seed=1)["mu"])
    precision = 2000 + 1 / 100
    mean, sd = float(y.sum()) / precision, precision**-0.5
    assert abs(draws.mean() - mean) < 0.5 * sd
    assert 0.7 < draws.std() / sd < 1.3


def test_a_models_own_constrained_param_is_read_at_its_fitted_value_after_the_fit():
    """A model with its own ``numpyro.param`` (constrained positive, pinned near 2 by an
    observation): its deterministic sites, log-likelihood and NUTS runs read the fitted value,
    once constrained, as ``Predictive(params=fit.params)`` does (NumPyro's own replay
    constrained it twice: e^2 in the deterministic site; ArviZ's groups read the initial 1.0)."""
    import jax
    from numpyro.distributions import constraints

    y = jnp.asarray(np.random.default_rng(0).normal(3.0, 1.0, 50))

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        sd = numpyro.sample("sd", dist.HalfNormal(5.0))
        shift = numpyro.param("shift", 1.0, constraint=constraints.positive)
        numpyro.deterministic("mu_shifted", mu + shift)
        numpyro.sample("y", dist.Normal(mu + shift, sd), obs=y)
        numpyro.sample("shift_prior", dist.Normal(2.0, 0.1), obs=shift)

    fit = fit_posterior(model, {"layers": [{"type": "realnvp", "repeat": 2}]}, y, num_steps=300,
                        progress=False)  # fmt: skip
    shift = float(fit.params["shift"])
    assert abs(shift - 2.0) < 0.2 and fit.model_params == {"shift": fit.params["shift"]}
    draws = fit.sample(500, seed=0)
    np.testing.assert_allclose(draws["mu_shifted"], draws["mu"] + shift, rtol=1e-5, atol=1e-5)
    median = fit.guide.median(fit.params)
    assert set(median) == {"mu", "sd"}
    data = fit.to_arviz(200, seed=1)
    post = {k: np.asarray(data["posterior"][k]).reshape(-1) for k in ("mu", "sd", "mu_shifted")}
    np.testing.assert_allclose(post["mu_shifted"], post["mu"] + shift, rtol=1e-5, atol=1e-5)
    loglik = np.asarray(data["log_likelihood"]["y"]).reshape(-1, 50)
    exact = dist.Normal(post["mu"][:, None] + shift, post["sd"][:, None]).log_prob(y)
    np.testing.assert_allclose(loglik, exact, rtol=1e-4, atol=1e-4)
    predictive = numpyro.infer.Predictive(model, guide=fit.guide, params=fit.params,
                                          num_samples=500)  # fmt: skip
    ref = predictive(jax.random.key(0), y)["mu_shifted"]
    assert abs(float(ref.mean()) - float(draws["mu_shifted"].mean())) < 0.1


def test_a_set_up_error_beside_an_improper_uniform_site_is_the_models_own():
    """The set-up's second look at a failing model (for a clearer message) ran it by sampling
    every site, and `ImproperUniform` cannot sample: a bare ``NotImplementedError('')`` hid
    both the user's shape error and the name of an enumerated discrete site."""
    from numpyro.distributions import constraints

    from flowguides.core import DiscreteLatentError

    y = jnp.asarray(np.r_[np.full(5, -2.0), np.full(5, 2.0)])

    def mixture(y):
        mu = numpyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
        with numpyro.plate("n", len(y)):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2),
                               infer={"enumerate": "parallel"})  # fmt: skip
            numpyro.sample("y", dist.Normal(mu[z], 1.0), obs=y)

    def wrong_plate(y):
        mu = numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), (2,)))
        with numpyro.plate("n", 3):  # y has 10 rows
            numpyro.sample("y", dist.Normal(mu[0], 1.0), obs=y)

    with pytest.raises(DiscreteLatentError, match="site 'z'"):
        fit_posterior(mixture, SPEC, y, **FAST)
    with pytest.raises(ValueError, match=r"Incompatible shapes for broadcasting"):
        fit_posterior(wrong_plate, SPEC, y, **FAST)
