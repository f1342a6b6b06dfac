"""`fit_density(..., devices=...)` and `fit_posterior(..., devices=...)`: minibatches or ELBO
particles split over several devices, parameters replicated, the same fit as on one device.

JAX fixes its device count when it starts, so the four-device runs happen in one subprocess
with ``--xla_force_host_platform_device_count=4`` (one thread per device, as the suite pins).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.numpyro import fit_density

SCRIPT = """
import json
import jax, numpy as np
from flowguides import FlowSpec
from flowguides.numpyro import fit_density

assert len(jax.devices()) == 4
rng = np.random.default_rng(0)
x = rng.normal(size=400)
data = np.c_[x, 0.5 * x**2 + 0.3 * rng.normal(size=400)]
spec = FlowSpec.realnvp(2, hidden=[8], dtype="float64")
settings = {"num_steps": 30, "batch_size": 32, "learning_rate": 1e-2, "progress": False}

def batches():
    r = np.random.default_rng(1)
    for _ in range(30):
        yield data[r.integers(0, 400, 32)]

out = {}
for kind in ("array", "iterator"):
    runs = []
    for devices in (None, 4):
        source = data if kind == "array" else batches()
        extra = {} if kind == "array" else {"validation_data": data[:40]}
        fit = fit_density(source, spec, devices=devices, **settings, **extra)
        leaf = next(iter(fit.flow.params.values()))
        runs.append({
            "train": fit.losses["train"].tolist(),
            "val": fit.losses["val"].tolist(),
            "log_prob": fit.log_prob(data[:20]).tolist(),
            "devices": len(leaf.sharding.device_set),
        })
    out[kind] = runs
try:
    fit_density(data, spec, devices=3, **settings)
except ValueError as exc:
    out["indivisible"] = str(exc)

import numpyro, numpyro.distributions as dist
from flowguides.numpyro import fit_posterior, posterior
from flowguides.numpyro._stream import particle_split

splits = []  # (devices of the mesh, particles) of each split that training traced

def recording_split(mesh):
    split = particle_split(mesh)
    def traced(key, n):
        keys = split(key, n)
        splits.append((0 if mesh is None else mesh.size, n))
        return keys
    return traced

posterior.particle_split = recording_split
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
keys = jax.jit(lambda k: particle_split(mesh)(k, 8))(jax.random.key(0))
out["key_shards"] = [list(s.data.shape) for s in keys.addressable_shards]

def regression(x, y):  # as users write it: a plate over the rows
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    with numpyro.plate("rows", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, s), obs=y)

xs = rng.normal(size=(60, 2))
ys = xs @ np.array([1.0, -0.5]) + 0.3 * rng.normal(size=60)
for name, options in {"elbo": {}, "iwelbo": {"objective": "iwelbo", "num_inner": 2,
                                             "num_particles": 2, "gradient": "stl"}}.items():
    runs = []
    for devices in (None, 4):
        fit = fit_posterior(regression, spec, xs, ys, num_steps=60, init_scale=1.0,
                            progress=False, devices=devices, **options)
        leaf = next(iter(fit.params.values()))
        runs.append({"train": fit.losses.tolist(), "devices": len(leaf.sharding.device_set),
                     "w": fit.sample(100, seed=1)["w"].mean(0).tolist()})
    out["posterior_" + name] = runs
out["splits"] = sorted(set(splits))

def logistic(x, y):  # subsampled: the control variate's terms are replicated with the state
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("rows", x.shape[0], subsample_size=50) as idx:
        numpyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])

xl = rng.normal(size=(1000, 2))
yl = (rng.uniform(size=1000) < 1 / (1 + np.exp(-xl @ np.array([1.0, -1.0])))).astype(float)
runs = []
for devices in (None, 4):
    fit = fit_posterior(logistic, spec, xl, yl, num_steps=40, control_variate="taylor",
                        progress=False, devices=devices)
    runs.append({"train": fit.losses.tolist()})
out["posterior_subsampled"] = runs

ode = FlowSpec.neural_ode(hidden=[4], solver="rk4", num_steps=2, dtype="float64")
runs = []
for devices in (None, 4):  # the neural-ODE guide's loss records its solves per particle
    fit = fit_posterior(regression, ode, xs, ys, num_steps=20, num_particles=4, init_scale=1.0,
                        progress=False, devices=devices)
    runs.append({"train": fit.losses.tolist(), "nfe": fit.history["nfe_forward"].tolist()})
out["posterior_ode"] = runs
try:
    fit_posterior(regression, spec, xs, ys, num_particles=6, devices=4, progress=False)
except ValueError as exc:
    out["posterior_indivisible"] = str(exc)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs() -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        "JAX_ENABLE_X64": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["array", "iterator"])
def test_four_devices_give_the_one_device_loss_trajectory(runs, kind):
    one, four = runs[kind]
    assert (one["devices"], four["devices"]) == (1, 4)  # the parameters sit on all four
    assert len(four["train"]) == 30 and len(four["val"]) == 3
    # the same float64 trajectory up to rounding: four shards sum in another order, and
    # 30 Adam steps carry the difference along (measured up to 2e-10 relative)
    for key in ("train", "val", "log_prob"):
        np.testing.assert_allclose(four[key], one[key], rtol=1e-9, atol=1e-12)
    assert np.ptp(four["train"]) > 0.1  # it trained


def test_devices_is_checked(runs):
    assert runs["indivisible"] == (
        "batch_size: expected a row count divisible by the 3 devices, got 32"
    )
    data = np.random.default_rng(0).normal(size=(50, 2))
    spec = FlowSpec.realnvp(2, hidden=[4], dtype="float64")
    with pytest.raises(ValueError, match=r"devices: expected a count in \[1, \d+\]"):
        fit_density(data, spec, devices=0, progress=False)
    with pytest.raises(ValueError, match="devices: expected None, a count or a sequence"):
        fit_density(data, spec, devices=["cpu"], progress=False)


@pytest.mark.parametrize("objective", ["elbo", "iwelbo"])
def test_four_devices_split_the_particles_and_give_the_one_device_fit(runs, objective):
    one, four = runs["posterior_" + objective]
    assert (one["devices"], four["devices"]) == (1, 4)
    assert len(four["train"]) == 60
    np.testing.assert_allclose(four["train"], one["train"], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(four["w"], one["w"], rtol=1e-9, atol=1e-10)
    assert np.mean(four["train"][-10:]) < np.mean(four["train"][:10]) - 1.0  # it trained
    # the particles' keys are split over the four devices, two on each, during training
    assert runs["key_shards"] == [[2], [2], [2], [2]]
    assert [4, 4] in runs["splits"] and [4, 8] in runs["splits"]  # iwelbo 2 x 2, elbo 8
    assert runs["posterior_indivisible"] == (
        "num_particles * num_inner: expected a count divisible by the 4 devices, got 6"
    )


def test_a_subsampled_fit_with_the_control_variate_runs_alike_on_four_devices(runs):
    one, four = runs["posterior_subsampled"]
    assert len(four["train"]) == 40
    np.testing.assert_allclose(four["train"], one["train"], rtol=1e-9, atol=1e-10)


def test_a_neural_ode_guide_records_its_solves_alike_on_four_devices(runs):
    one, four = runs["posterior_ode"]
    np.testing.assert_allclose(four["train"], one["train"], rtol=1e-9, atol=1e-10)
    assert four["nfe"] == one["nfe"] == [8] * 20  # rk4: 4 stages x 2 steps, every step
