"""Backend-free pieces both backends share: schedule, data checks, splits, training errors.

Nothing here imports torch or jax; the backends call these so that they agree line for line.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from flowguides.spec import FlowSpec

__all__ = [
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NonFiniteValidationError",
    "PosteriorFitMethods",
    "VECTORIZE_OPTIONS",
    "as_spec",
    "call_with_vectorize",
    "check_data",
    "check_vectorize_option",
    "decay_steps",
    "learning_rate_at",
    "split_indices",
    "standardization",
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


def as_spec(spec: FlowSpec | Mapping[str, Any]) -> FlowSpec:
    """Accept a `FlowSpec` or its dict form; anything else is a `TypeError`."""
    if isinstance(spec, FlowSpec):
        return spec
    if isinstance(spec, Mapping):
        return FlowSpec.from_dict(dict(spec))
    raise TypeError(f"spec: expected a FlowSpec or a dict, got {type(spec).__name__}")


def learning_rate_at(step: int, num_steps: int, learning_rate: float) -> float:
    """The shared schedule: constant for the first half, then cosine decay to 1% at the end.

    Equal, step for step, to ``optax.join_schedules([optax.constant_schedule(lr),
    optax.cosine_decay_schedule(lr, decay_steps(num_steps), alpha=0.01)], [num_steps // 2])``,
    which the NumPyro backend uses; the Pyro backend calls this function.
    """
    half = num_steps // 2
    frac = min(max(step - half, 0) / decay_steps(num_steps), 1.0)
    return learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))


def decay_steps(num_steps: int) -> int:
    """Length of the cosine part of the schedule (at least 1)."""
    return max(num_steps - 1 - num_steps // 2, 1)


def check_data(data: Any, *, name: str = "data", dim: int | None = None) -> np.ndarray:
    """Return `data` as a finite 2-D float array ``(n, dim)``, or raise a `ValueError`.

    The message names the problem: the rank, the dimension, or the rows holding NaN/inf.
    """
    arr = np.asarray(data)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        raise ValueError(
            f"{name}: expected a 2-D array (n_points, dim), got shape {arr.shape}; "
            "for 1-D data use data[:, None]"
        )
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n_points, dim), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns, got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"{name}: {len(rows)} row(s) hold NaN or inf, rows [{shown}]")
    return arr.astype(np.float64, copy=False)


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train/validation row indices; validation gets ``round(n * fraction)`` rows."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction: expected a number in [0, 1), got {validation_fraction!r}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction))
    if validation_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    if n - n_val < 1:
        raise ValueError(f"data: {n} row(s) leave nothing to train on after the validation split")
    return perm[n_val:], perm[:n_val]


def standardization(train: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and standard deviation of the training rows (``None`` when switched off).

    A constant column keeps standard deviation 1 so that nothing is divided by zero.
    """
    if not standardize:
        return None
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean, std


AUTO_SCALES = (0.1, 1.0)
"""The plain starts ``init_scale="auto"`` weighs against the Laplace start: 0.1 (Pyro's
`AutoNormal` default) and 1.0 (a standard-normal base, as in `AutoNormalizingFlow`)."""


PRECONDITION = ("precondition.shift", "precondition.scale_tril")
"""Names of a guide's fixed (untrained) last map ``z = shift + scale_tril @ x``: the whitening
it takes from a Laplace start (``shift`` the MAP, ``scale_tril`` the Cholesky factor of the
inverse Hessian of the negative log joint there). Not spec weights; saved in ``meta.json``."""


FULL_RANK_MAX_DIM = 256
"""Largest latent dimension whose Laplace start whitens with the full Hessian (else diagonal)."""


def check_preconditioner(fixed: Mapping[str, Any], dim: int) -> dict[str, np.ndarray]:
    """`fixed` as float arrays after checking its names and shapes.

    ``scale_tril`` is either a ``(dim, dim)`` lower-triangular matrix with a positive diagonal
    (full-rank whitening) or a ``(dim,)`` vector of positive scales (a diagonal whitening,
    stored and applied as a vector so that memory and work grow with ``dim``, not ``dim**2``).
    """
    if set(fixed) != set(PRECONDITION):
        raise ValueError(
            f"preconditioner: expected the keys {list(PRECONDITION)}, got {sorted(fixed)}"
        )
    shift, tril = (np.asarray(fixed[k], dtype=float) for k in PRECONDITION)
    if shift.shape != (dim,) or tril.shape not in ((dim,), (dim, dim)):
        raise ValueError(
            f"preconditioner: expected shapes ({dim},) and ({dim}, {dim}) (full) or ({dim},) "
            f"(diagonal), got {shift.shape} and {tril.shape}"
        )
    if not np.all(np.isfinite(shift)) or not np.all(np.isfinite(tril)):
        raise ValueError("preconditioner: expected finite values, got NaN or inf")
    if tril.ndim == 1:
        if not np.all(tril > 0):
            raise ValueError(
                f"preconditioner: a diagonal {PRECONDITION[1]!r} must be positive, got "
                f"min {tril.min()!r}"
            )
    elif np.any(np.triu(tril, 1) != 0) or not np.all(np.diagonal(tril) > 0):
        raise ValueError(
            f"preconditioner: {PRECONDITION[1]!r} must be lower triangular with a positive diagonal"
        )
    return {PRECONDITION[0]: shift, PRECONDITION[1]: tril}


VECTORIZE_OPTIONS = ("auto", True, False)
"""Values of ``vectorize_particles``: ``"auto"`` tries evaluating a batch of draws at once and
falls back to one at a time where the model does not broadcast; ``True`` at once; ``False``
one at a time. NumPyro's fits vectorise every model (``vmap``) and accept it for parity."""


def check_vectorize_option(value: Any, *, allow_none: bool = False) -> None:
    """Raise a `ValueError` unless `value` is ``"auto"``, ``True`` or ``False`` (or None)."""
    if allow_none and value is None:
        return
    if not (isinstance(value, bool) or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"vectorize_particles: expected 'auto', True or False, got {value!r}")


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
