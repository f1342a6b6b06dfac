"""The planar transform: exact inverse, log-det, gradients, shapes, identity at init."""

from __future__ import annotations

import pytest
import torch

from flowguides.pyro.planar import Planar

DIM = 3


@pytest.fixture
def planar(checks) -> Planar:
    transform = Planar(
        DIM, repeat=3, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    checks.randomize(transform, scale=1.0)
    return transform


def test_round_trip_near_the_invertibility_limit(checks):
    """``u_hat.w`` close to -1 makes the scalar equation nearly flat: still exact."""
    planar = Planar(DIM, repeat=2, dtype=torch.float64)
    with torch.no_grad():
        planar.w.copy_(torch.tensor([[1.0, 0.5, -0.5], [0.3, -2.0, 1.0]], dtype=torch.float64))
        planar.u.copy_(-20.0 * planar.w)  # w.u very negative: softplus(w.u) - 1 ~ -1
        planar.b.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    x = torch.randn(500, DIM, dtype=torch.float64) * 5
    x_err, ladj_err = checks.round_trip_error(planar, x)
    assert x_err < 1e-10 and ladj_err < 1e-8


def test_inverse_gradient_matches_finite_differences(planar):
    """The implicit-function gradient of the Newton solve is the true derivative."""
    y = torch.randn(4, DIM, dtype=torch.float64)

    def f(b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            planar.b.copy_(b)
        return planar.inverse_and_log_det(y)[0].sum() + planar.inverse_and_log_det(y)[1].sum()

    b0 = planar.b.detach().clone()
    planar.zero_grad()
    f(b0).backward()
    analytic = planar.b.grad.clone()
    h = 1e-6
    numeric = torch.stack(
        [(f(b0 + h * e) - f(b0 - h * e)) / (2 * h) for e in torch.eye(3, dtype=torch.float64)]
    )
    torch.testing.assert_close(analytic, numeric.detach(), rtol=1e-6, atol=1e-7)
