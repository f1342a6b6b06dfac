"""The base every flowguides torch transform shares: Pyro plumbing from fused primitives.

A subclass implements `forward_and_log_det` and `inverse_and_log_det` (each returns the
output and ``log|det|`` of that direction, summed over the event dimension); this class
derives Pyro's `_call`, `_inverse` and `log_abs_det_jacobian` from them and declares the
bijection of ``R^dim`` (no cache: a parameter update must never meet a stale value).

The public names match `flowguides.numpyro._base` except numpyro's `InitRandom`,
`as_init_random` and `batched_dot`: a torch layer draws its initial weights from a
`torch.Generator` and holds them itself, so it needs no separate initialiser.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule

__all__ = ["FlowLayerTransform"]


class FlowLayerTransform(TransformModule):
    """A bijection of ``R^dim`` defined by its fused forward and inverse passes."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self) -> None:
        super().__init__(cache_size=0)

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_log_det(x)[0]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.inverse_and_log_det(y)[0]

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_and_log_det(x)[1]
