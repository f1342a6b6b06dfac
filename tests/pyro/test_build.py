"""`build_flow`, the `Flow` object, its distribution, and weights by the spec's names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowguides.pyro import FlowDistribution, build_flow, get_weights, set_weights
from flowguides.spec import FlowSpec, SpecError

SPEC = FlowSpec(
    layers=[
        {"type": "planar", "repeat": 2},
        {"type": "realnvp", "repeat": 2, "hidden": [6], "permutation": "random"},
        {"type": "neural_ode", "hidden": [4], "solver": "rk4", "num_steps": 2},
    ],
    dtype="float64",
)
DIM = 3


def random_weights(flow, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: 0.3 * rng.normal(size=v.shape) for k, v in get_weights(flow).items()}


def test_weights_are_named_and_shaped_by_the_spec():
    weights = get_weights(build_flow(SPEC, DIM))
    expected = SPEC.parameter_shapes(DIM)
    assert list(weights) == list(expected)
    assert {k: v.shape for k, v in weights.items()} == dict(expected)


def test_set_then_get_weights_round_trip_and_reproduce_log_prob():
    source, target = build_flow(SPEC, DIM, seed=1), build_flow(SPEC, DIM, seed=2)
    weights = random_weights(source)
    assert set_weights(source, weights) is source
    set_weights(target, get_weights(source))
    for name, value in get_weights(target).items():
        np.testing.assert_array_equal(value, weights[name])
    x = torch.randn(5, DIM, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(source.log_prob(x), target.log_prob(x), rtol=0, atol=1e-12)


def test_set_weights_works_in_place():
    flow = build_flow(SPEC, DIM)
    tensors = [id(p) for p in flow.parameters()]
    set_weights(flow, random_weights(flow))
    assert [id(p) for p in flow.parameters()] == tensors


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda w: w.pop("affine.loc"), r"missing parameter\(s\) \['affine.loc'\]"),
        (lambda w: w.update(extra=np.zeros(2)), r"unknown parameter\(s\) \['extra'\]"),
        (
            lambda w: w.update({"layers.0.u": np.zeros((2, 4))}),
            r"parameter 'layers.0.u': expected shape \(2, 3\), got \(2, 4\)",
        ),
    ],
)
def test_set_weights_rejects_bad_weights(edit, message):
    flow = build_flow(SPEC, DIM)
    weights = get_weights(flow)
    edit(weights)
    with pytest.raises(ValueError, match=message):
        set_weights(flow, weights)


def test_new_flow_is_the_standard_normal():
    flow = build_flow(SPEC, DIM)
    x = torch.randn(4, DIM, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), expected)


def test_draws_carry_the_log_prob_of_the_inverse_pass():
    flow = build_flow(SPEC, DIM)
    set_weights(flow, random_weights(flow))
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob((6,))
        torch.testing.assert_close(log_q, flow.log_prob(x), rtol=0, atol=1e-6)


def test_sample_and_log_prob_is_reparametrised_and_seeded():
    flow = build_flow(SPEC, DIM)
    set_weights(flow, random_weights(flow))
    x, log_q = flow.sample_and_log_prob((5,), seed=4)
    (x.sum() + log_q.sum()).backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in flow.parameters())
    state = torch.random.get_rng_state()
    again, log_q_again = flow.sample_and_log_prob((5,), seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    torch.testing.assert_close(again, x, rtol=0, atol=0)
    torch.testing.assert_close(log_q_again, log_q, rtol=0, atol=0)
    assert not torch.equal(flow.sample_and_log_prob((5,), seed=5)[0], x)


def test_build_flow_takes_the_dict_form_of_a_spec():
    from_dict = build_flow(SPEC.to_dict(), DIM, seed=3)
    assert from_dict.spec == SPEC
    for name, value in get_weights(build_flow(SPEC, DIM, seed=3)).items():
        np.testing.assert_array_equal(get_weights(from_dict)[name], value)
    with pytest.raises(SpecError, match="layers"):
        build_flow({"layers": [{"type": "nope"}]}, DIM)


def test_log_prob_integrates_to_one_in_one_dimension():
    spec = FlowSpec.planar(num_layers=3, dtype="float64")
    flow = build_flow(spec, 1)
    set_weights(flow, random_weights(flow, seed=3))
    grid = torch.linspace(-15, 15, 20001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        density = flow.log_prob(grid).exp()
    assert abs(float(torch.trapezoid(density, grid[:, 0])) - 1.0) < 1e-6


def test_sample_shapes_and_seed():
    flow = build_flow(SPEC, DIM)
    assert flow.sample().shape == (DIM,)
    assert flow.sample((2, 4)).shape == (2, 4, DIM)
    torch.testing.assert_close(flow.sample((3,), seed=5), flow.sample((3,), seed=5))


def test_distribution_scores_its_own_draw_without_the_inverse(monkeypatch):
    flow = build_flow(SPEC, DIM)
    set_weights(flow, random_weights(flow))
    posterior = FlowDistribution(flow).expand((4,))
    x, log_q = posterior.rsample_and_log_prob()
    assert x.shape == (4, DIM) and posterior.batch_shape == (4,)

    def no_inverse(*_):
        raise AssertionError("the inverse was called")

    monkeypatch.setattr(flow, "inverse_and_log_det", no_inverse)
    assert posterior.log_prob(x) is log_q


def test_distribution_shortcut_does_not_survive_a_parameter_update():
    flow = build_flow(SPEC, DIM)
    set_weights(flow, random_weights(flow))
    posterior = flow.distribution()
    x = posterior.rsample((5,))
    with torch.no_grad():
        flow.affine.loc.add_(1.0)  # what an optimiser step does
        expected = flow.log_prob(x)
    torch.testing.assert_close(posterior.log_prob(x), expected)


def test_affine_base_maps_loc_and_scale():
    spec = FlowSpec.planar(num_layers=1, dtype="float64")
    flow = build_flow(spec, 2)
    weights = get_weights(flow)
    weights["affine.loc"] = np.array([1.0, -2.0])
    weights["affine.log_scale"] = np.log([2.0, 0.5])
    set_weights(flow, weights)
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    expected = torch.distributions.Normal(
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([2.0, 0.5], dtype=torch.float64),
    ).log_prob(x)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), expected.sum(-1))


def test_dtype_follows_the_spec():
    assert build_flow(FlowSpec.planar(num_layers=1), 2).dtype == torch.float32
    assert build_flow(FlowSpec.planar(num_layers=1, dtype="float64"), 2).dtype == torch.float64


def test_spec_errors_name_the_layer():
    with pytest.raises(SpecError, match=r"layers\[0\]: a realnvp layer needs dim >= 2, got dim=1"):
        build_flow(FlowSpec.realnvp(), 1)
    with pytest.raises(SpecError, match=r"layers\[0\]\.solver: 'tsit5'"):
        build_flow(FlowSpec.neural_ode(solver="tsit5"), 2)


@pytest.mark.parametrize("kind", ["full", "diagonal"])
@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_preconditioner_round_trips_and_its_log_det_matches_autograd(batch, kind):
    from flowguides.pyro.build import Precondition

    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    shift = torch.randn(DIM, generator=gen, dtype=f64)
    scales = torch.tensor([0.5, 2.0, 1e-2], dtype=f64)
    tril = torch.randn(DIM, DIM, generator=gen, dtype=f64).tril(-1) + torch.diag(scales)
    if kind == "diagonal":  # a vector of scales: the same map as torch.diag(scales)
        tril = scales
        y = torch.randn(4, DIM, generator=gen, dtype=f64)
        same = Precondition(shift, torch.diag(scales)).forward_and_log_det(y)
        for ours, dense in zip(
            Precondition(shift, scales).forward_and_log_det(y), same, strict=True
        ):
            torch.testing.assert_close(ours, dense)
    spec = SPEC.model_copy(update={"layers": SPEC.layers[:2]})  # exact inverses, no ODE solve
    flow = set_weights(build_flow(spec, DIM), random_weights(build_flow(spec, DIM)))
    flow.precondition = Precondition(shift, tril)
    assert not any(p is flow.precondition.scale_tril for p in flow.parameters())  # fixed
    eps = torch.randn(*batch, DIM, generator=gen, dtype=f64)
    x, ladj = flow.forward_and_log_det(eps)
    back, inv_ladj = flow.inverse_and_log_det(x)
    torch.testing.assert_close(back, eps, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(inv_ladj, -ladj)
    one = eps.reshape(-1, DIM)[0]
    jac = torch.autograd.functional.jacobian(lambda e: flow.forward_and_log_det(e)[0], one)
    torch.testing.assert_close(ladj.reshape(-1)[0], torch.linalg.slogdet(jac)[1])
