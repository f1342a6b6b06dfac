"""Fit a posterior (`fit_posterior`) or a density (`fit_density`) with a compiled training loop.

Training steps run inside `jax.lax.scan` in chunks of up to 100 steps; the tqdm bar advances
between chunks, so the host synchronises once per chunk, not per step. The jitted chunk
function is cached on the static structure of a fit (spec, settings, argument shapes and
dtypes) and on the model by content (`flowguides.numpyro._args.callable_key`), so a second call
with the same shapes does not recompile, while one after a change of the data the model reads
from outside its arguments does. A non-finite loss, or a finite loss with a non-finite
gradient, stops training at that step: the last parameters whose loss was finite are kept and a
`NonFiniteLossError` (`NonFiniteGradientError`) names the step, with the partial fit on its
``.fit``.

Optimiser: Adam (after global-norm clipping when `clip_norm` is set) with the shared schedule:
constant for the first half, then cosine decay to 1% of `learning_rate` at the last step.

Neural-ODE layers train inside `training_solves`: STEER end times and the RNODE penalty
``kinetic_weight * KE + jacobian_weight * JF`` (mean over points or particles, summed over
layers) added to the loss. Both fits record per step, in ``fit.history``, the field
evaluations of the loss (``"nfe_forward"``: diffrax's step count times the solver's
evaluations per step, plus its start-up evaluation), of its gradient (``"nfe_backward"``: one
vector-Jacobian product per recorded evaluation, as in Pyro; left out with ``adjoint=True``,
whose backward solve is not observable) and the penalty (``"regularization"``). `fit_density`
can also train a single neural-ODE layer by flow matching (``objective="flow_matching"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.initialization import init_to_median
from numpyro.infer.svi import SVIState
from numpyro.infer.util import log_density, transform_fn
from numpyro.infer.util import log_likelihood as _numpyro_log_likelihood

from flowguides.core import (
    OBJECTIVES,
    VALIDATE_EVERY,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteValidationError,
    PosteriorFitMethods,
    as_spec,
    check_data,
    check_objective,
    check_training,
    default_learning_rate,
    split_indices,
    standardization,
    warn_if_below_start,
)
from flowguides.numpyro._args import (
    TRACER_ERRORS,
    as_constants,
    callable_key,
    model_tracing_error,
    split_args,
    value_key,
)
from flowguides.numpyro._training import (
    CHUNK,
    cache_key,
    cached,
    default_float,
    make_optimizer,
    run_chunks,
    timing,
)
from flowguides.numpyro.build import Flow, build_flow
from flowguides.numpyro.guide import AutoFlowGuide
from flowguides.numpyro.ode import flow_matching_loss, training_solves
from flowguides.spec import FlowSpec, SpecError

__all__ = [
    "OBJECTIVES",
    "TRAINING_PRNG",
    "DensityFit",
    "NonFiniteGradientError",
    "NonFiniteValidationError",
    "PosteriorFit",
    "fit_density",
    "fit_posterior",
]


TRAINING_PRNG = "rbg"
"""The key implementation of `fit_posterior`'s SVI state: XLA's random-bit generator for the
particles' draws (keys still split by threefry, so streams stay independent under `vmap`). An
SVI step splits keys and draws noise for every particle and site, and with threefry's bits
that cost about a sixth of a RealNVP step on a 10-D logistic regression (CPU)."""
_TRACES = {"posterior": 0, "density": 0}  # times a training chunk was traced (tests read it)


# -- posterior ------------------------------------------------------------------------------
@dataclass
class PosteriorFit(PosteriorFitMethods):
    """A fitted `AutoFlowGuide` with its SVI parameters and the model's arguments.

    Attributes:
        guide: the `AutoFlowGuide`.
        model: the model.
        spec: the `FlowSpec`.
        params: the SVI parameter dict.
        losses: the loss (negative ELBO estimate) of every step run; with a positive RNODE
            weight it includes the penalty (a factor in the guide, see `AutoFlowGuide`).
        args, kwargs: the model's arguments (constant JAX arrays as numpy, see
            `fit_posterior`'s `static_argnames`).
        backend: ``"numpyro"``.
        history: per-step arrays for neural-ODE flows, as in `fit_density` and the Pyro
            backend: ``"nfe_forward"`` (field evaluations of the vectorised particles' solves:
            the most any particle's solve needed, which is what the batched solve runs),
            ``"nfe_backward"`` (unless a layer uses the adjoint) and ``"regularization"`` (the
            mean RNODE penalty, when a regulariser weight is positive); empty otherwise.
        timing: ``setup_s`` (guide set-up: NumPyro's model tracing, the `init_scale`
            search), ``compile_s`` (the training chunk's XLA compile, ~0 when a previous
            call with the same shapes compiled it) and steady ``steps_per_s`` (the fastest
            100-step chunk after the first).
    """

    guide: AutoFlowGuide
    model: Callable[..., Any]
    spec: FlowSpec
    params: dict[str, jax.Array]
    losses: np.ndarray
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    seed: int = 0
    backend: str = "numpyro"
    history: dict[str, np.ndarray] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed + 1)
        self._densities = jax.jit(self._log_densities_fn, static_argnums=1)

    def _key(self, seed: int | None) -> jax.Array:
        return jax.random.key(int(self._rng.integers(2**31)) if seed is None else seed)

    @property
    def latent_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{site: shape}`` of every latent site."""
        return {name: tuple(np.shape(v)) for name, v in self.guide._init_locs.items()}

    @property
    def subsampled_plates(self) -> list[str]:
        """Names of the model's plates that subsample their data (``subsample_size`` smaller
        than the size). `flowguides.to_arviz` leaves ``observed_data`` and
        ``log_likelihood`` out for such a model: each evaluation sees another subsample."""
        return [
            name
            for name, site in self.guide.prototype_trace.items()
            if site["type"] == "plate"
            and site["args"][1] is not None
            and 0 < site["args"][1] < site["args"][0]
        ]

    def observed_data(self) -> dict[str, np.ndarray]:
        """``{site: value}`` of every observed site."""
        trace = self.guide.prototype_trace
        return {
            name: np.asarray(site["value"])
            for name, site in trace.items()
            if site["type"] == "sample" and site["is_observed"]
        }

    def sample(self, num_samples: int, seed: int | None = None) -> dict[str, np.ndarray]:
        """Constrained posterior draws ``{site: (num_samples, *site_shape)}``."""
        draws = self.guide.sample_posterior(
            self._key(seed), self.params, *self.args, sample_shape=(num_samples,), **self.kwargs
        )
        return {name: np.asarray(draws[name]) for name in self.latent_shapes}

    def _log_densities_fn(self, key: jax.Array, num_samples: int):
        names = list(self.latent_shapes)

        def one(k: jax.Array):
            log_q, trace = log_density(
                handlers.seed(self.guide, k), self.args, self.kwargs, self.params
            )
            model = handlers.replay(handlers.seed(self.model, k), trace)
            log_p, _ = log_density(model, self.args, self.kwargs, self.params)
            return {n: trace[n]["value"] for n in names}, log_p, log_q

        return jax.vmap(one)(jax.random.split(key, num_samples))

    def log_densities(
        self, num_samples: int, seed: int | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Draws with ``log p(x, z)`` and ``log q(z)``, both in the constrained space."""
        draws, log_p, log_q = self._densities(self._key(seed), num_samples)
        return jax.tree.map(np.asarray, draws), np.asarray(log_p), np.asarray(log_q)

    def log_likelihood(
        self, draws: Mapping[str, Any], seed: int | None = None
    ) -> dict[str, np.ndarray]:
        """Pointwise log-likelihood ``{observed site: (S, *obs_shape)}`` of latent `draws`.

        The model runs seeded (`seed`, or one from the fit's generator): a subsampled plate
        (see `subsampled_plates`) draws its indices from it, the same for every draw."""
        samples = {k: jnp.asarray(v) for k, v in draws.items()}
        model = handlers.seed(self.model, self._key(seed))
        out = _numpyro_log_likelihood(model, samples, *self.args, **self.kwargs)
        return {k: np.asarray(v) for k, v in out.items()}


def fit_posterior(
    model: Callable[..., Any],
    spec: FlowSpec | Mapping[str, Any],
    *args: Any,
    num_steps: int = 2000,
    learning_rate: float | None = None,
    num_particles: int = 8,
    clip_norm: float | None = None,
    init_loc_fn: Callable[..., Any] = init_to_median,
    init_scale: float | str = "auto",
    seed: int = 0,
    progress: bool = True,
    static_argnames: Sequence[str] | None = None,
    **kwargs: Any,
) -> PosteriorFit:
    """Fit an `AutoFlowGuide` to `model`'s posterior by SVI with vectorised particles.

    Neural-ODE layers train with STEER end times and their RNODE penalty (mean over
    particles) added to the loss (see `training_solves`).

    The model's array arguments are traced, so a compiled program is reused for new data of
    the same shapes. A model that uses a data value in Python (``int(counts.sum())``,
    ``range(int(T))``, ``if y.max() > 0:``) is found by tracing it once before anything
    compiles; its array arguments are then compiled in as constants, as NumPyro's `SVI.run`
    and `MCMC` do (one `ConstantArgumentsWarning`; a new data set compiles anew).
    Compiled programs are cached on the model's identity and the contents (a hash of the
    bytes) of the arrays and values it reads besides its arguments: module-level names its
    code uses, closure cells, defaults, and those of the user functions it calls; on the
    spec, the settings, the shapes and dtypes of the traced arguments and the contents of
    the constant ones. A model reading a value that cannot be keyed so (an unhashable object
    without arrays, e.g. a DataFrame) is compiled anew on every call.

    Args:
        model: a NumPyro model; `args` and `kwargs` are passed to it.
        spec: a `FlowSpec` or its dict form.
        num_steps: optimisation steps.
        learning_rate: Adam's peak learning rate (decayed over the second half); None takes
            `flowguides.core.default_learning_rate` of the latent dimension (1e-2 up to 1,000
            dimensions, falling as ``1 / dim`` above).
        num_particles: ELBO particles per step (vectorised).
        clip_norm: global-norm gradient clipping, or None.
        init_loc_fn: the guide's initial location strategy.
        init_scale: the guide's initial scale: a float, ``"laplace"`` or ``"auto"`` (the
            default: the Laplace start where it finds a mode and has the better ELBO).
        seed: seeds initialisation and training.
        progress: show a tqdm bar on stderr.
        static_argnames: names of model arguments to compile in as constants (JAX arrays
            among them are passed to the model as numpy arrays, which stay concrete).

    Returns:
        The `PosteriorFit`.

    Warns:
        FitBelowStartWarning: the last tenth of the losses is clearly above the first steps'
            (see `flowguides.core.warn_if_below_start`): the start was the better guide.

    Raises:
        NonFiniteLossError: the loss was not finite at some step (the error names it; its
            ``.fit`` holds the last finite parameters).
        NonFiniteGradientError: the loss was finite but its gradient was not (as above).
        ModelTracingError: the model turns a latent site's value into a Python value.
        ValueError: a name in `static_argnames` is not an argument of the model.
    """
    spec = as_spec(spec)
    check_training(num_steps, learning_rate, clip_norm)
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles: expected a positive integer, got {num_particles!r}")
    t0 = time.perf_counter()
    guide = AutoFlowGuide(
        model, spec, init_loc_fn=init_loc_fn, init_scale=init_scale, static_argnames=static_argnames
    )
    entries = _history_entries(spec)
    has_ode = any(layer.type == "neural_ode" for layer in spec.layers)
    elbo = (
        _RecordingELBO(num_particles, entries)
        if has_ode
        else Trace_ELBO(num_particles, vectorize_particles=True)
    )
    key = jax.random.key(seed, impl=TRAINING_PRNG)
    try:
        with handlers.block(), handlers.seed(rng_seed=jax.random.split(key, 3)[2]):
            guide._setup_prototype(*args, **kwargs)  # the key `SVI.init` gives the guide
        if learning_rate is None:
            learning_rate = default_learning_rate(guide.latent_dim)
        svi = SVI(model, guide, make_optimizer(num_steps, learning_rate, clip_norm), elbo)
        state = _init_state(svi, guide, key, args, kwargs)
    except TRACER_ERRORS as exc:
        raise model_tracing_error(model, exc, bool(guide._constants)) from exc
    args, kwargs = as_constants(args, kwargs, guide._constants)  # as the guide's set-up saw
    if isinstance(elbo, _RecordingELBO):  # the step's records travel as SVI mutable state
        zeros = entries(np.zeros((), np.int32), np.zeros((), default_float()))
        state = state._replace(mutable_state={_HISTORY: zeros})
    state = jax.block_until_ready(state)
    setup_s = time.perf_counter() - t0
    arrays, signature, rebuild = split_args(args, kwargs, guide._constants)
    settings = (spec, num_steps, learning_rate, num_particles, clip_norm)
    # the chunk closes over this call's guide: key what its trace reads besides the params'
    # values (which params it registers: a Laplace start's whitening, full rank or diagonal)
    structure = _params_key(svi.optim.get_params(state.optim_state))
    content = (callable_key(model), signature, _supports_key(guide), structure)
    key = cache_key("posterior", *settings, content=content)
    run_chunk = cached(key, lambda: _posterior_chunk(svi, rebuild, num_steps))
    carry = (state, svi.optim.get_params(state.optim_state), jnp.asarray(False), jnp.asarray(-1))
    seconds: list[float] = []
    try:
        (state, good, stopped, bad_step), (losses, steps) = run_chunks(
            run_chunk, carry, arrays, num_steps, progress, seconds
        )
    except TRACER_ERRORS as exc:
        raise model_tracing_error(model, exc, bool(guide._constants)) from exc
    times = timing(setup_s, seconds, num_steps)
    ran = int(bad_step) + 1 if bool(stopped) else num_steps
    history = {name: np.asarray(values[:ran]) for name, values in steps.items()}
    extra = {"timing": times, "history": history}
    if bool(stopped):
        fit = PosteriorFit(
            guide, model, spec, svi.constrain_fn(good), losses, args, kwargs, seed, **extra
        )
        step, loss = int(bad_step), float(losses[int(bad_step)])
        error = NonFiniteLossError if not np.isfinite(loss) else NonFiniteGradientError
        raise error(step, loss, fit.params, fit)
    warn_if_below_start(losses, learning_rate)
    return PosteriorFit(
        guide, model, spec, svi.get_params(state), losses, args, kwargs, seed, **extra
    )


_HISTORY = "_flowguides_history"  # the SVI mutable-state entry of `_RecordingELBO`


class _RecordingELBO(Trace_ELBO):
    """`Trace_ELBO` with vectorised particles that also returns, as SVI mutable state, the
    step's history entries: each particle runs as NumPyro's single-particle ELBO (the same
    keys, so the same loss as ``Trace_ELBO(num_particles, vectorize_particles=True)``) inside
    its own `training_solves` block, which collects its guide's solves."""

    def __init__(self, num_particles: int, entries: Callable[..., dict]) -> None:
        super().__init__(num_particles=num_particles, vectorize_particles=True)
        self._single = Trace_ELBO(num_particles=1)
        self._entries = entries

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        def one(key: jax.Array):
            with training_solves() as records:
                loss = self._single.loss(key, param_map, model, guide, *args, **kwargs)
            nfe = sum((jnp.asarray(r["nfe"], jnp.int32) for r in records), jnp.zeros((), jnp.int32))
            penalty = sum((jnp.mean(r["penalty"]) for r in records if "penalty" in r), 0.0)
            return loss, nfe, jnp.asarray(penalty, default_float())

        losses, nfe, penalty = jax.vmap(one)(jax.random.split(rng_key, self.num_particles))
        entries = self._entries(jnp.max(nfe), jnp.mean(penalty))
        return {"loss": jnp.mean(losses), "mutable_state": {_HISTORY: entries}}


def _init_state(
    svi: SVI, guide: AutoFlowGuide, key: jax.Array, args: tuple, kwargs: dict
) -> SVIState:
    """`svi.init` without its eager pass through the guide and the model (an XLA compile per
    distinct operation): the guide's set-up fixes every parameter, all unconstrained, so the
    state is the optimiser's state of `guide._initial_params`. The keys split as in
    `SVI.init`. A model with its own `param` or `mutable` sites takes `svi.init`. The guide
    is set up already (with the key `SVI.init` would give it)."""
    state_key = jax.random.split(key, 3)[0]
    kinds = {site["type"] for site in guide.prototype_trace.values()}
    if kinds & {"param", "mutable"}:
        return svi.init(key, *args, **kwargs)
    params = guide._initial_params()
    identity = biject_to(constraints.real)
    svi.constrain_fn = partial(transform_fn, dict.fromkeys(params, identity))
    return SVIState(jax.jit(svi.optim.init)(params), None, state_key)


def _posterior_chunk(svi: SVI, rebuild: Callable[[list], tuple], num_steps: int):
    def chunk(carry: tuple, start: jax.Array, arrays: list):
        _TRACES["posterior"] += 1
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
                finite = jnp.isfinite(loss) & _all_finite(svi.optim.get_params(new.optim_state))
                steps = (new.mutable_state or {}).get(_HISTORY, {})
                out = (loss.astype(default_float()), steps)
                return (new, good, ~finite, jnp.where(finite, bad_step, i)), out

            def skip(c: tuple):
                steps = (c[0].mutable_state or {}).get(_HISTORY, {})
                nan = jnp.asarray(jnp.nan, default_float())
                return c, (nan, jax.tree.map(jnp.zeros_like, steps))

            return lax.cond((i < num_steps) & ~c[2], run, skip, c)

        return lax.scan(step, carry, start + jnp.arange(CHUNK))

    return jax.jit(chunk)


def _params_key(params: Mapping[str, Any]) -> tuple:
    """SVI parameters by name, shape and dtype."""
    return tuple(sorted((k, jnp.shape(v), str(jnp.result_type(v))) for k, v in params.items()))


def _supports_key(guide: AutoFlowGuide) -> Hashable | None:
    """The latent sites' supports by content: a support whose bounds come from the data
    (``Uniform(0, y.max())``) is fixed in the guide's prototype, so it keys the compile."""
    trace = guide.prototype_trace
    parts = [_constraint_key(trace[name]["fn"].support) for name in guide._init_locs]
    return None if any(p is None for p in parts) else tuple(parts)


def _constraint_key(value: Any) -> Hashable | None:
    if not isinstance(value, constraints.Constraint):
        return value_key(value)
    parts = [(k, _constraint_key(v)) for k, v in sorted(vars(value).items())]
    return None if any(p is None for _, p in parts) else (type(value), tuple(parts))


def _all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every array in `tree` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# -- density --------------------------------------------------------------------------------
@jax.jit
def _flow_log_prob(flow: Flow, x: jax.Array) -> jax.Array:
    return flow.log_prob(x)


@jax.jit
def _flow_sample(flow: Flow, key: jax.Array, like: jax.Array) -> jax.Array:
    return flow.sample(like.shape, key)


@dataclass
class DensityFit:
    """A flow fitted to data by maximum likelihood or flow matching.

    Attributes:
        flow: the fitted `Flow` (on standardised data when `mean`/`std` are set).
        spec: the `FlowSpec`.
        losses: ``{"train": per step, "val": per validation}``: mean negative log-likelihoods
            (without the RNODE penalty), or flow-matching losses under
            ``objective="flow_matching"``, in the standardised scale.
        mean, std: the standardisation, or None.
        backend: ``"numpyro"``.
        history: per-step arrays for neural-ODE flows (``"nfe_forward"``, ``"nfe_backward"``
            unless a layer uses the adjoint, ``"regularization"`` when a regulariser weight is
            positive); empty otherwise.
        objective: ``"maximum_likelihood"`` or ``"flow_matching"``.
    """

    flow: Flow
    spec: FlowSpec
    losses: dict[str, np.ndarray]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    seed: int = 0
    backend: str = "numpyro"
    history: dict[str, np.ndarray] = field(default_factory=dict)
    objective: str = "maximum_likelihood"

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed + 1)

    def log_prob(self, x: Any) -> np.ndarray:
        """``log p(x)`` per row, in the data's own scale (the standardisation included)."""
        arr = check_data(x, name="x", dim=self.flow.dim)
        if self.mean is None:
            return np.asarray(_flow_log_prob(self.flow, jnp.asarray(arr)))
        u = (arr - self.mean) / self.std
        return np.asarray(_flow_log_prob(self.flow, jnp.asarray(u))) - np.sum(np.log(self.std))

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        """`n` draws ``(n, dim)`` in the data's scale."""
        seed = int(self._rng.integers(2**31)) if seed is None else seed
        like = jnp.zeros((n,))
        draws = np.asarray(_flow_sample(self.flow, jax.random.key(seed), like))
        return draws if self.mean is None else draws * self.std + self.mean


def fit_density(
    data: Any,
    spec: FlowSpec | Mapping[str, Any],
    *,
    num_steps: int = 2000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    validation_fraction: float = 0.1,
    patience: int = 500,
    standardize: bool = True,
    objective: str = "maximum_likelihood",
    sigma_min: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> DensityFit:
    """Fit a flow to the rows of `data` on minibatches.

    Minibatches are drawn with replacement from the training rows; the validation loss is
    computed after the first step, every 25 steps and after the last, and training stops once
    `patience` steps pass without a better one, keeping the best parameters (without
    validation rows, the last ones).

    ``objective="maximum_likelihood"`` (the default) minimises the negative log-likelihood
    (plus the RNODE penalty of neural-ODE layers). ``objective="flow_matching"`` needs a spec
    whose layers are exactly one neural-ODE layer and fits its vector field without solving
    (`flow_matching_loss`, base draws ``x0 ~ N(0, I)``, ``t ~ U(0, 1)``); the validation loss is
    the same loss on the held-out rows with noise fixed for the whole fit. The affine base is
    not trained and stays the identity. `log_prob` afterwards is exact through the ODE.

    Args:
        data: an array ``(n_points, dim)`` of finite values.
        spec: a `FlowSpec` or its dict form.
        num_steps: optimisation steps at most.
        batch_size: rows per step (at most the number of training rows).
        learning_rate: Adam's peak learning rate (decayed over the second half).
        validation_fraction: the share of rows held out for early stopping.
        patience: steps without a better validation loss before stopping.
        standardize: fit the flow to standardised data (the Jacobian enters `log_prob`).
        objective: ``"maximum_likelihood"`` or ``"flow_matching"``.
        sigma_min: the flow-matching path's width at the data end, in ``[0, 1)``.
        seed: seeds the split, initialisation, minibatches and noise.
        progress: show a tqdm bar on stderr.

    Returns:
        The `DensityFit`.

    Raises:
        ValueError: `data` is not a finite 2-D array, or a setting is out of range.
        SpecError: the spec needs more dimensions than `data` has columns, or
            ``objective="flow_matching"`` with a spec that is not one neural-ODE layer.
        NonFiniteLossError: the loss was not finite at some step.
        NonFiniteGradientError: the loss was finite but its gradient was not.
        NonFiniteValidationError: no validation loss was finite.

    References:
        Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023.
    """
    spec = as_spec(spec)
    check_training(num_steps, learning_rate, None)
    for name, value in (("batch_size", batch_size), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    check_objective(spec, objective, sigma_min)
    arr = check_data(data)
    dim = arr.shape[1]
    try:
        spec.check_dim(dim)
    except SpecError as exc:
        raise SpecError(f"{exc} (data has {dim} column(s))") from None
    train_idx, val_idx = split_indices(arr.shape[0], validation_fraction, seed)
    stats = standardization(arr[train_idx], standardize)
    if stats is not None:
        arr = (arr - stats[0]) / stats[1]
    dtype = jnp.float64 if spec.dtype == "float64" else jnp.float32
    train, val = jnp.asarray(arr[train_idx], dtype), jnp.asarray(arr[val_idx], dtype)
    k_x0, k_t = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
    val_noise = (  # the flow-matching validation noise, fixed for the whole fit
        jax.random.normal(k_x0, val.shape, dtype),
        jax.random.uniform(k_t, val.shape[:1], dtype),
    )
    flow = build_flow(spec, dim, seed=seed)
    optimizer = make_optimizer(num_steps, learning_rate, None)
    batch = min(batch_size, train.shape[0])
    settings = (batch, num_steps, patience, objective, sigma_min)
    key = ("density", spec, dim, train.shape, val.shape, learning_rate, *settings)
    run_chunk = cached(key, lambda: _density_chunk(optimizer, flow, *settings))
    params = flow.params
    best = (params, jnp.asarray(jnp.inf, default_float()), jnp.asarray(0))
    carry = (
        params,
        optimizer.init(params),
        jax.random.key(seed),
        best,
        params,
        jnp.asarray(False),
        jnp.asarray(-1),
    )
    carry, (train_loss, val_loss, steps) = run_chunks(
        run_chunk, carry, (train, val, val_noise), num_steps, progress
    )
    params, _, _, (best_params, best_val, _), good, _, bad_step = carry
    nonfinite = int(bad_step) >= 0
    ran = int(bad_step) + 1 if nonfinite else int(np.sum(np.isfinite(train_loss)))
    losses = {"train": train_loss[:ran], "val": val_loss[:ran][np.isfinite(val_loss[:ran])]}
    history = {name: values[:ran] for name, values in steps.items()}
    mean, std = (None, None) if stats is None else stats
    common = {"history": history, "objective": objective}
    if nonfinite:
        fit = DensityFit(Flow(spec, dim, good), spec, losses, mean, std, seed, **common)
        step, loss = int(bad_step), float(train_loss[int(bad_step)])
        error = NonFiniteLossError if not np.isfinite(loss) else NonFiniteGradientError
        raise error(step, loss, good, fit)
    if val.shape[0] > 0 and not np.isfinite(float(best_val)):
        fit = DensityFit(Flow(spec, dim, params), spec, losses, mean, std, seed, **common)
        steps_run = np.arange(ran)
        due = (steps_run % VALIDATE_EVERY == 0) | (steps_run == num_steps - 1)
        raise NonFiniteValidationError(ran - 1, float(val_loss[:ran][due][-1]), params, fit)
    final = best_params if val.shape[0] > 0 else params
    return DensityFit(Flow(spec, dim, final), spec, losses, mean, std, seed, **common)


def _history_entries(spec: FlowSpec) -> Callable[[jax.Array, jax.Array], dict[str, jax.Array]]:
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


def _density_losses(spec: FlowSpec, dim: int, objective: str, sigma_min: float):
    """``train_loss(params, x, key) -> (loss + penalty, (loss, entries))``,
    ``val_loss(params, val, noise, key)`` and ``entries(nfe, penalty)``: the per-step history
    entries (empty without neural-ODE layers)."""
    entries = _history_entries(spec)

    def field_loss(params: dict, x1: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
        layer = Flow(spec, dim, params).transform().layers()[0]
        return flow_matching_loss(layer, x1, x0, t, sigma_min)

    def train_loss(params: dict, x: jax.Array, key: jax.Array):
        with training_solves() as records:
            if objective == "flow_matching":
                k_x0, k_t = jax.random.split(key)
                x0 = jax.random.normal(k_x0, x.shape, x.dtype)
                loss = field_loss(params, x, x0, jax.random.uniform(k_t, x.shape[:1], x.dtype))
            else:
                loss = -jnp.mean(Flow(spec, dim, params).log_prob(x, key))
        penalty = sum((jnp.mean(r["penalty"]) for r in records if "penalty" in r), 0.0)
        nfe = sum((jnp.asarray(r["nfe"], jnp.int32) for r in records), jnp.zeros((), jnp.int32))
        return loss + penalty, (loss, entries(nfe, penalty))

    def val_loss(params: dict, val: jax.Array, noise: tuple, key: jax.Array) -> jax.Array:
        if objective == "flow_matching":
            return field_loss(params, val, *noise)
        return -jnp.mean(Flow(spec, dim, params).log_prob(val, key))

    return train_loss, val_loss, entries


def _density_chunk(
    optimizer,
    flow: Flow,
    batch: int,
    num_steps: int,
    patience: int,
    objective: str,
    sigma_min: float,
):
    train_loss, val_loss_fn, entries = _density_losses(flow.spec, flow.dim, objective, sigma_min)

    def chunk(carry: tuple, start: jax.Array, data: tuple):
        _TRACES["density"] += 1
        train, val, val_noise = data

        def step(c: tuple, i: jax.Array):
            def run(c: tuple):
                params, opt_state, key, best, good, _, bad_step = c
                key, k_batch, k_noise, k_val = jax.random.split(key, 4)
                rows = jax.random.randint(k_batch, (batch,), 0, train.shape[0])
                (_, (loss, steps)), grads = jax.value_and_grad(train_loss, has_aux=True)(
                    params, train[rows], k_noise
                )
                updates, new_opt = optimizer.update(grads, opt_state, params)
                good = lax.cond(jnp.isfinite(loss), lambda: params, lambda: good)
                finite = jnp.isfinite(loss) & _all_finite(grads)
                new_params = optax.apply_updates(params, updates)
                new_params, new_opt = lax.cond(
                    finite, lambda: (new_params, new_opt), lambda: (params, opt_state)
                )
                due = (i % VALIDATE_EVERY == 0) | (i == num_steps - 1)  # as the Pyro backend
                validate = finite & (val.shape[0] > 0) & due
                val_loss = lax.cond(
                    validate,
                    lambda: val_loss_fn(new_params, val, val_noise, k_val).astype(default_float()),
                    lambda: jnp.asarray(jnp.nan, default_float()),
                )
                best_params, best_val, best_step = best
                better = validate & (val_loss < best_val)
                best = lax.cond(better, lambda: (new_params, val_loss, i), lambda: best)
                patience_out = validate & (i - best[2] >= patience)
                stopped = ~finite | patience_out
                bad_step = jnp.where(finite, bad_step, i)
                out = (new_params, new_opt, key, best, good, stopped, bad_step)
                return out, (loss.astype(default_float()), val_loss, steps)

            def skip(c: tuple):
                nan = jnp.asarray(jnp.nan, default_float())
                return c, (nan, nan, entries(jnp.zeros((), jnp.int32), jnp.zeros(())))

            return lax.cond((i < num_steps) & ~c[-2], run, skip, c)

        return lax.scan(step, carry, start + jnp.arange(CHUNK))

    return jax.jit(chunk)
