"""Shared pieces of the Pyro-backend tests: the property checks every transform must pass."""

from __future__ import annotations

from types import SimpleNamespace

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Each test starts with an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def randomize(module: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Overwrite every parameter with N(0, scale^2) draws (so no layer is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def round_trip_error(transform, x: torch.Tensor) -> tuple[float, float]:
    """``max |inverse(forward(x)) - x|`` and ``max |ladj_fwd + ladj_inv|``."""
    with torch.no_grad():
        y, ladj = transform.forward_and_log_det(x)
        x2, ladj_inv = transform.inverse_and_log_det(y)
    return float((x2 - x).abs().max()), float((ladj + ladj_inv).abs().max())


def jacobian_error(transform, x: torch.Tensor) -> float:
    """``max |ladj - slogdet(autograd Jacobian)|`` over the rows of `x` ``(n, dim)``."""
    errors = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: transform.forward_and_log_det(v)[0], row)
        expected = torch.linalg.slogdet(jac)[1]
        errors.append(float((transform.forward_and_log_det(row)[1] - expected).abs().detach()))
    return max(errors)


def fused_matches_separate(transform, x: torch.Tensor) -> None:
    """`_call`, `_inverse`, `log_abs_det_jacobian` and Pyro's `t(x)`/`t.inv(y)` agree."""
    y, ladj = transform.forward_and_log_det(x)
    x2, ladj_inv = transform.inverse_and_log_det(y)
    torch.testing.assert_close(transform(x), y)
    torch.testing.assert_close(transform._call(x), y)
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y), ladj)
    torch.testing.assert_close(transform.inv(y), x2)
    torch.testing.assert_close(transform._inverse(y), x2)


def gradients_reach_every_parameter(transform, x: torch.Tensor) -> None:
    """A loss of the forward and of the inverse pass gives every parameter a nonzero grad."""
    for direction in ("forward_and_log_det", "inverse_and_log_det"):
        transform.zero_grad()
        out, ladj = getattr(transform, direction)(x)
        ((out**2).sum() + ladj.sum()).backward()
        for name, p in transform.named_parameters():
            assert p.grad is not None, f"{direction}: no gradient for {name}"
            assert float(p.grad.abs().sum()) > 0, f"{direction}: zero gradient for {name}"


def batch_shapes_work(transform, dim: int) -> None:
    for batch in [(), (3,), (2, 4)]:
        x = torch.randn(*batch, dim, dtype=torch.float64)
        y, ladj = transform.forward_and_log_det(x)
        z, ladj_inv = transform.inverse_and_log_det(y)
        assert y.shape == x.shape and z.shape == x.shape
        assert ladj.shape == batch and ladj_inv.shape == batch


def is_identity(transform, dim: int) -> None:
    x = torch.randn(5, dim, dtype=torch.float64)
    y, ladj = transform.forward_and_log_det(x)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.fixture
def checks() -> SimpleNamespace:
    """The transform property checks, as one namespace."""
    return SimpleNamespace(
        randomize=randomize,
        round_trip_error=round_trip_error,
        jacobian_error=jacobian_error,
        fused_matches_separate=fused_matches_separate,
        gradients_reach_every_parameter=gradients_reach_every_parameter,
        batch_shapes_work=batch_shapes_work,
        is_identity=is_identity,
    )
