"""`FitBelowStartWarning` in both backends: a fit that ends worse than its own start says so.

The model is a 20-D Gaussian posterior, which the default Laplace start already fits exactly, so
any training only adds noise: at a sane learning rate the fit stays at its start (no warning), at
a learning rate far too high for Adam it ends clearly below it (a warning naming the rate).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.core import FitBelowStartWarning

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[16], dtype="float64")
Y = np.random.default_rng(0).normal(size=20)


def _fit(backend: str, learning_rate: float):
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import fit_posterior

        def model(y):
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0).expand([20]).to_event(1))
            pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        y = torch.as_tensor(Y)
    else:
        import numpyro
        import numpyro.distributions as dist

        from flowguides.numpyro import fit_posterior

        def model(y):
            mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([20]).to_event(1))
            numpyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)

        y = Y
    return fit_posterior(model, SPEC, y, num_steps=300, learning_rate=learning_rate, progress=False)


@pytest.mark.parametrize(
    "backend", [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro")]
)
def test_a_fit_that_ends_below_its_start_warns(backend: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitBelowStartWarning)
        _fit(backend, 1e-2)  # at the start already: no warning
    with pytest.warns(FitBelowStartWarning, match=r"lower learning_rate \(was 1\)"):
        fit = _fit(backend, 1.0)
    assert np.mean(fit.losses[-30:]) > fit.losses[0]
