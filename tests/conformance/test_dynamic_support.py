"""A latent site whose support depends on another latent site (``x ~ Uniform(0, a)`` with `a`
latent), the way users write bounded priors. Pyro's and NumPyro's autoguides constrain every
site by the support of their prototype trace (NumPyro's SVI loss is infinite, Pyro's support
check fails); flowguides replays the model so each draw gets its own support. Checked against
the closed-form posterior means, in both backends, through training, draws and the
diagnostics' densities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, special, stats

from flowguides import FlowSpec
from flowguides.diagnostics import diagnose_weights

__all__: list[str] = []

Y, NOISE = 0.3, 0.1
SPEC = FlowSpec.realnvp(num_layers=2, hidden=[16], dtype="float64")


def exact_means() -> tuple[float, float]:
    """``E[a | y]`` and ``E[x | y]`` for ``a ~ Exp(1)``, ``x | a ~ U(0, a)``, ``y ~ N(x, s)``:
    integrating `a` out, ``p(x | y) ∝ E1(x) N(y; x, s)`` on ``x > 0`` and
    ``E[a | x] = exp(-x) / E1(x)``."""
    lik = stats.norm(Y, NOISE).pdf
    hi = Y + 12 * NOISE
    z = integrate.quad(lambda x: special.exp1(x) * lik(x), 0, hi, points=[Y])[0]
    mean_x = integrate.quad(lambda x: x * special.exp1(x) * lik(x), 0, hi, points=[Y])[0] / z
    mean_a = integrate.quad(lambda x: np.exp(-x) * lik(x), 0, hi, points=[Y])[0] / z
    return mean_a, mean_x


def exact_log_z() -> float:
    """``log p(y, w)``: the `a`, `x` part as in `exact_means`, times
    ``∫ U(b; 0, 10) N(5; b, 1) db``."""
    lik = stats.norm(Y, NOISE).pdf
    z = integrate.quad(lambda x: special.exp1(x) * lik(x), 0, Y + 12 * NOISE, points=[Y])[0]
    z_b = integrate.quad(lambda b: 0.1 * stats.norm(5.0, 1.0).pdf(b), 0.0, 10.0)[0]
    return float(np.log(z * z_b))


def _setup(backend: str):
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import fit_posterior

        pyro.clear_param_store()
        y = torch.tensor(Y, dtype=torch.float64)

        def model(y):
            a = pyro.sample("a", dist.Exponential(torch.tensor(1.0, dtype=torch.float64)))
            b = pyro.sample("b", dist.Uniform(0.0, 10.0))  # a fixed bound: not replayed
            x = pyro.sample("x", dist.Uniform(0.0, a))
            pyro.sample("y", dist.Normal(x, NOISE), obs=y)
            pyro.sample("w", dist.Normal(b, 1.0), obs=torch.tensor(5.0, dtype=torch.float64))

    else:
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        from flowguides.numpyro import fit_posterior

        y = jnp.asarray(Y)

        def model(y):
            a = numpyro.sample("a", dist.Exponential(1.0))
            b = numpyro.sample("b", dist.Uniform(0.0, 10.0))
            x = numpyro.sample("x", dist.Uniform(0.0, a))
            numpyro.sample("y", dist.Normal(x, NOISE), obs=y)
            numpyro.sample("w", dist.Normal(b, 1.0), obs=5.0)

    return model, y, fit_posterior


@pytest.mark.parametrize(
    "backend",
    [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro", marks=pytest.mark.jax)],
)
def test_a_support_that_moves_with_another_site(backend: str) -> None:
    model, y, fit_posterior = _setup(backend)
    fit = fit_posterior(model, SPEC, y, num_steps=600, seed=0, progress=False)
    assert fit.guide._dynamic == ("x",)  # found; the fixed Uniform(0, 10) is not
    draws = fit.sample(20_000, seed=1)
    a, x = np.asarray(draws["a"]), np.asarray(draws["x"])
    assert np.all((x > 0) & (x < a)), "a draw outside its own support"
    mean_a, mean_x = exact_means()
    assert abs(a.mean() - mean_a) < 0.06, (a.mean(), mean_a)
    assert abs(x.mean() - mean_x) < 0.02, (x.mean(), mean_x)
    # the diagnostics' densities use each draw's own support: the ELBO estimate is finite,
    # below log Z and close to it (KL >= 0, small for a fit this good)
    found, log_p, log_q = fit.log_densities(4000, seed=2)
    assert np.all(np.asarray(found["x"]) < np.asarray(found["a"]))
    diagnosis = diagnose_weights(log_p, log_q)
    kl = exact_log_z() - diagnosis.elbo
    assert -3 * diagnosis.elbo_se < kl < 0.15, (diagnosis.elbo, exact_log_z())
