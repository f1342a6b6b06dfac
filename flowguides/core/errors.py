"""The errors and warnings both backends raise: one class each, re-exported by both.

`except flowguides.core.DiscreteLatentError` catches the Pyro backend's and the NumPyro
backend's alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "DiscreteLatentError",
    "FitBelowStartWarning",
    "LaplaceFallbackWarning",
    "MaskedLatentWarning",
    "LoadError",
    "MaxStepsExceededError",
    "NoLatentSitesError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NonFiniteValidationError",
    "SaveError",
    "SubsampledSiteWarning",
    "ToleranceWarning",
    "check_not_delta",
    "whole_data_sites",
]


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN or infinite loss; the last finite state is kept.

    Attributes:
        step: the (0-based) step whose loss was not finite.
        last_good: the last parameters whose loss was finite (backend objects).
        fit: the fit object holding the last good state, when the backend can offer one.
    """

    def __init__(self, step: int, loss: float, last_good: Any = None, fit: Any = None) -> None:
        super().__init__(
            f"loss became {loss} at step {step}; training stopped and the parameters from the "
            f"last finite step were kept (lower learning_rate, set clip_norm, or check the model "
            f"for values outside its support)"
        )
        self.step = step
        self.loss = loss
        self.last_good = last_good
        self.fit = fit


class NonFiniteGradientError(NonFiniteLossError):
    """The loss was finite but its gradient was not; no update was made from it."""

    def __init__(self, step: int, loss: float, last_good: Any = None, fit: Any = None) -> None:
        super().__init__(step, loss, last_good, fit)
        self.args = (
            f"the gradient became NaN or infinite at step {step} (loss {loss}); training "
            "stopped and the parameters from the last finite step were kept (lower "
            "learning_rate, set clip_norm, or check the model for values outside its support)",
        )

    def __str__(self) -> str:
        return self.args[0]


class NonFiniteValidationError(NonFiniteLossError):
    """`fit_density`: no validation loss was finite, so no fitted state can be trusted."""

    def __init__(self, step: int, loss: float, last_good: Any = None, fit: Any = None) -> None:
        super().__init__(step, loss, last_good, fit)
        self.args = (
            f"the validation loss was not finite at any validation up to step {step} (last "
            f"{loss}): the flow's log-density is NaN or infinite on the held-out rows; check "
            "the data for extreme rows, keep standardize=True, or lower learning_rate",
        )

    def __str__(self) -> str:
        return self.args[0]


class DiscreteLatentError(ValueError):
    """The model has a discrete latent site, which a continuous flow cannot represent."""


class NoLatentSitesError(ValueError):
    """The model has no latent sample site, so there is nothing for a guide to fit."""


def check_not_delta(site: str, fn: Any) -> None:
    """Raise a `ValueError` naming `site` where its distribution `fn` (through any ``.mask``,
    ``.expand`` or ``.to_event``) is a ``Delta``: a latent point mass has no density for a guide
    to fit (every draw off the point is impossible, so the loss is not finite)."""
    while fn is not None:
        if type(fn).__name__ == "Delta":
            raise ValueError(
                f"site {site!r}: a latent Delta site (a point mass: its value is fixed by its "
                "argument, with no density a guide could fit); write it as a deterministic "
                f"site (pyro.deterministic / numpyro.deterministic({site!r}, value)), or pass "
                "obs= if it is observed"
            )
        fn = getattr(fn, "base_dist", None)


class LaplaceFallbackWarning(UserWarning):
    """The Laplace start met a non-positive Hessian diagonal (or left the support) and used a
    plain scale there; the message names the coordinates' sites."""


class MaskedLatentWarning(UserWarning):
    """A latent site's mask leaves coordinates without density: the guide cannot fit them."""


class FitBelowStartWarning(UserWarning):
    """A posterior fit ended with a clearly worse ELBO than it started from (its start, e.g.
    the Laplace approximation, was the better guide): lower ``learning_rate`` or raise
    ``num_particles``."""


class MaxStepsExceededError(RuntimeError):
    """An adaptive ODE solver needed more than the spec's ``max_steps`` steps."""


class ToleranceWarning(UserWarning):
    """A float32 flow asks an adaptive solver for tolerances float32 cannot reach."""


class SaveError(ValueError):
    """The object cannot be saved, or the target exists and `overwrite` is off."""


class LoadError(ValueError):
    """A saved folder is missing a file, corrupt, or does not match what it is loaded onto."""


class SubsampledSiteWarning(UserWarning):
    """A deterministic site inside a plate that subsamples holds one value per minibatch row,
    not per data row: `fit.sample` and `to_arviz` leave it out."""


def whole_data_sites(sites: Mapping[str, Iterable[str]], subsampled: Iterable[str]) -> list[str]:
    """The names in `sites` (``{deterministic site: the names of its plates}``) outside every
    plate of `subsampled`, warning (`SubsampledSiteWarning`) once for those left out: inside a
    plate that subsamples, a deterministic site's values belong to one random minibatch of rows
    (another at every model run), which `fit.sample` would lay out as rows 0, 1, ... ."""
    subsampled = set(subsampled)
    inside = {name: sorted(subsampled & set(plates)) for name, plates in sites.items()}
    left_out = {name: plates for name, plates in inside.items() if plates}
    if left_out:
        listed = ", ".join(f"{name!r} (plate {plates[0]!r})" for name, plates in left_out.items())
        warnings.warn(
            f"deterministic site(s) {listed} sit inside a plate that subsamples: their values "
            "belong to one random minibatch of rows, not to the data's rows, so they are left "
            "out of the draws; compute them from the latent draws over all rows",
            SubsampledSiteWarning,
            stacklevel=3,
        )
    return [name for name in sites if name not in left_out]
