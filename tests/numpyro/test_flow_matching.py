"""`fit_density(..., objective="flow_matching")`: a simulation-free fit, validated by the
exact-trace negative log-likelihood, with independent or minibatch optimal-transport coupling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from flowguides.core import FLOW_MATCHING_VALIDATION_ROWS, ot_permutation, split_indices
from flowguides.numpyro import fit_density
from flowguides.numpyro.ode import couple_noise
from flowguides.spec import FlowSpec, SpecError

ODE = FlowSpec.neural_ode(hidden=[32, 32], solver="rk4", num_steps=8, dtype="float64")
FIT = {"objective": "flow_matching", "learning_rate": 1e-2, "batch_size": 256, "progress": False}


def ring(n: int, seed: int) -> np.ndarray:
    """A noisy circle of radius 3 around (5, -2): far from Gaussian."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    return 3 * np.c_[np.cos(angle), np.sin(angle)] + [5, -2] + rng.normal(scale=0.2, size=(n, 2))


def gaussian_nll(train: np.ndarray, test: np.ndarray) -> float:
    """Test NLL of the Gaussian fitted to `train` (mean and covariance)."""
    return -float(multivariate_normal(train.mean(0), np.cov(train.T)).logpdf(test).mean())


@pytest.fixture(scope="module")
def fitted():
    train, test = ring(1500, 0), ring(1000, 1)
    return train, test, fit_density(train, ODE, num_steps=400, **FIT)


def test_flow_matching_beats_a_gaussian_and_leaves_the_affine_alone(fitted):
    train, test, fit = fitted
    assert -float(fit.log_prob(test).mean()) < gaussian_nll(train, test) - 1.0
    assert fit.objective == "flow_matching" and fit.coupling == "independent"
    assert set(fit.losses) == {"flow_matching", "val_nll"}
    assert len(fit.losses["flow_matching"]) == 400
    assert len(fit.losses["val_nll"]) == 5  # steps 0, 100, 200, 300 and the last
    assert np.isfinite(fit.losses["val_nll"]).all()
    train_loss = fit.losses["flow_matching"]
    assert float(train_loss[-20:].mean()) < float(train_loss[:20].mean())
    for name in ("affine.loc", "affine.log_scale"):  # the base stays N(0, I) on standardised data
        np.testing.assert_array_equal(fit.flow.params[name], 0.0)
    # one field evaluation per step, each way: no ODE solve in training
    np.testing.assert_array_equal(fit.history["nfe_forward"], 1)
    np.testing.assert_array_equal(fit.history["nfe_backward"], 1)
    # each validation is one rk4 solve: 4 stages x 8 steps
    np.testing.assert_array_equal(fit.history["nfe_val"], 32)


def test_flow_matching_improves_with_more_steps(fitted):
    train, test, long = fitted
    short = fit_density(train, ODE, num_steps=100, **FIT)
    assert -float(long.log_prob(test).mean()) < -float(short.log_prob(test).mean()) - 0.5


def test_early_stopping_on_validation_nll_keeps_the_best_parameters():
    train = ring(1500, 0)
    # a learning rate high enough that a validation gets worse early on (here the second)
    fit = fit_density(train, ODE, num_steps=600, patience=100, **{**FIT, "learning_rate": 0.3})
    val_nll = fit.losses["val_nll"]
    assert len(fit.losses["flow_matching"]) < 600  # patience ran out
    assert val_nll[-1] > val_nll.min()  # the last validation was not the best
    _, val_idx = split_indices(len(train), 0.1, 0)
    subset = train[val_idx[:FLOW_MATCHING_VALIDATION_ROWS]]
    returned = -float(fit.log_prob(subset).mean()) - float(np.log(fit.std).sum())
    np.testing.assert_allclose(returned, val_nll.min(), rtol=1e-9)  # compiled vs eager


def test_flow_matching_runs_every_step_by_default_and_keeps_the_best():
    """Without `patience`, a flow-matching fit does not stop early (`density_patience`): the
    fit that stops above at step < 600 runs all 600, reaches a better validation NLL as its
    learning rate decays, and returns its best parameters."""
    train = ring(1500, 0)
    fit = fit_density(train, ODE, num_steps=600, **{**FIT, "learning_rate": 0.3})
    stopped = fit_density(train, ODE, num_steps=600, patience=100, **{**FIT, "learning_rate": 0.3})
    val_nll = fit.losses["val_nll"]
    assert len(fit.losses["flow_matching"]) == 600
    assert val_nll.min() < stopped.losses["val_nll"].min() - 0.05
    _, val_idx = split_indices(len(train), 0.1, 0)
    subset = train[val_idx[:FLOW_MATCHING_VALIDATION_ROWS]]
    returned = -float(fit.log_prob(subset).mean()) - float(np.log(fit.std).sum())
    np.testing.assert_allclose(returned, val_nll.min(), rtol=1e-9)


def test_ot_coupling_trains_on_straighter_paths(fitted):
    train, test, independent = fitted
    fit = fit_density(train, ODE, num_steps=400, coupling="ot", **FIT)
    assert fit.coupling == "ot"
    assert -float(fit.log_prob(test).mean()) < gaussian_nll(train, test) - 1.0
    # paired by optimal transport, the conditional velocities vary less: a lower loss floor
    ot_loss, ind_loss = fit.losses["flow_matching"], independent.losses["flow_matching"]
    assert float(ot_loss[-100:].mean()) < 0.7 * float(ind_loss[-100:].mean())


def test_ot_coupling_is_a_permutation_that_shortens_the_paths():
    x1 = jnp.asarray((ring(256, 2) - [5, -2]) / 2.1)
    x0 = jax.random.normal(jax.random.key(0), (256, 2), jnp.float64)
    paired = couple_noise(x0, x1, "ot")
    assert couple_noise(x0, x1, "independent") is x0
    # the same rows in another order: the host assignment's, also under jit
    perm = ot_permutation(np.asarray(x0), np.asarray(x1))
    np.testing.assert_array_equal(paired, np.asarray(x0)[perm])
    jitted = jax.jit(lambda a, b: couple_noise(a, b, "ot"))(x0, x1)
    np.testing.assert_array_equal(jitted, paired)
    assert not np.array_equal(paired, x0)
    ot_length = float(jnp.mean(jnp.sum((x1 - paired) ** 2, -1)))
    independent_length = float(jnp.mean(jnp.sum((x1 - x0) ** 2, -1)))
    assert ot_length < 0.5 * independent_length


def test_maximum_likelihood_stays_the_default():
    spec = FlowSpec.neural_ode(hidden=[4], solver="euler", num_steps=3, dtype="float64")
    fit = fit_density(ring(50, 0), spec, num_steps=2, progress=False)
    assert fit.objective == "maximum_likelihood" and set(fit.losses) == {"train", "val"}
    np.testing.assert_array_equal(fit.history["nfe_forward"], 3)  # euler: 3 steps
    assert "nfe_val" not in fit.history


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
        (
            {"objective": "flow_matching", "coupling": "sinkhorn"},
            r"coupling: expected one of \['independent', 'ot'\], got 'sinkhorn'",
        ),
        ({"coupling": "ot"}, r"coupling: 'ot' .* got objective='maximum_likelihood'"),
    ],
)
def test_bad_objective_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_density(ring(20, 0), ODE, num_steps=1, progress=False, **kwargs)
