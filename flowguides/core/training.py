"""The training rules both backends follow: schedule, default learning rate, splits, starts.

The NumPyro backend builds the schedule with optax (equal step for step to `learning_rate_at`);
the Pyro backend calls `learning_rate_at`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from flowguides.core.errors import FitBelowStartWarning

__all__ = [
    "AFFINE_PARAMETERS",
    "AUTO_SCALES",
    "BELOW_START_NATS",
    "DEFAULT_LEARNING_RATE",
    "FULL_RANK_MAX_DIM",
    "coordinate_sites",
    "LEARNING_RATE_REFERENCE_DIM",
    "MODE_TOLERANCE",
    "VALIDATE_EVERY",
    "decay_steps",
    "DENSITY_DECAY_START",
    "DENSITY_LEARNING_RATE",
    "DENSITY_PATIENCE",
    "WITH_REPLACEMENT_RATIO",
    "density_patience",
    "default_learning_rate",
    "hold_steps",
    "learning_rate_at",
    "POSTERIOR_ADAM_B2",
    "POSTERIOR_DECAY_START",
    "split_indices",
    "standardization",
    "warn_if_below_start",
]

DEFAULT_LEARNING_RATE = 1e-2
"""`fit_posterior`'s peak learning rate up to `LEARNING_RATE_REFERENCE_DIM` latent dimensions."""

LEARNING_RATE_REFERENCE_DIM = 1000
"""Above this many latent dimensions the default learning rate falls as ``1 / dim``."""

POSTERIOR_DECAY_START = 0.25
"""`fit_posterior`'s schedule decays (cosine, to 1% at the last step) from this fraction of the
steps on, after a constant first quarter. Against `fit_density`'s constant first half (both
with `POSTERIOR_ADAM_B2`) it gains at the default 2,000 steps (the 10-D funnel, the
posteriordb set); decaying from the first step gains a little more there but fits less at a
few hundred steps (the banana of ``tests/conformance/test_power.py``). See the objectives
section of the benchmarks page."""

POSTERIOR_ADAM_B2 = 0.99
"""`fit_posterior`'s Adam second-moment decay (PyTorch's and optax's default is 0.999): the
ELBO's gradient is a Monte Carlo estimate, and a shorter memory of its scale follows the
falling noise as the guide fits. Measured with `POSTERIOR_DECAY_START`."""

DENSITY_DECAY_START = 0.5
"""`fit_density`'s schedule is constant for the first half of the steps, then decays."""

DENSITY_LEARNING_RATE = 3e-3
"""`fit_density`'s default peak learning rate, from the defaults sweep of the benchmarks
(``benchmarks/density_defaults.py``, rows in ``benchmarks/results/density_defaults.jsonl``):
the best or near the best rate for RealNVP and planar flows at 500 and 2,000 steps."""

DENSITY_PATIENCE = 500
"""`fit_density`'s default patience for maximum likelihood: training stops after this many steps
without a better validation negative log-likelihood (see `density_patience`)."""

WITH_REPLACEMENT_RATIO = 10
"""NumPyro's `fit_posterior` draws a subsampled plate's indices uniformly *with* replacement
(``O(subsample_size)`` a step) where the plate is at least this many times its
``subsample_size``, and without replacement (NumPyro's distribution, vectorised) below. Both
make the minibatch ELBO unbiased; their variances differ by the finite population factor
``(size - subsample_size) / (size - 1)``, within 10% above the ratio."""

VALIDATE_EVERY = 25
"""`fit_density` evaluates the validation loss every this many steps (and at the first and
last step)."""

BELOW_START_NATS = 1.0
"""`warn_if_below_start` ignores a fit that ends less than this many nats below its start."""

MODE_TOLERANCE = 0.1
"""Largest ``|gradient| x Laplace scale`` the start search accepts as a mode."""


AFFINE_PARAMETERS = ("affine.loc", "affine.log_scale")
"""Name endings of a posterior guide's affine base (per coordinate: vector-like under maximal
update parametrisation): with `fit_posterior`'s default learning rate they train at
`DEFAULT_LEARNING_RATE`, whatever the dimension (see `default_learning_rate`)."""


def default_learning_rate(dim: int) -> float:
    """`fit_posterior`'s default peak learning rate for a `dim`-dimensional latent space.

    ``DEFAULT_LEARNING_RATE * min(1, LEARNING_RATE_REFERENCE_DIM / dim)``. Adam moves every
    weight by about the learning rate per step, so a coupling network's first layer, whose
    fan-in grows with ``dim``, moves its pre-activations by about ``learning_rate * dim``; with
    noisy ELBO gradients that is a random walk which, at a fixed rate, overwhelms the signal in
    high dimensions (the fit drifts below its own start). Scaling the rate as ``1 / fan-in``
    (the rule of maximal-update parametrisation for Adam) keeps the per-step change of
    pre-activations the same as at the reference size. The same rule leaves vector-like
    parameters at the unscaled rate: the guide's affine base (`AFFINE_PARAMETERS`), each of
    whose entries moves one coordinate alone, trains at `DEFAULT_LEARNING_RATE` in
    `fit_posterior` (where `learning_rate` is not given), so a global parameter that must
    travel several whitened units from its start gets there in as many steps as in low
    dimensions. See the benchmarks page for the high-dimensional rows.

    References:
        Yang et al., "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
        Hyperparameter Transfer", 2022.
    """
    return DEFAULT_LEARNING_RATE * min(1.0, LEARNING_RATE_REFERENCE_DIM / max(int(dim), 1))


def warn_if_below_start(losses: np.ndarray, learning_rate: float, *, stacklevel: int = 3) -> bool:
    """Warn (`FitBelowStartWarning`) when a fit's last losses are clearly above its first.

    Compares the first step's negative-ELBO estimate (taken at the start, before any update)
    with the mean of the last tenth of the steps; "clearly" means by more than three standard
    errors (from the spread of the last tenth, for the one first estimate and the mean), by
    more than 0.1% of the start's magnitude and by more than `BELOW_START_NATS` (a fit that
    starts at an exact Laplace approximation drifts by noise alone; that is no harm worth a
    warning). Fits of fewer than 40 steps are not judged.

    Returns:
        Whether it warned.
    """
    losses = np.asarray(losses, dtype=float)
    losses = losses[np.isfinite(losses)]
    n = losses.size
    if n < 40:
        return False
    first = losses[:1]
    last = losses[-max(2, n // 10) :]
    spread = float(np.std(last, ddof=1))
    error = spread * math.sqrt(1.0 / first.size + 1.0 / last.size)
    start, end = float(first.mean()), float(last.mean())
    if end - start > max(3.0 * error, 1e-3 * abs(start), BELOW_START_NATS):
        warnings.warn(
            f"the fit ended below its start: mean negative ELBO {end:.6g} over the last "
            f"{last.size} steps against {start:.6g} at the first step (the start was the "
            f"better guide); lower learning_rate (was {learning_rate:g}) or raise "
            "num_particles",
            FitBelowStartWarning,
            stacklevel=stacklevel,
        )
        return True
    return False


def learning_rate_at(
    step: int, num_steps: int, learning_rate: float, decay_start: float = DENSITY_DECAY_START
) -> float:
    """The shared schedule: constant for the first `decay_start` of the steps, then cosine
    decay to 1% at the last step (`fit_density`: `DENSITY_DECAY_START`, half the steps;
    `fit_posterior`: `POSTERIOR_DECAY_START`, a quarter).

    Equal, step for step, to ``optax.join_schedules([optax.constant_schedule(lr),
    optax.cosine_decay_schedule(lr, decay_steps(num_steps, decay_start), alpha=0.01)],
    [hold_steps(num_steps, decay_start)])``, which the NumPyro backend uses; the Pyro backend
    calls this function.
    """
    hold = hold_steps(num_steps, decay_start)
    frac = min(max(step - hold, 0) / decay_steps(num_steps, decay_start), 1.0)
    return learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))


def hold_steps(num_steps: int, decay_start: float = DENSITY_DECAY_START) -> int:
    """Steps at the peak learning rate before the decay starts."""
    return int(num_steps * decay_start)


def decay_steps(num_steps: int, decay_start: float = DENSITY_DECAY_START) -> int:
    """Length of the cosine part of the schedule (at least 1)."""
    return max(num_steps - 1 - hold_steps(num_steps, decay_start), 1)


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


FULL_RANK_MAX_DIM = 256
"""Largest latent dimension whose Laplace start whitens with the full Hessian (else diagonal)."""


def coordinate_sites(sizes: Mapping[str, int], coords: Sequence[int]) -> list[str]:
    """Names of the sites that own packed coordinates `coords`, given each site's number of
    unconstrained coordinates in packing order (`sizes`); for warnings that name sites."""
    owners, pos = [], 0
    for name, size in sizes.items():
        if any(pos <= c < pos + size for c in coords):
            owners.append(name)
        pos += size
    return owners


DENSITY_BUDGETS = {
    "maximum_likelihood": (2000, 256),
    "flow_matching": (20000, 1024),
    "flow_matching_ot": (20000, 256),
}
"""`fit_density`'s default ``(num_steps, batch_size)`` per objective (where the call passes
None): a flow-matching step solves nothing, so it is cheap, and its regression target is
noisy, so it takes more and larger steps (the flow-matching sweep of
``benchmarks/density_defaults.py``, rows in ``benchmarks/results/density_defaults.jsonl``);
with ``coupling="ot"`` (``"flow_matching_ot"``) 256 rows, since the exact assignment's cost
grows as the cube of the batch size."""


def density_budget(
    num_steps: int | None, batch_size: int | None, objective: str, coupling: str = "independent"
) -> tuple[int, int]:
    """``(num_steps, batch_size)`` with each None replaced by `DENSITY_BUDGETS`'s default for
    `objective` and `coupling` (maximum likelihood's for an unknown objective: the
    objective's own check names it).

    Raises:
        ValueError: `batch_size` is not a positive integer.
    """
    key = "flow_matching_ot" if (objective, coupling) == ("flow_matching", "ot") else objective
    steps, batch = DENSITY_BUDGETS.get(key, DENSITY_BUDGETS["maximum_likelihood"])
    num_steps = steps if num_steps is None else num_steps
    batch_size = batch if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return num_steps, batch_size


def density_patience(patience: int | None, objective: str, num_steps: int) -> int:
    """`fit_density`'s patience in steps: `patience` (a positive integer) as given, or for None
    the default: `DENSITY_PATIENCE` for maximum likelihood, and `num_steps` (no early stopping;
    the best-validation parameters are kept all the same) for flow matching, whose validation
    NLL stalls while the learning rate is constant and improves again as it decays (see the
    conventions page's training defaults).

    Raises:
        ValueError: `patience` is neither None nor a positive integer.
    """
    if patience is None:
        return num_steps if objective == "flow_matching" else DENSITY_PATIENCE
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience: expected a positive integer or None, got {patience!r}")
    return patience
