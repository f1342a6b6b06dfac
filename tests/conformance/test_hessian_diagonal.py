"""The start search's Hessian diagonal in both backends: exact, and shared by a site's batch
only where its block of the Hessian is diagonal.

The energy has three sites, packed as the guides pack them: ``w`` (3, no batch), ``a`` (a batch
of 40 scalars) and ``b`` (a batch of 30 pairs, each pair coupled within itself). Every site
couples to ``w``. Without cross-batch terms, ``a``'s 40 and ``b``'s 60 coordinates take their
diagonal from four probes; a term coupling two elements of a batch must send exactly that
colour to unit products, and the diagonal stays the autodiff Hessian's either way. Where
nothing couples two batch elements of a site, or an intercept with a pair, the blocks (1 x 1
for ``a``, 2 x 2 for ``b``) and ``w``'s rows are the whole Hessian (the control variate's
sparse form), and the search says so only then.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.core.hessian import hessian_blocks, hessian_colors

SITES = [((3,), ()), ((40,), (40,)), ((30, 2), (30,))]
DIM = 3 + 40 + 60
POINT = np.random.default_rng(0).normal(size=DIM)


def energy(z, coupling: str):
    """One value per row of ``z (..., DIM)``; works on torch tensors and JAX arrays alike."""
    w, a, b = z[..., :3], z[..., 3:43], z[..., 43:]
    b0, b1 = b[..., 0::2], b[..., 1::2]
    out = (w**2).sum(-1) + (w[..., :1] * w[..., 1:2]).sum(-1) * 0.7
    out = out + ((a - w[..., :1]) ** 2 * (1.0 + a**2)).sum(-1)  # a_j couples to w_0 only
    out = out + (b0**2 + b1**2 + b0 * w[..., 2:3]).sum(-1)
    if coupling != "uncoupled":  # a pair's two coordinates interact (a 2 x 2 block each)
        out = out + (0.5 * b0 * b1).sum(-1)
    if coupling == "a":  # two intercepts interact: a's block is not diagonal
        out = out + 1.3 * a[..., 0] * a[..., 7] ** 3
    if coupling == "b":  # first coordinates of two pairs interact
        out = out + 0.9 * (b0[..., 2] - b0[..., 11]) ** 2
    if coupling == "ab":  # an intercept and a pair interact: each block diagonal, H not sparse
        out = out + 0.8 * a[..., 5] * b0[..., 3]
    return out


# unit products: w's, then a failed colour's
NEED = {"none": 3, "a": 3 + 40, "b": 3 + 30, "ab": 3, "uncoupled": 3}
SPARSE = {"none": True, "a": False, "b": False, "ab": False, "uncoupled": True}


def dense(rows, blocks, layout):
    """The Hessian its sparse form stands for: the singletons' `rows` and the families'
    `blocks`, laid out by `layout` (`Blocks`)."""
    out = np.zeros((DIM, DIM))
    for idx, block in zip(layout.families, blocks, strict=True):
        out[idx[:, :, None], idx[:, None, :]] = np.asarray(block)
    single = layout.singletons
    out[single, :] = rows
    out[:, single] = np.asarray(rows).T
    return out


@pytest.mark.parametrize("coupling", list(NEED))
@pytest.mark.parametrize(
    "backend", [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro")]
)
def test_the_diagonal_is_exact_and_shared_only_where_the_block_is_diagonal(backend, coupling):
    colors, layout = hessian_colors(SITES), hessian_blocks(SITES)
    assert [f.shape for f in layout.families] == [(40, 1), (30, 2)]
    assert len(colors[1]) == 3 + 1 + 2 and colors[1].tolist() == [False] * 3 + [True] * 3
    if backend == "pyro":
        import torch

        from flowguides.pyro import _hessian

        point = torch.as_tensor(POINT)
        expected = torch.autograd.functional.hessian(lambda z: energy(z, coupling), point)
        expected = expected.diagonal().numpy()
        batches = []

        def energies(z):
            batches.append(z.shape[0])
            return energy(z, coupling)

        got = _hessian.hessian_diagonal(energies, point, block_size=16, colors=colors).numpy()
        _, need, _ = _hessian.shared_diagonal(energies, point, 16, colors)
        assert sum(batches) == 2 * 3 + NEED[coupling] + 2 * 3  # the products it formed
        plain = _hessian.hessian_diagonal(energies, point, block_size=16).numpy()
        hessian = torch.autograd.functional.hessian(lambda z: energy(z, coupling), point).numpy()
        _, _, (_, sparse) = _hessian.shared_diagonal(energies, point, 16, colors, layout)
        diagonal, rows, blocks, whole = _hessian.hessian_diagonal(
            energies, point, 16, colors, layout
        )
        diagonal, rows = diagonal.numpy(), rows.numpy()
    else:
        import jax
        import jax.numpy as jnp

        from flowguides.numpyro import _hessian

        point = jnp.asarray(POINT)
        expected = np.diag(np.asarray(jax.hessian(lambda z: energy(z, coupling))(point)))

        def diagonal(p, colors):
            return _hessian.hessian_diagonal(lambda z: energy(z, coupling), p, 16, colors)

        got = np.asarray(jax.jit(lambda p: diagonal(p, colors))(point))
        plain = np.asarray(jax.jit(lambda p: diagonal(p, None))(point))
        _, pullback = jax.vjp(jax.grad(lambda z: energy(z, coupling)), point)
        _, need, _ = _hessian.shared_diagonal(lambda v: pullback(v)[0], point, 16, colors)
        terms = _hessian.shared_diagonal(lambda v: pullback(v)[0], point, 16, colors, layout)
        sparse = terms[2][1]
        hessian = np.asarray(jax.hessian(lambda z: energy(z, coupling))(point))
        diagonal, rows, blocks, whole = jax.jit(
            lambda p: _hessian.hessian_diagonal(
                lambda z: energy(z, coupling), p, 16, colors, layout
            )
        )(point)
    assert int(np.sum(need)) == NEED[coupling]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(plain, expected, rtol=1e-12, atol=1e-12)
    # the sparse form: the whole Hessian exactly where it says so, and only there
    assert bool(sparse) is bool(whole) is SPARSE[coupling]
    np.testing.assert_allclose(diagonal, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rows, hessian[:3], rtol=1e-12, atol=1e-12)  # w's rows
    if SPARSE[coupling]:
        np.testing.assert_allclose(dense(rows, blocks, layout), hessian, rtol=1e-12, atol=1e-12)
    else:
        assert not np.allclose(dense(rows, blocks, layout), hessian)


def test_colours_follow_the_batch_of_each_site():
    colors, shared = hessian_colors([((2, 3), (2,)), ((4,), ()), ((5,), (5,)), ((3, 2), (2,))])
    # (2, 3) over a batch of 2: the event positions 0, 1, 2 twice; (4,) without batch: four
    # colours of one; (5,) over a batch of 5: one colour; (3, 2) whose value does not start
    # with its batch (2,): six colours of one
    expected = [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 7, 8, 9, 10, 11, 12, 13]
    assert colors.tolist() == expected
    assert shared.tolist() == [True] * 3 + [False] * 4 + [True] + [False] * 6
    assert hessian_colors([])[0].shape == (0,)
    # the sparse form's layout: the singletons, and per batch shape its elements' positions
    layout = hessian_blocks([((2, 3), (2,)), ((4,), ()), ((5,), (5,)), ((3, 2), (2,))])
    assert layout.singletons.tolist() == [6, 7, 8, 9, *range(15, 21)]
    assert [f.tolist() for f in layout.families] == [
        [[0, 1, 2], [3, 4, 5]],
        [[i] for i in range(10, 15)],
    ]
    assert layout.size(21) == 10 * 21 + 2 * 9 + 5
    assert hessian_blocks([]).families == ()


GROUPS = 300  # above FULL_RANK_MAX_DIM: the diagonal start
ROWS = np.random.default_rng(1).integers(GROUPS, size=900)
Y = np.random.default_rng(2).normal(size=900)


@pytest.mark.parametrize(
    "backend", [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro")]
)
def test_a_plates_intercepts_share_their_products_in_the_guides_start(backend, monkeypatch):
    """Intercepts ``a_j ~ N(mu, 1)``, rows ``y_i ~ N(a[g_i], 1)``: ``H[a_j, a_j] = n_j + 1`` and
    ``H[mu, mu] = GROUPS + 1 / 100`` everywhere (a Gaussian posterior)."""
    seen = []

    def spy(sites):
        seen.append(hessian_colors(sites))
        return seen[-1]

    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import AutoFlowGuide, guide

        def model(g, y):
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
            with pyro.plate("groups", GROUPS):
                a = pyro.sample("a", dist.Normal(mu, 1.0))
            with pyro.plate("rows", len(y)):
                pyro.sample("y", dist.Normal(a[..., g], 1.0), obs=y)

        args = (torch.as_tensor(ROWS), torch.as_tensor(Y))
        pyro.clear_param_store()
    else:
        import numpyro
        import numpyro.distributions as dist

        from flowguides.numpyro import AutoFlowGuide, guide

        def model(g, y):
            mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
            with numpyro.plate("groups", GROUPS):
                a = numpyro.sample("a", dist.Normal(mu, 1.0))
            with numpyro.plate("rows", len(y)):
                numpyro.sample("y", dist.Normal(a[g], 1.0), obs=y)

        args = (ROWS, Y)
    monkeypatch.setattr(guide, "hessian_colors", spy)
    flow = AutoFlowGuide(
        model, FlowSpec.planar(num_layers=1, dtype="float64"), init_scale="laplace"
    )
    if backend == "pyro":
        flow(*args)
    else:
        with numpyro.handlers.seed(rng_seed=0):
            flow(*args)
    colors, shared = seen[-1]
    assert shared.tolist() == [False, True]  # mu alone; the 300 intercepts share one colour
    assert colors.tolist() == [0] + [1] * GROUPS
    scale = np.asarray(flow.preconditioner["precondition.scale_tril"])
    expected = 1.0 / np.sqrt(np.r_[GROUPS + 0.01, np.bincount(ROWS, minlength=GROUPS) + 1.0])
    rtol = 1e-6 if backend == "pyro" else 1e-9  # Pyro's model is float32 (torch's default)
    np.testing.assert_allclose(scale, expected, rtol=rtol)
