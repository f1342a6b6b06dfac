"""`benchmarks.large`'s reference for the varying-intercept model: the intercepts integrated
out in closed form, checked against the multivariate normal density of each group's rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.stats as st

from benchmarks import large


def _log_joint(theta: np.ndarray, data: dict, groups: int) -> float:
    """log p(y, globals) by brute force: each group's rows one multivariate normal."""
    w, mu = theta[: large.NUM_FEATURES], theta[large.NUM_FEATURES]
    s, n = np.exp(theta[-2]), np.exp(theta[-1])
    x, y, g = data["X"].astype(float), data["y"].astype(float), data["group"]
    out = st.norm(0, 1).logpdf(w).sum() + st.norm(0, 5).logpdf(mu)
    out += st.halfnorm(scale=2).logpdf([s, n]).sum() + theta[-2] + theta[-1]  # log Jacobians
    for j in range(groups):
        rows = g == j
        cov = n**2 * np.eye(rows.sum()) + s**2
        out += st.multivariate_normal(mu + x[rows] @ w, cov).logpdf(y[rows])
    return float(out)


def test_the_integrated_energy_is_the_brute_force_log_joint_up_to_a_constant():
    data = large.make_data("varying", 60, 4, seed=0)
    statistics = large.varying_statistics(data, 5)  # a fifth group with no rows
    rng = np.random.default_rng(1)
    thetas = [np.r_[0.3 * rng.normal(size=10), rng.normal(), rng.normal(size=2)] for _ in range(3)]
    with large.float64():
        stats = {k: jax.numpy.asarray(v) for k, v in statistics.items()}
        energies = [float(large.varying_energy(jax.numpy.asarray(t), stats)) for t in thetas]
    brute = [_log_joint(t, data, 4) for t in thetas]
    offsets = np.add(energies, brute)  # energy = -log joint + constant
    assert np.ptp(offsets) < 1e-9 * np.abs(brute).max()
    assert np.ptp(energies) > 1.0  # the points differ: the check compares something


@pytest.mark.parametrize("x64", [False, True])
def test_the_reference_recovers_the_data_and_restores_the_float_setting(x64):
    data = large.make_data("varying", 4000, 20, seed=0)
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", x64)
    try:
        ref = large.varying_reference(data, 20)
        assert jax.config.jax_enable_x64 is x64
    finally:
        jax.config.update("jax_enable_x64", before)
    assert set(ref) == {"w", "mu", "sigma", "noise"}
    # the data's truth: noise 1, intercepts around 1 with spread 0.5 (20 groups)
    assert abs(ref["noise"][0] - 1.0) < 4 * ref["noise"][1]
    assert abs(ref["mu"][0] - 1.0) < 4 * ref["mu"][1] and 0.0 < ref["sigma"][1] < 0.2
    assert np.all(ref["w"][1] > 0) and np.all(ref["w"][1] < 0.05)
