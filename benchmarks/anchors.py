"""The methods compared on posteriors, each behind one interface: ``fit(problem, budget)``.

Anchors (what a user would otherwise pick): Pyro ``AutoNormal``, ``AutoIAFNormal`` and
``AutoNormalizingFlow`` built from ``affine_coupling`` (with reversing permutations between
couplings) and from ``planar``; NumPyro ``AutoNormal``, ``AutoIAFNormal``, ``AutoBNAFNormal``;
FlowJAX's coupling flow trained with its ``ElboLoss`` by ``fit_to_key_based_loss``; NumPyro NUTS
(1,000 warm-up + 1,000 draws) as the reference method; and a bare hand-written jitted JAX
RealNVP loop (``bare_realnvp``) as the speed floor. flowguides' ``AutoFlowGuide`` runs in the
same plain SVI loop as the anchors (``*_svi_loop``) and through ``fit_posterior``.

Every SVI method gets the same step budget, particles, Adam learning rate and the shared
schedule (:func:`flowguides.core.learning_rate_at`), and the architectures match
(:data:`ARCH`). Each ``fit`` returns a :class:`Fitted` with its timing and a way to draw
``(draws, log p, log q)`` for :func:`benchmarks.metrics.score`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks import metrics
from flowguides.core import learning_rate_at

__all__ = [
    "ARCH",
    "METHODS",
    "SPEED_METHODS",
    "Budget",
    "Fitted",
    "Problem",
    "bare_realnvp",
    "flowguides_spec",
    "nuts",
    "numpyro_fit_posterior",
    "numpyro_svi",
    "pyro_svi",
]

ARCH = {"couplings": 4, "hidden": (32, 32), "planar": 8, "iaf": 4, "ode_hidden": (32, 32)}
"""Matched sizes: RealNVP/coupling/IAF layers and widths, planar layers, ODE widths."""


@dataclass
class Problem:
    """A posterior to fit: a model in each PPL and what the truth is.

    Attributes:
        name: display name.
        pyro_model: factory returning the Pyro model (no arguments; built lazily).
        numpyro_model: factory returning the NumPyro model.
        reference: ``site -> (mean, sd)`` of the truth, or None.
        log_z: the log normalising constant, where known.
    """

    name: str
    pyro_model: Callable[[], Callable[[], None]]
    numpyro_model: Callable[[], Callable[[], None]]
    reference: metrics.Reference | None = None
    log_z: float | None = None


@dataclass(frozen=True)
class Budget:
    """Equal budget for every SVI method (NUTS uses its own fixed 1,000 + 1,000)."""

    num_steps: int
    num_particles: int = 8
    learning_rate: float = 1e-2
    seed: int = 0


@dataclass
class Fitted:
    """A fitted method: timings and how to draw from it.

    Attributes:
        timing: ``wall_s`` and, where measured, ``compile_s`` and ``steps_per_s``.
        final_loss: mean negative ELBO estimate over the last 10% of steps, or None.
        log_densities: ``(num, seed) -> (draws, log_p, log_q)``; None for samplers.
        draws: for samplers, their draws (``name -> (S, *shape)``).
    """

    timing: dict[str, float | None]
    final_loss: float | None = None
    log_densities: Callable[[int, int], tuple[dict, np.ndarray, np.ndarray]] | None = None
    draws: dict[str, np.ndarray] | None = field(default=None, repr=False)


def flowguides_spec(family: str) -> Any:
    """The flowguides spec of one family at the matched sizes, in float64."""
    from flowguides.spec import FlowSpec

    if family == "realnvp":
        return FlowSpec.realnvp(
            num_layers=ARCH["couplings"], hidden=ARCH["hidden"], dtype="float64"
        )
    if family == "planar":
        return FlowSpec.planar(num_layers=ARCH["planar"], dtype="float64")
    if family == "neural_ode":
        return FlowSpec.neural_ode(
            hidden=ARCH["ode_hidden"], solver="rk4", num_steps=8, dtype="float64"
        )
    raise ValueError(f"family: expected 'realnvp', 'planar' or 'neural_ode', got {family!r}")


def _final(losses: list) -> float | None:
    arr = np.asarray([float(x) for x in losses[-max(len(losses) // 10, 1) :]])
    return float(arr.mean()) if len(arr) else None


# -- Pyro ------------------------------------------------------------------------------------
def _pyro_guide(kind: str, model: Callable) -> Any:
    import pyro.distributions.transforms as T
    from pyro.infer import autoguide as ag
    from pyro.nn import PyroModule  # noqa: F401  (registers nn parameters with Pyro)

    if kind == "AutoNormal":
        return ag.AutoNormal(model, init_loc_fn=ag.init_to_median)
    if kind == "AutoIAFNormal":
        return ag.AutoIAFNormal(
            model, hidden_dim=list(ARCH["hidden"]), num_transforms=ARCH["iaf"],
            init_loc_fn=ag.init_to_median,
        )  # fmt: skip
    if kind == "AutoNormalizingFlow(affine_coupling)":

        def coupling(dim: int) -> Any:
            import torch

            parts: list = []
            for i in range(ARCH["couplings"]):
                if i:
                    parts.append(T.Permute(torch.arange(dim - 1, -1, -1)))
                parts.append(T.affine_coupling(dim, hidden_dims=list(ARCH["hidden"])))
            return T.ComposeTransformModule(parts)

        return ag.AutoNormalizingFlow(model, coupling)
    if kind == "AutoNormalizingFlow(planar)":
        return ag.AutoNormalizingFlow(
            model,
            lambda dim: T.ComposeTransformModule([T.planar(dim) for _ in range(ARCH["planar"])]),
        )
    if kind.startswith("flowguides:"):
        from flowguides.pyro import AutoFlowGuide

        return AutoFlowGuide(model, flowguides_spec(kind.split(":")[1]))
    raise ValueError(f"method: unknown Pyro guide {kind!r}")


def pyro_svi(kind: str) -> Callable[[Problem, Budget], Fitted]:
    """A Pyro autoguide trained by a plain ``SVI`` loop (vectorised particles)."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        import pyro
        import torch
        from pyro.infer import SVI, Trace_ELBO

        model = problem.pyro_model()
        pyro.clear_param_store()
        pyro.set_rng_seed(budget.seed)
        t0 = time.perf_counter()
        guide = _pyro_guide(kind, model)
        guide()  # set up the guide's parameters (Pyro's init) before the clock for steps
        n = budget.num_steps
        sched = pyro.optim.LambdaLR(
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": budget.learning_rate},
                "lr_lambda": lambda s: learning_rate_at(s, n, 1.0),
            }
        )
        elbo = Trace_ELBO(
            num_particles=budget.num_particles, vectorize_particles=True, max_plate_nesting=0
        )
        svi = SVI(model, guide, sched, elbo)
        losses: list[float] = []

        def step(i: int) -> float:
            losses.append(svi.step())
            sched.step()
            return losses[-1]

        setup = time.perf_counter() - t0
        timing = metrics.timed_steps(step, n)
        timing["wall_s"] += setup
        timing["compile_s"] = None
        timing["setup_s"] = setup

        def draw(num: int, seed: int) -> tuple:
            return metrics.pyro_log_densities(model, guide, num, seed=seed)

        return Fitted(timing, _final(losses), draw)

    return fit


def pyro_fit_posterior(family: str) -> Callable[[Problem, Budget], Fitted]:
    """flowguides' Pyro ``fit_posterior`` (its defaults for everything not in the budget)."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        import pyro

        from flowguides.pyro import fit_posterior

        model = problem.pyro_model()
        pyro.clear_param_store()
        t0 = time.perf_counter()
        res = fit_posterior(
            model, flowguides_spec(family), num_steps=budget.num_steps,
            learning_rate=budget.learning_rate, num_particles=budget.num_particles,
            seed=budget.seed, progress=False,
        )  # fmt: skip
        timing = {"wall_s": time.perf_counter() - t0, "compile_s": None, **res.timing}

        def draw(num: int, seed: int) -> tuple:
            return metrics.pyro_log_densities(model, res.guide, num, seed=seed)

        return Fitted(timing, _final(list(res.losses)), draw)

    return fit


# -- NumPyro ---------------------------------------------------------------------------------
def _optax_schedule(budget: Budget) -> Any:
    import optax

    return optax.adam(
        lambda s: (
            budget.learning_rate * (0.01 + 0.99 * 0.5 * (1 + _jnp_cos_frac(s, budget.num_steps)))
        )
    )


def _jnp_cos_frac(step: Any, num_steps: int) -> Any:
    import jax.numpy as jnp

    from flowguides.core import decay_steps

    frac = jnp.clip((step - num_steps // 2) / decay_steps(num_steps), 0.0, 1.0)
    return jnp.cos(jnp.pi * frac)


def _numpyro_guide(kind: str, model: Callable) -> Any:
    from numpyro.infer import autoguide as ag

    init = ag.init_to_median
    if kind == "AutoNormal":
        return ag.AutoNormal(model, init_loc_fn=init)
    if kind == "AutoIAFNormal":
        return ag.AutoIAFNormal(
            model, init_loc_fn=init, num_flows=ARCH["iaf"], hidden_dims=list(ARCH["hidden"])
        )
    if kind == "AutoBNAFNormal":
        return ag.AutoBNAFNormal(model, init_loc_fn=init)
    if kind.startswith("flowguides:"):
        from flowguides.numpyro import AutoFlowGuide

        return AutoFlowGuide(model, flowguides_spec(kind.split(":")[1]))
    raise ValueError(f"method: unknown NumPyro guide {kind!r}")


def numpyro_svi(kind: str) -> Callable[[Problem, Budget], Fitted]:
    """A NumPyro autoguide trained by ``jit(svi.update)`` stepped from Python (as ``svi.run``)."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        import jax
        import numpyro.optim
        from numpyro.infer import SVI, Trace_ELBO

        model = problem.numpyro_model()
        t0 = time.perf_counter()
        guide = _numpyro_guide(kind, model)
        optim = numpyro.optim.optax_to_numpyro(_optax_schedule(budget))
        svi = SVI(model, guide, optim, Trace_ELBO(num_particles=budget.num_particles))
        state = svi.init(jax.random.PRNGKey(budget.seed))
        update = jax.jit(svi.update)
        losses: list = []
        box = [state]

        def step(i: int) -> Any:
            box[0], loss = update(box[0])
            losses.append(loss)
            return loss

        setup = time.perf_counter() - t0
        timing = metrics.timed_steps(step, budget.num_steps, jax.block_until_ready)
        timing["wall_s"] += setup
        timing["setup_s"] = setup
        params = svi.get_params(box[0])

        def draw(num: int, seed: int) -> tuple:
            return metrics.numpyro_log_densities(model, guide, params, num, seed=seed)

        return Fitted(timing, _final(losses), draw)

    return fit


def numpyro_fit_posterior(
    family: str, *, twice: bool = False
) -> Callable[[Problem, Budget], Fitted]:
    """flowguides' NumPyro ``fit_posterior``, timed by its own ``fit.timing`` (set-up, the
    first chunk's compile, steady steps/s); with ``twice``, a second identical call is run and
    its set-up and compile (the cached path) are recorded as ``again_setup_s`` and
    ``again_compile_s``."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        from flowguides.numpyro import fit_posterior

        model = problem.numpyro_model()
        spec = flowguides_spec(family)
        kwargs = {
            "num_steps": budget.num_steps, "learning_rate": budget.learning_rate,
            "num_particles": budget.num_particles, "seed": budget.seed, "progress": False,
        }  # fmt: skip
        t0 = time.perf_counter()
        res = fit_posterior(model, spec, **kwargs)
        timing: dict[str, float | None] = {"wall_s": time.perf_counter() - t0, **res.timing}
        if twice:
            res = fit_posterior(model, spec, **kwargs)
            timing.update(
                again_setup_s=res.timing["setup_s"], again_compile_s=res.timing["compile_s"]
            )

        def draw(num: int, seed: int) -> tuple:
            return metrics.numpyro_log_densities(model, res.guide, res.params, num, seed=seed)

        return Fitted(timing, _final(list(res.losses)), draw)

    return fit


def _potential(model: Callable, seed: int) -> tuple[Any, Callable, Callable, Callable]:
    """(initial flat point, flat log density, unravel, constrain) of a NumPyro model."""
    import jax
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model

    info = initialize_model(
        jax.random.PRNGKey(seed), model, init_strategy=init_to_median, dynamic_args=False
    )
    flat0, unravel = ravel_pytree(info.param_info.z)
    return flat0, lambda x: -info.potential_fn(unravel(x)), unravel, info.postprocess_fn


def flowjax_elbo(problem: Problem, budget: Budget) -> Fitted:
    """FlowJAX ``coupling_flow`` (affine) on the model's unconstrained space, ``ElboLoss``."""
    import jax
    import jax.numpy as jnp
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow
    from flowjax.train import fit_to_key_based_loss
    from flowjax.train.losses import ElboLoss

    model = problem.numpyro_model()
    t0 = time.perf_counter()
    flat0, log_p, unravel, constrain = _potential(model, budget.seed)
    key, sub = jax.random.split(jax.random.key(budget.seed))
    flow = coupling_flow(
        sub, base_dist=Normal(flat0, jnp.ones_like(flat0)), flow_layers=ARCH["couplings"],
        nn_width=ARCH["hidden"][0], nn_depth=len(ARCH["hidden"]), invert=False,
    )  # fmt: skip
    loss = ElboLoss(log_p, num_samples=budget.num_particles)
    optimizer = _optax_schedule(budget)
    setup = time.perf_counter() - t0
    # one step first (compiles), then the rest: the step function is cached across calls
    t1 = time.perf_counter()
    flow, first = fit_to_key_based_loss(
        key, flow, loss_fn=loss, steps=1, optimizer=optimizer, show_progress=False
    )
    t2 = time.perf_counter()
    flow, losses = fit_to_key_based_loss(
        key, flow, loss_fn=loss, steps=budget.num_steps - 1, optimizer=optimizer,
        show_progress=False,
    )  # fmt: skip
    t3 = time.perf_counter()
    steady = (t3 - t2) / (budget.num_steps - 1)
    timing = {
        "wall_s": setup + t3 - t1, "compile_s": max(t2 - t1 - steady, 0.0),
        "steps_per_s": 1.0 / steady, "setup_s": setup,
    }  # fmt: skip
    # NB: restarting fit_to_key_based_loss resets Adam's state and the schedule once (step 1).

    def draw(num: int, seed: int) -> tuple:
        x, log_q = flow.sample_and_log_prob(jax.random.key(seed), (num,))
        lp = jax.lax.map(log_p, x, batch_size=1000)
        values = jax.lax.map(lambda v: constrain(unravel(v)), x, batch_size=1000)
        return {k: np.asarray(v) for k, v in values.items()}, np.asarray(lp), np.asarray(log_q)

    return Fitted(timing, _final(first + losses), draw)


def nuts(problem: Problem, budget: Budget) -> Fitted:
    """NumPyro NUTS, 1,000 warm-up + 1,000 draws, one chain (the budget does not apply)."""
    import jax
    from numpyro.infer import MCMC, NUTS

    model = problem.numpyro_model()
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=1000, num_samples=1000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(budget.seed))
    draws = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    return Fitted({"wall_s": time.perf_counter() - t0, "compile_s": None}, draws=draws)


def bare_realnvp(problem: Problem, budget: Budget, chunk: int = 100) -> Fitted:
    """The floor: the same RealNVP (conventions.md) + affine, hand-written in JAX, reverse KL on
    the model's flat log density, Adam with the shared schedule, ``lax.scan`` over `chunk` steps
    per jitted call."""
    import jax
    import jax.numpy as jnp
    import optax

    t0 = time.perf_counter()
    flat0, log_p, unravel, constrain = _potential(problem.numpyro_model(), budget.seed)
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

    opt = _optax_schedule(budget)

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

    return Fitted(timing, _final(losses), draw)


_FAMILIES = (("RealNVP", "realnvp"), ("planar", "planar"), ("neural ODE", "neural_ode"))

METHODS: dict[str, Callable[[Problem, Budget], Fitted]] = {
    "flowguides-pyro RealNVP": pyro_fit_posterior("realnvp"),
    "flowguides-pyro planar": pyro_fit_posterior("planar"),
    "flowguides-pyro neural ODE": pyro_fit_posterior("neural_ode"),
    "flowguides-numpyro RealNVP": numpyro_fit_posterior("realnvp"),
    "flowguides-numpyro planar": numpyro_fit_posterior("planar"),
    "flowguides-numpyro neural ODE": numpyro_fit_posterior("neural_ode"),
    "pyro AutoNormal": pyro_svi("AutoNormal"),
    "pyro AutoIAFNormal": pyro_svi("AutoIAFNormal"),
    "pyro AutoNormalizingFlow(coupling)": pyro_svi("AutoNormalizingFlow(affine_coupling)"),
    "pyro AutoNormalizingFlow(planar)": pyro_svi("AutoNormalizingFlow(planar)"),
    "numpyro AutoNormal": numpyro_svi("AutoNormal"),
    "numpyro AutoIAFNormal": numpyro_svi("AutoIAFNormal"),
    "numpyro AutoBNAFNormal": numpyro_svi("AutoBNAFNormal"),
    "flowjax coupling (ElboLoss)": flowjax_elbo,
    "numpyro NUTS": nuts,
}
"""Posterior methods by display name, flowguides first."""

SPEED_METHODS: dict[str, Callable[[Problem, Budget], Fitted]] = {
    **{f"flowguides-pyro {n} (SVI loop)": pyro_svi(f"flowguides:{f}") for n, f in _FAMILIES},
    **{f"flowguides-pyro {n} (fit_posterior)": pyro_fit_posterior(f) for n, f in _FAMILIES},
    **{f"flowguides-numpyro {n} (SVI loop)": numpyro_svi(f"flowguides:{f}") for n, f in _FAMILIES},
    **{
        f"flowguides-numpyro {n} (fit_posterior)": numpyro_fit_posterior(f, twice=True)
        for n, f in _FAMILIES
    },
    **{k: v for k, v in METHODS.items() if not k.startswith("flowguides") and "NUTS" not in k},
    "bare JAX RealNVP (floor)": bare_realnvp,
}
"""Speed-suite methods: guides in the same plain SVI loop, fit_posterior timed twice, the floor."""
