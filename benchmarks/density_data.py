"""The density benchmark's data sets: generators, the standardised split, known entropies.

2-D: two moons, 8 Gaussians, the checkerboard and two interleaved spiral arms (the FFJORD
generators; the spiral has 4,000 rows, split 3,000 / 1,000, the other 2-D sets
``n_synthetic`` rows). scikit-learn's iris (4-D), wine (13-D), breast cancer (30-D) and digits
(64-D: 1,797 rows of integer grey levels 0-16, dequantised by adding ``U(0, DIGITS_NOISE)``
noise, one grey level wide, before standardising). Each set is split 75/25 with a fixed seed
and standardised by the training rows' mean and sd; the split records ``log_sd``, the sum of
the log sds, so a density in the data's own scale is ``p_std(y) * exp(-log_sd)``.

The checkerboard's density is uniform on half of the cells of a 4 x 4 grid of side-2 squares,
so its differential entropy is ``log 32`` in its own scale and ``log 32 - log_sd`` after the
standardisation (:attr:`DensityData.entropy`); the other sets' entropies are left unknown.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DATASETS",
    "DIGITS_NOISE",
    "ENTROPY",
    "SIZES",
    "DensityData",
    "load",
    "standard_error",
]

DIGITS_NOISE = 1.0
"""Width, in grey levels, of the uniform dequantisation noise added to the digits' pixels."""

ENTROPY = {"checkerboard": math.log(32.0)}
"""Differential entropy (nats) of a data set's generator in its own (raw) scale, where it has
a closed form."""

SIZES = {"spiral": 4000}
"""Rows a 2-D generator draws where it ignores ``n_synthetic``."""


@dataclass(frozen=True)
class DensityData:
    """A standardised train/test split.

    Attributes:
        name: the data set.
        train: standardised training rows ``(n_train, dim)``.
        test: standardised test rows ``(n_test, dim)``.
        log_sd: ``sum(log sd)`` of the standardisation (its log-Jacobian is ``-log_sd``).
        entropy: the differential entropy of the standardised data, where it is known.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    log_sd: float = 0.0
    entropy: float | None = None


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_moons

    return make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))[0]


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = np.arange(8) * np.pi / 4
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], -1)
    idx = rng.integers(0, 8, n)
    return (centers[idx] + 0.5 * rng.standard_normal((n, 2))) / math.sqrt(2.0)


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0 + np.floor(x1) % 2
    return np.stack([x1, x2], -1) * 2.0


def _spiral(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved spiral arms (FFJORD's ``2spirals``), ``SIZES["spiral"]`` rows."""
    n = SIZES["spiral"]
    turn = np.sqrt(rng.random(n // 2)) * 3 * np.pi
    arm = np.stack([-np.cos(turn) * turn, np.sin(turn) * turn], -1) + rng.random((n // 2, 2)) / 2
    x = np.concatenate([arm, -arm]) / 3
    return x + 0.1 * rng.standard_normal(x.shape)


def _sklearn(name: str) -> Callable[[int, np.random.Generator], np.ndarray]:
    def load_set(n: int, rng: np.random.Generator) -> np.ndarray:
        from sklearn import datasets

        x = getattr(datasets, f"load_{name}")().data.astype(float)
        if name == "digits":
            x = x + DIGITS_NOISE * rng.random(x.shape)
        return x

    return load_set


DATASETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "two_moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "spiral": _spiral,
    "iris": _sklearn("iris"),
    "wine": _sklearn("wine"),
    "breast_cancer": _sklearn("breast_cancer"),
    "digits": _sklearn("digits"),
}
"""Data set name -> ``(n, rng) -> raw array`` (``n`` is used by the 2-D generators only)."""


def load(name: str, n_synthetic: int = 8000, seed: int = 0) -> DensityData:
    """One data set, split 75/25 (seeded) and standardised by the training statistics.

    Raises:
        KeyError: `name` is not in `DATASETS`.
    """
    if name not in DATASETS:
        raise KeyError(f"data set: expected one of {list(DATASETS)}, got {name!r}")
    rng = np.random.default_rng(seed)
    x = DATASETS[name](n_synthetic, rng)
    perm = rng.permutation(len(x))
    cut = int(0.75 * len(x))
    train, test = x[perm[:cut]], x[perm[cut:]]
    mean, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    log_sd = float(np.log(sd).sum())
    entropy = ENTROPY[name] - log_sd if name in ENTROPY else None
    return DensityData(name, (train - mean) / sd, (test - mean) / sd, log_sd, entropy)


def standard_error(values: np.ndarray) -> float:
    """The standard error of the mean of `values`: ``sd(values, ddof=1) / sqrt(n)``.

    Raises:
        ValueError: fewer than two values.
    """
    values = np.asarray(values, dtype=float).ravel()
    if values.size < 2:
        raise ValueError(f"values: expected at least 2, got {values.size}")
    return float(np.std(values, ddof=1) / math.sqrt(values.size))
