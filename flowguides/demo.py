"""`flowguides demo`: the library's two jobs, in both backends, in about a minute.

1. Posterior fitting: the centred eight-schools model (a funnel between `tau` and `theta`),
   fitted with a RealNVP flow guide in Pyro and in NumPyro and with NumPyro's diagonal-normal
   `AutoNormal`, against posteriordb's reference draws.
2. Density fitting: a RealNVP density on two moons, with its contour plot.

The NumPyro parts run with JAX's persistent compilation cache on (see
`flowguides.numpyro.use_compilation_cache`): a second demo loads what the first compiled.
"""

from __future__ import annotations

import importlib.util
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from flowguides.spec import FlowSpec

__all__ = ["run_demo", "EIGHT_SCHOOLS", "reference_moments", "two_moons"]

EIGHT_SCHOOLS = {
    "y": [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
    "sigma": [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0],
}
# Mean and sd of 10,000 posteriordb reference draws (eight_schools_noncentered, same posterior).
_EMBEDDED_REFERENCE = {"mu": (4.4105, 3.3091), "tau": (3.6021, 3.1983)}
_REFERENCE_FOLDER = "eight_schools-eight_schools_noncentered"


def reference_moments() -> tuple[dict[str, tuple[float, float]], str]:
    """Reference mean/sd of `mu` and `tau`: from posteriordb's draws if found, else embedded."""
    here = Path(__file__).resolve().parents[1]
    for root in (
        here / "benchmarks" / "data" / "posteriordb",
        here.parent / "shared" / "posteriordb",
    ):
        path = root / _REFERENCE_FOLDER / "reference_draws.json.zip"
        if path.is_file():
            with zipfile.ZipFile(path) as z:
                chains = json.loads(z.read(z.namelist()[0]))
            out = {}
            for name in ("mu", "tau"):
                draws = np.concatenate([np.asarray(c[name]) for c in chains])
                out[name] = (float(draws.mean()), float(draws.std()))
            return out, str(path)
    return dict(_EMBEDDED_REFERENCE), "embedded values"


def two_moons(n: int, seed: int = 0, noise: float = 0.08) -> np.ndarray:
    """Two interleaved half circles in 2-D, with Gaussian noise."""
    rng = np.random.default_rng(seed)
    t = np.pi * rng.uniform(size=n)
    upper = rng.uniform(size=n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.stack([x, y], axis=1) + noise * rng.standard_normal((n, 2))


def _pyro_model():
    import pyro
    import pyro.distributions as dist
    import torch

    y = torch.tensor(EIGHT_SCHOOLS["y"], dtype=torch.float64)
    sigma = torch.tensor(EIGHT_SCHOOLS["sigma"], dtype=torch.float64)

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=torch.float64)))
        with pyro.plate("schools", 8):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    return model


def _numpyro_model():
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    y, sigma = jnp.asarray(EIGHT_SCHOOLS["y"]), jnp.asarray(EIGHT_SCHOOLS["sigma"])

    def model() -> None:
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        with numpyro.plate("schools", 8):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
            numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    return model


def _diagonal_normal_numpyro(num_steps: int):
    """NumPyro's own AutoNormal, with the same optimiser budget, as the plain baseline."""
    import jax
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    model = _numpyro_model()
    guide = AutoNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO(num_particles=8))
    result = svi.run(jax.random.PRNGKey(0), num_steps, progress_bar=False)
    draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(4000,))
    loss = Trace_ELBO(num_particles=4000).loss(jax.random.PRNGKey(2), result.params, model, guide)
    elbo = -float(loss)
    return {k: np.asarray(v) for k, v in draws.items()}, elbo


def run_demo(out: str = "demo-output", quick: bool = False, cache: bool = True) -> int:
    """Run the demo, print its tables and write its plots to `out`; returns the exit status.

    Args:
        out: the folder for the plots.
        quick: a few steps only (for tests).
        cache: turn on JAX's persistent compilation cache in its default directory.
    """
    from flowguides.diagnostics import diagnose

    if importlib.util.find_spec("jax") is not None:
        import numpyro

        numpyro.enable_x64()  # the demo runs in float64 in both backends
        if cache:
            from flowguides.numpyro import use_compilation_cache

            use_compilation_cache()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = 60 if quick else 1500
    spec = FlowSpec.realnvp(num_layers=4, hidden=[32, 32], dtype="float64")
    reference, source = reference_moments()

    print("flowguides demo: eight schools, centred (a funnel), 10 latent dimensions")
    print(f"flow: {spec.to_json(indent=None)}; {steps} steps, 8 particles\n")
    rows = []
    for backend in ("pyro", "numpyro"):
        if importlib.util.find_spec("torch" if backend == "pyro" else "jax") is None:
            print(f"({backend} backend not installed: skipped)")
            continue
        module = __import__(f"flowguides.{backend}", fromlist=["fit_posterior"])
        model = _pyro_model() if backend == "pyro" else _numpyro_model()
        start = time.perf_counter()
        fit = module.fit_posterior(model, spec, num_steps=steps, seed=0, progress=False)
        seconds = time.perf_counter() - start
        draws = fit.sample(4000, seed=1)
        diag = diagnose(fit, num_samples=4000, seed=2)
        rows.append((f"flowguides RealNVP ({backend})", diag.elbo, diag.khat, draws, seconds))
    if importlib.util.find_spec("jax") is not None:
        start = time.perf_counter()
        draws, elbo = _diagonal_normal_numpyro(steps)
        rows.append(
            (
                "NumPyro AutoNormal (diagonal)",
                elbo,
                float("nan"),
                draws,
                time.perf_counter() - start,
            )
        )

    header = f"{'method':<32} {'ELBO':>8} {'k-hat':>6} {'mu mean':>8} {'mu sd':>6} {'tau mean':>8} {'tau sd':>6} {'time':>6}"
    print(header)
    print("-" * len(header))
    for name, elbo, khat, draws, seconds in rows:
        mu, tau = np.ravel(draws["mu"]), np.ravel(draws["tau"])
        print(
            f"{name:<32} {elbo:8.2f} {khat:6.2f} {mu.mean():8.2f} {mu.std():6.2f} "
            f"{tau.mean():8.2f} {tau.std():6.2f} {seconds:5.1f}s"
        )
    (mu_m, mu_s), (tau_m, tau_s) = reference["mu"], reference["tau"]
    print(
        f"{'reference (NUTS, posteriordb)':<32} {'':>8} {'':>6} {mu_m:8.2f} {mu_s:6.2f} {tau_m:8.2f} {tau_s:6.2f}"
    )
    print(
        "\nELBO: higher is better (a lower bound on log p(y)); k-hat: PSIS diagnostic, < 0.7 means "
        "the draws can be trusted after importance weighting;\nmean/sd: posterior moments, to "
        f"compare with the reference ({source}).\n"
    )
    _density_part(out_dir, quick)
    return 0


def _density_part(out_dir: Path, quick: bool) -> None:
    from flowguides.plots import plot_density_2d, plot_losses

    backend = "numpyro" if importlib.util.find_spec("jax") is not None else "pyro"
    module = __import__(f"flowguides.{backend}", fromlist=["fit_density"])
    data = two_moons(2000 if not quick else 400, seed=0)
    test = two_moons(1000, seed=1)
    spec = FlowSpec.realnvp(num_layers=6, hidden=[64, 64], dtype="float64")
    start = time.perf_counter()
    fit = module.fit_density(data, spec, num_steps=40 if quick else 2000, seed=0, progress=False)
    seconds = time.perf_counter() - start
    mean, cov = data.mean(0), np.cov(data.T)
    diff = test - mean
    gauss = -0.5 * np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff) - 0.5 * np.log(
        np.linalg.det(2 * np.pi * cov)
    )
    print(f"two moons density ({backend}, RealNVP 6 layers, {seconds:.1f}s):")
    print(
        f"  test log-likelihood per point: flow {fit.log_prob(test).mean():.3f}, Gaussian {gauss.mean():.3f} (higher is better)"
    )

    plot_density_2d(fit, data, path=out_dir / "two_moons_density.png")
    plot_losses(fit.losses, path=out_dir / "two_moons_loss.png")
    print(f"  plots written to {out_dir}/")
