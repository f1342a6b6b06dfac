"""What both backends' `PosteriorFit` share: methods derived from their ``log_densities``."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from flowguides.core.checks import check_vectorize_option

__all__ = ["PosteriorFitMethods", "call_with_vectorize"]


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

    def log_densities(
        self, num_samples: int, seed: int | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        raise NotImplementedError

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
