"""RealNVP affine couplings (Dinh et al., 2016) as a Pyro `TransformModule`.

One module holds the `repeat` stacked couplings of a
[`RealNVPSpec`][flowguides.spec.RealNVPSpec] and the permutations between them.

The public names match `flowguides.numpyro.coupling` except framework-only helpers: here the
torch module `StackedLinear`; there the functional `dense_init`, `init_realnvp` and `mlp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flowguides.pyro._base import FlowLayerTransform
from flowguides.spec import RealNVPSpec

__all__ = ["ACTIVATIONS", "RealNVP", "StackedLinear"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "elu": F.elu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "gelu": F.gelu,  # the exact erf form
    "softplus": F.softplus,
}


class StackedLinear(nn.Module):
    """`repeat` dense layers ``h @ weight[r].T + bias[r]`` stored as ``(R, out, in)``, ``(R, out)``.

    Initialised like torch's ``nn.Linear`` (uniform ``±1/sqrt(in)``), or to zero when `zero`.
    """

    def __init__(
        self,
        repeat: int,
        n_in: int,
        n_out: int,
        *,
        zero: bool = False,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        bound = 0.0 if zero else 1.0 / math.sqrt(n_in)
        shapes = {"weight": (repeat, n_out, n_in), "bias": (repeat, n_out)}
        for name, shape in shapes.items():
            init = (2.0 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1.0) * bound
            self.register_parameter(name, nn.Parameter(init.to(dtype)))

    def forward(self, h: torch.Tensor, r: int) -> torch.Tensor:
        return F.linear(h, self.weight[r], self.bias[r])


class RealNVP(FlowLayerTransform):
    """`repeat` affine couplings with the spec's permutations between consecutive ones.

    Coupling `r` keeps ``z[..., :d1]`` (``d1 = dim // 2``) and maps the rest by
    ``z2 * exp(s) + t`` with ``(t, raw) = MLP_r(z1)`` and ``s = c tanh(raw / c)``
    (``c = scale_clamp``); the MLP's last layer starts at zero, so a new module is the identity.

    Args:
        spec: the layer spec.
        dim: event size (at least 2).
        generator: random source for the hidden layers' initial weights.
        dtype: parameter dtype.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
    """

    def __init__(
        self,
        spec: RealNVPSpec,
        dim: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"dim: a realnvp layer needs dim >= 2, got {dim}")
        self.dim, self.repeat, self.d1 = dim, spec.repeat, dim // 2
        self.scale_clamp = spec.scale_clamp
        self._orient = -1 if spec.orientation == "density" else 1  # 1: sampling z2 * exp(s) + t
        self.activation = ACTIVATIONS[spec.activation]
        sizes = spec.mlp_sizes(dim)
        last = len(sizes) - 2
        self.net = nn.ModuleList(
            StackedLinear(
                spec.repeat, n_in, n_out, zero=j == last, generator=generator, dtype=dtype
            )
            for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        )
        perms = [torch.tensor(p, dtype=torch.long) for p in spec.permutations(dim)]
        self._perms = perms
        self._inverse_perms = [torch.argsort(p) for p in perms]

    def _shift_and_log_scale(self, z1: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = z1
        for j, layer in enumerate(self.net):
            if j:
                h = self.activation(h)
            h = layer(h, r)
        d2 = self.dim - self.d1
        c = self.scale_clamp
        return h[..., :d2], c * torch.tanh(h[..., d2:] / c)

    def _affine(self, z: torch.Tensor, r: int, sign: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupling `r`'s ``(z, log|det|)``: ``z2 * exp(s) + t`` (`sign` 1) or its inverse."""
        z1, z2 = z[..., : self.d1], z[..., self.d1 :]
        t, s = self._shift_and_log_scale(z1, r)
        z2 = z2 * torch.exp(s) + t if sign > 0 else (z2 - t) * torch.exp(-s)
        return torch.cat([z1, z2], dim=-1), sign * s.sum(-1)

    def forward_and_log_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dz|)`` for `z` of shape ``(..., dim)``."""
        ladj = z.new_zeros(z.shape[:-1])
        for r in range(self.repeat):
            z, step = self._affine(z, r, self._orient)
            ladj = ladj + step
            if r < self.repeat - 1:
                z = z[..., self._perms[r]]
        return z, ladj

    def inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det dz/dy|)`` for `y` of shape ``(..., dim)``."""
        ladj = y.new_zeros(y.shape[:-1])
        for r in reversed(range(self.repeat)):
            if r < self.repeat - 1:
                y = y[..., self._inverse_perms[r]]
            y, step = self._affine(y, r, -self._orient)
            ladj = ladj + step
        return y, ladj
