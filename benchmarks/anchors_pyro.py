"""Pyro methods: autoguides in a plain ``SVI`` loop and flowguides' Pyro ``fit_posterior``.

Anchors: ``AutoNormal``, ``AutoIAFNormal`` and ``AutoNormalizingFlow`` built from
``affine_coupling`` (with reversing permutations between couplings) and from ``planar``, at the
sizes of :data:`benchmarks.anchor_base.ARCH`. flowguides' ``AutoFlowGuide`` runs in the same
loop (``flowguides:<family>``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from benchmarks import metrics
from benchmarks.anchor_base import ARCH, Budget, Fitted, Problem, final_loss, flowguides_spec
from flowguides.core import POSTERIOR_DECAY_START, learning_rate_at

__all__ = ["pyro_fit_posterior", "pyro_guide", "pyro_svi"]


def pyro_guide(kind: str, model: Callable) -> Any:
    """The Pyro guide ``kind`` for ``model``.

    Raises:
        ValueError: ``kind`` is none of the guides above.
    """
    import pyro.distributions.transforms as T
    from pyro.infer import autoguide as ag
    from pyro.nn import PyroModule  # noqa: F401  (registers nn parameters with Pyro)

    if kind == "AutoNormal":
        return ag.AutoNormal(model, init_loc_fn=ag.init_to_median)
    if kind == "AutoIAFNormal":
        return ag.AutoIAFNormal(
            model, hidden_dim=list(ARCH["hidden"]), num_transforms=ARCH["iaf"],
            init_loc_fn=ag.init_to_median,
        )  # fmt: skip
    if kind == "AutoNormalizingFlow(affine_coupling)":

        def coupling(dim: int) -> Any:
            import torch

            parts: list = []
            for i in range(ARCH["couplings"]):
                if i:
                    parts.append(T.Permute(torch.arange(dim - 1, -1, -1)))
                parts.append(T.affine_coupling(dim, hidden_dims=list(ARCH["hidden"])))
            return T.ComposeTransformModule(parts)

        return ag.AutoNormalizingFlow(model, coupling)
    if kind == "AutoNormalizingFlow(planar)":
        return ag.AutoNormalizingFlow(
            model,
            lambda dim: T.ComposeTransformModule([T.planar(dim) for _ in range(ARCH["planar"])]),
        )
    if kind.startswith("flowguides:"):
        from flowguides.pyro import AutoFlowGuide

        return AutoFlowGuide(model, flowguides_spec(kind.split(":")[1]))
    raise ValueError(f"method: unknown Pyro guide {kind!r}")


def pyro_svi(kind: str) -> Callable[[Problem, Budget], Fitted]:
    """A Pyro autoguide trained by a plain ``SVI`` loop (vectorised particles)."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        import pyro
        import torch
        from pyro.infer import SVI, Trace_ELBO

        model = problem.pyro_model()
        pyro.clear_param_store()
        pyro.set_rng_seed(budget.seed)
        t0 = time.perf_counter()
        guide = pyro_guide(kind, model)
        guide()  # set up the guide's parameters (Pyro's init) before the clock for steps
        n = budget.num_steps
        sched = pyro.optim.LambdaLR(
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": budget.learning_rate},
                "lr_lambda": lambda s: learning_rate_at(s, n, 1.0, POSTERIOR_DECAY_START),
            }
        )
        elbo = Trace_ELBO(
            num_particles=budget.num_particles, vectorize_particles=True, max_plate_nesting=0
        )
        svi = SVI(model, guide, sched, elbo)
        losses: list[float] = []

        def step(i: int) -> float:
            losses.append(svi.step())
            sched.step()
            return losses[-1]

        setup = time.perf_counter() - t0
        timing = metrics.timed_steps(step, n)
        timing["wall_s"] += setup
        timing["compile_s"] = None
        timing["setup_s"] = setup

        def draw(num: int, seed: int) -> tuple:
            return metrics.pyro_log_densities(model, guide, num, seed=seed)

        return Fitted(timing, final_loss(losses), draw)

    return fit


def pyro_fit_posterior(family: str) -> Callable[[Problem, Budget], Fitted]:
    """flowguides' Pyro ``fit_posterior`` (its defaults for everything not in the budget)."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        import pyro

        from flowguides.pyro import fit_posterior

        model = problem.pyro_model()
        pyro.clear_param_store()
        t0 = time.perf_counter()
        res = fit_posterior(
            model, flowguides_spec(family), num_steps=budget.num_steps,
            learning_rate=budget.learning_rate, num_particles=budget.num_particles,
            seed=budget.seed, progress=False,
        )  # fmt: skip
        timing = {"wall_s": time.perf_counter() - t0, "compile_s": None, **res.timing}

        def draw(num: int, seed: int) -> tuple:
            return metrics.pyro_log_densities(model, res.guide, num, seed=seed)

        return Fitted(timing, final_loss(list(res.losses)), draw)

    return fit
