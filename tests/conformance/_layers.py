"""The flow table and the two backend drivers of the layer conformance suite (`test_layers.py`).

A driver reaches its backend only through the public API (`build_flow`, `get_weights`,
`set_weights`, the flow's fused `forward_and_log_det` / `inverse_and_log_det`, `log_prob`,
`distribution`, the transforms' separate methods) and returns one report of numpy arrays, so
one test body checks both backends. Backends are imported on first use: the torch-free CI job
can import this module.

The report of a flow at points ``x`` of shape ``(*batch, dim)`` holds ``y, ladj = forward(x)``,
``x_back, ladj_inv = inverse(y)`` and ``log_prob(y)``; a full report (see `is_full`) adds the
separate methods' results, ``log|det J|`` of the autodiff Jacobian at every point, and the
gradients of a loss of each direction. Layers act on each row alone (a neural-ODE batch shares
its adaptive step sizes, which couples rows only to the solver's tolerance), so the cotangent
``e_i`` on every row of ``y`` gives row ``i`` of every point's Jacobian: torch reads them from
one `torch.autograd.functional.jacobian` of the row sums, JAX from one `jax.vjp` applied to
``dim + 1`` cotangents (the last one the loss's, giving the forward gradients too). Reverse
mode, because diffrax differentiates its solves by a custom VJP, which has no forward mode.

In JAX the report is one jitted function, which `jax.jit` compiles once per spec, dim, batch
shape and level: a fresh, a randomised and a reloaded flow of one spec share the compilation.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowguides.spec import FlowSpec, NeuralODESpec, PlanarSpec, RealNVPSpec

__all__ = [
    "BATCH_SHAPES",
    "CASES",
    "WEIGHT_SCALE",
    "Case",
    "driver",
    "initial_image",
    "is_full",
    "leading_points",
    "points",
    "report",
    "random_report",
    "random_weights",
    "standard_normal_log_prob",
]

BATCH_SHAPES: tuple[tuple[int, ...], ...] = ((), (3,), (2, 4))
WEIGHT_SCALE = 0.3
"""Standard deviation of the random weights every property but identity-at-init runs on."""

_ADAPTIVE = {"solver": "dopri5", "rtol": 1e-11, "atol": 1e-11, "max_steps": 1000}


@dataclass(frozen=True)
class Case:
    """One row of the table: a spec, the dimension it runs in, and its numerical tolerance.

    Attributes:
        spec: the flow spec (float64).
        dim: the event size.
        tol: absolute tolerance of the round trip, the density identity and the log-det
            against autodiff; the analytic layers are exact to rounding, an adaptive ODE solve
            to its `rtol`/`atol`, a few fixed rk4 steps to the method's truncation error.
    """

    spec: FlowSpec
    dim: int
    tol: float


def _flow(*layers: Any, base: str = "affine") -> FlowSpec:
    return FlowSpec(layers=list(layers), base=base, dtype="float64")


CASES: dict[str, Case] = {
    "planar": Case(_flow(PlanarSpec(repeat=3)), 3, 1e-12),
    "realnvp": Case(_flow(RealNVPSpec(repeat=3, hidden=(8,))), 3, 1e-12),
    "realnvp-options": Case(
        _flow(
            RealNVPSpec(
                repeat=2,
                hidden=(6, 6),
                activation="gelu",
                permutation="random",
                seed=3,
                scale_clamp=1.5,
            ),
            RealNVPSpec(hidden=(4,), activation="tanh", orientation="density"),
            RealNVPSpec(hidden=(4,), activation="elu"),
            base="normal",
        ),
        4,
        1e-12,
    ),
    "ode-dopri5": Case(_flow(NeuralODESpec(hidden=(6,), **_ADAPTIVE)), 3, 1e-8),
    "ode-rk4": Case(
        _flow(NeuralODESpec(hidden=(6,), activation="softplus", solver="rk4", num_steps=4)),
        3,
        1e-8,
    ),
    "mixed": Case(
        _flow(
            PlanarSpec(repeat=2),
            RealNVPSpec(repeat=2, hidden=(6,), activation="leaky_relu"),
            NeuralODESpec(hidden=(5,), solver="rk4", num_steps=6),
            base="normal",
        ),
        3,
        1e-8,
    ),
}


def random_weights(spec: FlowSpec, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every weight the spec names drawn from ``N(0, WEIGHT_SCALE^2)``: no layer is the
    identity, and both backends get exactly the same arrays."""
    rng = np.random.default_rng(seed)
    shapes = spec.parameter_shapes(dim)
    return {name: WEIGHT_SCALE * rng.standard_normal(shape) for name, shape in shapes.items()}


def points(dim: int, batch: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """Test points of shape ``(*batch, dim)``: the first ``prod(batch)`` rows of one fixed draw,
    so a smaller batch holds the leading points of a larger one."""
    rows = np.random.default_rng(seed).standard_normal((8, dim))
    return rows[: math.prod(batch)].reshape((*batch, dim))


def leading_points(values: np.ndarray, batch: tuple[int, ...], event: int) -> np.ndarray:
    """The entries of `values` (batch shape followed by `event` trailing axes) that belong to
    the points of the smaller `batch` (see `points`)."""
    trailing = values.shape[values.ndim - event :]
    flat = values.reshape(-1, *trailing)
    return flat[: math.prod(batch)].reshape((*batch, *trailing))


def standard_normal_log_prob(eps: np.ndarray) -> np.ndarray:
    """``log N(eps; 0, I)`` summed over the last axis."""
    return -0.5 * (eps * eps).sum(-1) - 0.5 * eps.shape[-1] * math.log(2 * math.pi)


def initial_image(spec: FlowSpec, x: np.ndarray) -> np.ndarray:
    """Where a fresh flow sends `x`: every layer starts as the identity, so only the
    permutations between RealNVP couplings move it."""
    for layer in spec.layers:
        if isinstance(layer, RealNVPSpec):
            for perm in layer.permutations(x.shape[-1]):
                x = x[..., perm]
    return x


def _loss_cotangents(out: Any, ladj: Any, xp: Any) -> tuple[Any, Any]:
    """Cotangents of ``sum(sin(out) + out^2) + sum(ladj)``: every output coordinate and the
    log-det reach the loss."""
    return xp.cos(out) + 2 * out, xp.ones_like(ladj)


class _Torch:
    def __init__(self) -> None:
        self.torch = importlib.import_module("torch")
        self.fg = importlib.import_module("flowguides.pyro")

    def build(self, case: Case, weights: dict[str, np.ndarray] | None = None) -> Any:
        flow = self.fg.build_flow(case.spec, case.dim, seed=0)
        return flow if weights is None else self.fg.set_weights(flow, weights)

    def get_weights(self, flow: Any) -> dict[str, np.ndarray]:
        return self.fg.get_weights(flow)

    def report(self, flow: Any, x: np.ndarray, full: bool = True) -> dict[str, Any]:
        torch = self.torch
        xt = torch.as_tensor(x)
        with torch.no_grad():
            y, ladj = flow.forward_and_log_det(xt)
            x_back, ladj_inv = flow.inverse_and_log_det(y)
            out = {"y": y, "ladj": ladj, "x_back": x_back, "ladj_inv": ladj_inv}
            out["log_prob"] = flow.log_prob(y)
            # the separate methods, chained: a Pyro flow is a list of transforms
            z, ladj_sep = xt, torch.zeros(x.shape[:-1], dtype=xt.dtype)
            for t in flow.transforms:
                z_next = t(z)
                ladj_sep = ladj_sep + t.log_abs_det_jacobian(z, z_next)
                z = z_next
            back = y
            for t in reversed(flow.transforms):
                back = t.inv(back)
            out |= {"y_separate": z, "ladj_separate": ladj_sep, "x_separate": back}
            out["dist_log_prob"] = flow.distribution().log_prob(y)
        out = {k: v.numpy() for k, v in out.items()}
        if not full:
            return out

        dim = x.shape[-1]

        def summed_rows(v: Any) -> Any:
            # rows act alone, so d(sum_b y[b, i]) / dv[b, j] = dy[b, i] / dx[b, j]
            return flow.forward_and_log_det(v)[0].reshape(-1, dim).sum(0)

        jac = torch.autograd.functional.jacobian(summed_rows, xt).movedim(0, -2)
        out["logdet_autodiff"] = torch.linalg.slogdet(jac)[1].numpy()
        out["grads"] = {}
        for direction, point in (("forward", xt), ("inverse", y)):
            flow.zero_grad(set_to_none=True)
            method = getattr(flow, f"{direction}_and_log_det")
            value, log_det = method(point)
            cot_value, cot_log_det = _loss_cotangents(value.detach(), log_det.detach(), torch)
            torch.autograd.backward((value, log_det), (cot_value, cot_log_det))
            out["grads"][direction] = {
                k: None if p.grad is None else p.grad.numpy().copy()
                for k, p in flow.named_parameters()
            }
        flow.zero_grad(set_to_none=True)
        return out


class _Jax:
    def __init__(self) -> None:
        self.jax = importlib.import_module("jax")
        self.jnp = importlib.import_module("jax.numpy")
        self.fg = importlib.import_module("flowguides.numpyro")
        self._report = self.jax.jit(self._report_impl, static_argnames="full")

    def build(self, case: Case, weights: dict[str, np.ndarray] | None = None) -> Any:
        flow = self.fg.build_flow(case.spec, case.dim, seed=0)
        return flow if weights is None else self.fg.set_weights(flow, weights)

    def get_weights(self, flow: Any) -> dict[str, np.ndarray]:
        return self.fg.get_weights(flow)

    def _report_impl(self, flow: Any, x: Any, full: bool) -> dict[str, Any]:
        jax, jnp = self.jax, self.jnp
        if not full:
            y, ladj = flow.forward_and_log_det(x)
            x_back, ladj_inv = flow.inverse_and_log_det(y)
            out = {"y": y, "ladj": ladj, "x_back": x_back, "ladj_inv": ladj_inv}
            return out | {"log_prob": flow.log_prob(y)}
        dim = x.shape[-1]
        (y, ladj), forward_vjp = jax.vjp(lambda f, v: f.forward_and_log_det(v), flow, x)
        # dim cotangents e_i on every row (Jacobian rows), then the loss's cotangent
        basis = jnp.broadcast_to(jnp.eye(dim, dtype=x.dtype)[:, None], (dim, y.size // dim, dim))
        cot_y, cot_ladj = _loss_cotangents(y, ladj, jnp)
        cot_y = jnp.concatenate([basis.reshape(dim, *y.shape), cot_y[None]])
        cot_ladj = jnp.concatenate([jnp.zeros((dim, *ladj.shape), x.dtype), cot_ladj[None]])
        grad_flow, grad_x = jax.vmap(lambda a, b: forward_vjp((a, b)))(cot_y, cot_ladj)
        jac = jnp.moveaxis(grad_x[:dim], 0, -2)

        (x_back, ladj_inv), inverse_vjp = jax.vjp(lambda f: f.inverse_and_log_det(y), flow)
        (grad_inverse,) = inverse_vjp(_loss_cotangents(x_back, ladj_inv, jnp))

        # numpyro's `Flow.distribution()` is its own TransformedDistribution over `t`: the
        # separate methods below are all of ours it calls
        t = flow.transform()
        return {
            "y": y,
            "ladj": ladj,
            "x_back": x_back,
            "ladj_inv": ladj_inv,
            "log_prob": flow.log_prob(y),
            "y_separate": t(x),
            "ladj_separate": t.log_abs_det_jacobian(x, y),
            "x_separate": t.inv(y),
            "logdet_autodiff": jnp.linalg.slogdet(jac)[1],
            "grads": {
                "forward": jax.tree.map(lambda g: g[dim], grad_flow.params),
                "inverse": grad_inverse.params,
            },
        }

    def report(self, flow: Any, x: np.ndarray, full: bool = True) -> dict[str, Any]:
        return _to_numpy(self._report(flow, self.jnp.asarray(x), full))

    def eager_forward(self, flow: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``forward_and_log_det`` called outside `jax.jit`."""
        y, ladj = flow.forward_and_log_det(self.jnp.asarray(x))
        return np.asarray(y), np.asarray(ladj)


def _to_numpy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


@functools.cache
def driver(backend: str) -> _Torch | _Jax:
    """The driver of `backend` (``"pyro"`` or ``"numpyro"``), importing it on first use."""
    return _Torch() if backend == "pyro" else _Jax()


def is_full(backend: str, batch: tuple[int, ...]) -> bool:
    """Whether reports in `backend` at `batch` hold the separate methods and the derivatives.

    Torch reports always do. A JAX report does at the largest batch shape only: reverse mode
    through the layers (a diffrax solve above all) takes seconds to compile for each batch
    shape, so smaller batches check values and shapes, and agree with the largest one.
    """
    return backend == "pyro" or batch == BATCH_SHAPES[-1]


def report(name: str, backend: str, batch: tuple[int, ...], flow: Any) -> dict[str, Any]:
    """The driver's report of `flow` (built for case `name`) at ``points(dim, batch)``."""
    x = points(CASES[name].dim, batch)
    return {"x": x, **driver(backend).report(flow, x, is_full(backend, batch))}


@functools.cache
def random_report(name: str, backend: str, batch: tuple[int, ...]) -> dict[str, Any]:
    """The report of case `name`'s flow with `random_weights`, computed once per session
    (every test reads it; none may modify it)."""
    case = CASES[name]
    flow = driver(backend).build(case, random_weights(case.spec, case.dim))
    return report(name, backend, batch, flow)
