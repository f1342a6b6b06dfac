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
from flowguides.core.hessian import check_tolerance, probe_weights, shared_rank, singletons

__all__ = ["hessian_diagonal", "shared_diagonal"]


def hessian_diagonal(
    energies: Callable[[torch.Tensor], torch.Tensor],
    point: torch.Tensor,
    block_size: int | None = None,
    colors: tuple[np.ndarray, np.ndarray] | None = None,
    rows: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, bool]:
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
        rows: also return the rows of ``H`` at the `flowguides.core.hessian.singletons`
            (their unit products, ``(s, d)``) and whether the Hessian is that sparse (every
            shared colour passed and none reaches another's coordinates); needs `colors`.

    Returns:
        ``diag H``, shape ``(d,)``; with `rows`, ``(diag H, rows, sparse)``.
    """
    dim = point.numel()
    block_size = FULL_RANK_MAX_DIM if block_size is None else block_size
    diagonal, need, sparse = shared_diagonal(energies, point, block_size, colors)
    kept = []
    single = singletons(colors) if rows else np.zeros(0, np.int64)
    need[single] = False
    # the singletons' unit products (kept whole with `rows`), then the coordinates left over
    for todo, keep in ((single, True), (np.flatnonzero(need), False)):
        for start in range(0, len(todo), block_size):
            coords = torch.as_tensor(todo[start : start + block_size], device=point.device)
            units = torch.nn.functional.one_hot(coords, dim).to(point.dtype)
            found = _products(energies, point, units)
            diagonal[coords] = found[torch.arange(len(coords), device=point.device), coords]
            kept += [found] if keep else []
    if not rows:
        return diagonal
    return diagonal, torch.cat(kept) if kept else point.new_zeros((0, dim)), sparse


def shared_diagonal(
    energies: Callable[[torch.Tensor], torch.Tensor],
    point: torch.Tensor,
    block_size: int,
    colors: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[torch.Tensor, np.ndarray, bool]:
    """``(diagonal, need, sparse)``: the shared colours' diagonal entries from their probes,
    which coordinates still need a unit product (colours of one, colours whose test failed;
    all without `colors`), and whether every shared colour passed and none's products reach
    another's coordinates (`flowguides.core.hessian`; False without a shared colour)."""
    diagonal, need = torch.zeros_like(point), np.ones(point.numel(), bool)
    if colors is None or not np.any(colors[1]):
        return diagonal, need, False
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
    # colour r's products at another colour's coordinate i, against sqrt(|h_i| max_r |h|)
    size = ones.abs()
    largest = torch.zeros(num, dtype=size.dtype, device=size.device)
    largest = largest.scatter_reduce(0, rows, size, "amax")
    weight = probes[num:].abs().amax(1)  # the normal probes' largest weight, per colour
    bound = tol * (size[None, :] * largest[:, None]).sqrt()
    other = rows[None, :] != torch.arange(num, device=point.device)[:, None]
    reach = (products[:num, at].abs() > bound) | (
        products[num:, at].abs() > bound * weight[:, None]
    )
    sparse = not failed.any() and not bool((other & reach).any())
    diagonal[at] = ones
    need[coords] = failed[rank[coords]]
    return diagonal, need, sparse


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
