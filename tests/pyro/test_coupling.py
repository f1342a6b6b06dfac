"""The RealNVP coupling transform: round trip, log-det, gradients, shapes, identity at init."""

from __future__ import annotations

import pytest
import torch

from flowguides.pyro.coupling import RealNVP
from flowguides.spec import RealNVPSpec

DIM = 5


def make(seed: int = 1, **fields) -> RealNVP:
    spec = RealNVPSpec(**{"repeat": 3, "hidden": (8, 8), **fields})
    return RealNVP(spec, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(params=["relu", "tanh", "elu", "leaky_relu", "gelu"])
def coupling(request, checks) -> RealNVP:
    transform = make(activation=request.param, permutation="random")
    checks.randomize(transform)
    return transform


def test_log_scale_is_soft_clamped(checks):
    """Huge conditioner outputs still give ``|s| <= scale_clamp`` per coordinate."""
    transform = make(scale_clamp=0.5, repeat=1)
    checks.randomize(transform, scale=50.0)
    with torch.no_grad():
        _, ladj = transform.forward_and_log_det(torch.randn(100, DIM, dtype=torch.float64))
    assert float(ladj.abs().max()) <= 0.5 * (DIM - DIM // 2) + 1e-12


def test_needs_two_dimensions():
    with pytest.raises(ValueError, match="dim >= 2, got 1"):
        RealNVP(RealNVPSpec(), 1)
