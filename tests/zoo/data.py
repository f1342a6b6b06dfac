"""The zoo's data sets and closed-form posteriors, in numpy, shared by both backends.

Each backend's models read the same arrays (Pyro as float32 tensors, as users make them;
NumPyro as float64 arrays under the suite's x64). Closed forms are ``{site: (mean, sd)}`` in
the constrained space; a NaN entry marks a coordinate that is not checked.
"""

from __future__ import annotations

import numpy as np

_rng = np.random.default_rng(20240613)

# one latent: mu ~ N(0, 2^2), y_i ~ N(mu, 1)
ONE_Y = _rng.normal(1.5, 1.0, size=10)

# linear regression with known noise: b ~ N(0, I), y ~ N(X b, 0.5^2); correlated columns
LIN_SIGMA = 0.5
LIN_X = _rng.normal(size=(30, 3))
LIN_X[:, 2] += 0.7 * LIN_X[:, 0]
LIN_Y = LIN_X @ np.array([1.0, -0.5, 0.3]) + LIN_SIGMA * _rng.normal(size=30)

# Beta(2, 2)-Bernoulli, one site per flip
FLIPS = (_rng.random(12) < 0.3).astype(float)

# Gamma(2, 1)-Poisson with known exposures: counts_i ~ Poisson(rate * exposure_i)
EXPOSURE = _rng.uniform(0.5, 2.0, size=12)
COUNTS = _rng.poisson(3.0 * EXPOSURE).astype(float)

# Dirichlet(1, 1, 1, 1)-Multinomial
CATEGORY_COUNTS = np.array([12.0, 5.0, 20.0, 3.0])

# ordered logistic regression, 4 classes
ORD_X = _rng.normal(size=60)
ORD_Y = np.digitize(1.2 * ORD_X + _rng.logistic(size=60), [-1.0, 0.5, 2.0]).astype(float)

# 3-D Gaussian data with correlated components (LKJ models)
MVN_DATA = _rng.multivariate_normal(
    np.zeros(3), [[1.0, 0.6, 0.2], [0.6, 2.0, -0.4], [0.2, -0.4, 0.5]], size=50
)

# Wishart(5, I) precision of 2-D zero-mean Gaussian data
WISHART_DF = 5.0
WISHART_DATA = _rng.multivariate_normal(np.zeros(2), [[1.0, 0.5], [0.5, 2.0]], size=40)

# type-II ML: theta_j ~ N(0, tau^2) with tau a parameter, y_j ~ N(theta_j, 1)
T2_Y = _rng.normal(0.0, np.sqrt(5.0), size=10)

# logistic regression on 200 points, fitted on minibatches of 25
LOGIT_X = _rng.normal(size=(200, 3))
LOGIT_Y = (_rng.random(200) < 1 / (1 + np.exp(-(LOGIT_X @ [1.0, -1.0, 0.5] - 0.3)))).astype(float)
SUBSAMPLE_SIZE = 25

# normal mean, the first three points outliers masked out of the likelihood
OUT_Y = _rng.normal(2.0, 1.0, size=20)
OUT_Y[:3] = 25.0
OUT_KEEP = np.arange(20) >= 3

# normal mean with missing values (filled with 0.0, as after `fillna(0)`) and an obs mask
MISS_Y = _rng.normal(5.0, 1.0, size=20)
MISS_OBSERVED = _rng.random(20) > 0.3
MISS_Y[~MISS_OBSERVED] = 0.0

# eight schools
SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])

# twenty scalar sites: z_i ~ N(0, 1), y ~ N(z, I)
MANY_Y = _rng.normal(0.0, np.sqrt(2.0), size=20)

# varying intercepts: 5 groups, integer labels
GROUP = _rng.permutation(np.repeat(np.arange(5), 6))
GROUP_Y = np.array([-1.0, 0.0, 0.5, 1.0, 2.0])[GROUP] + 0.5 * _rng.normal(size=30)

# AR(1): y_t ~ N(phi y_{t-1}, sigma^2), y_{-1} = 0
AR_Y = np.zeros(15)
for _t in range(1, 15):
    AR_Y[_t] = 0.6 * AR_Y[_t - 1] + 0.8 * _rng.normal()


def _normal_mean(y: np.ndarray, prior_sd: float, noise_sd: float) -> tuple[float, float]:
    """Posterior (mean, sd) of mu for y_i ~ N(mu, noise_sd^2), mu ~ N(0, prior_sd^2)."""
    var = 1.0 / (1.0 / prior_sd**2 + len(y) / noise_sd**2)
    return var * y.sum() / noise_sd**2, np.sqrt(var)


def one_latent_exact() -> dict[str, tuple]:
    return {"mu": _normal_mean(ONE_Y, 2.0, 1.0)}


def linreg_exact() -> dict[str, tuple]:
    cov = np.linalg.inv(np.eye(3) + LIN_X.T @ LIN_X / LIN_SIGMA**2)
    return {"b": (cov @ LIN_X.T @ LIN_Y / LIN_SIGMA**2, np.sqrt(np.diag(cov)))}


def _beta(a: float, b: float) -> tuple[float, float]:
    return a / (a + b), np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


def beta_bernoulli_exact() -> dict[str, tuple]:
    heads = FLIPS.sum()
    return {"p": _beta(2 + heads, 2 + len(FLIPS) - heads)}


def gamma_poisson_exact() -> dict[str, tuple]:
    shape, rate = 2.0 + COUNTS.sum(), 1.0 + EXPOSURE.sum()
    return {"rate": (shape / rate, np.sqrt(shape) / rate)}


def dirichlet_multinomial_exact() -> dict[str, tuple]:
    alpha = 1.0 + CATEGORY_COUNTS
    total = alpha.sum()
    return {"p": (alpha / total, np.sqrt(alpha * (total - alpha) / (total**2 * (total + 1))))}


def wishart_exact() -> dict[str, tuple]:
    """Posterior of the precision: Wishart(df + n, (I + sum x x^T)^-1), entrywise mean and sd."""
    scale = np.linalg.inv(np.eye(2) + WISHART_DATA.T @ WISHART_DATA)
    df = WISHART_DF + len(WISHART_DATA)
    diag = np.diag(scale)
    return {"precision": (df * scale, np.sqrt(df * (scale**2 + np.outer(diag, diag))))}


def type2_tau_hat() -> float:
    """Maximum marginal likelihood tau: y_j ~ N(0, tau^2 + 1), so tau^2 = mean(y^2) - 1."""
    return float(np.sqrt(np.mean(T2_Y**2) - 1.0))


def type2_exact() -> dict[str, tuple]:
    """theta's posterior at the type-II ML tau."""
    shrink = type2_tau_hat() ** 2 / (type2_tau_hat() ** 2 + 1.0)
    return {"theta": (shrink * T2_Y, np.full(len(T2_Y), np.sqrt(shrink)))}


def outliers_exact() -> dict[str, tuple]:
    return {"mu": _normal_mean(OUT_Y[OUT_KEEP], 10.0, 1.0)}


def obs_mask_exact() -> dict[str, tuple]:
    """mu from the observed points; each missing value ~ N(mu's mean, 1 + mu's variance).
    The unobserved site's coordinates where data is observed carry no density: unchecked."""
    mean, sd = _normal_mean(MISS_Y[MISS_OBSERVED], 10.0, 1.0)
    missing_mean = np.where(MISS_OBSERVED, np.nan, mean)
    missing_sd = np.where(MISS_OBSERVED, np.nan, np.sqrt(1.0 + sd**2))
    return {"mu": (mean, sd), "y_unobserved": (missing_mean, missing_sd)}


def many_sites_exact() -> dict[str, tuple]:
    return {f"z_{i}": (y / 2.0, np.sqrt(0.5)) for i, y in enumerate(MANY_Y)}
