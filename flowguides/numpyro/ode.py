"""Neural-ODE flows (Chen et al., 2018; Grathwohl et al., 2019) solved with diffrax.

``dz/dt = f(z, t)``, `f` an MLP of concatsquash layers; the state is augmented with the
log-determinant, ``d(ladj)/dt = tr(df/dz)``, computed exactly (one vector-Jacobian product per
dimension, vmapped) or by Hutchinson's estimator with one noise draw held fixed for the whole
solve. Base at ``t = 0``, data at ``t = t1``; the inverse integrates from ``t1`` back to 0.
The whole batch is one ODE state (one step-size sequence for the batch, as in torchdiffeq).

Solvers: ``dopri5``/``tsit5`` (adaptive, `diffrax.PIDController` with the spec's `rtol`/`atol`,
at most `max_steps` steps: more raises an error saying so), ``rk4`` (Kutta's 3/8 rule, the
``rk4`` of torchdiffeq, written as a diffrax Butcher tableau) and ``euler`` (`num_steps` fixed
steps). Gradients: `diffrax.RecursiveCheckpointAdjoint`, or `diffrax.BacksolveAdjoint` when
``spec.adjoint`` is set.

References:
    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018.
    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from flowguides.numpyro._base import FlowLayerTransform
from flowguides.numpyro.coupling import ACTIVATIONS
from flowguides.spec import NeuralODESpec

__all__ = ["NeuralODE", "RK4", "init_neural_ode", "vector_field"]


class RK4(diffrax.AbstractERK):
    """Kutta's 3/8-rule fourth-order Runge-Kutta method (torchdiffeq's ``rk4``), fixed steps."""

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]),
        b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
        b_error=np.zeros(4),
        a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])),
    )
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms: object) -> int:
        del terms
        return 4


_SOLVERS = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "rk4": RK4, "euler": diffrax.Euler}


def init_neural_ode(spec: NeuralODESpec, dim: int, key: jax.Array, dtype: jnp.dtype) -> dict:
    """Hidden layers uniform ``±1/sqrt(in)``, gates and time biases 0, the last layer zero."""
    sizes = spec.mlp_sizes(dim)
    last = len(sizes) - 2
    params = {}
    for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / math.sqrt(n_in)
        w = jax.random.uniform(kw, (n_out, n_in), dtype, -bound, bound)
        b = jax.random.uniform(kb, (n_out,), dtype, -bound, bound)
        params[f"net.{j}.weight"] = jnp.zeros_like(w) if j == last else w
        params[f"net.{j}.bias"] = jnp.zeros_like(b) if j == last else b
        for name in ("gate_weight", "gate_bias", "time_bias"):
            params[f"net.{j}.{name}"] = jnp.zeros((n_out,), dtype)
    return params


def vector_field(
    params: Mapping[str, jax.Array], spec: NeuralODESpec, t: jax.Array, z: jax.Array
) -> jax.Array:
    """``f(z, t)``: concatsquash layers ``(h W^T + b) sigmoid(g_w t + g_b) + c t``."""
    act = ACTIVATIONS[spec.activation]
    depth = len(spec.hidden) + 1
    h = z
    for j in range(depth):
        p = f"net.{j}."
        gate = jax.nn.sigmoid(params[p + "gate_weight"] * t + params[p + "gate_bias"])
        h = (h @ params[p + "weight"].T + params[p + "bias"]) * gate + params[p + "time_bias"] * t
        if j < depth - 1:
            h = act(h)
    return h


class NeuralODE(FlowLayerTransform):
    """One neural-ODE block from ``t = 0`` (base) to ``t = t1`` (data).

    `key` fixes the Hutchinson noise of a solve (unused with the exact trace); without a key
    the Hutchinson estimator uses ``jax.random.key(0)``.
    """

    def _dynamics(self):
        spec = self.spec
        eye = np.eye(self.dim)  # a constant, not a tracer: BacksolveAdjoint needs closed-over
        # values to be constants, so the parameters and the noise travel in `args`

        def rhs(t: jax.Array, state: tuple[jax.Array, jax.Array], args: tuple):
            params, noise = args
            z, _ = state
            dz, vjp = jax.vjp(lambda z_: vector_field(params, spec, t, z_), z)
            if noise is None:
                rows = jax.vmap(lambda e: vjp(jnp.broadcast_to(e.astype(z.dtype), z.shape))[0])(eye)
                diag = eye.reshape((self.dim,) + (1,) * (z.ndim - 1) + (self.dim,))
                trace = jnp.sum(rows * diag, axis=(0, -1))
            else:
                trace = jnp.sum(vjp(noise)[0] * noise, axis=-1)
            return dz, trace

        return rhs

    def _noise(self, z: jax.Array) -> jax.Array | None:
        if self.spec.resolved_trace(self.dim) == "exact":
            return None
        key = jax.random.key(0) if self.key is None else self.key
        if self.spec.noise == "rademacher":
            return jax.random.rademacher(key, z.shape, dtype=z.dtype)
        return jax.random.normal(key, z.shape, dtype=z.dtype)

    def _solve(self, z: jax.Array, inverse: bool) -> tuple[jax.Array, jax.Array]:
        spec = self.spec
        t0, t1 = (spec.t1, 0.0) if inverse else (0.0, spec.t1)
        if spec.solver in ("rk4", "euler"):
            controller = diffrax.ConstantStepSize()
            dt0, max_steps = (t1 - t0) / spec.num_steps, spec.num_steps
        else:
            controller = diffrax.PIDController(rtol=spec.rtol, atol=spec.atol)
            dt0, max_steps = None, spec.max_steps
        adjoint = (
            diffrax.BacksolveAdjoint() if spec.adjoint else diffrax.RecursiveCheckpointAdjoint()
        )
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(self._dynamics()),
            _SOLVERS[spec.solver](),
            t0,
            t1,
            dt0,
            (z, jnp.zeros(z.shape[:-1], z.dtype)),
            args=(self.params, self._noise(z)),
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=False,
        )
        z, ladj = sol.ys[0][0], sol.ys[1][0]
        failed = sol.result != diffrax.RESULTS.successful
        message = (
            f"neural_ode: the {spec.solver} solve did not reach t={t1} within max_steps="
            f"{max_steps} steps; raise max_steps or loosen rtol/atol"
        )
        return eqx.error_if(z, failed, message), ladj

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._solve(x, inverse=False)

    def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._solve(y, inverse=True)
