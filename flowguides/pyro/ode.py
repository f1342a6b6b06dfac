"""Neural-ODE flows (Chen et al., 2018; Grathwohl et al., 2019) on `torchdiffeq`.

The base sits at ``t = 0`` and the data at ``t = t1``; the state ``[z, log-det]`` is integrated
together, with the exact trace (``dim`` vector-Jacobian products) or Hutchinson's estimator
(one noise draw held fixed for the whole solve).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from flowguides.pyro.coupling import ACTIVATION_FUNCTIONS
from flowguides.spec import NeuralODESpec, SpecError

__all__ = ["ConcatSquash", "MaxStepsExceededError", "NeuralODE"]


class MaxStepsExceededError(RuntimeError):
    """The adaptive solver needed more than the spec's ``max_steps`` steps."""


class ConcatSquash(nn.Module):
    """``h' = (h @ weight.T + bias) * sigmoid(gate_weight t + gate_bias) + time_bias t``."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        zero: bool = False,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        bound = 0.0 if zero else 1.0 / math.sqrt(n_in)
        for name, shape in {"weight": (n_out, n_in), "bias": (n_out,)}.items():
            init = (2.0 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1.0) * bound
            self.register_parameter(name, nn.Parameter(init.to(dtype)))
        for name in ("gate_weight", "gate_bias", "time_bias"):
            self.register_parameter(name, nn.Parameter(torch.zeros(n_out, dtype=dtype)))

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate_weight * t + self.gate_bias)
        return (h @ self.weight.T + self.bias) * gate + self.time_bias * t


class _Dynamics(nn.Module):
    """Right-hand side of the augmented ODE ``d[z, l]/dt = [f(z, t), tr(df/dz)]``."""

    def __init__(
        self,
        field: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.field = field
        self.noise = noise  # None: exact trace; else Hutchinson with this fixed noise

    def forward(
        self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = state[0]
        create = torch.is_grad_enabled()  # graphs only when something differentiates the solve
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.field(z, t)
            if self.noise is None:
                trace = sum(
                    torch.autograd.grad(
                        dz[..., i].sum(), z, create_graph=create, retain_graph=True
                    )[0][..., i]
                    for i in range(z.shape[-1])
                )
            else:
                vjp = torch.autograd.grad(dz, z, self.noise, create_graph=create)[0]
                trace = (vjp * self.noise).sum(-1)
        if not create:
            return dz.detach(), trace.detach()
        return dz, trace


class NeuralODE(TransformModule):
    """A continuous normalising flow ``dz/dt = f(z, t)`` from ``t = 0`` (base) to ``t1`` (data).

    Args:
        spec: the layer spec (solver, tolerances, trace estimator, ...).
        dim: event size.
        generator: random source for the hidden layers' initial weights.
        dtype: parameter dtype.

    Raises:
        SpecError: for ``solver="tsit5"``, which torchdiffeq does not offer.

    References:
        Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018.
        Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
        Generative Models", ICLR 2019.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        spec: NeuralODESpec,
        dim: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(cache_size=0)
        if spec.solver == "tsit5":
            raise SpecError(
                "solver: 'tsit5' is not available in the Pyro (torch) backend, torchdiffeq has "
                "no Tsit5; use solver='dopri5' (adaptive) or 'rk4' with num_steps"
            )
        if spec.kinetic_weight or spec.jacobian_weight:
            raise SpecError(
                "kinetic_weight/jacobian_weight: regularisation is not implemented in the Pyro "
                f"backend, expected 0, got {spec.kinetic_weight}/{spec.jacobian_weight}"
            )
        self.spec, self.dim = spec, dim
        self.trace = spec.resolved_trace(dim)
        self.activation = ACTIVATION_FUNCTIONS[spec.activation]
        sizes = spec.mlp_sizes(dim)
        last = len(sizes) - 2
        self.net = nn.ModuleList(
            ConcatSquash(n_in, n_out, zero=j == last, generator=generator, dtype=dtype)
            for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        )

    def field(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The vector field ``f(z, t)``: concatsquash layers, activation between them."""
        h = z
        for j, layer in enumerate(self.net):
            if j:
                h = self.activation(h)
            h = layer(h, t)
        return h

    def _noise(self, z: torch.Tensor) -> torch.Tensor | None:
        if self.trace == "exact":
            return None
        if self.spec.noise == "gaussian":
            return torch.randn_like(z)
        return torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2.0 - 1.0

    def _solve(self, z: torch.Tensor, t0: float, t1: float) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        dynamics = _Dynamics(self.field, self._noise(z))
        times = torch.tensor([t0, t1], dtype=z.dtype, device=z.device)
        state = (z, z.new_zeros(z.shape[:-1]))
        kwargs: dict = {"method": spec.solver}
        if spec.solver == "dopri5":
            kwargs.update(rtol=spec.rtol, atol=spec.atol)
            kwargs["options"] = {"max_num_steps": spec.max_steps}
        else:
            kwargs["options"] = {"step_size": spec.t1 / spec.num_steps}
        try:
            if spec.adjoint:
                kwargs["adjoint_options"] = {"norm": "seminorm"}
                kwargs["adjoint_params"] = tuple(self.parameters())
                zs, ls = odeint_adjoint(dynamics, state, times, **kwargs)
            else:
                zs, ls = odeint(dynamics, state, times, **kwargs)
        except AssertionError as exc:
            if "max_num_steps" not in str(exc):
                raise
            raise MaxStepsExceededError(
                f"max_steps: the {spec.solver} solve needed more than max_steps="
                f"{spec.max_steps} steps; raise max_steps, loosen rtol/atol (now {spec.rtol}/"
                f"{spec.atol}), or use a fixed-step solver"
            ) from None
        return zs[-1], ls[-1]

    def forward_and_log_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dz|)``: integrate from 0 to ``t1``."""
        return self._solve(z, 0.0, self.spec.t1)

    def inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det dz/dy|)``: integrate backwards from ``t1`` to 0."""
        return self._solve(y, self.spec.t1, 0.0)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_log_det(x)[0]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.inverse_and_log_det(y)[0]

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_and_log_det(x)[1]
