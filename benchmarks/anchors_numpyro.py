"""NumPyro methods: autoguides in a ``jit(svi.update)`` loop, flowguides' NumPyro
``fit_posterior``, the MAP-initialised Gaussian anchors and NUTS.

Anchors: ``AutoNormal``, ``AutoIAFNormal``, ``AutoBNAFNormal`` (from ``init_to_median``);
``AutoLaplaceApproximation`` and ``AutoMultivariateNormal`` started at the MAP, which
:func:`map_point` finds by L-BFGS on the model's unconstrained log density (its cost counts in
the fit's set-up time); NUTS with 4 chains of 1,000 warm-up + 1,000 draws, run one after the
other, reporting its own Monte Carlo standard error of every mean.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import metrics
from benchmarks.anchor_base import ARCH, Budget, Fitted, Problem, final_loss, flowguides_spec

__all__ = [
    "NUTS_SETTINGS",
    "map_point",
    "numpyro_fit_posterior",
    "numpyro_guide",
    "numpyro_svi",
    "nuts",
    "optax_schedule",
    "potential",
]

NUTS_SETTINGS = {"chains": 4, "warmup": 1000, "samples": 1000, "chain_method": "sequential"}
"""NUTS's own budget (the SVI budget does not apply to it)."""

MAP_ITERATIONS = 1000
"""Most L-BFGS iterations of :func:`map_point`."""


def optax_schedule(budget: Budget) -> Any:
    """Adam (optax's defaults) at ``budget.learning_rate`` with ``fit_posterior``'s schedule
    (:func:`flowguides.core.learning_rate_at` from ``POSTERIOR_DECAY_START``)."""
    import jax.numpy as jnp
    import optax

    from flowguides.core import POSTERIOR_DECAY_START, decay_steps, hold_steps

    hold = hold_steps(budget.num_steps, POSTERIOR_DECAY_START)
    decay = decay_steps(budget.num_steps, POSTERIOR_DECAY_START)

    def rate(step: Any) -> Any:
        frac = jnp.clip((step - hold) / decay, 0.0, 1.0)
        return budget.learning_rate * (0.01 + 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * frac)))

    return optax.adam(rate)


def potential(model: Callable, seed: int) -> tuple[Any, Callable, Callable, Callable]:
    """(initial flat point from ``init_to_median``, flat unconstrained log density, unravel,
    constrain) of a NumPyro model; constrain returns latent and ``deterministic`` sites."""
    import jax
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model

    info = initialize_model(
        jax.random.PRNGKey(seed), model, init_strategy=init_to_median, dynamic_args=False
    )
    flat0, unravel = ravel_pytree(info.param_info.z)
    return flat0, lambda x: -info.potential_fn(unravel(x)), unravel, info.postprocess_fn


def map_point(model: Callable, seed: int) -> dict[str, Any]:
    """The MAP of ``model`` in its unconstrained space (L-BFGS from ``init_to_median``, at most
    :data:`MAP_ITERATIONS` iterations, stopping at gradient norm 1e-6), as constrained site
    values for ``init_to_value``.

    Raises:
        FloatingPointError: L-BFGS ended at a non-finite point or log density.
    """
    import jax
    import optax

    flat0, log_p, unravel, constrain = potential(model, seed)

    def loss(x: Any) -> Any:
        return -log_p(x)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry: tuple) -> tuple:
        x, state, i = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(x, updates), state, i + 1

    def cond(carry: tuple) -> Any:
        _, state, i = carry
        grad = optax.tree.get(state, "grad")
        return (i == 0) | ((i < MAP_ITERATIONS) & (optax.tree.norm(grad) > 1e-6))

    x, _, _ = jax.jit(lambda x0: jax.lax.while_loop(cond, body, (x0, opt.init(x0), 0)))(flat0)
    if not (np.isfinite(np.asarray(x)).all() and np.isfinite(float(log_p(x)))):
        raise FloatingPointError(f"map_point: L-BFGS ended at a non-finite point {np.asarray(x)}")
    return constrain(unravel(x))


def numpyro_guide(kind: str, model: Callable, seed: int = 0) -> Any:
    """The NumPyro guide ``kind`` for ``model`` (``seed`` starts the MAP search of the
    MAP-initialised guides).

    Raises:
        ValueError: ``kind`` is none of the guides above.
    """
    from numpyro.infer import autoguide as ag
    from numpyro.infer import init_to_value

    init = ag.init_to_median
    if kind == "AutoNormal":
        return ag.AutoNormal(model, init_loc_fn=init)
    if kind == "AutoIAFNormal":
        return ag.AutoIAFNormal(
            model, init_loc_fn=init, num_flows=ARCH["iaf"], hidden_dims=list(ARCH["hidden"])
        )
    if kind == "AutoBNAFNormal":
        return ag.AutoBNAFNormal(model, init_loc_fn=init)
    if kind in ("AutoLaplaceApproximation", "AutoMultivariateNormal"):
        at_map = init_to_value(values=map_point(model, seed))
        return getattr(ag, kind)(model, init_loc_fn=at_map)
    if kind.startswith("flowguides:"):
        from flowguides.numpyro import AutoFlowGuide

        return AutoFlowGuide(model, flowguides_spec(kind.split(":")[1]))
    raise ValueError(f"method: unknown NumPyro guide {kind!r}")


def numpyro_svi(kind: str) -> Callable[[Problem, Budget], Fitted]:
    """A NumPyro autoguide trained by ``jit(svi.update)`` stepped from Python (as ``svi.run``).

    ``AutoLaplaceApproximation`` trains its MAP point and is drawn from its Gaussian
    (``guide.get_posterior``: the inverse Hessian at the point), not from its point mass."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        import jax
        import numpyro.optim
        from numpyro.infer import SVI, Trace_ELBO

        model = problem.numpyro_model()
        t0 = time.perf_counter()
        guide = numpyro_guide(kind, model, budget.seed)
        optim = numpyro.optim.optax_to_numpyro(optax_schedule(budget))
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
            if kind == "AutoLaplaceApproximation":
                return _gaussian_log_densities(model, guide.get_posterior(params), num, seed)
            return metrics.numpyro_log_densities(model, guide, params, num, seed=seed)

        return Fitted(timing, final_loss(losses), draw)

    return fit


def _gaussian_log_densities(model: Callable, gaussian: Any, num: int, seed: int) -> tuple:
    """Draws, log p and log q of a Gaussian over the model's flat unconstrained latent (the
    order of ``ravel_pytree`` over the latent sites, as NumPyro's ``AutoContinuous`` packs
    them); log p and log q both carry the unconstrained space's Jacobian, so their difference
    is the log weight of the constrained draws."""
    import jax

    _, log_p, unravel, constrain = potential(model, seed)
    x = gaussian.sample(jax.random.PRNGKey(seed), (num,))
    log_q = gaussian.log_prob(x)
    lp = jax.lax.map(log_p, x, batch_size=1000)
    values = jax.lax.map(lambda v: constrain(unravel(v)), x, batch_size=1000)
    return {k: np.asarray(v) for k, v in values.items()}, np.asarray(lp), np.asarray(log_q)


def numpyro_fit_posterior(
    family: str, *, twice: bool = False, **options: Any
) -> Callable[[Problem, Budget], Fitted]:
    """flowguides' NumPyro ``fit_posterior``, timed by its own ``fit.timing`` (set-up, the
    first chunk's compile, steady steps/s); with ``twice``, a second identical call is run and
    its set-up and compile (the cached path) are recorded as ``again_setup_s`` and
    ``again_compile_s``. ``options`` go to ``fit_posterior`` (``objective``, ``gradient``,
    ``num_inner``)."""

    def fit(problem: Problem, budget: Budget) -> Fitted:
        from flowguides.numpyro import fit_posterior

        model = problem.numpyro_model()
        spec = flowguides_spec(family)
        kwargs = {
            "num_steps": budget.num_steps, "learning_rate": budget.learning_rate,
            "num_particles": budget.num_particles, "seed": budget.seed, "progress": False,
            **options,
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

        return Fitted(timing, final_loss(list(res.losses)), draw)

    return fit


def nuts(problem: Problem, budget: Budget) -> Fitted:
    """NumPyro NUTS at :data:`NUTS_SETTINGS` (the SVI budget's seed only).

    Adds to its row ``mcse_max`` and ``mcse_median``: over every scalar of the reference, the
    Monte Carlo standard error of the NUTS mean (``sd / sqrt(ESS)``, ESS across the chains) in
    reference-sd units, the noise floor of its ``mean_err``; and ``divergences``.
    """
    import jax
    from numpyro.diagnostics import effective_sample_size
    from numpyro.infer import MCMC, NUTS

    model = problem.numpyro_model()
    t0 = time.perf_counter()
    s = NUTS_SETTINGS
    mcmc = MCMC(NUTS(model), num_warmup=s["warmup"], num_samples=s["samples"],
                num_chains=s["chains"], chain_method=s["chain_method"], progress_bar=False)  # fmt: skip
    mcmc.run(jax.random.PRNGKey(budget.seed), extra_fields=("diverging",))
    wall = time.perf_counter() - t0
    chains = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    draws = {k: v.reshape(-1, *v.shape[2:]) for k, v in chains.items()}
    extra: dict[str, Any] = {
        "divergences": int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    }
    if problem.reference:
        mcse = []
        for name, (_, ref_sd) in problem.reference.items():
            c = chains[name].reshape(*chains[name].shape[:2], -1)
            ess = effective_sample_size(c)
            mcse.append(c.reshape(-1, c.shape[-1]).std(0) / np.sqrt(ess) / np.ravel(ref_sd))
        flat = np.concatenate(mcse)
        extra.update(mcse_max=float(np.max(flat)), mcse_median=float(np.median(flat)))
    return Fitted({"wall_s": wall, "compile_s": None}, draws=draws, extra=extra)
