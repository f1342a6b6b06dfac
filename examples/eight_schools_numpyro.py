"""Eight schools (centred, a funnel) with a RealNVP flow guide in NumPyro, checked by PSIS k-hat."""

from _common import parse_args

args = parse_args(__doc__)

import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

import flowguides  # noqa: E402
from flowguides import FlowSpec  # noqa: E402
from flowguides.numpyro import fit_posterior  # noqa: E402

numpyro.enable_x64()

y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
sigma = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def model(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", len(y)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


spec = FlowSpec.realnvp(num_layers=4, hidden=[32, 32], dtype="float64")
fit = fit_posterior(model, spec, y, sigma, num_steps=50 if args.quick else 3000, progress=False)
draws = fit.sample(4000)
print(f"mu: {draws['mu'].mean():.2f} +- {draws['mu'].std():.2f} (reference 4.41 +- 3.31)")
print(f"tau: {draws['tau'].mean():.2f} +- {draws['tau'].std():.2f} (reference 3.60 +- 3.20)")
print(flowguides.diagnose(fit, num_samples=2000))
