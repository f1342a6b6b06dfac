"""Fit a flow guide to a NumPyro model's posterior: `PosteriorFit` and `fit_posterior`.

Training steps run inside `jax.lax.scan` in chunks of up to 100 steps, so the host synchronises
(and the tqdm bar advances) once per chunk. The jitted chunk, like the draws' program, is cached on
the fit's static structure and on the model by content (`clear_compiled` empties the cache; see
`flowguides.numpyro._model.callable_key`). A non-finite loss or gradient stops training at that
step and raises `NonFiniteLossError` (`NonFiniteGradientError`) with the last finite parameters.
Adam (optional clipping), shared schedule; neural-ODE layers train inside `training_solves`.

The same names and parameters as `flowguides.pyro.posterior`, except where the framework
differs: `TRAINING_PRNG` (a JAX key implementation) is this backend's own; `fit_posterior` takes
``static_argnames`` (which arguments compile in as constants) where Pyro's takes
``vectorize_particles`` (this backend vectorises every model with ``vmap``); `PosteriorFit`
holds the SVI ``params`` (Pyro's guide holds its own) and a ``seed`` for its draws (JAX has no
global random state).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import numpy as np
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.initialization import init_to_median
from numpyro.infer.util import log_density

from flowguides.core import (
    DEFAULT_LEARNING_RATE,
    NonFiniteGradientError,
    NonFiniteLossError,
    PosteriorFitMethods,
    as_spec,
    check_control_variate,
    check_num_draws,
    check_objective_options,
    check_training,
    default_learning_rate,
    warn_if_below_start,
)
from flowguides.core.calls import warn_shadowed_options
from flowguides.core.timing import add_seconds, chunk_timing, fit_timing, timed_calls
from flowguides.numpyro import _model, _stream
from flowguides.numpyro._control import initial_state, public_params, split3, with_control_variate
from flowguides.numpyro._model import (
    TRACER_ERRORS,
    as_constants,
    callable_key,
    model_tracing_error,
    split_args,
    value_key,
)
from flowguides.numpyro._stream import (
    check_divisible,
    deterministic_sites,
    device_mesh,
    full_data,
    full_data_map,
    particle_split,
    replicate,
    subsampled,
    training_model,
)
from flowguides.numpyro._support import data_elements, replayed, supports_key
from flowguides.numpyro._training import (
    CHUNK,
    CHUNK_SETUP_MAX_ELEMENTS,
    ObjectiveLoss,
    RecordingELBO,
    cache_key,
    cached,
    jit,
    make_optimizer,
    params_key,
    posterior_chunk,
    run_chunks,
)
from flowguides.numpyro.guide import AutoFlowGuide
from flowguides.numpyro.neutra import neutra as _neutra
from flowguides.numpyro.ode import solver_errors
from flowguides.spec import FlowSpec

__all__ = ["TRAINING_PRNG", "PosteriorFit", "fit_posterior"]


TRAINING_PRNG = "rbg"
"""The key implementation of `fit_posterior`'s SVI state: XLA's random-bit generator for the
particles' draws (keys still split by threefry, so streams stay independent under `vmap`). An
SVI step splits keys and draws noise for every particle and site, which threefry's bits make
a noticeable share of a step (see the benchmarks page)."""
_TRACES = {"posterior": 0}  # times a training chunk was traced (tests read it, `_traced`)


def _traced() -> None:
    _TRACES["posterior"] += 1


@dataclass
class PosteriorFit(PosteriorFitMethods):
    """A fitted `AutoFlowGuide` with its SVI parameters and the model's arguments.

    Attributes:
        guide: the `AutoFlowGuide`.
        model: the model.
        spec: the `FlowSpec`.
        params: the SVI parameter dict.
        losses: the negative ELBO estimate of every step run (without the RNODE penalty,
            which is in ``history["regularization"]``); with ``objective="iwelbo"`` the
            negative IW-ELBO estimate (see `fit_posterior`).
        args, kwargs: the model's arguments (constant JAX arrays as numpy, see
            `fit_posterior`'s `static_argnames`).
        backend: ``"numpyro"``.
        history: per-step arrays for neural-ODE flows, as in `fit_density` and the Pyro
            backend: ``"nfe_forward"`` (field evaluations of the vectorised particles' solves:
            the most any particle's solve needed, which is what the batched solve runs),
            ``"nfe_backward"`` (unless a layer uses the adjoint) and ``"regularization"`` (the
            mean RNODE penalty, when a regulariser weight is positive); empty otherwise.
        timing: where the call's time went, `flowguides.core.timing.FIT_TIMING_KEYS`
            (``compile_s``: the training chunk's, none when this process compiled it, a load
            when `use_compilation_cache` holds it; ``steps_per_s``: the fastest 100-step
            chunk after the first), and ``draws_s``: all `sample` calls so far.
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
        super().__post_init__()
        self._rng = np.random.default_rng(self.seed + 1)
        self._programs: dict[tuple[str, int], Callable[..., Any]] = {}

    def _key(self, seed: int | None) -> jax.Array:
        return jax.random.key(int(self._rng.integers(2**31)) if seed is None else seed)

    neutra = _neutra  # fit.neutra(num_warmup, num_samples, num_chains, seed, ...)

    @property
    def latent_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{site: shape}`` of every latent site."""
        return {name: tuple(np.shape(v)) for name, v in self.guide._init_locs.items()}

    subsampled_plates = property(_stream.subsampled_plates)
    observed_data = _model.observed_data  # fit.observed_data()
    log_likelihood = _model.log_likelihood  # fit.log_likelihood(draws, seed)

    @property
    def model_params(self) -> dict[str, jax.Array]:
        """The fitted values of the model's own ``numpyro.param`` sites (constrained): every
        later run of the model (draws, deterministic sites, log-likelihood, NUTS) uses them."""
        trace = self.guide.prototype_trace
        return {k: v for k, v in self.params.items() if trace.get(k, {}).get("type") == "param"}

    def deterministic(self, draws: dict[str, Any]) -> dict[str, np.ndarray]:
        with handlers.substitute(data=self.model_params):  # reaches the guide's Predictive
            return super().deterministic(draws)

    def sample(self, num_samples: int, seed: int | None = None) -> dict[str, np.ndarray]:
        """Constrained posterior draws ``{site: (num_samples, *site_shape)}`` of the latent
        sites and the model's ``numpyro.deterministic`` sites (one program per `num_samples`,
        compiled once for a model, its data and the fit's shapes).

        Raises:
            MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        """
        t0, args, kwargs = time.perf_counter(), self.args, self.kwargs
        keep = [*self.latent_shapes, *deterministic_sites(self.guide.prototype_trace)]

        def draws(guide: AutoFlowGuide, key: jax.Array, params: dict) -> dict[str, jax.Array]:
            out = guide.sample_posterior(key, params, *args, sample_shape=(num_samples,), **kwargs)
            return {name: out[name] for name in keep if name in out}

        out = {k: np.asarray(v) for k, v in self._run("draws", num_samples, draws, seed).items()}
        add_seconds(self.timing, "draws_s", time.perf_counter() - t0)
        return out

    def _run(self, kind: str, num: int, fn: Callable[..., Any], seed: int | None) -> Any:
        """``fn(guide, key, params)``, compiled once per `kind` and `num` for a model, its data
        and the fit's shapes (a refit or a loaded fit of the same model reuses the program)."""
        if (kind, check_num_draws(num)) not in self._programs:
            guide, data = self.guide, value_key((self.args, self.kwargs))
            content = (callable_key(self.model), data, supports_key(guide))
            shapes = (guide.prefix, tuple(self.latent_shapes.items()), params_key(self.params))
            key = cache_key(kind, self.spec, (num,), *shapes, content=content, setup=True)
            self._programs[kind, num] = cached(key, lambda: jit(partial(fn, guide), setup=True))
        with solver_errors():
            return jax.block_until_ready(self._programs[kind, num](self._key(seed), self.params))

    def log_densities(
        self, num_samples: int, seed: int | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Draws with ``log p(x, z)`` (all rows of a subsampled plate) and ``log q(z)``, both
        in the constrained space.

        Args:
            num_samples, seed: the draws (`seed` None: one from the fit's generator).

        Raises:
            MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        """
        args, kwargs, model, names = self.args, self.kwargs, self.model, list(self.latent_shapes)

        def densities(guide: AutoFlowGuide, key: jax.Array, params: dict) -> tuple:
            def one(k: jax.Array) -> tuple:
                log_q, trace = log_density(handlers.seed(guide, k), args, kwargs, params)
                log_p, _ = log_density(replayed(full_data(model), k, trace), args, kwargs, params)
                return {n: trace[n]["value"] for n in names}, log_p, log_q

            return full_data_map(one, jax.random.split(key, num_samples), guide.prototype_trace)

        draws, log_p, log_q = self._run("densities", num_samples, densities, seed)
        return jax.tree.map(np.asarray, draws), np.asarray(log_p), np.asarray(log_q)


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
    objective: str = "elbo",
    gradient: str = "reparam",
    num_inner: int = 1,
    control_variate: str = "auto",
    devices: int | Sequence[Any] | None = None,
    **kwargs: Any,
) -> PosteriorFit:
    """Fit an `AutoFlowGuide` to `model`'s posterior by SVI with vectorised particles.

    Neural-ODE layers train with STEER end times and their RNODE penalty (mean over
    particles) added to the loss (see `training_solves`).

    The model's array arguments are traced, so a compiled program is reused for new data of
    the same shapes; those of a model that uses a data value in Python (``int(counts.sum())``,
    ``if y.max() > 0:``) are compiled in as constants, as NumPyro's `SVI.run` and `MCMC` do
    (one `ConstantArgumentsWarning`). Programs are cached on the model and what it reads
    besides its arguments, by content (a model reading a value that cannot be keyed so, e.g.
    a DataFrame, compiles anew on every call), the spec, the settings and the arguments' shapes
    (see `flowguides.numpyro._model`).

    Args:
        model: a NumPyro model; `args` and `kwargs` are passed to it.
        spec: a `FlowSpec` or its dict form.
        num_steps: optimisation steps.
        learning_rate: Adam's peak learning rate (cosine decay after the first quarter); None takes
            `flowguides.core.default_learning_rate` of the latent dimension (1e-2 up to 1,000
            dimensions, falling as ``1 / dim`` above) for the flow's layers and 1e-2 for its
            affine base (`flowguides.core.AFFINE_PARAMETERS`).
        num_particles: ELBO particles per step (vectorised).
        clip_norm: global-norm gradient clipping, or None.
        init_loc_fn: the guide's initial location strategy.
        init_scale: the guide's initial scale: a float, ``"laplace"`` or ``"auto"`` (the
            default: the Laplace start where it finds a mode and has the better ELBO).
        seed: seeds initialisation and training.
        progress: show a tqdm bar on stderr.
        static_argnames: names of model arguments to compile in as constants (JAX arrays
            among them are passed to the model as numpy arrays, which stay concrete).
        objective: ``"elbo"`` (default) or ``"iwelbo"``: the importance-weighted ELBO
            ``log (1/K) sum_k p(x, z_k) / q(z_k)`` of ``K = num_inner`` draws (Burda et al.
            2016), averaged over `num_particles` groups; `losses` then holds its negative.
        gradient: ``"reparam"`` (default) or ``"stl"``: sticking the landing (Roeder et al.
            2017), the path gradient with ``log q`` at stopped flow parameters (one inverse
            pass of the flow per draw); with ``"iwelbo"`` its IW form DReG (Tucker et al.
            2019), which trains the guide only (a model with its own ``numpyro.param`` is
            refused). See the NeuTra and objectives page of the docs.
        num_inner: `K` of the IW-ELBO (1 with ``"elbo"``).
        control_variate: for a model whose plates subsample: ``"auto"`` (the default) the
            Taylor control variate around the full-data MAP where the start search found it,
            ``"taylor"`` always (an error where it cannot), ``"none"`` the plain minibatch
            estimate; unbiased either way (see the conventions page, "Subsampled models").
        devices: None (one device, the default), a count (the first of ``jax.devices()``) or
            a list of JAX devices: each step's particles are split over them, the parameters
            replicated, in one compiled step (the same fit as on one device, to rounding).
            ``num_particles * num_inner`` must divide by their number.

    Returns:
        The `PosteriorFit`.

    Warns:
        FitBelowStartWarning: the last tenth of the losses is clearly above the first steps'
            (see `flowguides.core.warn_if_below_start`): the start was the better guide.

    Raises:
        NonFiniteLossError: the loss was not finite at some step (the error names it; its
            ``.fit`` holds the last finite parameters).
        NonFiniteGradientError: the loss was finite but its gradient was not (as above).
        MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        ModelTracingError: the model turns a latent site's value into a Python value.
        ValueError: a name in `static_argnames` is not an argument of the model; an
            unknown `objective`, `gradient` or `control_variate`, a bad `num_inner`;
            ``control_variate="taylor"`` where it cannot apply (the message says why).
        SpecError: neural-ODE layers with an objective or gradient other than the defaults.
    """
    warn_shadowed_options(fit_posterior, model, locals())  # before any other local
    spec = as_spec(spec, job="posterior")
    check_training(num_steps, learning_rate, clip_norm, num_particles)
    check_objective_options(spec, objective, gradient, num_inner)
    check_control_variate(control_variate)
    mesh = device_mesh(devices)
    check_divisible(num_particles * num_inner, mesh, "num_particles * num_inner", "count")
    split = particle_split(mesh)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    guide = AutoFlowGuide(
        model, spec, init_loc_fn=init_loc_fn, init_scale=init_scale, static_argnames=static_argnames
    )
    has_ode = any(layer.type == "neural_ode" for layer in spec.layers)
    elbo = (
        RecordingELBO(num_particles, spec, split)
        if has_ode
        else Trace_ELBO(num_particles, vectorize_particles=True)
        if (objective, gradient) == ("elbo", "reparam") and mesh is None
        else ObjectiveLoss(objective, gradient, num_particles, num_inner, split)
    )
    key = jax.random.key(seed, impl=TRAINING_PRNG)
    with solver_errors():
        try:
            with handlers.block(), handlers.seed(rng_seed=split3(key)[2]):
                with timed_calls(guide, "_initial_start", times, "start_s"):
                    guide._setup_prototype(*args, **kwargs)  # the key `SVI.init` gives the guide
            own = {"param", "mutable"} & {s["type"] for s in guide.prototype_trace.values()}
            if mesh is not None and "mutable" in own:
                raise ValueError("devices: a model with numpyro.mutable sites trains on one device")
            if (objective, gradient) == ("iwelbo", "stl") and own:
                raise ValueError(
                    "gradient: 'stl' with objective='iwelbo' (DReG) trains the guide only, "
                    "but the model has its own numpyro.param sites; use gradient='reparam'"
                )
            affine_rate = DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate
            if learning_rate is None:
                learning_rate = default_learning_rate(guide.latent_dim)
            subsamples = subsampled(guide.prototype_trace)
            train = training_model(model, subsamples)
            train, reference = with_control_variate(control_variate, train, model, guide)
            optim = make_optimizer(num_steps, learning_rate, clip_norm, affine_rate, posterior=True)
            svi = SVI(train, guide, optim, elbo)
            state = initial_state(svi, guide, key, args, kwargs, reference)
            state = jax.block_until_ready(state)
        except TRACER_ERRORS as exc:
            raise model_tracing_error(model, exc, bool(guide._constants), args, kwargs) from exc
        args, kwargs = as_constants(args, kwargs, guide._constants)  # as the guide's set-up saw
        setup_s = time.perf_counter() - t0
        arrays, signature, rebuild = split_args(args, kwargs, guide._constants)
        settings = (spec, num_steps, learning_rate, affine_rate, num_particles, clip_norm)
        settings = (*settings, objective, gradient)
        mesh_key = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
        settings = (*settings, num_inner, subsamples, reference is not None, mesh_key)
        # the chunk closes over this call's guide: key what its trace reads besides the
        # params' values (which params it registers: a Laplace start's whitening)
        structure = params_key(svi.optim.get_params(state.optim_state))
        content = (callable_key(model), signature, supports_key(guide), structure)
        small = data_elements(args, kwargs) <= CHUNK_SETUP_MAX_ELEMENTS  # a shorter compile
        key = cache_key("posterior", *settings, content=content, setup=small)
        run_chunk = cached(key, lambda: posterior_chunk(svi, rebuild, num_steps, _traced, small))
        params = svi.optim.get_params(state.optim_state)
        carry = replicate((state, params, jax.device_put(False), jax.device_put(-1)), mesh)
        arrays = replicate(arrays, mesh)
        seconds: list[float] = []
        try:
            (state, good, stopped, bad_step), (losses, steps) = run_chunks(
                run_chunk, carry, arrays, num_steps, progress, seconds
            )
        except TRACER_ERRORS as exc:
            raise model_tracing_error(model, exc, bool(guide._constants), args, kwargs) from exc
    ran = int(bad_step) + 1 if bool(stopped) else num_steps
    history = {name: np.asarray(values[:ran]) for name, values in steps.items()}
    penalized = losses  # the guide adds the RNODE penalty to log q, so to the step's loss
    if "regularization" in steps:
        losses = losses - steps["regularization"]
    times = fit_timing(t0, setup_s, times["start_s"], **chunk_timing(seconds, num_steps, CHUNK))
    extra = {"timing": times, "history": history}
    if bool(stopped):
        fit = PosteriorFit(guide, model, spec, public_params(svi.constrain_fn(good)), losses,
                           args, kwargs, seed, **extra)  # fmt: skip
        step = int(bad_step)
        error = NonFiniteLossError if not np.isfinite(penalized[step]) else NonFiniteGradientError
        raise error(step, float(penalized[step]), fit.params, fit)
    warn_if_below_start(losses, learning_rate)
    params = public_params(svi.get_params(state))
    return PosteriorFit(guide, model, spec, params, losses, args, kwargs, seed, **extra)
