"""The starts of an `AutoFlowGuide`: the Laplace whitening at the MAP, and the ``"auto"`` choice.

A Laplace start finds the MAP in unconstrained space (L-BFGS) and whitens with the Hessian `H`
of the negative log joint there: the fixed map ``z = MAP + L x`` with ``L`` the Cholesky factor
of ``H^-1`` up to `FULL_RANK_MAX_DIM` dimensions, and the diagonal ``1 / sqrt(diag H)`` (a
vector) above it or where `H` is not positive definite. The diagonal above `FULL_RANK_MAX_DIM`
comes from exact Hessian-vector products, a block at a time, shared by the coordinates of a
site's batch where its block of `H` is diagonal (see `hessian_diagonal`,
`flowguides.numpyro._hessian`), so it needs neither the ``d x d`` Hessian nor its memory.

The functions work on an energy callable (the negative log joint of the packed unconstrained
latent vector) and a coordinate -> site map, not on the guide: `laplace_search` is everything
`init_scale` decides on, as one traced program, `laplace_start` reads the Laplace start from
it, and `choose_start` the start `init_scale` asks for.
The public names and contracts match `flowguides.pyro.laplace`, whose eager `laplace_search`
also takes the batched energy and computes the ELBOs only when asked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from flowguides.core import AUTO_SCALES, FULL_RANK_MAX_DIM, MODE_TOLERANCE, LaplaceFallbackWarning
from flowguides.core.hessian import Blocks, sparse_layout
from flowguides.numpyro._hessian import hessian_diagonal

__all__ = [
    "SEARCH_SETUP_MAX_ELEMENTS",
    "choose_start",
    "hessian_diagonal",
    "laplace_search",
    "laplace_start",
    "minimize",
]

SEARCH_SETUP_MAX_ELEMENTS = 2**20
"""Data elements (all array arguments) up to which the start search compiles as a program run
once (``jit(..., setup=True)``: shorter compiles, slower loops); above, each of its many
full-data passes outweighs its compile, and it compiles as training does."""

_MAP_ITERATIONS = 2000
_MAP_STALLED = 1e-10  # a step that moves no coordinate by more than this (relative) stalled
_MAP_RESTARTS = 3  # fresh L-BFGS memory where a step stalls (a failed line search), at most
_ELBO_DRAWS = 256
_ELBO_PRNG = "rbg"  # XLA's generator: a small fraction of threefry's compile time
_ENERGY_BATCH = 64  # draws per vectorised model evaluation in the start search
_POLISH_STEPS = 50  # gradient-steered steps after a single-precision search (see _polish)


def minimize(energy: Callable[[jax.Array], jax.Array], x0: jax.Array) -> jax.Array:
    """L-BFGS for the minimum of `energy` (robust to badly scaled sites), until a step moves
    no coordinate by more than 1e-10 of its size or after `_MAP_ITERATIONS` steps (an
    ill-conditioned regression can need several hundred)."""
    return _lbfgs(energy, x0)[0]


def _lbfgs(
    energy: Callable[[jax.Array], jax.Array], x0: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`minimize`'s ``(minimum, gradient there, energy there)``.

    The model appears twice in the program: in the line search, by value only, and in one
    value-and-gradient evaluation per step at the point the step reached (the first step
    takes none: it evaluates the start), whose gradient the next step, and the caller, read.
    """
    # a backtracking line search: the same minima as the default zoom search on the nine
    # posteriordb posteriors, at about half its XLA compile time
    linesearch = optax.scale_by_backtracking_linesearch(max_backtracking_steps=40)
    solver = optax.lbfgs(linesearch=linesearch)
    value_and_grad = jax.value_and_grad(energy)
    tolerance = float(jnp.finfo(x0.dtype).eps) ** (1 / 3)

    def stationary(x: jax.Array, value: jax.Array, grad: jax.Array) -> jax.Array:
        relative = jnp.max(jnp.abs(grad) * jnp.maximum(jnp.abs(x), 1.0))
        return relative <= tolerance * jnp.maximum(jnp.abs(value), 1.0)

    def step(carry: tuple) -> tuple:
        x, value, grad, state, i, moved, restarts = carry
        # a step that stalled (the line search found no decrease along the L-BFGS direction,
        # which a curvature memory from far away can point wrong) short of a stationary point
        # restarts from the point with fresh memory, i.e. along the gradient. Stationary: the
        # relative gradient max_i |g_i| max(|x_i|, 1) / max(|f|, 1) is below eps^(1/3)
        # (Dennis & Schnabel 1996, sec. 7.2); a converged search is left as it is.
        stalled = (i > 1) & ~(moved > _MAP_STALLED) & ~stationary(x, value, grad)
        state = lax.cond(stalled, lambda: solver.init(x), lambda: state)

        def advance(x: jax.Array, state: tuple) -> tuple:
            updates, state = solver.update(grad, state, x, value=value, grad=grad, value_fn=energy)
            return optax.apply_updates(x, updates), state

        new, state = lax.cond(i > 0, advance, lambda x, state: (x, state), x, state)
        value, grad = value_and_grad(new)
        moved = jnp.where(i > 0, jnp.max(jnp.abs(new - x) / (1.0 + jnp.abs(x))), jnp.inf)
        return new, value, grad, state, i + 1, moved, restarts + stalled

    def running(carry: tuple) -> jax.Array:
        x, value, grad, _, i, moved, restarts = carry
        restart = (restarts < _MAP_RESTARTS) & ~stationary(x, value, grad)
        return (i <= _MAP_ITERATIONS) & ((moved > _MAP_STALLED) | restart)

    inf = jnp.asarray(jnp.inf, x0.dtype)
    start = (x0, inf, jnp.zeros_like(x0), solver.init(x0), jnp.asarray(0), inf, jnp.asarray(0))
    x, value, grad, *_ = lax.while_loop(running, step, start)
    return x, grad, value


def _polish(
    energy: Callable[[jax.Array], jax.Array], x: jax.Array, grad: jax.Array, value: jax.Array,
    scale: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """``(point, gradient, energy)`` after up to `_POLISH_STEPS` unit L-BFGS steps on the
    energy in the coordinates ``(z - x) / scale``, each kept only where it lowers the largest
    scaled gradient ``|g_i| scale_i`` (the mode test's own measure), until that is under a
    tenth of `MODE_TOLERANCE`. In single precision, the energy of a large data set is a sum
    whose rounding hides its last nats of decrease from the line search of `_lbfgs`, which
    then stalls short of the mode; its gradient stays accurate, and this search reads only the
    gradient. A rejected step restarts the memory, so the next step is the Newton step of the
    diagonal curvature."""
    solver = optax.lbfgs(linesearch=None)
    grad_w = jax.grad(lambda u: energy(x + scale * u))

    def merit(g: jax.Array) -> jax.Array:  # the largest scaled gradient; NaN counts as worst
        return jnp.where(jnp.all(jnp.isfinite(g)), jnp.max(jnp.abs(g)), jnp.inf)

    def step(carry: tuple) -> tuple:
        u, g, state, i = carry
        updates, new_state = solver.update(g, state, u)
        new = u + updates
        g_new = grad_w(new)
        keep = merit(g_new) < merit(g)
        return (
            jnp.where(keep, new, u),
            jnp.where(keep, g_new, g),
            jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_state, solver.init(u)),
            i + 1,
        )

    def running(carry: tuple) -> jax.Array:
        _, g, _, i = carry
        return (i < _POLISH_STEPS) & (merit(g) >= MODE_TOLERANCE / 10)

    u0 = jnp.zeros_like(x)
    u, g, _, _ = lax.while_loop(running, step, (u0, grad * scale, solver.init(u0), 0))
    moved = jnp.any(u != 0)
    point = x + scale * u
    return (
        jnp.where(moved, point, x),
        jnp.where(moved, g / scale, grad),
        jnp.where(moved, energy(point), value),
    )


def laplace_search(
    energy: Callable[[jax.Array], jax.Array],
    loc: jax.Array,
    full_rank: bool | None = None,
    colors: tuple[np.ndarray, np.ndarray] | None = None,
    blocks: Blocks | None = None,
) -> dict[str, jax.Array]:
    """Everything `init_scale` decides on, as one traced program (compiled once per model and
    shapes): the MAP, the Hessian (full rank) or its diagonal, the mode checks and the
    256-draw ELBO of every start (the same fixed draws, from XLA's generator, for every
    start; the model is evaluated on all of them in batches of 64).

    Args:
        energy: the negative log joint of one point ``(d,)``.
        loc: where the MAP search starts (the plain starts' location), shape ``(d,)``.
        full_rank: whether to form the ``d x d`` Hessian; None: ``d <= FULL_RANK_MAX_DIM``.
        colors: the latent layout's colours for `hessian_diagonal` (not full rank), or None.
        blocks: the latent layout's `flowguides.core.hessian.Blocks` (with `colors`), or None.

    Returns:
        ``loc_map``, ``grad_map`` and ``energy_map`` (the energy's gradient and value there),
        ``scale``, ``good``, ``moving``, ``finite``, ``elbo_plain``, ``elbo_diag`` and, full
        rank, ``hess`` (the symmetrised Hessian), ``tril`` (NaN where not positive definite)
        and ``elbo_full``; where `sparse_layout`, the sparse form: ``hess_rows`` (the
        singletons' rows), ``hess_block_<f>`` (family ``f``'s blocks) and ``sparse`` (whether
        they are the whole Hessian).
    """
    dim = loc.shape[0]
    full_rank = dim <= FULL_RANK_MAX_DIM if full_rank is None else full_rank
    loc_map, grad_map, energy_map = _lbfgs(energy, loc)
    if full_rank:  # reverse over reverse: works through a model's jax.custom_vjp functions
        hess = jax.jacrev(jax.grad(energy))(loc_map)
        curvature = jnp.diag(hess)
    elif sparse_layout(colors, blocks, dim):  # and the sparse form (`_control.py`)
        curvature, rows, found, sparse = hessian_diagonal(energy, loc_map, None, colors, blocks)
    else:
        curvature = hessian_diagonal(energy, loc_map, colors=colors)
    good = jnp.isfinite(curvature) & (curvature > 0)
    scale = jnp.where(good, 1.0 / jnp.sqrt(jnp.where(good, curvature, 1.0)), 0.1)
    if jnp.finfo(loc.dtype).bits < 64:  # the energy's values too coarse for a line search
        loc_map, grad_map, energy_map = _polish(energy, loc_map, grad_map, energy_map, scale)
    # A mode is stationary: its Newton step, in its own scale, is small. A density that grows
    # without bound (a funnel's scale collapsing to 0) leaves a large step behind.
    moving = ~(jnp.abs(grad_map) * scale < MODE_TOLERANCE)
    eps = jax.random.normal(jax.random.key(0, impl=_ELBO_PRNG), (_ELBO_DRAWS, dim), loc.dtype)
    # every start's draws (and 16 around the mode) go through one batched energy: one copy
    # of the model in the compiled program instead of one per start
    starts = [(loc + s * eps, dim * jnp.log(s)) for s in AUTO_SCALES]
    starts.append((loc_map + scale * eps, jnp.sum(jnp.log(scale))))
    if full_rank:  # the Cholesky factor of H^-1: NaN where H is not positive definite
        sym = (hess + hess.T) / 2
        cov = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(sym), True), jnp.eye(dim))
        tril = jnp.linalg.cholesky((cov + cov.T) / 2)
        starts.append((loc_map + eps @ tril.T, jnp.sum(jnp.log(jnp.diagonal(tril)))))
    around = loc_map + scale * eps[:16]
    points = jnp.concatenate([*(z for z, _ in starts), around])
    # padded to whole batches: a remainder would be one more copy of the model
    padding = jnp.broadcast_to(loc_map, (-len(points) % _ENERGY_BATCH, dim))
    padded = jnp.concatenate([points, padding])
    energies = lax.map(energy, padded, batch_size=_ENERGY_BATCH)[: len(points)]
    elbos = -jnp.mean(energies[: _ELBO_DRAWS * len(starts)].reshape(len(starts), -1), axis=1)
    elbos = elbos + jnp.stack([log_det for _, log_det in starts])
    out = {
        "loc_map": loc_map,
        "grad_map": grad_map,
        "energy_map": energy_map,
        "scale": scale,
        "good": good,
        "moving": moving,
        "finite": jnp.all(jnp.isfinite(loc_map)) & jnp.all(jnp.isfinite(energies[-16:])),
        "elbo_plain": elbos[: len(AUTO_SCALES)],
        "elbo_diag": elbos[len(AUTO_SCALES)],
    }
    if not full_rank and sparse_layout(colors, blocks, dim):
        out["hess_rows"], out["sparse"] = rows, sparse
        out.update({f"hess_block_{f}": block for f, block in enumerate(found)})
    if full_rank:
        out["tril"] = tril
        out["elbo_full"] = elbos[-1]
        out["hess"] = sym
    return out


def laplace_start(
    out: Mapping[str, np.ndarray], sites: Callable[[Sequence[int]], list[str]]
) -> tuple[tuple | None, float, list[str]]:
    """``((shift, scale_tril) or None, its ELBO, warnings)`` from `laplace_search`'s output.

    Full rank (``scale_tril`` a ``(d, d)`` matrix) where the Hessian is positive definite and
    the dimension is at most `FULL_RANK_MAX_DIM`, else diagonal (a ``(d,)`` vector) with 0.1
    at coordinates of non-positive curvature; None where the MAP search found no mode.

    Args:
        out: `laplace_search`'s output, as numpy arrays.
        sites: the names of the sites that own the given packed coordinates (for warnings).
    """
    if not bool(out["finite"]) or bool(np.any(out["moving"])):
        where = sites(np.flatnonzero(out["moving"]).tolist())
        why = (
            "the MAP search found no mode (the density grows without bound along sites "
            f"{where}, or is not finite around the point it reached); starting from the "
            "initial location with scale 0.1 instead"
        )
        return None, -np.inf, [why]
    loc_map = out["loc_map"]
    tril = out.get("tril")
    if tril is not None and bool(np.all(np.isfinite(tril))) and bool(np.all(out["good"])):
        return (loc_map, tril), float(out["elbo_full"]), []
    why = []
    if not bool(np.all(out["good"])):
        bad = sites(np.flatnonzero(~out["good"]).tolist())
        why.append(f"the Hessian diagonal is not positive for sites {bad}; using scale 0.1 there")
    return (loc_map, out["scale"]), float(out["elbo_diag"]), why


def choose_start(
    init_scale: str,
    loc: np.ndarray,
    out: Mapping[str, np.ndarray],
    sites: Callable[[Sequence[int]], list[str]],
) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """``(affine loc, affine scale, (shift, scale_tril) or None)`` for ``init_scale``.

    ``"laplace"``: the Laplace start (the affine the identity on whitened coordinates),
    warning (`LaplaceFallbackWarning`) where it falls back to a diagonal or, without a mode,
    to the plain start at `loc` with scale 0.1. ``"auto"``: whichever of the plain starts
    (`AUTO_SCALES`) and the Laplace start has the highest ELBO, silently.

    Args:
        init_scale: ``"laplace"`` or ``"auto"``.
        loc: the plain starts' location.
        out: `laplace_search`'s output, as numpy arrays.
        sites: the names of the sites that own the given packed coordinates (for warnings).
    """
    fixed, elbo, why = laplace_start(out, sites)
    identity = (np.zeros_like(loc), np.ones_like(loc))
    if init_scale == "laplace":
        for message in why:
            warnings.warn(f"init_scale='laplace': {message}", LaplaceFallbackWarning, 6)
        return (
            (loc, np.full(loc.shape, 0.1, loc.dtype), None) if fixed is None else (*identity, fixed)
        )
    starts = [(loc, np.full(loc.shape, s, loc.dtype), None) for s in AUTO_SCALES]
    elbos = [float(e) for e in out["elbo_plain"]]
    if fixed is not None:
        starts.append((*identity, fixed))
        elbos.append(elbo)
    elbos = [e if np.isfinite(e) else -np.inf for e in elbos]
    return starts[int(np.argmax(elbos))]
