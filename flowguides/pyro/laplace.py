"""The starts of an `AutoFlowGuide`: the Laplace whitening at the MAP, and the ``"auto"`` choice.

A Laplace start finds the MAP in unconstrained space (L-BFGS) and whitens with the Hessian `H`
of the negative log joint there: the fixed map ``z = MAP + L x`` with ``L`` the Cholesky factor
of ``H^-1`` up to `FULL_RANK_MAX_DIM` dimensions, and the diagonal ``1 / sqrt(diag H)`` (a
vector) above it or where `H` is not positive definite. The diagonal above `FULL_RANK_MAX_DIM`
comes from exact Hessian-vector products, one coordinate per draw of a batch (see
`hessian_diagonal`), so it needs neither the ``d x d`` Hessian nor ``d`` separate passes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flowguides.core import (
    AUTO_SCALES,
    FULL_RANK_MAX_DIM,
    MODE_TOLERANCE,
    LaplaceFallbackWarning,
)
from flowguides.pyro.build import Precondition

if TYPE_CHECKING:
    from flowguides.pyro.guide import AutoFlowGuide

__all__ = ["LaplaceFallbackWarning", "best_start", "hessian_diagonal", "laplace_start"]

Start = tuple  # (affine loc, affine scale, (shift, scale_tril) or None)

_BLOCK_ELEMENTS = 2**19  # copies of the model per Hessian-diagonal pass x values per copy


class _LeftSupport(Exception):
    """The MAP search evaluated the model outside a support (stop there, keep the best)."""


def hessian_diagonal(
    energies: Callable[[torch.Tensor], torch.Tensor],
    point: torch.Tensor,
    block_size: int | None = None,
) -> torch.Tensor:
    """The exact diagonal of the Hessian of a scalar function at `point`, without the Hessian.

    `energies` maps a batch of points ``(B, d)`` to one value per point ``(B,)``, each row's
    value depending on that row alone (a vectorised model, or a loop over draws). A batch of
    `block_size` copies of `point` is differentiated twice: the gradient ``g_b`` of row `b`,
    then the gradient of ``sum_b g_b[i_b]`` with ``i_b`` a different coordinate per row, whose
    row `b` is ``H[i_b, :]`` (a Hessian-vector product with the unit vector ``e_{i_b}``) and so
    holds ``H[i_b, i_b]``. ``ceil(d / block_size)`` double backward passes give all `d`
    entries exactly, with memory ``block_size x d`` plus `block_size` copies of the model's
    own; the work is that of `d` gradients of the model, whatever the block size.

    Args:
        energies: the batched function (e.g. a negative log joint per draw).
        point: where, shape ``(d,)``.
        block_size: coordinates per pass (default `FULL_RANK_MAX_DIM`).

    Returns:
        ``diag H``, shape ``(d,)``.
    """
    dim = point.numel()
    block_size = FULL_RANK_MAX_DIM if block_size is None else block_size
    diagonal = torch.zeros_like(point)
    for start in range(0, dim, block_size):
        coords = torch.arange(start, min(start + block_size, dim), device=point.device)
        rows = torch.arange(len(coords), device=point.device)
        z = point.detach().expand(len(coords), dim).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(energies(z).sum(), z, create_graph=True)
        picked = grad[rows, coords].sum()
        if not picked.requires_grad:  # the gradient does not depend on z: H is 0 there
            continue
        (hvp,) = torch.autograd.grad(picked, z, allow_unused=True)
        if hvp is not None:
            diagonal[coords] = hvp[rows, coords].detach()
    return diagonal


def laplace_start(guide: AutoFlowGuide, init: torch.Tensor, args: tuple, kwargs: dict) -> Start:
    """MAP in unconstrained space, then the Laplace whitening: the affine starts as the
    identity and the fixed preconditioner holds the MAP and the Cholesky factor of the
    inverse Hessian (its diagonal, as a vector, where the Hessian is not positive definite or
    the dimension exceeds `FULL_RANK_MAX_DIM`). Falls back to the 0.1 start without a mode."""

    def energy(z: torch.Tensor) -> torch.Tensor:
        return -guide.log_joint(z, *args, **kwargs)

    def energies(z: torch.Tensor) -> torch.Tensor:
        return -guide.batch_log_joint(z, args, kwargs)

    z = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], max_iter=2000, line_search_fn="strong_wolfe")
    best = [math.inf, init]  # the lowest finite energy seen, and where

    def closure() -> torch.Tensor:
        opt.zero_grad()
        try:
            value = energy(z)
        except ValueError as exc:  # the line search stepped outside a support
            raise _LeftSupport from exc
        if torch.isfinite(value) and float(value.detach()) < best[0]:
            best[:] = [float(value.detach()), z.detach().clone()]
        value.backward()
        return value

    try:
        opt.step(closure)
    except _LeftSupport:
        pass
    loc = best[1]
    full_rank = loc.numel() <= FULL_RANK_MAX_DIM
    if full_rank:
        hessian = torch.autograd.functional.hessian(energy, loc)
        hess = hessian.diagonal()
    else:
        hess = hessian_diagonal(energies, loc, _block_size(guide))
    good = torch.isfinite(hess) & (hess > 0)
    scale = torch.where(good, hess.clamp_min(1e-300).rsqrt(), torch.full_like(hess, 0.1))
    # A mode is stationary: its Newton step, in its own scale, is small. A density that
    # grows without bound (a funnel's scale collapsing to 0) leaves a large step behind.
    point = loc.clone().requires_grad_(True)
    grad = torch.autograd.grad(energy(point), point)[0].detach()
    moving = ~(grad.abs() * scale < MODE_TOLERANCE)
    if moving.any() or not _finite_around(energies, loc, scale):
        where = guide._coordinate_sites(torch.nonzero(moving).flatten().tolist())
        warnings.warn(
            "init_scale='laplace': the MAP search found no mode (the density grows "
            f"without bound along sites {where}, or is not finite around the point it "
            "reached); starting from the initial location with scale 0.1 instead",
            LaplaceFallbackWarning,
            stacklevel=4,
        )
        return init, torch.full_like(init, 0.1), None
    identity = (torch.zeros_like(loc), torch.ones_like(loc))
    if good.all() and full_rank:
        tril = _inverse_cholesky(hessian)
        if tril is not None:
            return (*identity, (loc, tril))
    if not good.all():
        bad = guide._coordinate_sites(torch.nonzero(~good).flatten().tolist())
        warnings.warn(
            f"init_scale='laplace': the Hessian diagonal is not positive for sites {bad}; "
            "using scale 0.1 there",
            LaplaceFallbackWarning,
            stacklevel=4,
        )
    return (*identity, (loc, scale))


def best_start(guide: AutoFlowGuide, init: torch.Tensor, args: tuple, kwargs: dict) -> Start:
    """The Laplace start or a plain start (`AUTO_SCALES`), whichever has the highest ELBO
    (256 draws, fixed seed)."""
    starts: list[Start] = [(init, torch.full_like(init, s), None) for s in AUTO_SCALES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LaplaceFallbackWarning)
        starts.append(laplace_start(guide, init, args, kwargs))
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn((256, init.numel()), generator=gen, dtype=init.dtype)

    def elbo(start: Start) -> float:
        loc, scale, fixed = start
        z, log_det = loc + scale * eps, scale.log().sum()
        if fixed is not None:
            z, fixed_log_det = Precondition(*fixed).forward_and_log_det(z)
            log_det = log_det + fixed_log_det[0]
        try:
            with torch.no_grad():
                log_p = guide.batch_log_joint(z, args, kwargs)
        except ValueError:  # values outside a support: the start is unusable
            return -math.inf
        value = float(log_p.mean() + log_det)
        return value if math.isfinite(value) else -math.inf

    return max(starts, key=elbo)


def _block_size(guide: AutoFlowGuide) -> int:
    """Coordinates per `hessian_diagonal` pass: as many copies of the model as keep about
    `_BLOCK_ELEMENTS` values (latents and every site's value) alive, at most
    `FULL_RANK_MAX_DIM`. Time hardly depends on it (the work is one copy per coordinate);
    memory grows with it."""
    values = guide.latent_dim + sum(
        site["value"].numel()
        for site in guide.model_trace.nodes.values()
        if site["type"] == "sample" and torch.is_tensor(site["value"])
    )
    return max(1, min(FULL_RANK_MAX_DIM, _BLOCK_ELEMENTS // values))


def _finite_around(
    energies: Callable[[torch.Tensor], torch.Tensor], loc: torch.Tensor, scale: torch.Tensor
) -> bool:
    """Whether the log joint is finite at a few draws of the Laplace approximation."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn((16, loc.numel()), generator=gen, dtype=loc.dtype)
    try:
        with torch.no_grad():
            return bool(torch.isfinite(energies(loc + scale * eps)).all())
    except ValueError:  # a distribution's argument validation: values outside a support
        return False


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of ``hessian^-1``, or None where it is not positive definite."""
    chol, info = torch.linalg.cholesky_ex((hessian + hessian.T) / 2)
    if int(info) != 0:
        return None
    cov = torch.cholesky_inverse(chol)
    tril, info = torch.linalg.cholesky_ex((cov + cov.T) / 2)
    return tril if int(info) == 0 and bool(torch.isfinite(tril).all()) else None
