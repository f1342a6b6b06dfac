"""`fit_density` in a `torch.distributed` group: two CPU processes on gloo, launched with
torchrun, each training on half of every global minibatch through DistributedDataParallel,
log the same losses and return the same flow as one process on the whole minibatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.pyro import fit_density

SPEC = FlowSpec.realnvp(2, hidden=[8], dtype="float64")
SETTINGS = {"num_steps": 30, "batch_size": 32, "learning_rate": 1e-2, "progress": False}

SCRIPT = """
import json, os, sys
import numpy as np, torch, torch.distributed as dist
from flowguides import FlowSpec
from flowguides.pyro import fit_density

torch.set_num_threads(1)
dist.init_process_group("gloo")
spec = FlowSpec.realnvp(2, hidden=[8], dtype="float64")
settings = {"num_steps": 30, "batch_size": 32, "learning_rate": 1e-2, "progress": False}
data = np.load(sys.argv[1])
out = {}
for kind, source in (("array", data), ("mapped", np.load(sys.argv[1], mmap_mode="r"))):
    fit = fit_density(source, spec, **settings)
    out[kind] = {k: v.tolist() for k, v in fit.losses.items()}
    out[kind]["log_prob"] = fit.log_prob(data[:20]).tolist()
try:
    fit_density(data, spec, **{**settings, "batch_size": 31})
except ValueError as exc:
    out["odd_batch"] = str(exc)
rank = dist.get_rank()
with open(os.path.join(os.path.dirname(sys.argv[1]), f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def banana(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return np.c_[x, 0.5 * x**2 + 0.3 * rng.normal(size=n)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp")
    np.save(folder / "data.npy", banana(400, 0))
    (folder / "script.py").write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(folder / "script.py"), str(folder / "data.npy")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error::FutureWarning"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("kind", ["array", "mapped"])
def test_two_processes_fit_as_one_on_the_same_global_minibatch(ranks, kind):
    one = fit_density(banana(400, 0), SPEC, **SETTINGS)
    first, second = ranks[0][kind], ranks[1][kind]
    assert len(first["train"]) == 30 and len(first["val"]) == 3
    for key in ("train", "val", "log_prob"):
        np.testing.assert_array_equal(first[key], second[key])  # the processes agree
        expected = one.losses[key] if key != "log_prob" else one.log_prob(banana(400, 0)[:20])
        np.testing.assert_allclose(first[key], expected, rtol=1e-10, atol=1e-12)
    assert np.ptp(first["train"]) > 0.1  # it trained


def test_the_global_minibatch_must_divide_over_the_processes(ranks):
    expected = "batch_size: expected a row count divisible by the 2 processes, got 31"
    assert ranks[0]["odd_batch"] == expected
