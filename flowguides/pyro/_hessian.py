"""The diagonal of a Hessian from Hessian-vector products: exact, without the ``d x d`` matrix.

The start search's diagonal Laplace whitening (`flowguides.pyro.laplace`) above
`FULL_RANK_MAX_DIM` dimensions. With the latent layout's colours
(`flowguides.core.hessian`), the coordinates of one site that differ only in their batch
index share their products where a test shows their block of the Hessian is diagonal. The
public names and contracts match `flowguides.numpyro._hessian`; torch differentiates a batch
of copies of the point (one product per copy) where JAX maps the reverse product.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from flowguides.core import FULL_RANK_MAX_DIM
from flowguides.core.hessian import Blocks, check_tolerance, probe_weights, shared_rank

__all__ = ["hessian_diagonal", "shared_diagonal"]


def hessian_diagonal(
    energies: Callable[[torch.Tensor], torch.Tensor],
    point: torch.Tensor,
    block_size: int | None = None,
    colors: tuple[np.ndarray, np.ndarray] | None = None,
    blocks: Blocks | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], bool]:
    """The exact diagonal of the Hessian of a scalar function at `point`, without the Hessian.

    `energies` maps a batch of points ``(B, d)`` to one value per point ``(B,)``, each row's
    value depending on that row alone (a vectorised model, or a loop over draws). Products
    ``H v`` for a block of `block_size` vectors come from one batch of copies of `point`,
    differentiated twice: the gradient ``g_b`` of row `b`, then the gradient of
    ``sum_b g_b . v_b``, whose row `b` is ``H v_b``; memory ``block_size x d`` plus
    `block_size` copies of the model's own. Without `colors`, ``H[i, i]`` is entry ``i`` of
    ``H e_i``: ``d`` products. With `colors` (`flowguides.core.hessian.hessian_colors`), the
    coordinates of a shared colour take theirs from one product with the vector that is 1 on
    them, where a second, with standard-normal weights ``g`` on them, shows that their block
    of ``H`` is diagonal (``(H g)_i = H[i, i] g_i`` to `flowguides.core.hessian.check_tolerance`);
    every other coordinate (a colour of one, or a colour whose test fails) gets its unit
    product: exact either way, in ``2 S`` products plus the coordinates left over.

    Args:
        energies: the batched function (e.g. a negative log joint per draw).
        point: where, shape ``(d,)``.
        block_size: products per pass (default `FULL_RANK_MAX_DIM`).
        colors: ``(colour per coordinate, whether each colour is shared)``, or None.
        blocks: with `colors`, the layout's `flowguides.core.hessian.Blocks`: also return the
            sparse form of ``H`` from the same products (`shared_diagonal`) and the
            singletons' unit products, kept whole.

    Returns:
        ``diag H``, shape ``(d,)``; with `blocks`, ``(diag H, the singletons' rows (s, d),
        the families' blocks (G, k, k) each, whether they are the whole H)``.
    """
    dim = point.numel()
    block_size = FULL_RANK_MAX_DIM if block_size is None else block_size
    diagonal, need, terms = shared_diagonal(energies, point, block_size, colors, blocks)
    kept = []
    single = np.zeros(0, np.int64) if blocks is None else blocks.singletons
    need[single] = False
    # the singletons' unit products (kept whole with `rows`), then the coordinates left over
    for todo, keep in ((single, True), (np.flatnonzero(need), False)):
        for start in range(0, len(todo), block_size):
            coords = torch.as_tensor(todo[start : start + block_size], device=point.device)
            units = torch.nn.functional.one_hot(coords, dim).to(point.dtype)
            found = _products(energies, point, units)
            diagonal[coords] = found[torch.arange(len(coords), device=point.device), coords]
            kept += [found] if keep else []
    if blocks is None:
        return diagonal
    return diagonal, torch.cat(kept) if kept else point.new_zeros((0, dim)), *terms


def shared_diagonal(
    energies: Callable[[torch.Tensor], torch.Tensor],
    point: torch.Tensor,
    block_size: int,
    colors: tuple[np.ndarray, np.ndarray] | None,
    blocks: Blocks | None = None,
) -> tuple[torch.Tensor, np.ndarray, tuple | None]:
    """``(diagonal, need, terms)``: the shared colours' diagonal entries from their probes,
    which coordinates still need a unit product (colours of one, colours whose test failed;
    all without `colors`), and with `blocks` ``(the families' blocks, whether the Hessian is
    block diagonal in each family and no colour reaches another family)``
    (`flowguides.core.hessian`), else None."""
    diagonal, need = torch.zeros_like(point), np.ones(point.numel(), bool)
    if colors is None or not np.any(colors[1]):
        return diagonal, need, None if blocks is None else ((), False)
    color, shared = colors
    dtype = torch.empty((), dtype=point.dtype).numpy().dtype
    probes = torch.as_tensor(probe_weights(color, shared, dtype), device=point.device)
    products = torch.cat([_products(energies, point, probes[i : i + block_size])
                          for i in range(0, len(probes), block_size)])  # fmt: skip
    num, rank = int(np.sum(shared)), shared_rank(shared)[color]
    coords = np.flatnonzero(rank >= 0)  # the shared colours' coordinates
    rows = torch.as_tensor(rank[coords], device=point.device)
    at = torch.as_tensor(coords, device=point.device)
    ones, tested = products[rows, at], products[num + rows, at]
    scaled = ones * probes[num + rows, at]
    tol = check_tolerance(dtype)
    ok = ((tested - scaled).abs() <= tol * (tested.abs() + scaled.abs())).cpu().numpy()
    failed = np.zeros(num, bool)  # a colour passes where every one of its coordinates does
    np.logical_or.at(failed, rank[coords], ~ok)
    diagonal[at] = ones
    need[coords] = failed[rank[coords]]
    if blocks is None:
        return diagonal, need, None
    # the families' blocks and their test (flowguides.core.hessian)
    size = diagonal.abs()
    largest = size.new_zeros(num).scatter_reduce(0, rows, size[at], "amax")
    weight = probes[num:].abs().amax(1)  # the normal probes' largest weight, per colour
    family = np.full(point.numel(), -1)
    found, passed = [], not failed.any()
    for f, idx in enumerate(blocks.families):
        family[idx] = f
        r = torch.as_tensor(rank[idx[0]], device=point.device)  # each position's colour's row
        where = torch.as_tensor(idx, device=point.device)
        ones_at = products[r[:, None, None], where[None]]  # (p, g, q): H[idx[g, q], idx[g, p]]
        normal_at = products[num + r[:, None, None], where[None]]
        w = probes[num + r[:, None], where.T][..., None]  # the weight of (g, p)
        bound = tol * (size[where][None] * largest[r][:, None, None]).sqrt()
        small = (ones_at.abs() <= bound) & (normal_at.abs() <= bound * weight[r][:, None, None])
        exact = (normal_at - ones_at * w).abs() <= tol * (normal_at.abs() + (ones_at * w).abs())
        passed = passed and bool((exact | small).all())
        block = ones_at.permute(1, 2, 0)  # (g, q, p)
        found.append((block + block.transpose(1, 2)) / 2)
    # no colour's products reach another family's coordinates
    colour_family = np.full(num, -1)
    colour_family[rank[coords]] = family[coords]
    other = torch.as_tensor(family[coords][None, :] != colour_family[:, None], device=point.device)
    bound = tol * (size[at][None, :] * largest[:, None]).sqrt()
    reach = (products[:num, at].abs() > bound) | (
        products[num:, at].abs() > bound * weight[:, None]
    )
    return diagonal, need, (tuple(found), passed and not bool((other & reach).any()))


def _products(
    energies: Callable[[torch.Tensor], torch.Tensor], point: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """``H v`` for each row ``v`` of `vectors` ``(B, d)``, from one batch of `B` copies."""
    z = point.detach().expand(len(vectors), point.numel()).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(energies(z).sum(), z, create_graph=True)
    picked = (grad * vectors).sum()
    if not picked.requires_grad:  # the gradient does not depend on z: H is 0 there
        return torch.zeros_like(z.detach())
    (hvp,) = torch.autograd.grad(picked, z, allow_unused=True)
    return torch.zeros_like(z.detach()) if hvp is None else hvp.detach()
