"""The methods compared on posteriors, by display name, each behind one interface:
``fit(problem, budget) -> Fitted`` (:mod:`benchmarks.anchor_base`).

Anchors (what a user would otherwise pick), each at its best: Pyro ``AutoNormal``,
``AutoIAFNormal`` and ``AutoNormalizingFlow`` (coupling, planar) (:mod:`benchmarks.anchors_pyro`);
NumPyro ``AutoNormal``, ``AutoIAFNormal``, ``AutoBNAFNormal``, and ``AutoLaplaceApproximation``
and ``AutoMultivariateNormal`` started at the MAP; NumPyro NUTS with 4 chains
(:mod:`benchmarks.anchors_numpyro`); FlowJAX's coupling flow with its ``ElboLoss``, blackjax's
multi-path Pathfinder with PSIS resampling, and a bare hand-written jitted JAX RealNVP loop as
the speed floor (:mod:`benchmarks.anchors_jax`). flowguides' ``AutoFlowGuide`` runs through
``fit_posterior`` (:data:`METHODS`) and in the anchors' plain SVI loop (:data:`SPEED_METHODS`).

Every SVI method gets the same step budget, particles and schedule (``fit_posterior``'s:
:func:`flowguides.core.learning_rate_at` from ``POSTERIOR_DECAY_START``; each anchor keeps its
library's Adam, flowguides its ``POSTERIOR_ADAM_B2``) and the architectures match (:data:`ARCH`). In the
posteriors suite every SVI anchor also gets a learning-rate search (:func:`lr_searched` over
:data:`LR_GRID`; flowguides keeps the budget's rate); the speed suite runs them all at the
budget's rate. :data:`SETTINGS` holds the settings of each method that change its results
beyond the budget (a field of each row's key).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.anchor_base import (
    ARCH,
    LR_GRID,
    Budget,
    Fitted,
    Problem,
    flowguides_spec,
    lr_searched,
)
from benchmarks.anchors_infer import flowguides_infer
from benchmarks.anchors_jax import PATHFINDER_SETTINGS, bare_realnvp, flowjax_elbo, pathfinder
from benchmarks.anchors_numpyro import (
    NUTS_SETTINGS,
    numpyro_fit_posterior,
    numpyro_svi,
    nuts,
)
from benchmarks.anchors_pyro import pyro_fit_posterior, pyro_svi

__all__ = [
    "ARCH",
    "LR_GRID",
    "METHODS",
    "SETTINGS",
    "SPEED_METHODS",
    "Budget",
    "Fitted",
    "Problem",
    "flowguides_spec",
]

Method = Callable[[Problem, Budget], Fitted]

_FAMILIES = (("RealNVP", "realnvp"), ("planar", "planar"), ("neural ODE", "neural_ode"))

_SVI_ANCHORS: dict[str, Method] = {
    "pyro AutoNormal": pyro_svi("AutoNormal"),
    "pyro AutoIAFNormal": pyro_svi("AutoIAFNormal"),
    "pyro AutoNormalizingFlow(coupling)": pyro_svi("AutoNormalizingFlow(affine_coupling)"),
    "pyro AutoNormalizingFlow(planar)": pyro_svi("AutoNormalizingFlow(planar)"),
    "numpyro AutoNormal": numpyro_svi("AutoNormal"),
    "numpyro AutoIAFNormal": numpyro_svi("AutoIAFNormal"),
    "numpyro AutoBNAFNormal": numpyro_svi("AutoBNAFNormal"),
    "flowjax coupling (ElboLoss)": flowjax_elbo,
}
_AT_MAP: dict[str, Method] = {
    "numpyro AutoLaplaceApproximation": numpyro_svi("AutoLaplaceApproximation"),
    "numpyro AutoMultivariateNormal": numpyro_svi("AutoMultivariateNormal"),
}

_OBJECTIVES: dict[str, dict[str, Any]] = {
    "STL": {"gradient": "stl"},
    "IWELBO K=8, DReG": {"objective": "iwelbo", "gradient": "stl", "num_inner": 8},
}
"""fit_posterior's other training objectives (the ELBO table of docs/benchmarks.md): the sticking-the-landing
gradient, and the importance-weighted ELBO of 8 inner draws per particle with its doubly
reparametrised gradient (``gradient="stl"`` with ``objective="iwelbo"``)."""

_EARLIER_RULE = {"decay_start": 0.5, "adam_b2": 0.999}
"""``fit_posterior``'s schedule and Adam before commit b8cd0e2 (constant first half, optax's
b2): the A/B row of the objectives table against today's ``POSTERIOR_DECAY_START`` and
``POSTERIOR_ADAM_B2``."""


def _under_rule(method: Method, decay_start: float, adam_b2: float) -> Method:
    """`method` with ``fit_posterior``'s schedule start and Adam b2 set for its fit (compiled
    programs cleared before and after: they hold the optimiser and are not keyed by it)."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        from flowguides.core import training
        from flowguides.numpyro import clear_compiled

        saved = training.POSTERIOR_DECAY_START, training.POSTERIOR_ADAM_B2
        clear_compiled()
        training.POSTERIOR_DECAY_START, training.POSTERIOR_ADAM_B2 = decay_start, adam_b2
        try:
            return method(problem, budget)
        finally:
            training.POSTERIOR_DECAY_START, training.POSTERIOR_ADAM_B2 = saved
            clear_compiled()

    return fit


METHODS: dict[str, Method] = {
    **{f"flowguides-pyro {n}": pyro_fit_posterior(f) for n, f in _FAMILIES},
    **{f"flowguides-numpyro {n}": numpyro_fit_posterior(f) for n, f in _FAMILIES},
    **{
        f"flowguides-numpyro RealNVP ({n})": numpyro_fit_posterior("realnvp", **o)
        for n, o in _OBJECTIVES.items()
    },  # fmt: skip
    "flowguides-numpyro RealNVP (earlier schedule)": _under_rule(
        numpyro_fit_posterior("realnvp"), **_EARLIER_RULE
    ),
    "flowguides-pyro RealNVP (density orientation)": pyro_fit_posterior("realnvp-density"),
    "flowguides-numpyro RealNVP (density orientation)": numpyro_fit_posterior("realnvp-density"),
    **{name: lr_searched(fit) for name, fit in {**_SVI_ANCHORS, **_AT_MAP}.items()},
    "blackjax multi-path Pathfinder": pathfinder,
    "numpyro NUTS": nuts,
    "flowguides-numpyro infer (RealNVP)": flowguides_infer("numpyro"),
    "flowguides-pyro infer (RealNVP)": flowguides_infer("pyro"),
}
"""Posterior methods by display name, flowguides first; SVI anchors with the rate search."""

SETTINGS: dict[str, dict[str, Any]] = {
    **{f"flowguides-numpyro RealNVP ({n})": dict(o) for n, o in _OBJECTIVES.items()},
    "flowguides-numpyro RealNVP (earlier schedule)": dict(_EARLIER_RULE),
    **{name: {"lr_grid": list(LR_GRID)} for name in _SVI_ANCHORS},
    **{name: {"lr_grid": list(LR_GRID), "init": "MAP (L-BFGS)"} for name in _AT_MAP},
    "blackjax multi-path Pathfinder": dict(PATHFINDER_SETTINGS),
    "numpyro NUTS": dict(NUTS_SETTINGS),
}
"""Settings of a :data:`METHODS` entry beyond the budget (``method_settings`` in its row)."""

SPEED_METHODS: dict[str, Method] = {
    **{f"flowguides-pyro {n} (SVI loop)": pyro_svi(f"flowguides:{f}") for n, f in _FAMILIES},
    **{f"flowguides-pyro {n} (fit_posterior)": pyro_fit_posterior(f) for n, f in _FAMILIES},
    **{f"flowguides-numpyro {n} (SVI loop)": numpyro_svi(f"flowguides:{f}") for n, f in _FAMILIES},
    **{
        f"flowguides-numpyro {n} (fit_posterior)": numpyro_fit_posterior(f, twice=True)
        for n, f in _FAMILIES
    },
    **_SVI_ANCHORS,
    "bare JAX RealNVP (floor)": bare_realnvp,
}
"""Speed-suite methods, all at the budget's learning rate: guides in the same plain SVI loop,
fit_posterior timed twice, the anchors, the floor."""
