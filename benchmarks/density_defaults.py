"""A bounded sweep of ``fit_density``'s learning rate and batch size (NumPyro backend).

Usage: ``python -m benchmarks.density_defaults [--out PATH] [--seed N] [--flow-matching
[--steps N ...] [--batch-sizes N ...] [--sets NAME ...] [--backend pyro]]``.

RealNVP and planar flows (`benchmarks.densities.DENSITY_ARCH` sizes, float64) on two moons and
8 Gaussians, at 500 and 2,000 steps, for every learning rate in ``{1e-3, 3e-3, 1e-2}`` and batch
size in ``{128, 256}``, one seed: 48 fits, each under the density suite's checkpoint policy
(`benchmarks.density_training.CHECKPOINT`) and scored by `benchmarks.densities.evaluate`. Each
fit is one JSON line of ``benchmarks/results/density_defaults.jsonl`` holding every setting
(``num_steps``, ``batch_size``, ``learning_rate``, ``seed`` and the policy), the test NLL with
its standard error and median, the kept step, wall and CPU seconds, library versions, commit
and time; a rerun replaces the lines with the same key (`benchmarks.rows.merge_rows`).
:func:`summary` ranks the settings per step budget by their mean test NLL over the four
(flow, data set) pairs.

``--flow-matching`` runs the flow-matching sweep instead (:func:`flow_matching_sweep`): the
neural ODE of the density suite fitted by flow matching (independent coupling, `fit_density`'s
learning rate `flowguides.core.DENSITY_LEARNING_RATE`) on the four 2-D sets at 2,000 and 12,000
steps, each with the suite's patience (500 steps) and without early stopping (patience = the
step budget; the best-validation parameters kept all the same), then 20,000 steps without
early stopping at batch sizes 256 and 1,024 (`FM_LONG`): 24 fits, rows in the same file
(``method_settings.patience`` and ``batch_size`` tell them apart).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
os.environ["JAX_ENABLE_X64"] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import densities  # noqa: E402
from benchmarks.density_training import DensityBudget  # noqa: E402
from benchmarks.rows import (  # noqa: E402
    git_commit,
    library_versions,
    merge_rows,
    row_versions,
    utc_now,
)

__all__ = ["DATASETS", "FAMILIES", "FM_GRID", "FM_LONG", "GRID", "OUT", "flow_matching_sweep", "main",
           "summary", "sweep"]  # fmt: skip

GRID = {"num_steps": (500, 2000), "learning_rate": (1e-3, 3e-3, 1e-2), "batch_size": (128, 256)}
"""The settings swept (every combination)."""

FAMILIES = ("RealNVP", "planar")
"""The flows: ``flowguides-numpyro <family>`` rows of `benchmarks.densities.DENSITY_METHODS`."""

DATASETS = ("two_moons", "8gaussians")
"""The data sets."""

FM_GRID = {"num_steps": (2000, 12000), "patience": (500, None)}
"""The flow-matching sweep: step budgets, and patience (None: no early stopping), at the
density suite's batch size (256); with `FM_LONG` after them."""

FM_LONG = {"num_steps": (20000,), "patience": (None,), "batch_size": (256, 1024)}
"""The flow-matching sweep's longer fits: 20,000 steps without early stopping, at batch sizes
256 and 1,024 (a flow-matching step solves nothing, so it is cheap to take many)."""

FM_DATASETS = ("two_moons", "8gaussians", "checkerboard", "spiral")
"""The flow-matching sweep's data sets (the 2-D ones)."""

OUT = Path(__file__).resolve().parent / "results" / "density_defaults.jsonl"
"""Where the rows go."""


def sweep(out: Path = OUT, seed: int = 0, grid: dict[str, tuple] = GRID) -> list[dict]:
    """Run every (data set, flow, setting) fit, writing `out` after each; returns the rows."""
    earlier = _read(out)
    run = {"versions": library_versions(), "commit": git_commit(), "run": utc_now()}
    rows: list[dict] = []
    for name in DATASETS:
        data = densities.load(name, seed=seed)
        for family, values in itertools.product(FAMILIES, itertools.product(*grid.values())):
            setting = dict(zip(grid, values, strict=True))
            method = f"flowguides-numpyro {family}"
            row: dict[str, Any] = {"suite": "density_defaults", "problem": name,
                                   "method": method, "seed": seed, **setting}  # fmt: skip
            cpu = time.process_time()
            try:
                row.update(densities.evaluate(method, data, DensityBudget(seed=seed, **setting)))
            except Exception as exc:  # noqa: BLE001 - a failed fit is a result
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["cpu_s"] = time.process_time() - cpu
            row["versions"] = row_versions(method, run["versions"])
            row.update(commit=run["commit"], run=run["run"], timestamp=utc_now())
            rows.append(row)
            print(_line(row), flush=True)
            _write(out, merge_rows(earlier, rows))
    return rows


def flow_matching_sweep(
    out: Path = OUT,
    seed: int = 0,
    only_steps: tuple[int, ...] | None = None,
    backend: str = "numpyro",
    sets: tuple[str, ...] = FM_DATASETS,
    batch_sizes: tuple[int, ...] | None = None,
) -> list[dict]:
    """Run every (2-D data set, `FM_GRID` or `FM_LONG` setting) flow-matching fit of
    `backend` (those of `only_steps` steps, `sets` and `batch_sizes`, where given), writing
    `out` after each; returns the rows."""
    from benchmarks.density_training import CHECKPOINT, CheckpointPolicy
    from flowguides.core import DENSITY_LEARNING_RATE

    earlier = _read(out)
    run = {"versions": library_versions(), "commit": git_commit(), "run": utc_now()}
    method = f"flowguides-{backend} neural ODE (FM)"
    rows: list[dict] = []
    settings = [(*s, 256) for s in itertools.product(*FM_GRID.values())]
    settings += list(itertools.product(*FM_LONG.values()))
    for name in sets:
        data = densities.load(name, seed=seed)
        for steps, patience, batch in settings:
            if steps not in (only_steps or (steps,)) or batch not in (batch_sizes or (batch,)):
                continue
            budget = DensityBudget(steps, batch, DENSITY_LEARNING_RATE, seed)
            policy = CheckpointPolicy(CHECKPOINT.every, patience or steps,
                                      CHECKPOINT.validation_fraction)  # fmt: skip
            row: dict[str, Any] = {"suite": "density_defaults", "problem": name, "method": method,
                                   "seed": seed, "num_steps": steps,
                                   "learning_rate": DENSITY_LEARNING_RATE,
                                   "batch_size": budget.batch_size}  # fmt: skip
            cpu = time.process_time()
            try:
                row.update(densities.evaluate(method, data, budget, policy))
                row["method_settings"]["patience"] = patience  # None: no early stopping
            except Exception as exc:  # noqa: BLE001 - a failed fit is a result
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["cpu_s"] = time.process_time() - cpu
            row["versions"] = row_versions(method, run["versions"])
            row.update(commit=run["commit"], run=run["run"], timestamp=utc_now())
            rows.append(row)
            print(_line(row) + f" patience={patience} steps_run={row.get('steps_run')}", flush=True)
            _write(out, merge_rows(earlier, rows))
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Per step budget, each (learning rate, batch size) with its mean test NLL over the
    (flow, data set) pairs, best first, and the pairs it is best on."""
    lines = []
    for steps in sorted({r["num_steps"] for r in rows}):
        sub = [r for r in rows if r["num_steps"] == steps and r.get("test_nll") is not None]
        pairs = sorted({(r["method"], r["problem"]) for r in sub})
        best = {p: min((r for r in sub if (r["method"], r["problem"]) == p),
                       key=lambda r: r["test_nll"]) for p in pairs}  # fmt: skip
        scores = {}
        for key in sorted({(r["learning_rate"], r["batch_size"]) for r in sub}):
            mine = [r for r in sub if (r["learning_rate"], r["batch_size"]) == key]
            if len(mine) == len(pairs):
                scores[key] = float(np.mean([r["test_nll"] for r in mine]))
        lines.append(f"{steps} steps: mean test NLL over {len(pairs)} (flow, data set) pairs")
        for (lr, batch), score in sorted(scores.items(), key=lambda kv: kv[1]):
            wins = [f"{m.split()[-1]}/{p}" for (m, p), r in best.items()
                    if (r["learning_rate"], r["batch_size"]) == (lr, batch)]  # fmt: skip
            lines.append(f"  lr={lr:g} batch={batch}: {score:.4f}  best on: {', '.join(wins)}")
    return lines


def _line(r: dict) -> str:
    head = f"{r['problem']:10} {r['method']:27} steps={r['num_steps']:5} "
    head += f"lr={r['learning_rate']:<6g} batch={r['batch_size']:4}"
    if r.get("error"):
        return f"{head} ERROR {r['error'][:100]}"
    return (
        f"{head} nll={r['test_nll']:.4f} ± {r['test_nll_se']:.4f} best_step={r['best_step']:5} "
        f"wall={r['wall_s']:.1f}s cpu={r['cpu_s']:.1f}s"
    )


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.density_defaults", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON-lines file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flow-matching", action="store_true", help="the flow-matching sweep")
    parser.add_argument("--steps", type=int, nargs="+", help="flow matching: only these budgets")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="flow matching: only these")
    parser.add_argument("--sets", nargs="+", default=FM_DATASETS, help="flow matching: data sets")
    parser.add_argument("--backend", choices=("numpyro", "pyro"), default="numpyro")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.process_time()
    if args.flow_matching:
        rows = flow_matching_sweep(
            args.out, args.seed, args.steps and tuple(args.steps), args.backend,
            tuple(args.sets), args.batch_sizes and tuple(args.batch_sizes),
        )  # fmt: skip
    else:
        rows = sweep(args.out, args.seed)
        print("\n".join(summary(rows)))
    print(f"{len(rows)} fits, {time.process_time() - start:.0f} CPU s; wrote {args.out}")


if __name__ == "__main__":
    main()
