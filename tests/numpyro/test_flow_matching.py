"""`fit_density(..., objective="flow_matching")`: a simulation-free fit, exact `log_prob`."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from flowguides.numpyro import fit_density
from flowguides.spec import FlowSpec, SpecError

ODE = FlowSpec.neural_ode(hidden=[32, 32], solver="rk4", num_steps=8, dtype="float64")


def ring(n: int, seed: int) -> np.ndarray:
    """A noisy circle of radius 3 around (5, -2): far from Gaussian."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    return 3 * np.c_[np.cos(angle), np.sin(angle)] + [5, -2] + rng.normal(scale=0.2, size=(n, 2))


def test_flow_matching_beats_a_gaussian_and_leaves_the_affine_alone():
    train, test = ring(1500, 0), ring(1000, 1)
    fit = fit_density(
        train, ODE, objective="flow_matching", num_steps=400, learning_rate=1e-2, progress=False
    )
    baseline = multivariate_normal(train.mean(0), np.cov(train.T)).logpdf(test).mean()
    assert float(fit.log_prob(test).mean()) > baseline + 0.25
    assert fit.objective == "flow_matching"
    assert len(fit.losses["train"]) >= len(fit.losses["val"]) > 0
    assert np.isfinite(fit.losses["val"]).all()
    assert float(fit.losses["train"][-20:].mean()) < float(fit.losses["train"][:20].mean())
    for name in ("affine.loc", "affine.log_scale"):  # the base stays N(0, I) on standardised data
        np.testing.assert_array_equal(fit.flow.params[name], 0.0)
    # one field evaluation per step, each way: no ODE solve in training
    np.testing.assert_array_equal(fit.history["nfe_forward"], 1)
    np.testing.assert_array_equal(fit.history["nfe_backward"], 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            FlowSpec.realnvp(num_layers=2, hidden=[4]),
            r"expected \['neural_ode'\], got \['realnvp'\]",
        ),
        (
            FlowSpec(layers=[{"type": "planar"}, {"type": "neural_ode", "hidden": [4]}]),
            r"got \['planar', 'neural_ode'\]",
        ),
    ],
)
def test_flow_matching_needs_exactly_one_neural_ode_layer(spec, message):
    with pytest.raises(SpecError, match=f"objective='flow_matching'.*{message}"):
        fit_density(ring(20, 0), spec, objective="flow_matching", num_steps=1, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "score_matching"}, r"objective: expected one of .*got 'score_matching'"),
        ({"sigma_min": 1.0}, r"sigma_min: expected a number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_objective_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_density(ring(20, 0), ODE, num_steps=1, progress=False, **kwargs)
