"""The Taylor control variate of a subsampled model (`fit_posterior`'s ``control_variate``):
unbiased for every latent value, exact where the log joint is quadratic, far less noisy than the
plain minibatch estimate, and a fit that reaches the closed-form posterior."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

from flowguides.core import CONTROL_VARIATE_PREFIX
from flowguides.numpyro import fit_posterior
from flowguides.numpyro._control import with_control_variate
from flowguides.numpyro._stream import full_data, training_model
from flowguides.numpyro.guide import AutoFlowGuide

SPEC = {"layers": [{"type": "realnvp", "hidden": [8]}], "dtype": "float64"}
RNG = np.random.default_rng(0)
Y = jnp.asarray(RNG.normal(1.5, 1.0, size=(2000, 2)))
X = jnp.asarray(RNG.normal(size=(3000, 3)))
LABELS = jnp.asarray(
    (RNG.random(3000) < 1 / (1 + np.exp(-(np.asarray(X) @ [1.0, -0.5, 0.3])))) * 1.0
)


def gaussian_mean(y, batch=20):
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 10.0).to_event(1))
    with numpyro.plate("data", y.shape[0], subsample_size=batch) as idx:
        numpyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=y[idx])


def logistic(x, labels):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = numpyro.sample("s", dist.HalfNormal(1.0))  # a constrained site: its own transform
    with numpyro.plate("data", x.shape[0], subsample_size=50) as idx:
        logits = x[idx, :2] @ w + s * x[idx, 2]
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=labels[idx])


def _set_up(model, *args, control_variate="auto"):
    guide = AutoFlowGuide(model, SPEC, init_scale="auto")
    with handlers.seed(rng_seed=0):
        guide._setup_prototype(*args)
    train = training_model(model, True)
    return (guide, *with_control_variate(control_variate, train, model, guide))


def _estimates(model, wrapped, reference, args, values, num_batches):
    """Per batch (keys 0..n): the control variate's and the plain minibatch estimate of the
    log joint at `values`, and the full-data log joint there (one program)."""
    plain = training_model(model, True)

    def one(key):
        cv = log_density(
            handlers.substitute(handlers.seed(wrapped, key), values), args, {}, reference
        )
        raw = log_density(handlers.substitute(handlers.seed(plain, key), values), args, {}, {})
        return cv[0], raw[0]

    @jax.jit
    def run(keys):
        full = log_density(full_data(handlers.substitute(model, values)), args, {}, {})[0]
        return (*jax.vmap(one)(keys), full)

    return run(jax.random.split(jax.random.key(0), num_batches))


def test_a_quadratic_log_joint_is_estimated_exactly_by_every_minibatch():
    """A normal mean: the second-order expansion is the log joint itself, so every minibatch
    of 20 rows of 2,000 gives the full-data log joint, far from the expansion point too."""
    _, wrapped, reference = _set_up(gaussian_mean, Y)
    assert reference is not None and f"{CONTROL_VARIATE_PREFIX}hess" in reference
    for mu in ([1.5, 1.5], [-3.0, 4.0]):
        values = {"mu": jnp.asarray(mu)}
        cv, raw, full = _estimates(gaussian_mean, wrapped, reference, (Y,), values, 16)
        np.testing.assert_allclose(cv, full, rtol=1e-10)
        assert np.std(raw) > 100  # the plain estimate: noisy


GROUPS = 300  # above FULL_RANK_MAX_DIM: no d x d Hessian
GROUP = jnp.asarray(RNG.integers(GROUPS, size=3000))
ROWS_Y = jnp.asarray(RNG.normal(size=3000))


def intercepts(g, y, slopes=False, shift=0):
    """Varying intercepts (and, with `slopes`, varying slopes: each row's group's, or with
    `shift` the next group's)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("groups", GROUPS):
        a = numpyro.sample("a", dist.Normal(mu, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0)) if slopes else jnp.zeros(GROUPS)
    with numpyro.plate("rows", y.shape[0], subsample_size=30) as idx:
        slope = b[(g[idx] + shift) % GROUPS] * X[idx, 0]
        numpyro.sample("y", dist.Normal(a[g[idx]] + slope, 1.0), obs=y[idx])


def test_above_the_dense_hessian_a_plates_intercepts_keep_the_second_order():
    """A Gaussian posterior above 256 dimensions: the start search finds the full-data
    Hessian sparse (mu's row; the intercepts' diagonal, or with varying slopes a 2 x 2 block
    per group), so every minibatch of 30 rows of 3,000 gives the full-data log joint, far
    from the expansion point too. A slope whose group is another's couples two groups: first
    order, still unbiased."""
    guide, wrapped, reference = _set_up(intercepts, GROUP, ROWS_Y)
    assert guide._blocks.singletons.tolist() == [0]  # mu
    assert f"{CONTROL_VARIATE_PREFIX}hess_rows" in reference
    values = {"mu": jnp.asarray(0.7), "a": jnp.asarray(RNG.normal(size=GROUPS))}
    cv, raw, full = _estimates(intercepts, wrapped, reference, (GROUP, ROWS_Y), values, 16)
    np.testing.assert_allclose(cv, full, rtol=1e-10)
    assert np.std(raw) > 100

    def slopes(g, y):
        intercepts(g, y, slopes=True)

    def shifted(g, y):  # the slope of the group after each row's
        intercepts(g, y, slopes=True, shift=1)

    values["b"] = jnp.asarray(RNG.normal(size=GROUPS) * 0.1)
    guide, wrapped, reference = _set_up(slopes, GROUP, ROWS_Y)
    assert [f.shape for f in guide._blocks.families] == [(GROUPS, 2)]
    cv, raw, full = _estimates(slopes, wrapped, reference, (GROUP, ROWS_Y), values, 16)
    np.testing.assert_allclose(cv, full, rtol=1e-10)

    guide, wrapped, reference = _set_up(shifted, GROUP, ROWS_Y)
    assert guide._blocks is None and f"{CONTROL_VARIATE_PREFIX}grad" in reference
    assert not any(k.startswith(f"{CONTROL_VARIATE_PREFIX}hess") for k in reference)
    cv, raw, full = _estimates(shifted, wrapped, reference, (GROUP, ROWS_Y), values, 400)
    assert abs(np.mean(cv) - full) < 4 * np.std(cv) / np.sqrt(len(cv))
    assert np.std(cv) < np.std(raw)


def test_a_non_quadratic_log_joint_stays_unbiased_with_a_fraction_of_the_noise():
    """Logistic regression with a constrained site: over 2,000 minibatches the control
    variate's mean is the full-data log joint (within 4 standard errors), its sd under a
    hundredth of the plain estimate's; first order (no Hessian) is unbiased too, and noisier
    than second order."""
    guide, wrapped, reference = _set_up(logistic, X, LABELS)
    loc = reference[f"{CONTROL_VARIATE_PREFIX}loc"]
    # about one posterior sd from the MAP (the posterior sd here is ~0.05)
    values = {"w": jnp.asarray(loc[:2] + 0.05), "s": jnp.exp(jnp.asarray(loc[2] - 0.1))}
    cv, raw, full = _estimates(logistic, wrapped, reference, (X, LABELS), values, 2000)
    assert abs(np.mean(cv) - full) < 4 * np.std(cv) / np.sqrt(len(cv)) + 1e-9
    assert abs(np.mean(raw) - full) < 4 * np.std(raw) / np.sqrt(len(raw))
    assert np.std(cv) < np.std(raw) / 100
    first = {k: v for k, v in reference.items() if not k.endswith("hess")}
    guide._reference = first
    wrapped1, _ = with_control_variate("taylor", training_model(logistic, True), logistic, guide)
    cv1, _, _ = _estimates(logistic, wrapped1, first, (X, LABELS), values, 2000)
    assert abs(np.mean(cv1) - full) < 4 * np.std(cv1) / np.sqrt(len(cv1))
    assert np.std(cv) < np.std(cv1) < np.std(raw) / 5


def test_a_fit_with_the_control_variate_reaches_the_closed_form_posterior():
    """Batches of 20 of 2,000 rows: the fit's mean is within 0.05 posterior sd of the closed
    form and its sd within 5% (the plain estimate's noise, about sqrt(2000/20) times the
    posterior's curvature, keeps a fit at this budget several times further off); its
    losses carry no minibatch noise, and the fixed terms are not among the fit's parameters."""
    fit = fit_posterior(gaussian_mean, SPEC, Y, num_steps=600, seed=0, progress=False)
    draws = np.asarray(fit.sample(20000, seed=1)["mu"])
    precision = 2000 + 1 / 100
    mean, sd = np.asarray(Y.sum(0)) / precision, precision**-0.5
    assert np.max(np.abs(draws.mean(0) - mean)) < 0.05 * sd
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.05)
    assert np.std(fit.losses[-100:]) < 1.0  # the plain estimate's sd here is in the hundreds
    assert not any(k.startswith(CONTROL_VARIATE_PREFIX) for k in fit.params)


def test_control_variate_options_are_checked_and_say_why():
    with pytest.raises(ValueError, match="control_variate: expected one of"):
        fit_posterior(gaussian_mean, SPEC, Y, control_variate="taylor2", progress=False)
    with pytest.raises(ValueError, match="did not find .*init_scale=0.1"):
        fit_posterior(
            gaussian_mean, SPEC, Y, init_scale=0.1, control_variate="taylor", progress=False
        )

    # a model with a jax.custom_vjp function (forward mode cannot differentiate it): the
    # start search and the control variate use reverse mode only
    @jax.custom_vjp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    softplus.defvjp(lambda x: (softplus(x), x), lambda x, g: (g * jax.nn.sigmoid(x),))

    def custom(y):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 10.0).to_event(1))
        with numpyro.plate("data", y.shape[0], subsample_size=20) as idx:
            numpyro.sample("obs", dist.Normal(softplus(mu), 1.0).to_event(1), obs=y[idx])

    _, wrapped, reference = _set_up(custom, Y, control_variate="taylor")
    values = {"mu": jnp.asarray(reference[f"{CONTROL_VARIATE_PREFIX}loc"] + 0.02)}
    cv, raw, full = _estimates(custom, wrapped, reference, (Y,), values, 16)
    assert np.std(cv) < np.std(raw) / 100 and np.all(np.isfinite(cv))
