"""The neural-ODE transform: round trip, log-det, trace estimators, adjoint, solver errors."""

from __future__ import annotations

import pytest
import torch

from flowguides.pyro.ode import MaxStepsExceededError, NeuralODE
from flowguides.spec import NeuralODESpec, SpecError

DIM = 3
TIGHT = {"solver": "dopri5", "rtol": 1e-10, "atol": 1e-10, "hidden": (8,)}


def make(**fields) -> NeuralODE:
    spec = NeuralODESpec(**{**TIGHT, **fields})
    return NeuralODE(spec, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture
def ode(checks) -> NeuralODE:
    transform = make()
    checks.randomize(transform)
    return transform


def test_round_trip(ode, checks):
    x_err, ladj_err = checks.round_trip_error(ode, torch.randn(20, DIM, dtype=torch.float64))
    assert x_err < 1e-7 and ladj_err < 1e-7


def test_log_det_matches_autograd_jacobian(ode, checks):
    assert checks.jacobian_error(ode, torch.randn(2, DIM, dtype=torch.float64)) < 1e-7


def test_fused_and_separate_methods_agree(ode, checks):
    checks.fused_matches_separate(ode, torch.randn(4, DIM, dtype=torch.float64))


def test_gradients_reach_every_parameter(checks):
    transform = make(solver="rk4", num_steps=2, hidden=(4,))
    checks.randomize(transform)
    checks.gradients_reach_every_parameter(transform, torch.randn(3, DIM, dtype=torch.float64))


def test_batch_shapes(checks):
    transform = make(solver="euler", num_steps=2, hidden=(4,))
    checks.randomize(transform)
    checks.batch_shapes_work(transform, DIM)


def test_identity_at_initialisation(checks):
    checks.is_identity(make(), DIM)


def test_hutchinson_is_unbiased_for_the_exact_trace(checks):
    """The noise is fixed per solve and per row; its average recovers the exact log-det."""
    exact = make(solver="rk4", num_steps=4)
    checks.randomize(exact)
    for noise in ("rademacher", "gaussian"):
        hutch = make(solver="rk4", num_steps=4, trace="hutchinson", noise=noise)
        hutch.load_state_dict(exact.state_dict())
        x = torch.randn(DIM, dtype=torch.float64).expand(4000, DIM)
        with torch.no_grad():
            y_exact, ladj_exact = exact.forward_and_log_det(x[:1])
            y, ladj = hutch.forward_and_log_det(x)
        torch.testing.assert_close(y, y_exact.expand_as(y))
        assert ladj.std() > 0  # really stochastic
        assert abs(float(ladj.mean() - ladj_exact[0])) < 4 * float(ladj.std()) / 4000**0.5


def test_adjoint_gives_the_same_gradients(checks):
    x = torch.randn(3, DIM, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        transform = make(adjoint=adjoint, hidden=(4,))
        checks.randomize(transform)
        y, ladj = transform.forward_and_log_det(x)
        ((y**2).sum() + ladj.sum()).backward()
        grads.append([p.grad.clone() for p in transform.parameters()])
    for plain, adjoint in zip(*grads, strict=True):
        torch.testing.assert_close(plain, adjoint, rtol=1e-6, atol=1e-8)


def test_fixed_step_solvers_use_num_steps(checks):
    """Euler with one step is a single explicit step ``z + t1 f(z, 0)``."""
    transform = make(solver="euler", num_steps=1, t1=0.5)
    checks.randomize(transform)
    z = torch.randn(4, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, _ = transform.forward_and_log_det(z)
        expected = z + 0.5 * transform.field(z, torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(y, expected)


def test_too_many_steps_raise_a_clear_error(checks):
    transform = make(max_steps=2, rtol=1e-12, atol=1e-12)
    checks.randomize(transform, scale=2.0)
    with pytest.raises(MaxStepsExceededError, match="max_steps=2"):
        transform.forward_and_log_det(torch.randn(3, DIM, dtype=torch.float64))


def test_tsit5_names_the_field_and_suggests_dopri5():
    with pytest.raises(SpecError, match="solver: 'tsit5'.*dopri5"):
        make(solver="tsit5")


def test_parameters_follow_the_spec_layout():
    spec = NeuralODESpec(hidden=(8, 6))
    transform = NeuralODE(spec, DIM)
    shapes = {f"layers.0.{k}": tuple(p.shape) for k, p in transform.named_parameters()}
    assert shapes == dict(spec.parameter_shapes(DIM, "layers.0"))
