"""The density benchmark: data sets, the checkerboard's entropy, the shared checkpoint policy,
the row's standard error, and the flow-matching rows of the neural-ODE benchmark."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import densities, ode_bench
from benchmarks.density_data import DATASETS, DIGITS_NOISE, ENTROPY, load, standard_error
from benchmarks.density_training import (
    CHECKPOINT,
    BestValidation,
    CheckpointPolicy,
    DensityBudget,
    flowjax_fit,
    torch_fit,
)
from flowguides.core import split_indices

__all__: list[str] = []

SHAPES = {
    "two_moons": (6000, 2000, 2),
    "8gaussians": (6000, 2000, 2),
    "checkerboard": (6000, 2000, 2),
    "spiral": (3000, 1000, 2),
    "iris": (112, 38, 4),
    "wine": (133, 45, 13),
    "breast_cancer": (426, 143, 30),
    "digits": (1347, 450, 64),
}


def test_every_data_set_has_a_stated_shape() -> None:
    assert set(SHAPES) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_data_set_shape_and_standardisation(name: str) -> None:
    data = load(name)
    n_train, n_test, dim = SHAPES[name]
    assert data.train.shape == (n_train, dim) and data.test.shape == (n_test, dim)
    assert np.allclose(data.train.mean(0), 0.0, atol=1e-9)
    assert np.allclose(data.train.std(0), 1.0, atol=1e-9)  # no constant column
    assert np.isfinite(data.log_sd)


@pytest.mark.parametrize("name", ["checkerboard", "spiral", "digits"])
def test_data_sets_are_deterministic_per_seed(name: str) -> None:
    first, again, other = load(name, seed=0), load(name, seed=0), load(name, seed=1)
    assert np.array_equal(first.train, again.train) and np.array_equal(first.test, again.test)
    assert not np.array_equal(first.train, other.train)


def test_digits_are_dequantised_by_at_most_one_grey_level() -> None:
    from sklearn.datasets import load_digits

    pixels = load_digits().data
    noisy = DATASETS["digits"](0, np.random.default_rng(0))
    noise = noisy - pixels
    assert DIGITS_NOISE == 1.0
    assert noise.min() >= 0.0 and noise.max() < DIGITS_NOISE
    assert 0.45 < noise.mean() < 0.55  # uniform, not a constant offset


def test_checkerboard_entropy_matches_a_nearest_neighbour_estimate() -> None:
    """Kozachenko-Leonenko (k = 3) on 40,000 standardised draws; the standardisation moves the
    entropy by ``-log_sd`` (about 1.7 nats here), far beyond the tolerance."""
    from scipy.spatial import cKDTree
    from scipy.special import digamma

    data = load("checkerboard", n_synthetic=40_000)
    assert data.entropy == pytest.approx(ENTROPY["checkerboard"] - data.log_sd)
    assert abs(data.log_sd) > 1.0
    x = np.concatenate([data.train, data.test])
    k, n = 3, len(x)
    radius = cKDTree(x).query(x, k=k + 1)[0][:, k]
    estimate = digamma(n) - digamma(k) + math.log(math.pi) + 2 * np.mean(np.log(radius))
    assert estimate == pytest.approx(data.entropy, abs=0.05)


def test_standard_error_is_sd_over_root_n() -> None:
    assert standard_error(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        math.sqrt(5.0 / 3.0) / 2.0
    )
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(2000, 50))
    spread_of_means = draws.mean(1).std()
    assert np.mean([standard_error(d) for d in draws]) == pytest.approx(spread_of_means, rel=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        standard_error(np.array([1.0]))


@pytest.mark.jax
def test_evaluate_reports_mean_se_median_and_entropy_gap(monkeypatch) -> None:
    points = np.array([1.0, 2.0, 3.0, 10.0])
    monkeypatch.setitem(
        densities.DENSITY_METHODS, "fixed", lambda d, b, p: densities.Fitted(points, {"k": 1})
    )
    data = load("checkerboard")
    row = densities.evaluate("fixed", data, DensityBudget(num_steps=7, batch_size=64))
    assert row["test_nll"] == pytest.approx(4.0)
    assert row["test_nll_se"] == pytest.approx(np.std(points, ddof=1) / 2.0)
    assert row["test_nll_median"] == pytest.approx(2.5)
    assert row["entropy_gap"] == pytest.approx(4.0 - data.entropy)
    assert row["method_settings"]["batch_size"] == 64 and row["k"] == 1
    assert "entropy_gap" not in densities.evaluate("fixed", load("iris"), DensityBudget(3))


def test_best_validation_schedule_and_patience() -> None:
    best = BestValidation(60, CheckpointPolicy(every=25, patience=30))
    assert [s for s in range(60) if best.due(s)] == [0, 25, 50, 59]
    assert not best.record(0, 2.0, lambda: "a")
    assert not best.record(25, 1.0, lambda: "b")
    assert best.record(59, 1.5, lambda: "c")  # 34 steps without a better one
    assert best.kept() == "b" and best.summary(60)["best_step"] == 25


def _tiny(n: int = 400) -> densities.DensityData:
    x = np.random.default_rng(0).normal(size=(n, 2))
    return densities.DensityData("tiny", x[: n // 2], x[n // 2 :])


@pytest.mark.torch
def test_torch_anchor_restores_the_best_validation_parameters() -> None:
    """Training ascends the NLL, so every later step is worse: the kept flow is step 0's."""
    import torch
    import zuko

    flow = zuko.flows.RealNVP(2, transforms=1, hidden_features=(8,)).double()
    policy = CheckpointPolicy(every=1, patience=100, validation_fraction=0.25)
    data, budget = _tiny(), DensityBudget(num_steps=6, batch_size=32, learning_rate=0.05)

    def ascent(x: torch.Tensor) -> torch.Tensor:
        return flow().log_prob(x).mean()

    def nll(x: torch.Tensor) -> torch.Tensor:
        return -flow().log_prob(x).mean()

    summary = torch_fit(flow, ascent, data, budget, policy, nll=nll)
    with torch.no_grad():
        kept = float(nll(torch.as_tensor(data.train[split_indices(200, 0.25, 0)[1]])))
    assert summary["best_step"] == 0 and summary["steps_run"] == 6
    assert summary["last_val_nll"] > summary["best_val_nll"] + 1e-3  # later steps were worse
    assert kept == pytest.approx(summary["best_val_nll"], abs=1e-12)
    stopped = CheckpointPolicy(every=1, patience=2, validation_fraction=0.25)
    assert torch_fit(flow, ascent, data, budget, stopped, nll=nll)["steps_run"] == 3


@pytest.mark.jax
def test_flowjax_anchor_restores_the_best_validation_parameters() -> None:
    import jax
    import jax.numpy as jnp
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow

    flow = coupling_flow(
        jax.random.key(0), base_dist=Normal(jnp.zeros(2)), flow_layers=1, nn_width=8, nn_depth=1
    )
    policy = CheckpointPolicy(every=1, patience=100, validation_fraction=0.25)
    data, budget = _tiny(), DensityBudget(num_steps=5, batch_size=32, learning_rate=0.05)
    kept, summary = flowjax_fit(flow, data, budget, policy, sign=-1.0)
    val = jnp.asarray(data.train[split_indices(200, 0.25, 0)[1]])
    assert summary["best_step"] == 0 and summary["steps_run"] == 5
    assert summary["last_val_nll"] > summary["best_val_nll"] + 1e-3
    assert float(-kept.log_prob(val).mean()) == pytest.approx(summary["best_val_nll"], abs=1e-9)


@pytest.mark.torch
def test_anchor_cadence_is_fit_density_cadence() -> None:
    from flowguides.pyro import fit_density
    from flowguides.spec import FlowSpec

    fit = fit_density(
        _tiny().train, FlowSpec.planar(num_layers=1, dtype="float64"), num_steps=30,
        batch_size=32, progress=False,
    )  # fmt: skip
    assert len(fit.losses["val"]) == sum(BestValidation(30, CHECKPOINT).due(s) for s in range(30))


def test_ode_bench_runs_flow_matching_with_both_couplings() -> None:
    rows = ode_bench.methods(ode_bench.SETTINGS["quick"])
    fm = [
        (name, coupling, steps)
        for name, _, obj, coupling, steps in rows
        if obj != "maximum_likelihood"
    ]
    budgets = ode_bench.SETTINGS["quick"]["fm_steps"]
    assert fm == [("ode-fm", "independent", s) for s in budgets] + [
        ("ode-fm-ot", "ot", s) for s in budgets
    ]
    base = {"backend": "numpyro", "dataset": "checkerboard"}
    results = [
        {**base, "method": "ode-ml-dopri5", "nll": 3.6, "wall_s": 100.0},
        {**base, "method": "ode-fm", "nll": 3.7, "wall_s": 10.0},
        {**base, "method": "ode-fm-ot", "nll": 3.5, "wall_s": 15.0},
    ]
    summary = {s["coupling"]: s for s in ode_bench.summarize(results)}
    assert summary["independent"]["fraction"] is None and not summary["independent"]["goal_met"]
    assert summary["ot"]["fraction"] == pytest.approx(0.15) and summary["ot"]["goal_met"]


@pytest.mark.parametrize(
    ("method", "steps", "batch"),
    [
        ("flowguides-numpyro RealNVP (fit_density defaults)", 7, 256),
        ("flowguides-numpyro neural ODE (FM at fit_density defaults)", None, 1024),
        ("flowguides-numpyro RealNVP", 7, 64),
    ],
)
def test_defaults_rows_leave_fit_density_its_defaults(monkeypatch, method, steps, batch) -> None:
    """A defaults row passes ``fit_density`` the steps (flow matching: not even those) and
    nothing it tunes, and its row records the settings that the fit ran with; a budget row
    passes the shared budget. The spec leaves RealNVP's orientation to the library."""
    import flowguides.numpyro
    from flowguides.core import DENSITY_LEARNING_RATE

    calls = []

    class Fit:
        objective = "maximum_likelihood"
        losses = {"train": np.zeros(7), "val": np.ones(1)}
        history: dict = {}

        def log_prob(self, x):
            return np.zeros(len(x))

    def fake(data, spec, **kwargs):
        calls.append((spec, kwargs))
        return Fit()

    monkeypatch.setattr(flowguides.numpyro, "fit_density", fake)
    monkeypatch.setattr(densities, "_exact_ode_nll", lambda b, r, t: (np.zeros(len(t)), 1))
    row = densities.evaluate(method, load("iris"), DensityBudget(num_steps=7, batch_size=64))
    ((spec, kwargs),) = calls
    assert kwargs["num_steps"] == steps
    assert row["method_settings"]["batch_size"] == batch
    if "defaults" in method:
        assert not {"batch_size", "learning_rate", "patience"} & set(kwargs)
        assert row["method_settings"]["learning_rate"] == DENSITY_LEARNING_RATE
        assert row["method_settings"]["num_steps"] == (steps or 20000)
    if spec.layers[0].type == "realnvp":
        assert spec.layers[0].orientation == "auto"
