"""Draws of a fit (or of MCMC) as ArviZ data, backend-free.

`to_arviz` turns a fit's draws, importance log-weights, pointwise log-likelihood and observed
data into ArviZ's data object: ``InferenceData`` on ArviZ 0.x, ``DataTree`` on 1.x. Both
backends' MCMC results (`NeuTraResult.to_arviz`) build on `groups_to_arviz` and `site_dims`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


_UNDRAWN_GROUPS = ("observed_data", "constant_data")  # no leading (chain, draw) dims


def _named_dims(
    groups: dict[str, dict[str, np.ndarray]],
    dims: dict[str, list[str]],
    user_dims: Mapping[str, Sequence[str]] | None,
    coords: Mapping[str, Any] | None,
) -> dict[str, list[str]]:
    """`dims` with the user's `user_dims` in place (a site's leading dims named, the rest
    keep their defaults), after checking that each names a variable of `groups` with at least
    that many dims, and that each of `coords` labels a dim used somewhere with one value per
    position of every variable that uses it."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for group, arrays in groups.items():
        skip = 0 if group in _UNDRAWN_GROUPS else 2
        for name, value in arrays.items():
            shapes.setdefault(name, []).append(np.shape(value)[skip:])
    merged = dict(dims)
    for name, names in (user_dims or {}).items():
        if name not in shapes:
            raise ValueError(
                f"dims: no variable named {name!r}; the variables are {sorted(shapes)}"
            )
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"dims[{name!r}]: expected a list of dim names, got {names!r}")
        ndim = max(len(shape) for shape in shapes[name])
        if len(names) > ndim:
            raise ValueError(
                f"dims[{name!r}]: {len(names)} names {list(names)} for a variable of shape "
                f"{max(shapes[name], key=len)} ({ndim} dims after chain and draw)"
            )
        merged[name] = [*names, *dims.get(name, [])[len(names) :]]
    sizes: dict[str, set[tuple[str, int]]] = {}
    for name, names in merged.items():
        for shape in shapes.get(name, []):
            for dim, size in zip(names, shape, strict=False):
                sizes.setdefault(dim, set()).add((name, size))
    for dim, values in (coords or {}).items():
        if dim not in sizes:
            raise ValueError(f"coords[{dim!r}]: no variable has a dim named {dim!r}; the dims are "
                             f"{sorted(sizes)}")  # fmt: skip
        for name, size in sorted(sizes[dim]):
            if len(values) != size:
                raise ValueError(
                    f"coords[{dim!r}]: {len(values)} values, but dim {dim!r} of {name!r} has "
                    f"size {size}"
                )
    return merged


def groups_to_arviz(
    groups: dict[str, dict[str, np.ndarray]],
    dims: dict[str, list[str]],
    *,
    coords: Mapping[str, Any] | None = None,
    user_dims: Mapping[str, Sequence[str]] | None = None,
) -> Any:
    """ArviZ's data object of `groups` (``{"posterior": {site: array}, ...}``; empty groups left
    out) with `dims` (the user's `user_dims` in their place, checked, and their `coords`):
    ``from_dict`` of ArviZ 0.x or of ``arviz_base`` (1.x)."""
    groups = {key: value for key, value in groups.items() if value}
    dims = _named_dims(groups, dims, user_dims, coords)
    coords = {key: np.asarray(value) for key, value in (coords or {}).items()}
    if arviz_major_version() == 0:
        return _import_arviz().from_dict(**groups, coords=coords, dims=dims)
    import arviz_base

    return arviz_base.from_dict(groups, coords=coords, dims=dims)


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
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    vectorize_particles: bool | str | None = None,
) -> Any:
    """ArviZ's data object (``InferenceData`` on 0.x, ``DataTree`` on 1.x) for a fit.

    A posterior fit gives the group ``posterior`` (each site with dims ``{site}_dim_{i}``, draws
    as ``chain=1, draw=S``; the model's deterministic sites too, as `fit.sample` gives them), ``sample_stats`` (``log_p``, ``log_q``, ``log_weight``) and, when the
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
        coords: labels of named dims, as ArviZ takes them: ``{dim: values}``, one value per
            position (e.g. ``{"school": names}``).
        dims: names of a variable's leading dims after chain and draw, as ArviZ takes them
            (``{"theta": ["school"]}``); a name shared by a site and an observed site's data
            and log-likelihood applies to all of them; dims not named keep
            ``{site}_dim_{i}``.
        vectorize_particles: as in `diagnose`.

    Raises:
        TypeError: `fit` offers neither protocol.
        ValueError: `dims` names a variable that is not there or more dims than it has, or
            `coords` labels a dim no variable has or with the wrong number of values.
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
        if hasattr(fit, "deterministic"):  # the model's computed sites, as `fit.sample` has them
            draws = {**draws, **fit.deterministic(draws)}
    elif hasattr(fit, "log_prob") and hasattr(fit, "sample"):
        x = np.asarray(fit.sample(num_samples, seed=seed))
        draws, stats, observed, loglik = {"x": x}, {"log_prob": np.asarray(fit.log_prob(x))}, {}, {}
    else:
        raise TypeError(
            "fit: expected a posterior fit (with log_densities) or a density fit (with sample and "
            f"log_prob), got {type(fit).__name__}"
        )
    default_dims = {**site_dims(draws, 1), **site_dims(observed, 0)}
    groups = {
        "posterior": {k: v[None] for k, v in draws.items()},
        "sample_stats": {k: v[None] for k, v in stats.items()},
        "observed_data": observed,
        "log_likelihood": {k: v[None] for k, v in loglik.items()},
    }
    return groups_to_arviz(groups, default_dims, coords=coords, user_dims=dims)
