"""Steps/s of one NumPyro SVI step of a minibatch model, NumPyro's own subsample draw against
flowguides' vectorised draw (`flowguides.numpyro._stream.training_model`), in one process.

The model is `benchmarks.large`'s logistic regression with its plate subsampled to 1,000 rows,
the guide NumPyro's `AutoNormal`, 8 vectorised particles, one thread; 200 timed steps after
one compiled warm-up step. One JSON row per (rows, draw) on stdout (``--out`` appends them)::

    python -m benchmarks.subsample_draw --rows 20000 1000000
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    import jax
    import jax.numpy as jnp
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    from benchmarks.large import make_data, numpyro_model
    from benchmarks.rows import git_commit, library_versions, utc_now
    from flowguides.numpyro._stream import training_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.subsample_draw")
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for rows in args.rows:
        data = {k: jnp.asarray(v) for k, v in make_data("logistic", rows).items()}
        model = numpyro_model("logistic", 0, args.batch)
        for draw, m in (("numpyro", model), ("flowguides", training_model(model, True))):
            svi = SVI(
                m, AutoNormal(model), optax.adam(1e-2), Trace_ELBO(8, vectorize_particles=True)
            )
            state = svi.init(jax.random.key(0), **data)
            update = jax.jit(svi.update)
            state, loss = update(state, **data)
            jax.block_until_ready(loss)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, loss = update(state, **data)
            jax.block_until_ready(loss)
            row = {"suite": "subsample_draw", "rows": rows, "batch": args.batch, "draw": draw,
                   "steps_per_s": args.steps / (time.perf_counter() - t0), "particles": 8,
                   "commit": git_commit(), "versions": library_versions(),
                   "timestamp": utc_now()}  # fmt: skip
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
