"""The neural-ODE transform: round trip, log-det, trace estimators, adjoint, solver errors,
analytic fields, RNODE regularisers, STEER, NFE counts, flow matching, tolerances."""

from __future__ import annotations

import pytest
import torch

from flowguides.core import MaxStepsExceededError, ToleranceWarning
from flowguides.pyro import build_flow
from flowguides.pyro.ode import NeuralODE, flow_matching_loss, in_training_solves, training_solves
from flowguides.spec import FlowSpec, NeuralODESpec, SpecError

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


def test_adjoint_reaches_an_input_that_carries_gradients(checks):
    """Behind an affine base the solve's input needs gradients too: the adjoint's forward
    solve must not try to differentiate through it (it once raised), and the gradients of
    the flow's parameters agree with direct backpropagation."""
    x = torch.randn(4, DIM, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        spec = FlowSpec.neural_ode(**{**TIGHT, "hidden": [4], "adjoint": adjoint}, dtype="float64")
        flow = build_flow(spec, DIM)
        checks.randomize(flow)
        (-flow.log_prob(x).mean()).backward()
        grads.append([p.grad.clone() for p in flow.parameters()])
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


# -- analytic vector fields, regularisers, STEER, NFE, tolerances ----------------------------
def analytic(weight=None, bias=None, gate_bias=0.0, dim=DIM, **fields) -> NeuralODE:
    """A one-layer field ``f = (weight z + bias) * sigmoid(gate_bias)`` (time terms zero)."""
    spec = NeuralODESpec(**{**TIGHT, "hidden": (), **fields})
    transform = NeuralODE(spec, dim, dtype=torch.float64)
    layer = transform.net[0]
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.gate_bias.fill_(gate_bias)
        if weight is not None:
            layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return transform


def test_constant_field_shifts_with_zero_log_det_and_closed_form_regularisers():
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    transform = analytic(bias=v, t1=1.5)  # f = sigmoid(0) v = v / 2
    z = torch.randn(4, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, ladj, reg = transform.solve(z)
        z_back, ladj_back, reg_back = transform.solve(y, inverse=True)
    torch.testing.assert_close(y, z + 0.75 * v)
    torch.testing.assert_close(ladj, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    kinetic = torch.full((4,), 1.5 * float((0.5 * v).pow(2).sum()), dtype=torch.float64)
    for r in (reg, reg_back):  # a backwards solve reports the same (positive) integrals
        torch.testing.assert_close(r["kinetic"], kinetic)
        torch.testing.assert_close(r["jacobian"], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(z_back, z)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_linear_field_log_det_trajectory_and_regularisers(trace):
    """``f = s W z`` with ``s = sigmoid(g)``: ``y = expm(t1 s W) z``, log-det ``t1 s tr(W)``,
    kinetic energy ``∫ |s W z(t)|² dt`` (checked by Simpson's rule on the exact trajectory) and
    Jacobian term ``t1 s² |W|_F²``; Hutchinson's estimates average to the same values."""
    gen = torch.Generator().manual_seed(3)
    weight = 0.7 * torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
    g, t1 = 0.4, 0.8
    s = torch.sigmoid(torch.tensor(g, dtype=torch.float64))
    transform = analytic(weight=weight, gate_bias=g, t1=t1, trace=trace)
    z = torch.randn(2, DIM, generator=gen, dtype=torch.float64)
    z = z.repeat(2000, 1) if trace == "hutchinson" else z
    with torch.no_grad():
        y, ladj, reg = transform.solve(z)
    a = s * weight
    torch.testing.assert_close(y, z @ torch.linalg.matrix_exp(t1 * a).T)
    times = torch.linspace(0.0, t1, 2001, dtype=torch.float64)
    path = torch.einsum("kij,nj->kni", torch.linalg.matrix_exp(times[:, None, None] * a), z[:2])
    speed = (path @ a.T).pow(2).sum(-1)  # (time, point)
    simpson = torch.ones(2001, dtype=torch.float64)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    kinetic = (simpson[:, None] * speed).sum(0) * (t1 / 2000) / 3
    torch.testing.assert_close(reg["kinetic"], kinetic.repeat(len(z) // 2), rtol=1e-8, atol=0)
    log_det, frobenius = t1 * a.trace(), t1 * a.pow(2).sum()
    if trace == "exact":
        torch.testing.assert_close(ladj, log_det.expand(2))
        torch.testing.assert_close(reg["jacobian"], frobenius.expand(2))
    else:  # the noise is fixed per solve and row, so each row is one probe
        for estimate, target in ((ladj, log_det), (reg["jacobian"], frobenius)):
            assert estimate.std() > 0
            assert abs(float(estimate.mean() - target)) < 4 * float(estimate.std()) / 4000**0.5


def test_regularisers_vanish_for_the_zero_field_and_not_otherwise(ode):
    z = torch.randn(5, DIM, dtype=torch.float64)
    with torch.no_grad():
        _, _, reg = make().solve(z)  # the identity at initialisation: f = 0
        _, _, reg_random = ode.solve(z)
    for name in ("kinetic", "jacobian"):
        torch.testing.assert_close(reg[name], torch.zeros(5, dtype=torch.float64))
        assert (reg_random[name] > 0).all()


def test_hutchinson_is_unbiased_for_the_exact_trace(checks):
    """The noise is fixed per solve and per row; its average recovers the exact log-det and the
    exact Jacobian Frobenius integral, while the trajectory and kinetic energy are exact."""
    exact = make(solver="rk4", num_steps=4)
    checks.randomize(exact)
    with torch.no_grad():
        x = torch.randn(DIM, dtype=torch.float64).expand(4000, DIM)
        y_exact, ladj_exact, reg_exact = exact.solve(x[:1])
    for noise in ("rademacher", "gaussian"):
        hutch = make(solver="rk4", num_steps=4, trace="hutchinson", noise=noise)
        hutch.load_state_dict(exact.state_dict())
        with torch.no_grad():
            y, ladj, reg = hutch.solve(x)
        torch.testing.assert_close(y, y_exact.expand_as(y))
        torch.testing.assert_close(reg["kinetic"], reg_exact["kinetic"].expand(4000))
        for estimate, target in ((ladj, ladj_exact), (reg["jacobian"], reg_exact["jacobian"])):
            assert estimate.std() > 0  # really stochastic
            assert abs(float(estimate.mean() - target[0])) < 4 * float(estimate.std()) / 4000**0.5


def test_training_solves_record_the_weighted_penalty_only_when_asked(ode):
    z = torch.randn(3, DIM, dtype=torch.float64)
    with torch.no_grad(), training_solves() as records:
        y, ladj = ode.forward_and_log_det(z)
    assert len(records) == 1 and "penalty" not in records[0]  # weights 0: no extra states
    weighted = make(kinetic_weight=0.3, jacobian_weight=2.0)
    weighted.load_state_dict(ode.state_dict())
    with torch.no_grad():
        _, _, reg = weighted.solve(z)
        with training_solves() as records:
            y_train, ladj_train = weighted.forward_and_log_det(z)
    assert len(records) == 1
    torch.testing.assert_close(records[0]["penalty"], 0.3 * reg["kinetic"] + 2.0 * reg["jacobian"])
    torch.testing.assert_close(y_train, y)
    torch.testing.assert_close(ladj_train, ladj)
    assert not in_training_solves()  # evaluation again after the block


@pytest.mark.parametrize("adjoint", [False, True])
def test_training_solves_record_nfe_and_backward_like_numpyro(adjoint, checks):
    """One record per solve: its forward evaluations (rk4: 4 per step), whether a backward
    pass repeats them (not under the adjoint), and the penalty, which carries gradients."""
    spec = FlowSpec.neural_ode(
        hidden=[4], solver="rk4", num_steps=3, adjoint=adjoint, kinetic_weight=0.5, dtype="float64"
    )
    flow = build_flow(spec, DIM)
    checks.randomize(flow.layers[0])
    x = torch.randn(4, DIM, dtype=torch.float64)
    with training_solves() as records:
        loss = -flow.log_prob(x).mean()
        _, log_q = flow.sample_and_log_prob((2,))
    assert [r["nfe"] for r in records] == [12, 12]
    assert [r["backward"] for r in records] == [not adjoint] * 2
    assert records[0]["penalty"].shape == (4,) and records[1]["penalty"].shape == (2,)
    assert all(bool((r["penalty"] > 0).all()) for r in records)
    penalty = sum(r["penalty"].mean() for r in records if "penalty" in r)
    (loss + penalty).backward()
    assert float(flow.layers[0].net[0].weight.grad.abs().sum()) > 0


def test_training_solves_nest_and_record_in_the_innermost_block():
    ode = make(solver="euler", num_steps=2)
    z = torch.randn(2, DIM, dtype=torch.float64)
    with torch.no_grad(), training_solves() as outer:
        ode.forward_and_log_det(z)
        with training_solves() as inner:
            ode.forward_and_log_det(z)
            ode.inverse_and_log_det(z)
        assert in_training_solves()
    assert len(outer) == 1 and len(inner) == 2
    assert [r["nfe"] for r in outer + inner] == [2, 2, 2]
    flow_matching_loss(ode, z, z, torch.rand(2, dtype=torch.float64), 0.0)  # outside: no record
    with training_solves() as records:
        flow_matching_loss(ode, z, z, torch.rand(2, dtype=torch.float64), 0.0)
    assert records == [{"nfe": 1, "backward": True}]


def test_steer_draws_the_training_end_time_and_evaluation_uses_t1():
    v = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    transform = analytic(
        bias=v, t1=2.0, steer=0.5, solver="rk4", num_steps=2
    )  # f = (1, 0, 0): the shift is the time
    z = torch.zeros(1, DIM, dtype=torch.float64)
    with torch.no_grad():
        with training_solves():
            ends = [float(transform.forward_and_log_det(z)[0][0, 0]) for _ in range(20)]
            back = float(transform.inverse_and_log_det(z)[0][0, 0])
        evaluation = [float(transform.forward_and_log_det(z)[0][0, 0]) for _ in range(3)]
    assert all(1.0 <= t <= 3.0 for t in ends) and -3.0 <= back <= -1.0
    assert max(ends) - min(ends) > 0.5
    assert evaluation == pytest.approx([2.0] * 3, abs=1e-9)


@pytest.mark.parametrize("adjoint", [False, True])
def test_nfe_counts_solver_stages_forward_and_backward(adjoint, checks):
    """rk4 with n steps evaluates the field 4n times each way (the adjoint solves backwards on
    the same grid; direct backpropagation goes once through each recorded evaluation)."""
    transform = make(solver="rk4", num_steps=3, adjoint=adjoint, hidden=(4,))
    checks.randomize(transform)
    y, ladj = transform.forward_and_log_det(torch.randn(2, DIM, dtype=torch.float64))
    assert transform.nfe == 12
    ((y**2).sum() + ladj.sum()).backward()
    assert transform.nfe == 24


def test_flow_matching_loss_vanishes_for_the_exact_field():
    """Data = base shifted by d, sigma_min = 0: the target is d everywhere, i.e. ``f = d / t1``."""
    d = torch.tensor([1.0, -1.0, 3.0], dtype=torch.float64)
    transform = analytic(bias=2.0 * d / 0.5, t1=0.5)  # f = sigmoid(0) 4 d = d / t1
    x0 = torch.randn(50, DIM, dtype=torch.float64)
    t = torch.rand(50, dtype=torch.float64)
    loss = flow_matching_loss(transform, x0 + d, x0, t, sigma_min=0.0)
    assert float(loss.detach()) < 1e-24
    wrong = flow_matching_loss(transform, x0 + 2 * d, x0, t, sigma_min=0.0)
    torch.testing.assert_close(wrong, d.pow(2).sum() / 0.25)
    assert transform.nfe == 2


def test_float32_tolerance_warning():
    spec = NeuralODESpec(rtol=1e-8, atol=1e-5)
    with pytest.warns(ToleranceWarning, match="rtol=1e-08.*float64"):
        NeuralODE(spec, DIM)
    NeuralODE(NeuralODESpec(), DIM)  # the float32 default: no warning (warnings are errors)
    NeuralODE(spec, DIM, dtype=torch.float64)
    NeuralODE(NeuralODESpec(solver="rk4", num_steps=2, rtol=1e-9), DIM)  # fixed step: unused
