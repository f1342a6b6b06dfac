"""Time to first draw, cold and cached: a first `fit_posterior` plus draws against NumPyro NUTS.

Each run is a new Python process that turns on the persistent compilation cache
(`flowguides.numpyro.use_compilation_cache`) in one directory shared by the runs (float64, one
thread). It fits ``FlowSpec.realnvp(num_layers=4)`` to one posterior of `benchmarks/models/`
with `fit_posterior`'s defaults and draws from the fit; then, in the same process, NumPyro NUTS
runs one chain of 1,000 warm-up + 1,000 draws on the same model. The first run finds the cache
empty (``cold``); later ones find what it compiled (``warm``: the cached rerun). NUTS runs in
the cold run only unless ``--nuts every``.

One row per method and run, keyed as `benchmarks/rows.py` keys rows (suite ``first_call``,
``method_settings.cache`` ``cold`` or ``warm``), with the commit, UTC time, library versions
and settings (threads, float64, machine):

* flowguides: ``method_settings.compiler_options`` (`flowguides.numpyro._training`'s for the
  CPU, or ``--compiler-options``) and ``setup_compiler_options`` (those of the programs a fit
  runs once, where they differ), `fit.timing` (`flowguides.core.timing.FIT_TIMING_KEYS`: ``setup_s`` =
  ``init_s`` + ``start_s``, ``compile_s``, ``train_s``, ``fit_s``, ``steps_per_s``) and
  ``draws_s``; ``wall_s``: from just before the fit to the last draw; with ``--log-compiles``,
  ``programs``: every program the fit and the draws compiled or loaded, in order, with its
  trace, lowering and compile (or load) seconds (`benchmarks.compile_log`);
* NUTS: ``wall_s`` (``MCMC.run`` and the draws, compiles included) and ``divergences``;
  ``method_settings.alongside`` the flowguides compiler options of the process it ran in;
* both: ``import_s`` (the process's imports: flowguides, JAX, NumPyro), ``warm_up_s`` (one tiny
  jitted operation before either method: the process's JAX backend and compiler set-up, which
  would otherwise fall on whichever method ran first; `warm_up`) and ``cache_entries`` (files in
  the cache directory after the method ran).

Run from the repository root (rows are printed; ``--write`` merges them into ``--out``)::

    python -m benchmarks.first_call                                   # eight schools, 2 runs
    python -m benchmarks.first_call --model garch-garch11 --runs 3
    python -m benchmarks.first_call --all --write                     # the nine posteriors
    python -m benchmarks.first_call --cache-dir ~/.cache/flowguides/jax   # keep the cache
    python -m benchmarks.first_call --log-compiles   # each program's trace, lower, compile s
    python -m benchmarks.first_call --all --write --compiler-options '{"xla_backend_optimization_level": 3}'
"""

from __future__ import annotations

import os
import time

_STARTED = time.perf_counter()
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.compile_log import CompileLog  # noqa: E402
from benchmarks.models.numpyro_models import MODELS  # noqa: E402
from benchmarks.models.posteriordb import NAMES, load  # noqa: E402
from benchmarks.rows import (  # noqa: E402
    git_commit,
    library_versions,
    merge_rows,
    row_versions,
    utc_now,
)
from flowguides.core.timing import FIT_TIMING_KEYS  # noqa: E402
from flowguides.numpyro import _training, fit_posterior, use_compilation_cache  # noqa: E402
from flowguides.spec import FlowSpec  # noqa: E402

__all__ = ["NUTS_SETTINGS", "flowguides_row", "main", "nuts_row", "warm_up", "write_rows"]

_IMPORTED = time.perf_counter()

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "eight_schools-eight_schools_noncentered"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "first_call.jsonl"
SPEC = "FlowSpec.realnvp(num_layers=4)"
NUTS_SETTINGS = {"num_chains": 1, "num_warmup": 1000, "num_samples": 1000}
"""NumPyro NUTS's budget in the rows (one chain, as a first call would run it)."""


def _entries(cache_dir: Path) -> int:
    return sum(1 for p in cache_dir.rglob("*") if p.is_file())


def _row(name: str, method: str, run: str, settings: dict, cache_dir: Path) -> dict[str, Any]:
    """The fields every row has: its key, the commit, time, versions and environment."""
    return {
        "suite": "first_call",
        "problem": name,
        "method": method,
        "seed": settings.pop("seed"),
        **{k: settings.pop(k, None) for k in ("num_steps", "num_particles", "num_draws")},
        "method_settings": {**settings, "cache": run},
        "commit": git_commit(),
        "timestamp": utc_now(),
        "versions": row_versions(method, library_versions()),
        "environment": {
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "float64": bool(jax.config.jax_enable_x64),
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        },
        "import_s": _IMPORTED - _STARTED,
        "cache_entries": _entries(cache_dir),
    }


def flowguides_row(
    name: str, run: str, cache_dir: Path, num_draws: int, seed: int, log_compiles: bool = False
) -> dict:
    """A first `fit_posterior` (defaults) and `num_draws` draws in this process; its row (with
    `log_compiles`, ``programs``: `benchmarks.compile_log.CompileLog`'s per-program times)."""
    data = load(name).data
    log = CompileLog() if log_compiles else contextlib.nullcontext()
    t0 = time.perf_counter()
    with log:
        spec = FlowSpec.realnvp(num_layers=4)
        fit = fit_posterior(MODELS[name], spec, seed=seed, progress=False, **data)
        fit.sample(num_draws, seed=seed)
    wall_s = time.perf_counter() - t0
    settings = {"seed": seed, "num_steps": len(fit.losses), "num_particles": 8}
    settings.update(num_draws=num_draws, spec=SPEC, fit_posterior="defaults")
    settings.update(_options())
    if log_compiles:
        settings["log_compiles"] = True  # JAX logs every compile: a little slower
    row = _row(name, "flowguides-numpyro RealNVP", run, settings, cache_dir)
    if log_compiles:
        row["programs"] = log.programs
    timing = {k: fit.timing[k] for k in (*FIT_TIMING_KEYS, "draws_s")}
    final = float(np.mean(fit.losses[-100:]))
    row.update(latent_dim=fit.guide.latent_dim, wall_s=wall_s, final_loss_mean100=final)
    row["data_elements"] = sum(int(np.size(v)) for v in data.values())
    return {**row, **timing}


def _options() -> dict:
    """flowguides' compiler options in this process: its training programs' and, where they
    differ, those of the programs a fit runs once (set-up, start search, draws), which the
    training of a model on at most ``chunk_setup_max_elements`` data elements takes too."""
    options = {"compiler_options": _training.compiler_options()}
    setup = _training.compiler_options(setup=True)
    if setup != options["compiler_options"]:
        options["setup_compiler_options"] = setup
        limit = getattr(_training, "CHUNK_SETUP_MAX_ELEMENTS", None)
        if limit is not None:
            options["chunk_setup_max_elements"] = limit
    return options


def nuts_row(name: str, run: str, cache_dir: Path, seed: int) -> dict:
    """NumPyro NUTS at `NUTS_SETTINGS` in this process; its row."""
    from numpyro.infer import MCMC, NUTS

    data = load(name).data
    s = NUTS_SETTINGS
    t0 = time.perf_counter()
    sizes = {k: s[k] for k in ("num_warmup", "num_samples", "num_chains")}
    mcmc = MCMC(NUTS(MODELS[name]), **sizes, progress_bar=False)
    mcmc.run(jax.random.key(seed), extra_fields=("diverging",), **data)
    draws = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    wall_s = time.perf_counter() - t0
    settings = {"seed": seed, "num_draws": s["num_samples"], **s}
    # the process it ran in (NUTS compiles with XLA's defaults): pairs it with its flowguides row
    settings["alongside"] = _options()
    row = _row(name, "numpyro NUTS", run, settings, cache_dir)
    diverging = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    return {**row, "wall_s": wall_s, "divergences": diverging, "sites": sorted(draws)}


def write_rows(rows: list[dict], path: Path) -> None:
    """Merge `rows` into the JSON-lines file `path` (a row with the same key is replaced)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    old = [json.loads(line) for line in lines if line.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = merge_rows(old, rows)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in merged))


def warm_up() -> float:
    """Seconds of one tiny jitted operation: the process's JAX backend and compiler set-up, paid
    here so that neither method timed after it pays them (whichever ran first would)."""
    t0 = time.perf_counter()
    jax.jit(lambda x: x + 1)(jax.numpy.ones(2)).block_until_ready()
    return time.perf_counter() - t0


def _child(args: argparse.Namespace) -> list[dict]:
    cache_dir = args.cache_dir
    if args.compiler_options is not None:
        _training.CPU_COMPILER_OPTIONS = args.compiler_options
    use_compilation_cache(cache_dir)
    warm_up_s = warm_up()
    rows = [flowguides_row(args.model[0], args.run, cache_dir, args.num_draws, args.seed,
                           args.log_compiles)]  # fmt: skip
    if args.with_nuts:
        rows.append(nuts_row(args.model[0], args.run, cache_dir, args.seed))
    return [{**row, "warm_up_s": warm_up_s} for row in rows]


def _runs(name: str, args: argparse.Namespace, cache_dir: Path) -> list[dict] | int:
    """The fresh processes for posterior `name`, one after another: their rows, or the exit
    status of the first that failed."""
    rows = []
    for i in range(args.runs):
        run = "warm" if _entries(cache_dir) else "cold"
        command = [sys.executable, "-m", "benchmarks.first_call", "--child", "--run", run]
        command += ["--model", name, "--num-draws", str(args.num_draws)]
        command += ["--seed", str(args.seed), "--cache-dir", str(cache_dir)]
        if args.compiler_options is not None:
            command += ["--compiler-options", json.dumps(args.compiler_options)]
        if args.log_compiles:
            command.append("--log-compiles")
        if args.nuts == "every" or (args.nuts == "first" and i == 0):
            command.append("--with-nuts")
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            return done.returncode
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line entry: run the fresh processes, print their rows (and write them).

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0, or the exit status of the first run that failed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=NAMES, action="append", help=f"default {DEFAULT_MODEL}")
    parser.add_argument("--all", action="store_true", help="the nine posteriors (long)")
    parser.add_argument("--runs", type=int, default=2, help="fresh processes (cold, then warm)")
    parser.add_argument("--num-draws", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--nuts",
        choices=["first", "every", "none"],
        default="first",
        help="the runs NUTS runs in: the first (cold) one, every one, none",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: a new temporary directory")
    parser.add_argument(
        "--compiler-options",
        type=json.loads,
        help="JSON: flowguides' CPU compiler options instead of CPU_COMPILER_OPTIONS "
        "(e.g. '{\"xla_backend_optimization_level\": 3}', XLA's default); in the rows",
    )
    parser.add_argument(
        "--log-compiles",
        action="store_true",
        help="record each program flowguides' fit compiles or loads (trace, lower, compile s)",
    )
    parser.add_argument("--write", action="store_true", help="merge the rows into --out")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", default="cold", help=argparse.SUPPRESS)
    parser.add_argument("--with-nuts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)), flush=True)
        return 0
    names = list(NAMES) if args.all else args.model or [DEFAULT_MODEL]
    for name in names:
        with tempfile.TemporaryDirectory(prefix="flowguides-first-call-") as scratch:
            rows = _runs(name, args, (args.cache_dir or Path(scratch)).expanduser().resolve())
        if isinstance(rows, int):
            return rows
        if args.write:
            write_rows(rows, args.out)  # after each posterior: a long run keeps what it did
    return 0


if __name__ == "__main__":
    sys.exit(main())
