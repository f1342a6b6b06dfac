"""Subsampled Pyro models: the start search runs on the full data, not on one minibatch."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from flowguides.pyro import fit_posterior
from flowguides.pyro._model import full_data_chunks, log_joint_at

pytestmark = pytest.mark.torch


def test_laplace_start_of_a_subsampled_model_is_the_full_data_posterior():
    """A plate with ``subsample_size`` whose size is not a multiple of it (the last chunk is
    padded and masked): the MAP and the scale are the full posterior's (closed form: a normal
    mean with a N(0, 10) prior). On one minibatch per evaluation the search finds no mode."""
    y = torch.as_tensor(np.random.default_rng(1).normal(2.0, 1.0, size=(2010, 2)))

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", y.shape[0], subsample_size=50) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=y[idx])

    spec = {"layers": [{"type": "planar"}], "dtype": "float64"}
    fit = fit_posterior(model, spec, y, num_steps=2, init_scale="laplace", progress=False)
    precision = y.shape[0] + 1.0 / 100.0
    fixed = fit.guide.preconditioner
    np.testing.assert_allclose(fixed["precondition.shift"], y.sum(0) / precision, rtol=1e-6)
    scale = np.diag(np.asarray(fixed["precondition.scale_tril"]))
    np.testing.assert_allclose(scale, precision**-0.5, rtol=1e-6)


def test_chunks_sum_to_the_full_data_log_joint_with_nested_subsampled_plates():
    """Two nested subsampled plates (neither size a multiple of its batch), a global latent
    and a factor outside them: the chunks' log joints sum to the log joint of the same model
    without subsampling, at any point."""
    rng = np.random.default_rng(0)
    y = torch.as_tensor(rng.normal(size=(7, 23)))

    def model(subsample: bool):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        pyro.factor("penalty", -0.5 * loc**2)
        cols = pyro.plate("cols", 23, subsample_size=5 if subsample else None, dim=-1)
        rows = pyro.plate("rows", 7, subsample_size=3 if subsample else None, dim=-2)
        with cols as j, rows as i:
            pyro.sample("obs", dist.Normal(loc, scale), obs=y[i][:, j])

    trace = poutine.trace(model).get_trace(True)
    chunks = full_data_chunks(trace)
    assert len(chunks) == 3 * 5  # ceil(7 / 3) x ceil(23 / 5)
    sites = [trace.nodes[n] for n in ("loc", "scale")]
    for point in ([0.3, -0.2], [-1.1, 0.4]):
        pairs = list(zip(sites, torch.tensor(point, dtype=torch.float64), strict=True))
        full = log_joint_at(model, pairs, (False,), {})
        parts = [log_joint_at(c(model), pairs, (True,), {}, jacobian=i == 0)
                 for i, c in enumerate(chunks)]  # fmt: skip
        torch.testing.assert_close(torch.stack(parts).sum(), full)
    assert full_data_chunks(poutine.trace(model).get_trace(False)) is None
