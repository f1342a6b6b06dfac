"""The framework-free rules in `flowguides.core`: defaults, warnings and shared checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.core import (
    DEFAULT_LEARNING_RATE,
    DENSITY_PATIENCE,
    FitBelowStartWarning,
    check_data,
    check_weights,
    default_learning_rate,
    density_budget,
    density_patience,
    warn_if_below_start,
)


def test_default_learning_rate_falls_as_one_over_dim_above_the_reference() -> None:
    assert default_learning_rate(2) == DEFAULT_LEARNING_RATE
    assert default_learning_rate(1000) == DEFAULT_LEARNING_RATE
    assert default_learning_rate(2000) == pytest.approx(DEFAULT_LEARNING_RATE / 2)
    assert default_learning_rate(10_000) == pytest.approx(DEFAULT_LEARNING_RATE / 10)


def test_density_patience_defaults_per_objective_and_checks_its_value() -> None:
    assert density_patience(None, "maximum_likelihood", 2000) == DENSITY_PATIENCE == 500
    assert density_patience(None, "flow_matching", 12_000) == 12_000  # no early stop
    assert density_patience(7, "flow_matching", 12_000) == 7
    for bad in (0, -3, 2.5, True, "500"):
        with pytest.raises(ValueError, match=f"patience: expected .* got {bad!r}"):
            density_patience(bad, "maximum_likelihood", 100)


def test_density_budget_defaults_per_objective_and_checks_the_batch_size() -> None:
    # flow matching: more and larger steps (it solves nothing); what is given is kept
    assert density_budget(None, None, "maximum_likelihood") == (2000, 256)
    assert density_budget(None, None, "flow_matching") == (20_000, 1024)
    assert density_budget(None, None, "flow_matching", "ot") == (20_000, 256)  # cubic cost
    assert density_budget(300, 64, "flow_matching") == (300, 64)
    assert density_budget(None, 32, "maximum_likelihood") == (2000, 32)
    for bad in (0, -1, 2.5, True, "256"):
        with pytest.raises(
            ValueError, match=f"batch_size: expected a positive integer, got {bad!r}"
        ):
            density_budget(10, bad, "maximum_likelihood")


def _losses(start: float, end: float, n: int = 400, noise: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.linspace(start, end, n) + noise * rng.standard_normal(n)


def test_a_fit_that_ends_above_its_start_warns() -> None:
    with pytest.warns(FitBelowStartWarning, match="lower learning_rate \\(was 0.01\\)"):
        assert warn_if_below_start(_losses(100.0, 140.0), 0.01)


@pytest.mark.parametrize("end", [60.0, 100.0], ids=["improving", "flat"])
def test_an_improving_or_flat_fit_does_not_warn(end: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_below_start(_losses(100.0, end, noise=5.0), 0.01)


def test_short_fits_are_not_judged() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_below_start(np.arange(30.0), 0.01)


def test_weight_checks_name_the_parameter_and_shapes() -> None:
    spec = FlowSpec.planar(num_layers=1)
    shapes = spec.parameter_shapes(3)
    weights = {k: np.zeros(v) for k, v in shapes.items()}
    check_weights(spec, 3, weights)
    name = next(iter(shapes))
    with pytest.raises(ValueError, match=rf"missing parameter\(s\) \['{name}'\]"):
        check_weights(spec, 3, {k: v for k, v in weights.items() if k != name})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['extra'\]"):
        check_weights(spec, 3, {**weights, "extra": np.zeros(1)})
    bad = {**weights, name: np.zeros((7,))}
    with pytest.raises(ValueError, match=rf"parameter '{name}': expected shape .*, got \(7,\)"):
        check_weights(spec, 3, bad)


def test_coordinate_sites_names_the_owners_in_packing_order() -> None:
    from flowguides.core import coordinate_sites

    sizes = {"mu": 1, "theta": 8, "tau": 1}
    assert coordinate_sites(sizes, [0]) == ["mu"]
    assert coordinate_sites(sizes, [8, 9]) == ["theta", "tau"]
    assert coordinate_sites(sizes, [1, 4, 8]) == ["theta"]
    assert coordinate_sites(sizes, []) == []


def test_flow_matching_validates_about_a_fixed_number_of_times_within_patience() -> None:
    from flowguides.core import (
        FLOW_MATCHING_VALIDATE_EVERY,
        FLOW_MATCHING_VALIDATIONS,
        VALIDATE_EVERY,
        validate_every,
    )

    short = FLOW_MATCHING_VALIDATE_EVERY * FLOW_MATCHING_VALIDATIONS
    assert validate_every("maximum_likelihood", 20_000, 500) == VALIDATE_EVERY
    assert validate_every("flow_matching", 600, 600) == FLOW_MATCHING_VALIDATE_EVERY
    assert validate_every("flow_matching", short, short) == FLOW_MATCHING_VALIDATE_EVERY
    every = validate_every("flow_matching", 20_000, 20_000)
    assert every == -(-20_000 // FLOW_MATCHING_VALIDATIONS) > FLOW_MATCHING_VALIDATE_EVERY
    assert 20_000 / every == pytest.approx(FLOW_MATCHING_VALIDATIONS, abs=1)
    assert validate_every("flow_matching", 20_000, 250) == 250  # patience still sees one
    assert validate_every("flow_matching", 20_000, 30) == FLOW_MATCHING_VALIDATE_EVERY


def test_check_data_reads_a_tensor_that_requires_grad_and_names_the_fix_for_one_point():
    class GradTensor:  # what a torch tensor with requires_grad does under np.asarray
        def __init__(self, values):
            self.values = np.asarray(values, dtype=float)

        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("Can't call numpy() on Tensor that requires grad")

        def detach(self):
            return self.values

    data = [[0.0, 1.0], [2.0, 3.0]]
    np.testing.assert_array_equal(check_data(GradTensor(data)), data)
    with pytest.raises(ValueError, match=r"got shape \(2,\); for one point use x\[None, :\]"):
        check_data(np.ones(2), name="x", dim=2)
    with pytest.raises(ValueError, match=r"got shape \(5,\); for 1-D data use data\[:, None\]"):
        check_data(np.ones(5))


def test_density_data_with_a_constant_column_or_one_row_is_refused_by_name():
    from flowguides.core import prepare_data

    options = {"validation_fraction": 0.0, "validation_data": None, "standardize": True}
    options.update(seed=0, validation_rows=None)
    data = np.c_[np.arange(6.0), np.full(6, 3.0), np.arange(6.0) ** 2]
    with pytest.raises(ValueError, match=r"column\(s\) \[1\] hold one value each \(1: 3\)"):
        prepare_data(data, **options)
    with pytest.raises(ValueError, match="expected at least 2 rows to fit a density, got 1"):
        prepare_data(data[:1, [0]], **options)
    assert prepare_data(data[:, [0, 2]], **options).dim == 2
