"""High-dimensional NumPyro fits: set-up, step rate and peak memory against the latent dimension.

A varying-intercept model with `groups` group intercepts (``groups + 2`` latent dimensions:
``mu``, ``tau`` and the intercepts), five observations per group, fitted with
``FlowSpec.realnvp(num_layers=2, hidden=[64])`` for 1,500 steps from the default start. Above
`FULL_RANK_MAX_DIM` the Laplace start whitens with the Hessian diagonal, held as a vector, so
neither the set-up's memory nor a step's work should grow with ``d**2``. Each size runs in its
own process (a clean peak resident memory); one JSON row per size is printed.

    python benchmarks/high_dim_numpyro.py              # groups 1000 and 10000
    python benchmarks/high_dim_numpyro.py --groups 10000 --steps 1500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def varying_intercept(group, y, num_groups: int) -> None:
    import numpyro
    import numpyro.distributions as dist

    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", num_groups):
        alpha = numpyro.sample("alpha", dist.Normal(mu, tau))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(alpha[group], 1.0), obs=y)


def one_size(groups: int, steps: int, seed: int) -> dict:
    """Fit one size in this process and return its row."""
    import numpy as np

    from flowguides import FlowSpec
    from flowguides.numpyro import fit_posterior

    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(groups), 5)
    alpha = 0.5 + 1.0 * rng.standard_normal(groups)  # mu 0.5, tau 1
    y = alpha[group] + rng.standard_normal(group.size)
    spec = FlowSpec.realnvp(num_layers=2, hidden=[64])
    t0 = time.perf_counter()
    fit = fit_posterior(varying_intercept, spec, group, y, groups, num_steps=steps, progress=False)
    total = time.perf_counter() - t0
    tau = fit.sample(2000, seed=1)["tau"]
    fixed = fit.guide.preconditioner
    return {
        "script": "high_dim_numpyro",
        "commit": _commit(),
        "groups": groups,
        "latent_dim": fit.guide.latent_dim,
        "steps": steps,
        "whitening": None if fixed is None else list(fixed["precondition.scale_tril"].shape),
        "setup_s": round(fit.timing["setup_s"], 2),
        "compile_s": round(fit.timing["compile_s"], 2),
        "steps_per_s": round(fit.timing["steps_per_s"], 1),
        "total_s": round(total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tau_mean": round(float(tau.mean()), 3),
        "tau_sd": round(float(tau.std()), 3),
    }


def _commit() -> str:
    """The git commit the row ran on ("unknown" outside a checkout)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_size(args.groups[0], args.steps, args.seed)), flush=True)
        return
    for groups in args.groups:
        cmd = [sys.executable, __file__, "--child", "--groups", str(groups)]
        cmd += ["--steps", str(args.steps), "--seed", str(args.seed)]
        out = subprocess.run(cmd, env=os.environ, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
