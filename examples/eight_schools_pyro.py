"""Eight schools (centred, a funnel) with a RealNVP flow guide in Pyro, checked by PSIS k-hat."""

from _common import parse_args

args = parse_args(__doc__)

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

import flowguides  # noqa: E402
from flowguides import FlowSpec  # noqa: E402
from flowguides.pyro import fit_posterior  # noqa: E402

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def model(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


spec = FlowSpec.realnvp(num_layers=4, hidden=[32, 32], dtype="float64")
fit = fit_posterior(model, spec, y, sigma, num_steps=50 if args.quick else 3000, progress=False)
draws = fit.sample(4000)
print(f"mu: {draws['mu'].mean():.2f} +- {draws['mu'].std():.2f} (reference 4.41 +- 3.31)")
print(f"tau: {draws['tau'].mean():.2f} +- {draws['tau'].std():.2f} (reference 3.60 +- 3.20)")
print(flowguides.diagnose(fit, num_samples=2000))
