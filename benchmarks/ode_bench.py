"""Neural-ODE density benchmark: forward KL (test NLL minus entropy) against wall time.

Usage: ``python -m benchmarks.ode_bench [--quick] [--backends ...] [--datasets ...] [--out PATH]``.

Data: 8 Gaussians (entropy 2.833 nats) and the checkerboard (entropy log 32 = 3.466 nats) from
`benchmarks.densities`, split 75/25 and standardised; test NLLs are reported in the data's own
scale (the standardisation's log-Jacobian added back), so ``NLL - entropy`` is the forward KL.

Methods, per backend, all with the library's float32 default and the same Adam budget shape:
neural ODE by maximum likelihood (``dopri5``, and ``rk4`` with 8 steps), with RNODE
(``dopri5``, ``kinetic_weight = jacobian_weight = 0.01``), by flow matching (evaluated exactly
with ``dopri5``) at several step budgets, pairing noise and data independently (``ode-fm``)
and by minibatch optimal transport (``ode-fm-ot``, ``coupling="ot"``), and RealNVP. Each row
holds the training wall time, the evaluation time, the mean vector-field evaluations per step
(and, for flow matching, those of the validation solve that scored the kept flow), or the error
the method raised. The summary lines per backend and data set are the goal of issue 7: the wall
time each flow-matching coupling needs to reach the maximum-likelihood CNF's (dopri5) final
NLL, as a fraction of that CNF's.

``--quick`` (smaller nets, fewer steps) is a smoke run; its numbers are not converged.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
os.environ["JAX_ENABLE_X64"] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.density_data import DensityData, load  # noqa: E402
from flowguides.spec import FlowSpec  # noqa: E402

__all__ = ["ENTROPY", "FM_METHODS", "load_raw_scale", "main", "methods", "run", "summarize"]

ENTROPY = {"8gaussians": 2.833, "checkerboard": math.log(32.0)}
"""Differential entropy (nats) of each data set in its own scale."""

FM_METHODS = {"ode-fm": "independent", "ode-fm-ot": "ot"}
"""Flow-matching row names and their coupling."""

SETTINGS = {
    "quick": {"n": 4000, "hidden": (32, 32), "ml_steps": 40, "fm_steps": (200, 800),
              "realnvp_steps": 300, "learning_rate": 5e-3},
    "full": {"n": 8000, "hidden": (64, 64), "ml_steps": 600,
             "fm_steps": (250, 500, 1000, 2000, 4000), "realnvp_steps": 2000,
             "learning_rate": 2e-3},
}  # fmt: skip


def load_raw_scale(name: str, n: int, seed: int = 0) -> tuple[DensityData, float]:
    """`benchmarks.density_data.load`'s split and ``sum(log sd)`` of its standardisation."""
    data = load(name, n, seed)
    return data, data.log_sd


def methods(settings: dict[str, Any]) -> list[tuple[str, FlowSpec, str, str, int]]:
    """``(name, spec, objective, coupling, num_steps)`` rows, flow-matching budgets spelled out
    for both couplings."""
    hidden = settings["hidden"]
    ml, fm = settings["ml_steps"], settings["fm_steps"]
    mle, ind = "maximum_likelihood", "independent"
    rows = [
        ("ode-ml-dopri5", FlowSpec.neural_ode(hidden=hidden), mle, ind, ml),
        ("ode-ml-rk4", FlowSpec.neural_ode(hidden=hidden, solver="rk4", num_steps=8), mle, ind, ml),
        (
            "ode-rnode-dopri5",
            FlowSpec.neural_ode(hidden=hidden, kinetic_weight=0.01, jacobian_weight=0.01),
            mle,
            ind,
            ml,
        ),
    ]
    for name, coupling in FM_METHODS.items():
        rows += [
            (name, FlowSpec.neural_ode(hidden=hidden), "flow_matching", coupling, s) for s in fm
        ]
    realnvp = FlowSpec.realnvp(num_layers=4, hidden=hidden)
    rows.append(("realnvp", realnvp, mle, ind, settings["realnvp_steps"]))
    return rows


def _one(backend: str, data: DensityData, log_sd: float, method: tuple, lr: float) -> dict:
    name, spec, objective, coupling, num_steps = method
    row: dict[str, Any] = {"backend": backend, "dataset": data.name, "method": name,
                           "objective": objective, "coupling": coupling,
                           "num_steps": num_steps}  # fmt: skip
    try:
        module = importlib.import_module(f"flowguides.{backend}")
        kwargs = {} if objective == "maximum_likelihood" else {"objective": objective}
        if coupling != "independent":
            kwargs["coupling"] = coupling
        start = time.perf_counter()
        fit = module.fit_density(
            data.train, spec, num_steps=num_steps, learning_rate=lr, progress=False, **kwargs
        )
        row["wall_s"] = time.perf_counter() - start
        start = time.perf_counter()
        nll = float(-np.mean(fit.log_prob(data.test))) + log_sd
        row["eval_s"] = time.perf_counter() - start
        row["nll"], row["kl"] = nll, nll - ENTROPY[data.name]
        row["steps_run"] = len(next(iter(fit.losses.values())))
        for key in ("nfe_forward", "nfe_backward"):
            if key in getattr(fit, "history", {}):
                row[f"{key}_mean"] = float(np.mean(fit.history[key]))
        if "nfe_val" in fit.history and len(fit.losses.get("val_nll", ())):
            row["nfe_val_best"] = int(fit.history["nfe_val"][np.argmin(fit.losses["val_nll"])])
    except Exception as exc:  # noqa: BLE001 - a failing method is a result, recorded
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per backend, data set and flow-matching coupling: flow matching's time to the ML CNF's
    final NLL, as a fraction."""
    out = []
    for backend, dataset in sorted({(r["backend"], r["dataset"]) for r in rows}):
        mine = [r for r in rows if r["backend"] == backend and r["dataset"] == dataset]
        ml = next((r for r in mine if r["method"] == "ode-ml-dopri5" and "nll" in r), None)
        for name, coupling in FM_METHODS.items():
            fm = sorted((r for r in mine if r["method"] == name and "nll" in r),
                        key=lambda r: r["wall_s"])  # fmt: skip
            if ml is not None and fm:
                out.append(_reached(backend, dataset, coupling, ml, fm))
    return out


def _reached(backend: str, dataset: str, coupling: str, ml: dict, fm: list[dict]) -> dict:
    reached = next((r for r in fm if r["nll"] <= ml["nll"]), None)
    return {
        "backend": backend, "dataset": dataset, "coupling": coupling, "ml_nll": ml["nll"],
        "ml_wall_s": ml["wall_s"],
        "fm_wall_s_to_reach": None if reached is None else reached["wall_s"],
        "fraction": None if reached is None else reached["wall_s"] / ml["wall_s"],
        "goal_met": reached is not None and reached["wall_s"] <= 0.2 * ml["wall_s"],
    }  # fmt: skip


def table(rows: list[dict], summary: list[dict]) -> str:
    """The rows and the summary as fixed-width text."""
    head = f"{'backend':8} {'dataset':12} {'method':17} {'steps':>6} {'wall s':>8} "
    head += f"{'eval s':>7} {'NLL':>7} {'KL':>7} {'nfe f/b':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:8} {r['dataset']:12} {r['method']:17} {r['error'][:60]}")
            continue
        nfe = ""
        if "nfe_forward_mean" in r:
            nfe = f"{r['nfe_forward_mean']:.0f}/{r.get('nfe_backward_mean', float('nan')):.0f}"
        lines.append(
            f"{r['backend']:8} {r['dataset']:12} {r['method']:17} {r['steps_run']:6d} "
            f"{r['wall_s']:8.1f} {r['eval_s']:7.2f} {r['nll']:7.3f} {r['kl']:7.3f} {nfe:>11}"
        )
    for s in summary:
        frac = "not reached" if s["fraction"] is None else f"{s['fraction']:.2f} of its time"
        lines.append(
            f"{s['backend']} {s['dataset']}: ML dopri5 NLL {s['ml_nll']:.3f} in "
            f"{s['ml_wall_s']:.1f} s; flow matching ({s['coupling']}) reaches it in {frac} "
            f"(goal <= 0.20: {'met' if s['goal_met'] else 'not met'})"
        )
    return "\n".join(lines)


def run(
    quick: bool, backends: list[str], datasets: list[str], ml_steps: int | None = None
) -> dict[str, Any]:
    """Every backend x data set x method; returns the JSON-ready result."""
    import torch

    torch.set_num_threads(1)
    settings = dict(SETTINGS["quick" if quick else "full"])
    if ml_steps is not None:
        settings["ml_steps"] = ml_steps
    rows = []
    for dataset in datasets:
        data, log_sd = load_raw_scale(dataset, settings["n"])
        for backend in backends:
            for method in methods(settings):
                rows.append(_one(backend, data, log_sd, method, settings["learning_rate"]))
                print(table([rows[-1]], []).splitlines()[-1], flush=True)
    summary = summarize(rows)
    return {"quick": quick, "settings": settings, "entropy": ENTROPY, "rows": rows,
            "summary": summary}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (smaller nets, fewer steps)"
    )
    parser.add_argument("--backends", nargs="+", default=["pyro", "numpyro"])
    parser.add_argument("--datasets", nargs="+", default=list(ENTROPY), choices=list(ENTROPY))
    parser.add_argument("--ml-steps", type=int, help="override the maximum-likelihood budget")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ode.json"))
    args = parser.parse_args(argv)
    result = run(args.quick, args.backends, args.datasets, args.ml_steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result["rows"], result["summary"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
