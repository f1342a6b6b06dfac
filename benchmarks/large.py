"""Large-N posteriors: subsampled flow VI against full-data NUTS as the data grow.

Two synthetic, seeded data sets generated on the fly (float32, one thread):

* ``logistic``: Bayesian logistic regression, 10 standard-normal features and an intercept;
* ``varying``: a varying-intercept linear regression, ``groups`` intercepts drawn around a
  common mean with a learned spread, 10 features, a learned noise scale.

Methods, one JSON row each (``--out`` appends JSON lines, by default
``benchmarks/results/large.jsonl``):

* ``numpyro NUTS (full data)``: one chain, ``--warmup`` + ``--samples``, the full likelihood
  at every leapfrog step;
* ``flowguides-numpyro RealNVP (subsampled, control_variate=...)`` and the same for Pyro:
  ``fit_posterior`` with the likelihood plate subsampled to ``--batch`` rows per step, once per
  ``--control-variates`` setting (default: ``taylor`` and ``none``).

The reference the errors are measured against is stated in each row (``reference``): for
``logistic`` the Laplace approximation on the full data (L-BFGS MAP and the exact Hessian;
with 10^5 rows and more and 11 parameters the posterior is Gaussian to well within the
errors reported, Bernstein-von Mises); for ``varying`` by default the Laplace approximation of
the posterior of the 13 globals with the intercepts integrated out in closed form
(`varying_reference`), or with ``--reference nuts`` a long NUTS run on the full data
(``--reference-samples`` draws). Each row records ``mean_err`` (the largest ``|mean - ref
mean| / ref sd`` over every scalar of the global parameters), ``sd_ratio_min/max``, wall
time, and for the fits their steps/s, set-up and compile.

Usage::

    python -m benchmarks.large --problem logistic --rows 100000 1000000
    python -m benchmarks.large --problem varying --rows 1000000 --groups 10000
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.rows import git_commit, library_versions, utc_now  # noqa: E402

__all__ = ["main", "make_data", "numpyro_model", "pyro_model"]

ROOT = Path(__file__).resolve().parent.parent
NUM_FEATURES = 10
GLOBALS = {"logistic": ("w", "b"), "varying": ("w", "mu", "sigma", "noise")}
"""The parameters scored (the varying intercepts themselves are not: ``groups`` of them)."""


def make_data(problem: str, rows: int, groups: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded synthetic data: ``X`` (rows, 10) float32, ``y`` float32, and for ``varying`` the
    int32 ``group`` of each row."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, NUM_FEATURES)).astype(np.float32)
    w = rng.normal(scale=0.5, size=NUM_FEATURES)
    if problem == "logistic":
        p = 1.0 / (1.0 + np.exp(-(x @ w + 0.5)))
        return {"X": x, "y": (rng.uniform(size=rows) < p).astype(np.float32)}
    group = rng.integers(groups, size=rows).astype(np.int32)
    intercepts = 1.0 + 0.5 * rng.normal(size=groups)
    y = intercepts[group] + x @ w + rng.normal(size=rows)
    return {"X": x, "y": y.astype(np.float32), "group": group}


def numpyro_model(problem: str, groups: int, batch: int | None):
    """The NumPyro model, written the way users write it: a plate over the rows with
    ``subsample_size=batch`` (None: the full data)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    def logistic(X, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(NUM_FEATURES), 1.0).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 5.0))
        with numpyro.plate("data", y.shape[0], subsample_size=batch) as idx:
            numpyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w + b), obs=y[idx])

    def varying(X, y, group):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(NUM_FEATURES), 1.0).to_event(1))
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
        noise = numpyro.sample("noise", dist.HalfNormal(2.0))
        with numpyro.plate("groups", groups):
            a = numpyro.sample("a", dist.Normal(mu, sigma))
        with numpyro.plate("data", y.shape[0], subsample_size=batch) as idx:
            loc = a[group[idx]] + X[idx] @ w
            numpyro.sample("obs", dist.Normal(loc, noise), obs=y[idx])

    return logistic if problem == "logistic" else varying


def pyro_model(problem: str, groups: int, batch: int | None):
    """The Pyro twin of :func:`numpyro_model`."""
    import pyro
    import pyro.distributions as dist
    import torch

    def logistic(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(NUM_FEATURES), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        with pyro.plate("data", y.shape[0], subsample_size=batch) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w + b), obs=y[idx])

    def varying(X, y, group):
        w = pyro.sample("w", dist.Normal(torch.zeros(NUM_FEATURES), 1.0).to_event(1))
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        noise = pyro.sample("noise", dist.HalfNormal(2.0))
        with pyro.plate("groups", groups):
            a = pyro.sample("a", dist.Normal(mu, sigma))
        with pyro.plate("data", y.shape[0], subsample_size=batch) as idx:
            loc = a[group[idx]] + X[idx] @ w
            pyro.sample("obs", dist.Normal(loc, noise), obs=y[idx])

    return logistic if problem == "logistic" else varying


def _moments(draws: dict[str, Any], names: tuple[str, ...]) -> dict[str, tuple]:
    out = {}
    for k in names:
        v = np.asarray(draws[k], dtype=np.float64)
        out[k] = (v.mean(0), v.std(0))
    return out


def _score(moments: dict[str, tuple], ref: dict[str, tuple]) -> dict[str, float]:
    err, ratios = [], []
    for k, (m, s) in ref.items():
        err.append(np.abs(moments[k][0] - m) / s)
        ratios.append(moments[k][1] / s)
    err_all, ratio_all = (
        np.concatenate([np.ravel(e) for e in err]),
        np.concatenate([np.ravel(r) for r in ratios]),
    )
    return {
        "mean_err": float(err_all.max()),
        "sd_ratio_min": float(ratio_all.min()),
        "sd_ratio_max": float(ratio_all.max()),
    }


def laplace_reference(data: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Laplace approximation of the logistic posterior on the full data, in float64 NumPy:
    the MAP by L-BFGS with the closed-form gradient, the sd from the closed-form Hessian
    ``Z^T diag(p (1 - p)) Z + prior precision`` (``Z`` the features with a column of ones)."""
    from scipy.optimize import minimize

    z = np.hstack([data["X"].astype(np.float64), np.ones((len(data["y"]), 1))])
    y = data["y"].astype(np.float64)
    prior = np.r_[np.ones(NUM_FEATURES), 1.0 / 25.0]  # w ~ N(0, 1), b ~ N(0, 5)

    def energy(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logits = z @ theta
        value = -(y @ logits - np.logaddexp(0.0, logits).sum()) + 0.5 * prior @ theta**2
        return value, -(z.T @ (y - 1.0 / (1.0 + np.exp(-logits)))) + prior * theta

    res = minimize(energy, np.zeros(NUM_FEATURES + 1), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-9, "maxiter": 1000})  # fmt: skip
    p = 1.0 / (1.0 + np.exp(-(z @ res.x)))
    hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(prior)
    sd = np.sqrt(np.diag(np.linalg.inv(hessian)))
    return {"w": (res.x[:NUM_FEATURES], sd[:NUM_FEATURES]), "b": (res.x[-1], sd[-1])}


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """JAX in float64 inside the block (the benchmark's models run in float32 around it)."""
    import jax

    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", x64)


def varying_statistics(data: dict[str, np.ndarray], groups: int) -> dict[str, np.ndarray]:
    """The sufficient statistics of the varying-intercept likelihood with the intercepts
    integrated out, in float64: per group the row count ``n``, ``sum y`` and ``sum x``; over all
    rows ``sum y^2``, ``sum x y``, ``sum x x^T``, ``sum x``, ``sum y`` and the row count."""
    x, y, g = (data["X"].astype(np.float64), data["y"].astype(np.float64), data["group"])
    n = np.bincount(g, minlength=groups).astype(np.float64)
    sx = np.stack([np.bincount(g, x[:, k], groups) for k in range(x.shape[1])], axis=1)
    return {"n": n, "sy": np.bincount(g, y, groups), "sx": sx, "yy": y @ y, "xy": x.T @ y,
            "xx": x.T @ x, "x": x.sum(0), "y": y.sum(), "rows": float(len(y))}  # fmt: skip


def varying_energy(theta, stats: dict[str, Any]):
    """Negative log posterior of the globals ``theta = (w (10), mu, log sigma, log noise)`` of
    the ``varying`` model with the intercepts integrated out (up to a constant): a group's rows
    are ``N(mu + X w, noise^2 I + sigma^2 1 1^T)``, whose inverse and determinant are closed
    form in the group's residual sum; priors as the model's, with the log transforms' Jacobians.
    Written with `jax.numpy` (autodiff for the MAP and the Hessian)."""
    import jax.numpy as jnp

    w, mu, log_s, log_n = theta[:NUM_FEATURES], theta[NUM_FEATURES], theta[-2], theta[-1]
    s2, n2 = jnp.exp(2 * log_s), jnp.exp(2 * log_n)
    r = stats["sy"] - stats["sx"] @ w - stats["n"] * mu  # each group's residual sum
    rr = (stats["yy"] - 2 * w @ stats["xy"] - 2 * mu * stats["y"] + w @ stats["xx"] @ w
          + 2 * mu * stats["x"] @ w + stats["rows"] * mu**2)  # fmt: skip
    quad = (rr - s2 * jnp.sum(r**2 / (n2 + stats["n"] * s2))) / n2
    log_det = stats["rows"] * jnp.log(n2) + jnp.sum(jnp.log1p(stats["n"] * s2 / n2))
    prior = 0.5 * w @ w + mu**2 / 50.0 + (s2 + n2) / 8.0 - log_s - log_n  # HalfNormal(2)s
    return 0.5 * (quad + log_det) + prior


def varying_reference(data: dict[str, np.ndarray], groups: int) -> dict[str, tuple]:
    """Laplace approximation of the ``varying`` posterior of the globals with the intercepts
    integrated out exactly (`varying_energy`; float64): the MAP by L-BFGS, the covariance the
    inverse Hessian (JAX autodiff) in ``(w, mu, log sigma, log noise)``; sigma and noise get
    the log-normal mean and sd. (A Laplace approximation of the joint with the intercepts
    would be biased for sigma: the joint mode shrinks the intercepts.)"""
    import jax
    from scipy.optimize import minimize

    with float64():
        stats = {k: jax.numpy.asarray(v) for k, v in varying_statistics(data, groups).items()}
        energy = jax.jit(jax.value_and_grad(lambda t: varying_energy(t, stats)))

        def fun(t: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = energy(jax.numpy.asarray(t))
            return float(value), np.asarray(grad, dtype=np.float64)

        res = minimize(fun, np.zeros(NUM_FEATURES + 3), jac=True, method="L-BFGS-B",
                       options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 10_000})  # fmt: skip
        hessian = jax.hessian(lambda t: varying_energy(t, stats))(jax.numpy.asarray(res.x))
        cov = np.linalg.inv(np.asarray(hessian, dtype=np.float64))
    mean, sd = res.x, np.sqrt(np.diag(cov))
    out = {
        "w": (mean[:NUM_FEATURES], sd[:NUM_FEATURES]),
        "mu": (mean[NUM_FEATURES], sd[NUM_FEATURES]),
    }
    for name, i in (("sigma", -2), ("noise", -1)):
        m = np.exp(mean[i] + cov[i, i] / 2)
        out[name] = (m, m * np.sqrt(np.expm1(cov[i, i])))
    return out


def run_nuts(problem: str, data: dict, groups: int, warmup: int, samples: int, seed: int):
    """NumPyro NUTS on the full data; returns draws and wall time."""
    import jax
    from numpyro.infer import MCMC, NUTS

    model = numpyro_model(problem, groups, None)
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, progress_bar=False)
    mcmc.run(jax.random.key(seed), **{k: jax.numpy.asarray(v) for k, v in data.items()})
    draws = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    return draws, time.perf_counter() - t0


def run_fit(
    backend: str,
    problem: str,
    data: dict,
    groups: int,
    batch: int,
    steps: int,
    seed: int,
    control_variate: str = "auto",
):
    """flowguides ``fit_posterior`` with the plate subsampled to ``batch`` rows."""
    from flowguides.spec import FlowSpec

    spec = FlowSpec.realnvp(num_layers=2, hidden=[32])
    t0 = time.perf_counter()
    if backend == "numpyro":
        import jax.numpy as jnp

        from flowguides.numpyro import fit_posterior

        args = {k: jnp.asarray(v) for k, v in data.items()}
        model = numpyro_model(problem, groups, batch)
    else:
        import torch

        from flowguides.pyro import fit_posterior

        args = {k: torch.as_tensor(v) for k, v in data.items()}
        model = pyro_model(problem, groups, batch)
    options = {"num_steps": steps, "seed": seed, "control_variate": control_variate}
    fit = fit_posterior(model, spec, progress=False, **options, **args)
    draws = fit.sample(4000, seed=seed)
    return {k: np.asarray(v) for k, v in draws.items()}, time.perf_counter() - t0, fit.timing


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: one row per (size, method), appended to ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large", description=__doc__)
    parser.add_argument("--problem", choices=("logistic", "varying"), default="logistic")
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument(
        "--reference", choices=("laplace", "nuts"), default="laplace",
        help="varying: the Laplace approximation of the globals with the intercepts integrated "
        "out (varying_reference), or a long NUTS run on the full data",
    )  # fmt: skip
    parser.add_argument("--reference-samples", type=int, default=4000)
    parser.add_argument("--backends", nargs="+", default=["numpyro", "pyro"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--control-variates", nargs="+", default=["taylor", "none"],
        help="fit_posterior's control_variate settings, one row each",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/large.jsonl")
    args = parser.parse_args(argv)
    if "pyro" in args.backends:
        import torch

        torch.set_num_threads(1)
    names = GLOBALS[args.problem]
    groups = args.groups if args.problem == "varying" else 0
    import jax

    device = f"{jax.default_backend()}: {jax.devices()[0].device_kind}"
    stamp = {"commit": git_commit(), "versions": library_versions(), "run": utc_now(),
             "device": device}  # fmt: skip
    for rows in args.rows:
        data = make_data(args.problem, rows, groups, args.seed)
        settings = {"suite": "large", "problem": args.problem, "rows": rows, "groups": groups,
                    "batch": args.batch, "seed": args.seed, "dtype": "float32"}  # fmt: skip
        if args.problem == "logistic":
            ref, how = laplace_reference(data), "Laplace on the full data (float64)"
        elif args.reference == "laplace":
            ref = varying_reference(data, groups)
            how = "Laplace of the globals with the intercepts integrated out (float64)"
        else:
            draws, _ = run_nuts(args.problem, data, groups, 1000, args.reference_samples, 1)
            ref = _moments(draws, names)
            how = f"NUTS on the full data, 1,000 + {args.reference_samples:,} (seed 1)"
        out: list[dict] = []
        draws, wall = run_nuts(args.problem, data, groups, args.warmup, args.samples, args.seed)
        out.append({"method": "numpyro NUTS (full data)", "wall_s": wall,
                    "warmup": args.warmup, "samples": args.samples,
                    **_score(_moments(draws, names), ref)})  # fmt: skip
        for backend in args.backends:
            for cv in args.control_variates:
                method = f"flowguides-{backend} RealNVP (subsampled, control_variate={cv})"
                try:
                    draws, wall, timing = run_fit(
                        backend, args.problem, data, groups, args.batch, args.steps, args.seed, cv
                    )
                    out.append({"method": method, "wall_s": wall, "num_steps": args.steps,
                                "control_variate": cv, **timing,
                                **_score(_moments(draws, names), ref)})  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - a method's failure is a result
                    out.append({"method": method, "control_variate": cv,
                                "error": f"{type(exc).__name__}: {exc}"[:300]})  # fmt: skip
        with args.out.open("a") as f:
            for row in out:
                row = {**settings, **row, "reference": how, **stamp, "timestamp": utc_now()}
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
