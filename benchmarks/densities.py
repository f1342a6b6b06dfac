"""The density-fitting methods compared on `benchmarks.density_data` (forward KL).

Every method, at matched sizes (:data:`DENSITY_ARCH`), trains under the same
`benchmarks.density_training.DensityBudget` (steps, batch size, Adam's peak learning rate and
schedule, seed) and the same `benchmarks.density_training.CheckpointPolicy` (validation rows,
cadence, patience, best parameters restored). That policy is ``fit_density``'s own, which the
flowguides rows run with ``standardize=False`` (every method sees the same standardised
arrays); the anchors train in `benchmarks.density_training`'s loops, which apply it step for
step. One difference is the library's: flow-matching fits score a fixed subset of the
validation rows every `flowguides.core.validate_every` steps.

Methods: flowguides' ``fit_density`` (RealNVP, planar, neural ODE by maximum likelihood, with
RNODE's regularisers, by flow matching with independent and optimal-transport coupling; both
backends), zuko's ``RealNVP`` and ``CNF`` (at flowguides' solver tolerances), normflows' RealNVP
and planar flows, FlowJAX's coupling and planar flows. :func:`evaluate` runs one and returns its
row fields; the test NLL of a neural-ODE flow uses the exact trace.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.density_data import DATASETS, DensityData, load, standard_error
from benchmarks.density_training import (
    CHECKPOINT,
    CheckpointPolicy,
    DensityBudget,
    flowjax_fit,
    torch_fit,
)
from flowguides.core import VALIDATE_EVERY, validate_every

__all__ = [
    "DATASETS",
    "DENSITY_ARCH",
    "DENSITY_METHODS",
    "RNODE_WEIGHTS",
    "DensityBudget",
    "DensityData",
    "Fitted",
    "evaluate",
    "load",
]

DENSITY_ARCH = {"couplings": 4, "hidden": (64, 64), "planar": 16, "ode_hidden": (64, 64)}
"""Matched sizes for every density method."""

RNODE_WEIGHTS = {"kinetic_weight": 0.01, "jacobian_weight": 0.01}
"""The regulariser weights of the RNODE rows."""


@dataclass
class Fitted:
    """A fitted method: its per-point test NLL and its own row fields."""

    nll: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


# -- methods: each returns a `Fitted` ----------------------------------------------------------
def _flowguides(
    backend: str,
    family: str,
    objective: str = "maximum_likelihood",
    coupling: str = "independent",
    defaults: bool = False,
    steps: int | None = None,
) -> Callable[..., Fitted]:
    """A flowguides ``fit_density`` row: under the shared budget and checkpoint policy, or with
    ``defaults`` under ``fit_density``'s own defaults (learning rate, batch size, patience,
    validation split; for maximum likelihood the budget's steps, for flow matching its default
    steps too, or `steps` where given), which the row's ``method_settings`` record."""

    def fit(data: DensityData, budget: DensityBudget, policy: CheckpointPolicy = CHECKPOINT):
        if policy.every != VALIDATE_EVERY:
            raise ValueError(
                f"policy.every: fit_density scores every {VALIDATE_EVERY} steps, got {policy.every}"
            )
        mod = importlib.import_module(f"flowguides.{backend}")
        common = {"standardize": False, "objective": objective, "coupling": coupling,
                  "seed": budget.seed, "progress": False}  # fmt: skip
        if defaults:
            fm_steps = steps if objective == "flow_matching" else budget.num_steps
            res = mod.fit_density(data.train, _spec(family), num_steps=fm_steps, **common)
        else:
            res = mod.fit_density(
                data.train, _spec(family), num_steps=budget.num_steps,
                batch_size=budget.batch_size, learning_rate=budget.learning_rate,
                validation_fraction=policy.validation_fraction, patience=policy.patience, **common,
            )  # fmt: skip
        if defaults:
            settings = _default_settings(budget, objective, coupling, steps)
            extra = _fit_summary(res, settings["num_steps"], settings["patience"])
            extra["method_settings"] = settings
        else:
            extra = _fit_summary(res, budget.num_steps, policy.patience)
        if family.startswith("realnvp") or family == "planar":
            return Fitted(-np.asarray(res.log_prob(data.test)), extra)
        nll, nfe = _exact_ode_nll(backend, res, data.test)
        return Fitted(nll, extra | {"nfe_test": nfe})

    return fit


def _default_settings(
    budget: DensityBudget, objective: str, coupling: str, fm_steps: int | None = None
) -> dict[str, Any]:
    """The settings ``fit_density`` ran with when given none but the steps (a defaults row;
    flow matching: `fm_steps`, None for its default)."""
    from flowguides.core import DENSITY_LEARNING_RATE, density_budget, density_patience

    fm = objective == "flow_matching"
    steps, batch = density_budget(fm_steps if fm else budget.num_steps, None, objective, coupling)
    return {"defaults": "fit_density", "num_steps": steps, "batch_size": batch,
            "learning_rate": DENSITY_LEARNING_RATE, "validation_fraction": 0.1,
            "patience": density_patience(None, objective, steps)}  # fmt: skip


def _spec(family: str) -> Any:
    """The `FlowSpec` of a flowguides row (float64, `DENSITY_ARCH` sizes)."""
    from flowguides.spec import FlowSpec

    if family.startswith("realnvp"):
        # "realnvp": the library's default orientation ("auto": the density direction here)
        orientation = family.partition("-")[2]
        fields = {"orientation": orientation} if orientation else {}
        return FlowSpec.realnvp(
            num_layers=DENSITY_ARCH["couplings"], hidden=DENSITY_ARCH["hidden"], dtype="float64",
            **fields,
        )  # fmt: skip
    if family == "planar":
        return FlowSpec.planar(num_layers=DENSITY_ARCH["planar"], dtype="float64")
    weights = RNODE_WEIGHTS if family == "rnode" else {}
    return FlowSpec.neural_ode(DENSITY_ARCH["ode_hidden"], dtype="float64", **weights)


def _fit_summary(res: Any, num_steps: int, patience: int) -> dict[str, Any]:
    """Steps run, the kept step, the best and last validation NLL, and field evaluations of a
    fit run with `num_steps` and `patience`."""
    fm = res.objective == "flow_matching"
    train, val = (res.losses[k] for k in (("flow_matching", "val_nll") if fm else ("train", "val")))
    every = validate_every(res.objective, num_steps, patience)
    due = [s for s in range(len(train)) if s % every == 0 or s == num_steps - 1]
    out: dict[str, Any] = {"steps_run": len(train)}
    if len(val):
        best = int(np.nanargmin(val))
        out.update(best_step=due[best], best_val_nll=float(val[best]), last_val_nll=float(val[-1]))
        if "nfe_val" in res.history:
            out["nfe_val_best"] = int(res.history["nfe_val"][best])
    for key in ("nfe_forward", "nfe_backward"):
        if key in res.history and len(res.history[key]):
            out[f"{key}_mean"] = float(np.mean(res.history[key]))
    return out


def _exact_ode_nll(backend: str, res: Any, test: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-point test NLL of a fitted neural ODE with the exact trace, and the field
    evaluations of that one batched solve (shared by every test point)."""
    if backend == "pyro":
        import torch

        from flowguides.pyro.ode import NeuralODE

        odes = [m for m in res.flow.modules() if isinstance(m, NeuralODE)]
        traces, start = [m.trace for m in odes], sum(m.nfe for m in odes)
        for m in odes:
            m.trace = "exact"
        try:
            with torch.no_grad():
                nll = -res.log_prob(test)
        finally:
            for m, trace in zip(odes, traces, strict=True):
                m.trace = trace
        return nll, int(sum(m.nfe for m in odes) - start)
    import jax.numpy as jnp

    from flowguides.core import validation_spec
    from flowguides.numpyro.build import Flow
    from flowguides.numpyro.ode import training_solves

    flow = Flow(validation_spec(res.spec), res.flow.dim, res.flow.params)
    with training_solves() as records:
        log_q = flow.log_prob(jnp.asarray(test))
    return -np.asarray(log_q), int(sum(int(r["nfe"]) for r in records))


def _zuko(kind: str) -> Callable[..., Fitted]:
    def fit(data: DensityData, budget: DensityBudget, policy: CheckpointPolicy = CHECKPOINT):
        import torch
        import zuko

        d = data.train.shape[1]
        if kind == "CNF":  # flowguides' default solver tolerances
            flow = zuko.flows.CNF(d, hidden_features=DENSITY_ARCH["ode_hidden"], atol=1e-5)
        else:
            flow = zuko.flows.RealNVP(
                d, transforms=DENSITY_ARCH["couplings"], hidden_features=DENSITY_ARCH["hidden"]
            )
        flow = flow.double()
        summary = torch_fit(flow, lambda x: -flow().log_prob(x).mean(), data, budget, policy)
        with torch.no_grad():
            return Fitted(-flow().log_prob(torch.as_tensor(data.test)).numpy(), summary)

    return fit


def _normflows(kind: str) -> Callable[..., Fitted]:
    def fit(data: DensityData, budget: DensityBudget, policy: CheckpointPolicy = CHECKPOINT):
        import normflows as nf
        import torch

        d = data.train.shape[1]
        if kind == "planar":
            flows = [nf.flows.Planar((d,)) for _ in range(DENSITY_ARCH["planar"])]
        else:
            flows = []
            for _ in range(DENSITY_ARCH["couplings"]):
                sizes = [d // 2, *DENSITY_ARCH["hidden"], 2 * (d - d // 2)]
                flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP(sizes, init_zeros=True))]
                flows += [nf.flows.Permute(d, mode="swap")]
        model = nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), flows)
        model = model.double()
        summary = torch_fit(model, model.forward_kld, data, budget, policy)
        with torch.no_grad():
            return Fitted(-model.log_prob(torch.as_tensor(data.test)).numpy(), summary)

    return fit


def _flowjax(kind: str) -> Callable[..., Fitted]:
    def fit(data: DensityData, budget: DensityBudget, policy: CheckpointPolicy = CHECKPOINT):
        import jax
        import jax.numpy as jnp
        from flowjax.distributions import Normal
        from flowjax.flows import coupling_flow, planar_flow

        d = data.train.shape[1]
        key = jax.random.key(budget.seed)
        base = Normal(jnp.zeros(d))
        if kind == "planar":
            flow = planar_flow(key, base_dist=base, flow_layers=DENSITY_ARCH["planar"])
        else:
            flow = coupling_flow(
                key, base_dist=base, flow_layers=DENSITY_ARCH["couplings"],
                nn_width=DENSITY_ARCH["hidden"][0], nn_depth=len(DENSITY_ARCH["hidden"]),
            )  # fmt: skip
        flow, summary = flowjax_fit(flow, data, budget, policy)
        return Fitted(-np.asarray(flow.log_prob(jnp.asarray(data.test))), summary)

    return fit


FM_STEP_BUDGETS = (5000, 10000, 15000)
"""Shorter flow-matching fits (otherwise at ``fit_density``'s defaults) for its time to reach
a maximum-likelihood fit's quality."""

DENSITY_METHODS: dict[str, Callable[..., Fitted]] = {
    **{
        f"flowguides-{b} {name}": _flowguides(b, *how)
        for b in ("pyro", "numpyro")
        for name, how in (
            ("RealNVP", ("realnvp",)),
            ("RealNVP (density orientation)", ("realnvp-density",)),
            ("RealNVP (sampling orientation)", ("realnvp-sampling",)),
            ("planar", ("planar",)),
            ("neural ODE", ("neural_ode",)),
            ("neural ODE (RNODE)", ("rnode",)),
            ("neural ODE (FM)", ("neural_ode", "flow_matching")),
            ("neural ODE (FM OT)", ("neural_ode", "flow_matching", "ot")),
            (
                "RealNVP (fit_density defaults)",
                ("realnvp", "maximum_likelihood", "independent", True),
            ),
            (
                "neural ODE (FM at fit_density defaults)",
                ("neural_ode", "flow_matching", "independent", True),
            ),
            *(
                (
                    f"neural ODE (FM at fit_density defaults for {n} steps)",
                    ("neural_ode", "flow_matching", "independent", True, n),
                )
                for n in FM_STEP_BUDGETS
            ),
        )
    },
    "zuko RealNVP": _zuko("RealNVP"),
    "zuko CNF": _zuko("CNF"),
    "normflows RealNVP": _normflows("realnvp"),
    "normflows planar": _normflows("planar"),
    "flowjax coupling": _flowjax("coupling"),
    "flowjax planar": _flowjax("planar"),
}
"""Density method name -> ``fit(data, budget, policy=CHECKPOINT) -> Fitted``."""


def _fresh() -> None:
    """Empty JAX's compilation caches and flowguides' compiled programs: each row pays its own
    compiles."""
    import jax

    import flowguides.numpyro

    jax.clear_caches()
    flowguides.numpyro.clear_compiled()


def evaluate(
    method: str, data: DensityData, budget: DensityBudget, policy: CheckpointPolicy = CHECKPOINT
) -> dict[str, Any]:
    """One method's row fields: ``test_nll`` (mean nats per test point, None when not finite,
    with ``error`` set), ``test_nll_se`` (``sd / sqrt(n)`` of the per-point NLL),
    ``test_nll_median``, ``wall_s`` (fit and test scoring, from empty compilation caches),
    ``entropy_gap`` where the data's entropy is known, ``method_settings`` (batch size,
    learning rate and the checkpoint policy: a row key), and the method's own summary
    (``steps_run``, ``best_step``, ``best_val_nll``, ``last_val_nll``; neural-ODE rows ``nfe_test``, the field
    evaluations of one exact test solve, plus the training means ``nfe_forward_mean``,
    ``nfe_backward_mean`` and flow matching's ``nfe_val_best``)."""
    _fresh()
    t0 = time.perf_counter()
    fitted = DENSITY_METHODS[method](data, budget, policy)
    wall = time.perf_counter() - t0
    points = np.asarray(fitted.nll, dtype=float)
    nll = float(np.mean(points))
    row: dict[str, Any] = {
        "test_nll": nll if math.isfinite(nll) else None,
        "test_nll_se": standard_error(points) if math.isfinite(nll) else None,
        "test_nll_median": float(np.median(points)),
        "wall_s": wall,
        "method_settings": {"batch_size": budget.batch_size, "learning_rate": budget.learning_rate,
                            "validate_every": policy.every, "patience": policy.patience,
                            "validation_fraction": policy.validation_fraction},
    }  # fmt: skip
    if data.entropy is not None and math.isfinite(nll):
        row["entropy_gap"] = nll - data.entropy
    row.update(fitted.extra)
    if not math.isfinite(nll):
        row["error"] = f"non-finite test NLL ({nll})"
    return row
