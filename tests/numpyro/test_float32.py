"""The default float32 path: the suite runs JAX in float64 (conftest sets JAX_ENABLE_X64=1), so
a set of NumPyro fits runs here in one subprocess with 64-bit mode off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, warnings
import jax, numpy as np, numpyro, numpyro.distributions as dist
from flowguides import FlowSpec
from flowguides.diagnostics import diagnose
from flowguides.numpyro import fit_density, fit_posterior

assert not jax.config.jax_enable_x64

def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

y = np.random.default_rng(0).normal(1.0, 0.5, 20)  # float64 numpy data, as users pass it
specs = {
    "planar": FlowSpec.planar(2),
    "realnvp": FlowSpec.realnvp(2, hidden=[8]),
    "neural_ode": FlowSpec.neural_ode(hidden=[8], solver="euler", num_steps=2),
}
out = {}
for name, spec in specs.items():
    start = "auto" if name == "realnvp" else 0.5  # "auto": the Laplace search in float32
    fit = fit_posterior(
        model, spec, y, num_steps=100, learning_rate=0.05, init_scale=start, progress=False
    )
    draws, log_p, log_q = fit.log_densities(100, seed=1)
    if name == "realnvp":
        draws = fit.sample(100, seed=0)
    diagnosis = diagnose(fit, num_samples=100, seed=2)
    out[name] = {
        "dtypes": sorted({str(v.dtype) for v in [*fit.params.values(), *draws.values(), log_q]}),
        "finite": bool(
            np.all(np.isfinite(fit.losses))
            and all(np.all(np.isfinite(v)) for v in draws.values())
            and np.all(np.isfinite(log_p - log_q))
            and np.isfinite(diagnosis.elbo)
        ),
        "mu": float(draws["mu"].mean()),
        "improved": bool(fit.losses[-10:].mean() < fit.losses[:10].mean()),
    }
data = np.random.default_rng(1).normal(size=(300, 2)) * [1.0, 2.0]
density = fit_density(data, FlowSpec.realnvp(2, hidden=[8]), num_steps=50, progress=False)
log_prob, sample = density.log_prob(data[:10]), density.sample(10, seed=0)
out["density"] = {
    "dtypes": sorted({str(v.dtype) for v in density.flow.params.values()}),
    "finite": bool(np.all(np.isfinite(log_prob)) and np.all(np.isfinite(sample))),
}
print(json.dumps(out))
"""


def test_numpyro_fits_run_in_float32_with_x64_off():
    env = {**os.environ, "JAX_ENABLE_X64": "0"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("planar", "realnvp", "neural_ode"):
        assert out[name]["dtypes"] == ["float32"], (name, out[name])
        assert out[name]["finite"], (name, out[name])
        assert out[name]["improved"], (name, out[name])
        assert 0.6 < out[name]["mu"] < 1.4, (name, out[name])  # the data's mean is about 1
    assert out["density"] == {"dtypes": ["float32"], "finite": True}
