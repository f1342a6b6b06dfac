"""Invertible planar layers (Rezende & Mohamed, 2015) as a Pyro `TransformModule`.

One module holds the `repeat` stacked layers of a [`PlanarSpec`][flowguides.spec.PlanarSpec].
Unlike Pyro's own `Planar`, this one has an exact inverse, so it can score points it did not
sample (and fit densities).

The public names match `flowguides.numpyro.planar` except numpyro's `init_planar` (a JAX
layer's weights are a pytree built by a separate initialiser; a torch layer holds its own).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowguides.pyro._base import FlowLayerTransform

__all__ = ["Planar", "planar_u_hat", "solve_planar"]

_LOG_E_MINUS_1 = math.log(math.e - 1.0)


class Planar(FlowLayerTransform):
    """`repeat` planar layers ``y = z + u_hat tanh(w.z + b)``, applied in order.

    ``u_hat = u + (softplus(w.u) - 1 - w.u) w / |w|^2`` so that ``u_hat.w > -1``: each layer is
    strictly monotone along `w` and invertible. The inverse solves the scalar equation
    ``a + (u_hat.w) tanh(a) = w.y + b`` for ``a = w.z + b`` by a safeguarded Newton iteration
    (bisection when a Newton step leaves the bracket), vectorised over the batch; the gradient
    of the solution comes from one differentiable Newton step at the root (implicit
    differentiation).

    Args:
        dim: event size.
        repeat: number of stacked layers.
        generator: random source for the initial `w`.
        dtype: parameter dtype.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """

    def __init__(
        self,
        dim: int,
        repeat: int = 1,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.dim, self.repeat = dim, repeat
        w = torch.randn(repeat, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
        u = _LOG_E_MINUS_1 * w / (w * w).sum(-1, keepdim=True)  # u_hat = 0: the identity
        self.u = nn.Parameter(u.to(dtype))
        self.w = nn.Parameter(w.to(dtype))
        self.b = nn.Parameter(torch.zeros(repeat, dtype=dtype))

    def _layer(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u_hat, w, b, m)`` of layer `r`, with ``m = u_hat.w = softplus(w.u) - 1``."""
        u, w, b = self.u[r], self.w[r], self.b[r]
        return planar_u_hat(u, w), w, b, F.softplus((w * u).sum()) - 1.0

    def forward_and_log_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dz|)`` for `z` of shape ``(..., dim)``."""
        ladj = z.new_zeros(z.shape[:-1])
        for r in range(self.repeat):
            u_hat, w, b, m = self._layer(r)
            t = torch.tanh(z @ w + b)
            z = z + u_hat * t.unsqueeze(-1)
            ladj = ladj + torch.log1p((1.0 - t * t) * m)
        return z, ladj

    def inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det dz/dy|)`` for `y` of shape ``(..., dim)``, exact to float tolerance."""
        ladj = y.new_zeros(y.shape[:-1])
        for r in reversed(range(self.repeat)):
            u_hat, w, b, m = self._layer(r)
            t = torch.tanh(solve_planar(m, y @ w + b))
            y = y - u_hat * t.unsqueeze(-1)
            ladj = ladj - torch.log1p((1.0 - t * t) * m)
        return y, ladj


def planar_u_hat(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``u + (softplus(w.u) - 1 - w.u) w / |w|^2``, the invertibility-preserving `u`."""
    wu = (w * u).sum()
    return u + (F.softplus(wu) - 1.0 - wu) * w / (w * w).sum()


def solve_planar(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Solve ``a + c tanh(a) = s`` for `a` (elementwise, ``c > -1``), differentiable in `c`
    and `s`: the root is found without a graph, then one Newton step at the root carries the
    implicit-function gradient."""
    with torch.no_grad():
        root = _solve_monotone(s.detach(), c.detach())
    t = torch.tanh(root)
    return root - (root + c * t - s) / (1.0 + c * (1.0 - t * t))


def _solve_monotone(s: torch.Tensor, c: torch.Tensor, max_iter: int = 100) -> torch.Tensor:
    """Solve ``a + c tanh(a) = s`` elementwise for ``c > -1`` (no gradient).

    The root lies in ``[s - |c|, s + |c|]``; Newton steps that leave the current bracket are
    replaced by bisection, so the iteration always converges.
    """
    spread = c.abs().expand_as(s)
    lo, hi = s - spread, s + spread
    a = s.clone()
    eps = torch.finfo(s.dtype).eps
    for _ in range(max_iter):
        t = torch.tanh(a)
        g = a + c * t - s
        lo = torch.where(g < 0, a, lo)
        hi = torch.where(g > 0, a, hi)
        step = g / (1.0 + c * (1.0 - t * t))
        new = a - step
        outside = (new <= lo) | (new >= hi)
        new = torch.where(outside, 0.5 * (lo + hi), new)
        done = (new - a).abs() <= 4 * eps * (1.0 + a.abs())
        a = new
        if bool(done.all()):
            break
    return a
