"""The flow table and the two backend drivers of the layer conformance suite (`test_layers.py`).

Each driver reaches its backend only through the public API (`build_flow`, `get_weights`,
`set_weights`, the flow's fused `forward_and_log_det` / `inverse_and_log_det`, `log_prob`, the
transforms' separate methods) and returns numpy arrays, so one test body checks both backends.
The backends are imported on first use, so the torch-free CI job can import this module.

The JAX driver compiles one `evaluate` and one `derivatives` function; `jax.jit` caches them
per spec, dim and batch shape, so a fresh, a randomised and a reloaded flow of one spec share
one compilation.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
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
    "points",
    "random_report",
    "random_weights",
]

BATCH_SHAPES: tuple[tuple[int, ...], ...] = ((), (3,), (2, 4))
WEIGHT_SCALE = 0.3
"""Standard deviation of the random weights every property but identity-at-init runs on."""

_ADAPTIVE = {"solver": "dopri5", "rtol": 1e-11, "atol": 1e-11, "max_steps": 10_000}


@dataclass(frozen=True)
class Case:
    """One row of the table: a spec, the dimension it runs in, and its numerical tolerance.

    Attributes:
        spec: the flow spec (float64).
        dim: the event size.
        tol: absolute tolerance of the round trip and of the log-det against autodiff; the
            analytic layers are exact to rounding, an adaptive ODE solve to its `rtol`/`atol`,
            a few fixed rk4 steps only to the method's truncation error.
    """

    spec: FlowSpec
    dim: int
    tol: float


def _flow(*layers: Any, base: str = "affine") -> FlowSpec:
    return FlowSpec(layers=list(layers), base=base, dtype="float64")


CASES: dict[str, Case] = {
    "planar": Case(_flow(PlanarSpec(repeat=3)), 3, 1e-10),
    "realnvp": Case(_flow(RealNVPSpec(repeat=3, hidden=(8,))), 3, 1e-10),
    "realnvp-gelu-random-normal": Case(
        _flow(
            RealNVPSpec(
                repeat=2,
                hidden=(6, 6),
                activation="gelu",
                permutation="random",
                seed=3,
                scale_clamp=1.5,
            ),
            base="normal",
        ),
        4,
        1e-10,
    ),
    "realnvp-leaky-relu": Case(
        _flow(RealNVPSpec(repeat=2, hidden=(5,), activation="leaky_relu")), 4, 1e-10
    ),
    "ode-dopri5": Case(_flow(NeuralODESpec(hidden=(8,), **_ADAPTIVE)), 3, 1e-8),
    "ode-rk4": Case(
        _flow(NeuralODESpec(hidden=(6,), activation="softplus", solver="rk4", num_steps=4)),
        3,
        1e-4,
    ),
    "mixed": Case(
        _flow(
            PlanarSpec(repeat=2),
            RealNVPSpec(repeat=2, hidden=(6,), activation="elu"),
            NeuralODESpec(hidden=(5,), activation="elu", solver="rk4", num_steps=3),
            base="normal",
        ),
        3,
        1e-4,
    ),
}


def random_weights(spec: FlowSpec, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every weight the spec names drawn ``N(0, WEIGHT_SCALE^2)``: no layer is the identity,
    and both backends get exactly the same arrays."""
    rng = np.random.default_rng(seed)
    shapes = spec.parameter_shapes(dim)
    return {name: WEIGHT_SCALE * rng.standard_normal(shape) for name, shape in shapes.items()}


def points(dim: int, batch: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """Test points of shape ``(*batch, dim)``."""
    return np.random.default_rng(seed).standard_normal((*batch, dim))


def initial_image(spec: FlowSpec, x: np.ndarray) -> np.ndarray:
    """Where a fresh flow sends `x`: every layer is the identity at initialisation, so only the
    permutations between RealNVP couplings move it."""
    for layer in spec.layers:
        if isinstance(layer, RealNVPSpec):
            for perm in layer.permutations(x.shape[-1]):
                x = x[..., perm]
    return x


def _loss(out: Any, ladj: Any, sin: Callable[[Any], Any]) -> Any:
    """A scalar that depends on every output coordinate and on the log-det."""
    return sin(out).sum() + (out * out).sum() + ladj.sum()


class _Torch:
    name = "pyro"

    def __init__(self) -> None:
        self.torch = importlib.import_module("torch")
        self.fg = importlib.import_module("flowguides.pyro")

    def build(self, case: Case, weights: dict[str, np.ndarray] | None = None) -> Any:
        flow = self.fg.build_flow(case.spec, case.dim, seed=0)
        return flow if weights is None else self.fg.set_weights(flow, weights)

    def get_weights(self, flow: Any) -> dict[str, np.ndarray]:
        return self.fg.get_weights(flow)

    def evaluate(self, flow: Any, x: np.ndarray) -> dict[str, Any]:
        torch = self.torch
        xt = torch.as_tensor(x)
        with torch.no_grad():
            y, ladj = flow.forward_and_log_det(xt)
            x_back, ladj_inv = flow.inverse_and_log_det(y)
            log_prob = flow.log_prob(xt)
            out = {"y": y, "ladj": ladj, "x_back": x_back, "ladj_inv": ladj_inv}
            out |= {"log_prob": log_prob, "eps": flow.inverse_and_log_det(xt)[0]}
            # the separate methods, chained layer by layer (a Pyro flow is a list of transforms)
            z, ladj_sep = xt, torch.zeros(x.shape[:-1], dtype=xt.dtype)
            for t in flow.transforms:
                z_next = t(z)
                ladj_sep = ladj_sep + t.log_abs_det_jacobian(z, z_next)
                z = z_next
            back = y
            for t in reversed(flow.transforms):
                back = t.inv(back)
            out |= {"y_separate": z, "ladj_separate": ladj_sep, "x_separate": back}
            out["dist_log_prob"] = flow.distribution().log_prob(xt)
        return {k: v.numpy() for k, v in out.items()}

    def derivatives(self, flow: Any, x: np.ndarray) -> dict[str, Any]:
        torch = self.torch
        xt = torch.as_tensor(x)
        dim = x.shape[-1]

        def summed_rows(v: Any) -> Any:
            # rows do not interact, so d(sum_b y[b, i]) / dv[b, j] = dy[b, i] / dx[b, j]
            return flow.forward_and_log_det(v)[0].reshape(-1, dim).sum(0)

        jac = torch.autograd.functional.jacobian(summed_rows, xt).movedim(0, -2)
        grads = {}
        for direction in ("forward_and_log_det", "inverse_and_log_det"):
            flow.zero_grad(set_to_none=True)
            out, ladj = getattr(flow, direction)(xt)
            _loss(out, ladj, torch.sin).backward()
            params = dict(flow.named_parameters())
            grads[direction] = {
                name: None if params[name].grad is None else params[name].grad.numpy().copy()
                for name in case_names(flow.spec, flow.dim)
            }
        flow.zero_grad(set_to_none=True)
        return {"logdet_autodiff": torch.linalg.slogdet(jac)[1].detach().numpy(), "grads": grads}


class _Jax:
    name = "numpyro"

    def __init__(self) -> None:
        self.jax = importlib.import_module("jax")
        self.jnp = importlib.import_module("jax.numpy")
        self.fg = importlib.import_module("flowguides.numpyro")
        self._evaluate = self.jax.jit(self._evaluate_impl)
        self._derivatives = self.jax.jit(self._derivatives_impl)

    def build(self, case: Case, weights: dict[str, np.ndarray] | None = None) -> Any:
        flow = self.fg.build_flow(case.spec, case.dim, seed=0)
        return flow if weights is None else self.fg.set_weights(flow, weights)

    def get_weights(self, flow: Any) -> dict[str, np.ndarray]:
        return self.fg.get_weights(flow)

    def _evaluate_impl(self, flow: Any, x: Any) -> dict[str, Any]:
        y, ladj = flow.forward_and_log_det(x)
        x_back, ladj_inv = flow.inverse_and_log_det(y)
        t = flow.transform()
        return {
            "y": y,
            "ladj": ladj,
            "x_back": x_back,
            "ladj_inv": ladj_inv,
            "log_prob": flow.log_prob(x),
            "eps": flow.inverse_and_log_det(x)[0],
            "y_separate": t(x),
            "ladj_separate": t.log_abs_det_jacobian(x, y),
            "x_separate": t.inv(y),
            "dist_log_prob": flow.distribution().log_prob(x),
        }

    def _derivatives_impl(self, flow: Any, x: Any) -> dict[str, Any]:
        jax, jnp = self.jax, self.jnp
        dim = x.shape[-1]

        def one(v: Any) -> Any:
            return flow.forward_and_log_det(v)[0]

        jac = jax.vmap(jax.jacrev(one))(x.reshape(-1, dim)).reshape(*x.shape, dim)

        def loss(f: Any, direction: str) -> Any:
            out, ladj = getattr(f, direction)(x)
            return _loss(out, ladj, jnp.sin)

        grads = {
            d: jax.grad(loss)(flow, d).params
            for d in ("forward_and_log_det", "inverse_and_log_det")
        }
        return {"logdet_autodiff": jnp.linalg.slogdet(jac)[1], "grads": grads}

    def evaluate(self, flow: Any, x: np.ndarray) -> dict[str, Any]:
        return _to_numpy(self._evaluate(flow, self.jnp.asarray(x)))

    def derivatives(self, flow: Any, x: np.ndarray) -> dict[str, Any]:
        return _to_numpy(self._derivatives(flow, self.jnp.asarray(x)))


def _to_numpy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def case_names(spec: FlowSpec, dim: int) -> list[str]:
    """The parameter names the spec declares, in order."""
    return list(spec.parameter_shapes(dim))


@functools.cache
def driver(backend: str) -> _Torch | _Jax:
    """The driver of `backend` (``"pyro"`` or ``"numpyro"``), importing it on first use."""
    return _Torch() if backend == "pyro" else _Jax()


@functools.cache
def random_report(name: str, backend: str, batch: tuple[int, ...], part: str) -> dict[str, Any]:
    """The driver's `part` (``"evaluate"`` or ``"derivatives"``) of the randomised flow of case
    `name` at `points` of shape ``(*batch, dim)``, computed once per session."""
    case, drv = CASES[name], driver(backend)
    flow = drv.build(case, random_weights(case.spec, case.dim))
    x = points(case.dim, batch)
    return {"x": x, **getattr(drv, part)(flow, x)}
