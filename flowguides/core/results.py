"""What both backends' results share: `PosteriorFit`'s methods derived from its
``log_densities`` and `NeuTraResult` (`infer`'s routing is in `flowguides.core.routes`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowguides.core.checks import check_vectorize_option

__all__ = ["NEUTRA_OPTIONS", "NeuTraResult", "PosteriorFitMethods", "call_with_vectorize"]

NEUTRA_OPTIONS = ("num_warmup", "num_samples", "num_chains", "target_accept_prob")
"""The options of `infer`'s ``neutra`` dict (`seed` and `progress` are `infer`'s own)."""


def call_with_vectorize(
    method: Any, *args: Any, vectorize_particles: bool | str | None = None
) -> Any:
    """``method(*args)``, passing `vectorize_particles` where it is set and `method` takes it
    (a fit that vectorises every model, NumPyro's with ``vmap``, has no use for it)."""
    check_vectorize_option(vectorize_particles, allow_none=True)
    params = inspect.signature(method).parameters.values()
    takes = any(p.name == "vectorize_particles" or p.kind is p.VAR_KEYWORD for p in params)
    if vectorize_particles is None or not takes:
        return method(*args)
    return method(*args, vectorize_particles=vectorize_particles)


class PosteriorFitMethods:
    """What both backends' `PosteriorFit` derive from their own ``log_densities``.

    ``vectorize_particles`` (``"auto"``, ``True``, ``False``; None for the fit's own choice)
    says how a batch of draws goes through the model; see `VECTORIZE_OPTIONS`.
    """

    def __post_init__(self) -> None:
        self.spec = self.guide.spec  # the spec its flow was built from (Pyro: the model's dtype)

    def log_densities(
        self, num_samples: int, seed: int | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        raise NotImplementedError

    def to_arviz(
        self,
        num_samples: int = 4000,
        seed: int | None = None,
        *,
        coords: Mapping | None = None,
        dims: Mapping | None = None,
        vectorize_particles: bool | str | None = None,
    ) -> Any:
        """`flowguides.to_arviz` of this fit (ArviZ's ``InferenceData`` or ``DataTree``)."""
        from flowguides.inference_data import to_arviz

        options = {"coords": coords, "dims": dims, "vectorize_particles": vectorize_particles}
        return to_arviz(self, num_samples, seed, **options)

    def importance_sample(
        self,
        num_samples: int,
        seed: int | None = None,
        *,
        vectorize_particles: bool | str | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(draws, log_weights)`` with ``log_weights = log p(x, z) - log q(z)`` per draw."""
        draws, log_p, log_q = call_with_vectorize(
            self.log_densities, num_samples, seed, vectorize_particles=vectorize_particles
        )
        return draws, log_p - log_q

    def elbo(
        self,
        num_samples: int = 1000,
        seed: int | None = None,
        *,
        vectorize_particles: bool | str | None = None,
    ) -> float:
        """Monte Carlo ELBO: the mean of ``log p - log q`` over `num_samples` draws."""
        log_weights = self.importance_sample(
            num_samples, seed, vectorize_particles=vectorize_particles
        )[1]
        return float(np.mean(log_weights))

    def deterministic(self, draws: dict[str, Any]) -> dict[str, np.ndarray]:
        """The model's deterministic sites missing from `draws` (constrained latent draws
        ``{site: (S, *shape)}``), from the model run at each draw (the PPL's `Predictive`)."""
        return self.guide.deterministic(draws, *self.args, **self.kwargs)

    def resample(
        self,
        num_samples: int,
        seed: int | None = None,
        *,
        vectorize_particles: bool | str | None = None,
    ) -> Any:
        """PSIS-importance-resampled draws and IS-corrected means/sds (see
        `flowguides.diagnostics.resample_fit`); warns when k-hat says the fit is unreliable."""
        from flowguides.diagnostics import resample_fit

        return resample_fit(self, num_samples, seed, vectorize_particles=vectorize_particles)


@dataclass(repr=False, eq=False)
class NeuTraResult:
    """Draws and diagnostics of a NeuTra NUTS run.

    Attributes:
        samples: constrained draws ``{site: (num_chains * num_samples, *site_shape)}``, the
            layout of `PosteriorFit.sample` (chains one after another).
        diverging: ``(num_chains, num_samples)``: whether each transition diverged.
        ess: bulk effective sample size of each coordinate, ``{site: site_shape}``.
        r_hat: split R-hat of each coordinate, ``{site: site_shape}`` (split chains, so it
            is defined for one chain too).
        num_chains: the number of chains.
        reparam_site: the site NUTS sampled: the flow's base noise; empty where NUTS ran on
            the model's own latent sites (`infer`'s route ``"nuts"``).
        timing: ``sampling_s`` (warm-up and sampling, all chains).
    """

    samples: dict[str, np.ndarray]
    diverging: np.ndarray
    ess: dict[str, np.ndarray]
    r_hat: dict[str, np.ndarray]
    num_chains: int
    reparam_site: str
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def divergences(self) -> int:
        """The number of divergent transitions after warm-up, all chains."""
        return int(np.sum(self.diverging))

    def moving_r_hat(self) -> np.ndarray:
        """The split R-hat of every coordinate whose draws move, flat: a coordinate constant
        over every draw of every chain (a fixed entry, such as a Cholesky factor's ``[0, 0]``)
        has no R-hat and is left out, unless no coordinate moves at all (then every one is
        kept: a chain that does not move)."""
        rhats, moves = [], []
        for name, value in self.r_hat.items():
            rhats.append(np.asarray(value, np.float64).ravel())
            draws = self.samples.get(name)
            varies = None if draws is None else np.ptp(np.reshape(draws, (len(draws), -1)), 0)
            moves.append(np.ones(rhats[-1].size, bool) if varies is None else varies > 0)
        rhat, move = (np.concatenate(x) if x else np.zeros(0) for x in (rhats, moves))
        return rhat[move.astype(bool)] if move.any() else rhat

    def __repr__(self) -> str:
        draws = len(self.diverging.reshape(-1)) // max(self.num_chains, 1)
        ess = min((float(np.min(v)) for v in self.ess.values() if np.size(v)), default=np.nan)
        moving = self.moving_r_hat()
        r_hat = float(np.max(moving)) if moving.size else np.nan
        return (
            f"NeuTraResult({self.num_chains} chain(s) x {draws} draws, sites "
            f"{sorted(self.samples)}, {self.divergences} divergences, min ESS {ess:.4g}, "
            f"max R-hat {r_hat:.4g})"
        )

    def by_chain(self) -> dict[str, np.ndarray]:
        """`samples` as ``{site: (num_chains, num_samples, *site_shape)}``."""
        return {k: v.reshape(self.num_chains, -1, *v.shape[1:]) for k, v in self.samples.items()}

    def to_arviz(self, *, coords: Mapping | None = None, dims: Mapping | None = None) -> Any:
        """ArviZ's data object (``InferenceData`` on 0.x, ``DataTree`` on 1.x): the group
        ``posterior`` (dims ``{site}_dim_{i}``, or as `dims` names them, labelled by
        `coords`, as in `flowguides.to_arviz`; one chain per chain) and ``sample_stats``
        with ``diverging``."""
        from flowguides.inference_data import groups_to_arviz, site_dims

        posterior = self.by_chain()
        groups = {"posterior": posterior, "sample_stats": {"diverging": self.diverging}}
        return groups_to_arviz(groups, site_dims(posterior, 2), coords=coords, user_dims=dims)
