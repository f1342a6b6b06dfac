"""Planar layers (Rezende & Mohamed, 2015) with the `u`-hat reparametrisation and an exact inverse.

``y = z + u_hat tanh(w.z + b)`` with ``u_hat = u + (softplus(w.u) - 1 - w.u) w / |w|^2``, so
``u_hat.w = softplus(w.u) - 1 > -1`` and the map is strictly monotone along `w`. The inverse
solves the scalar equation ``a + (u_hat.w) tanh(a) = w.y + b`` by Newton's method safeguarded
by bisection inside the bracket ``[s - |c|, s + |c|]``; `jax.lax.custom_root` gives gradients
through the solve by the implicit-function theorem. `repeat` layers are stacked along a leading
axis and applied with `jax.lax.scan`.

The public names match `flowguides.pyro.planar` except `init_planar` (a JAX layer's weights
are a pytree built by a separate initialiser; a torch layer holds its own).

References:
    Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flowguides.numpyro._base import FlowLayerTransform, as_init_random, batched_dot
from flowguides.spec import PlanarSpec

__all__ = ["Planar", "init_planar", "planar_u_hat", "solve_planar"]

_SOLVER_ITERATIONS = 60


def planar_u_hat(u: jax.Array, w: jax.Array) -> jax.Array:
    """``u + (softplus(w.u) - 1 - w.u) w / |w|^2``, the invertibility-preserving `u`."""
    wu = jnp.dot(w, u)
    return u + (jax.nn.softplus(wu) - 1.0 - wu) * w / jnp.dot(w, w)


def _bracketed_newton(c: jax.Array, s: jax.Array) -> jax.Array:
    """Root of ``a + c tanh(a) - s`` (elementwise, ``c > -1``) to float tolerance."""
    lo = s - jnp.abs(c)
    hi = s + jnp.abs(c)

    def step(_: int, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        a, lo, hi = carry
        th = jnp.tanh(a)
        f = a + c * th - s
        lo = jnp.where(f < 0, a, lo)
        hi = jnp.where(f > 0, a, hi)
        newton = a - f / (1.0 + c * (1.0 - th * th))
        inside = (newton >= lo) & (newton <= hi)
        return jnp.where(inside, newton, 0.5 * (lo + hi)), lo, hi

    return lax.fori_loop(0, _SOLVER_ITERATIONS, step, (s, lo, hi))[0]


def solve_planar(c: jax.Array, s: jax.Array) -> jax.Array:
    """Solve ``a + c tanh(a) = s`` for `a`, differentiable in `c` and `s` (implicit gradients)."""
    return lax.custom_root(
        lambda a: a + c * jnp.tanh(a) - s,
        s,
        lambda _, a0: _bracketed_newton(c, lax.stop_gradient(s)),
        lambda g, y: y / g(jnp.ones_like(y)),
    )


def init_planar(spec: PlanarSpec, dim: int, key: jax.Array, dtype: jnp.dtype) -> dict:
    """``w ~ N(0, 1/dim)``, ``b = 0``, ``u = log(e - 1) w / |w|^2`` (so ``u_hat = 0``)."""
    w = as_init_random(key).normal((spec.repeat, dim), dtype) / math.sqrt(dim)
    u = math.log(math.e - 1.0) * w / (w * w).sum(axis=-1, keepdims=True)
    return {"u": u, "w": w, "b": np.zeros((spec.repeat,), dtype)}


class Planar(FlowLayerTransform):
    """`repeat` planar layers; params ``u (R, dim)``, ``w (R, dim)``, ``b (R,)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = init_planar(PlanarSpec(repeat=2), 3, jax.random.key(0), jnp.float64)
        >>> t = Planar(params, PlanarSpec(repeat=2), 3)
        >>> y, ladj = t.forward_and_log_det(jnp.ones(3))
        >>> bool(jnp.allclose(y, 1.0)), abs(float(ladj)) < 1e-12  # identity at init
        (True, True)
    """

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        def layer(carry: tuple[jax.Array, jax.Array], p: tuple[jax.Array, ...]):
            z, ladj = carry
            u, w, b = p
            u_hat = planar_u_hat(u, w)
            th = jnp.tanh(batched_dot(z, w) + b)
            z = z + u_hat * th[..., None]
            ladj = ladj + jnp.log(jnp.abs(1.0 + (1.0 - th * th) * jnp.dot(u_hat, w)))
            return (z, ladj), None

        init = (x, jnp.zeros(x.shape[:-1], x.dtype))
        p = self.params
        return lax.scan(layer, init, (p["u"], p["w"], p["b"]))[0]

    def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        def layer(carry: tuple[jax.Array, jax.Array], p: tuple[jax.Array, ...]):
            z, ladj = carry
            u, w, b = p
            u_hat = planar_u_hat(u, w)
            c = jnp.dot(u_hat, w)
            th = jnp.tanh(solve_planar(c, batched_dot(z, w) + b))
            z = z - u_hat * th[..., None]
            ladj = ladj - jnp.log(jnp.abs(1.0 + (1.0 - th * th) * c))
            return (z, ladj), None

        init = (y, jnp.zeros(y.shape[:-1], y.dtype))
        p = self.params
        return lax.scan(layer, init, (p["u"], p["w"], p["b"]), reverse=True)[0]
