"""High dimensions: above `FULL_RANK_MAX_DIM` the Laplace start whitens with the exact Hessian
diagonal, computed without the Hessian and held (and saved) as a vector."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import flowguides
from flowguides.core import MODE_TOLERANCE
from flowguides.pyro import AutoFlowGuide, fit_posterior
from flowguides.pyro import laplace as laplace_module
from flowguides.spec import FlowSpec

SPEC = FlowSpec.planar(num_layers=2, dtype="float64")
GEN = torch.Generator().manual_seed(1)
X = torch.randn(12, 4, generator=GEN, dtype=torch.float64)
X[:, 1] += 0.8 * X[:, 0]  # correlated columns: a Hessian far from diagonal
Y = X @ torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64) + 0.3 * torch.randn(
    12, generator=GEN, dtype=torch.float64
)


def broadcasting(x, y):
    b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[1]), 2.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal((x * b).sum(-1), s), obs=y)


def one_draw_only(x, y):  # X @ b: runs one draw at a time
    b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[1]), 2.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ b, s), obs=y)


@pytest.mark.parametrize(
    "model, vectorize", [(broadcasting, "auto"), (one_draw_only, False)], ids=["at_once", "loop"]
)
def test_large_dim_start_is_the_exact_hessian_diagonal_held_as_a_vector(model, vectorize):
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, SPEC, init_scale="laplace", vectorize_particles=vectorize)
    guide(X, Y)  # the full-rank path: 5 <= FULL_RANK_MAX_DIM
    full = guide.preconditioner
    assert full["precondition.scale_tril"].shape == (5, 5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(laplace_module, "FULL_RANK_MAX_DIM", 2)  # 5 > 2: blocks of 2, 2 and 1
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(model, SPEC, init_scale="laplace", vectorize_particles=vectorize)
        guide(X, Y)
    shift, scale = guide.preconditioner.values()
    assert scale.shape == (5,) and guide.vectorized is (vectorize == "auto")
    torch.testing.assert_close(shift, full["precondition.shift"])  # the same MAP

    def energy(z: torch.Tensor) -> torch.Tensor:
        return -guide.log_joint(z, X, Y)

    hessian = torch.autograd.functional.hessian(energy, shift)
    off = hessian - torch.diag(hessian.diagonal())
    assert float(off.abs().max()) > 0.1 * float(hessian.diagonal().min())  # not diagonal
    torch.testing.assert_close(scale, hessian.diagonal().rsqrt(), rtol=1e-10, atol=0)
    # the flow starts as this diagonal Gaussian: z = MAP + scale * eps
    eps = torch.randn(3, 5, generator=GEN, dtype=torch.float64)
    z, ladj = guide.flow.forward_and_log_det(eps)
    torch.testing.assert_close(z, shift + scale * eps)
    torch.testing.assert_close(ladj, scale.log().sum().expand(3))


def test_hessian_diagonal_of_a_non_separable_function():
    a = torch.randn(7, 7, generator=GEN, dtype=torch.float64)

    def energies(z: torch.Tensor) -> torch.Tensor:  # rows independent, coordinates coupled
        return ((z @ a).sin() ** 2).sum(-1) + z.prod(-1)

    point = torch.randn(7, generator=GEN, dtype=torch.float64)
    expected = torch.autograd.functional.hessian(lambda z: energies(z[None])[0], point)
    for block in (1, 3, 7):
        diagonal = laplace_module.hessian_diagonal(energies, point, block_size=block)
        torch.testing.assert_close(diagonal, expected.diagonal(), rtol=1e-12, atol=1e-12)


def test_a_diagonal_preconditioner_saves_as_a_vector_and_loads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(laplace_module, "FULL_RANK_MAX_DIM", 2)
    fit = fit_posterior(broadcasting, SPEC, X, Y, num_steps=3, init_scale="laplace", progress=False)
    fixed = fit.guide.preconditioner
    assert fixed["precondition.scale_tril"].shape == (5,)
    folder = flowguides.save(fit, tmp_path / "fit")
    meta = json.loads((folder / "meta.json").read_text())
    assert np.shape(meta["precondition"]["precondition.scale_tril"]) == (5,)
    there = flowguides.load(folder, backend="pyro", model=broadcasting, model_args=(X, Y))
    for name, value in there.guide.preconditioner.items():
        torch.testing.assert_close(value, fixed[name], rtol=0, atol=0)
    latent = fit.guide.draws(4, seed=0)[0]
    with torch.no_grad():
        torch.testing.assert_close(
            there.guide.flow.log_prob(latent), fit.guide.flow.log_prob(latent)
        )
    # an older folder with the diagonal as a (dim, dim) matrix still loads, as that matrix
    old = {k: np.asarray(v.numpy()) for k, v in fixed.items()}
    old["precondition.scale_tril"] = np.diag(old["precondition.scale_tril"])
    there.guide.set_preconditioner(old)
    assert there.guide.preconditioner["precondition.scale_tril"].shape == (5, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            there.guide.flow.log_prob(latent), fit.guide.flow.log_prob(latent)
        )


def varying_intercepts(group, y, num_groups):
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(y.new_ones(())))
    with pyro.plate("groups", num_groups):
        alpha = pyro.sample("alpha", dist.Normal(mu, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(alpha[..., group], sigma), obs=y)


def test_three_hundred_latent_dimensions_start_diagonal_without_a_dense_matrix():
    num_groups = 298  # 300 latent dimensions > FULL_RANK_MAX_DIM
    gen = torch.Generator().manual_seed(0)
    group = torch.arange(num_groups).repeat(3)
    y = (
        1.0
        + torch.randn(num_groups, generator=gen, dtype=torch.float64)[group]
        + torch.randn(len(group), generator=gen, dtype=torch.float64)
    )
    fit = fit_posterior(
        varying_intercepts, SPEC, group, y, num_groups, num_steps=20, init_scale="laplace",
        progress=False,
    )  # fmt: skip
    assert fit.guide.vectorized and fit.guide.latent_dim == 300
    scale = fit.guide.preconditioner["precondition.scale_tril"]
    assert scale.shape == (300,)  # never a 300 x 300 matrix
    assert all(b.dim() <= 1 for b in fit.guide.flow.buffers())
    # alpha_g (coordinates 2:, after mu and sigma): precision 1 + 3 / sigma^2 at the MAP
    sigma = float(fit.guide.constrain(fit.guide.preconditioner["precondition.shift"])["sigma"])
    expected = (1.0 + 3.0 / sigma**2) ** -0.5
    torch.testing.assert_close(scale[2:], torch.full((num_groups,), expected, dtype=scale.dtype))
    assert np.isfinite(fit.losses).all()


def _hierarchical_energies(dtype, offset=3e5, n=20_000, groups=200):
    """The negative log joint of a varying-intercept regression (unconstrained scales) plus a
    large constant, per row of a batch of points: in float32 its values are too coarse for a
    line search near the mode."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(n, 3)), dtype=dtype)
    group = torch.tensor(rng.integers(groups, size=n))
    noise = rng.normal(size=n)
    y = (1 + 0.5 * rng.normal(size=groups))[group.numpy()] + x.numpy() @ [0.5, -0.3, 0.2]
    y = torch.tensor(y + noise, dtype=dtype)

    def energies(z):
        a, w, mu, log_s, log_n = z[:, :groups], z[:, groups:-3], z[:, -3], z[:, -2], z[:, -1]
        s, sd = log_s.exp(), log_n.exp()
        resid = (y - a[:, group] - w @ x.T) / sd[:, None]
        lp = -0.5 * (resid**2).sum(-1) - n * log_n
        lp = lp - 0.5 * (((a - mu[:, None]) / s[:, None]) ** 2).sum(-1) - groups * log_s
        lp = lp - 0.5 * (w**2).sum(-1) - mu**2 / 50 - s**2 / 8 + log_s - sd**2 / 8 + log_n
        return offset - lp

    return energies, torch.zeros(groups + 6, dtype=dtype)


def test_single_precision_search_reaches_the_mode_its_line_search_cannot_resolve():
    energies, z0 = _hierarchical_energies(torch.float32)

    def energy(z):
        return energies(z[None])[0]

    out = laplace_module.laplace_search(energy, z0, False, energies=energies, elbos=False)
    stalled = laplace_module.minimize(energy, z0).requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(stalled), stalled)
    scale = out["scale"]
    assert float((grad.abs() * scale).max()) > MODE_TOLERANCE / 10  # short of the test below
    assert not bool(out["moving"].any())
    assert float((out["grad_map"].abs() * scale).max()) < MODE_TOLERANCE / 10
    # the mode of the same model in double precision, within a tenth of the posterior scale
    energies64, z64 = _hierarchical_energies(torch.float64)
    mode = laplace_module.minimize(lambda z: energies64(z[None])[0], z64)
    assert float(((out["loc_map"].double() - mode).abs() / scale.double()).max()) < 0.1


def test_the_start_search_keeps_pyro_nan_warnings_to_itself():
    """Far from the mode the search meets energies that are NaN, and Pyro's trace says
    "Encountered NaN" each time; the search handles those points (it keeps the best finite
    one), so the warning stays inside it (pytest turns any warning into an error here), and
    the mode is found all the same. Other warnings still pass."""
    from pyro.util import warn_if_nan

    def energy(z: torch.Tensor) -> torch.Tensor:
        value = 0.5 * ((z - 1.0) ** 2).sum(-1)
        value = torch.where(z.abs().amax(-1) > 2.5, torch.full_like(value, float("nan")), value)
        return warn_if_nan(value, "log_prob_sum at site 'z'")

    z0 = torch.full((3,), 10.0, dtype=torch.float64)  # starts where the energy is NaN
    out = laplace_module.laplace_search(energy, torch.zeros(3, dtype=torch.float64),
                                        energies=energy)  # fmt: skip
    np.testing.assert_allclose(out["loc_map"].numpy(), 1.0, atol=1e-6)
    assert np.isneginf(out["elbo_plain"].numpy()).any()  # a wide start met NaN: -inf
    with pytest.warns(UserWarning, match="Encountered NaN"):
        energy(z0)


def test_a_line_search_step_beyond_the_dtype_ends_the_search_at_its_best_point(monkeypatch):
    """Torch's L-BFGS raises a `RuntimeError` of its own where a line-search step size leaves
    the dtype's range (met once in single precision on the centred eight schools, whose energy
    falls without bound as tau -> 0): the search stops at the lowest energy it evaluated. A
    model's own `RuntimeError` is still raised."""
    calls = []
    original = torch.optim.LBFGS._add_grad

    def add_grad(self, step_size, update):
        calls.append(step_size)
        if len(calls) == 3:  # after the first line search's trial point and its undo
            raise RuntimeError("value cannot be converted to type float without overflow")
        return original(self, step_size, update)

    monkeypatch.setattr(torch.optim.LBFGS, "_add_grad", add_grad)

    def energy(z):
        return ((z - 2.0) ** 2).sum()

    start = torch.zeros(2)
    point = laplace_module.minimize(energy, start)
    assert len(calls) == 3 and float(energy(point)) < float(energy(start))
    monkeypatch.undo()

    def broken(z):
        raise RuntimeError("the model's own bug")

    with pytest.raises(RuntimeError, match="the model's own bug"):
        laplace_module.minimize(broken, start)
