"""The nine posteriordb posteriors as NumPyro models (the densities of the data README).

Every model is a function ``model(**data)`` taking a :func:`benchmarks.models.posteriordb.load`
data dict as keyword arguments (fields a model does not need are accepted and ignored). The
models are written batch-polymorphically: no plates, every latent and observed site's batch
shape is ``()`` with vectors as events, and all arithmetic broadcasts over leading batch
dimensions, so the same code runs under ``vmap``, ``jit`` and vectorised ELBO particles. There is
no Python control flow on traced values (the GARCH volatility recursion is a ``lax.scan``).

Latent site names match the reference draws, except where a reference parameter is recorded as a
``deterministic`` site (see :data:`benchmarks.models.posteriordb.DETERMINISTIC`):
``theta`` (from ``theta_trans``, non-centered eight schools), ``beta1`` (from ``beta1_unit``,
GARCH) and ``f`` (from ``f_tilde``, GP Poisson regression).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from numpyro.distributions import constraints

__all__ = [
    "MODELS",
    "ar_k",
    "diamonds",
    "eight_schools_centered",
    "eight_schools_noncentered",
    "garch11",
    "gp_pois_regr",
    "kidiq_kidscore_momiq",
    "low_dim_gauss_mix",
    "sblrc_blr",
]


def _array(value: Any) -> jnp.ndarray:
    """Data as a JAX array of the default float type (float64 when x64 is enabled)."""
    return jnp.asarray(np.asarray(value, dtype=float), dtype=jnp.result_type(float))


def _flat(name: str, support: constraints.Constraint, event_shape: tuple[int, ...] = ()) -> Any:
    """A latent site with an improper flat prior on ``support``."""
    return numpyro.sample(name, dist.ImproperUniform(support, (), event_shape))


def eight_schools_noncentered(*, y: Any, sigma: Any, **other: Any) -> None:
    """Eight schools, non-centered: ``theta = mu + tau * theta_trans`` is deterministic.

    Args:
        y: observed effects ``(J,)``.
        sigma: their standard errors ``(J,)``.
        **other: further data fields (``J``), unused.
    """
    y, sigma = _array(y), _array(sigma)
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0).expand(y.shape).to_event(1))
    theta = numpyro.deterministic("theta", mu[..., None] + tau[..., None] * theta_trans)
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def eight_schools_centered(*, y: Any, sigma: Any, **other: Any) -> None:
    """Eight schools, centered: ``theta_j ~ N(mu, tau)`` (a funnel between ``tau`` and ``theta``).

    Args:
        y: observed effects ``(J,)``.
        sigma: their standard errors ``(J,)``.
        **other: further data fields (``J``), unused.
    """
    y, sigma = _array(y), _array(sigma)
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    prior = dist.Normal(mu[..., None], tau[..., None]).expand((*jnp.shape(mu), *y.shape))
    theta = numpyro.sample("theta", prior.to_event(1))
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def ar_k(*, K: Any, y: Any, **other: Any) -> None:
    """AR(K): ``y_t ~ N(alpha + sum_k beta_k y_{t-k}, sigma)`` for ``t = K+1..T``.

    Args:
        K: the order.
        y: the series ``(T,)``.
        **other: further data fields (``T``), unused.
    """
    order, series = int(K), np.asarray(y, dtype=float)
    length = series.shape[0]
    lags = _array(np.stack([series[order - k : length - k] for k in range(1, order + 1)], -1))
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand((order,)).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    loc = alpha[..., None] + beta @ lags.T
    numpyro.sample("y", dist.Normal(loc, sigma[..., None]).to_event(1), obs=_array(series[order:]))


def garch11(*, y: Any, sigma1: Any, **other: Any) -> None:
    """GARCH(1,1) with flat priors; ``beta1 = (1 - alpha1) * beta1_unit`` plus its Jacobian.

    ``beta1`` is flat on ``(0, 1 - alpha1)``: sampling ``beta1_unit`` flat on ``(0, 1)`` and adding
    ``log(1 - alpha1)`` (the log-Jacobian of the map) gives exactly that density.

    Args:
        y: the series ``(T,)``.
        sigma1: the initial volatility ``s_1``.
        **other: further data fields (``T``), unused.
    """
    y, sigma1 = _array(y), _array(sigma1)
    mu = _flat("mu", constraints.real)
    alpha0 = _flat("alpha0", constraints.positive)
    alpha1 = _flat("alpha1", constraints.unit_interval)
    beta1_unit = numpyro.sample("beta1_unit", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.deterministic("beta1", (1.0 - alpha1) * beta1_unit)
    numpyro.factor("beta1_jacobian", jnp.log1p(-alpha1))

    def step(s_prev: jnp.ndarray, y_prev: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        s = jnp.sqrt(alpha0 + alpha1 * (y_prev - mu) ** 2 + beta1 * s_prev**2)
        return s, s

    s_first = jnp.broadcast_to(sigma1, jnp.shape(mu + alpha0 + alpha1 + beta1))
    _, s_rest = lax.scan(step, s_first, y[:-1])
    scale = jnp.concatenate([s_first[..., None], jnp.moveaxis(s_rest, 0, -1)], axis=-1)
    numpyro.sample("y", dist.Normal(mu[..., None], scale).to_event(1), obs=y)


def gp_pois_regr(*, x: Any, k: Any, **other: Any) -> None:
    """Poisson regression on a GP: ``f = L f_tilde``, ``L L^T = K + 1e-10 I``, ``k ~ Poisson(e^f)``.

    Args:
        x: inputs ``(N,)``.
        k: counts ``(N,)``.
        **other: further data fields (``N``, ``y``), unused.
    """
    x, k = _array(x), _array(k)
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = numpyro.sample("f_tilde", dist.Normal(0.0, 1.0).expand(x.shape).to_event(1))
    sq_dist = (x[:, None] - x[None, :]) ** 2
    rho_, alpha_ = rho[..., None, None], alpha[..., None, None]
    cov = alpha_**2 * jnp.exp(-sq_dist / (2.0 * rho_**2)) + 1e-10 * jnp.eye(x.shape[0])
    chol = jnp.linalg.cholesky(cov)
    f = numpyro.deterministic("f", (chol @ f_tilde[..., None])[..., 0])
    numpyro.sample("k", dist.Poisson(jnp.exp(f)).to_event(1), obs=k)


def kidiq_kidscore_momiq(*, kid_score: Any, mom_iq: Any, **other: Any) -> None:
    """Linear regression of kid's score on mother's IQ, flat ``beta``, Half-Cauchy ``sigma``.

    Args:
        kid_score: responses ``(N,)``.
        mom_iq: the predictor ``(N,)``.
        **other: further data fields (``N``, ``mom_hs``, ``mom_hs_new``, ``mom_iq_new``), unused.
    """
    kid_score, mom_iq = _array(kid_score), _array(mom_iq)
    beta = _flat("beta", constraints.real_vector, (2,))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    loc = beta[..., :1] + beta[..., 1:] * mom_iq
    numpyro.sample("kid_score", dist.Normal(loc, sigma[..., None]).to_event(1), obs=kid_score)


def low_dim_gauss_mix(*, y: Any, **other: Any) -> None:
    """Two-component normal mixture with ordered means ``mu_1 < mu_2``.

    ``mu`` is flat on the ordered vectors with its ``N(0, 2)`` prior added as a factor.

    Args:
        y: observations ``(N,)``.
        **other: further data fields (``N``), unused.
    """
    y = _array(y)
    mu = _flat("mu", constraints.ordered_vector, (2,))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum(-1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand((2,)).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    shape = (*jnp.shape(theta), *y.shape, 2)
    logits = jnp.stack([jnp.log(theta), jnp.log1p(-theta)], -1)
    mixing = dist.Categorical(logits=jnp.broadcast_to(logits[..., None, :], shape))
    components = dist.Normal(mu[..., None, :], sigma[..., None, :]).expand(shape)
    numpyro.sample("y", dist.MixtureSameFamily(mixing, components).to_event(1), obs=y)


def sblrc_blr(*, X: Any, y: Any, **other: Any) -> None:
    """Bayesian linear regression: ``beta_d ~ N(0, 10)``, ``sigma ~ Half-N(0, 10)``.

    Args:
        X: design ``(N, D)``.
        y: responses ``(N,)``.
        **other: further data fields (``N``, ``D``), unused.
    """
    X, y = _array(X), _array(y)
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand(X.shape[-1:]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    numpyro.sample("y", dist.Normal(beta @ X.T, sigma[..., None]).to_event(1), obs=y)


def diamonds(*, X: Any, Y: Any, prior_only: Any = 0, **other: Any) -> None:
    """brms regression on the diamonds data with centred predictors.

    Args:
        X: design ``(N, K)`` with an intercept column first.
        Y: responses ``(N,)``.
        prior_only: when nonzero, leave the likelihood out (the posteriordb data has 0).
        **other: further data fields (``N``, ``K``), unused.
    """
    design = np.asarray(X, dtype=float)[:, 1:]
    centred = _array(design - design.mean(axis=0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand(centred.shape[-1:]).to_event(1))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = numpyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0)))
    if not int(prior_only):
        loc = intercept[..., None] + b @ centred.T
        numpyro.sample("Y", dist.Normal(loc, sigma[..., None]).to_event(1), obs=_array(Y))


MODELS: dict[str, Callable[..., None]] = {
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "eight_schools-eight_schools_centered": eight_schools_centered,
    "arK-arK": ar_k,
    "garch-garch11": garch11,
    "gp_pois_regr-gp_pois_regr": gp_pois_regr,
    "kidiq-kidscore_momiq": kidiq_kidscore_momiq,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
    "sblrc-blr": sblrc_blr,
    "diamonds-diamonds": diamonds,
}
"""Posterior name (as in :data:`benchmarks.models.posteriordb.NAMES`) -> NumPyro model."""
