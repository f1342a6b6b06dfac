"""Set-up time, steps/s and peak memory of Pyro `fit_posterior` on a varying-intercept
regression with thousands of groups (latent dimension = groups + 2).

Each size runs in a fresh process, so that its peak resident memory (``ru_maxrss``) is its own.

    python -m benchmarks.high_dim_pyro --groups 498 1998 3998 --steps 200
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import time
from typing import Any

__all__ = ["run_one"]


def _model(group: Any, y: Any, num_groups: int, known_scale: bool) -> None:
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
    if known_scale:  # a Gaussian posterior with a mode: the Laplace start is taken
        tau = y.new_ones(())
        sigma = pyro.sample("sigma", dist.HalfNormal(y.new_ones(())))
    else:  # the usual hierarchy: tau has no mode (a funnel), "auto" takes a plain start
        tau = pyro.sample("tau", dist.HalfNormal(y.new_ones(())))
        sigma = y.new_ones(())
    with pyro.plate("groups", num_groups):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(alpha[..., group], sigma), obs=y)


def run_one(num_groups: int, steps: int, known_scale: bool, per_group: int = 5) -> dict:
    """Fit once; return the dimension, set-up seconds, steps/s and peak RSS in MiB."""
    import torch

    from flowguides import FlowSpec
    from flowguides.pyro import fit_posterior

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    group = torch.arange(num_groups).repeat(per_group)
    effects = torch.randn(num_groups, generator=gen, dtype=torch.float64)
    y = 1.0 + effects[group] + torch.randn(len(group), generator=gen, dtype=torch.float64)
    spec = FlowSpec.realnvp(num_layers=2, hidden=[64], dtype="float64")
    start = time.perf_counter()
    fit = fit_posterior(
        _model, spec, group, y, num_groups, known_scale, num_steps=steps, progress=False
    )
    fixed = fit.guide.preconditioner
    return {
        "script": "high_dim_pyro",
        "commit": _commit(),
        "dim": fit.guide.latent_dim,
        "known_scale": known_scale,
        "precondition": None if fixed is None else list(fixed["precondition.scale_tril"].shape),
        "setup_s": round(fit.timing["setup_s"], 2),
        "steps_per_s": round(fit.timing["steps_per_s"], 1),
        "total_s": round(time.perf_counter() - start, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _worker(args: tuple, queue: Any) -> None:
    queue.put(run_one(*args))


def _commit() -> str:
    """The git commit the row ran on ("unknown" outside a checkout)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[498, 1998])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    for known_scale in (True, False):
        for num_groups in args.groups:
            queue = context.Queue()
            process = context.Process(
                target=_worker, args=((num_groups, args.steps, known_scale), queue)
            )
            process.start()
            print(json.dumps(queue.get()), flush=True)
            process.join()


if __name__ == "__main__":
    main()
