"""Synthetic targets with exact answers, written once and run in numpy, torch and JAX.

Each :class:`Target` is an (unnormalised) log density on ``R^dim`` with exact reference moments
and, where known, its log normalising constant ``log Z`` (so ``log Z - ELBO`` is the KL gap):

* ``funnel``: Neal's funnel, ``v ~ N(0, 3)``, ``x_i | v ~ N(0, exp(v / 2))`` (10-D); closed form.
* ``banana``: Haario et al.'s twisted Gaussian, ``y1 ~ N(0, 10)``,
  ``y2 | y1 ~ N(b (y1^2 - 100), 1)`` with ``b = 0.1``; closed form.
* ``U1`` ... ``U4``: the 2-D energies of Rezende & Mohamed (2015, table 1), ``p ∝ exp(-U)``;
  U2-U4 are improper in ``z1``, so a Gaussian taper ``z1^2 / (2 * 2^2)`` is added. Moments and
  ``log Z`` by numerical integration on a fine grid.
* ``mixture``: a 2-D mixture of three Gaussians; closed form.

Every log density is one function of an array namespace (:func:`numpy_ops`, :func:`torch_ops`,
:func:`jax_ops`), so the Pyro model, the NumPyro model and the numpy grid evaluate the same
formula. The models sample one latent site ``z`` (a flat prior on ``R^dim``) and add the log
density with a ``factor``. :func:`logistic_data` makes the synthetic logistic regression of the
speed suite.

Example:
    >>> t = TARGETS["funnel"]
    >>> t.dim, round(float(t.sd[1]), 3), t.log_z
    (10, 9.488, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = [
    "TARGETS",
    "Target",
    "grid_moments",
    "jax_ops",
    "logistic_data",
    "numpy_ops",
    "numpyro_logistic",
    "pyro_logistic",
    "torch_ops",
]

LOG_2PI = math.log(2.0 * math.pi)
TAPER_SD = 2.0
"""Standard deviation of the Gaussian taper on ``z1`` that makes U2-U4 proper."""
BANANA_B = 0.1
MIX_WEIGHTS = np.array([0.5, 0.3, 0.2])
MIX_MEANS = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
MIX_SDS = np.array([0.7, 0.5, 0.6])


def numpy_ops() -> SimpleNamespace:
    """The array functions the log densities use, from numpy/scipy."""
    from scipy.special import expit, logsumexp

    return SimpleNamespace(
        exp=np.exp, log=np.log, sin=np.sin, sqrt=np.sqrt, sigmoid=expit,
        logaddexp=np.logaddexp, logsumexp=logsumexp, stack=np.stack,
    )  # fmt: skip


def torch_ops() -> SimpleNamespace:
    """The array functions the log densities use, from torch."""
    import torch

    return SimpleNamespace(
        exp=torch.exp, log=torch.log, sin=torch.sin, sqrt=torch.sqrt, sigmoid=torch.sigmoid,
        logaddexp=torch.logaddexp, logsumexp=torch.logsumexp, stack=torch.stack,
    )  # fmt: skip


def jax_ops() -> SimpleNamespace:
    """The array functions the log densities use, from JAX."""
    import jax
    import jax.numpy as jnp

    return SimpleNamespace(
        exp=jnp.exp, log=jnp.log, sin=jnp.sin, sqrt=jnp.sqrt, sigmoid=jax.nn.sigmoid,
        logaddexp=jnp.logaddexp, logsumexp=jax.scipy.special.logsumexp, stack=jnp.stack,
    )  # fmt: skip


def _log_normal(x: Any, scale: Any, log_scale: Any) -> Any:
    return -0.5 * (x / scale) ** 2 - log_scale - 0.5 * LOG_2PI


def _funnel(ops: SimpleNamespace, z: Any) -> Any:
    v, x = z[..., 0], z[..., 1:]
    inner = _log_normal(x, ops.exp(v[..., None] / 2), v[..., None] / 2).sum(-1)
    return _log_normal(v, 3.0, math.log(3.0)) + inner


def _banana(ops: SimpleNamespace, z: Any) -> Any:
    y1, y2 = z[..., 0], z[..., 1]
    return _log_normal(y1, 10.0, math.log(10.0)) + _log_normal(
        y2 - BANANA_B * (y1**2 - 100.0), 1.0, 0.0
    )


def _w1(ops: SimpleNamespace, z1: Any) -> Any:
    return ops.sin(2.0 * math.pi * z1 / 4.0)


def _taper(z1: Any) -> Any:
    return -0.5 * (z1 / TAPER_SD) ** 2


def _u1(ops: SimpleNamespace, z: Any) -> Any:
    z1, z2 = z[..., 0], z[..., 1]
    ring = 0.5 * ((ops.sqrt(z1**2 + z2**2) - 2.0) / 0.4) ** 2
    return -ring + ops.logaddexp(-0.5 * ((z1 - 2.0) / 0.6) ** 2, -0.5 * ((z1 + 2.0) / 0.6) ** 2)


def _u2(ops: SimpleNamespace, z: Any) -> Any:
    z1, z2 = z[..., 0], z[..., 1]
    return -0.5 * ((z2 - _w1(ops, z1)) / 0.4) ** 2 + _taper(z1)


def _u3(ops: SimpleNamespace, z: Any) -> Any:
    z1, z2 = z[..., 0], z[..., 1]
    w1, w2 = _w1(ops, z1), 3.0 * ops.exp(-0.5 * ((z1 - 1.0) / 0.6) ** 2)
    a, b = -0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2
    return ops.logaddexp(a, b) + _taper(z1)


def _u4(ops: SimpleNamespace, z: Any) -> Any:
    z1, z2 = z[..., 0], z[..., 1]
    w1, w3 = _w1(ops, z1), 3.0 * ops.sigmoid((z1 - 1.0) / 0.3)
    a, b = -0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2
    return ops.logaddexp(a, b) + _taper(z1)


def _mixture(ops: SimpleNamespace, z: Any) -> Any:
    comps = []
    for w, m, s in zip(MIX_WEIGHTS, MIX_MEANS, MIX_SDS, strict=True):
        lp = _log_normal(z[..., 0] - m[0], s, math.log(s)) + _log_normal(
            z[..., 1] - m[1], s, math.log(s)
        )
        comps.append(lp + math.log(w))
    return ops.logsumexp(ops.stack(comps, -1), -1)


@dataclass(frozen=True)
class Target:
    """One synthetic target.

    Attributes:
        name: short name (``"funnel"``, ``"U3"``, ...).
        dim: dimension of the latent vector ``z``.
        formula: ``formula(ops, z) -> log density`` (batched over leading axes of ``z``).
        mean: exact mean of ``z``, ``(dim,)``.
        sd: exact standard deviation of each coordinate, ``(dim,)``.
        log_z: log normalising constant of ``exp(formula)``, or None if unknown.
        sampler: ``sampler(n, rng) -> (n, dim)`` exact draws (by inverse CDF on the grid for
            the 2-D energies), used for plots and tests.
        bounds: the integration box ``((lo1, hi1), (lo2, hi2))`` for 2-D grid targets.
    """

    name: str
    dim: int
    formula: Callable[[SimpleNamespace, Any], Any]
    mean: np.ndarray
    sd: np.ndarray
    log_z: float | None
    sampler: Callable[[int, np.random.Generator], np.ndarray] = field(repr=False)
    bounds: tuple[tuple[float, float], tuple[float, float]] | None = None

    def log_prob_numpy(self, z: np.ndarray) -> np.ndarray:
        """The log density of numpy draws ``(..., dim)``."""
        return self.formula(numpy_ops(), np.asarray(z, dtype=float))

    def log_prob_jax(self, z: Any) -> Any:
        """The log density of a JAX array ``(..., dim)``."""
        return self.formula(jax_ops(), z)

    def log_prob_torch(self, z: Any) -> Any:
        """The log density of a torch tensor ``(..., dim)``."""
        return self.formula(torch_ops(), z)

    def numpyro_model(self) -> Callable[[], None]:
        """A NumPyro model: ``z`` flat on ``R^dim`` plus ``factor(log density)``."""
        import numpyro
        import numpyro.distributions as dist

        def model() -> None:
            flat = dist.Normal(0.0, 1.0).expand([self.dim]).to_event(1).mask(False)
            z = numpyro.sample("z", flat)
            numpyro.factor("log_density", self.log_prob_jax(z))

        return model

    def pyro_model(self) -> Callable[[], None]:
        """A Pyro model: ``z`` flat on ``R^dim`` plus ``factor(log density)``."""
        import pyro
        import pyro.distributions as dist

        def model() -> None:
            flat = dist.Normal(0.0, 1.0).expand([self.dim]).to_event(1).mask(False)
            z = pyro.sample("z", flat)
            pyro.factor("log_density", self.log_prob_torch(z))

        return model


def _grid(target_formula: Callable, bounds: tuple, n: int) -> tuple[np.ndarray, ...]:
    (a1, b1), (a2, b2) = bounds
    x1, x2 = np.linspace(a1, b1, n), np.linspace(a2, b2, n)
    z = np.stack(np.meshgrid(x1, x2, indexing="ij"), -1)
    return x1, x2, target_formula(numpy_ops(), z)


@cache
def grid_moments(name: str, n: int = 2001) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, sd and log Z of a 2-D energy by a Riemann sum on an ``n x n`` grid.

    The integrands are smooth and vanish (to below 1e-12 of their peak) at the box edges, so the
    sum converges faster than any power of the spacing.

    Args:
        name: one of ``"U1"`` ... ``"U4"``.
        n: grid points per axis.

    Returns:
        ``(mean (2,), sd (2,), log_z)``.
    """
    formula, bounds = _ENERGIES[name]
    x1, x2, logp = _grid(formula, bounds, n)
    cell = (x1[1] - x1[0]) * (x2[1] - x2[0])
    peak = logp.max()
    p = np.exp(logp - peak)
    mass = p.sum()
    p1, p2 = p.sum(1) / mass, p.sum(0) / mass
    mean = np.array([p1 @ x1, p2 @ x2])
    var = np.array([p1 @ (x1 - mean[0]) ** 2, p2 @ (x2 - mean[1]) ** 2])
    return mean, np.sqrt(var), float(peak + np.log(mass * cell))


def _grid_sampler(name: str) -> Callable[[int, np.random.Generator], np.ndarray]:
    def sample(num: int, rng: np.random.Generator) -> np.ndarray:
        formula, bounds = _ENERGIES[name]
        x1, x2, logp = _grid(formula, bounds, 1001)
        p = np.exp(logp - logp.max()).ravel()
        idx = rng.choice(p.size, size=num, p=p / p.sum())
        i, j = np.unravel_index(idx, logp.shape)
        h1, h2 = x1[1] - x1[0], x2[1] - x2[0]
        return np.stack(
            [x1[i] + h1 * (rng.random(num) - 0.5), x2[j] + h2 * (rng.random(num) - 0.5)], -1
        )

    return sample


def _funnel_sample(dim: int) -> Callable[[int, np.random.Generator], np.ndarray]:
    def sample(num: int, rng: np.random.Generator) -> np.ndarray:
        v = 3.0 * rng.standard_normal(num)
        x = np.exp(v / 2)[:, None] * rng.standard_normal((num, dim - 1))
        return np.concatenate([v[:, None], x], -1)

    return sample


def _banana_sample(num: int, rng: np.random.Generator) -> np.ndarray:
    y1 = 10.0 * rng.standard_normal(num)
    y2 = BANANA_B * (y1**2 - 100.0) + rng.standard_normal(num)
    return np.stack([y1, y2], -1)


def _mixture_sample(num: int, rng: np.random.Generator) -> np.ndarray:
    k = rng.choice(len(MIX_WEIGHTS), size=num, p=MIX_WEIGHTS)
    return MIX_MEANS[k] + MIX_SDS[k, None] * rng.standard_normal((num, 2))


def _mixture_moments() -> tuple[np.ndarray, np.ndarray]:
    mean = MIX_WEIGHTS @ MIX_MEANS
    second = MIX_WEIGHTS @ (MIX_SDS[:, None] ** 2 + MIX_MEANS**2)
    return mean, np.sqrt(second - mean**2)


_ENERGIES = {
    "U1": (_u1, ((-4.5, 4.5), (-4.5, 4.5))),
    "U2": (_u2, ((-16.0, 16.0), (-4.0, 4.0))),
    "U3": (_u3, ((-16.0, 16.0), (-6.5, 4.0))),
    "U4": (_u4, ((-16.0, 16.0), (-6.5, 4.0))),
}


def _energy(name: str) -> Target:
    formula, bounds = _ENERGIES[name]
    mean, sd, log_z = grid_moments(name)
    return Target(name, 2, formula, mean, sd, log_z, _grid_sampler(name), bounds)


def _make_targets() -> dict[str, Target]:
    funnel_sd = np.array([3.0] + [math.exp(9.0 / 4.0)] * 9)
    banana_sd = np.array([10.0, math.sqrt(1.0 + 2.0 * BANANA_B**2 * 1e4)])
    mix_mean, mix_sd = _mixture_moments()
    out = {
        "funnel": Target("funnel", 10, _funnel, np.zeros(10), funnel_sd, 0.0, _funnel_sample(10)),
        "banana": Target("banana", 2, _banana, np.zeros(2), banana_sd, 0.0, _banana_sample),
        "mixture": Target("mixture", 2, _mixture, mix_mean, mix_sd, 0.0, _mixture_sample),
    }
    return out


class _LazyTargets(dict):
    """``name -> Target``; the grid-integrated energies are built on first access."""

    def __missing__(self, key: str) -> Target:
        if key not in _ENERGIES:
            raise KeyError(f"target: expected one of {list(TARGET_NAMES)}, got {key!r}")
        self[key] = _energy(key)
        return self[key]


TARGET_NAMES = ("funnel", "banana", "U1", "U2", "U3", "U4", "mixture")
TARGETS: dict[str, Target] = _LazyTargets(_make_targets())
"""All targets by name (``TARGET_NAMES`` order); U1-U4 are integrated on first access."""


def logistic_data(num: int = 500, dim: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic logistic-regression data: ``X ~ N(0, I)``, ``w ~ N(0, I)``, ``y ~ Bern(σ(Xw))``.

    Returns:
        ``{"X": (num, dim), "y": (num,)}`` float64 arrays.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, dim))
    w = rng.standard_normal(dim)
    y = (rng.random(num) < 1.0 / (1.0 + np.exp(-x @ w))).astype(float)
    return {"X": x, "y": y}


def numpyro_logistic(X: np.ndarray, y: np.ndarray) -> Callable[[], None]:  # noqa: N803
    """NumPyro model ``w ~ N(0, I)``, ``y ~ Bernoulli(logits = X w)`` closed over the data."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    xs, ys = jnp.asarray(X), jnp.asarray(y)

    def model() -> None:
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([xs.shape[1]]).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=w @ xs.T).to_event(1), obs=ys)

    return model


def pyro_logistic(X: np.ndarray, y: np.ndarray) -> Callable[[], None]:  # noqa: N803
    """Pyro model ``w ~ N(0, I)``, ``y ~ Bernoulli(logits = X w)`` closed over the data."""
    import pyro
    import pyro.distributions as dist
    import torch

    xs, ys = torch.as_tensor(X), torch.as_tensor(y)

    def model() -> None:
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([xs.shape[1]]).to_event(1))
        pyro.sample("y", dist.Bernoulli(logits=w @ xs.T).to_event(1), obs=ys)

    return model
