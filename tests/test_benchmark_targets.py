"""The benchmark's synthetic targets: reference moments and log Z against closed forms and MC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import metrics
from benchmarks.targets import BANANA_B, TAPER_SD, TARGET_NAMES, TARGETS, grid_moments

SQRT_2PI = math.sqrt(2.0 * math.pi)


def test_energy_log_z_and_moments_match_closed_forms() -> None:
    # z2 | z1 is a normal (U2) or an equal-width / unequal-width normal pair (U3, U4), whose
    # normaliser does not depend on z1, so z1 ~ N(0, TAPER_SD) and log Z is closed-form.
    z1_norm = math.log(SQRT_2PI * TAPER_SD)
    expected = {
        "U2": math.log(SQRT_2PI * 0.4) + z1_norm,
        "U3": math.log(2 * SQRT_2PI * 0.35) + z1_norm,
        "U4": math.log(SQRT_2PI * (0.4 + 0.35)) + z1_norm,
    }
    for name, log_z in expected.items():
        t = TARGETS[name]
        assert t.log_z == pytest.approx(log_z, abs=1e-6), name
        assert t.mean[0] == pytest.approx(0.0, abs=1e-8) and t.sd[0] == pytest.approx(
            TAPER_SD, rel=1e-6
        )
    # U2: z2 = sin(pi z1 / 2) + 0.4 eps, so Var z2 = (1 - exp(-pi^2 TAPER_SD^2 / 2)) / 2 + 0.16
    var = 0.5 * (1 - math.exp(-(math.pi**2) * TAPER_SD**2 / 2)) + 0.16
    assert TARGETS["U2"].mean[1] == pytest.approx(0.0, abs=1e-8)
    assert TARGETS["U2"].sd[1] == pytest.approx(math.sqrt(var), rel=1e-6)


def test_grid_has_converged() -> None:
    coarse, fine = grid_moments("U3", 801), grid_moments("U3", 2001)
    np.testing.assert_allclose(coarse[0], fine[0], atol=1e-6)
    np.testing.assert_allclose(coarse[1], fine[1], rtol=1e-6)
    assert coarse[2] == pytest.approx(fine[2], abs=1e-6)


def _grid_log_z(target, bounds, n1, n2) -> float:
    x1, x2 = np.linspace(*bounds[0], n1), np.linspace(*bounds[1], n2)
    logp = target.log_prob_numpy(np.stack(np.meshgrid(x1, x2, indexing="ij"), -1))
    peak = logp.max()
    return float(peak + np.log(np.exp(logp - peak).sum() * (x1[1] - x1[0]) * (x2[1] - x2[0])))


def test_banana_and_mixture_are_normalised() -> None:
    banana = _grid_log_z(TARGETS["banana"], ((-70, 70), (-15, 500)), 1401, 5151)
    mixture = _grid_log_z(TARGETS["mixture"], ((-7, 7), (-7, 7)), 701, 701)
    assert banana == pytest.approx(0.0, abs=1e-6)
    assert mixture == pytest.approx(0.0, abs=1e-8)
    assert TARGETS["banana"].sd[1] == pytest.approx(math.sqrt(1 + 2e4 * BANANA_B**2))


def test_funnel_density_factorises_in_the_standard_coordinates() -> None:
    # with x = exp(v / 2) u: log p(v, x) + (d - 1) v / 2 = log N(v; 0, 3) + sum log N(u; 0, 1)
    rng = np.random.default_rng(1)
    v, u = 3 * rng.standard_normal(50), rng.standard_normal((50, 9))
    z = np.concatenate([v[:, None], np.exp(v / 2)[:, None] * u], -1)
    lhs = TARGETS["funnel"].log_prob_numpy(z) + 9 * v / 2
    rhs = -0.5 * (v / 3) ** 2 - math.log(3 * SQRT_2PI) + (-0.5 * u**2 - math.log(SQRT_2PI)).sum(-1)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_reference_moments_agree_with_exact_draws(name: str) -> None:
    t = TARGETS[name]
    n = 200_000
    x = t.sampler(n, np.random.default_rng(2))
    assert x.shape == (n, t.dim)
    assert np.isfinite(t.log_prob_numpy(x[:1000])).all()
    if name == "funnel":
        # x_i's sample sd is far too noisy (E x^4 = 3 e^18); check v by MC and sd(x_i) by
        # quadrature: Var x_i = E[exp(v)] with v ~ N(0, 3)
        v = np.linspace(-40, 40, 200_001)
        var = np.sum(np.exp(v - 0.5 * (v / 3) ** 2)) * (v[1] - v[0]) / (3 * SQRT_2PI)
        np.testing.assert_allclose(t.sd[1:], math.sqrt(var), rtol=1e-10)
        x = x[:, :1]
        t_mean, t_sd = t.mean[:1], t.sd[:1]
    else:
        t_mean, t_sd = t.mean, t.sd
    s = metrics.score(None, None, {"z": x}, {"z": (t_mean, t_sd)})
    assert s["mean_err"] < 5 / math.sqrt(n) and abs(math.log(s["sd_ratio_max"])) < 0.02
    assert abs(math.log(s["sd_ratio_min"])) < 0.02


def test_score_elbo_and_khat() -> None:
    rng = np.random.default_rng(3)
    log_q = rng.standard_normal(4000)
    lw = 1.5 + 0.1 * rng.standard_normal(4000)
    s = metrics.score(log_q + lw, log_q, {}, None, log_z=2.0)
    assert s["elbo"] == pytest.approx(lw.mean()) and s["elbo_gap"] == pytest.approx(2.0 - lw.mean())
    assert s["khat"] < 0.5  # light-tailed weights: reliable
    # Pareto weights with tail index 1/1.2: log-weights exponential with mean 1.2, k = 1.2
    heavy = metrics.score(rng.exponential(1.2, 4000), np.zeros(4000), {}, None)
    assert heavy["khat"] > 0.7
    hopeless = metrics.score(3 * rng.standard_cauchy(4000), np.zeros(4000), {}, None)
    assert hopeless["khat"] > 0.7  # inf: a spread ArviZ cannot even fit


@pytest.mark.jax
def test_jax_log_density_matches_numpy() -> None:
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    for name in TARGET_NAMES:
        t = TARGETS[name]
        z = rng.standard_normal((7, t.dim)) * 2
        got = np.asarray(t.log_prob_jax(jnp.asarray(z)))
        np.testing.assert_allclose(got, t.log_prob_numpy(z), rtol=1e-12)


# -- the anchors' learning-rate search and MAP start -------------------------------------------
def _fake_fit(losses: dict[float, float]):  # noqa: ANN202 - a stand-in method
    from benchmarks.anchor_base import Fitted

    def fit(problem: object, budget: object) -> Fitted:
        loss = losses[budget.learning_rate]  # type: ignore[attr-defined]
        if loss is None:
            raise FloatingPointError("diverged")
        return Fitted({"wall_s": 1.0}, final_loss=loss)

    return fit


def test_lr_search_keeps_the_best_final_elbo_and_records_the_grid() -> None:
    from benchmarks.anchor_base import LR_GRID, Budget, lr_searched

    losses = dict(zip(LR_GRID, (5.0, 2.0, float("nan")), strict=True))
    fitted = lr_searched(_fake_fit(losses))(None, Budget(num_steps=10))  # type: ignore[arg-type]
    assert fitted.extra["learning_rate"] == LR_GRID[1] and fitted.final_loss == 2.0
    assert fitted.extra["lr_search"] == {str(LR_GRID[0]): -5.0, str(LR_GRID[1]): -2.0,
                                         str(LR_GRID[2]): None}  # fmt: skip
    failing = dict.fromkeys(LR_GRID)
    with pytest.raises(RuntimeError, match="no rate of"):
        lr_searched(_fake_fit(failing))(None, Budget(num_steps=10))  # type: ignore[arg-type]


def _conjugate_problem():  # noqa: ANN202
    """mu ~ N(0, 1), y_i ~ N(mu, 1); sigma ~ LogNormal(0, 1) apart: the posterior in the
    unconstrained space (mu, log sigma) is exactly Gaussian, so a Laplace approximation at the
    MAP is exact."""
    import numpyro
    import numpyro.distributions as dist

    from benchmarks.anchor_base import Problem

    y = np.array([0.3, -1.2, 2.0])

    def model() -> None:
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0).expand([3]).to_event(1), obs=y)

    cov = np.eye(3) + np.ones((3, 3))
    log_z = -0.5 * (y @ np.linalg.solve(cov, y) + np.linalg.slogdet(2 * np.pi * cov)[1])
    return Problem("conjugate", lambda: None, lambda: model, None, float(log_z)), y


def test_map_point_and_laplace_draws_are_exact_on_a_gaussian_posterior() -> None:
    from benchmarks.anchor_base import Budget
    from benchmarks.anchors_numpyro import map_point, numpyro_svi

    prob, y = _conjugate_problem()
    at_map = map_point(prob.numpyro_model(), seed=0)
    # the unconstrained mode: mu = sum(y) / (n + 1); log sigma = 0 (LogNormal's Jacobian)
    assert float(at_map["mu"]) == pytest.approx(y.sum() / 4, abs=1e-6)
    assert float(at_map["sigma"]) == pytest.approx(1.0, abs=1e-6)
    fit = numpyro_svi("AutoLaplaceApproximation")(prob, Budget(num_steps=5, learning_rate=1e-6))
    draws, log_p, log_q = fit.log_densities(400, 1)
    # exact q: every log weight equals log Z (draws in the wrong order or a missing Jacobian
    # would spread them)
    np.testing.assert_allclose(log_p - log_q, prob.log_z, atol=1e-6)
    assert draws["mu"].std() == pytest.approx(0.5, rel=0.15)
    assert np.log(draws["sigma"]).std() == pytest.approx(1.0, rel=0.15)
