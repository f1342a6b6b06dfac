"""The starts of an `AutoFlowGuide`: the Laplace whitening at the MAP, and the ``"auto"`` choice.

A Laplace start finds the MAP in unconstrained space (L-BFGS) and whitens with the Hessian `H`
of the negative log joint there: the fixed map ``z = MAP + L x`` with ``L`` the Cholesky factor
of ``H^-1`` up to `FULL_RANK_MAX_DIM` dimensions, and the diagonal ``1 / sqrt(diag H)`` (a
vector) above it or where `H` is not positive definite. The diagonal above `FULL_RANK_MAX_DIM`
comes from exact Hessian-vector products, one per copy of a batch, shared by the coordinates
of a site's batch where its block of `H` is diagonal (see `hessian_diagonal`,
`flowguides.pyro._hessian`), so it needs neither the ``d x d`` Hessian nor its memory.

The functions work on an energy callable (the negative log joint of the packed unconstrained
latent vector) and a coordinate -> site map, not on the guide: `laplace_search` is everything
`init_scale` decides on, `laplace_start` reads the Laplace start from it, and `choose_start`
the start `init_scale` asks for. The public names and
contracts match `flowguides.numpyro.laplace`; torch runs eagerly, so `laplace_search` also
takes the batched `energies` (for the Hessian diagonal and the ELBO draws, which JAX gets by
mapping `energy`) and computes the ELBOs only when asked (JAX computes them in the same
compiled program either way).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from flowguides.core import AUTO_SCALES, FULL_RANK_MAX_DIM, MODE_TOLERANCE, LaplaceFallbackWarning
from flowguides.core.hessian import Blocks, sparse_layout
from flowguides.pyro._hessian import hessian_diagonal

__all__ = ["choose_start", "hessian_diagonal", "laplace_search", "laplace_start", "minimize"]

Energy = Callable[[torch.Tensor], torch.Tensor]

_ELBO_DRAWS = 256
_POLISH_STEPS = 50  # gradient-steered steps after a single-precision search (see _polish)
_BLOCK_ELEMENTS = 2**19  # copies of the model per Hessian-diagonal pass x values per copy


class _LeftSupport(Exception):
    """The MAP search evaluated the model outside a support (stop there, keep the best)."""


class _ModelError(Exception):
    """The model raised inside the MAP search (re-raised as it was)."""


def minimize(energy: Energy, x0: torch.Tensor) -> torch.Tensor:
    """L-BFGS (strong Wolfe line search, at most 2000 iterations) for the minimum of `energy`;
    returns the point of lowest finite energy it evaluated (`x0` if none), stopping where the
    line search steps outside a support (the model raises `ValueError`) or where L-BFGS's
    own arithmetic fails (a step size beyond the dtype's range, as a search along a
    funnel's unbounded direction can reach in single precision). The model's other errors
    are raised as they are."""
    z = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], max_iter=2000, line_search_fn="strong_wolfe")
    best = [math.inf, x0]  # the lowest finite energy seen, and where

    def closure() -> torch.Tensor:
        opt.zero_grad()
        try:
            value = energy(z)
        except ValueError as exc:  # the line search stepped outside a support
            raise _LeftSupport from exc
        except Exception as exc:  # noqa: BLE001 - the model's own error, raised below
            raise _ModelError from exc
        if torch.isfinite(value) and float(value.detach()) < best[0]:
            best[:] = [float(value.detach()), z.detach().clone()]
        try:
            value.backward()
        except Exception as exc:  # noqa: BLE001 - the model's own error, raised below
            raise _ModelError from exc
        return value

    try:
        opt.step(closure)
    except _LeftSupport:
        pass
    except _ModelError as exc:
        raise exc.__cause__ from None
    except RuntimeError:  # L-BFGS itself (e.g. its step overflowed): the best point so far
        pass
    return best[1]


def _polish(energy: Energy, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The point after up to `_POLISH_STEPS` unit L-BFGS steps on the energy in the
    coordinates ``(z - x) / scale``, each kept only where it lowers the largest scaled gradient
    ``|g_i| scale_i`` (the mode test's own measure), until that is under a tenth of
    `MODE_TOLERANCE`. In single precision, the energy of a large data set is a sum whose
    rounding hides its last nats of decrease from the line search of `minimize`, which then
    stalls short of the mode; its gradient stays accurate, and this search reads only the
    gradient. A rejected step restarts the memory."""
    u = torch.zeros_like(x, requires_grad=True)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = energy(x + scale * u)
        value.backward()
        return value

    def merit() -> float:  # the largest scaled gradient at u; NaN or outside a support: inf
        try:
            (g,) = torch.autograd.grad(energy(x + scale * u), u)
        except ValueError:
            return math.inf
        worst = float(g.abs().max())
        return worst if math.isfinite(worst) else math.inf

    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=1, line_search_fn=None)
    best = merit()
    for _ in range(_POLISH_STEPS):
        if best < MODE_TOLERANCE / 10:
            break
        before = u.detach().clone()
        try:
            opt.step(closure)
            now = merit()
        except ValueError:
            now = math.inf
        if now < best:
            best = now
        else:  # back to the last kept point, with fresh memory
            with torch.no_grad():
                u.copy_(before)
            opt = torch.optim.LBFGS([u], lr=1.0, max_iter=1, line_search_fn=None)
    return (x + scale * u).detach()


def laplace_search(
    energy: Energy,
    loc: torch.Tensor,
    full_rank: bool | None = None,
    *,
    energies: Energy,
    values_per_copy: int | None = None,
    elbos: bool = True,
    colors: tuple[np.ndarray, np.ndarray] | None = None,
    blocks: Blocks | None = None,
) -> dict[str, torch.Tensor]:
    """Everything `init_scale` decides on: the MAP, the Hessian (full rank) or its diagonal,
    the mode checks and, with `elbos`, the 256-draw ELBO (fixed seed) of every start.

    Args:
        energy: the negative log joint of one point ``(d,)``.
        loc: where the MAP search starts (the plain starts' location), shape ``(d,)``.
        full_rank: whether to form the ``d x d`` Hessian; None: ``d <= FULL_RANK_MAX_DIM``.
        energies: `energy` of a batch of points ``(B, d)``, one value per row ``(B,)``.
        values_per_copy: the values one evaluation of the model holds (latents and every
            site's value): `hessian_diagonal` differentiates as many copies at once as keep
            about ``2**19`` values alive, at most `FULL_RANK_MAX_DIM`; None: that maximum.
        elbos: also estimate the ELBO of the plain starts (`AUTO_SCALES`) and of the Laplace
            start, as ``"auto"`` needs.
        colors: the latent layout's colours for `hessian_diagonal` (not full rank), or None.
        blocks: the latent layout's `flowguides.core.hessian.Blocks` (with `colors`), or None.

    Returns:
        ``loc_map``, ``energy_map`` and ``grad_map`` (the energy and its gradient there),
        ``hess`` (the symmetrised Hessian, full rank, where finite), or its sparse form
        ``hess_rows`` (the singletons' rows) and ``hess_block_<f>`` (family ``f``'s blocks)
        where it is the whole Hessian and finite (`sparse_layout`), ``scale``
        (``1 / sqrt(diag H)``, 0.1 where not positive), ``good``
        (where the curvature is positive), ``moving`` (coordinates whose Newton step is not
        small: no mode), ``finite`` (the log joint around the point; checked only where no
        coordinate moves), ``tril`` (the Cholesky factor of ``H^-1``, only where full rank
        and positive definite), and with `elbos` ``elbo_plain`` and the Laplace start's
        ``elbo_full`` or ``elbo_diag`` (where it has a mode).
    """
    with warnings.catch_warnings():
        # the search probes far from the mode (line searches, wide starts) and handles a
        # non-finite energy itself: Pyro's "Encountered NaN" warnings would only be noise
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        return _search(energy, loc, full_rank, energies, values_per_copy, elbos, colors, blocks)


def _search(
    energy: Energy,
    loc: torch.Tensor,
    full_rank: bool | None,
    energies: Energy,
    values_per_copy: int | None,
    elbos: bool,
    colors: tuple[np.ndarray, np.ndarray] | None,
    blocks: Blocks | None,
) -> dict[str, torch.Tensor]:
    dim = loc.numel()
    full_rank = dim <= FULL_RANK_MAX_DIM if full_rank is None else full_rank
    loc_map = minimize(energy, loc)
    sparse = False
    if full_rank:
        hessian = torch.autograd.functional.hessian(energy, loc_map)
        curvature = hessian.diagonal()
    else:  # with the sparse form of the Hessian (`_control.py`) where the layout has one
        keep = blocks if sparse_layout(colors, blocks, dim) else None
        found = hessian_diagonal(energies, loc_map, _block_size(values_per_copy), colors, keep)
        curvature, rows, terms, sparse = found if keep else (found, None, (), False)
    good = torch.isfinite(curvature) & (curvature > 0)
    scale = torch.where(good, curvature.clamp_min(1e-300).rsqrt(), torch.full_like(curvature, 0.1))
    if torch.finfo(loc_map.dtype).bits < 64:  # the energy's values too coarse for a line search
        loc_map = _polish(energy, loc_map, scale)
    # A mode is stationary: its Newton step, in its own scale, is small. A density that
    # grows without bound (a funnel's scale collapsing to 0) leaves a large step behind.
    point = loc_map.clone().requires_grad_(True)
    energy_map = energy(point)
    grad = torch.autograd.grad(energy_map, point)[0].detach()
    moving = ~(grad.abs() * scale < MODE_TOLERANCE)
    finite = bool(moving.any()) or _finite_around(energies, loc_map, scale)
    out = {
        "loc_map": loc_map,
        "scale": scale,
        "good": good,
        "moving": moving,
        "finite": torch.tensor(finite),
        "energy_map": energy_map.detach(),
        "grad_map": grad,
    }
    if full_rank and bool(torch.isfinite(hessian).all()):
        out["hess"] = (hessian + hessian.T) / 2
    if sparse and all(bool(t.isfinite().all()) for t in (rows, *terms)):
        out["hess_rows"] = rows
        out.update({f"hess_block_{f}": block for f, block in enumerate(terms)})
    if full_rank and bool(good.all()):
        tril = _inverse_cholesky(hessian)
        if tril is not None:
            out["tril"] = tril
    if not elbos:
        return out
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn((_ELBO_DRAWS, dim), generator=gen, dtype=loc.dtype)
    plain = [torch.full_like(loc, s) for s in AUTO_SCALES]
    out["elbo_plain"] = torch.tensor(
        [_elbo(energies, loc + s * eps, s.log().sum()) for s in plain], dtype=torch.float64
    )
    if bool(moving.any()) or not finite:
        return out
    if "tril" in out:
        log_det = out["tril"].diagonal().log().sum()
        out["elbo_full"] = torch.tensor(_elbo(energies, loc_map + eps @ out["tril"].T, log_det))
    else:
        out["elbo_diag"] = torch.tensor(_elbo(energies, loc_map + eps * scale, scale.log().sum()))
    return out


def laplace_start(
    out: Mapping[str, torch.Tensor], sites: Callable[[Sequence[int]], list[str]]
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float, list[str]]:
    """``((shift, scale_tril) or None, its ELBO, warnings)`` from `laplace_search`'s output.

    Full rank (``scale_tril`` a ``(d, d)`` matrix) where the Hessian is positive definite and
    the dimension is at most `FULL_RANK_MAX_DIM`, else diagonal (a ``(d,)`` vector) with 0.1
    at coordinates of non-positive curvature; None where the MAP search found no mode. The
    ELBO is NaN where `laplace_search` ran without `elbos`.

    Args:
        out: `laplace_search`'s output.
        sites: the names of the sites that own the given packed coordinates (for warnings).
    """
    moving = out["moving"]
    if not bool(out["finite"]) or bool(moving.any()):
        where = sites(torch.nonzero(moving).flatten().tolist())
        why = (
            "the MAP search found no mode (the density grows without bound along sites "
            f"{where}, or is not finite around the point it reached); starting from the "
            "initial location with scale 0.1 instead"
        )
        return None, -math.inf, [why]
    loc_map, good = out["loc_map"], out["good"]
    if "tril" in out:
        return (loc_map, out["tril"]), float(out.get("elbo_full", math.nan)), []
    why = []
    if not bool(good.all()):
        bad = sites(torch.nonzero(~good).flatten().tolist())
        why.append(f"the Hessian diagonal is not positive for sites {bad}; using scale 0.1 there")
    return (loc_map, out["scale"]), float(out.get("elbo_diag", math.nan)), why


def choose_start(
    init_scale: str,
    loc: torch.Tensor,
    out: Mapping[str, torch.Tensor],
    sites: Callable[[Sequence[int]], list[str]],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``(affine loc, affine scale, (shift, scale_tril) or None)`` for ``init_scale``.

    ``"laplace"``: the Laplace start (the affine the identity on whitened coordinates),
    warning (`LaplaceFallbackWarning`) where it falls back to a diagonal or, without a mode,
    to the plain start at `loc` with scale 0.1. ``"auto"``: whichever of the plain starts
    (`AUTO_SCALES`) and the Laplace start has the highest ELBO, silently.

    Args:
        init_scale: ``"laplace"`` or ``"auto"``.
        loc: the plain starts' location.
        out: `laplace_search`'s output (with its ELBOs for ``"auto"``).
        sites: the names of the sites that own the given packed coordinates (for warnings).
    """
    fixed, elbo, why = laplace_start(out, sites)
    identity = (torch.zeros_like(loc), torch.ones_like(loc))
    if init_scale == "laplace":
        for message in why:
            warnings.warn(f"init_scale='laplace': {message}", LaplaceFallbackWarning, 5)
        return (loc, torch.full_like(loc, 0.1), None) if fixed is None else (*identity, fixed)
    starts = [(loc, torch.full_like(loc, s), None) for s in AUTO_SCALES]
    elbos = out["elbo_plain"].tolist()
    if fixed is not None:
        starts.append((*identity, fixed))
        elbos.append(elbo)
    return starts[max(range(len(starts)), key=elbos.__getitem__)]


def _elbo(energies: Energy, z: torch.Tensor, log_det: torch.Tensor) -> float:
    """``mean(-energies(z)) + log_det``; -inf where the draws leave a support or it is not
    finite."""
    try:
        with torch.no_grad():
            log_p = -energies(z)
    except ValueError:  # values outside a support: the start is unusable
        return -math.inf
    value = float(log_p.mean() + log_det)
    return value if math.isfinite(value) else -math.inf


def _block_size(values_per_copy: int | None) -> int:
    """Coordinates per `hessian_diagonal` pass: as many copies of the model as keep about
    `_BLOCK_ELEMENTS` values alive, at most `FULL_RANK_MAX_DIM`. Time hardly depends on it
    (the work is one copy per coordinate); memory grows with it."""
    if values_per_copy is None:
        return FULL_RANK_MAX_DIM
    return max(1, min(FULL_RANK_MAX_DIM, _BLOCK_ELEMENTS // values_per_copy))


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
