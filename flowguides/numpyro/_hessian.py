"""The diagonal of a Hessian from Hessian-vector products: exact, without the ``d x d`` matrix.

The start search's diagonal Laplace whitening (`flowguides.numpyro.laplace`) above
`FULL_RANK_MAX_DIM` dimensions. With the latent layout's colours
(`flowguides.core.hessian`), the coordinates of one site that differ only in their batch
index share their products where a test shows their block of the Hessian is diagonal. The
public names and contracts match `flowguides.pyro._hessian`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flowguides.core import FULL_RANK_MAX_DIM
from flowguides.core.hessian import check_tolerance, probe_weights, shared_rank, singletons

__all__ = ["hessian_diagonal", "shared_diagonal"]


def hessian_diagonal(
    energy: Callable[[jax.Array], jax.Array],
    point: jax.Array,
    block_size: int | None = None,
    colors: tuple[np.ndarray, np.ndarray] | None = None,
    rows: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """The exact diagonal of the Hessian of the scalar `energy` at `point`, without the Hessian.

    Products ``H v`` are reverse-mode derivatives of the gradient with cotangent ``v`` (reverse
    mode only, so a model with a ``jax.custom_vjp`` function, which forward mode cannot
    differentiate, works), `block_size` of them at a time as one vectorised product
    (`jax.vmap`), with memory ``block_size x d`` plus the model's own for `block_size`
    evaluations, instead of the ``d x d`` Hessian. Without `colors`, ``H[i, i]`` is entry
    ``i`` of ``H e_i``: ``d`` products. With `colors` (`flowguides.core.hessian.hessian_colors`), the
    coordinates of a shared colour take theirs from one product with the vector that is 1 on
    them, where a second, with standard-normal weights ``g`` on them, shows that their block
    of ``H`` is diagonal (``(H g)_i = H[i, i] g_i`` to `flowguides.core.hessian.check_tolerance`);
    every other coordinate (a colour of one, or a colour whose test fails) gets its unit
    product: exact either way, in ``2 S`` products plus the coordinates left over.

    Args:
        energy: the function (e.g. the negative log joint of the packed latent vector).
        point: where, shape ``(d,)``.
        block_size: products per vectorised call (default `FULL_RANK_MAX_DIM`).
        colors: ``(colour per coordinate, whether each colour is shared)``, or None.
        rows: also return the rows of ``H`` at the `flowguides.core.hessian.singletons`
            (their unit products, ``(s, d)``) and whether the Hessian is that sparse (every
            shared colour passed and none reaches another's coordinates); needs `colors`.

    Returns:
        ``diag H``, shape ``(d,)``; with `rows`, ``(diag H, rows, sparse)``.
    """
    dim = point.shape[0]
    block = min(FULL_RANK_MAX_DIM if block_size is None else block_size, dim)
    _, pullback = jax.vjp(jax.grad(energy), point)

    def product(tangent: jax.Array) -> jax.Array:
        return pullback(tangent)[0]  # H symmetric: the reverse product is H v too

    diagonal, need, sparse = shared_diagonal(product, point, block, colors)
    if rows:  # the singletons' unit products, kept whole
        single = singletons(colors)
        units = jax.nn.one_hot(single, dim, dtype=point.dtype)
        found = lax.map(product, units, batch_size=block) if len(single) else units
        diagonal = diagonal.at[single].set(found[np.arange(len(single)), single])
        need = need.at[single].set(False)
    # the rest, by unit products: the coordinates that need one first, a block at a time
    order = jnp.argsort(~need, stable=True)
    count = jnp.sum(need)

    def exact(carry: tuple) -> tuple:
        start, diagonal = carry
        slots = start + jnp.arange(block)
        coords = order[jnp.minimum(slots, dim - 1)]
        valid = slots < count
        tangents = jax.nn.one_hot(coords, dim, dtype=point.dtype) * valid[:, None]
        found = jax.vmap(product)(tangents)
        values = jnp.take_along_axis(found, coords[:, None], axis=1)[:, 0]
        diagonal = diagonal.at[jnp.where(valid, coords, dim)].set(values, mode="drop")
        return start + block, diagonal

    diagonal = lax.while_loop(lambda c: c[0] < count, exact, (jnp.asarray(0), diagonal))[1]
    return (diagonal, found, sparse) if rows else diagonal


def shared_diagonal(
    product: Callable[[jax.Array], jax.Array],
    point: jax.Array,
    block_size: int,
    colors: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(diagonal, need, sparse)``: the shared colours' diagonal entries from their probes,
    which coordinates still need a unit product (colours of one, colours whose test failed;
    all without `colors`), and whether every shared colour passed and none's products reach
    another's coordinates (`flowguides.core.hessian`; False without a shared colour).
    `product` is ``v -> H v`` (the Pyro backend's takes the batched energies)."""
    dim = point.shape[0]
    diagonal, need = jnp.zeros_like(point), jnp.ones(dim, bool)
    if colors is None or not np.any(colors[1]):
        return diagonal, need, jnp.asarray(False)
    color, shared = colors
    probes = probe_weights(color, shared, np.dtype(point.dtype))
    products = lax.map(product, jnp.asarray(probes), batch_size=block_size)
    num, rank = int(np.sum(shared)), shared_rank(shared)[color]
    coords = np.flatnonzero(rank >= 0)  # the shared colours' coordinates
    ones, tested = products[rank[coords], coords], products[num + rank[coords], coords]
    scaled = ones * probes[num + rank[coords], coords]
    tol = check_tolerance(point.dtype)
    ok = jnp.abs(tested - scaled) <= tol * (jnp.abs(tested) + jnp.abs(scaled))
    # a colour passes where every one of its coordinates does
    failed = jax.ops.segment_max((~ok).astype(jnp.int32), rank[coords], num_segments=num)
    # colour r's products at another colour's coordinate i, against sqrt(|h_i| max_r |h|)
    size = jnp.abs(ones)
    largest = jax.ops.segment_max(size, rank[coords], num_segments=num)
    weight = np.abs(probes[num:]).max(axis=1)  # the normal probes' largest weight, per colour
    bound = tol * jnp.sqrt(size[None, :] * largest[:, None])
    other = rank[coords][None, :] != np.arange(num)[:, None]
    reach = (jnp.abs(products[:num, coords]) > bound) | (
        jnp.abs(products[num:, coords]) > bound * weight[:, None]
    )
    sparse = jnp.all(failed == 0) & ~jnp.any(other & reach)
    diagonal = diagonal.at[coords].set(ones)
    return diagonal, need.at[coords].set(failed[rank[coords]] > 0), sparse
