"""NeuTra against NUTS on the 10-D funnel: effective samples per second on ``v``.

Neal's funnel (`benchmarks.targets`: ``v ~ N(0, 3)``, ``x_i | v ~ N(0, exp(v / 2))``, 10-D, the
NumPyro model ``z`` flat plus ``factor``) is the textbook case where NUTS's fixed step size
cannot follow the neck, and where a flow that learned the change of variables should let NUTS
move freely (Hoffman et al. 2019). Each method runs in this process, float64, one thread:

* ``numpyro NUTS``: `MCMC(NUTS(model))`, ``--chains`` chains one after another, ``--warmup`` +
  ``--samples`` each;
* ``flowguides-numpyro NeuTra (RealNVP)``: `fit_posterior` with ``FlowSpec.realnvp(num_layers=4)``
  and its defaults, then ``fit.neutra`` at the same chains and budget (the flow frozen);
* ``flowMC RQSpline MALA`` (the anchor: normalizing-flow-enhanced MCMC, the `flowMC` package,
  optional): its `RQSpline_MALA_Bundle` with ``--flowmc-chains`` chains and its loops sized by
  ``--flowmc-loops``, run to a wall time comparable with NeuTra's (the row records its own).

Per row: ``wall_s`` (everything: fit, compiles, warm-up, draws), ``ess_v`` (NumPyro's effective
sample size of ``v`` over the chains' kept draws), ``ess_per_s`` = ``ess_v / wall_s``, ``v_mean``
and ``v_sd`` (truth 0 and 3: an ESS of a biased chain means little), ``divergences`` (NUTS and
NeuTra), NeuTra's ``fit_kl`` (the fitted guide's KL to the funnel, ``log Z - ELBO`` over 10,000
draws, outside the clock) and the settings; keyed as `benchmarks/rows.py` keys rows (suite ``neutra_ess``), with
commit, time and versions. Rows go to ``benchmarks/results/neutra_ess.jsonl`` with ``--write``;
the benchmarks page shows them.

Usage (from the repository root)::

    python -m benchmarks.neutra_ess --write
    python -m benchmarks.neutra_ess --seeds 0 1 --methods nuts neutra --write
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.rows import (  # noqa: E402
    git_commit,
    library_versions,
    merge_rows,
    row_versions,
    utc_now,
)

__all__ = ["METHODS", "OUT", "ess", "main", "run_method"]

OUT = Path(__file__).resolve().parent / "results" / "neutra_ess.jsonl"
"""Where ``--write`` merges the rows."""

METHODS = {
    "nuts": "numpyro NUTS",
    "neutra": "flowguides-numpyro NeuTra (RealNVP)",
    "flowmc": "flowMC RQSpline MALA",
}
"""Short name -> row method name."""


def ess(chains: np.ndarray) -> float:
    """NumPyro's effective sample size (`numpyro.diagnostics.effective_sample_size`, the one
    `fit.neutra` reports) of draws ``(chains, draws)`` of one scalar."""
    from numpyro.diagnostics import effective_sample_size

    return float(effective_sample_size(np.asarray(chains, dtype=np.float64)))


def _summary(v: np.ndarray, wall_s: float) -> dict[str, Any]:
    e = ess(v)
    return {"wall_s": wall_s, "ess_v": e, "ess_per_s": e / wall_s,
            "v_mean": float(v.mean()), "v_sd": float(v.std())}  # fmt: skip


def run_method(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One method's row fields (its settings and `_summary`)."""
    import jax

    from benchmarks.targets import TARGETS

    target = TARGETS["funnel"]
    model = target.numpyro_model()
    budget = {"num_warmup": args.warmup, "num_samples": args.samples, "num_chains": args.chains}
    accept = args.target_accept
    # NUTS's target acceptance in both methods; recorded where it is not the PPLs' default
    budget_settings = {**budget, **({"target_accept_prob": accept} if accept != 0.8 else {})}
    t0 = time.perf_counter()
    if name == "nuts":
        from numpyro.infer import MCMC, NUTS

        kernel = NUTS(model, target_accept_prob=accept)
        mcmc = MCMC(kernel, **budget, chain_method="sequential", progress_bar=False)
        mcmc.run(jax.random.key(seed), extra_fields=("diverging",))
        v = np.asarray(mcmc.get_samples(group_by_chain=True)["z"])[..., 0]
        out = _summary(v, time.perf_counter() - t0)
        out["divergences"] = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
        return {**out, "method_settings": {**budget_settings, "chain_method": "sequential"}}
    if name == "neutra":
        from flowguides.numpyro import fit_posterior
        from flowguides.spec import FlowSpec

        fit = fit_posterior(model, FlowSpec.realnvp(num_layers=4), seed=seed, progress=False)
        fit_s = time.perf_counter() - t0
        res = fit.neutra(**budget, seed=seed, progress=False, target_accept_prob=accept)
        v = np.asarray(res.by_chain()["z"])[..., 0]
        out = _summary(v, time.perf_counter() - t0)
        out.update(divergences=res.divergences, fit_s=fit_s, num_steps=len(fit.losses))
        out["fit_kl"] = target.log_z - float(fit.elbo(10_000, seed=seed))  # after the clock
        settings = {**budget_settings, "spec": "FlowSpec.realnvp(num_layers=4)", "fit": "defaults"}
        return {**out, "method_settings": settings}
    if name == "flowmc":
        from flowMC.resource_strategy_bundle.RQSpline_MALA import RQSpline_MALA_Bundle
        from flowMC.Sampler import Sampler

        settings = {"n_chains": args.flowmc_chains, "n_local_steps": 50, "n_global_steps": 50,
                    "n_training_loops": args.flowmc_loops, "n_production_loops": args.flowmc_loops,
                    "n_epochs": 20, "batch_size": 2000, "n_max_examples": 10000}  # fmt: skip
        key, init = jax.random.split(jax.random.key(seed))
        bundle = RQSpline_MALA_Bundle(
            key, n_dims=target.dim, logpdf=lambda x, data: target.log_prob_jax(x), **settings
        )
        sampler = Sampler(n_dim=target.dim, n_chains=settings["n_chains"], rng_key=key,
                          resource_strategy_bundles=bundle, checkpoint_interval=0)  # fmt: skip
        start = jax.random.normal(init, (settings["n_chains"], target.dim))
        sampler.sample(start, {})
        v = np.asarray(sampler.resources["positions_production"].data)[..., 0]
        return {**_summary(v, time.perf_counter() - t0), "method_settings": settings}
    raise ValueError(f"method: expected one of {list(METHODS)}, got {name!r}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point: print (and with ``--write`` merge) one row per method, seed."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.neutra_ess",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--target-accept", type=float, default=0.8, help="NUTS's, both methods")
    p.add_argument("--flowmc-chains", type=int, default=20)
    p.add_argument("--flowmc-loops", type=int, default=5)
    p.add_argument("--write", action="store_true", help=f"merge the rows into {OUT}")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    versions = library_versions()
    rows = []
    for seed in args.seeds:
        for name in args.methods:
            row: dict[str, Any] = {"suite": "neutra_ess", "problem": "funnel",
                                   "method": METHODS[name], "seed": seed}  # fmt: skip
            try:
                row.update(run_method(name, seed, args))
            except Exception as exc:  # noqa: BLE001 - a failed method is a result
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row.update(commit=git_commit(), timestamp=utc_now())
            row["versions"] = row_versions(row["method"], versions)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)
    if args.write:
        lines = args.out.read_text().splitlines() if args.out.is_file() else []
        merged = merge_rows([json.loads(x) for x in lines if x.strip()], rows)
        args.out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in merged))
    return rows


if __name__ == "__main__":
    main()
