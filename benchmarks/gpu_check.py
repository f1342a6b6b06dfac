"""The NumPyro backend on a GPU: does every fit run there, and how fast against the CPU.

One script, float32, that a GPU machine with only the checkout and its set-up runs in under
five minutes. Each case runs once on the GPU and once on the CPU of the same machine (fewer
steps there: the rates are per step or per point, so the ratio is fair):

* ``fit_posterior`` on the 10-D funnel with RealNVP, planar and neural-ODE (RK4) guides, and
  on a logistic regression of 10^6 rows with its plate subsampled to 1,000 rows (RealNVP):
  ``fit.timing``'s compile seconds and steady steps/s;
* ``fit_density`` (RealNVP) on 10^6 two-moons points and on scikit-learn's digits (64-D):
  points/s of a second, identical-shape call (its program compiled by the first; the
  difference of the two calls is the compile), validation passes included.

Prints one line per case and device, then the GPU / CPU ratios; ``--out`` appends the rows
(settings, versions, device) to a JSON-lines file. Exits 1 when any case raised (every case
runs; the errors are printed) or when no GPU is visible (``--allow-cpu``: a CPU-only smoke
run, which exits 0).

Usage::

    python -m benchmarks.gpu_check --out gpu_check.jsonl
    python -m benchmarks.gpu_check --allow-cpu --steps 50 --cpu-steps 20   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("JAX_ENABLE_X64", "0")

__all__ = ["CASES", "main"]

ROWS = 1_000_000
"""Rows of the subsampled logistic regression and points of the 2-D density set."""


def _funnel_model() -> Callable:
    from benchmarks.targets import TARGETS

    return TARGETS["funnel"].numpyro_model()


def _posterior(spec: Callable[[], Any], problem: str) -> Callable[[int, dict], dict]:
    def run(steps: int, shared: dict) -> dict:
        from flowguides.numpyro import fit_posterior

        if problem == "funnel":
            fit = fit_posterior(_funnel_model(), spec(), num_steps=steps, progress=False)
        else:
            from benchmarks.large import numpyro_model

            data = shared.setdefault("logistic", _logistic_data())
            model = numpyro_model("logistic", 0, 1000)
            fit = fit_posterior(model, spec(), num_steps=steps, progress=False, **data)
        timing = fit.timing
        return {"compile_s": timing["compile_s"], "setup_s": timing["setup_s"],
                "steps_per_s": timing["steps_per_s"], "final_loss": float(fit.losses[-1])}  # fmt: skip

    return run


def _logistic_data() -> dict:
    import jax.numpy as jnp

    from benchmarks.large import make_data

    return {k: jnp.asarray(v) for k, v in make_data("logistic", ROWS).items()}


def _density(problem: str, batch: int) -> Callable[[int, dict], dict]:
    def run(steps: int, shared: dict) -> dict:
        import numpy as np

        from benchmarks.density_data import DATASETS, load
        from flowguides.numpyro import fit_density
        from flowguides.spec import FlowSpec

        if problem == "two_moons":
            data = DATASETS["two_moons"](ROWS, np.random.default_rng(0)).astype(np.float32)
        else:
            data = load("digits").train.astype(np.float32)
        spec = FlowSpec.realnvp(num_layers=4, hidden=[64, 64])

        def fit(x: np.ndarray) -> tuple[Any, float]:
            t0 = time.perf_counter()
            res = fit_density(x, spec, num_steps=steps, batch_size=batch, patience=steps,
                              progress=False)  # fmt: skip
            return res, time.perf_counter() - t0

        _, first = fit(data)
        res, second = fit(data[::-1].copy())  # same shapes: the compiled program again
        rows = min(batch, int(0.9 * len(data)))
        return {"compile_s": max(first - second, 0.0), "points_per_s": steps * rows / second,
                "batch": rows, "final_val_nll": float(res.losses["val"][-1])}  # fmt: skip

    return run


def _specs() -> dict[str, Callable[[], Any]]:
    from flowguides.spec import FlowSpec

    return {
        "RealNVP": lambda: FlowSpec.realnvp(num_layers=4),
        "planar": lambda: FlowSpec.planar(num_layers=16),
        "neural ODE": lambda: FlowSpec.neural_ode(hidden=[32, 32], solver="rk4", num_steps=8),
    }


def _cases() -> dict[str, tuple[str, Callable[[int, dict], dict]]]:
    specs = _specs()
    cases: dict[str, tuple[str, Callable[[int, dict], dict]]] = {
        f"fit_posterior funnel 10-D, {name}": ("steps", _posterior(spec, "funnel"))
        for name, spec in specs.items()
    }
    cases["fit_posterior logistic 10^6 rows (subsampled 1,000), RealNVP"] = (
        "steps", _posterior(specs["RealNVP"], "logistic"),
    )  # fmt: skip
    cases["fit_density two moons 10^6 points, RealNVP"] = ("points", _density("two_moons", 4096))
    cases["fit_density digits 64-D, RealNVP"] = ("points", _density("digits", 4096))
    return cases


CASES = (
    "fit_posterior funnel 10-D, {RealNVP, planar, neural ODE}",
    "fit_posterior logistic 10^6 rows (subsampled 1,000), RealNVP",
    "fit_density two moons 10^6 points, RealNVP",
    "fit_density digits 64-D, RealNVP",
)
"""What the check runs (see the module docstring)."""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("flowguides", "jax", "jaxlib", "numpyro", "optax", "diffrax"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _commit() -> str | None:
    try:
        from benchmarks.rows import git_commit

        return git_commit()
    except Exception:  # noqa: BLE001 - no git on the machine: the row says so
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU only, exit 0")
    parser.add_argument("--steps", type=int, default=2000, help="steps per case on the GPU")
    parser.add_argument("--cpu-steps", type=int, default=300, help="steps per case on the CPU")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--out", help="append the rows to this JSON-lines file")
    args = parser.parse_args(argv)

    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus and not args.allow_cpu:
        print(f"gpu_check: no GPU visible to JAX (devices: {jax.devices()}); nothing checked")
        return 1
    devices = [("gpu", gpus[0], args.steps)] if gpus else []
    devices.append(("cpu", jax.devices("cpu")[0], args.cpu_steps))
    print(f"gpu_check: jax {jax.__version__}; devices {[str(d) for _, d, _ in devices]}")
    stamp = {"suite": "gpu_check", "versions": _versions(), "commit": _commit(),
             "dtype": "float32", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    rows, failed, shared = [], 0, {}
    for case, (unit, run) in _cases().items():
        if args.only and args.only not in case:
            continue
        for kind, device, steps in devices:
            row = {**stamp, "case": case, "device": kind, "device_kind": device.device_kind,
                   "num_steps": steps}  # fmt: skip
            t0 = time.perf_counter()
            try:
                with jax.default_device(device):
                    row.update(run(steps, shared.setdefault(kind, {})))
            except Exception as exc:  # noqa: BLE001 - every case runs; the exit code says
                failed += 1
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                traceback.print_exc()
            row["wall_s"] = time.perf_counter() - t0
            rate = row.get(f"{unit}_per_s")
            shown = "ERROR " + row["error"] if "error" in row else f"{rate:,.0f} {unit}/s"
            print(f"{case} [{kind}]: {shown}, compile {row.get('compile_s', float('nan')):.1f} s, "
                  f"wall {row['wall_s']:.1f} s", flush=True)  # fmt: skip
            rows.append(row)
    for case, (unit, _) in _cases().items():
        rate = {r["device"]: r.get(f"{unit}_per_s") for r in rows if r["case"] == case}
        if rate.get("gpu") and rate.get("cpu"):
            print(f"ratio GPU / CPU, {case}: {rate['gpu'] / rate['cpu']:.2f}")
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    if failed:
        print(f"gpu_check: {failed} case(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
