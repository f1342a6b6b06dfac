"""The zoo in NumPyro: ordinary models, written the way NumPyro users write them.

Several models use a data value in Python (``int(counts.sum())``, ``int(group.max()) + 1``):
NumPyro's own `SVI.run`, `MCMC` and `Predictive` close over the arguments, so these run there.
Others read module-level arrays or close over them. Each model's observed site becomes a
prediction when its data argument is ``None``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints

from tests.zoo import data

X = jnp.asarray(data.LIN_X)  # a module-level design matrix
KEEP = jnp.asarray(data.OUT_KEEP)  # a module-level mask


def one_latent(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", 10):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def linear_regression(y=None):
    b = numpyro.sample("b", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ b, data.LIN_SIGMA), obs=y)


def beta_bernoulli(n, flips=None):
    p = numpyro.sample("p", dist.Beta(2.0, 2.0))
    for i in range(n):
        numpyro.sample(f"flip_{i}", dist.Bernoulli(p), obs=None if flips is None else flips[i])


def make_gamma_poisson(exposure):
    """A model closing over its covariate, as a factory returns it."""

    def gamma_poisson(counts=None):
        rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
        with numpyro.plate("units", len(exposure)):
            numpyro.sample("counts", dist.Poisson(rate * exposure), obs=counts)

    return gamma_poisson


def dirichlet_multinomial(counts=None, total_count=None):
    if total_count is None:
        total_count = int(counts.sum())
    p = numpyro.sample("p", dist.Dirichlet(jnp.ones(4)))
    numpyro.sample("counts", dist.Multinomial(total_count, p), obs=counts)


def ordered_logistic(x, y=None):
    beta = numpyro.sample("beta", dist.Normal(0.0, 3.0))
    cutpoints = numpyro.sample(
        "cutpoints", dist.ImproperUniform(constraints.ordered_vector, (), event_shape=(3,))
    )
    with numpyro.plate("data", len(x)):
        numpyro.sample("y", dist.OrderedLogistic(x * beta, cutpoints), obs=y)


def lkj_cholesky(n, obs=None):
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(3)).to_event(1))
    L_omega = numpyro.sample("L_omega", dist.LKJCholesky(3, 2.0))
    L = jnp.matmul(jnp.diag(sigma), L_omega)
    with numpyro.plate("data", n):
        numpyro.sample("obs", dist.MultivariateNormal(jnp.zeros(3), scale_tril=L), obs=obs)


def covariance_matrix(n, obs=None):
    """A Wishart precision matrix (positive definite) of zero-mean Gaussian data."""
    precision = numpyro.sample(
        "precision", dist.Wishart(concentration=data.WISHART_DF, scale_matrix=jnp.eye(2))
    )
    numpyro.deterministic("covariance", jnp.linalg.inv(precision))
    with numpyro.plate("data", n):
        numpyro.sample(
            "obs", dist.MultivariateNormal(jnp.zeros(2), precision_matrix=precision), obs=obs
        )


def type2_ml(y=None):
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    with numpyro.plate("groups", 10):
        theta = numpyro.sample("theta", dist.Normal(0.0, tau))
        numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def subsampled_logistic(x, y=None):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(3), 2.0).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", len(x), subsample_size=data.SUBSAMPLE_SIZE) as idx:
        logits = x[idx] @ w + b
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=None if y is None else y[idx])


def masked_outliers(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("data", len(KEEP)), handlers.mask(mask=KEEP):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def missing_values(n, y=None, observed=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("data", n):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=observed)


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", len(sigma)):
        eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * eta)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def many_sites(y=None):
    z = [numpyro.sample(f"z_{i}", dist.Normal(0.0, 1.0)) for i in range(20)]
    numpyro.sample("y", dist.Normal(jnp.stack(z), 1.0).to_event(1), obs=y)


def varying_intercepts(group, y=None):
    num_groups = int(group.max()) + 1
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("groups", num_groups):
        alpha = numpyro.sample("alpha", dist.Normal(mu, tau))
    with numpyro.plate("data", len(group)):
        numpyro.sample("y", dist.Normal(alpha[group], sigma), obs=y)


def ar1(num_steps, y=None):
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    previous = 0.0
    for t in range(num_steps):
        previous = numpyro.sample(
            f"y_{t}", dist.Normal(phi * previous, sigma), obs=None if y is None else y[t]
        )
