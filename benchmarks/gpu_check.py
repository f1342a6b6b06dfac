"""Check that the NumPyro backend fits a posterior and a density on a GPU, and how fast.

Fits a 10-D logistic-regression posterior (RealNVP guide, 8 vectorised particles) and a 2-D
density (RealNVP), each twice with the same shapes: the first call's extra time is compilation,
the second call's rate is the training speed (the compiled loop is reused). Prints steps/s,
compile time and the device's peak memory (``device.memory_stats()``). Finishes in well under
5 minutes on a GPU.

Usage:
    python benchmarks/gpu_check.py              # exits 0 with a message when no GPU is present
    python benchmarks/gpu_check.py --allow-cpu  # run on the CPU anyway (a smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _gpu_devices() -> list:
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _report(name: str, steps: int, first: float, second: float, device) -> None:
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    peak_text = "n/a (backend reports none)" if peak is None else f"{peak / 2**20:.1f} MiB"
    print(
        f"{name}: {steps / second:,.0f} steps/s, compile ~{max(first - second, 0.0):.1f} s "
        f"(first call {first:.1f} s, second {second:.1f} s), peak device memory {peak_text}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run even without a GPU")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per fit")
    args = parser.parse_args(argv)

    import jax

    gpus = _gpu_devices()
    if not gpus and not args.allow_cpu:
        print(
            f"gpu_check: no GPU visible to JAX (devices: {jax.devices()}); nothing checked. "
            "Install a CUDA build of jax, or pass --allow-cpu for a CPU smoke test."
        )
        return 0
    device = gpus[0] if gpus else jax.devices("cpu")[0]
    print(f"gpu_check: jax {jax.__version__} on {device.platform}: {device.device_kind}")

    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from flowguides.numpyro import fit_density, fit_posterior
    from flowguides.spec import FlowSpec

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 10)).astype(np.float32)
    y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-x @ rng.normal(size=10)))).astype(np.float32)

    def logistic(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(10), 1.0).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    spec = FlowSpec.realnvp(num_layers=4, hidden=[64, 64])
    steps = args.steps
    with jax.default_device(device):

        def posterior(y_obs):
            return fit_posterior(logistic, spec, x, y_obs, num_steps=steps, progress=False)

        fit, first = _timed(lambda: posterior(y))
        fit, second = _timed(lambda: posterior(1.0 - y))
        placed = {d.platform for leaf in jax.tree.leaves(fit.params) for d in leaf.devices()}
        print(f"posterior parameters live on: {sorted(placed)}; ELBO {fit.elbo(1000):.2f}")
        _report("posterior (logistic regression, 10-D)", steps, first, second, device)

        a = rng.normal(size=20000)
        data = np.stack([a, 0.5 * a**2 + 0.3 * rng.normal(size=20000)], axis=1)
        dspec = FlowSpec.realnvp(num_layers=6, hidden=[64, 64])

        def density(d):
            return fit_density(d, dspec, num_steps=steps, patience=steps, progress=False)

        dfit, first = _timed(lambda: density(data))
        dfit, second = _timed(lambda: density(data[::-1].copy()))
        print(f"density test log-likelihood {dfit.log_prob(data[:2000]).mean():.3f}")
        _report("density (2-D, batch 256)", steps, first, second, device)
    if not gpus:
        print("gpu_check: ran on the CPU (--allow-cpu); no GPU was checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
