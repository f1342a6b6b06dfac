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
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
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

__all__ = ["FULL", "PLANS", "QUICK", "ROW_LIMIT_S", "SLOW", "main", "plan_for", "problem"]

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
        # the rows of the speed goals and the planar and FlowJAX ones; every method of
        # anchors.SPEED_METHODS runs in the full plan (the Pyro neural ODE, torchdiffeq at ~2
        # steps/s here, in neither)
        "plan": {
            "funnel": (*_SPEED_CORE, "flowguides-numpyro planar (fit_posterior)", "flowjax coupling (ElboLoss)"),
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
    "flowjax coupling", "flowjax planar", "flowguides-pyro RealNVP (sampling orientation)",
    "flowguides-numpyro RealNVP (sampling orientation)",
    "flowguides-pyro RealNVP (fit_density defaults)",
    "flowguides-numpyro RealNVP (fit_density defaults)",
)  # fmt: skip
_DENS_ODE = (
    "flowguides-numpyro neural ODE", "flowguides-numpyro neural ODE (RNODE)",
    "flowguides-numpyro neural ODE (FM)", "flowguides-numpyro neural ODE (FM OT)",
    "flowguides-pyro neural ODE (FM)", "flowguides-pyro neural ODE (FM OT)",
    "flowguides-numpyro neural ODE (FM at fit_density defaults)",
    "flowguides-pyro neural ODE (FM at fit_density defaults)",
    *(f"flowguides-{b} neural ODE (FM at fit_density defaults for {n} steps)"
      for b in ("numpyro", "pyro") for n in densities.FM_STEP_BUDGETS),
)  # fmt: skip
_TWO_D = ("two_moons", "8gaussians", "checkerboard", "spiral")
_SLOW_ODE = (
    "flowguides-numpyro neural ODE (RNODE)",
    "flowguides-pyro neural ODE (FM at fit_density defaults)",
    "flowguides-pyro neural ODE",
    *(m for m in _DENS_ODE if "defaults for" in m),
)
_POST_FULL = (
    "flowguides-pyro RealNVP", "flowguides-numpyro RealNVP", "flowguides-numpyro RealNVP (STL)",
    "flowguides-numpyro RealNVP (IWELBO K=8, DReG)",
    "flowguides-numpyro RealNVP (earlier schedule)", "numpyro AutoIAFNormal",
    "numpyro AutoMultivariateNormal", "numpyro AutoLaplaceApproximation",
    "blackjax multi-path Pathfinder", "flowguides-pyro RealNVP (density orientation)",
    "flowguides-numpyro RealNVP (density orientation)", "numpyro NUTS",
    "flowguides-numpyro infer (RealNVP)",
)  # fmt: skip

FULL: dict[str, Any] = {
    "speed": {
        "steps": 2000, "particles": 8, "draws": 10_000, "rounds": 3, "rounded": _ROUNDED,
        "plan": {
            "funnel": tuple(m for m in anchors.SPEED_METHODS if not m.startswith("flowguides-pyro neural ODE")),
            "logistic": _SPEED_CORE,
        },
    },
    "posteriors": {
        "steps": 2000, "particles": 8, "draws": 10_000, "seeds": (0, 1, 2),
        "once": ("numpyro NUTS", *_POST_FULL[2:4], _POST_FULL[-1]),
        "plan": {p: _POST_FULL for p in ("funnel", "banana", *_PDB_ALL)},
    },
    "densities": {
        "steps": 2000,
        "plan": {
            d: _DENS_FULL + (tuple(m for m in _DENS_ODE if m not in _SLOW_ODE) if d in _TWO_D else ())
            for d in densities.DATASETS
        },
    },
}  # fmt: skip
"""``make bench-full`` (``--lanes 2``), sized so that ``--estimate`` (the latest rows' fit
times, without scoring and process start-up) stays under two hours on this two-core machine;
an end-to-end run is the real measure (its files' meta hold ``suite_seconds``): the speed suite at
2,000 steps, alone (the Pyro neural ODE, about 2 steps/s with torchdiffeq, stays out as in the
quick plan); the posteriors suite on the funnel, the banana and the nine posteriordb posteriors
with flowguides' RealNVP in both backends (in both orientations; and NumPyro's STL and
IW-ELBO objectives and `infer`), the anchors a user would try (NumPyro's IAF, full-rank Gaussian and Laplace,
multi-path Pathfinder) and NUTS, three seeds each (NUTS, whose rows report their own Monte Carlo
error, and the STL, IW-ELBO and `infer` rows the first seed only); every density set at 2,000
steps with every discrete flow, and on the four 2-D sets the neural ODEs (NumPyro's by maximum
likelihood and flow matching with independent and OT coupling, Pyro's by flow matching), and
flowguides' RealNVP (both orientations, and at ``fit_density``'s own defaults) and NumPyro's
flow matching at ``fit_density``'s defaults (its 20,000 steps). The rows that take minutes each
are in :data:`SLOW`."""

SLOW: dict[str, Any] = {
    "posteriors": {
        **{k: FULL["posteriors"][k] for k in ("steps", "particles", "draws")},
        "seeds": (0,),
        "plan": {p: ("flowguides-pyro infer (RealNVP)",) for p in ("funnel", "banana", *_PDB_ALL)},
    },
    "densities": {
        "steps": 2000,
        "plan": {d: _SLOW_ODE + (("zuko CNF",) if d in _TWO_D[:2] else ()) for d in _TWO_D},
    },
}  # fmt: skip
"""``make bench-slow``: the rows that take minutes each. Pyro's `infer` (NeuTra NUTS through
Pyro's NUTS where its route leads there), NumPyro's RNODE (a neural ODE with kinetic and Jacobian
penalties) and zuko's CNF (an exact-trace torchdiffeq solve per step, on two moons and 8
Gaussians); the Pyro neural ODE by maximum likelihood runs in ``benchmarks/ode_bench.py``."""

PLANS = {"quick": QUICK, "full": FULL, "slow": SLOW}
"""The plans by name (``--plan``)."""


def plan_for(name: str, only: str | None) -> dict[str, Any]:
    """The plan `name`; with ``--only`` the full plan also holds the slow plan's rows (their
    methods once per problem, at the first seed), so the rerun command printed beside any table
    (:func:`benchmarks.rows.rerun_command`) reaches every row it shows."""
    plan = PLANS[name]
    if name != "full" or only is None:
        return plan
    out = {}
    for suite, cfg in plan.items():
        extra = SLOW.get(suite, {}).get("plan", {})
        merged = {p: tuple(dict.fromkeys((*cfg["plan"].get(p, ()), *extra.get(p, ()))))
                  for p in (*cfg["plan"], *extra)}  # fmt: skip
        once = (*cfg.get("once", ()), *(m for ms in extra.values() for m in ms))
        out[suite] = {**cfg, "plan": merged, "once": tuple(dict.fromkeys(once))}
    return out


ROW_LIMIT_S = {"blackjax multi-path Pathfinder": 180.0}
"""Seconds a row of a method may run, where shorter than ``--row-timeout``: a guard for blackjax's
Pathfinder, which hung inside one XLA call before its factorisations ran one iterate at a time
(see :func:`benchmarks.anchors_jax._one_at_a_time`); a row that finishes takes well under
this."""


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
_DATA: dict[str, densities.DensityData] = {}
_WORKERS: dict[int, Worker] = {}  # main()'s row workers by lane (thread); none: run here
_ROW_TIMEOUT: list[float | None] = []  # main()'s row limit; empty: tasks run in this process


def _run(task: str, method: str, *args: Any) -> Any:
    """Run a task for `method` in this lane's row worker (:mod:`benchmarks.isolate`), or here
    without one."""
    if _ROW_TIMEOUT:
        lane = threading.get_ident()
        if lane not in _WORKERS:
            _WORKERS[lane] = Worker(_ROW_TIMEOUT[0])
        worker = _WORKERS[lane]
        limits = [t for t in (_ROW_TIMEOUT[0], ROW_LIMIT_S.get(method)) if t]
        worker.timeout_s = min(limits) if limits else None
        return worker(task, method, *args)
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


def density_task(method: str, name: str, steps: int, seed: int) -> dict[str, Any]:
    """Fit and score one density row (the row worker's task): its measured fields."""
    if name not in _DATA:
        _DATA[name] = densities.load(name)
    data = _DATA[name]
    budget = densities.DensityBudget(num_steps=steps, seed=seed)
    return {"dim": int(data.train.shape[1]), **densities.evaluate(method, data, budget)}


def _density_row(name: str, method: str, cfg: dict, seed: int) -> dict:
    row: dict[str, Any] = {"suite": "densities", "problem": name, "method": method,
                           "num_steps": cfg["steps"], "seed": seed}  # fmt: skip
    try:
        row.update(_run("benchmarks.run:density_task", method, name, cfg["steps"], seed))
    except Exception as exc:  # noqa: BLE001
        row["error"] = str(exc)[:300] if isinstance(exc, RowFailed) else _error(exc)
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
    meta["lanes"] = how.get("lanes", 1)  # rows run at once, one thread each
    meta["plan"] = how.get("plan")
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
    run = _run_stamp()
    out: list[dict] = []
    for pname, methods in units(suite, cfg, only):
        out += run_unit(suite, cfg, pname, methods, run)
        save(out)
    return out


def _run_stamp() -> dict:
    return {"versions": library_versions(), "commit": git_commit(), "run": utc_now()}


def units(suite: str, cfg: dict, only: str | None) -> list[tuple[str, list[str]]]:
    """The suite's ``(problem, methods)`` units that ``only`` selects, in plan order."""
    out = []
    for pname, methods in cfg["plan"].items():
        methods = [m for m in methods if _selected(only, suite, pname, m)]
        if methods:
            out.append((pname, methods))
    return out


def run_unit(suite: str, cfg: dict, pname: str, methods: list[str], run: dict) -> list[dict]:
    """One problem's rows of a suite: every method, once per seed (see :func:`run_suite`)."""
    seeds = tuple(cfg.get("seeds", (0,)))
    out: list[dict] = []
    if suite == "densities":
        for seed in seeds:
            for m in methods:
                out.append(_stamp(_density_row(pname, m, cfg, seed), cfg, run))
                _log(out[-1])
        return out
    try:
        problem(pname)
    except Exception as exc:  # noqa: BLE001
        return [
            _stamp({"suite": suite, "problem": pname, "method": m, "num_steps": cfg["steps"],
                    "num_particles": cfg["particles"], "seed": seed, "error": _error(exc)},
                   cfg, run)
            for seed in seeds for m in methods
        ]  # fmt: skip
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
    return out


def expected_seconds(
    suite: str, cfg: dict, pname: str, methods: list[str], rows: list[dict]
) -> float:
    """A unit's expected wall time: the sum of its rows' ``wall_s`` in the latest earlier rows
    with the same problem, method, steps and seed, times the timing rounds of a rounded method
    (a row that timed out or never ran counts as ``FALLBACK_ROW_S``, one whose method raised
    as nothing)."""
    seeds = tuple(cfg.get("seeds", (0,)))
    total = 0.0
    for seed in seeds:
        for m in methods:
            if m in cfg.get("once", ()) and seed != seeds[0]:
                continue
            same = [r for r in rows if (r.get("problem"), r.get("method"), r.get("num_steps"),
                                        r.get("seed")) == (pname, m, cfg["steps"], seed)]  # fmt: skip
            last = max(same, key=lambda r: r.get("timestamp") or "") if same else {}
            wall = last.get("wall_s")
            if not (isinstance(wall, float | int) and wall > 0):
                failed = "error" in last and "RowTimeout" not in last["error"]
                wall = 0.0 if failed else FALLBACK_ROW_S  # a method that fails at once
            total += wall * (cfg.get("rounds", 1) if m in cfg.get("rounded", ()) else 1)
    return total


FALLBACK_ROW_S = 120.0
"""Seconds :func:`expected_seconds` counts for a row with no earlier measurement."""


def run_lanes(
    work: list[tuple[str, dict, str, list[str]]],
    lanes: int,
    save: Callable[[str, list[dict]], None],
    expected: dict,
) -> dict[str, list[dict]]:
    """Run ``(suite, cfg, problem, methods)`` units on `lanes` threads, each driving its own row
    workers (one process, one thread of compute per lane), longest expected unit first; `save`
    gets a suite's rows so far after each of its units."""
    run, lock = _run_stamp(), threading.Lock()
    rows: dict[str, list[dict]] = {suite: [] for suite, *_ in work}
    order = sorted(work, key=lambda u: -expected[u[0], u[2]])

    def one(unit: tuple) -> None:
        suite, cfg, pname, methods = unit
        new = run_unit(suite, cfg, pname, methods, run)
        with lock:
            rows[suite] += new
            save(suite, rows[suite])

    with ThreadPoolExecutor(lanes) as pool:
        for done in [pool.submit(one, u) for u in order]:
            done.result()
    return rows


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


def _print_estimate(work: list[tuple], expected: dict, lanes: int) -> None:
    """Each suite's expected seconds and the run's on `lanes` lanes (longest unit first, each
    to the lane that frees first; the speed suite alone first where lanes > 1)."""
    by_suite: dict[str, float] = {}
    for suite, _, pname, _ in work:
        by_suite[suite] = by_suite.get(suite, 0.0) + expected[suite, pname]
    for suite, seconds in by_suite.items():
        print(f"{suite}: {seconds:,.0f} s expected on one lane")
    alone = sum(v for k, v in by_suite.items() if lanes <= 1 or k == "speed")
    free = [0.0] * max(lanes, 1)
    rest = [expected[s, p] for s, _, p, _ in work if lanes > 1 and s != "speed"]
    for seconds in sorted(rest, reverse=True):
        free[free.index(min(free))] += seconds
    print(f"expected wall time on {max(lanes, 1)} lane(s): {(alone + max(free)) / 60:,.0f} min")


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
        "--plan", choices=tuple(PLANS), help="the plan (default full; --quick: quick)"
    )
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
        "--lanes", type=int, default=1,
        help="rows run at once, each in its own one-thread worker (the speed suite runs alone "
        "first); default 1",
    )  # fmt: skip
    parser.add_argument(
        "--estimate", action="store_true",
        help="print the plan's expected time from the earlier rows' wall_s and exit",
    )  # fmt: skip
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
    plan_name = args.plan or ("quick" if args.quick else "full")
    plan = plan_for(plan_name, args.only)
    suites = [suite for suite in args.suite or list(plan) if suite in plan]
    cfgs = {suite: {**plan[suite], **overrides} for suite in suites}
    paths = {suite: results / f"{suite}.json" for suite in suites}
    earlier = {s: json.loads(p.read_text())["rows"] if p.exists() else [] for s, p in paths.items()}
    work = [(s, cfgs[s], p, m) for s in suites for p, m in units(s, cfgs[s], args.only)]
    expected = {(s, p): expected_seconds(s, c, p, m, earlier[s]) for s, c, p, m in work}
    if args.estimate:
        _print_estimate(work, expected, args.lanes)
        return
    import torch

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.perf_counter()
    results.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    _ROW_TIMEOUT[:] = [args.row_timeout or None]
    t0s = {suite: time.perf_counter() for suite in suites}

    def save(suite: str, rows: list[dict], done: bool = False) -> None:
        how = dict(
            quick=plan_name == "quick", t0=t0s[suite], config=cfgs[suite], lanes=args.lanes,
            plan=plan_name,
        )  # fmt: skip
        _save(paths[suite], earlier[suite], how, rows, done)

    alone = suites if args.lanes <= 1 else [s for s in suites if s == "speed"]
    for suite in alone:
        t0s[suite] = time.perf_counter()
        save(suite, run_suite(suite, cfgs[suite], args.only, partial(save, suite)), done=True)
    rest = [u for u in work if u[0] not in alone]
    if rest:
        t0s.update({suite: time.perf_counter() for suite, *_ in rest})
        for suite, rows in run_lanes(rest, args.lanes, save, expected).items():
            save(suite, rows, done=True)
    for worker in _WORKERS.values():
        worker.close()
    _WORKERS.clear()
    report.write_docs(results, docs)
    print(
        f"done in {time.perf_counter() - start:.0f} s; wrote {docs / 'benchmarks.md'}", flush=True
    )


if __name__ == "__main__":
    main()
