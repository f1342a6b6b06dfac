"""A two-moons density with each flow family (planar, RealNVP, neural ODE), in either backend."""

import argparse
from pathlib import Path

import _common  # noqa: F401  (thread pinning)

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true")
parser.add_argument("--backend", choices=["pyro", "numpyro"], default="numpyro")
parser.add_argument("--out", default="example-output")
args = parser.parse_args()

import numpy as np  # noqa: E402

from flowguides import FlowSpec  # noqa: E402
from flowguides.demo import two_moons  # noqa: E402
from flowguides.io import backend_module  # noqa: E402

fit_density = backend_module(args.backend).fit_density
train, test = two_moons(400 if args.quick else 4000, seed=0), two_moons(1000, seed=1)
steps = 20 if args.quick else 3000
specs = {
    "planar": FlowSpec.planar(num_layers=32, dtype="float64"),
    "realnvp": FlowSpec.realnvp(num_layers=6, hidden=[64, 64], dtype="float64"),
    "neural_ode": FlowSpec.neural_ode(
        hidden=[32, 32], solver="rk4", num_steps=10 if args.quick else 20, dtype="float64"
    ),
}
Path(args.out).mkdir(exist_ok=True)
for name, spec in specs.items():
    fit = fit_density(train, spec, num_steps=steps, seed=0, progress=False)
    nll = -np.mean(fit.log_prob(test))
    print(f"{name:<11} test NLL {nll:.3f} nats/point")
