"""One property suite over every flow spec x backend x batch shape (float64).

The table (`tests/conformance/_layers.py`) holds planar, RealNVP (two structures), neural-ODE
(adaptive and fixed-step) and a stacked mixed spec, with and without the final affine. Each
flow is built through the public API of both backends and, with random weights (every weight
``N(0, 0.3^2)``, so no layer sits at the identity), must: invert exactly; report the
log-determinant of its autodiff Jacobian; satisfy ``log q(f(x)) = log N(x) - log|det J_f(x)|``;
agree between fused and separate methods; pass gradients to every parameter in both
directions; survive `flowguides.io.save` / `load`; and give the same numbers in torch and JAX.
Fresh flows are the identity (up to RealNVP's permutations), and a smaller batch gives the
numbers of the leading points of a larger one. JAX flows get the separate-method and
derivative checks at the largest batch shape only (`is_full`: each batch shape of reverse mode
through diffrax is seconds of compilation).

Cases are marked `torch` or `jax` by backend, and each backend is imported only when a case
needs it, so ``-m "not torch"`` runs the JAX half without torch installed.
"""

from __future__ import annotations

import numpy as np
import pytest

import flowguides.io
from tests.conformance._layers import (
    BATCH_SHAPES,
    CASES,
    driver,
    initial_image,
    is_full,
    leading_points,
    random_report,
    random_weights,
    report,
    standard_normal_log_prob,
)

__all__: list[str] = []

_MARKS = {"pyro": pytest.mark.torch, "numpyro": pytest.mark.jax}


def _batch_id(batch: tuple[int, ...]) -> str:
    return "x".join(map(str, batch)) or "scalar"


def _param(name: str, backend: str, batch: tuple[int, ...]) -> object:
    case_id = f"{name}-{backend}-{_batch_id(batch)}"
    return pytest.param(name, backend, batch, marks=_MARKS[backend], id=case_id)


COMBINATIONS = [(n, b, s) for n in CASES for b in _MARKS for s in BATCH_SHAPES]
every_combination = pytest.mark.parametrize(
    ("name", "backend", "batch"), [_param(*c) for c in COMBINATIONS]
)
full_combinations = pytest.mark.parametrize(
    ("name", "backend", "batch"), [_param(*c) for c in COMBINATIONS if is_full(*c[1:])]
)


def _close(actual: np.ndarray, expected: np.ndarray, tol: float, what: str) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol, err_msg=what)


@every_combination
def test_round_trip_and_shapes(name: str, backend: str, batch: tuple[int, ...]) -> None:
    """``inverse(forward(x)) == x`` and ``ladj_fwd + ladj_inv == 0``, with the batch shape kept."""
    r, tol = random_report(name, backend, batch), CASES[name].tol
    x = r["x"]
    assert r["y"].shape == x.shape and r["x_back"].shape == x.shape
    assert r["ladj"].shape == batch and r["ladj_inv"].shape == batch
    assert np.abs(r["y"] - x).max() > 1e-2  # the random weights move every point
    _close(r["x_back"], x, tol, "inverse(forward(x)) != x")
    _close(r["ladj"] + r["ladj_inv"], np.zeros(batch), tol, "ladj_fwd + ladj_inv != 0")


@full_combinations
def test_log_det_matches_autodiff_jacobian(name: str, backend: str, batch: tuple[int, ...]) -> None:
    """The forward log-det is ``log|det J|`` of the autodiff Jacobian at every point."""
    r = random_report(name, backend, batch)
    assert r["logdet_autodiff"].shape == batch
    assert np.abs(r["ladj"]).max() > 1e-2  # far from volume-preserving
    _close(r["ladj"], r["logdet_autodiff"], CASES[name].tol, "ladj != log|det J|")


@every_combination
def test_log_prob_is_the_change_of_variables(
    name: str, backend: str, batch: tuple[int, ...]
) -> None:
    """``log q(y) = log N(x) - ladj`` at ``y = f(x)``, by `Flow.log_prob`'s inverse pass."""
    r = random_report(name, backend, batch)
    assert r["log_prob"].shape == batch
    expected = standard_normal_log_prob(r["x"]) - r["ladj"]
    _close(r["log_prob"], expected, CASES[name].tol, "log_prob(f(x)) != log N(x) - ladj")


@full_combinations
def test_fused_and_separate_methods_agree(name: str, backend: str, batch: tuple[int, ...]) -> None:
    """The transforms' ``t(x)``, ``log_abs_det_jacobian`` and ``t.inv(y)`` return what the
    fused passes do (the same computation: no tolerance needed); so does the Pyro flow's own
    `FlowDistribution` (NumPyro's `Flow.distribution()` is numpyro's TransformedDistribution
    over the transform, built only of the methods checked here)."""
    r = random_report(name, backend, batch)
    _close(r["y_separate"], r["y"], 1e-12, "t(x)")
    _close(r["ladj_separate"], r["ladj"], 1e-12, "log_abs_det_jacobian")
    _close(r["x_separate"], r["x_back"], 1e-12, "t.inv(y)")
    if backend == "pyro":
        _close(r["dist_log_prob"], r["log_prob"], 1e-12, "distribution().log_prob")


@full_combinations
def test_gradients_reach_every_parameter(name: str, backend: str, batch: tuple[int, ...]) -> None:
    """A loss of the forward pass, and one of the inverse pass, give every parameter a finite,
    nonzero gradient; the flow's parameters are exactly the spec's."""
    case = CASES[name]
    grads = random_report(name, backend, batch)["grads"]
    for direction in ("forward", "inverse"):
        assert sorted(grads[direction]) == sorted(case.spec.parameter_shapes(case.dim))
        for param, grad in grads[direction].items():
            where = f"{direction} pass, parameter {param!r}"
            assert grad is not None, f"{where}: no gradient"
            assert np.all(np.isfinite(grad)), f"{where}: non-finite gradient"
            assert np.any(grad != 0), f"{where}: zero gradient"


@pytest.mark.parametrize("backend", [pytest.param(b, marks=m) for b, m in _MARKS.items()])
@pytest.mark.parametrize("name", list(CASES))
def test_smaller_batches_hold_the_leading_points(name: str, backend: str) -> None:
    """Each batch shape gives the same numbers for the same points (up to an adaptive solve's
    tolerance: the whole batch is one ODE state, so its step sizes depend on the batch)."""
    largest = random_report(name, backend, BATCH_SHAPES[-1])
    for batch in BATCH_SHAPES[:-1]:
        r = random_report(name, backend, batch)
        for key, event in (("y", 1), ("x_back", 1), ("ladj", 0), ("log_prob", 0)):
            expected = leading_points(largest[key], batch, event)
            _close(r[key], expected, CASES[name].tol, f"{key} at batch shape {batch}")


@pytest.mark.jax
@pytest.mark.parametrize("name", ["planar", "mixed"])
def test_jit_and_eager_agree(name: str) -> None:
    """The JAX flow gives the same numbers outside `jax.jit` as inside it (two specs that
    between them hold every layer type and both bases)."""
    case, batch = CASES[name], BATCH_SHAPES[-1]
    jitted = random_report(name, "numpyro", batch)
    flow = driver("numpyro").build(case, random_weights(case.spec, case.dim))
    y, ladj = driver("numpyro").eager_forward(flow, jitted["x"])
    _close(y, jitted["y"], 1e-12, "eager forward")
    _close(ladj, jitted["ladj"], 1e-12, "eager log-det")


@every_combination
def test_identity_at_initialisation(name: str, backend: str, batch: tuple[int, ...]) -> None:
    """A fresh flow moves no point (RealNVP's permutations aside) and has log-det 0."""
    case = CASES[name]
    r = report(name, backend, batch, driver(backend).build(case))
    _close(r["y"], initial_image(case.spec, r["x"]), 1e-12, "fresh forward(x)")
    _close(r["ladj"], np.zeros(batch), 1e-12, "fresh log-det")
    _close(r["log_prob"], standard_normal_log_prob(r["x"]), 1e-12, "fresh log_prob")


@every_combination
def test_save_load_round_trip(name: str, backend: str, batch: tuple[int, ...], tmp_path) -> None:
    """get_weights returns what set_weights took; a saved and reloaded flow holds the same
    weights and gives the same outputs and densities."""
    case, drv = CASES[name], driver(backend)
    weights = random_weights(case.spec, case.dim)
    flow = drv.build(case, weights)
    got = drv.get_weights(flow)
    assert list(got) == list(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    loaded = flowguides.io.load(flowguides.io.save(flow, tmp_path / "flow"), backend=backend)
    for key, value in drv.get_weights(loaded).items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)
    original, again = random_report(name, backend, batch), report(name, backend, batch, loaded)
    _close(again["y"], original["y"], 1e-12, "forward after load")
    _close(again["log_prob"], original["log_prob"], 1e-12, "log_prob after load")


@pytest.mark.torch
@pytest.mark.jax
@pytest.mark.parametrize("batch", BATCH_SHAPES, ids=_batch_id)
@pytest.mark.parametrize("name", list(CASES))
def test_same_weights_same_numbers_in_both_backends(
    name: str, batch: tuple[int, ...], tmp_path
) -> None:
    """The same spec and random weights give the same outputs and densities (and gradients,
    where the JAX report has them) in torch and JAX; a flow saved from torch loads into JAX
    with the same density."""
    tol = CASES[name].tol
    torch_r = random_report(name, "pyro", batch)
    jax_r = random_report(name, "numpyro", batch)
    for key in ("y", "ladj", "x_back", "log_prob"):
        _close(jax_r[key], torch_r[key], tol, key)
    if is_full("numpyro", batch):
        for direction in ("forward", "inverse"):
            for param, grad in torch_r["grads"][direction].items():
                what = f"{direction} gradient of {param}"
                _close(jax_r["grads"][direction][param], grad, tol, what)
    case = CASES[name]
    torch_flow = driver("pyro").build(case, random_weights(case.spec, case.dim))
    folder = flowguides.io.save(torch_flow, tmp_path / "from_torch")
    moved = report(name, "numpyro", batch, flowguides.io.load(folder, backend="numpyro"))
    _close(moved["log_prob"], torch_r["log_prob"], tol, "log_prob after torch -> JAX")
