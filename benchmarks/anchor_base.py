"""What every benchmarked method shares: the problem, the budget, the result and the
learning-rate search.

A method is ``fit(problem, budget) -> Fitted``. :func:`lr_searched` wraps an SVI method in the
anchors' learning-rate search: it fits once per rate of :data:`LR_GRID` and keeps the fit with
the best final ELBO, recording the chosen rate and every rate's ELBO in :attr:`Fitted.extra`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from benchmarks import metrics

__all__ = [
    "ARCH",
    "LR_GRID",
    "Budget",
    "Fitted",
    "Problem",
    "clear_jax_caches",
    "final_loss",
    "flowguides_spec",
    "lr_searched",
]

ARCH = {"couplings": 4, "hidden": (32, 32), "planar": 8, "iaf": 4, "ode_hidden": (32, 32)}
"""Matched sizes: RealNVP/coupling/IAF layers and widths, planar layers, ODE widths."""

LR_GRID = (1e-3, 3e-3, 1e-2)
"""Adam learning rates every SVI anchor of the posteriors suite tries (the best is kept)."""


@dataclass
class Problem:
    """A posterior to fit: a model in each PPL and what the truth is.

    Attributes:
        name: display name.
        pyro_model: factory returning the Pyro model (no arguments; built lazily).
        numpyro_model: factory returning the NumPyro model.
        reference: ``site -> (mean, sd)`` of the truth, or None.
        log_z: the log normalising constant, where known.
    """

    name: str
    pyro_model: Callable[[], Callable[[], None]]
    numpyro_model: Callable[[], Callable[[], None]]
    reference: metrics.Reference | None = None
    log_z: float | None = None


@dataclass(frozen=True)
class Budget:
    """Equal budget for every SVI method (samplers and Pathfinder use their own settings)."""

    num_steps: int
    num_particles: int = 8
    learning_rate: float = 1e-2
    seed: int = 0


@dataclass
class Fitted:
    """A fitted method: timings and how to draw from it.

    Attributes:
        timing: ``wall_s`` and, where measured, ``compile_s`` and ``steps_per_s``.
        final_loss: mean negative ELBO estimate over the last 10% of steps, or None.
        log_densities: ``(num, seed) -> (draws, log_p, log_q)``; None for samplers.
        draws: for samplers, their draws (``name -> (S, *shape)``).
        extra: fields the method adds to its row (the chosen learning rate, NUTS's Monte Carlo
            standard error, Pathfinder's k-hat).
    """

    timing: dict[str, float | None]
    final_loss: float | None = None
    log_densities: Callable[[int, int], tuple[dict, np.ndarray, np.ndarray]] | None = None
    draws: dict[str, np.ndarray] | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)


def flowguides_spec(family: str) -> Any:
    """The flowguides spec of one family at the matched sizes, in float64.

    Raises:
        ValueError: ``family`` is not ``realnvp``, ``realnvp-density`` (RealNVP with
            ``orientation="density"``), ``planar`` or ``neural_ode``.
    """
    from flowguides.spec import FlowSpec

    if family in ("realnvp", "realnvp-density"):
        # "realnvp": the library's default orientation ("auto": the sampling direction here)
        fields = {"orientation": "density"} if family == "realnvp-density" else {}
        return FlowSpec.realnvp(
            num_layers=ARCH["couplings"], hidden=ARCH["hidden"], dtype="float64", **fields
        )  # fmt: skip
    if family == "planar":
        return FlowSpec.planar(num_layers=ARCH["planar"], dtype="float64")
    if family == "neural_ode":
        return FlowSpec.neural_ode(
            hidden=ARCH["ode_hidden"], solver="rk4", num_steps=8, dtype="float64"
        )
    raise ValueError(
        f"family: expected 'realnvp', 'realnvp-density', 'planar' or 'neural_ode', got {family!r}"
    )


def final_loss(losses: list) -> float | None:
    """Mean of the last 10% of ``losses`` (at least one), or None for none."""
    arr = np.asarray([float(x) for x in losses[-max(len(losses) // 10, 1) :]])
    return float(arr.mean()) if len(arr) else None


def clear_jax_caches() -> None:
    """Empty JAX's compilation caches if JAX is loaded (a no-op for torch-only methods), so
    each fit of a search pays its own compiles."""
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()


def lr_searched(
    fit: Callable[[Problem, Budget], Fitted], grid: tuple[float, ...] = LR_GRID
) -> Callable[[Problem, Budget], Fitted]:
    """``fit`` run once per learning rate of ``grid`` (the budget's own rate is ignored),
    keeping the fit with the highest final ELBO (``-final_loss``).

    The kept fit's :attr:`Fitted.extra` gets ``learning_rate`` (the chosen rate),
    ``lr_search`` (``str(rate) -> final ELBO``, None where a rate failed or diverged) and
    ``lr_search_wall_s`` (the whole search) and, where a rate raised, ``lr_search_errors``; its timing is that of the chosen fit alone, which
    starts from empty JAX caches like every fit.

    Raises:
        RuntimeError: no rate of ``grid`` gave a finite final ELBO (the message lists each).
    """

    def searched(problem: Problem, budget: Budget) -> Fitted:
        t0 = time.perf_counter()
        tried: dict[str, float | None] = {}
        errors: dict[str, str] = {}
        best: tuple[float, float, Fitted] | None = None
        for lr in grid:
            clear_jax_caches()
            try:
                fitted = fit(problem, replace(budget, learning_rate=lr))
            except Exception as exc:  # noqa: BLE001 - a failing rate is one of the results
                tried[str(lr)] = None
                errors[str(lr)] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            loss = fitted.final_loss
            elbo = -loss if loss is not None and math.isfinite(loss) else None
            tried[str(lr)] = elbo
            if elbo is not None and (best is None or elbo > best[1]):
                best = (lr, elbo, fitted)
        if best is None:
            raise RuntimeError(
                f"learning-rate search: no rate of {list(grid)} gave a finite final ELBO: "
                f"{tried} {errors}"
            )
        lr, _, fitted = best
        fitted.extra.update(
            learning_rate=lr, lr_search=tried, lr_search_wall_s=time.perf_counter() - t0
        )
        if errors:
            fitted.extra["lr_search_errors"] = errors
        return fitted

    return searched
