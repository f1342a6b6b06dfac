"""JAX methods outside NumPyro's SVI: FlowJAX, blackjax's multi-path Pathfinder and the bare
hand-written RealNVP loop (the speed floor), each on the NumPyro model's flat unconstrained log
density (:func:`benchmarks.anchors_numpyro.potential`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from benchmarks import metrics
from benchmarks.anchor_base import ARCH, Budget, Fitted, Problem, final_loss
from benchmarks.anchors_numpyro import optax_schedule, potential

__all__ = ["PATHFINDER_SETTINGS", "bare_realnvp", "flowjax_elbo", "pathfinder"]

PATHFINDER_SETTINGS = {"paths": 4, "draws_per_path": 1000, "elbo_draws": 25, "maxiter": 1000,
                       "init": "uniform(-2, 2) unconstrained", "resampling": "PSIS",
                       "factorisations": "one iterate at a time"}  # fmt: skip
"""Stan's multi-path Pathfinder defaults: paths, draws per path, ELBO draws per L-BFGS
iterate, most L-BFGS iterations, initial points, importance resampling; and how the
factorisations over a path's iterates run (:func:`_one_at_a_time`)."""


def _one_at_a_time(f: Callable) -> Callable:
    """`f` with its batching rule replaced by a ``lax.map`` over the batch: under ``jax.vmap``
    it runs one unbatched call per element (the same values, one element's LAPACK call at a
    time).

    blackjax's Pathfinder vmaps its QR, inverse and Cholesky factorisations over the iterates
    of a path. jaxlib 0.10's batched LAPACK kernels hand the batch to XLA's intra-op thread
    pool from a thread of that same pool and wait for it; the work can sit in the waiting
    thread's own queue forever (gdb: threads in ``jax::ParallelBatchMap``, the pool's other
    workers asleep, the process at 0% CPU). A 10-D funnel alone hangs that way on jax 0.10.2
    and not on jax 0.12, where this wrapper changes no value."""
    import jax

    g = jax.custom_batching.custom_vmap(f)

    @g.def_vmap
    def rule(axis_size: int, in_batched: list, *args: Any) -> tuple:
        def one(batched: list) -> Any:
            rest = iter(batched)
            return f(*[next(rest) if b else a for a, b in zip(args, in_batched, strict=True)])

        out = jax.lax.map(one, [a for a, b in zip(args, in_batched, strict=True) if b])
        return out, jax.tree.map(lambda _: True, out)

    return g


@contextmanager
def _pathfinder_factorisations_one_at_a_time() -> Iterator[None]:
    """blackjax's Pathfinder with its factorisations wrapped by :func:`_one_at_a_time`, while
    the context is open (its programs are traced inside)."""
    from blackjax.vi import pathfinder as single

    factors, sample = single.lbfgs_inverse_hessian_factors, single.bfgs_sample

    def one_sample(
        rng_key: Any, num_samples: int, position: Any, grad_position: Any, alpha: Any,
        beta: Any, gamma: Any,
    ) -> Any:  # fmt: skip
        def draw(*args: Any) -> Any:
            return sample(args[0], num_samples, *args[1:])

        return _one_at_a_time(draw)(rng_key, position, grad_position, alpha, beta, gamma)

    single.lbfgs_inverse_hessian_factors = _one_at_a_time(factors)
    single.bfgs_sample = one_sample
    try:
        yield
    finally:
        single.lbfgs_inverse_hessian_factors, single.bfgs_sample = factors, sample


def flowjax_elbo(problem: Problem, budget: Budget) -> Fitted:
    """FlowJAX ``coupling_flow`` (affine) on the model's unconstrained space, ``ElboLoss``.

    Trained in one uninterrupted loop of FlowJAX's own training step
    (``flowjax.train.train_utils.step``, the step ``fit_to_key_based_loss`` runs, with its
    parameter partition and one key per step), so Adam's state and the schedule run through
    unbroken, and timed per step by :func:`benchmarks.metrics.timed_steps`, the rule every other
    row uses (its fastest 100-step block).
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import paramax
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow
    from flowjax.train.losses import ElboLoss
    from flowjax.train.train_utils import step as flowjax_step

    model = problem.numpyro_model()
    t0 = time.perf_counter()
    flat0, log_p, unravel, constrain = potential(model, budget.seed)
    key, sub = jax.random.split(jax.random.key(budget.seed))
    flow = coupling_flow(
        sub, base_dist=Normal(flat0, jnp.ones_like(flat0)), flow_layers=ARCH["couplings"],
        nn_width=ARCH["hidden"][0], nn_depth=len(ARCH["hidden"]), invert=False,
    )  # fmt: skip
    loss = ElboLoss(log_p, num_samples=budget.num_particles)
    optimizer = optax_schedule(budget)
    params, static = eqx.partition(
        flow, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable)
    )
    box = [params, optimizer.init(params)]
    keys = jax.random.split(key, budget.num_steps)
    losses: list = []

    def one(i: int) -> Any:
        box[0], box[1], value = flowjax_step(
            box[0], static, key=keys[i], optimizer=optimizer, opt_state=box[1], loss_fn=loss
        )
        losses.append(value)
        return value

    setup = time.perf_counter() - t0
    timing = metrics.timed_steps(one, budget.num_steps, jax.block_until_ready)
    timing["wall_s"] += setup
    timing["setup_s"] = setup
    flow = eqx.combine(box[0], static)

    def draw(num: int, seed: int) -> tuple:
        x, log_q = flow.sample_and_log_prob(jax.random.key(seed), (num,))
        lp = jax.lax.map(log_p, x, batch_size=1000)
        values = jax.lax.map(lambda v: constrain(unravel(v)), x, batch_size=1000)
        return {k: np.asarray(v) for k, v in values.items()}, np.asarray(lp), np.asarray(log_q)

    return Fitted(timing, final_loss([float(v) for v in losses]), draw)


def pathfinder(problem: Problem, budget: Budget) -> Fitted:
    """blackjax's multi-path Pathfinder at :data:`PATHFINDER_SETTINGS` (the SVI budget's seed
    only): one single-path Pathfinder per initial point (``blackjax.vi.pathfinder``), each
    path's best Gaussian drawn from, and the pooled draws resampled by their PSIS-smoothed
    importance weights (``blackjax.vi.multipathfinder.psis_weights``), as Stan's and PyMC's
    multi-path Pathfinder do. Adds ``khat`` (PSIS Pareto k of the pooled log weights) to its
    row.

    References:
        Zhang, Carpenter, Gelman and Vehtari (2022), "Pathfinder: Parallel quasi-Newton
        variational inference", JMLR 23(306).
    """
    import jax
    import jax.numpy as jnp
    from blackjax.vi import pathfinder as single
    from blackjax.vi.multipathfinder import MultipathfinderState, psis_weights

    s = PATHFINDER_SETTINGS
    model = problem.numpyro_model()
    t0 = time.perf_counter()
    flat0, log_p, unravel, constrain = potential(model, budget.seed)
    k_init, k_fit, k_draw, k_pick = jax.random.split(jax.random.PRNGKey(budget.seed), 4)
    x0 = jax.random.uniform(k_init, (s["paths"], flat0.shape[0]), flat0.dtype, -2.0, 2.0)

    @jax.jit
    def run(keys: Any, x0: Any, draw_keys: Any) -> tuple:
        def one(key: Any, x: Any, draw_key: Any) -> tuple:
            state, _ = single.approximate(key, log_p, x, s["elbo_draws"], maxiter=s["maxiter"])
            x, log_q = single.sample(draw_key, state, s["draws_per_path"])
            return state, x, jax.vmap(log_p)(x), log_q

        # the paths one after another (a vmap of the L-BFGS loops also hung XLA's runtime)
        return jax.lax.map(lambda a: one(*a), (keys, x0, draw_keys))

    with _pathfinder_factorisations_one_at_a_time():
        states, x, lp, lq = run(jax.random.split(k_fit, s["paths"]), x0,
                                jax.random.split(k_draw, s["paths"]))  # fmt: skip
    log_w, khat = psis_weights(MultipathfinderState(states, x, lp, lq))
    pool = x.reshape(-1, flat0.shape[0])
    pick = jax.random.choice(k_pick, pool.shape[0], (pool.shape[0],), p=jnp.exp(log_w))
    values = jax.lax.map(lambda v: constrain(unravel(v)), pool[pick], batch_size=1000)
    draws = {k: np.asarray(v) for k, v in values.items()}
    wall = time.perf_counter() - t0
    return Fitted({"wall_s": wall, "compile_s": None}, draws=draws, extra={"khat": float(khat)})


def bare_realnvp(problem: Problem, budget: Budget, chunk: int = 100) -> Fitted:
    """The floor: the same RealNVP (conventions.md) + affine, hand-written in JAX, reverse KL on
    the model's flat log density, Adam with the shared schedule, ``lax.scan`` over `chunk` steps
    per jitted call."""
    import jax
    import jax.numpy as jnp
    import optax

    t0 = time.perf_counter()
    flat0, log_p, unravel, constrain = potential(problem.numpyro_model(), budget.seed)
    d = flat0.shape[0]
    d1, d2, reps = d // 2, d - d // 2, ARCH["couplings"]
    sizes = [d1, *ARCH["hidden"], 2 * d2]
    keys = jax.random.split(jax.random.PRNGKey(budget.seed), len(sizes))
    params: dict[str, Any] = {
        "loc": flat0,
        "log_scale": jnp.full(d, np.log(0.1), dtype=flat0.dtype),
    }
    for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = 0.0 if j == len(sizes) - 2 else 1.0 / n_in**0.5
        w = jax.random.uniform(keys[j], (reps, n_out, n_in), minval=-bound, maxval=bound)
        params[f"W{j}"], params[f"b{j}"] = w, jnp.zeros((reps, n_out))

    def sample_and_log_q(p: dict, key: Any) -> tuple[Any, Any]:
        eps = jax.random.normal(key, (budget.num_particles, d))
        x, ladj = eps, 0.0
        for r in range(reps):
            h = x[..., :d1]
            for j in range(len(sizes) - 1):
                h = h @ p[f"W{j}"][r].T + p[f"b{j}"][r]
                h = jax.nn.relu(h) if j < len(sizes) - 2 else h
            s = 3.0 * jnp.tanh(h[..., d2:] / 3.0)
            x = jnp.concatenate([x[..., :d1], x[..., d1:] * jnp.exp(s) + h[..., :d2]], -1)
            ladj = ladj + s.sum(-1)
            x = x[..., ::-1] if r < reps - 1 else x
        x = p["loc"] + jnp.exp(p["log_scale"]) * x
        log_q = jax.scipy.stats.norm.logpdf(eps).sum(-1) - ladj - p["log_scale"].sum()
        return x, log_q

    def loss(p: dict, key: Any) -> Any:
        x, log_q = sample_and_log_q(p, key)
        return jnp.mean(log_q - jax.vmap(log_p)(x))

    opt = optax_schedule(budget)

    @jax.jit
    def run_chunk(carry: tuple, keys: Any) -> tuple:
        def body(c: tuple, k: Any) -> tuple:
            p, state = c
            value, grads = jax.value_and_grad(loss)(p, k)
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), value

        return jax.lax.scan(body, carry, keys)

    # strong (not weak) dtypes throughout, so the carry's types never change between calls
    box = [
        jax.tree.map(
            lambda a: jnp.asarray(a).astype(jnp.asarray(a).dtype), (params, opt.init(params))
        )
    ]
    all_keys = jax.random.split(jax.random.PRNGKey(budget.seed + 1), budget.num_steps)
    losses: list = []

    def step(i: int) -> Any:
        box[0], values = run_chunk(box[0], all_keys[i * chunk : (i + 1) * chunk])
        losses.extend(np.asarray(values))
        return values

    setup = time.perf_counter() - t0
    timing = metrics.timed_steps(
        step, max(budget.num_steps // chunk, 3), jax.block_until_ready, block_size=1
    )  # each step is a chunk: the fastest chunk after the first two
    timing.update(wall_s=timing["wall_s"] + setup, steps_per_s=timing["steps_per_s"] * chunk)
    timing["compile_s"] = max(timing["first_step_s"] - timing["steady_step_s"], 0.0)
    timing["setup_s"] = setup

    def draw(num: int, seed: int) -> tuple:
        x, log_q = jax.jit(jax.vmap(sample_and_log_q, (None, 0)))(
            box[0][0], jax.random.split(jax.random.PRNGKey(seed), num // budget.num_particles)
        )
        x, log_q = x.reshape(-1, d), log_q.reshape(-1)
        lp = jax.lax.map(log_p, x, batch_size=1000)
        values = jax.lax.map(lambda v: constrain(unravel(v)), x, batch_size=1000)
        return {k: np.asarray(v) for k, v in values.items()}, np.asarray(lp), np.asarray(log_q)

    return Fitted(timing, final_loss(losses), draw)
