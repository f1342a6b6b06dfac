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
from flowguides.core.hessian import Blocks, check_tolerance, probe_weights, shared_rank

__all__ = ["hessian_diagonal", "shared_diagonal"]


def hessian_diagonal(
    energy: Callable[[jax.Array], jax.Array],
    point: jax.Array,
    block_size: int | None = None,
    colors: tuple[np.ndarray, np.ndarray] | None = None,
    blocks: Blocks | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array, tuple[jax.Array, ...], jax.Array]:
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
        blocks: with `colors`, the layout's `flowguides.core.hessian.Blocks`: also return the
            sparse form of ``H`` from the same products (`shared_diagonal`) and the
            singletons' unit products, kept whole.

    Returns:
        ``diag H``, shape ``(d,)``; with `blocks`, ``(diag H, the singletons' rows (s, d),
        the families' blocks (G, k, k) each, whether they are the whole H)``.
    """
    dim = point.shape[0]
    block = min(FULL_RANK_MAX_DIM if block_size is None else block_size, dim)
    _, pullback = jax.vjp(jax.grad(energy), point)

    def product(tangent: jax.Array) -> jax.Array:
        return pullback(tangent)[0]  # H symmetric: the reverse product is H v too

    diagonal, need, terms = shared_diagonal(product, point, block, colors, blocks)
    if blocks is not None:  # the singletons' unit products, kept whole
        single = blocks.singletons
        units = jax.nn.one_hot(single, dim, dtype=point.dtype)
        rows = lax.map(product, units, batch_size=block) if len(single) else units
        diagonal = diagonal.at[single].set(rows[np.arange(len(single)), single])
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
    return diagonal if blocks is None else (diagonal, rows, *terms)


def shared_diagonal(
    product: Callable[[jax.Array], jax.Array],
    point: jax.Array,
    block_size: int,
    colors: tuple[np.ndarray, np.ndarray] | None,
    blocks: Blocks | None = None,
) -> tuple[jax.Array, jax.Array, tuple | None]:
    """``(diagonal, need, terms)``: the shared colours' diagonal entries from their probes,
    which coordinates still need a unit product (colours of one, colours whose test failed;
    all without `colors`), and with `blocks` ``(the families' blocks, whether the Hessian is
    block diagonal in each family and no colour reaches another family)``
    (`flowguides.core.hessian`), else None. `product` is ``v -> H v`` (the Pyro backend's
    takes the batched energies)."""
    dim = point.shape[0]
    diagonal, need = jnp.zeros_like(point), jnp.ones(dim, bool)
    if colors is None or not np.any(colors[1]):
        return diagonal, need, None if blocks is None else ((), jnp.asarray(False))
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
    diagonal = diagonal.at[coords].set(ones)
    need = need.at[coords].set(failed[rank[coords]] > 0)
    if blocks is None:
        return diagonal, need, None
    # the families' blocks and their test (flowguides.core.hessian)
    size = jnp.abs(diagonal)
    largest = jax.ops.segment_max(size[coords], rank[coords], num_segments=num)
    weight = np.abs(probes[num:]).max(axis=1)  # the normal probes' largest weight, per colour
    family = np.full(dim, -1)
    found, passed = [], jnp.asarray(True)
    for f, idx in enumerate(blocks.families):
        family[idx] = f
        r = rank[idx[0]]  # each position's colour's row
        ones_at = products[r[:, None, None], idx[None]]  # (p, g, q): H[idx[g, q], idx[g, p]]
        normal_at = products[num + r[:, None, None], idx[None]]
        w = probes[num + r[:, None], idx.T][..., None]  # the weight of (g, p)
        bound = tol * jnp.sqrt(size[idx][None] * largest[r][:, None, None])
        small = (jnp.abs(ones_at) <= bound) & (
            jnp.abs(normal_at) <= bound * weight[r][:, None, None]
        )
        exact = jnp.abs(normal_at - ones_at * w) <= tol * (
            jnp.abs(normal_at) + jnp.abs(ones_at * w)
        )
        passed = passed & jnp.all(exact | small)
        block = jnp.transpose(ones_at, (1, 2, 0))  # (g, q, p)
        found.append((block + jnp.swapaxes(block, 1, 2)) / 2)
    # no colour's products reach another family's coordinates
    colour_family = np.full(num, -1)
    colour_family[rank[coords]] = family[coords]
    other = family[coords][None, :] != colour_family[:, None]
    bound = tol * jnp.sqrt(size[coords][None, :] * largest[:, None])
    reach = (jnp.abs(products[:num, coords]) > bound) | (
        jnp.abs(products[num:, coords]) > bound * weight[:, None]
    )
    sparse = passed & jnp.all(failed == 0) & ~jnp.any(other & reach)
    return diagonal, need, (tuple(found), sparse)
