"""Draws of a fit (or of MCMC) as ArviZ data, backend-free.

`to_arviz` turns a fit's draws, importance log-weights, pointwise log-likelihood and observed
data into ArviZ's data object: ``InferenceData`` on ArviZ 0.x, ``DataTree`` on 1.x. Both
backends' MCMC results (`NeuTraResult.to_arviz`) build on `groups_to_arviz` and `site_dims`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flowguides.core import call_with_vectorize
from flowguides.diagnostics import _check_draws, _log_densities
from flowguides.psis import _import_arviz, arviz_major_version, khat_threshold

__all__ = ["groups_to_arviz", "site_dims", "to_arviz"]


def site_dims(arrays: Mapping[str, np.ndarray], skip: int) -> dict[str, list[str]]:
    """ArviZ dims ``{name: ["{name}_dim_0", ...]}`` for each array's dims after the first `skip`."""
    return {
        name: [f"{name}_dim_{i}" for i in range(arr.ndim - skip)] for name, arr in arrays.items()
    }


def groups_to_arviz(groups: dict[str, dict[str, np.ndarray]], dims: dict[str, list[str]]) -> Any:
    """ArviZ's data object of `groups` (``{"posterior": {site: array}, ...}``; empty groups left
    out) with `dims`: ``from_dict`` of ArviZ 0.x or of ``arviz_base`` (1.x)."""
    groups = {key: value for key, value in groups.items() if value}
    if arviz_major_version() == 0:
        return _import_arviz().from_dict(**groups, dims=dims)
    import arviz_base

    return arviz_base.from_dict(groups, dims=dims)


def _check_log_likelihood(
    name: str, loglik: np.ndarray | None, observed_shape: tuple[int, ...], num_samples: int
) -> None:
    """A site's pointwise log-likelihood has the observed value's batch shape: the leading
    part of its shape, without the event dims (a ``Multinomial``, ``MultivariateNormal`` or
    ``.to_event(1)`` observation scores a whole row). ArviZ keeps the observed value's leading
    dims for it (``skip_event_dims`` in its converters), so the groups share those dims."""
    batch = observed_shape[: None if loglik is None else loglik.ndim - 1]
    if loglik is None or loglik.ndim - 1 > len(observed_shape) or loglik.shape[1:] != batch:
        got = "nothing" if loglik is None else loglik.shape
        raise ValueError(
            f"site '{name}': expected a log-likelihood of shape ({num_samples}, *batch) with "
            f"batch a leading part of the observed shape {observed_shape}, got {got}"
        )


def to_arviz(
    fit: Any,
    num_samples: int = 4000,
    seed: int | None = None,
    *,
    vectorize_particles: bool | str | None = None,
) -> Any:
    """ArviZ's data object (``InferenceData`` on 0.x, ``DataTree`` on 1.x) for a fit.

    A posterior fit gives the group ``posterior`` (each site with dims ``{site}_dim_{i}``, draws
    as ``chain=1, draw=S``), ``sample_stats`` (``log_p``, ``log_q``, ``log_weight``) and, when the
    model observes data, ``observed_data`` and the pointwise ``log_likelihood`` (so ``loo`` runs;
    it treats the guide's draws as posterior draws, so check `diagnose` first). A site with
    event dims (``Multinomial``, ``MultivariateNormal``, ``.to_event(1)``) has one
    log-likelihood per row: on the leading (batch) dims of its observed value. A fit whose
    model subsamples its data (a fit with a non-empty ``subsampled_plates``) gets neither
    group: each evaluation sees another random subsample, so no observed value pairs with the
    log-likelihoods (``loo`` then needs a fit on the full data). A density fit
    gives ``posterior`` with its draws as the site ``x`` and ``sample_stats`` with ``log_prob``.

    Args:
        fit: a posterior fit (``log_densities``) or a density fit (``sample`` and ``log_prob``).
        num_samples: number of draws.
        seed: seed for the draws.
        vectorize_particles: as in `diagnose`.

    Raises:
        TypeError: `fit` offers neither protocol.
    """
    if hasattr(fit, "log_densities"):
        khat_threshold(num_samples)
        draws, log_p, log_q = _log_densities(fit, num_samples, seed, vectorize_particles)
        stats = {"log_p": log_p, "log_q": log_q, "log_weight": log_p - log_q}
        observed = {}
        if not getattr(fit, "subsampled_plates", None):  # else no one subsample pairs up
            observed = {k: np.asarray(v) for k, v in dict(fit.observed_data()).items()}
        loglik = {}
        if observed:
            loglik = call_with_vectorize(
                fit.log_likelihood, draws, vectorize_particles=vectorize_particles
            )
            loglik = _check_draws(loglik, num_samples)
            for name, value in observed.items():
                _check_log_likelihood(name, loglik.get(name), value.shape, num_samples)
    elif hasattr(fit, "log_prob") and hasattr(fit, "sample"):
        x = np.asarray(fit.sample(num_samples, seed=seed))
        draws, stats, observed, loglik = {"x": x}, {"log_prob": np.asarray(fit.log_prob(x))}, {}, {}
    else:
        raise TypeError(
            "fit: expected a posterior fit (with log_densities) or a density fit (with sample and "
            f"log_prob), got {type(fit).__name__}"
        )
    dims = {**site_dims(draws, 1), **site_dims(observed, 0)}
    groups = {
        "posterior": {k: v[None] for k, v in draws.items()},
        "sample_stats": {k: v[None] for k, v in stats.items()},
        "observed_data": observed,
        "log_likelihood": {k: v[None] for k, v in loglik.items()},
    }
    return groups_to_arviz(groups, dims)
