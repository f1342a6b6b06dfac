"""The compiled-training machinery `posterior.py` and `density.py` share (NumPyro): `jit`
(every program a fit compiles, with `CPU_COMPILER_OPTIONS` on the CPU), a bounded program cache
(`cache_key`, `cached`, `clear_compiled`; keys `params_key`, `flowguides.numpyro._model`'s and
`flowguides.numpyro._support.supports_key`), Adam on the schedules (`make_optimizer`), the host
loop over chunks of `CHUNK` steps (`run_chunks`, `progress_bar`), neural-ODE records
(`history_entries`, `mean_penalty`) and `fit_posterior`'s losses (`ObjectiveLoss`,
`objective_loss`, `RecordingELBO`). PyTorch steps eagerly: the Pyro backend's
``_training.py`` shares `mean_penalty`, `progress_bar` and the losses, not the program names.
"""

from __future__ import annotations

import copy
import inspect
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from numpyro import handlers
from numpyro.distributions import TransformedDistribution
from numpyro.infer import Trace_ELBO
from numpyro.infer.elbo import ELBO
from numpyro.infer.util import log_density
from tqdm.auto import tqdm

from flowguides.core import AFFINE_PARAMETERS, CONTROL_VARIATE_PREFIX, PRECONDITION, training
from flowguides.numpyro._support import on_device, replayed
from flowguides.numpyro.build import FlowTransform
from flowguides.numpyro.ode import training_solves
from flowguides.spec import FlowSpec

__all__ = [
    "CHUNK",
    "CPU_COMPILER_OPTIONS",
    "CPU_SETUP_OPTIONS",
    "CHUNK_SETUP_MAX_ELEMENTS",
    "HISTORY",
    "ObjectiveLoss",
    "RecordingELBO",
    "all_finite",
    "cache_key",
    "cached",
    "clear_compiled",
    "compiler_options",
    "default_float",
    "history_entries",
    "jit",
    "make_optimizer",
    "mean_penalty",
    "objective_loss",
    "params_key",
    "posterior_chunk",
    "progress_bar",
    "run_chunks",
]

CHUNK = 100
HISTORY = "_flowguides_history"
"""The SVI mutable-state entry where `fit_posterior`'s steps put their history entries."""

CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 2}
"""XLA options of flowguides' CPU programs (`jit`): LLVM at ``-O2``, not ``-O3``, for shorter
compiles (see the conventions page); values change by rounding at most; both caches key them."""

CPU_SETUP_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}
"""Added for the CPU programs a fit runs once (``jit(..., setup=True)``: set-up, start search,
draws) and its training chunks on at most `CHUNK_SETUP_MAX_ELEMENTS` data elements (a step
there is the flow's work, as fast either way): XLA's elemental emitters for fused operations,
not its fusion emitters, for shorter compiles; chunks on more data keep the fusion emitters
(faster loops over many rows; see the conventions page)."""
CHUNK_SETUP_MAX_ELEMENTS = 2**9  # counted by `flowguides.numpyro._support.data_elements`
_CACHE_SIZE = 32
_COMPILED: OrderedDict[Hashable, Callable[..., Any]] = OrderedDict()
_TAKES_OPTIONS = "compiler_options" in inspect.signature(jax.jit).parameters
_TAKEN: dict[tuple, dict[str, Any]] = {}


def compiler_options(setup: bool = False) -> dict[str, Any] | None:
    """`CPU_COMPILER_OPTIONS` (`setup`: and `CPU_SETUP_OPTIONS`) on the CPU, else None (XLA's
    own), less any the installed XLA refuses (tried once per process: XLA renames options)."""
    if jax.default_backend() != "cpu":
        return None
    wanted = tuple(sorted({**CPU_COMPILER_OPTIONS, **(CPU_SETUP_OPTIONS if setup else {})}.items()))
    if wanted not in _TAKEN:  # one trial compile where XLA takes them all, else one each
        every = not wanted or _accepted(dict(wanted))
        _TAKEN[wanted] = dict(wanted) if every else {k: v for k, v in wanted if _accepted({k: v})}
    return dict(_TAKEN[wanted])


def _accepted(options: dict[str, Any]) -> bool:
    try:
        jax.jit(lambda x: x, compiler_options=options).lower(0.0).compile()
    except Exception:  # noqa: BLE001 - XLA's "No such compile option" (or a bad value)
        return False
    return True


def jit(fun: Callable[..., Any], setup: bool = False, **kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fun, **kwargs)`` with `compiler_options` (where `jax.jit` takes them; `setup`:
    a program run once, see `CPU_SETUP_OPTIONS`)."""
    options = compiler_options(setup) if _TAKES_OPTIONS else None
    if options:
        kwargs = {"compiler_options": options, **kwargs}
    return jax.jit(fun, **kwargs)


def cache_key(*parts: Hashable, content: tuple, setup: bool = False) -> tuple | None:
    """The key ``(*parts, *content, the compiler options in force)`` (`setup` as `jit`'s), or
    None where a `content` part is None (a model or argument not keyable by content, see
    `flowguides.numpyro._model`)."""
    if any(c is None for c in content):
        return None
    options = compiler_options(setup) if _TAKES_OPTIONS else None
    return (*parts, *content, tuple(sorted((options or {}).items())))


def cached(key: tuple | None, make: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """The program cached under `key`, made by `make` on a miss; with key None, not cached."""
    if key is None:
        return make()
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
    else:
        _COMPILED[key] = make()
        while len(_COMPILED) > _CACHE_SIZE:
            _COMPILED.popitem(last=False)
    return _COMPILED[key]


def clear_compiled() -> None:
    """Empty the cache of compiled programs (training chunks, guide set-ups): the next fit
    compiles anew (to time a first call, or free memory); keyed by content, it never serves a
    stale program."""
    _COMPILED.clear()


def default_float() -> jnp.dtype:
    """The default float dtype at trace time (float64 when x64 is on)."""
    return jnp.result_type(float)


def make_optimizer(
    num_steps: int,
    learning_rate: float,
    clip_norm: float | None,
    affine_rate: float | None = None,
    posterior: bool = False,
):
    """Adam on the shared schedule (`posterior`: `fit_posterior`'s, decaying from
    `POSTERIOR_DECAY_START` with Adam's `POSTERIOR_ADAM_B2`; else `fit_density`'s, from
    `DENSITY_DECAY_START`, with optax's Adam), after global-norm clipping when `clip_norm` is
    set; the fixed whitening of a Laplace start (`PRECONDITION`) and the control variate's
    terms (`CONTROL_VARIATE_PREFIX`) are left out. The guide's affine (`AFFINE_PARAMETERS`)
    peaks at `affine_rate` (None: `learning_rate`), other updates scaled by the ratio."""
    peak = learning_rate if affine_rate is None else affine_rate
    start = training.POSTERIOR_DECAY_START if posterior else training.DENSITY_DECAY_START
    schedule = optax.join_schedules([optax.constant_schedule(peak), optax.cosine_decay_schedule(
        peak, training.decay_steps(num_steps, start), alpha=0.01)],
        [training.hold_steps(num_steps, start)])  # fmt: skip
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts.append(optax.adam(schedule, b2=training.POSTERIOR_ADAM_B2 if posterior else 0.999))
    if peak != learning_rate:
        layers = lambda params: {k: not k.endswith(AFFINE_PARAMETERS) for k in params}  # noqa: E731
        parts.append(optax.masked(optax.scale(learning_rate / peak), layers))
    trained = parts[0] if len(parts) == 1 else optax.chain(*parts)

    def labels(params: Any) -> Any:
        if not isinstance(params, dict):
            return jax.tree.map(lambda _: "trained", params)
        return {k: "fixed" if k.endswith(PRECONDITION) or k.startswith(CONTROL_VARIATE_PREFIX)
                else "trained" for k in params}  # fmt: skip

    return optax.multi_transform({"trained": trained, "fixed": optax.set_to_zero()}, labels)


def params_key(params: Mapping[str, Any]) -> tuple:
    """SVI parameters by name, shape and dtype."""
    return tuple(sorted((k, jnp.shape(v), str(jnp.result_type(v))) for k, v in params.items()))


def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every array in `tree` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def mean_penalty(records: Sequence[dict], zero: jax.Array | float = 0.0) -> jax.Array | float:
    """The sum over the solves in `records` (a `training_solves` block's) of each solve's mean
    RNODE penalty (`zero` when none has one)."""
    return sum((jnp.mean(r["penalty"]) for r in records if "penalty" in r), zero)


def history_entries(spec: FlowSpec) -> Callable[[jax.Array, jax.Array], dict[str, jax.Array]]:
    """``entries(nfe, penalty)``: one step's history entries (empty without neural-ODE
    layers); a gradient's evaluations equal the loss's except under the adjoint."""
    has_ode = any(layer.type == "neural_ode" for layer in spec.layers)
    backward = not any(getattr(layer, "adjoint", False) for layer in spec.layers)
    regularized = any(
        getattr(layer, "kinetic_weight", 0.0) > 0 or getattr(layer, "jacobian_weight", 0.0) > 0
        for layer in spec.layers
    )

    def entries(nfe: jax.Array, penalty: jax.Array) -> dict[str, jax.Array]:
        out = {"nfe_forward": nfe} if has_ode else {}
        if has_ode and backward:
            out["nfe_backward"] = nfe
        if regularized:
            out["regularization"] = jnp.asarray(penalty, default_float())
        return out

    return entries


def progress_bar(num_steps: int, progress: bool) -> tqdm:
    """A tqdm bar over `num_steps` on stderr (disabled unless `progress`)."""
    return tqdm(total=num_steps, disable=not progress, file=sys.stderr, leave=False)


def run_chunks(
    run_chunk: Callable,
    carry: tuple,
    data: Any,
    num_steps: int,
    progress: bool,
    seconds: list[float] | None = None,
):
    """Run the compiled chunks; return the final carry and the per-step outputs (and append
    each chunk's wall time, compile included, to `seconds`)."""
    outputs = []
    smoothed = None
    with progress_bar(num_steps, progress) as bar:
        for start in range(0, num_steps, CHUNK):
            t0 = time.perf_counter()
            carry, out = run_chunk(carry, on_device(start), data)
            out = jax.tree.map(np.asarray, out)
            if seconds is not None:
                seconds.append(time.perf_counter() - t0)
            n = min(CHUNK, num_steps - start)
            outputs.append(jax.tree.map(lambda a, n=n: a[:n], out))
            train = out[0] if isinstance(out, tuple) else out
            finite = train[:n][np.isfinite(train[:n])]
            for value in finite:
                smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            bar.update(n)
            if smoothed is not None:
                bar.set_postfix(loss=f"{smoothed:.4g}")
            if bool(carry[-2]):  # stopped
                break
    return carry, jax.tree.map(lambda *a: np.concatenate(a), *outputs)


def posterior_chunk(
    svi: Any, rebuild: Callable[[list], tuple], num_steps: int, traced: Callable, setup: bool
) -> Callable[..., Any]:
    """The chunk of `CHUNK` SVI steps ``chunk(carry, start, arrays)`` (`jit`'s, with `setup`),
    carry ``(state, good params, stopped, bad step)``, per step the loss and history (`HISTORY`);
    calls `traced` when it traces. Without mutable sites, `Trace_ELBO` runs as `ObjectiveLoss`."""
    mutable = any(site["type"] == "mutable" for site in svi.guide.prototype_trace.values())
    if type(svi.loss) is Trace_ELBO and not mutable:
        svi = copy.copy(svi)
        svi.loss = ObjectiveLoss("elbo", "reparam", svi.loss.num_particles, 1)

    def chunk(carry: tuple, start: jax.Array, arrays: list):
        traced()
        args, kwargs = rebuild(arrays)

        def step(c: tuple, i: jax.Array):
            def run(c: tuple):
                state, good, _, bad_step = c
                with training_solves():  # the guide adds its RNODE penalty as a factor
                    new, loss = svi.update(state, *args, **kwargs)
                # the parameters this finite loss was computed at (not the optimiser state:
                # after a non-finite loss or gradient training stops, and only these return)
                params = svi.optim.get_params(state.optim_state)
                good = lax.cond(jnp.isfinite(loss), lambda: params, lambda: good)
                # a non-finite gradient makes Adam's update, so the new parameters, non-finite
                finite = jnp.isfinite(loss) & all_finite(svi.optim.get_params(new.optim_state))
                steps = (new.mutable_state or {}).get(HISTORY, {})
                out = (loss.astype(default_float()), steps)
                return (new, good, ~finite, jnp.where(finite, bad_step, i)), out

            def skip(c: tuple):
                steps = (c[0].mutable_state or {}).get(HISTORY, {})
                nan = jnp.asarray(jnp.nan, default_float())
                return c, (nan, jax.tree.map(jnp.zeros_like, steps))

            return lax.cond((i < num_steps) & ~c[2], run, skip, c)

        return lax.scan(step, carry, start + jnp.arange(CHUNK))

    return jit(chunk, setup=setup)


def objective_loss(
    log_w: jax.Array, log_w_path: jax.Array | None, objective: str, gradient: str
) -> jax.Array:
    """The loss of log-weights ``(num_particles, num_inner)``: its value is the negative
    ELBO (mean of `log_w`) or IW-ELBO (mean over rows of ``logsumexp - log K``); its gradient
    the reparametrisation one of that value, or with ``gradient="stl"`` that of `log_w_path`
    (``log q`` at stopped flow parameters): STL for the ELBO, DReG for the IW-ELBO
    (``sum_k stop(w_k^2) log w_k`` with ``w`` the normalised weights of a row)."""
    if objective == "elbo":
        value = jnp.mean(log_w)
        path = None if log_w_path is None else jnp.mean(log_w_path)
    else:
        value = jnp.mean(jax.nn.logsumexp(log_w, -1) - jnp.log(log_w.shape[-1]))
        if log_w_path is not None:
            weights = jax.nn.softmax(lax.stop_gradient(log_w), -1)
            path = jnp.mean(jnp.sum(weights * weights * log_w_path, -1))
    if gradient == "reparam" or log_w_path is None:
        return -value
    return -(lax.stop_gradient(value) + path - lax.stop_gradient(path))


class ObjectiveLoss(ELBO):
    """`fit_posterior`'s loss (arguments as there): each of ``num_particles * num_inner``
    draws (vectorised; keys as `Trace_ELBO` splits them, or by `split`, which may shard them
    over devices; one draw takes the key itself) gives its log-weight ``log p - log q``, then
    `objective_loss`. With ``gradient="stl"``, each draw's ``log q`` is evaluated again by the
    flow's inverse at `jax.lax.stop_gradient` parameters (Roeder et al. 2017): no score term."""

    def __init__(self, objective, gradient, num_particles, num_inner, split=jax.random.split):
        super().__init__(num_particles=num_particles * num_inner)
        self.objective, self.gradient, self.split = objective, gradient, split
        self.shape = (num_particles, num_inner)

    def log_weights(self, rng_key, param_map, model, guide, *args, **kwargs):
        """``(log_w, log_w_path)``, each ``(num_particles, num_inner)`` (`log_w_path` None
        unless ``gradient="stl"``)."""

        def one(key: jax.Array):
            model_seed, guide_seed = jax.random.split(key)
            log_q, trace = log_density(handlers.seed(guide, guide_seed), args, kwargs, param_map)
            model_run = replayed(model, model_seed, trace)
            log_w = log_density(model_run, args, kwargs, param_map)[0] - log_q
            if self.gradient == "reparam":
                return log_w, log_w
            path = log_w
            for site in trace.values():
                fn = site.get("fn")
                if site["type"] == "sample" and isinstance(fn, TransformedDistribution):
                    flow = fn.transforms[0]
                    if isinstance(flow, FlowTransform):
                        live = fn.log_prob(site["value"], site["intermediates"] or None)
                        stopped = FlowTransform(
                            lax.stop_gradient(flow.params), flow.spec, flow.dim, flow.key
                        )
                        stopped_fn = TransformedDistribution(fn.base_dist, stopped)
                        path = path + live - stopped_fn.log_prob(site["value"])
            return log_w, path

        n = self.num_particles
        log_w, path = one(rng_key) if n == 1 else jax.vmap(one)(self.split(rng_key, n))
        shaped = (log_w.reshape(self.shape), path.reshape(self.shape))
        return shaped if self.gradient == "stl" else (shaped[0], None)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        log_w, path = self.log_weights(rng_key, param_map, model, guide, *args, **kwargs)
        return {"loss": objective_loss(log_w, path, self.objective, self.gradient),
                "mutable_state": None}  # fmt: skip


class RecordingELBO(Trace_ELBO):
    """`Trace_ELBO` with vectorised particles that also returns, as SVI mutable state, the
    step's history entries: each particle runs as a one-draw ELBO `ObjectiveLoss` (the same
    keys, so the same loss as ``Trace_ELBO(num_particles, vectorize_particles=True)``) inside
    its own `training_solves` block, which collects its guide's solves."""

    def __init__(self, num_particles: int, spec: FlowSpec, split=jax.random.split) -> None:
        super().__init__(num_particles=num_particles, vectorize_particles=True)
        self._single, self.split = ObjectiveLoss("elbo", "reparam", 1, 1), split
        self.entries = history_entries(spec)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        def one(key: jax.Array):
            with training_solves() as records:
                loss = self._single.loss(key, param_map, model, guide, *args, **kwargs)
            nfe = sum((jnp.asarray(r["nfe"], jnp.int32) for r in records), jnp.zeros((), jnp.int32))
            return loss, nfe, jnp.asarray(mean_penalty(records), default_float())

        losses, nfe, penalty = jax.vmap(one)(self.split(rng_key, self.num_particles))
        entries = self.entries(jnp.max(nfe), jnp.mean(penalty))
        return {"loss": jnp.mean(losses), "mutable_state": {HISTORY: entries}}
