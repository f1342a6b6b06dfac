"""How far `infer`'s routes can be trusted: one NumPyro RealNVP fit per posteriordb posterior
and seed, then for each number of diagnosed draws (``--draws``) the guide's PSIS k-hat and the
errors of its own draws and of their PSIS resample against the reference, and, with
``--neutra``, of NeuTra NUTS (at `neutra`'s defaults or ``--neutra-budget``). The rows are
the evidence for `flowguides.core.routes`' thresholds (docs/infer.md, "The routes").

One JSON row per (problem, seed, draws) (``suite`` ``infer_routes``), appended to ``--out``
(default ``benchmarks/results/infer_routes.jsonl``). Usage::

    python -m benchmarks.infer_routes --seeds 0 1 2 --draws 4000 16000 [--neutra]
    python -m benchmarks.infer_routes --fit-options '{"objective": "iwelbo", "num_inner": 8}'
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import metrics, rows  # noqa: E402
from benchmarks.anchor_base import Budget, flowguides_spec  # noqa: E402
from benchmarks.models import posteriordb  # noqa: E402

OUT = Path(__file__).parent / "results" / "infer_routes.jsonl"


def _errors(draws: dict, reference: metrics.Reference) -> dict:
    s = metrics.score(None, None, draws, reference)
    return {k: s[k] for k in ("mean_err", "sd_ratio_min", "sd_ratio_max")}


def study(
    name: str, seed: int, num_draws: list[int], neutra: dict | None, budget: Budget, options: dict
) -> list:
    """The rows of one posterior and seed (one fit with `options` of `fit_posterior`, every
    draw count)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from benchmarks.run import problem
    from flowguides.diagnostics import diagnose_weights, resample
    from flowguides.numpyro import fit_posterior

    prob = problem(name)
    t0 = time.perf_counter()
    fit = fit_posterior(
        prob.numpyro_model(), flowguides_spec("realnvp"), num_steps=budget.num_steps,
        seed=seed, progress=False, learning_rate=budget.learning_rate,
        num_particles=budget.num_particles, **options,
    )  # fmt: skip
    base = {"suite": "infer_routes", "problem": name, "method": "flowguides-numpyro RealNVP",
            "fit_options": options,
            "num_steps": budget.num_steps, "num_particles": budget.num_particles, "seed": seed,
            "fit_s": time.perf_counter() - t0}  # fmt: skip
    if neutra is not None:
        base["neutra_budget"] = neutra
        t1 = time.perf_counter()
        res = fit.neutra(seed=seed, progress=False, **neutra)
        samples = dict(res.samples)
        samples.update(fit.deterministic(samples))
        base.update({f"neutra_{k}": v for k, v in _errors(samples, prob.reference).items()})
        base["neutra_s"], base["neutra_divergences"] = time.perf_counter() - t1, res.divergences
        base["neutra_min_ess"] = min(float(np.min(v)) for v in res.ess.values())
    out = []
    for s in num_draws:
        t1 = time.perf_counter()
        proposals, log_p, log_q = fit.log_densities(s, seed)
        proposals = {k: np.asarray(v) for k, v in proposals.items()}
        proposals.update(fit.deterministic(proposals))
        diag = diagnose_weights(log_p, log_q)
        lw = np.asarray(log_p, np.float64) - np.asarray(log_q, np.float64)
        psis = resample(proposals, lw, s, seed=[seed, 1])
        row = dict(base, num_draws=s, khat=diag.khat, ess=diag.ess,
                   draws_s=time.perf_counter() - t1)  # fmt: skip
        row.update({f"guide_{k}": v for k, v in _errors(proposals, prob.reference).items()})
        row.update({f"psis_{k}": v for k, v in _errors(psis, prob.reference).items()})
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", nargs="+", default=list(posteriordb.NAMES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--draws", nargs="+", type=int, default=[4000, 16000])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--neutra", action="store_true", help="also run NeuTra NUTS on each fit")
    ap.add_argument(
        "--neutra-budget",
        type=json.loads,
        default={},
        help="NeuTra's budget, as JSON: '{\"num_warmup\": 1000}' (its defaults else)",
    )
    ap.add_argument(
        "--fit-options",
        type=json.loads,
        default={},
        help='more options of fit_posterior, as JSON: \'{"objective": "iwelbo"}\'',
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    budget = Budget(num_steps=args.steps, num_particles=args.particles)
    meta = {"commit": rows.git_commit(), "versions": rows.library_versions(), "run": rows.utc_now()}
    for name in args.problems:
        for seed in args.seeds:
            for row in study(
                name,
                seed,
                args.draws,
                args.neutra_budget if args.neutra else None,
                budget,
                args.fit_options,
            ):
                row.update(meta, timestamp=rows.utc_now())
                line = json.dumps(row, sort_keys=True, default=float)
                print(line, flush=True)
                with args.out.open("a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
