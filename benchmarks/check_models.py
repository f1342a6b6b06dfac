"""Check the NumPyro translations of the nine posteriors against their reference draws.

For each model NumPyro's NUTS (1,000 warm-up + 1,000 draws, one chain, one thread, float64) is
run on the data with NumPyro's default settings (target acceptance 0.8, tree depth 10: what a
user would run), and every scalar element of every reference parameter is compared with the
10,000 reference draws:

* mean error ``|mean - ref_mean| / ref_sd``, must be at most :data:`MEAN_TOLERANCE` (0.15
  reference sd: about 3 Monte Carlo standard errors at an effective sample size of ~400);
* sd ratio ``sd / ref_sd``, must lie in :data:`SD_RATIO_RANGE` ([0.8, 1.25]).

A model passes when every element does. The table goes to stdout and, with ``--out``, to JSON
(default ``benchmarks/results/check_models.json``). Run from the repository root::

    python -m benchmarks.check_models                    # all nine, a few minutes
    python -m benchmarks.check_models --models arK-arK   # one

The exit status is 1 when a model fails, unless it is one of :data:`KNOWN_NUTS_FAILURES`
(the centered eight schools funnel).
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
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from numpyro.diagnostics import effective_sample_size  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402

from benchmarks.models.numpyro_models import MODELS  # noqa: E402
from benchmarks.models.posteriordb import NAMES, load  # noqa: E402

__all__ = ["KNOWN_NUTS_FAILURES", "MEAN_TOLERANCE", "SD_RATIO_RANGE", "check_model", "main"]

MEAN_TOLERANCE = 0.15
"""Largest accepted ``|mean - ref_mean| / ref_sd`` for any element."""
SD_RATIO_RANGE = (0.8, 1.25)
"""Accepted range of ``sd / ref_sd`` for any element."""
KNOWN_NUTS_FAILURES = {
    "eight_schools-eight_schools_centered": (
        "the centered funnel: one NUTS chain of 1,000 draws explores the neck (small tau) poorly "
        "(divergences, tau ESS of a few dozen), so its sds come out short. The model is checked "
        "instead by an exact identity in tests/test_benchmark_models.py: its log density is the "
        "non-centered one's minus J log tau, and the non-centered model passes here."
    ),
}
"""Models whose NUTS check may fail for a reason that is NUTS's, not the model's; a failure here
is still reported as one but does not set the exit status."""
NUM_WARMUP = 1000
NUM_SAMPLES = 1000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "check_models.json"


def _element_labels(site: str, shape: tuple[int, ...]) -> list[str]:
    """Stan-style 1-based labels for the elements of a site: ``theta[1]``, ..."""
    if not shape:
        return [site]
    return [f"{site}[{','.join(str(i + 1) for i in idx)}]" for idx in np.ndindex(*shape)]


def check_model(name: str, seed: int = 0) -> dict[str, Any]:
    """Run NUTS on one model and compare every reference element with the reference draws.

    Args:
        name: a posterior name from :data:`benchmarks.models.posteriordb.NAMES`.
        seed: the PRNG seed for NUTS.

    Returns:
        A JSON-ready record: ``passed``, ``wall_s`` (compile included), ``divergences``,
        ``max_mean_error``, ``sd_ratio_min``/``sd_ratio_max`` and per-element ``params``
        (``mean_error``, ``sd_ratio``, ``ess``).
    """
    posterior = load(name)
    mcmc = MCMC(
        NUTS(MODELS[name]),
        num_warmup=NUM_WARMUP,
        num_samples=NUM_SAMPLES,
        num_chains=1,
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), extra_fields=("diverging",), **posterior.data)
    samples = jax.block_until_ready(mcmc.get_samples())
    wall = time.perf_counter() - start
    params: dict[str, dict[str, float]] = {}
    for site in posterior.names:
        reference = posterior.reference[site]
        shape = reference.shape[1:]
        draws = np.asarray(samples[site]).reshape(NUM_SAMPLES, -1)
        reference = reference.reshape(reference.shape[0], -1)
        ref_sd = reference.std(axis=0, ddof=1)
        mean_error = np.abs(draws.mean(axis=0) - reference.mean(axis=0)) / ref_sd
        sd_ratio = draws.std(axis=0, ddof=1) / ref_sd
        ess = effective_sample_size(draws[None])
        for j, label in enumerate(_element_labels(site, shape)):
            params[label] = {
                "mean_error": float(mean_error[j]),
                "sd_ratio": float(sd_ratio[j]),
                "ess": float(ess[j]),
            }
    errors = [p["mean_error"] for p in params.values()]
    ratios = [p["sd_ratio"] for p in params.values()]
    low, high = SD_RATIO_RANGE
    passed = max(errors) <= MEAN_TOLERANCE and low <= min(ratios) and max(ratios) <= high
    return {
        "passed": bool(passed),
        "wall_s": round(wall, 2),
        "divergences": int(mcmc.get_extra_fields()["diverging"].sum()),
        "max_mean_error": max(errors),
        "sd_ratio_min": min(ratios),
        "sd_ratio_max": max(ratios),
        "params": params,
    }


def _verdict(name: str, passed: bool) -> str:
    if passed:
        return "yes"
    return "known" if name in KNOWN_NUTS_FAILURES else "NO"


def _settings(seed: int) -> dict[str, Any]:
    return {
        "sampler": "numpyro NUTS",
        "num_warmup": NUM_WARMUP,
        "num_samples": NUM_SAMPLES,
        "num_chains": 1,
        "seed": seed,
        "mean_tolerance_ref_sd": MEAN_TOLERANCE,
        "sd_ratio_range": list(SD_RATIO_RANGE),
        "float64": bool(jax.config.jax_enable_x64),
        "xla_flags": os.environ["XLA_FLAGS"],
        "versions": {"jax": jax.__version__, "numpyro": numpyro.__version__},
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry: check the models, print the table, write the JSON.

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0 when every checked model passes or is a known NUTS failure, else 1.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    results = {}
    print(f"{'posterior':42s} {'pass':>5s} {'max err':>8s} {'sd ratio':>13s} {'div':>4s} {'s':>6s}")
    for name in args.models:
        record = check_model(name, args.seed)
        if name in KNOWN_NUTS_FAILURES:
            record["known_nuts_failure"] = KNOWN_NUTS_FAILURES[name]
        results[name] = record
        ratios = f"{record['sd_ratio_min']:.2f}-{record['sd_ratio_max']:.2f}"
        print(
            f"{name:42s} {_verdict(name, record['passed']):>5s} "
            f"{record['max_mean_error']:8.3f} {ratios:>13s} {record['divergences']:4d} "
            f"{record['wall_s']:6.1f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": _settings(args.seed), "models": results}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    failed = [n for n, r in results.items() if not r["passed"] and n not in KNOWN_NUTS_FAILURES]
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
