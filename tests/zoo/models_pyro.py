"""The zoo in Pyro: ordinary models, written the way Pyro users write them.

Data are float32 tensors (``torch.tensor`` of the numpy arrays, as users make them). Several
models do not broadcast over an extra leading batch dimension (``X @ b``, ``alpha[group]``,
``torch.diag(sigma)``, ``x * beta`` against a vector latent): they run under Pyro's own
`Trace_ELBO` and `Predictive`, which evaluate one particle at a time. Each model's observed
site becomes a prediction when its data argument is ``None``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import OrderedTransform

from tests.zoo import data

ONE_Y = torch.tensor(data.ONE_Y, dtype=torch.float32)
X = torch.tensor(data.LIN_X, dtype=torch.float32)  # a module-level design matrix
LIN_Y = torch.tensor(data.LIN_Y, dtype=torch.float32)
FLIPS = torch.tensor(data.FLIPS, dtype=torch.float32)
EXPOSURE = torch.tensor(data.EXPOSURE, dtype=torch.float32)
COUNTS = torch.tensor(data.COUNTS, dtype=torch.float32)
CATEGORY_COUNTS = torch.tensor(data.CATEGORY_COUNTS, dtype=torch.float32)
ORD_X = torch.tensor(data.ORD_X, dtype=torch.float32)
ORD_Y = torch.tensor(data.ORD_Y, dtype=torch.long)
MVN_DATA = torch.tensor(data.MVN_DATA, dtype=torch.float32)
T2_Y = torch.tensor(data.T2_Y, dtype=torch.float32)
LOGIT_X = torch.tensor(data.LOGIT_X, dtype=torch.float32)
LOGIT_Y = torch.tensor(data.LOGIT_Y, dtype=torch.float32)
OUT_Y = torch.tensor(data.OUT_Y, dtype=torch.float32)
KEEP = torch.tensor(data.OUT_KEEP)  # a module-level mask
MISS_Y = torch.tensor(data.MISS_Y, dtype=torch.float32)
MISS_OBSERVED = torch.tensor(data.MISS_OBSERVED)
SCHOOLS_Y = torch.tensor(data.SCHOOLS_Y, dtype=torch.float32)
SCHOOLS_SIGMA = torch.tensor(data.SCHOOLS_SIGMA, dtype=torch.float32)
MANY_Y = torch.tensor(data.MANY_Y, dtype=torch.float32)
GROUP = torch.tensor(data.GROUP, dtype=torch.long)
GROUP_Y = torch.tensor(data.GROUP_Y, dtype=torch.float32)
AR_Y = torch.tensor(data.AR_Y, dtype=torch.float32)


def one_latent(y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", 10):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def linear_regression(y=None):
    b = pyro.sample("b", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ b, data.LIN_SIGMA), obs=y)


def beta_bernoulli(n, flips=None):
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    for i in range(n):
        pyro.sample(f"flip_{i}", dist.Bernoulli(p), obs=None if flips is None else flips[i])


def make_gamma_poisson(exposure):
    """A model closing over its covariate, as a factory returns it."""

    def gamma_poisson(counts=None):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        with pyro.plate("units", len(exposure)):
            pyro.sample("counts", dist.Poisson(rate * exposure), obs=counts)

    return gamma_poisson


def dirichlet_multinomial(counts=None, total_count=None):
    if total_count is None:
        total_count = int(counts.sum())
    p = pyro.sample("p", dist.Dirichlet(torch.ones(4)))
    pyro.sample("counts", dist.Multinomial(total_count, p), obs=counts)


def ordered_logistic(x, y=None):
    beta = pyro.sample("beta", dist.Normal(0.0, 3.0))
    base = dist.Normal(torch.zeros(3), 3.0).to_event(1)
    cutpoints = pyro.sample("cutpoints", dist.TransformedDistribution(base, OrderedTransform()))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.OrderedLogistic(x * beta, cutpoints), obs=y)


def lkj_cholesky(n, obs=None):
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.ones(3)).to_event(1))
    L_omega = pyro.sample("L_omega", dist.LKJCholesky(3, 2.0))
    L = torch.mm(torch.diag(sigma), L_omega)  # as in Pyro's LKJ example
    with pyro.plate("data", n):
        pyro.sample("obs", dist.MultivariateNormal(torch.zeros(3), scale_tril=L), obs=obs)


def covariance_matrix(n, obs=None):
    """A covariance from a correlation matrix and scales (torch has no bijection onto
    positive-definite matrices, so a Wishart latent is out of reach of every Pyro autoguide)."""
    sigma = pyro.sample("sigma", dist.HalfCauchy(torch.ones(3)).to_event(1))
    omega = pyro.sample("omega", dist.LKJ(3, 2.0))
    cov = pyro.deterministic("cov", torch.outer(sigma, sigma) * omega)
    with pyro.plate("data", n):
        pyro.sample("obs", dist.MultivariateNormal(torch.zeros(3), covariance_matrix=cov), obs=obs)


def type2_ml(y=None):
    tau = pyro.param("tau", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("groups", 10):
        theta = pyro.sample("theta", dist.Normal(0.0, tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def subsampled_logistic(x, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(x), subsample_size=data.SUBSAMPLE_SIZE) as idx:
        logits = x[idx] @ w + b
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=None if y is None else y[idx])


def masked_outliers(y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(KEEP)), poutine.mask(mask=KEEP):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def missing_values(n, y=None, observed=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", n):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=observed)


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def many_sites(y=None):
    z = [pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0)) for i in range(20)]
    pyro.sample("y", dist.Normal(torch.stack(z), 1.0).to_event(1), obs=y)


def varying_intercepts(group, y=None):
    num_groups = int(group.max()) + 1
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("groups", num_groups):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
    with pyro.plate("data", len(group)):
        pyro.sample("y", dist.Normal(alpha[group], sigma), obs=y)


def ar1(num_steps, y=None):
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    previous = 0.0
    for t in range(num_steps):
        previous = pyro.sample(
            f"y_{t}", dist.Normal(phi * previous, sigma), obs=None if y is None else y[t]
        )
