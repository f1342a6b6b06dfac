"""A neural-ODE flow guide on Haario's banana (a curved 2-D target), in NumPyro.

x1 ~ N(0, 10), x2 | x1 ~ N(0.03 (x1^2 - 100), 1): E[x2] = 0 and sd(x1) = 10 exactly.
"""

from _common import parse_args

args = parse_args(__doc__)

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

from flowguides import FlowSpec  # noqa: E402
from flowguides.numpyro import fit_posterior  # noqa: E402

numpyro.enable_x64()


def banana():
    x1 = numpyro.sample("x1", dist.Normal(0.0, 10.0))
    numpyro.sample("x2", dist.Normal(0.03 * (x1**2 - 100.0), 1.0))


spec = FlowSpec.neural_ode(hidden=[32, 32], solver="rk4", num_steps=8, dtype="float64")
fit = fit_posterior(banana, spec, num_steps=20 if args.quick else 2000, progress=False)
draws = fit.sample(4000)
print(f"sd(x1) = {draws['x1'].std():.2f} (exact 10), E[x2] = {draws['x2'].mean():.2f} (exact 0)")
