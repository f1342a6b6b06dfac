"""Flow-matching rules both backends follow: how noise and data are paired in a minibatch,
and how a flow-matching fit is validated.

``coupling="independent"`` pairs each data row with an independent base draw (Lipman et al.,
2023). ``coupling="ot"`` is minibatch optimal-transport conditional flow matching (OT-CFM,
Tong et al., 2023): the base draws of a minibatch are permuted by the exact assignment that
minimises the total squared distance ``sum_j |x1_j - x0_perm[j]|²`` (`ot_permutation`, Scipy's
`linear_sum_assignment` on the host), which straightens the learnt paths, so solving the
fitted ODE needs fewer field evaluations. The base draws are still ``N(0, I)`` as a set; only
the pairing changes.

A flow-matching fit is validated by what users care about, the negative log-likelihood:
every `validate_every` steps (`FLOW_MATCHING_VALIDATE_EVERY`, sparser in long fits so that
one runs about `FLOW_MATCHING_VALIDATIONS` validations) an exact-trace solve scores a fixed subset of at
most `FLOW_MATCHING_VALIDATION_ROWS` validation rows (`validation_spec`). A flow-matching step
costs one field evaluation and its gradient on a minibatch, a solve tens of evaluations with
``dim`` vector-Jacobian products each, so the schedule is sparser and the subset smaller than
a maximum-likelihood fit's (every `flowguides.core.VALIDATE_EVERY` steps on every validation
row), to keep validation a small share of training.

Importing this module imports neither torch nor jax; `ot_permutation` imports Scipy when
called.

References:
    Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023.
    Tong et al., "Improving and Generalizing Flow-Based Generative Models with Minibatch
    Optimal Transport", TMLR 2024 (arXiv:2302.00482, 2023).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowguides.core.training import VALIDATE_EVERY
from flowguides.spec import FlowSpec

__all__ = [
    "COUPLINGS",
    "FLOW_MATCHING_VALIDATE_EVERY",
    "FLOW_MATCHING_VALIDATIONS",
    "FLOW_MATCHING_VALIDATION_ROWS",
    "check_coupling",
    "ot_permutation",
    "validate_every",
    "validation_spec",
]

COUPLINGS = ("independent", "ot")
"""How `fit_density(objective="flow_matching")` pairs base draws with data rows."""

FLOW_MATCHING_VALIDATE_EVERY = 100
"""A flow-matching fit scores its validation subset every this many steps (and at the first
and last step)."""

FLOW_MATCHING_VALIDATIONS = 50
"""A flow-matching fit longer than ``FLOW_MATCHING_VALIDATE_EVERY * FLOW_MATCHING_VALIDATIONS``
steps validates about this many times (see `validate_every`): each validation is an
exact-trace solve, tens of steps' worth, so at a fixed cadence a 20,000-step fit spent about a
fifth of its time validating (Pyro, the densities suite's two-moons set)."""

FLOW_MATCHING_VALIDATION_ROWS = 512
"""The most validation rows a flow-matching fit scores (the first of the shuffled validation
split, the same rows for the whole fit). The kept parameters are those of the best of many
noisy scores, so too few rows keep a lucky score rather than a good flow (128 rows did so in
the densities suite's two-moons rows); each score's solve grows with the rows."""


def validate_every(objective: str, num_steps: int, patience: int) -> int:
    """The steps between `fit_density`'s validations (it also validates after the first and
    the last step).

    Maximum likelihood: `flowguides.core.VALIDATE_EVERY`. Flow matching:
    `FLOW_MATCHING_VALIDATE_EVERY`, or in a fit of more than
    ``FLOW_MATCHING_VALIDATE_EVERY * FLOW_MATCHING_VALIDATIONS`` steps every
    ``ceil(num_steps / FLOW_MATCHING_VALIDATIONS)`` steps, but never sparser than `patience`
    (so early stopping still sees a validation within its patience).
    """
    if objective != "flow_matching":
        return VALIDATE_EVERY
    every = max(FLOW_MATCHING_VALIDATE_EVERY, -(-num_steps // FLOW_MATCHING_VALIDATIONS))
    return min(every, max(FLOW_MATCHING_VALIDATE_EVERY, patience))


def check_coupling(coupling: str, objective: str) -> None:
    """Raise a `ValueError` unless `coupling` is one of `COUPLINGS` and fits `objective`."""
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling: expected one of {list(COUPLINGS)}, got {coupling!r}")
    if coupling != "independent" and objective != "flow_matching":
        raise ValueError(
            f"coupling: {coupling!r} pairs noise and data for objective='flow_matching', "
            f"got objective={objective!r} (use coupling='independent')"
        )


def ot_permutation(x0: Any, x1: Any) -> np.ndarray:
    """The pairing of base draws with data rows that minimises the total squared distance.

    Args:
        x0: base draws ``(n, dim)``.
        x1: data rows ``(n, dim)``.

    Returns:
        ``perm`` ``(n,)``, a permutation of ``range(n)`` (int64): row ``j`` of `x1` is paired
        with row ``perm[j]`` of `x0`, and ``sum_j |x1[j] - x0[perm[j]]|²`` is the least over
        all permutations.

    Raises:
        ValueError: `x0` and `x1` are not two 2-D arrays of the same shape.
        ImportError: Scipy is not installed.
    """
    x0, x1 = np.asarray(x0, dtype=np.float64), np.asarray(x1, dtype=np.float64)
    if x0.ndim != 2 or x0.shape != x1.shape:
        raise ValueError(
            f"x0, x1: expected two (n, dim) arrays of the same shape, got {x0.shape} and {x1.shape}"
        )
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # the Pyro extra does not pull Scipy in
        raise ImportError(
            "coupling='ot' needs scipy (scipy.optimize.linear_sum_assignment); pip install scipy"
        ) from exc
    cost = np.sum((x1[:, None, :] - x0[None, :, :]) ** 2, axis=-1)  # (data j, noise i)
    _, perm = linear_sum_assignment(cost)
    return perm.astype(np.int64)


def validation_spec(spec: FlowSpec) -> FlowSpec:
    """`spec` (one neural-ODE layer) with the exact trace and no training extras.

    The validation negative log-likelihood of a flow-matching fit solves with this spec:
    the same solver and tolerances as the fitted flow's `log_prob`, the exact trace even
    where ``trace="auto"`` resolves to Hutchinson's estimator, no STEER end time and no RNODE
    regularisers.
    """
    layer = spec.layers[0].model_copy(
        update={"trace": "exact", "steer": 0.0, "kinetic_weight": 0.0, "jacobian_weight": 0.0}
    )
    return spec.model_copy(update={"layers": (layer,)})
