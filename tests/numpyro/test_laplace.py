"""The Laplace start above `FULL_RANK_MAX_DIM`: the exact Hessian diagonal without the Hessian,
held as a ``(dim,)`` vector, untrained, saved and loaded (old files' matrices too)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from flowguides import io
from flowguides.core import MODE_TOLERANCE
from flowguides.numpyro import fit_posterior, laplace
from flowguides.numpyro import guide as guide_module
from flowguides.numpyro import io as numpyro_io

SPEC = {"layers": [{"type": "realnvp", "hidden": [4]}], "dtype": "float64"}


def test_hessian_diagonal_is_exact_in_blocks():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)))

    def energy(z):  # coupled coordinates: a dense, non-constant Hessian
        return jnp.sum(jnp.cosh(a @ z)) + jnp.sum(z**4)

    z = jnp.linspace(-0.5, 0.5, 5)
    expected = jnp.diag(jax.hessian(energy)(z))
    for block in (2, 5, 8):  # a partial last block, one block, a block wider than d
        np.testing.assert_allclose(laplace.hessian_diagonal(energy, z, block), expected, rtol=1e-10)


def regression(x, y):
    sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    rho = numpyro.sample("rho", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w + rho, sigma), obs=y)


X = np.linspace(-1.0, 1.0, 40).reshape(20, 2)
X[:, 1] += X[:, 0] ** 2
Y = X @ np.array([1.0, -0.5]) + np.sin(np.arange(20.0))


def test_the_diagonal_start_is_a_vector_of_the_exact_curvature_and_round_trips(
    monkeypatch, tmp_path
):
    for module in (guide_module, laplace, numpyro_io):  # force the large-d path at d = 4
        monkeypatch.setattr(module, "FULL_RANK_MAX_DIM", 2)
    fit = fit_posterior(regression, SPEC, X, Y, num_steps=20, init_scale="laplace", progress=False)
    fixed = fit.guide.preconditioner
    shift, scale = (np.asarray(v) for v in fixed.values())
    assert scale.shape == (4,) and shift.shape == (4,)
    guide = fit.guide

    @jax.jit  # one compile, not one per operation
    def gradient_and_curvature(z):
        energy = lambda z: guide._potential_fn(guide._unpack_latent(z))  # noqa: E731
        return jax.grad(energy)(z), jnp.diag(jax.hessian(energy)(z))

    gradient, curvature = gradient_and_curvature(jnp.asarray(shift))
    assert np.max(np.abs(gradient) * scale) < 1e-3  # the MAP
    np.testing.assert_allclose(scale, 1.0 / np.sqrt(curvature), rtol=1e-6)
    np.testing.assert_array_equal(fit.params["auto_precondition.scale_tril"], scale)  # untrained

    draws = fit.sample(50, seed=3)
    io.save(fit, tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "meta.json").read_text())
    assert np.shape(meta["precondition"]["precondition.scale_tril"]) == (4,)
    loaded = io.load(tmp_path / "new", backend="numpyro", model=regression, model_args=(X, Y))
    np.testing.assert_allclose(loaded.guide.preconditioner["precondition.scale_tril"], scale)
    for name, value in loaded.sample(50, seed=3).items():
        np.testing.assert_allclose(value, draws[name], rtol=1e-10)
    # a file from before: the diagonal whitening as a (dim, dim) matrix loads as its vector
    io.save(fit, tmp_path / "old")
    meta["precondition"]["precondition.scale_tril"] = np.diag(scale).tolist()
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    old = io.load(tmp_path / "old", backend="numpyro", model=regression, model_args=(X, Y))
    np.testing.assert_allclose(old.guide.preconditioner["precondition.scale_tril"], scale)


def test_laplace_start_of_a_subsampled_model_is_the_full_data_posterior():
    """A plate with ``subsample_size`` (written the way users write a minibatch model): the
    start search runs on all rows, so its MAP and scale are the full posterior's (closed
    form: a normal mean with a N(0, 10) prior), not one minibatch's scaled up."""
    y = jnp.asarray(np.random.default_rng(1).normal(2.0, 1.0, size=(2000, 2)))

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 10.0).to_event(1))
        with numpyro.plate("data", y.shape[0], subsample_size=20) as idx:
            numpyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=y[idx])

    spec = {"layers": [{"type": "planar"}], "dtype": "float64"}
    fit = fit_posterior(model, spec, y, num_steps=2, init_scale="laplace", progress=False)
    precision = y.shape[0] + 1.0 / 100.0
    fixed = fit.guide.preconditioner
    np.testing.assert_allclose(fixed["precondition.shift"], y.sum(0) / precision, rtol=1e-6)
    scale = np.asarray(fixed["precondition.scale_tril"])
    np.testing.assert_allclose(np.diag(scale), precision**-0.5, rtol=1e-6)


def test_the_map_search_restarts_where_its_line_search_stalls():
    """An ill-conditioned regression (features of scale 200, coefficients' posterior sd about
    1e-3, as posteriordb's sblrc): from some starts the L-BFGS line search finds no decrease
    along a direction its memory from far away made, and the search stalled short of the
    mode, and the fit started from scale 0.1 far from it (sblrc at seed 2). With a restart
    from fresh memory every start reaches the same mode."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(100, 5)) * 200.0)
    y = x @ jnp.ones(5) + jnp.asarray(rng.normal(size=100))

    def energy(z):  # N(0, 10) coefficients, a log-normal-ish noise scale
        beta, log_sigma = z[:5], z[5]
        sigma = jnp.exp(log_sigma)
        fit = 0.5 * jnp.sum(((y - x @ beta) / sigma) ** 2) + 100 * log_sigma
        return fit + 0.5 * jnp.sum(beta**2) / 100 + 0.5 * sigma**2 / 100 - log_sigma

    starts = jnp.asarray(np.stack([np.random.default_rng(s).uniform(-2, 2, 6) for s in range(20)]))
    out = jax.jit(jax.vmap(lambda z0: laplace.laplace_search(energy, z0)))(starts)
    assert not np.any(out["moving"]), np.flatnonzero(np.any(out["moving"], axis=1))
    modes = np.asarray(out["loc_map"])
    np.testing.assert_allclose(modes, np.broadcast_to(modes[0], modes.shape), atol=1e-6)


def _hierarchical_energy(dtype, offset=3e5, n=20_000, groups=200):
    """The negative log joint of a varying-intercept regression (unconstrained scales) plus a
    large constant: in float32 its values are too coarse for a line search near the mode."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, 3)), dtype)
    group = jnp.asarray(rng.integers(groups, size=n))
    noise = rng.normal(size=n)
    y = (1 + 0.5 * rng.normal(size=groups))[np.asarray(group)] + np.asarray(x) @ [0.5, -0.3, 0.2]
    y = jnp.asarray(y + noise, dtype)

    def energy(z):
        a, w, mu, log_s, log_n = z[:groups], z[groups:-3], z[-3], z[-2], z[-1]
        s, sd = jnp.exp(log_s), jnp.exp(log_n)
        lp = -0.5 * jnp.sum(((y - a[group] - x @ w) / sd) ** 2) - n * log_n
        lp += -0.5 * jnp.sum(((a - mu) / s) ** 2) - groups * log_s
        lp += -0.5 * jnp.sum(w**2) - mu**2 / 50 - s**2 / 8 + log_s - sd**2 / 8 + log_n
        return offset - lp

    return energy, jnp.zeros(groups + 6, dtype)


def test_single_precision_search_reaches_the_mode_its_line_search_cannot_resolve():
    energy, z0 = _hierarchical_energy(jnp.float32)
    stalled, grad, _ = jax.jit(lambda z: laplace._lbfgs(energy, z))(z0)
    out = jax.jit(lambda z: laplace.laplace_search(energy, z, False))(z0)
    scale = np.asarray(out["scale"])
    assert np.max(np.abs(np.asarray(grad)) * scale) > MODE_TOLERANCE / 10  # the line search stalls
    assert not np.any(out["moving"])
    assert np.max(np.abs(np.asarray(out["grad_map"])) * scale) < MODE_TOLERANCE / 10
    # the mode of the same model in double precision, within a tenth of the posterior scale
    energy64, z64 = _hierarchical_energy(jnp.float64)
    mode = np.asarray(laplace.minimize(energy64, z64))
    assert np.max(np.abs(np.asarray(out["loc_map"]) - mode) / scale) < 0.1
    assert out["energy_map"] == pytest.approx(float(energy64(jnp.asarray(mode))), abs=0.5)
