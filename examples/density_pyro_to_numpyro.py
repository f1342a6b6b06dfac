"""Train a density in Pyro, save it, load it in NumPyro: the same log-densities, to 1e-8."""

from pathlib import Path

from _common import parse_args

args = parse_args(__doc__)

import numpy as np  # noqa: E402

import flowguides  # noqa: E402
from flowguides import FlowSpec  # noqa: E402
from flowguides.demo import two_moons  # noqa: E402
from flowguides.pyro import fit_density  # noqa: E402

data = two_moons(400 if args.quick else 4000, seed=0)
spec = FlowSpec.realnvp(num_layers=4, hidden=[32, 32], dtype="float64")
fit = fit_density(data, spec, num_steps=20 if args.quick else 2000, progress=False)
folder = flowguides.save(fit, Path(args.out) / "moons-fit", overwrite=True)
in_jax = flowguides.load(folder, backend="numpyro")
points = two_moons(500, seed=2)
gap = np.abs(fit.log_prob(points) - in_jax.log_prob(points)).max()
print(f"saved to {folder}; max |log p (Pyro) - log p (NumPyro)| = {gap:.2e}")
assert gap < 1e-8, gap
