"""Pareto-smoothed importance sampling (PSIS) on numpy log-weights, through ArviZ.

The numerical core of :mod:`flowguides.diagnostics`: smoothing and k-hat
([`psis_khat`][flowguides.psis.psis_khat]), the sample-size-aware threshold and the importance
effective sample size. Works on numpy arrays and imports neither torch nor jax; ArviZ is
imported lazily and both of its lines are supported: 0.x (``az.psislw``) and 1.x
(``arviz_stats``).

References:
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25(72).
"""

from __future__ import annotations

import importlib.metadata
import math
import warnings
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "MIN_DRAWS",
    "arviz_major_version",
    "importance_ess",
    "khat_threshold",
    "psis_khat",
    "shown",
]

MIN_DRAWS = 25
"""Fewest draws PSIS accepts: its tail holds ``min(S / 5, 3 sqrt(S))`` draws and needs 5."""

_CONSTANT_SPREAD = 1e-6
"""Log-weights spread less than this (max - min) count as constant: weights equal to 1e-6."""


def _import_arviz() -> ModuleType:
    """Import ArviZ, silencing the once-a-day refactor notice that 0.x prints on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def arviz_major_version() -> int:
    """The major version of the installed ArviZ (0 for ``InferenceData``, 1 for ``DataTree``).

    Read from the package metadata (equal to ``arviz.__version__``), so that the 1.x paths load
    only ``arviz_base``/``arviz_stats`` and not the whole of ArviZ with its plotting.
    """
    try:
        version = importlib.metadata.version("arviz")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(
            "flowguides.diagnostics needs ArviZ: pip install 'flowguides[arviz]'"
        ) from err
    return int(version.split(".")[0])


def _as_log_weights(log_weights: Any, name: str = "log_weights") -> np.ndarray:
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (num_samples,), got shape {lw.shape}")
    if lw.shape[0] < MIN_DRAWS:
        raise ValueError(f"{name}: expected at least {MIN_DRAWS} draws, got {lw.shape[0]}")
    bad = np.flatnonzero(~np.isfinite(lw))
    if bad.size:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if bad.size > 10 else "")
        raise ValueError(f"{name}: {bad.size} value(s) are NaN or inf, at draws [{shown}]")
    return lw


def _is_constant(lw: np.ndarray) -> bool:
    return float(np.ptp(lw)) < _CONSTANT_SPREAD


def _normalize(lw: np.ndarray) -> np.ndarray:
    top = lw.max()
    return lw - (top + np.log(np.exp(lw - top).sum()))


_OVERFLOW_SPREAD = 700.0  # log-weight spread beyond which exp() overflows in float64


def psis_khat(log_weights: Any) -> tuple[np.ndarray, float]:
    """Pareto-smooth importance log-weights with ArviZ and return them with k-hat.

    ArviZ 0.x: ``az.psislw(log_weights)``. ArviZ 1.x: ``array_stats.psislw(-log_weights)`` from
    arviz_stats (1.x smooths the negated input, as it is written for log-likelihoods in LOO).
    Draws from a flow guide are independent, so the relative efficiency is 1.

    Args:
        log_weights: ``log p(x, z_s) - log q(z_s)`` for ``S >= 25`` draws, shape ``(S,)``.

    Returns:
        The smoothed log-weights, normalised so that their exponentials sum to 1, and k-hat.
        Constant weights (q equal to p up to a constant, where ArviZ cannot fit a tail) give
        uniform weights and ``k-hat = nan``; so does a tail ArviZ cannot fit (tied weights).

    Raises:
        ValueError: `log_weights` is not 1-D, has fewer than 25 draws, or holds NaN/inf.
    """
    lw = _as_log_weights(log_weights)
    if _is_constant(lw):
        return np.full(lw.shape, -math.log(lw.size)), math.nan
    with warnings.catch_warnings():
        # k-hat is the diagnostic itself: ArviZ's warnings about a large k-hat repeat it.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            if arviz_major_version() == 0:
                smoothed, khat = _import_arviz().psislw(lw, reff=1.0)
            else:
                from arviz_stats.base import array_stats

                smoothed, khat = array_stats.psislw(-lw, r_eff=1.0)
        except ValueError as err:  # arviz-stats: "All tail values are the same"
            if "tail values" not in str(err):
                raise
            return _normalize(lw), math.nan
    khat = float(khat)
    if math.isnan(khat) and np.ptp(lw) > _OVERFLOW_SPREAD:
        khat = math.inf  # ArviZ 1.x overflows on weights spanning more than e^700: hopeless
    if math.isnan(khat):
        return _normalize(lw), math.nan
    if math.isinf(khat):  # a tail too heavy to fit: as unreliable as it gets
        return _normalize(lw), math.inf
    return np.asarray(smoothed, dtype=np.float64), khat


def khat_threshold(num_samples: int) -> float:
    """The sample-size-aware k-hat threshold ``min(1 - 1/log10(S), 0.7)`` (Vehtari et al. 2024).

    >>> khat_threshold(100)
    0.5
    >>> khat_threshold(4000)
    0.7

    Raises:
        ValueError: `num_samples` is below 25 (PSIS needs more draws).
    """
    if int(num_samples) != num_samples or num_samples < MIN_DRAWS:
        raise ValueError(f"num_samples: expected an integer >= {MIN_DRAWS}, got {num_samples!r}")
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def importance_ess(log_weights: Any) -> float:
    """Importance-sampling effective sample size ``(sum w)^2 / sum w^2`` (Kish).

    Pass PSIS-smoothed log-weights for the PSIS ESS. Constant weights give ``S``; half the
    weights 1 and half 3 give ``0.8 S``:

    >>> round(importance_ess(np.log([1.0, 3.0] * 50)), 6)
    80.0
    """
    lw = _normalize(_as_log_weights(log_weights))
    return float(1.0 / np.exp(2.0 * lw).sum())


def shown(value: float, bound: float) -> tuple[str, str]:
    """`value` and the `bound` it is compared with, to two decimals or as many more (up to
    six) as tell them apart, so that a message never reads "k-hat 0.70 < 0.70".

    >>> shown(0.6996, 0.7), shown(0.62, 0.7)
    (('0.6996', '0.7000'), ('0.62', '0.70'))
    """
    for digits in range(2, 7):
        pair = f"{value:.{digits}f}", f"{bound:.{digits}f}"
        if pair[0] != pair[1]:
            return pair
    return pair
