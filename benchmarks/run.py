"""Run the benchmark suites and write ``benchmarks/results/<suite>.json`` and ``docs/benchmarks.md``.

Usage: ``python -m benchmarks.run [--quick] [--only PATTERN] [--suite NAME ...] [--steps N]
[--particles N] [--draws N] [--seeds N ...] [--results DIR] [--row-timeout S]``.

Suites: ``speed`` (ELBO steps/s and compile time at equal particles; final ELBO at an equal step
budget), ``posteriors`` (synthetic targets and the nine posteriordb posteriors: ELBO, PSIS k-hat,
standardised mean error, sd ratio, wall time) and ``densities`` (forward KL: test NLL, wall
time). ``--quick`` runs a subset with fewer steps (``make bench``, under 15 minutes on one
thread); ``--only`` keeps the rows whose ``suite:problem:method`` matches a glob (or contains
a text without ``:``; ``|`` separates alternatives, ``{a,b}`` expands to both); ``--steps``,
``--particles``, ``--draws`` and ``--seeds`` override the plan's settings (the posteriors suite
runs every row for each of its plan's seeds, one row per seed); ``--results DIR`` writes the
results and the docs page under ``DIR`` instead of ``benchmarks/results/`` and ``docs/``. Each
row records the settings that change its value (steps, particles, evaluation draws, seed, the
method's own settings, library versions: its key, ``rows.KEY_FIELDS``), the commit and the UTC
time it ran at; a row replaces the row of ``<results>/<suite>.json`` with its key and is added
otherwise (``rows.merge_rows``), so a rerun at other settings keeps the earlier rows. Every row holds numbers or the error its method raised. The posteriors and speed rows run in a worker
process (:mod:`benchmarks.isolate`): a row past ``--row-timeout`` seconds is killed and records
the timeout, and the suite goes on. Threads are pinned to one for
torch and XLA before either is imported; everything runs in float64.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
os.environ["JAX_ENABLE_X64"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import argparse  # noqa: E402
import fnmatch  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import anchors, densities, metrics, report, targets  # noqa: E402
from benchmarks.isolate import RowFailed, Worker  # noqa: E402
from benchmarks.rows import (  # noqa: E402
    TIMING_KEYS,
    git_commit,
    library_versions,
    machine,
    merge_rows,
    row_versions,
    utc_now,
)

__all__ = ["FULL", "QUICK", "main", "problem"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

_PDB_ALL = (
    "eight_schools-eight_schools_noncentered", "eight_schools-eight_schools_centered", "arK-arK",
    "garch-garch11", "gp_pois_regr-gp_pois_regr", "kidiq-kidscore_momiq",
    "low_dim_gauss_mix-low_dim_gauss_mix", "sblrc-blr", "diamonds-diamonds",
)  # fmt: skip
_SPEED_CORE = (
    "flowguides-pyro RealNVP (SVI loop)", "flowguides-pyro RealNVP (fit_posterior)",
    "pyro AutoNormalizingFlow(coupling)", "pyro AutoIAFNormal",
    "flowguides-numpyro RealNVP (SVI loop)", "flowguides-numpyro RealNVP (fit_posterior)",
    "numpyro AutoIAFNormal", "bare JAX RealNVP (floor)",
)  # fmt: skip
_ROUNDED = (
    "flowguides-numpyro RealNVP (fit_posterior)", "numpyro AutoIAFNormal",
    "bare JAX RealNVP (floor)",
)  # fmt: skip
_POST_QUICK = (
    "flowguides-pyro RealNVP", "flowguides-numpyro RealNVP", "numpyro AutoIAFNormal",
    "numpyro NUTS",
)  # fmt: skip
_DENS_QUICK = (
    "flowguides-pyro RealNVP", "flowguides-numpyro RealNVP", "zuko RealNVP", "normflows RealNVP",
    "flowjax coupling", "normflows planar",
)  # fmt: skip

QUICK: dict[str, Any] = {
    "speed": {
        # 1,000 steps: nine timed 100-step blocks after the compile for every method
        "steps": 1000, "particles": 8, "draws": 2000,
        # the rows of the NumPyro speed goals run three times, interleaved (see _timing_rounds)
        "rounds": 3, "rounded": _ROUNDED,
        # the Pyro neural ODE (torchdiffeq, ~2 steps/s here) runs in the full suite only
        "plan": {
            "funnel": tuple(m for m in anchors.SPEED_METHODS if not m.startswith("flowguides-pyro neural ODE")),
            "logistic": _SPEED_CORE,
        },
    },
    "posteriors": {
        # three seeds per row (median and range in the report), so three problems only
        "steps": 1000, "particles": 8, "draws": 2000, "seeds": (0, 1, 2), "once": ("numpyro NUTS",),
        "plan": {
            p: _POST_QUICK
            for p in ("banana", "eight_schools-eight_schools_noncentered", "kidiq-kidscore_momiq")
        },
    },
    "densities": {"steps": 500, "plan": {"two_moons": _DENS_QUICK, "iris": _DENS_QUICK}},
}  # fmt: skip
"""``make bench``: a subset sized to finish under 15 minutes on one thread."""

_DENS_FULL = (
    "flowguides-pyro RealNVP", "flowguides-pyro planar", "flowguides-numpyro RealNVP",
    "flowguides-numpyro planar", "zuko RealNVP", "normflows RealNVP", "normflows planar",
    "flowjax coupling", "flowjax planar",
)  # fmt: skip
_DENS_ODE = (
    "flowguides-numpyro neural ODE", "flowguides-numpyro neural ODE (RNODE)",
    "flowguides-numpyro neural ODE (FM)", "flowguides-numpyro neural ODE (FM OT)",
    "flowguides-pyro neural ODE (FM)", "flowguides-pyro neural ODE (FM OT)",
)  # fmt: skip
_TWO_D = ("two_moons", "8gaussians", "checkerboard", "spiral")
# zuko's CNF (an exact-trace torchdiffeq solve per step) is by far the slowest row (wall_s)
_ZUKO_CNF_SETS = ("two_moons", "8gaussians")
_POST_FULL = (
    "flowguides-pyro RealNVP", "flowguides-numpyro RealNVP", "flowguides-numpyro RealNVP (STL)",
    "flowguides-numpyro RealNVP (IWELBO K=8, DReG)", "numpyro AutoIAFNormal",
    "numpyro AutoMultivariateNormal", "numpyro AutoLaplaceApproximation",
    "blackjax multi-path Pathfinder", "numpyro NUTS", "flowguides-numpyro infer (RealNVP)",
    "flowguides-pyro infer (RealNVP)",
)  # fmt: skip

FULL: dict[str, Any] = {
    "speed": {
        "steps": 2000, "particles": 8, "draws": 10_000, "rounds": 3, "rounded": _ROUNDED,
        "plan": QUICK["speed"]["plan"],
    },
    "posteriors": {
        "steps": 2000, "particles": 8, "draws": 10_000, "seeds": (0, 1, 2),
        "once": ("numpyro NUTS", *_POST_FULL[2:4], *_POST_FULL[-2:]),
        "plan": {p: _POST_FULL for p in ("funnel", "banana", *_PDB_ALL)},
    },
    "densities": {
        "steps": 2000,
        "plan": {
            d: _DENS_FULL
            + (_DENS_ODE if d in _TWO_D else ())
            + (("zuko CNF",) if d in _ZUKO_CNF_SETS else ())
            for d in densities.DATASETS
        },
    },
}  # fmt: skip
"""``make bench-full``, sized to finish within two hours on one thread: the speed suite at
2,000 steps (the Pyro neural ODE, about 2 steps/s with torchdiffeq, stays out as in the quick
plan); the posteriors suite on the funnel, the banana and the nine posteriordb posteriors with
flowguides' RealNVP in both backends (and NumPyro's STL and IW-ELBO objectives), the anchors a
user would try (NumPyro's IAF, full-rank Gaussian and Laplace, multi-path Pathfinder) and NUTS,
three seeds each (NUTS, whose rows report their own Monte Carlo error, and the STL and IW-ELBO
rows the first seed only);
every density set at 2,000 steps with every discrete flow, and on the four 2-D sets the neural
ODEs (NumPyro's by maximum likelihood, RNODE and flow matching with independent and OT
coupling, Pyro's by flow matching; zuko's CNF, the slowest row of the suite, on two moons and
8 Gaussians only; the Pyro neural ODE by maximum likelihood, a
torchdiffeq solve per step, runs in ``benchmarks/ode_bench.py``)."""


def problem(name: str) -> anchors.Problem:
    """The :class:`~benchmarks.anchors.Problem` of a synthetic target, ``logistic`` or a
    posteriordb name."""
    if name in targets.TARGET_NAMES:
        t = targets.TARGETS[name]
        return anchors.Problem(name, t.pyro_model, t.numpyro_model, {"z": (t.mean, t.sd)}, t.log_z)
    if name == "logistic":
        data = targets.logistic_data()
        return anchors.Problem(
            name, partial(targets.pyro_logistic, **data), partial(targets.numpyro_logistic, **data)
        )
    from benchmarks.models import numpyro_models, posteriordb, pyro_models

    post = posteriordb.load(name)
    return anchors.Problem(
        name,
        lambda: partial(pyro_models.MODELS[name], **post.data),
        lambda: partial(numpyro_models.MODELS[name], **post.data),
        metrics.moments_of(post.reference),
    )


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:300]


def _posterior_row(
    suite: str, pname: str, method: str, budget: anchors.Budget, draws: int, keep: dict
) -> dict[str, Any]:
    row: dict[str, Any] = {"suite": suite, "problem": pname, "method": method,
                           "num_steps": budget.num_steps, "num_particles": budget.num_particles,
                           "seed": budget.seed}  # fmt: skip
    if suite == "posteriors" and method in anchors.SETTINGS:
        row["method_settings"] = anchors.SETTINGS[method]
    try:
        fields, kept = _run("benchmarks.run:posterior_task", method, suite, pname, budget, draws)
    except Exception as exc:  # noqa: BLE001 - a method's failure is a result, recorded per row
        row["error"] = str(exc)[:300] if isinstance(exc, RowFailed) else _error(exc)
        return row
    row.update(fields)
    keep.setdefault((pname, method), kept)
    return row


_PROBLEMS: dict[str, anchors.Problem] = {}
_WORKERS: dict[tuple, Worker] = {}  # main()'s row workers by environment; none: run here
_ROW_TIMEOUT: list[float | None] = []  # main()'s row limit; empty: tasks run in this process


def _run(task: str, method: str, *args: Any) -> Any:
    """Run a task for `method` in the row worker of the method's environment
    (:data:`benchmarks.anchors.WORKER_ENV`, :mod:`benchmarks.isolate`), or here without one."""
    if _ROW_TIMEOUT:
        env = anchors.WORKER_ENV.get(method, {})
        key = tuple(sorted(env.items()))
        if key not in _WORKERS:
            _WORKERS[key] = Worker(_ROW_TIMEOUT[0], env)
        return _WORKERS[key](task, method, *args)
    module, _, name = task.partition(":")
    return getattr(importlib.import_module(module), name)(method, *args)


def posterior_task(
    method: str, suite: str, pname: str, budget: anchors.Budget, draws: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit and score one row (the row worker's task): the row's measured fields and the first
    2,000 draws per site, for the report's plots."""
    if pname not in _PROBLEMS:
        _PROBLEMS[pname] = problem(pname)
    prob = _PROBLEMS[pname]
    _fresh()
    fitted = _methods(suite)[method](prob, budget)
    out: dict[str, Any] = {k: v for k, v in fitted.timing.items() if k in TIMING_KEYS}
    out["final_loss"] = fitted.final_loss
    if fitted.log_densities is not None:
        d, lp, lq = fitted.log_densities(draws, 1)
        out.update(metrics.score(lp, lq, d, prob.reference, prob.log_z))
    else:
        d = fitted.draws
        out.update(metrics.score(None, None, d, prob.reference))
    out.update(fitted.extra)
    return out, {k: np.asarray(v)[:2000] for k, v in d.items()}


def timing_task(method: str, suite: str, pname: str, budget: anchors.Budget) -> dict[str, Any]:
    """One more timing round of a row (the row worker's task): the fit's ``timing``."""
    if pname not in _PROBLEMS:
        _PROBLEMS[pname] = problem(pname)
    _fresh()
    return dict(_methods(suite)[method](_PROBLEMS[pname], budget).timing)


def _methods(suite: str) -> dict[str, Any]:
    """The posteriors suite's methods (SVI anchors with their learning-rate search) or the
    speed suite's (every method at the budget's rate)."""
    return anchors.METHODS if suite == "posteriors" else anchors.SPEED_METHODS


def _fresh() -> None:
    """Empty JAX's compilation caches (and flowguides' cache of compiled training chunks), so
    every method pays its own compiles: without this, whichever method runs later on a problem
    reuses the eager-op compiles of NumPyro's model set-up that an earlier one paid for."""
    import jax

    import flowguides.numpyro

    jax.clear_caches()
    flowguides.numpyro.clear_compiled()


def _density_row(name: str, data: densities.DensityData, method: str, cfg: dict, seed: int) -> dict:
    row: dict[str, Any] = {"suite": "densities", "problem": name, "method": method,
                           "num_steps": cfg["steps"], "dim": int(data.train.shape[1]),
                           "seed": seed}  # fmt: skip
    try:
        budget = densities.DensityBudget(num_steps=cfg["steps"], seed=seed)
        row.update(densities.evaluate(method, data, budget))
    except Exception as exc:  # noqa: BLE001
        row["error"] = _error(exc)
    return row


def _selected(pattern: str | None, *parts: str) -> bool:
    """Whether ``suite:problem:method`` matches one of the ``|``-separated globs, or contains
    one without a ``:`` (so ``s:p:pyro AutoNormal`` does not select ``pyro AutoNormalizingFlow``)."""
    if pattern is None:
        return True
    key = ":".join(parts)
    pats = [e for p in pattern.split("|") for e in _braces(p)]
    return any(fnmatch.fnmatch(key, p) or (":" not in p and p in key) for p in pats)


def _braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives: ``s:{p,q}:m`` -> ``["s:p:m", "s:q:m"]``."""
    head, brace, rest = pattern.partition("{")
    if not brace or "}" not in rest:
        return [pattern]
    inner, _, tail = rest.partition("}")
    return [head + alt + t for alt in inner.split(",") for t in _braces(tail)]


def _save(path: Path, earlier: list[dict], how: dict, rows: list[dict], done: bool = False) -> None:
    """Write ``rows`` over the ``earlier`` rows of ``path`` (a row replaces the earlier row with
    its key and is added otherwise, in the earlier file's order, new rows last); ``how`` holds
    ``quick``, the suite's start ``t0`` and its ``config``. Until ``done``, the meta says
    ``partial``: the suite was still running."""
    meta = machine(
        quick=how["quick"], seconds=time.perf_counter() - how["t0"], config=how["config"]
    )
    merged = merge_rows(earlier, rows)
    meta["rows_from_earlier_runs"] = len(merged) - len(rows)
    if not done:
        meta["partial"] = True
    path.write_text(
        json.dumps(_jsonable({"meta": meta, "rows": merged}), indent=1, allow_nan=False)
    )


def _stamp(row: dict, cfg: dict, run: dict) -> dict:
    """Add the row's remaining key fields (draws, versions) and where and when it ran."""
    if row["suite"] != "densities":
        row["num_draws"] = cfg["draws"]
    row["versions"] = row_versions(row["method"], run["versions"])
    row.update(commit=run["commit"], run=run["run"], timestamp=utc_now())
    return row


def run_suite(
    suite: str, cfg: dict, only: str | None, save: Callable[[list[dict]], None] = lambda r: None
) -> list[dict]:
    """Run one suite's plan, each row once per seed of ``cfg["seeds"]`` (the methods of
    ``cfg["once"]`` the first seed only); returns its rows (and keeps the first seed's draws for
    the plots). ``save`` is called with the rows so far after each problem, so a run stopped
    part-way keeps what it measured."""
    run = {"versions": library_versions(), "commit": git_commit(), "run": utc_now()}
    seeds = tuple(cfg.get("seeds", (0,)))
    out: list[dict] = []
    for pname, methods in cfg["plan"].items():
        methods = [m for m in methods if _selected(only, suite, pname, m)]
        if not methods:
            continue
        if suite == "densities":
            data = densities.load(pname)
            for seed in seeds:
                for m in methods:
                    out.append(_stamp(_density_row(pname, data, m, cfg, seed), cfg, run))
                    _log(out[-1])
            save(out)
            continue
        try:
            problem(pname)
        except Exception as exc:  # noqa: BLE001
            out += [
                _stamp({"suite": suite, "problem": pname, "method": m, "num_steps": cfg["steps"],
                        "num_particles": cfg["particles"], "seed": seed, "error": _error(exc)},
                       cfg, run)
                for seed in seeds for m in methods
            ]  # fmt: skip
            continue
        for seed in seeds:
            budget = anchors.Budget(num_steps=cfg["steps"], num_particles=cfg["particles"],
                                    seed=seed)  # fmt: skip
            mine = []
            for m in methods:
                if m in cfg.get("once", ()) and seed != seeds[0]:
                    continue
                row = _posterior_row(suite, pname, m, budget, cfg["draws"], report.KEPT)
                mine.append(_stamp(row, cfg, run))
                _log(mine[-1])
            _timing_rounds(pname, budget, mine, cfg.get("rounds", 1), cfg.get("rounded", ()))
            out += mine
        save(out)
    return out


def _timing_rounds(
    pname: str, budget: anchors.Budget, rows: list[dict], rounds: int, rounded: tuple
) -> None:
    """Rerun the `rounded` methods `rounds - 1` more times, interleaved (A B C A B C ...), and
    keep each row's best: the highest steps/s, the lowest set-up and compile. Other work on a
    shared machine slows a whole run for seconds at a time (a row's fastest 100-step block moved
    by 1.7x between runs here), which a best-of over blocks within one run cannot see past."""
    again = [r for r in rows if r["method"] in rounded and "error" not in r]
    for _ in range(rounds - 1):
        for row in again:
            try:
                timing = _run("benchmarks.run:timing_task", row["method"], row["suite"], pname,
                              budget)  # fmt: skip
            except Exception:  # noqa: BLE001 - the first round's row stands
                continue
            for key, better in (("steps_per_s", max), ("setup_s", min), ("compile_s", min)):
                if isinstance(row.get(key), float) and isinstance(timing.get(key), float):
                    row[key] = better(row[key], timing[key])
            row["timing_rounds"] = row.get("timing_rounds", 1) + 1
            print(f"[{row['suite']}] {row['problem']} | {row['method']}: round "
                  f"{row['timing_rounds']} steps_per_s={row['steps_per_s']:.3g}", flush=True)  # fmt: skip


def _log(row: dict) -> None:
    keys = ("wall_s", "steps_per_s", "compile_s", "elbo", "khat", "mean_err", "test_nll",
            "test_nll_se", "entropy_gap")  # fmt: skip
    vals = " ".join(f"{k}={row[k]:.3g}" for k in keys if isinstance(row.get(k), float))
    err = f" ERROR {row['error'][:120]}" if "error" in row else ""
    print(
        f"[{row['suite']}] {row['problem']} | {row['method']} | seed {row.get('seed')}: "
        f"{vals}{err}",
        flush=True,
    )


def _jsonable(obj: Any) -> Any:
    """Non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return str(float(obj))
    return float(obj) if isinstance(obj, np.floating) else obj


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="the `make bench` subset")
    parser.add_argument(
        "--only",
        help="'|'-separated globs (or substrings) over 'suite:problem:method'",
    )
    parser.add_argument("--suite", nargs="*", choices=("speed", "posteriors", "densities"))
    for flag, what in (("--steps", "training steps"), ("--particles", "ELBO particles"),
                       ("--draws", "evaluation draws")):  # fmt: skip
        parser.add_argument(flag, type=int, help=f"{what} (default: the plan's)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="seeds, one row each (default: the plan's)"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS,
        help="folder of the results files; the docs page goes to DOCS or, for a folder other "
        "than benchmarks/results, to RESULTS/docs",
    )  # fmt: skip
    parser.add_argument("--docs", type=Path, help="folder of benchmarks.md and its plots")
    parser.add_argument(
        "--row-timeout", type=float, default=1800.0,
        help="seconds a posteriors or speed row may run before its worker process is killed "
        "and the row records the timeout (default 1800; 0: no limit)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("particles", args.particles),
                                   ("draws", args.draws), ("seeds", args.seeds)) if v is not None}  # fmt: skip
    results = args.results.resolve()
    docs = args.docs or (ROOT / "docs" if results == RESULTS else results / "docs")
    import torch

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    warnings.filterwarnings("ignore", category=FutureWarning)
    plan = QUICK if args.quick else FULL
    start = time.perf_counter()
    results.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    _ROW_TIMEOUT[:] = [args.row_timeout or None]
    for suite in args.suite or plan:
        t0 = time.perf_counter()
        cfg = {**plan[suite], **overrides}
        path = results / f"{suite}.json"
        earlier = json.loads(path.read_text())["rows"] if path.exists() else []
        save = partial(_save, path, earlier, dict(quick=args.quick, t0=t0, config=cfg))
        save(run_suite(suite, cfg, args.only, save), done=True)
    for worker in _WORKERS.values():
        worker.close()
    _WORKERS.clear()
    report.write_docs(results, docs)
    print(
        f"done in {time.perf_counter() - start:.0f} s; wrote {docs / 'benchmarks.md'}", flush=True
    )


if __name__ == "__main__":
    main()
