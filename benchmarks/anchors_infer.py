"""flowguides' one-call ``infer`` in both backends: fit, diagnose, and draws by the cheapest
route the PSIS k-hat trusts (the guide, PSIS resampling, or NeuTra NUTS at ``infer``'s own
NUTS defaults)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.anchor_base import Budget, Fitted, Problem, final_loss, flowguides_spec

__all__ = ["flowguides_infer"]


def flowguides_infer(backend: str) -> Callable[[Problem, Budget], Fitted]:
    """``flowguides.<backend>.infer`` with RealNVP at the budget's steps, learning rate,
    particles and seed. Its row adds ``route``, ``khat`` (the guide's, which chose the route),
    ``fit_s`` (the fit alone; ``wall_s`` is the whole call, NUTS included) and, where NUTS ran,
    ``divergences``."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        if backend == "pyro":
            import pyro

            from flowguides.pyro import infer

            model = problem.pyro_model()
            pyro.clear_param_store()
        else:
            from flowguides.numpyro import infer

            model = problem.numpyro_model()
        t0 = time.perf_counter()
        res = infer(
            model, flowguides_spec("realnvp"), num_steps=budget.num_steps, seed=budget.seed,
            progress=False,
            fit_options={"learning_rate": budget.learning_rate,
                         "num_particles": budget.num_particles},
        )  # fmt: skip
        wall = time.perf_counter() - t0
        extra: dict[str, Any] = {"route": res.route, "khat": float(res.diagnosis.khat),
                                 "fit_s": res.fit.timing.get("fit_s")}  # fmt: skip
        if res.mcmc is not None:
            extra["divergences"] = res.mcmc.divergences
        draws = {k: np.asarray(v) for k, v in res.draws.items()}
        loss = final_loss(list(res.fit.losses))
        return Fitted({"wall_s": wall, "compile_s": None}, loss, draws=draws, extra=extra)

    return fit
