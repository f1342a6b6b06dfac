"""Neural-ODE flows (Chen et al., 2018; Grathwohl et al., 2019) on `torchdiffeq`.

The base sits at ``t = 0`` and the data at ``t = t1``; the state ``[z, log-det]`` is integrated
together, with the exact trace (``dim`` vector-Jacobian products) or Hutchinson's estimator
(one noise draw held fixed for the whole solve).

Training extras (Finlay et al., 2020; Ghosh et al., 2020): solves run inside
`training_solves` record themselves (field evaluations, and the RNODE penalty where a layer's
``kinetic_weight`` or ``jacobian_weight`` is positive: the regularisers ``∫ |f|² dt`` and
``∫ |∂f/∂z|_F² dt`` are integrated as two more states, left out of the step-size control), and
with ``steer > 0`` end at a random time. Outside the block every solve ends at ``t1`` and
carries no extra state. `flow_matching_loss` trains the field without solving, on base draws
paired with the data by `couple_noise` (independently, or by minibatch optimal transport).

Hutchinson's estimator is unbiased for the log-determinant, not for the density: ``E[exp(-l)]``
differs from ``exp(-E[l])``, so importance weights ``p / q`` built from a Hutchinson log-det are
biased (and noisier). Use ``trace="exact"`` (the default for ``dim <= 10``) for diagnostics.

The public names match `flowguides.numpyro.ode` except framework-only ones: here the torch
module `ConcatSquash`; there the functional `init_neural_ode` and `vector_field`, the diffrax
tableau `RK4`, and `solver_errors` (torch raises `MaxStepsExceededError` from the solve itself;
JAX raises it at run time, outside any traced function).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from flowguides.core import MaxStepsExceededError, check_coupling, check_tolerances, ot_permutation
from flowguides.pyro._base import FlowLayerTransform
from flowguides.pyro.coupling import ACTIVATIONS
from flowguides.spec import FIXED_STEP_SOLVERS, NeuralODESpec, SpecError

__all__ = [
    "ConcatSquash",
    "NeuralODE",
    "couple_noise",
    "flow_matching_loss",
    "in_training_solves",
    "pass_up",
    "training_solves",
]

_RECORDERS: list[list[dict]] = []  # the open `training_solves` blocks, innermost last


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
        if h.dim() != 2 or t.shape != (h.shape[0], 1):  # one time for all rows (a solve)
            gate = torch.sigmoid(self.gate_weight * t + self.gate_bias)
            return (h @ self.weight.T + self.bias) * gate + self.time_bias * t
        # a time per row (flow matching): the outer products with `t` as matrix products, each
        # bias added in the same call (the same values to rounding, fewer passes over memory)
        linear = torch.addmm(self.bias, h, self.weight.T)
        gate = torch.sigmoid(torch.addmm(self.gate_bias, t, self.gate_weight[None]))
        return torch.addmm(linear * gate, t, self.time_bias[None])


class _Dynamics(nn.Module):
    """Right-hand side ``d[z, l, (k, j)]/dt = [f, tr(∂f/∂z), (|f|², |ε^T ∂f/∂z|²)]``.

    With the exact trace the Jacobian term is the exact ``|∂f/∂z|_F²`` from the same rows.
    """

    def __init__(
        self,
        ode: NeuralODE,
        noise: torch.Tensor | None,
        regularize: bool,
    ) -> None:
        super().__init__()
        self.velocity, self.watch = ode.velocity, ode.watch_backward
        self.noise = noise  # None: exact trace; else Hutchinson with this fixed noise
        self.regularize = regularize
        self.count_backward = not ode.spec.adjoint  # the adjoint's own calls are counted

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        z = state[0]
        create = torch.is_grad_enabled()  # graphs only when something differentiates the solve
        with torch.enable_grad():
            if not (create and z.requires_grad):  # an adjoint's forward solve: no graph out
                z = z.detach().requires_grad_(True)
            dz = self.velocity(z, t)
            if self.noise is None:
                rows = [
                    torch.autograd.grad(
                        dz[..., i].sum(), z, create_graph=create, retain_graph=True
                    )[0]
                    for i in range(z.shape[-1])
                ]
                trace = sum(row[..., i] for i, row in enumerate(rows))
                frobenius = sum((row * row).sum(-1) for row in rows) if self.regularize else None
            else:
                vjp = torch.autograd.grad(dz, z, self.noise, create_graph=create)[0]
                trace = (vjp * self.noise).sum(-1)
                frobenius = (vjp * vjp).sum(-1) if self.regularize else None
        if create and self.count_backward:
            self.watch(dz)  # after the trace's VJPs, which would fire the hook too
        out = (dz, trace) if frobenius is None else (dz, trace, (dz * dz).sum(-1), frobenius)
        return out if create else tuple(o.detach() for o in out)


def _solution_norm(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Step-size control on ``[z, log-det]`` only (RMS per part, the larger of the two)."""
    return torch.max(state[0].pow(2).mean().sqrt(), state[1].pow(2).mean().sqrt())


class NeuralODE(FlowLayerTransform):
    """A continuous normalising flow ``dz/dt = f(z, t)`` from ``t = 0`` (base) to ``t1`` (data).

    Attributes:
        nfe: vector-field evaluations so far: calls (solver stages, adjoint solves included)
            plus backward passes through recorded evaluations; fits read its increments.

    Args:
        spec: the layer spec (solver, tolerances, trace estimator, ...).
        dim: event size.
        generator: random source for the hidden layers' initial weights.
        dtype: parameter dtype.

    Raises:
        SpecError: for ``solver="tsit5"``, which torchdiffeq does not offer.

    Warns:
        ToleranceWarning: a float32 flow with an adaptive solver and ``rtol`` or ``atol`` below
            `FLOAT32_MIN_TOLERANCE` (use ``dtype="float64"`` for tighter solves).

    References:
        Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018.
        Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
        Generative Models", ICLR 2019.
        Finlay et al., "How to train your neural ODE: the world of Jacobian and kinetic
        regularization", ICML 2020.
        Ghosh et al., "STEER: Simple Temporal Regularization For Neural ODEs", NeurIPS 2020.
    """

    def __init__(
        self,
        spec: NeuralODESpec,
        dim: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if spec.solver == "tsit5":
            raise SpecError(
                "solver: 'tsit5' is not available in the Pyro (torch) backend, torchdiffeq has "
                "no Tsit5; use solver='dopri5' (adaptive) or 'rk4' with num_steps"
            )
        check_tolerances(spec, "float32" if dtype == torch.float32 else "float64")
        self.spec, self.dim = spec, dim
        self.trace = spec.resolved_trace(dim)
        self.activation = ACTIVATIONS[spec.activation]
        sizes = spec.mlp_sizes(dim)
        last = len(sizes) - 2
        self.net = nn.ModuleList(
            ConcatSquash(n_in, n_out, zero=j == last, generator=generator, dtype=dtype)
            for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        )
        self.nfe = 0

    def field(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The vector field ``f(z, t)``: concatsquash layers, activation between them."""
        h = z
        for j, layer in enumerate(self.net):
            if j:
                h = self.activation(h)
            h = layer(h, t)
        return h

    def velocity(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`field`, counted in `nfe`."""
        self.nfe += 1
        return self.field(z, t)

    def watch_backward(self, dz: torch.Tensor) -> None:
        """Count in `nfe` the next gradient computed for the evaluation `dz` (if it has a graph)."""
        if dz.requires_grad:
            dz.register_hook(self._count_backward)

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.nfe += 1

    def _noise(self, z: torch.Tensor) -> torch.Tensor | None:
        if self.trace == "exact":
            return None
        if self.spec.noise == "gaussian":
            return torch.randn_like(z)
        return torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2.0 - 1.0

    def solve(
        self,
        x: torch.Tensor,
        *,
        inverse: bool = False,
        end_time: float | None = None,
        regularize: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Integrate between 0 and `end_time` (default ``t1``), forward or backwards.

        Args:
            x: points ``(..., dim)`` (base side when forward, data side when `inverse`).
            inverse: integrate from `end_time` back to 0 instead of from 0 to `end_time`.
            end_time: the data-side time (STEER draws it in training); ``t1`` when None.
            regularize: also integrate the RNODE regularisers.

        Returns:
            ``(y, ladj, reg)``: the end point, ``log|det dy/dx|`` and, when `regularize`,
            ``reg = {"kinetic": ∫|f|² dt, "jacobian": ∫|ε^T ∂f/∂z|² dt}`` over ``[0, end_time]``
            per point (shape ``(...)``, the exact Frobenius norm with the exact trace), else ``{}``.

        Raises:
            MaxStepsExceededError: the adaptive solver needed more than ``max_steps`` steps.
        """
        spec = self.spec
        t1 = spec.t1 if end_time is None else float(end_time)
        dynamics = _Dynamics(self, self._noise(x), regularize)
        times = torch.tensor([t1, 0.0] if inverse else [0.0, t1], dtype=x.dtype, device=x.device)
        zero = x.new_zeros(x.shape[:-1])
        state = (x, zero, zero, zero) if regularize else (x, zero)
        kwargs: dict = {"method": spec.solver}
        adaptive = spec.solver not in FIXED_STEP_SOLVERS
        if adaptive:
            kwargs.update(rtol=spec.rtol, atol=spec.atol)
            options: dict = {"max_num_steps": spec.max_steps}
        else:
            options = {"step_size": t1 / spec.num_steps}
        kwargs["options"] = (
            {**options, "norm": _solution_norm} if regularize and adaptive else options
        )
        try:
            if spec.adjoint:  # the backward solve keeps the step size or gets the seminorm
                kwargs["adjoint_options"] = {**options, "norm": "seminorm"} if adaptive else options
                kwargs["adjoint_params"] = tuple(self.parameters())
                out = odeint_adjoint(dynamics, state, times, **kwargs)
            else:
                out = odeint(dynamics, state, times, **kwargs)
        except AssertionError as exc:
            if "max_num_steps" not in str(exc):
                raise
            raise MaxStepsExceededError(
                f"max_steps: the {spec.solver} solve needed more than max_steps="
                f"{spec.max_steps} steps; raise max_steps, loosen rtol/atol (now {spec.rtol}/"
                f"{spec.atol}), or use a fixed-step solver"
            ) from None
        ends = [o[-1] for o in out]
        if not regularize:
            return ends[0], ends[1], {}
        sign = -1.0 if inverse else 1.0  # a backwards solve accumulates -∫
        return ends[0], ends[1], {"kinetic": sign * ends[2], "jacobian": sign * ends[3]}

    def _training_solve(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        if not _RECORDERS:
            return self.solve(x, inverse=inverse, regularize=False)[:2]
        end_time = None
        if spec.steer > 0:
            end_time = spec.t1 * (1.0 + spec.steer * (2.0 * float(torch.rand(())) - 1.0))
        regularize = spec.kinetic_weight > 0 or spec.jacobian_weight > 0
        start = self.nfe
        y, ladj, reg = self.solve(x, inverse=inverse, end_time=end_time, regularize=regularize)
        record: dict = {"nfe": self.nfe - start, "backward": not spec.adjoint}
        if regularize:
            record["penalty"] = (
                spec.kinetic_weight * reg["kinetic"] + spec.jacobian_weight * reg["jacobian"]
            )
        _RECORDERS[-1].append(record)
        return y, ladj

    def forward_and_log_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dz|)``: integrate from 0 to ``t1``."""
        return self._training_solve(z, inverse=False)

    def inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det dz/dy|)``: integrate backwards from ``t1`` to 0."""
        return self._training_solve(y, inverse=True)


@contextlib.contextmanager
def training_solves() -> Iterator[list[dict]]:
    """Make the `NeuralODE` solves run inside the block solve as in training.

    Each solve ends at a random time when ``steer > 0`` (drawn from torch's global RNG) and
    appends a record to the yielded list: ``"nfe"`` (its forward field evaluations, an int),
    ``"backward"`` (False for ``adjoint=True``, whose backward solve counts its own
    evaluations in `NeuralODE.nfe`; True where backpropagation goes once through each
    recorded evaluation) and, when a regulariser weight is positive, ``"penalty"``:
    ``kinetic_weight * KE + jacobian_weight * JF`` per point (a tensor that carries gradients).
    Blocks nest; a solve records in the innermost. The same contract as
    `flowguides.numpyro.ode.training_solves`, whose records are traced values.

    Example:
        ```python
        with training_solves() as records:
            loss = -flow.log_prob(batch).mean()
        loss = loss + sum(r["penalty"].mean() for r in records if "penalty" in r)
        ```
    """
    records: list[dict] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.pop()


def pass_up(records: list[dict]) -> None:
    """Append `records` (of an inner block that has ended) to the innermost open block."""
    if _RECORDERS:
        _RECORDERS[-1].extend(records)


def in_training_solves() -> bool:
    """Whether the code running now is inside a `training_solves` block."""
    return bool(_RECORDERS)


def flow_matching_loss(
    ode: NeuralODE,
    x1: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    sigma_min: float,
) -> torch.Tensor:
    """Conditional flow matching on the optimal-transport path (Lipman et al., 2022).

    ``x_t = (1 - (1 - sigma_min) t) x0 + t x1`` has velocity ``u = x1 - (1 - sigma_min) x0``
    in ``t ∈ [0, 1]``; the field runs on ODE time ``s = t * t1``, so it is fitted to ``u / t1``.
    Inside `training_solves` it records one field evaluation (``{"nfe": 1}``).

    Args:
        ode: the neural-ODE layer whose field is trained.
        x1: data points ``(n, dim)``; x0: base draws ``(n, dim)``; t: times ``(n,)`` in [0, 1].
        sigma_min: the width of the path at ``t = 1``.

    Returns:
        The mean over points of ``|f(x_t, t t1) - u / t1|²``.

    References:
        Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023.
    """
    t = t.unsqueeze(-1)
    xt = (1.0 - (1.0 - sigma_min) * t) * x0 + t * x1
    target = (x1 - (1.0 - sigma_min) * x0) / ode.spec.t1
    velocity = ode.velocity(xt, t * ode.spec.t1)
    ode.watch_backward(velocity)
    if _RECORDERS:
        _RECORDERS[-1].append({"nfe": 1, "backward": True})
    return (velocity - target).pow(2).sum(-1).mean()


def couple_noise(x0: torch.Tensor, x1: torch.Tensor, coupling: str) -> torch.Tensor:
    """The base draws `x0` ``(n, dim)`` in the order that pairs them with the data rows `x1`.

    ``coupling="independent"`` returns `x0` as it is; ``"ot"`` returns ``x0[perm]`` with
    ``perm`` the exact minibatch optimal-transport assignment
    (`flowguides.core.ot_permutation`, computed on the host), so row ``j`` of the result is
    the base draw paired with ``x1[j]``. The same contract as
    `flowguides.numpyro.ode.couple_noise`.

    Raises:
        ValueError: an unknown `coupling`, or `x0` and `x1` of different shapes.

    References:
        Tong et al., "Improving and Generalizing Flow-Based Generative Models with Minibatch
        Optimal Transport", TMLR 2024.
    """
    check_coupling(coupling, "flow_matching")
    if coupling == "independent":
        return x0
    perm = ot_permutation(x0.detach().cpu().numpy(), x1.detach().cpu().numpy())
    return x0[torch.as_tensor(perm, device=x0.device)]
