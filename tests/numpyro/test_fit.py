"""`fit_posterior` and `fit_density`: closed-form posteriors, constrained sites, densities,
compile-once, and every bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer.initialization import init_to_value
from numpyro.infer.util import log_density
from scipy.special import betaln, logsumexp
from scipy.stats import multivariate_normal

from flowguides.core import MaxStepsExceededError, NonFiniteLossError
from flowguides.core.timing import FIT_TIMING_KEYS
from flowguides.numpyro import (
    AutoFlowGuide,
    DiscreteLatentError,
    Flow,
    NoLatentSitesError,
    fit_density,
    fit_posterior,
    training_solves,
)
from flowguides.numpyro import posterior as posterior_module
from flowguides.numpyro._control import initial_state
from flowguides.numpyro._training import RecordingELBO
from flowguides.spec import FlowSpec, SpecError

RNG = np.random.default_rng(0)
X = RNG.normal(size=(20, 2))
X[:, 1] += 0.8 * X[:, 0]  # correlated posterior
Y = X @ np.array([1.0, -0.5]) + 0.5 * RNG.normal(size=20)
K = (RNG.uniform(size=30) < 0.3).astype(float)


def conjugate(x, y, k):
    """Conjugate linear regression (sd 0.5, N(0, I) prior) and Beta(2, 2)-Bernoulli."""
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    numpyro.sample("y", dist.Normal(x @ beta, 0.5), obs=y)
    p = numpyro.sample("p", dist.Beta(2.0, 2.0))
    with numpyro.plate("flips", k.shape[0]):
        numpyro.sample("k", dist.Bernoulli(p), obs=k)


def exact(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Posterior mean and covariance of beta, posterior mean of p, and log evidence."""
    cov = np.linalg.inv(np.eye(2) + X.T @ X / 0.25)
    mean = cov @ X.T @ y / 0.25
    s, n = K.sum(), len(K)
    log_z = multivariate_normal(np.zeros(20), 0.25 * np.eye(20) + X @ X.T).logpdf(y)
    log_z += betaln(2 + s, 2 + n - s) - betaln(2, 2)
    return mean, cov, (2 + s) / (4 + n), log_z


SPECS = {
    "planar": FlowSpec.planar(num_layers=4, dtype="float64"),
    "realnvp": FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64"),
    "neural_ode": FlowSpec.neural_ode(hidden=[8], solver="rk4", num_steps=4, dtype="float64"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_closed_form_posteriors(name):
    fit = fit_posterior(conjugate, SPECS[name], X, Y, K, num_steps=1500, progress=False)
    assert fit.backend == "numpyro" and fit.losses.shape == (1500,)
    assert fit.latent_shapes == {"beta": (2,), "p": ()}
    mean, cov, p_mean, log_z = exact(Y)
    draws = fit.sample(20000, seed=1)
    assert draws["beta"].shape == (20000, 2) and draws["p"].shape == (20000,)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(draws["beta"].mean(0) - mean) < 0.05 * sd)
    np.testing.assert_allclose(np.cov(draws["beta"].T), cov, rtol=0.1)
    assert abs(draws["p"].mean() - p_mean) < 0.02
    # log_p - log_q are importance weights: they recover the exact evidence
    _, log_w = fit.importance_sample(4000, seed=2)
    assert abs(logsumexp(log_w) - np.log(len(log_w)) - log_z) < 0.05
    elbo = fit.elbo(4000, seed=2)
    assert log_z - 0.1 < elbo < log_z + 1e-9
    if name != "realnvp":
        return
    # same shapes, new data: the compiled training chunk is reused
    traces = posterior_module._TRACES["posterior"]
    again = fit_posterior(conjugate, SPECS[name], X, Y + 0.3, K, num_steps=1500, progress=False)
    assert posterior_module._TRACES["posterior"] == traces
    assert tuple(again.timing) == FIT_TIMING_KEYS
    assert all(np.isfinite(v) and v >= 0 for v in again.timing.values())
    assert (
        abs(again.sample(20000, seed=1)["beta"].mean(0) - exact(Y + 0.3)[0]).max() < 0.05 * sd.min()
    )
    # same data, another seed: the draws' and densities' programs are shared, the weights not
    other = fit_posterior(conjugate, SPECS[name], X, Y, K, num_steps=1500, seed=1, progress=False)
    log_q_fit = fit.log_densities(4000, seed=2)[2]
    _, log_p, log_q = other.log_densities(4000, seed=2)
    assert other._programs["densities", 4000] is fit._programs["densities", 4000]
    assert not np.allclose(log_q, log_q_fit)
    assert log_z - 0.1 < np.mean(log_p - log_q) < log_z + 1e-9  # its own weights: a good ELBO
    assert np.all(np.abs(other.sample(20000, seed=1)["beta"].mean(0) - mean) < 0.05 * sd)
    loglik = fit.log_likelihood(fit.sample(5, seed=3))
    assert loglik["y"].shape == (5, 20) and loglik["k"].shape == (5, 30)
    np.testing.assert_array_equal(fit.observed_data()["k"], K)


def constrained():
    scale = numpyro.sample("scale", dist.HalfNormal(1.0))
    prob = numpyro.sample("prob", dist.Beta(2.0, 5.0))
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(3)))
    numpyro.sample("obs", dist.Normal(scale * prob + weights[0], 1.0), obs=jnp.array([0.4, 0.9]))


def test_constrained_sites_stay_in_their_support():
    fit = fit_posterior(
        constrained, FlowSpec.planar(4, dtype="float64"), num_steps=100, progress=False
    )
    assert np.all(np.isfinite(fit.losses))
    draws, log_w = fit.importance_sample(500, seed=0)
    assert np.all(np.isfinite(log_w))
    assert np.all(draws["scale"] > 0) and np.all((draws["prob"] > 0) & (draws["prob"] < 1))
    assert draws["weights"].shape == (500, 3) and np.all(draws["weights"] > 0)
    np.testing.assert_allclose(draws["weights"].sum(-1), 1.0, rtol=1e-10)


def test_fit_density_beats_a_gaussian():
    rng = np.random.default_rng(1)
    a = rng.normal(size=1200)
    data = np.stack([a, 0.5 * a**2 + 0.3 * rng.normal(size=1200)], axis=1) * [2.0, 10.0] + 5
    train, test = data[:1000], data[1000:]
    spec = FlowSpec.realnvp(num_layers=4, hidden=[16], dtype="float64")
    fit = fit_density(train, spec, num_steps=1000, learning_rate=5e-3, progress=False)
    gaussian = multivariate_normal(train.mean(0), np.cov(train.T)).logpdf(test).mean()
    assert fit.log_prob(test).shape == (200,)
    assert fit.log_prob(test).mean() > gaussian + 0.3
    assert fit.sample(7, seed=0).shape == (7, 2) and fit.mean.shape == (2,)
    assert fit.history == {}  # no neural-ODE layer
    assert len(fit.losses["train"]) <= 1000 and len(fit.losses["val"]) >= 1
    with pytest.raises(ValueError, match=r"x: expected 2 columns, got shape \(3, 3\)"):
        fit.log_prob(np.zeros((3, 3)))


def test_bad_data_is_named():
    spec = FlowSpec.realnvp(num_layers=1, hidden=[4])
    data = np.zeros((10, 2))
    data[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 row\(s\) hold NaN or inf, rows \[3\]"):
        fit_density(data, spec, progress=False)
    with pytest.raises(
        ValueError, match=r"expected a 2-D array \(n_points, dim\), got shape \(10,\)"
    ):
        fit_density(np.zeros(10), spec, progress=False)
    with pytest.raises(
        SpecError,
        match=r"realnvp layer needs dim >= 2, got dim=1 \(planar and neural_ode layers work in 1 dimension\) \(data has 1",
    ):
        fit_density(np.random.default_rng(0).normal(size=(10, 1)), spec, progress=False)


def discrete():
    n = numpyro.sample("n", dist.Poisson(3.0))
    numpyro.sample("obs", dist.Normal(n, 1.0), obs=2.0)


def coin():  # a discrete site with enumerate support: NumPyro's set-up imports funsor
    c = numpyro.sample("c", dist.Bernoulli(0.5))
    numpyro.sample("obs", dist.Normal(c, 1.0), obs=2.0)


def no_latent():
    numpyro.sample("obs", dist.Normal(0.0, 1.0), obs=2.0)


def one_dimensional():
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("obs", dist.Normal(z, 1.0), obs=2.0)


def test_bad_models_are_named():
    spec = FlowSpec.realnvp(num_layers=1, hidden=[4])
    with pytest.raises(DiscreteLatentError, match="site 'n': a discrete latent site .*enumerat"):
        fit_posterior(discrete, spec, progress=False)
    with pytest.raises(DiscreteLatentError, match="site 'c': a discrete latent site .*enumerat"):
        fit_posterior(coin, spec, progress=False)
    with pytest.raises(NoLatentSitesError, match="no latent sample sites"):
        fit_posterior(no_latent, spec, progress=False)
    with pytest.raises(SpecError, match=r"needs dim >= 2, got dim=1.*sites \['z'\]"):
        fit_posterior(one_dimensional, spec, progress=False)
    with pytest.raises(ValueError, match="num_steps: expected a positive integer, got 0"):
        fit_posterior(one_dimensional, spec, num_steps=0)


def explodes():
    z = numpyro.sample("z", dist.Normal(10.0, 1.0))
    numpyro.factor("cliff", jnp.where(z > 3.0, jnp.nan, 0.0))


def test_non_finite_loss_stops_with_the_last_finite_parameters():
    spec = FlowSpec.planar(num_layers=1, dtype="float64")
    start = init_to_value(values={"z": 0.0})
    with pytest.raises(NonFiniteLossError, match="at step") as info:
        fit_posterior(
            explodes,
            spec,
            num_steps=300,
            learning_rate=0.1,
            init_loc_fn=start,
            init_scale=0.1,
            num_particles=1,
            progress=False,
        )
    err = info.value
    assert 0 < err.step < 300
    losses = err.fit.losses
    assert np.all(np.isfinite(losses[: err.step])) and np.isnan(losses[err.step])
    assert all(np.all(np.isfinite(np.asarray(v))) for v in err.last_good.values())
    assert float(err.fit.params["auto_affine.loc"][0]) < 3.5


def test_rnode_and_steer_train_a_density_and_record_the_history():
    spec = FlowSpec.neural_ode(
        hidden=[8], solver="rk4", num_steps=2, dtype="float64", kinetic_weight=1.0, steer=0.5
    )
    fit = fit_density(X, spec, num_steps=30, batch_size=16, learning_rate=1e-2, progress=False)
    assert set(fit.history) == {"nfe_forward", "nfe_backward", "regularization"}
    np.testing.assert_array_equal(fit.history["nfe_forward"], 8)  # rk4: 4 stages x 2 steps
    np.testing.assert_array_equal(fit.history["nfe_backward"], 8)
    penalty = fit.history["regularization"]
    assert penalty.shape == (30,) and penalty[0] == 0.0 and np.all(penalty[1:] > 0)
    assert np.all(np.isfinite(fit.losses["train"])) and fit.objective == "maximum_likelihood"


def test_the_guide_adds_the_rnode_penalty_only_in_training_solves():
    """A factor in the guide adds to log q: ``+penalty`` makes the negative ELBO grow by it."""
    spec = FlowSpec.neural_ode(
        hidden=[4], solver="euler", num_steps=2, dtype="float64", kinetic_weight=2.0
    )
    guide = AutoFlowGuide(conjugate, spec, init_scale=0.5)
    handlers.seed(guide, 0)(X, Y, K)  # sets the guide up
    weights = {k: v + 0.3 for k, v in guide.get_weights().items()}
    params = guide.set_weights(weights).initial_params()
    seeded = handlers.substitute(handlers.seed(guide, 1), data=params)

    @jax.jit
    def log_q() -> tuple[jax.Array, jax.Array, jax.Array]:
        plain, trace = log_density(seeded, (X, Y, K), {}, {})
        assert "_auto_rnode_penalty" not in trace  # checked while tracing
        with training_solves():
            trained, trace = log_density(seeded, (X, Y, K), {}, {})
        return plain, trained, trace["_auto_rnode_penalty"]["fn"].log_prob(None)

    # log q (what the negative ELBO adds) grows by exactly the penalty, a positive number
    plain, trained, penalty = log_q()
    assert float(penalty) > 0
    np.testing.assert_allclose(trained - plain, penalty, rtol=1e-10)


def test_a_neural_ode_posterior_fit_records_its_history_without_changing_the_loss():
    spec = FlowSpec.neural_ode(
        hidden=[4], solver="rk4", num_steps=2, kinetic_weight=0.1, dtype="float64"
    )

    def gaussian():
        numpyro.sample("x", dist.Normal(jnp.zeros(2), jnp.array([1.0, 2.0])).to_event(1))

    fit = fit_posterior(
        gaussian, spec, num_steps=30, num_particles=3, init_scale=1.0, progress=False
    )
    assert set(fit.history) == {"nfe_forward", "nfe_backward", "regularization"}
    np.testing.assert_array_equal(fit.history["nfe_forward"], 8)  # rk4: 4 stages x 2 steps
    np.testing.assert_array_equal(fit.history["nfe_backward"], 8)
    penalty = fit.history["regularization"]
    assert penalty.shape == (30,) and penalty[0] == 0.0 and np.all(penalty[1:] > 0)

    # the recording ELBO is Trace_ELBO with vectorised particles plus the records: one step
    # from the same state gives the same loss and parameters
    from numpyro.infer import SVI, Trace_ELBO

    def step(elbo):
        guide = AutoFlowGuide(gaussian, spec, init_scale=1.0)
        with handlers.seed(rng_seed=jax.random.split(jax.random.key(0), 3)[2]):
            guide._setup_prototype()  # as `fit_posterior` sets it up
        svi = SVI(gaussian, guide, optax.adam(1e-2), elbo)
        state = initial_state(svi, guide, jax.random.key(0), (), {})
        update = jax.jit(svi.update)  # traced inside training_solves, once per ELBO
        for _ in range(2):
            with training_solves():
                state, loss = update(state)
        return svi.get_params(state), loss, state.mutable_state

    ours = step(RecordingELBO(3, spec))
    theirs = step(Trace_ELBO(3, vectorize_particles=True))
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-12)
    for name, value in theirs[0].items():
        np.testing.assert_allclose(ours[0][name], value, rtol=1e-12)
    (records,) = ours[2].values()  # the step's history entries, as SVI mutable state
    assert int(records["nfe_forward"]) == 8 and theirs[2] is None


def gaussian_2d():
    numpyro.sample("x", dist.Normal(jnp.zeros(2), jnp.array([1.0, 2.0])).to_event(1))


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
    with pytest.raises(MaxStepsExceededError, match="max_steps=2") as info:
        fit_density(data, spec, num_steps=50, learning_rate=0.05, progress=False)
    assert info.value.__cause__ is not None  # the solver's own error, chained
    with pytest.raises(MaxStepsExceededError, match="max_steps=2"):
        fit_posterior(
            gaussian_2d, spec, num_steps=50, learning_rate=0.05, init_scale=1.0,
            progress=False,
        )  # fmt: skip


def test_a_fitted_flow_out_of_max_steps_raises_max_steps_exceeded():
    data = np.random.default_rng(0).normal(size=(64, 2)) * [1.0, 0.3]
    spec = FlowSpec.neural_ode(hidden=[8], dtype="float64")
    fit = fit_density(data, spec, num_steps=20, learning_rate=0.05, progress=False)
    assert np.all(np.isfinite(fit.log_prob(data[:5])))  # with room, the same flow solves
    few = FlowSpec.neural_ode(hidden=[8], **TIGHT_FEW_STEPS)
    fit.flow, fit.spec = Flow(few, 2, fit.flow.params), few
    with pytest.raises(MaxStepsExceededError, match="max_steps=2"):
        fit.log_prob(data[:5])
    with pytest.raises(MaxStepsExceededError, match="max_steps=2"):
        fit.sample(5, seed=0)
