"""Can I trust this posterior? PSIS diagnostics of a fitted flow guide, backend-free.

A guide `q` fitted by maximising the ELBO is a proposal for the posterior `p`. The importance
log-weights ``log p(x, z) - log q(z)`` of draws ``z ~ q`` tell how far apart they are: Pareto-
smoothed importance sampling (PSIS) fits a generalized Pareto distribution to the largest weights,
and its shape ``k-hat`` says whether importance-sampling estimates under `q` converge (Yao et al.,
2018): ``k-hat < 0.5`` good, up to ``min(1 - 1/log10(S), 0.7)`` usable after smoothing (Vehtari et
al., 2024), above it unreliable; "good" (the guide's own draws) also needs the smoothed weights'
coefficient of variation at most 0.1, as `infer` uses the guide's draws.

Everything here works on numpy arrays, or on a fit object through its numpy-level protocol
(``fit.log_densities(S, seed) -> (draws, log_p, log_q)``, ``fit.log_likelihood(draws)``,
``fit.observed_data()``); it imports neither torch nor jax. ArviZ is imported lazily and both of
its lines are supported: 0.x (``InferenceData``, ``az.psislw``) and 1.x (``DataTree``,
``arviz_base``/``arviz_stats``).

References:
    Yao, Vehtari, Simpson, Gelman (2018). Yes, but did it work?: Evaluating variational
    inference. ICML.
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25(72).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowguides.core import GUIDE_MAX_WEIGHT_CV, PSIS_MAX_WEIGHT_CV, call_with_vectorize
from flowguides.psis import (
    MIN_DRAWS,
    _as_log_weights,
    _is_constant,
    arviz_major_version,
    importance_ess,
    khat_threshold,
    psis_khat,
    shown,
)

__all__ = [
    "MIN_DRAWS",
    "Diagnosis",
    "Resampled",
    "UnreliableFitWarning",
    "arviz_major_version",
    "diagnose",
    "diagnose_weights",
    "importance_ess",
    "is_moments",
    "khat_threshold",
    "psis_khat",
    "resample",
    "resample_fit",
]

_CONSTANT_VERDICT = "exact: weights are constant: q matches p up to a constant"


class UnreliableFitWarning(UserWarning):
    """Importance resampling was asked of a guide whose k-hat says it is unreliable."""


@dataclass(frozen=True)
class Diagnosis:
    """PSIS diagnosis of a guide `q` against the posterior `p` from ``S`` draws of `q`.

    Attributes:
        elbo: mean of ``log p(x, z) - log q(z)``: the ELBO estimate.
        elbo_se: its Monte Carlo standard error ``sd / sqrt(S)``.
        khat: the Pareto k-hat of the importance weights (``nan`` when it cannot be estimated).
        khat_threshold: ``min(1 - 1/log10(S), 0.7)``.
        ess: effective sample size of the PSIS-smoothed importance weights.
        num_samples: ``S``.
        verdict: one line saying whether to trust `q`, starting with ``exact``, ``good``,
            ``usable``, ``unreliable`` or ``unknown``.
    """

    elbo: float
    elbo_se: float
    khat: float
    khat_threshold: float
    ess: float
    num_samples: int
    verdict: str

    @property
    def reliable(self) -> bool:
        """Whether importance-sampling estimates under `q` can be trusted (exact/good/usable)."""
        return self.verdict.split(":")[0] in ("exact", "good", "usable")

    def __str__(self) -> str:
        khat = "nan" if math.isnan(self.khat) else f"{self.khat:.2f}"
        rows = [
            ("ELBO", f"{self.elbo:.4g} ± {self.elbo_se:.2g}"),
            ("k-hat", f"{khat} (threshold {self.khat_threshold:.2f} for S = {self.num_samples})"),
            ("ESS", f"{self.ess:.0f} of {self.num_samples} ({self.ess / self.num_samples:.0%})"),
            ("verdict", self.verdict),
        ]
        return "\n".join(f"{key:<8} {value}" for key, value in rows)


def _verdict(khat: float, threshold: float, constant: bool, ess_fraction: float = 1.0) -> str:
    """The verdict of k-hat (Yao et al. 2018): below the threshold the PSIS-corrected estimates
    can be trusted; the guide's own draws only where k-hat < 0.5 and, as `infer` uses them
    (`flowguides.core.routes.GUIDE_MAX_WEIGHT_CV`), the smoothed weights' cv is at most 0.1:
    weighting moves the mean of any ``h`` by at most ``cv(w) sd_q(h)``, with ``cv = sqrt(1 /
    ess_fraction - 1)``, so more spread weights mean raw draws that far off ("usable"). Above
    `PSIS_MAX_WEIGHT_CV` (a PSIS ESS below half the draws) the verdict says that the corrected
    estimates rest on few draws, where `infer` runs NeuTra instead."""
    if constant:
        return _CONSTANT_VERDICT
    if math.isnan(khat):
        return "unknown: k-hat could not be estimated (the largest weights are tied); judge by ESS"
    if khat >= threshold:
        k, t = shown(khat, threshold)
        return (
            f"unreliable: k-hat {k} >= {t}; q misses mass of p, so neither its "
            "draws nor importance-corrected estimates can be trusted: run NeuTra (fit.neutra, or "
            "infer) for exact draws, or refit (more steps or layers)"
        )
    cv = math.sqrt(max(1.0 / ess_fraction - 1.0, 0.0)) if ess_fraction > 0 else math.inf
    if khat >= 0.5 or cv > GUIDE_MAX_WEIGHT_CV:
        why = (
            "0.5 <= k-hat {} < {}".format(*shown(khat, threshold))
            if khat >= 0.5
            else "k-hat {} < 0.5, but the weights' cv is {} > {}".format(
                shown(khat, 0.5)[0], *shown(cv, GUIDE_MAX_WEIGHT_CV)
            )
            + f" (ESS {ess_fraction:.0%}: weighting moves means by up to {cv:.2f} sd of q)"
        )
        if cv <= PSIS_MAX_WEIGHT_CV:
            return f"usable: {why}; prefer the PSIS-corrected estimates (fit.resample) to raw draws"
        return (
            f"usable: {why}; the PSIS-corrected estimates (fit.resample) rest on an ESS of "
            f"{ess_fraction:.0%} of the draws: draw more to check them, or run NeuTra "
            f"(fit.neutra), as infer does where the weights' cv is above {PSIS_MAX_WEIGHT_CV}"
        )
    return f"good: k-hat {shown(khat, 0.5)[0]} < 0.5; q is close to p, its draws can be used"


def diagnose_weights(log_p: Any, log_q: Any) -> Diagnosis:
    """Diagnose a guide from ``log p(x, z_s)`` and ``log q(z_s)`` at draws ``z_s ~ q``.

    Args:
        log_p: model joint log-density at each draw, shape ``(S,)``.
        log_q: guide log-density at the same draws, shape ``(S,)``.

    Returns:
        The [`Diagnosis`][flowguides.diagnostics.Diagnosis].

    Raises:
        ValueError: the shapes differ, are not 1-D, ``S < 25``, or a value is NaN/inf.
    """
    log_p = np.asarray(log_p, dtype=np.float64)
    log_q = np.asarray(log_q, dtype=np.float64)
    if log_p.shape != log_q.shape:
        raise ValueError(
            f"log_p and log_q: expected equal shapes, got {log_p.shape} and {log_q.shape}"
        )
    lw = _as_log_weights(log_p - log_q, name="log_p - log_q")
    smoothed, khat = psis_khat(lw)
    threshold, ess = khat_threshold(lw.size), importance_ess(smoothed)
    return Diagnosis(
        elbo=float(lw.mean()),
        elbo_se=float(lw.std(ddof=1) / math.sqrt(lw.size)),
        khat=khat,
        khat_threshold=threshold,
        ess=ess,
        num_samples=int(lw.size),
        verdict=_verdict(khat, threshold, _is_constant(lw), ess / lw.size),
    )


def _check_draws(draws: Mapping[str, Any], num_samples: int) -> dict[str, np.ndarray]:
    if not isinstance(draws, Mapping):
        raise TypeError(f"draws: expected a dict of arrays, got {type(draws).__name__}")
    out = {}
    for name, value in draws.items():
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != num_samples:
            raise ValueError(
                f"site '{name}': expected a leading axis of {num_samples} draws, got shape "
                f"{arr.shape}"
            )
        out[name] = arr
    return out


def resample(
    draws: Mapping[str, Any], log_weights: Any, num_samples: int, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Sampling-importance-resampling with PSIS-smoothed weights.

    Draws indices with replacement, with probabilities the smoothed normalised weights, and
    gathers every site at those indices.

    Args:
        draws: ``{site: (S, *shape)}`` draws from `q`.
        log_weights: ``log p - log q`` at those draws, shape ``(S,)``.
        num_samples: number of draws to return.
        seed: seed of the numpy generator that picks the indices.

    Returns:
        ``{site: (num_samples, *shape)}``.
    """
    smoothed, _ = psis_khat(log_weights)
    draws = _check_draws(draws, smoothed.size)
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
    prob = np.exp(smoothed)
    index = np.random.default_rng(seed).choice(
        smoothed.size, size=int(num_samples), p=prob / prob.sum()
    )
    return {name: arr[index] for name, arr in draws.items()}


def is_moments(
    draws: Mapping[str, Any], log_weights: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Self-normalised PSIS estimates of the posterior mean and standard deviation of each site.

    Args:
        draws: ``{site: (S, *shape)}`` draws from `q`.
        log_weights: ``log p - log q`` at those draws, shape ``(S,)``.

    Returns:
        ``(means, sds)``, each ``{site: array of shape site_shape}``.
    """
    smoothed, _ = psis_khat(log_weights)
    draws = _check_draws(draws, smoothed.size)
    weight = np.exp(smoothed)
    means, sds = {}, {}
    for name, arr in draws.items():
        arr = arr.astype(np.float64)
        w = weight.reshape((-1,) + (1,) * (arr.ndim - 1))
        mean = (w * arr).sum(axis=0)
        means[name] = mean
        sds[name] = np.sqrt((w * (arr - mean) ** 2).sum(axis=0))
    return means, sds


@dataclass(frozen=True)
class Resampled:
    """Result of [`resample_fit`][flowguides.diagnostics.resample_fit].

    Attributes:
        draws: ``{site: (num_samples, *shape)}`` PSIS-importance-resampled draws.
        mean: ``{site: shape}`` PSIS-corrected posterior means (from all proposals).
        sd: ``{site: shape}`` PSIS-corrected posterior standard deviations.
        diagnosis: the diagnosis of the proposals.
    """

    draws: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]
    diagnosis: Diagnosis


def _log_densities(
    fit: Any, num_samples: int, seed: int | None, vectorize_particles: bool | str | None = None
):
    if not hasattr(fit, "log_densities"):
        raise TypeError(
            f"fit: expected a posterior fit with log_densities(num_samples, seed), got "
            f"{type(fit).__name__}"
        )
    draws, log_p, log_q = call_with_vectorize(
        fit.log_densities, num_samples, seed, vectorize_particles=vectorize_particles
    )
    log_p, log_q = np.asarray(log_p, dtype=np.float64), np.asarray(log_q, dtype=np.float64)
    if log_p.shape != (num_samples,) or log_q.shape != (num_samples,):
        raise ValueError(
            f"fit.log_densities: expected log_p and log_q of shape ({num_samples},), got "
            f"{log_p.shape} and {log_q.shape}"
        )
    return _check_draws(draws, num_samples), log_p, log_q


def diagnose(
    fit: Any,
    num_samples: int = 4000,
    seed: int | None = None,
    *,
    vectorize_particles: bool | str | None = None,
) -> Diagnosis:
    """Diagnose a posterior fit from `num_samples` draws of its guide (see `diagnose_weights`).

    `vectorize_particles` (``"auto"``, ``True``, ``False``) says how the draws go through the
    model; None (default) keeps the fit's own choice. Fits that vectorise every model
    (NumPyro's) take no such option and ignore it.
    """
    khat_threshold(num_samples)
    _, log_p, log_q = _log_densities(fit, num_samples, seed, vectorize_particles)
    return diagnose_weights(log_p, log_q)


def resample_fit(
    fit: Any,
    num_samples: int,
    seed: int | None = None,
    *,
    num_proposals: int | None = None,
    vectorize_particles: bool | str | None = None,
) -> Resampled:
    """PSIS-importance-resampled posterior draws, and PSIS-corrected means and sds, of a fit.

    Draws `num_proposals` (default ``max(num_samples, 4000)``) proposals from the guide, weighs
    them by ``log p - log q``, smooths the weights with PSIS and resamples. Worth it when the
    diagnosis says "usable"; when it says "unreliable" an `UnreliableFitWarning` is issued.

    Args:
        fit: a posterior fit (``log_densities(num_samples, seed)``).
        num_samples: number of resampled draws.
        seed: seed for the guide's draws and for the resampling.
        num_proposals: number of draws from the guide.
        vectorize_particles: as in `diagnose`.

    Returns:
        A [`Resampled`][flowguides.diagnostics.Resampled].
    """
    num_proposals = max(int(num_samples), 4000) if num_proposals is None else num_proposals
    khat_threshold(num_proposals)
    draws, log_p, log_q = _log_densities(fit, num_proposals, seed, vectorize_particles)
    if hasattr(fit, "deterministic"):  # the model's computed sites, as `fit.sample` has them
        draws = {**draws, **fit.deterministic(draws)}
    diagnosis = diagnose_weights(log_p, log_q)
    if not diagnosis.reliable:
        warnings.warn(
            f"resampling a guide that is not reliable: {diagnosis.verdict}",
            UnreliableFitWarning,
            stacklevel=2,
        )
    lw = log_p - log_q
    resample_seed = None if seed is None else [seed, 1]
    mean, sd = is_moments(draws, lw)
    return Resampled(resample(draws, lw, num_samples, resample_seed), mean, sd, diagnosis)


def __getattr__(name: str) -> Any:
    """`to_arviz` lives in `flowguides.inference_data` (which imports this module); it is
    still reachable here, as it was before the split."""
    if name == "to_arviz":
        from flowguides.inference_data import to_arviz

        return to_arviz
    raise AttributeError(f"module 'flowguides.diagnostics' has no attribute {name!r}")
