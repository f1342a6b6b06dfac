"""Build a torch flow from a `FlowSpec`; read and write its weights by the spec's names.

The flow maps base noise ``eps ~ N(0, I)`` through the layers, then the optional affine, to
``x`` (the generative direction); `log_prob` runs the inverse.

The public names match `flowguides.numpyro.build` except framework-only ones: here the torch
modules `Affine` and `Precondition` (in JAX, parts of `FlowTransform`) and `FlowDistribution`,
the Pyro distribution whose draws carry their log-density; there `FlowTransform`,
`init_params`, `as_weight_arrays` and `check_flow_tolerances` (a JAX flow's weights are a
pytree built apart from it; a torch layer checks its own tolerances when built).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn

from flowguides.core import as_spec, check_weights
from flowguides.pyro._base import FlowLayerTransform
from flowguides.pyro.coupling import RealNVP
from flowguides.pyro.ode import NeuralODE
from flowguides.pyro.planar import Planar
from flowguides.spec import FlowSpec, SpecError

__all__ = [
    "Affine",
    "Flow",
    "FlowDistribution",
    "Precondition",
    "build_flow",
    "get_weights",
    "set_weights",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Affine(FlowLayerTransform):
    """``x = loc + exp(log_scale) * y``, elementwise; starts as the identity."""

    def __init__(self, dim: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.log_scale = nn.Parameter(torch.zeros(dim, dtype=dtype))

    def forward_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ladj = self.log_scale.sum().expand(y.shape[:-1])
        return self.loc + torch.exp(self.log_scale) * y, ladj

    def inverse_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ladj = -self.log_scale.sum().expand(x.shape[:-1])
        return (x - self.loc) * torch.exp(-self.log_scale), ladj


class Precondition(FlowLayerTransform):
    """A fixed (untrained) ``x = shift + scale_tril @ y``: an `AutoFlowGuide`'s whitening from
    its Laplace start, held as buffers (never optimised).

    ``scale_tril`` is a ``(dim, dim)`` lower-triangular matrix (full-rank whitening) or a
    ``(dim,)`` vector of scales (diagonal whitening, applied elementwise: memory and work grow
    with ``dim``, not ``dim**2``).
    """

    def __init__(self, shift: torch.Tensor, scale_tril: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift)
        self.register_buffer("scale_tril", scale_tril)

    @property
    def diagonal(self) -> bool:
        """Whether ``scale_tril`` is a vector of scales (a diagonal whitening)."""
        return self.scale_tril.dim() == 1

    def _log_det(self) -> torch.Tensor:
        scales = self.scale_tril if self.diagonal else self.scale_tril.diagonal()
        return scales.log().sum()

    def forward_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ladj = self._log_det().expand(y.shape[:-1])
        if self.diagonal:
            return self.shift + y * self.scale_tril, ladj
        return self.shift + y @ self.scale_tril.T, ladj

    def inverse_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ladj = -self._log_det().expand(x.shape[:-1])
        if self.diagonal:
            return (x - self.shift) / self.scale_tril, ladj
        centred = (x - self.shift).unsqueeze(-1)
        tril = self.scale_tril.expand(*centred.shape[:-2], *self.scale_tril.shape)
        return torch.linalg.solve_triangular(tril, centred, upper=False).squeeze(-1), ladj


class Flow(nn.Module):
    """A normalising flow on ``R^dim``: standard-normal base, `layers`, then the optional affine.

    Attributes:
        spec: the spec it was built from.
        dim: the event size.
        layers: one transform module per entry of ``spec.layers``.
        affine: the final `Affine` (``None`` when ``spec.base == "normal"``).
        precondition: a fixed `Precondition` after the affine (a guide's Laplace whitening),
            or None.
    """

    def __init__(
        self, spec: FlowSpec, dim: int, layers: list[FlowLayerTransform], affine: Affine | None
    ):
        super().__init__()
        self.spec, self.dim = spec, dim
        self.layers = nn.ModuleList(layers)
        self.affine = affine
        self.precondition: Precondition | None = None

    @property
    def transforms(self) -> list[FlowLayerTransform]:
        """All transforms in the generative order (layers, the affine, the preconditioner)."""
        fixed = [t for t in (self.affine, self.precondition) if t is not None]
        return [*self.layers, *fixed]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward_and_log_det(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base noise -> data: ``(x, log|det dx/deps|)``."""
        ladj = eps.new_zeros(eps.shape[:-1])
        for transform in self.transforms:
            eps, step = transform.forward_and_log_det(eps)
            ladj = ladj + step
        return eps, ladj

    def inverse_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> base noise: ``(eps, log|det deps/dx|)``."""
        ladj = x.new_zeros(x.shape[:-1])
        for transform in reversed(self.transforms):
            x, step = transform.inverse_and_log_det(x)
            ladj = ladj + step
        return x, ladj

    def base_log_prob(self, eps: torch.Tensor) -> torch.Tensor:
        return -0.5 * (eps * eps).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` for `x` of shape ``(..., dim)``, by the inverse pass."""
        eps, ladj = self.inverse_and_log_det(x)
        return self.base_log_prob(eps) + ladj

    def sample_and_log_prob(
        self, sample_shape: tuple[int, ...] | torch.Size = (), seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparametrised draws of shape ``(*sample_shape, dim)`` and their ``log q``.

        One forward pass, no inverse: the log-density comes with the draw, and both carry
        gradients to the flow's parameters.

        Args:
            sample_shape: the batch shape of the draws.
            seed: fixes the draws without touching torch's global RNG; None draws from it
                (JAX has no global RNG, so there None means key 0).
        """
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            p = next(self.parameters())
            eps = torch.randn(*sample_shape, self.dim, dtype=p.dtype, device=p.device)
            x, ladj = self.forward_and_log_det(eps)  # Hutchinson noise and STEER draw too
        return x, self.base_log_prob(eps) - ladj

    @torch.no_grad()
    def sample(
        self, sample_shape: tuple[int, ...] | torch.Size = (), seed: int | None = None
    ) -> torch.Tensor:
        """Draws of shape ``(*sample_shape, dim)``; `seed` as in `sample_and_log_prob`."""
        return self.sample_and_log_prob(sample_shape, seed)[0]

    def distribution(self) -> FlowDistribution:
        """This flow as a Pyro distribution over ``R^dim``."""
        return FlowDistribution(self)


class FlowDistribution(TorchDistribution):
    """A Pyro distribution whose draws carry their own log-density from the forward pass.

    ``log_prob`` of the most recent draw returns the density computed with it (no inverse, so a
    neural-ODE guide never solves backwards to score its own sample); the shortcut is dropped as
    soon as any flow parameter changes in place (an optimiser step), and any other value is
    scored by the exact inverse.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow: Flow, batch_shape: torch.Size | tuple[int, ...] = ()) -> None:
        self.flow = flow
        self._last: tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None = None
        super().__init__(torch.Size(batch_shape), torch.Size([flow.dim]), validate_args=False)

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.flow.parameters())

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance=None) -> FlowDistribution:
        return FlowDistribution(self.flow, batch_shape)

    def rsample_and_log_prob(
        self, sample_shape: torch.Size | tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_q = self.flow.sample_and_log_prob(self._extended_shape(sample_shape)[:-1])
        self._last = (x, log_q, self._versions())
        return x, log_q

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._last is not None and value is self._last[0]:
            if self._last[2] == self._versions():
                return self._last[1]
        return self.flow.log_prob(value)


def build_flow(spec: FlowSpec | Mapping[str, Any], dim: int, *, seed: int = 0) -> Flow:
    """Build the flow `spec` describes on ``R^dim``, in ``spec.dtype``.

    Args:
        spec: a `FlowSpec` or its dict form.
        dim: the event size.
        seed: seeds the random initial weights (a new flow is the identity either way, except
            for planar `w` directions and hidden layers, which are random).

    Raises:
        SpecError: when a layer needs more dimensions than `dim`, or names a solver torch
            lacks.

    Example:
        >>> flow = build_flow(FlowSpec.realnvp(num_layers=2, hidden=[8]), 3)
        >>> flow.log_prob(torch.zeros(3)).shape
        torch.Size([])
    """
    spec = as_spec(spec)
    spec.check_dim(dim)
    dtype = _DTYPES[spec.dtype]
    generator = torch.Generator().manual_seed(seed)
    layers: list[FlowLayerTransform] = []
    for i, layer in enumerate(spec.layers):
        if layer.type == "planar":
            layers.append(Planar(dim, layer.repeat, generator=generator, dtype=dtype))
        elif layer.type == "realnvp":
            layers.append(RealNVP(layer, dim, generator=generator, dtype=dtype))
        else:
            try:
                layers.append(NeuralODE(layer, dim, generator=generator, dtype=dtype))
            except SpecError as exc:
                raise SpecError(f"layers[{i}].{exc}") from None
    affine = Affine(dim, dtype=dtype) if spec.base == "affine" else None
    return Flow(spec, dim, layers, affine)


def get_weights(flow: Flow) -> dict[str, np.ndarray]:
    """Every trainable array, ``name -> numpy array``, in ``spec.parameter_shapes(dim)`` order."""
    params = dict(flow.named_parameters())
    return {name: params[name].detach().cpu().numpy().copy() for name in _expected(flow)}


def set_weights(flow: Flow, weights: Mapping[str, object]) -> Flow:
    """Copy `weights` into `flow` in place (same tensors, so optimisers and Pyro keep them).

    Raises:
        ValueError: naming a missing or unknown parameter, or one whose shape is wrong.
    """
    check_weights(flow.spec, flow.dim, weights)
    expected = _expected(flow)
    params = dict(flow.named_parameters())
    arrays = {
        name: torch.as_tensor(np.asarray(weights[name]), dtype=params[name].dtype)
        for name in expected
    }
    with torch.no_grad():
        for name, value in arrays.items():
            params[name].copy_(value)
    return flow


def _expected(flow: Flow) -> dict[str, tuple[int, ...]]:
    return dict(flow.spec.parameter_shapes(flow.dim))
