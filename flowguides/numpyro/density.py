"""Fit a flow to a data set: `DensityFit` and `fit_density` (NumPyro).

Training steps on an in-memory array run inside `jax.lax.scan` in chunks of up to 100 steps (see
`flowguides.numpyro.posterior`), with Adam on the shared schedule, minibatches drawn with
replacement and early stopping on a held-out share of the rows; a memory-mapped array or an
iterable of minibatches is streamed to the device a step at a time, double-buffered, and
``devices`` splits each minibatch over several devices (`flowguides.numpyro._stream`). A non-finite loss, or a finite
loss with a non-finite gradient, stops training at that step and raises `NonFiniteLossError`
(`NonFiniteGradientError`) with the last finite parameters. Flows with neural-ODE layers train
inside `training_solves` and record per step, in ``fit.history``, the field evaluations of the
loss (``"nfe_forward"``) and of its gradient (``"nfe_backward"``, left out with
``adjoint=True``), plus the RNODE penalty (``"regularization"``) when a weight is positive.
``objective="flow_matching"`` trains a single neural-ODE layer by flow matching (independent or
minibatch optimal-transport coupling) and early-stops on an exact-trace validation negative
log-likelihood (`flowguides.core.coupling`).

The same names and parameters as `flowguides.pyro.density`; `DensityFit` also holds a ``seed``
for its draws (JAX has no global random state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowguides.core import (
    DENSITY_LEARNING_RATE,
    FLOW_MATCHING_VALIDATION_ROWS,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteValidationError,
    as_spec,
    check_coupling,
    check_data,
    check_num_draws,
    check_objective,
    check_training,
    density_budget,
    density_patience,
    validate_every,
    validation_spec,
)
from flowguides.core.data import prepare_data
from flowguides.numpyro._stream import (
    batch_sharding,
    check_divisible,
    density_step,
    device_chunk,
    device_mesh,
    replicate,
    run_stream,
    stream_program,
)
from flowguides.numpyro._training import (
    cache_key,
    cached,
    default_float,
    history_entries,
    make_optimizer,
    mean_penalty,
    run_chunks,
)
from flowguides.numpyro.build import Flow, build_flow
from flowguides.numpyro.ode import (
    couple_noise,
    flow_matching_loss,
    solver_errors,
    training_solves,
)
from flowguides.spec import FlowSpec, SpecError

__all__ = ["DensityFit", "fit_density"]

_TRACES = {"density": 0}  # times a training chunk was traced (tests read it)


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
        losses: in the standardised scale. Maximum likelihood: ``{"train": per step, "val":
            per validation}``, mean negative log-likelihoods (without the RNODE penalty).
            Flow matching: ``{"flow_matching": per step, the flow-matching training loss;
            "val_nll": per validation, the mean negative log-likelihood of the validation
            subset}``.
        mean, std: the standardisation, or None.
        backend: ``"numpyro"``.
        history: per-step arrays for neural-ODE flows (``"nfe_forward"``, ``"nfe_backward"``
            unless a layer uses the adjoint, ``"regularization"`` when a regulariser weight is
            positive); empty otherwise. Flow matching adds ``"nfe_val"``, per validation
            (aligned with ``losses["val_nll"]``): the field evaluations of the exact-trace
            solve that scored the validation subset, so the returned flow's scoring cost is
            ``nfe_val`` at the best ``val_nll``.
        objective: ``"maximum_likelihood"`` or ``"flow_matching"``.
        coupling: ``"independent"`` or ``"ot"`` (flow matching's pairing of noise and data).
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
    coupling: str = "independent"

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed + 1)

    def log_prob(self, x: Any) -> np.ndarray:
        """``log p(x)`` per row, in the data's own scale (the standardisation included).

        Raises:
            ValueError: `x` is not a finite ``(n, dim)`` array.
            MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        """
        arr = check_data(x, name="x", dim=self.flow.dim)
        offset = 0.0
        if self.mean is not None:
            arr, offset = (arr - self.mean) / self.std, np.sum(np.log(self.std))
        with solver_errors():
            return np.asarray(_flow_log_prob(self.flow, jnp.asarray(arr))) - offset

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        """`n` draws ``(n, dim)`` in the data's scale.

        Raises:
            MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        """
        seed = int(self._rng.integers(2**31)) if seed is None else seed
        like = jnp.zeros((check_num_draws(n, "n"),))
        with solver_errors():
            draws = np.asarray(_flow_sample(self.flow, jax.random.key(seed), like))
        return draws if self.mean is None else draws * self.std + self.mean


def fit_density(
    data: Any,
    spec: FlowSpec | Mapping[str, Any],
    *,
    num_steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float = DENSITY_LEARNING_RATE,
    validation_fraction: float = 0.1,
    patience: int | None = None,
    standardize: bool = True,
    objective: str = "maximum_likelihood",
    coupling: str = "independent",
    sigma_min: float = 1e-4,
    validation_data: Any = None,
    devices: int | Sequence[jax.Device] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DensityFit:
    """Fit a flow to the rows of `data` on minibatches.

    Minibatches are drawn with replacement from the training rows. Training stops once
    `patience` steps pass without a better validation negative log-likelihood, keeping the
    best parameters (without validation rows, the last ones).

    `data` is one of (`flowguides.core.data`): an in-memory array, whose training rows go to
    the device once, each step drawing its minibatch there; a memory-mapped array
    (``np.load(path, mmap_mode="r")``, an h5py or zarr data set), split as an in-memory one,
    checked and standardised in one pass over the file, its validation rows read into memory
    once, and each step's minibatch (the in-memory path's rows for the same seed, so the same
    fit) read in sorted row order; or an iterable of minibatches ``(n_k, dim)`` (an iterator
    or generator, or a re-iterable such as a ``DataLoader``, read epoch after epoch) that ends
    training when an iterator runs out, is standardised by its first minibatch and validated
    on `validation_data`; `batch_size` and `validation_fraction` do not apply to it. A list is
    read as rows: stream a list of minibatches with ``iter(batches)``. Streamed minibatches
    are double-buffered: minibatch ``k + 1`` goes to the device before step ``k`` is awaited.

    `devices` splits each minibatch along its rows over a `jax.sharding.Mesh`, with the
    parameters, optimiser state and validation rows replicated: one compiled program, XLA
    inserting the all-reduce of the gradient, the same fit as on one device up to rounding.
    On several hosts, call ``jax.distributed.initialize()`` in every process first and run
    the same call (same data and seed) in each with ``devices=jax.devices()`` (every host's
    devices); each process fills the shards of its own devices.

    ``objective="maximum_likelihood"`` (the default) minimises the negative log-likelihood
    (plus the RNODE penalty of neural-ODE layers) and scores every validation row after the
    first step, every `flowguides.core.VALIDATE_EVERY` (25) steps and after the last.

    ``objective="flow_matching"`` needs a spec whose layers are exactly one neural-ODE layer
    and fits its vector field without solving (`flow_matching_loss`, base draws
    ``x0 ~ N(0, I)`` paired with the minibatch by `coupling`, ``t ~ U(0, 1)``). It is
    validated by the negative log-likelihood all the same: after the first step, every
    `flowguides.core.validate_every` steps (100; in fits over 5,000 steps, a fiftieth of the
    steps) and after the last, an
    exact-trace solve (the spec's solver) scores a fixed subset of the first
    `flowguides.core.FLOW_MATCHING_VALIDATION_ROWS` (512) validation rows, so validation stays
    a small share of training. The affine base is not trained and stays the identity.
    `log_prob` afterwards is exact through the ODE.

    Args:
        data: an in-memory or memory-mapped array ``(n_points, dim)`` of finite values, or
            an iterable of finite float minibatches ``(n_k, dim)``.
        spec: a `FlowSpec` or its dict form; a RealNVP layer's ``orientation="auto"`` (the
            default) fits in the density direction (the fit's `spec` records it).
        num_steps, batch_size: optimisation steps at most, rows per step (at most the number
            of training rows); None: 2,000 and 256, for flow matching 20,000 and 1,024
            (256 with ``coupling="ot"``; `flowguides.core.DENSITY_BUDGETS`).
        learning_rate: Adam's peak learning rate (decayed over the second half; default
            `flowguides.core.DENSITY_LEARNING_RATE`).
        validation_fraction: the share of rows held out for early stopping.
        patience: steps without a better validation loss before stopping; None: 500 for
            maximum likelihood, none for flow matching (`flowguides.core.density_patience`).
        standardize: fit the flow to standardised data (the Jacobian enters `log_prob`).
        objective: ``"maximum_likelihood"`` or ``"flow_matching"``.
        coupling: flow matching's pairing of base draws and data in a minibatch:
            ``"independent"`` or ``"ot"`` (the exact minibatch optimal-transport assignment,
            Tong et al., 2023; `couple_noise`, on the host through `jax.pure_callback`).
        sigma_min: the flow-matching path's width at the data end, in ``[0, 1)``.
        validation_data: an iterable's validation rows ``(n_val, dim)``; None: no validation
            (the last parameters are kept). Only for an iterable (arrays hold out
            `validation_fraction` of their rows).
        devices: None (the default device), a count (the first of `jax.devices()`) or a
            sequence of JAX devices; minibatch row counts must divide evenly over them. The
            Pyro backend has no `devices`.
        seed: seeds the split, initialisation, minibatches and noise.
        progress: show a tqdm bar on stderr.

    Returns:
        The `DensityFit`.

    Raises:
        TypeError: `data` is not numeric, or a minibatch not floating-point (naming it).
        ValueError: `data` is not a finite 2-D array, a minibatch is bad (naming its index, its
            shape and what was expected), or a setting is out of range (``coupling="ot"``
            without flow matching, `validation_data` with an array, `devices`, minibatches
            that do not split evenly over the devices included).
        SpecError: the spec needs more dimensions than `data` has columns, or
            ``objective="flow_matching"`` with a spec that is not one neural-ODE layer.
        NonFiniteLossError: the loss was not finite at some step.
        NonFiniteGradientError: the loss was finite but its gradient was not.
        NonFiniteValidationError: no validation loss was finite.
        MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.

    References:
        Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023.
        Tong et al., "Improving and Generalizing Flow-Based Generative Models with Minibatch
        Optimal Transport", TMLR 2024.
    """
    spec = as_spec(spec, job="density")
    num_steps, batch_size = density_budget(num_steps, batch_size, objective, coupling)
    check_training(num_steps, learning_rate, None)
    patience = density_patience(patience, objective, num_steps)
    check_objective(spec, objective, sigma_min)
    check_coupling(coupling, objective)
    mesh = device_mesh(devices)
    flow_matching = objective == "flow_matching"
    source = prepare_data(
        data,
        validation_fraction=validation_fraction,
        validation_data=validation_data,
        standardize=standardize,
        seed=seed,
        validation_rows=FLOW_MATCHING_VALIDATION_ROWS if flow_matching else None,
    )
    dim, stats = source.dim, source.stats
    try:
        spec.check_dim(dim)
    except SpecError as exc:
        raise SpecError(f"{exc} (data has {dim} column(s))") from None
    dtype = jnp.float64 if spec.dtype == "float64" else jnp.float32
    val = jnp.asarray(source.val, dtype)
    if source.train is not None:
        train = jnp.asarray(source.train, dtype)
        batch = min(batch_size, train.shape[0])
    else:  # an iterable's minibatches are checked as they come
        batch = 0 if source.mapped is None else min(batch_size, source.mapped.n_train)
    check_divisible(batch, mesh, "batch_size")
    flow = build_flow(spec, dim, seed=seed)
    optimizer = make_optimizer(num_steps, learning_rate, None)
    settings = (batch, num_steps, patience, objective, coupling, sigma_min)
    mesh_key = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
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
    carry, val = replicate((carry, val), mesh)
    last_step, step_args = num_steps - 1, _density_settings(flow, *settings[1:])
    with solver_errors():
        if source.train is not None:
            key = cache_key("density", spec, dim, train.shape, val.shape, learning_rate,
                            *settings, content=())  # fmt: skip
            make = lambda: device_chunk(optimizer, step_args, batch, mesh, _TRACES)  # noqa: E731
            run_chunk = cached(key if mesh is None else (*key, mesh_key), make)
            carry, outputs = run_chunks(
                run_chunk, carry, (replicate(train, mesh), val), num_steps, progress
            )
        else:
            key = cache_key("density_stream", spec, dim, val.shape, learning_rate, *settings,
                            mesh_key, content=())  # fmt: skip
            step = density_step(optimizer, *step_args, batch_sharding(mesh))
            program = cached(key, lambda: stream_program(step, mesh))
            carry, outputs, last_step = run_stream(
                program, carry, source, val, num_steps, batch, seed, dtype, mesh, progress
            )
    train_loss, val_loss, val_nfe, steps = outputs
    params, _, _, (best_params, best_val, _), good, _, bad_step = carry
    nonfinite = int(bad_step) >= 0
    ran = int(bad_step) + 1 if nonfinite else int(np.sum(np.isfinite(train_loss)))
    validated = np.isfinite(val_loss[:ran])
    keys = ("flow_matching", "val_nll") if flow_matching else ("train", "val")
    losses = {keys[0]: train_loss[:ran], keys[1]: val_loss[:ran][validated]}
    history = {name: values[:ran] for name, values in steps.items()}
    if flow_matching:
        history["nfe_val"] = val_nfe[:ran][validated].astype(np.int64)
    mean, std = (None, None) if stats is None else stats
    common = {"history": history, "objective": objective, "coupling": coupling}
    if nonfinite:
        fit = DensityFit(Flow(spec, dim, good), spec, losses, mean, std, seed, **common)
        step, loss = int(bad_step), float(train_loss[int(bad_step)])
        error = NonFiniteLossError if not np.isfinite(loss) else NonFiniteGradientError
        raise error(step, loss, good, fit)
    if val.shape[0] > 0 and not np.isfinite(float(best_val)):
        fit = DensityFit(Flow(spec, dim, params), spec, losses, mean, std, seed, **common)
        steps_run = np.arange(ran)
        every = validate_every(objective, num_steps, patience)
        due = (steps_run % every == 0) | (steps_run == last_step)
        raise NonFiniteValidationError(ran - 1, float(val_loss[:ran][due][-1]), params, fit)
    final = best_params if val.shape[0] > 0 else params
    return DensityFit(Flow(spec, dim, final), spec, losses, mean, std, seed, **common)


def _density_losses(spec: FlowSpec, dim: int, objective: str, coupling: str, sigma_min: float):
    """``train_loss(params, x, key) -> (loss + penalty, (loss, entries))``,
    ``val_loss(params, val, key) -> (nll, nfe)`` (``nfe`` the field evaluations of a
    flow-matching fit's exact-trace validation solve, else 0) and ``entries(nfe, penalty)``:
    the per-step history entries (empty without neural-ODE layers)."""
    entries = history_entries(spec)
    scoring = validation_spec(spec) if objective == "flow_matching" else spec

    def train_loss(params: dict, x: jax.Array, key: jax.Array):
        with training_solves() as records:
            if objective == "flow_matching":
                k_x0, k_t = jax.random.split(key)
                x0 = couple_noise(jax.random.normal(k_x0, x.shape, x.dtype), x, coupling)
                t = jax.random.uniform(k_t, x.shape[:1], x.dtype)
                layer = Flow(spec, dim, params).transform().layers()[0]
                loss = flow_matching_loss(layer, x, x0, t, sigma_min)
            else:
                loss = -jnp.mean(Flow(spec, dim, params).log_prob(x, key))
        penalty = mean_penalty(records)
        nfe = _total_nfe(records)
        return loss + penalty, (loss, entries(nfe, penalty))

    def val_loss(params: dict, val: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        if objective != "flow_matching":
            return -jnp.mean(Flow(spec, dim, params).log_prob(val, key)), jnp.zeros((), jnp.int32)
        with training_solves() as records:  # no STEER or penalty in `scoring`: only counts
            nll = -jnp.mean(Flow(scoring, dim, params).log_prob(val))
        return nll, _total_nfe(records)

    return train_loss, val_loss, entries


def _total_nfe(records: list[dict]) -> jax.Array:
    return sum((jnp.asarray(r["nfe"], jnp.int32) for r in records), jnp.zeros((), jnp.int32))


def _density_settings(
    flow: Flow, num_steps: int, patience: int, objective: str, coupling: str, sigma_min: float
) -> tuple:
    """`density_step`'s and `device_chunk`'s step arguments: losses, steps, patience, every."""
    every = validate_every(objective, num_steps, patience)
    losses = _density_losses(flow.spec, flow.dim, objective, coupling, sigma_min)
    return losses, num_steps, patience, every
