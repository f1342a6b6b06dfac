"""Time to first draw, cold and warm: a first `fit_posterior` plus draws in a fresh process.

Each run is a new Python process that turns on the persistent compilation cache
(`flowguides.numpyro.use_compilation_cache`) in one directory shared by the runs, fits
``FlowSpec.realnvp(num_layers=4)`` to one posterior of `benchmarks/models/` with the default
settings (float64, one thread) and draws from the fit. A run that finds the cache empty is
``cold``, one that finds entries (the previous run's) ``warm``. One JSON row per run goes to
stdout:

* ``setup_s``, ``compile_s``: `fit.timing`'s guide set-up (start search included) and
  training-chunk compile (tracing included; a load from the cache when warm);
* ``train_s``: the rest of the `fit_posterior` call; ``draw_s``: ``fit.sample(num_draws)``;
* ``total_s``: from just before the fit to the last draw (imports not included; they are
  ``import_s``); ``cache_entries``: the files in the cache directory after the run;
* the commit (``+dirty`` with uncommitted changes) and the settings.

Run from the repository root (rows are printed only, not written)::

    python -m benchmarks.first_call                               # eight schools, 2 runs
    python -m benchmarks.first_call --model garch-garch11 --runs 3
    python -m benchmarks.first_call --cache-dir ~/.cache/flowguides/jax   # keep the cache
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
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpyro  # noqa: E402

from benchmarks.models.numpyro_models import MODELS  # noqa: E402
from benchmarks.models.posteriordb import NAMES, load  # noqa: E402
from flowguides.numpyro import fit_posterior, use_compilation_cache  # noqa: E402
from flowguides.spec import FlowSpec  # noqa: E402

__all__ = ["main", "run_once"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "eight_schools-eight_schools_noncentered"


def _commit() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{head}+dirty" if git("status", "--porcelain", "--untracked-files=no") else head


def run_once(name: str, cache_dir: Path, num_draws: int, seed: int) -> dict[str, Any]:
    """Fit and draw once in this process with the cache in `cache_dir`; return the row."""
    import_s = time.perf_counter() - _STARTED
    use_compilation_cache(cache_dir)
    post = load(name)
    t0 = time.perf_counter()
    fit = fit_posterior(
        MODELS[name], FlowSpec.realnvp(num_layers=4), seed=seed, progress=False, **post.data
    )
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    fit.sample(num_draws, seed=seed)
    draw_s = time.perf_counter() - t1
    setup_s, compile_s = fit.timing["setup_s"], fit.timing["compile_s"]
    return {
        "model": name,
        "setup_s": setup_s,
        "compile_s": compile_s,
        "train_s": fit_s - setup_s - compile_s,
        "draw_s": draw_s,
        "total_s": time.perf_counter() - t0,
        "import_s": import_s,
        "steps_per_s": fit.timing["steps_per_s"],
        "final_loss": float(fit.losses[-1]),
        "cache_entries": sum(1 for p in cache_dir.rglob("*") if p.is_file()),
        "commit": _commit(),
        "settings": {
            "spec": "FlowSpec.realnvp(num_layers=4)",
            "fit_posterior": "defaults",
            "num_draws": num_draws,
            "seed": seed,
            "float64": bool(jax.config.jax_enable_x64),
            "xla_flags": os.environ["XLA_FLAGS"],
            "versions": {"jax": jax.__version__, "numpyro": numpyro.__version__},
            "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry: run the fresh processes one after another, print their rows.

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0, or the exit status of the first run that failed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=NAMES, default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=2, help="fresh processes (cold, then warm)")
    parser.add_argument("--num-draws", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = run_once(args.model, args.cache_dir, args.num_draws, args.seed)
        print(json.dumps(row), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="flowguides-first-call-") as scratch:
        cache_dir = (args.cache_dir or Path(scratch)).expanduser().resolve()
        for _ in range(args.runs):
            cold = not any(p.is_file() for p in cache_dir.rglob("*"))
            command = [sys.executable, "-m", "benchmarks.first_call", "--child"]
            command += ["--model", args.model, "--num-draws", str(args.num_draws)]
            command += ["--seed", str(args.seed), "--cache-dir", str(cache_dir)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                return done.returncode
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps({"run": "cold" if cold else "warm", **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
