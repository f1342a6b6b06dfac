"""RealNVP affine couplings (Dinh et al., 2016), soft-clamped, identity at initialisation.

Each coupling keeps ``x[..., :d1]`` (``d1 = dim // 2``) and maps the rest by
``x2 * exp(s) + t`` with ``(t, raw) = MLP(x1)`` and ``s = clamp * tanh(raw / clamp)`` (in the
sampling direction, or in the density direction with ``orientation="density"``); the spec's
permutations sit between couplings. The `repeat` couplings' weights are stacked along a
leading axis and applied with one `jax.lax.scan` (one compiled body whatever `repeat` is).

The public names match `flowguides.pyro.coupling` except framework-only helpers: here the
functional `dense_init`, `init_realnvp` and `mlp` (a JAX layer's weights are a pytree built by
a separate initialiser); there the torch module `StackedLinear`.

References:
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flowguides.numpyro._base import FlowLayerTransform, as_init_random
from flowguides.spec import RealNVPSpec

__all__ = ["ACTIVATIONS", "RealNVP", "dense_init", "init_realnvp", "mlp"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "softplus": jax.nn.softplus,
}


def dense_init(
    key: jax.Array, sizes: Sequence[int], lead: tuple[int, ...], dtype: jnp.dtype
) -> dict[str, jax.Array]:
    """``net.{j}.weight (*lead, out, in)`` and ``net.{j}.bias``: uniform ``±1/sqrt(in)``
    (torch's `nn.Linear` default), the last layer zero."""
    params = {}
    rng = as_init_random(key)
    last = len(sizes) - 2
    for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = 1.0 / math.sqrt(n_in)
        for name, shape in (("weight", (*lead, n_out, n_in)), ("bias", (*lead, n_out))):
            value = rng.uniform(shape, dtype, -bound, bound)
            params[f"net.{j}.{name}"] = np.zeros(shape, dtype) if j == last else value
    return params


def mlp(params: Mapping[str, jax.Array], x: jax.Array, depth: int, activation: str) -> jax.Array:
    """The conditioner ``h -> h @ W.T + b`` with `activation` between (not after) layers."""
    act = ACTIVATIONS[activation]
    for j in range(depth):
        x = x @ params[f"net.{j}.weight"].T + params[f"net.{j}.bias"]
        if j < depth - 1:
            x = act(x)
    return x


def init_realnvp(spec: RealNVPSpec, dim: int, key: jax.Array, dtype: jnp.dtype) -> dict:
    """The stacked conditioner weights of `spec.repeat` couplings, each one the identity."""
    return dense_init(key, spec.mlp_sizes(dim), (spec.repeat,), dtype)


class RealNVP(FlowLayerTransform):
    """`repeat` affine couplings with the spec's permutations between them.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> spec = RealNVPSpec(repeat=2, hidden=(4,), permutation="reverse")
        >>> t = RealNVP(init_realnvp(spec, 3, jax.random.key(0), jnp.float64), spec, 3)
        >>> y, ladj = t.forward_and_log_det(jnp.arange(3.0))
        >>> y.tolist(), float(ladj)  # identity at init, up to the reversal between layers
        ([2.0, 1.0, 0.0], 0.0)
    """

    def _scan_inputs(self, inverse: bool) -> tuple[dict[str, jax.Array], jax.Array]:
        perms = self.spec.permutations(self.dim) + [list(range(self.dim))]
        perms = np.asarray(perms, dtype=np.int32)
        if inverse:
            perms = np.argsort(perms, axis=-1).astype(np.int32)
        return self.params, jnp.asarray(perms)

    def _shift_log_scale(self, p: Mapping[str, jax.Array], x1: jax.Array):
        depth = len(self.spec.hidden) + 1
        out = mlp(p, x1, depth, self.spec.activation)
        d2 = self.dim - self.dim // 2
        clamp = self.spec.scale_clamp
        return out[..., :d2], clamp * jnp.tanh(out[..., d2:] / clamp)

    def _affine(self, p: Mapping[str, jax.Array], z: jax.Array, sign: int):
        """One coupling's ``(z, log|det|)``: ``z2 * exp(s) + t`` (`sign` 1) or its inverse."""
        d1 = self.dim // 2
        t, s = self._shift_log_scale(p, z[..., :d1])
        z2 = z[..., d1:] * jnp.exp(s) + t if sign > 0 else (z[..., d1:] - t) * jnp.exp(-s)
        return jnp.concatenate([z[..., :d1], z2], axis=-1), sign * jnp.sum(s, axis=-1)

    @property
    def _orient(self) -> int:
        """1 where the forward (sampling) direction is ``z2 * exp(s) + t``."""
        return -1 if self.spec.orientation == "density" else 1

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        def layer(carry: tuple[jax.Array, jax.Array], inputs: tuple[dict, jax.Array]):
            z, ladj = carry
            p, perm = inputs
            z, step = self._affine(p, z, self._orient)
            return (z[..., perm], ladj + step), None

        init = (x, jnp.zeros(x.shape[:-1], x.dtype))
        return lax.scan(layer, init, self._scan_inputs(inverse=False))[0]

    def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        def layer(carry: tuple[jax.Array, jax.Array], inputs: tuple[dict, jax.Array]):
            z, ladj = carry
            p, inv_perm = inputs
            z, step = self._affine(p, z[..., inv_perm], -self._orient)
            return (z, ladj + step), None

        init = (y, jnp.zeros(y.shape[:-1], y.dtype))
        return lax.scan(layer, init, self._scan_inputs(inverse=True), reverse=True)[0]
