"""Subsampled Pyro models: the start search runs on the full data, not on one minibatch."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from flowguides.pyro import VectorizationWarning, _stream, fit_posterior
from flowguides.pyro._model import log_joint_at
from flowguides.pyro._stream import full_data_chunks, mapped_chunks

pytestmark = pytest.mark.torch


NESTED_Y = torch.as_tensor(np.random.default_rng(0).normal(size=(7, 23)))


def nested(subsample: bool):
    """Two nested plates, subsampled (neither size a multiple of its batch) or not, a global
    latent and a factor outside them."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    pyro.factor("penalty", -0.5 * loc**2)
    cols = pyro.plate("cols", 23, subsample_size=5 if subsample else None, dim=-1)
    rows = pyro.plate("rows", 7, subsample_size=3 if subsample else None, dim=-2)
    with cols as j, rows as i:
        pyro.sample("obs", dist.Normal(loc, scale), obs=NESTED_Y[i][:, j])


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
    model = nested
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


def test_chunks_mapped_in_blocks_sum_to_the_full_data_log_joint(monkeypatch):
    """`mapped_chunks` (the chunks after the first under `torch.func.vmap`, in blocks of two
    here) plus the first chunk is the full-data log joint of the nested-plates model above,
    at one point and at a batch of draws, to 1e-10."""
    monkeypatch.setattr(_stream, "ROWS_PER_CALL", 2 * 3 * 5)  # two chunks of 3 x 5 per block
    model = nested
    trace = poutine.trace(model).get_trace(True)
    chunks = full_data_chunks(trace)
    sites = [trace.nodes[n] for n in ("loc", "scale")]
    point = torch.tensor([0.3, -0.2], dtype=torch.float64)
    pairs = list(zip(sites, point, strict=True))
    full = log_joint_at(model, pairs, (False,), {})
    blocks = []

    def evaluate(handler):
        blocks.append(1)
        return log_joint_at(handler(model), pairs, (True,), {}, jacobian=False)

    with pyro.validation_enabled(False):
        rest = mapped_chunks(chunks, evaluate, draws=1)
    first = log_joint_at(chunks[0](model), pairs, (True,), {})
    torch.testing.assert_close(first + rest, full, rtol=1e-10, atol=1e-10)
    assert len(blocks) == 7  # 14 chunks after the first, two per block


def test_the_start_search_maps_its_chunks_where_that_agrees_with_the_loop():
    """A subsampled model as users write it: the start search's full-data log joint maps its
    chunks (checked against the loop at first use) and equals the closed form; a model that
    reads its minibatch's indices in Python keeps the loop, with the same values."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1003, 2, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([0.5, -1.0], dtype=torch.float64) + torch.randn(1003, generator=gen)

    def regression(x, y):
        b = pyro.sample("b", dist.Normal(x.new_zeros(2), 2.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=100) as idx:
            pyro.sample("obs", dist.Normal(x[idx] @ b, 1.0), obs=y[idx])

    def reads_indices(x, y):
        b = pyro.sample("b", dist.Normal(x.new_zeros(2), 2.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=100) as idx:
            rows = [int(i) for i in idx]  # Python reads the indices: no vmap over chunks
            pyro.sample("obs", dist.Normal(x[rows] @ b, 1.0), obs=y[rows])

    spec = {"layers": [{"type": "realnvp", "hidden": [4]}], "dtype": "float64"}
    z = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    exact = dist.Normal(0.0, 2.0).log_prob(z).sum(-1)
    exact = exact + dist.Normal(z @ x.T, 1.0).log_prob(y).sum(-1)
    for model, mapped in ((regression, True), (reads_indices, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VectorizationWarning)
            fit = fit_posterior(model, spec, x, y, num_steps=1, progress=False)
        guide = fit.guide
        assert guide.chunks_mapped is mapped and len(guide._chunks) == 11
        with torch.no_grad():
            one = guide.start_log_joint(z[0], (x, y), {})
            batch = guide.start_log_joint(z, (x, y), {})
        torch.testing.assert_close(one, exact[0], rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(batch, exact, rtol=1e-10, atol=1e-8)
