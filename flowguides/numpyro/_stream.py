"""Streaming and sharding for `fit_density` (NumPyro): minibatches fed from the host.

`flowguides.numpyro.density` trains an in-memory array inside compiled chunks of steps that
draw their minibatches on the device. A memory-mapped array or an iterable of minibatches
(`flowguides.core.data`) is fed from the host instead: `run_stream` runs one compiled step per
minibatch and double-buffers, putting minibatch ``k + 1`` on the device (`jax.device_put`)
before it waits for step ``k``, and reading minibatch ``k + 2`` on the host meanwhile.

A memory-mapped array's minibatches are the rows the in-memory path would draw for the same
seed (`draw_rows` replays the key chain of the compiled chunk), so both fit the same flow.

`device_mesh` turns ``fit_density``'s ``devices`` into a one-axis `jax.sharding.Mesh`
(``"batch"``): minibatches are split along their rows over the devices, parameters, optimiser
state and validation rows are replicated, and XLA inserts the all-reduce of the gradient.
``fit_posterior``'s ``devices`` split its ELBO particles the same way (`particle_split`).

Subsampled plates of a posterior's model: `full_data` runs a model on all rows of its
subsampled plates (the start search's energy), `training_model` makes their minibatch draws
vectorised (see `flowguides.core.WITH_REPLACEMENT_RATIO`).

The Pyro backend's ``_stream.py`` only feeds its eager loop (``minibatches``, read one ahead on
a worker thread) and splits minibatches over the processes of a `torch.distributed` group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpyro.primitives import Messenger

from flowguides.core import WITH_REPLACEMENT_RATIO, whole_data_sites
from flowguides.core.data import DataSource
from flowguides.numpyro._training import CHUNK, all_finite, default_float, jit, progress_bar

__all__ = [
    "BATCH_AXIS",
    "batch_sharding",
    "check_divisible",
    "density_step",
    "deterministic_sites",
    "device_chunk",
    "device_mesh",
    "draw_rows",
    "full_data",
    "full_data_map",
    "particle_split",
    "put_batch",
    "replicate",
    "run_stream",
    "stream_program",
    "subsampled",
    "subsampled_plates",
    "training_model",
]

BATCH_AXIS = "batch"
_AHEAD = 100  # steps whose minibatch rows one call of `_rows_ahead` draws


def device_mesh(devices: int | Sequence[Any] | None) -> Mesh | None:
    """The one-axis mesh over `devices` (None: no mesh, the default device).

    Args:
        devices: None, a count (the first `devices` of `jax.devices()`) or a sequence of JAX
            devices.

    Raises:
        ValueError: a count below 1 or above the devices there are, or an empty sequence or
            one that holds something other than a JAX device.
    """
    if devices is None:
        return None
    available = jax.devices()
    if isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices: expected a count in [1, {len(available)}] (the devices JAX sees), "
                f"got {devices}"
            )
        chosen = available[:devices]
    else:
        chosen = list(devices) if isinstance(devices, Sequence) else []
        if not chosen or not all(isinstance(d, jax.Device) for d in chosen):
            raise ValueError(
                f"devices: expected None, a count or a sequence of jax devices, got {devices!r}"
            )
    return Mesh(np.asarray(chosen), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """Rows split over the mesh (None without a mesh)."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """`tree` on every device of `mesh` (unchanged without a mesh)."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def particle_split(mesh: Mesh | None) -> Callable[[jax.Array, int], jax.Array]:
    """``split(key, n)``: `jax.random.split`, its keys (so the particles drawn from them)
    split over `mesh`'s devices (`fit_posterior`'s ``devices``); without a mesh,
    `jax.random.split` itself."""
    if mesh is None:
        return jax.random.split
    sharding = batch_sharding(mesh)
    return lambda key, n: lax.with_sharding_constraint(jax.random.split(key, n), sharding)


def check_divisible(rows: int, mesh: Mesh | None, what: str, unit: str = "row count") -> None:
    """Raise unless `rows` split evenly over the devices of `mesh`."""
    if mesh is not None and rows % mesh.size:
        raise ValueError(
            f"{what}: expected a {unit} divisible by the {mesh.size} devices, got {rows}"
        )


def put_batch(host: np.ndarray, dtype: Any, mesh: Mesh | None) -> jax.Array:
    """Start copying the minibatch `host` to the device(s), split over `mesh`'s devices.

    With a mesh, each process fills the shards on its own devices from its copy of `host`
    (`jax.make_array_from_callback`), so every process must hold the same minibatch.
    """
    host = np.asarray(host, dtype=jax.dtypes.canonicalize_dtype(dtype))
    if mesh is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, batch_sharding(mesh), lambda i: host[i])


def density_step(
    optimizer, losses: tuple, num_steps: int, patience: int, every: int, sharding: Any = None
) -> Callable:
    """``step(carry, i, draw, val, last=None) -> (carry, outputs)``: `fit_density`'s training
    step `i` on the minibatch ``draw(key)`` (split by `sharding` when set), validating every
    `every` steps, after the last and when `last` (a stream's last minibatch) is true.

    Args:
        optimizer: the optax optimiser.
        losses: ``density._density_losses``' ``(train_loss, val_loss, entries)``.
        num_steps, patience: as `fit_density`'s.
        every: validate after every `every` steps.
        sharding: the minibatch's sharding, or None.
    """
    train_loss, val_loss_fn, entries = losses

    def step(c: tuple, i: jax.Array, draw: Callable, val: jax.Array, last: Any = None):
        def run(c: tuple):
            params, opt_state, key, best, good, _, bad_step = c
            key, k_batch, k_noise, k_val = jax.random.split(key, 4)
            x = draw(k_batch)
            if sharding is not None:
                x = lax.with_sharding_constraint(x, sharding)
            (_, (loss, steps)), grads = jax.value_and_grad(train_loss, has_aux=True)(
                params, x, k_noise
            )
            updates, new_opt = optimizer.update(grads, opt_state, params)
            good = lax.cond(jnp.isfinite(loss), lambda: params, lambda: good)
            finite = jnp.isfinite(loss) & all_finite(grads)
            new_params = optax.apply_updates(params, updates)
            new_params, new_opt = lax.cond(
                finite, lambda: (new_params, new_opt), lambda: (params, opt_state)
            )
            due = (i % every == 0) | (i == num_steps - 1)  # as the Pyro backend
            if last is not None:
                due = due | last
            validate = finite & (val.shape[0] > 0) & due

            def score():
                nll, nfe = val_loss_fn(new_params, val, k_val)
                return nll.astype(default_float()), nfe

            val_loss, val_nfe = lax.cond(
                validate,
                score,
                lambda: (jnp.asarray(jnp.nan, default_float()), jnp.zeros((), jnp.int32)),
            )
            best_params, best_val, best_step = best
            better = validate & (val_loss < best_val)
            best = lax.cond(better, lambda: (new_params, val_loss, i), lambda: best)
            patience_out = validate & (i - best[2] >= patience)
            stopped = ~finite | patience_out
            bad_step = jnp.where(finite, bad_step, i)
            out = (new_params, new_opt, key, best, good, stopped, bad_step)
            return out, (loss.astype(default_float()), val_loss, val_nfe, steps)

        def skip(c: tuple):
            nan = jnp.asarray(jnp.nan, default_float())
            zero = jnp.zeros((), jnp.int32)
            return c, (nan, nan, zero, entries(zero, jnp.zeros(())))

        return lax.cond((i < num_steps) & ~c[-2], run, skip, c)

    return step


def device_chunk(optimizer, step_args: tuple, batch: int, mesh: Mesh | None, traces: dict):
    """The compiled chunk of `CHUNK` steps (`density_step` on `step_args`) on minibatches of
    `batch` rows drawn on the device from the training rows (``traces["density"]`` counts its
    traces), split over `mesh` when set."""
    step = density_step(optimizer, *step_args, batch_sharding(mesh))

    def chunk(carry: tuple, start: jax.Array, data: tuple):
        traces["density"] += 1
        train, val = data

        def draw(k_batch: jax.Array) -> jax.Array:
            return train[jax.random.randint(k_batch, (batch,), 0, train.shape[0])]

        return lax.scan(lambda c, i: step(c, i, draw, val), carry, start + jnp.arange(CHUNK))

    if mesh is None:
        return jit(chunk)
    rep = NamedSharding(mesh, PartitionSpec())
    return jit(chunk, in_shardings=(rep, rep, rep), out_shardings=rep)


@partial(jax.jit, static_argnums=(1, 2, 3))
def _rows_ahead(key: jax.Array, steps: int, batch: int, n: int) -> tuple[jax.Array, jax.Array]:
    def body(k: jax.Array, _: None):
        k, k_batch, _, _ = jax.random.split(k, 4)  # as a compiled chunk's step
        return k, jax.random.randint(k_batch, (batch,), 0, n)

    return lax.scan(body, key, None, length=steps)


def draw_rows(seed: int, batch: int, n: int) -> Iterator[np.ndarray]:
    """The training rows the in-memory path draws at each step for `seed`, step by step."""
    key = jax.random.key(seed)
    while True:
        key, rows = _rows_ahead(key, _AHEAD, batch, n)
        yield from np.asarray(rows)


def stream_program(step: Callable, mesh: Mesh | None) -> Callable:
    """``program(carry, i, x, val, last) -> (carry, outputs)``: one compiled training step on
    minibatch `x` (`step` from `density_step`), split over `mesh` when set."""

    def one(carry: tuple, i: jax.Array, x: jax.Array, val: jax.Array, last: jax.Array):
        return step(carry, i, lambda _: x, val, last)

    if mesh is None:
        return jit(one)
    rep = NamedSharding(mesh, PartitionSpec())
    rows = batch_sharding(mesh)
    return jit(one, in_shardings=(rep, rep, rows, rep, rep), out_shardings=rep)


def run_stream(
    program: Callable,
    carry: tuple,
    source: DataSource,
    val: jax.Array,
    num_steps: int,
    batch: int,
    seed: int,
    dtype: Any,
    mesh: Mesh | None,
    progress: bool,
) -> tuple[tuple, tuple, int]:
    """Train on `source`'s minibatches, one compiled step each, double-buffered.

    Returns:
        The final carry, the per-step outputs (stacked) and the last step that ran.

    Raises:
        ValueError: a minibatch of an iterable is bad (`flowguides.core.check_batch`) or does
            not split evenly over the devices.
    """
    if source.mapped is not None:
        rows = source.mapped
        hosts: Iterator[np.ndarray] = map(rows.read, draw_rows(seed, batch, rows.n_train))
    else:
        hosts = source.stream

    def fetch(i: int) -> np.ndarray | None:
        host = next(hosts, None) if i < num_steps else None
        if host is not None:
            check_divisible(len(host), mesh, f"data: batch {i}")
        return host

    outputs, i, smoothed = [], 0, math.nan
    x, host = put_batch(fetch(0), dtype, mesh), fetch(1)
    with progress_bar(num_steps, progress) as bar:
        for i in range(num_steps):
            last = host is None  # no minibatch after this one: validate after this step
            carry, out = program(carry, jnp.asarray(i), x, val, jnp.asarray(last))
            if not last:  # minibatch i + 1 to the device, i + 2 read, while step i runs
                x, host = put_batch(host, dtype, mesh), fetch(i + 2)
            out = jax.device_get(out)  # waits for step i
            outputs.append(out)
            if np.isfinite(out[0]):
                smoothed = out[0] if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * out[0]
                bar.set_postfix(loss=f"{smoothed:.4g}", refresh=False)
            bar.update()
            if last or bool(carry[-2]):
                break
    return carry, jax.tree.map(lambda *a: np.stack(a), *outputs), i


class full_data(Messenger):
    """Every subsampled plate (``subsample_size`` below its size) takes all its indices: the
    model runs on the full data with likelihood scale 1. The start search runs under it, so
    the MAP and the Hessian whitening are the full posterior's, not one minibatch's scaled
    up (whose MAP sits about ``sqrt(size / subsample_size)`` posterior sds away)."""

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "plate" and msg["value"] is None:
            size = msg["args"][0]
            msg["args"] = (size, None)
            msg["value"] = jnp.arange(size)


FULL_DATA_ELEMENTS = 2**24
"""Draws times full-data rows that `full_data_map` evaluates at once (bounds its memory)."""


def full_data_map(fn: Callable[[Any], Any], xs: Any, prototype_trace: Mapping[str, Any]) -> Any:
    """``jax.vmap(fn)(xs)``, or, for a model with subsampled plates evaluated on all their rows
    (`full_data`), `jax.lax.map` over batches of draws holding at most `FULL_DATA_ELEMENTS`
    draws × rows: the same values, in bounded memory."""
    sizes = [site["args"][0] for site in prototype_trace.values() if site["type"] == "plate"
             and site["args"][1] is not None and site["args"][1] < site["args"][0]]  # fmt: skip
    num = jax.tree.leaves(xs)[0].shape[0]
    batch = max(1, min(num, FULL_DATA_ELEMENTS // max(1, math.prod(sizes))))
    return jax.vmap(fn)(xs) if not sizes or batch >= num else lax.map(fn, xs, batch_size=batch)


def _with_replacement(size: int, subsample_size: int, rng_key: jax.Array | None = None):
    return jax.random.randint(rng_key, (subsample_size,), 0, size)


def _without_replacement(size: int, subsample_size: int, rng_key: jax.Array | None = None):
    # a uniformly random subset in random order (the indices of the largest of `size`
    # uniform keys): NumPyro's distribution, vectorised, where NumPyro's CPU draw runs a
    # sequential Fisher-Yates scan of `subsample_size` steps
    return lax.top_k(jax.random.uniform(rng_key, (size,)), subsample_size)[1]


class _fast_subsample(Messenger):
    """Subsampled plates draw their minibatch indices by a vectorised draw: uniformly with
    replacement where the plate is at least `WITH_REPLACEMENT_RATIO` times its
    ``subsample_size`` (``O(subsample_size)``), else a uniform subset without replacement
    (``O(size)``, as NumPyro's own draw)."""

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "plate" and msg["value"] is None and msg["args"][1] is not None:
            size, subsample_size = msg["args"]
            large = size >= WITH_REPLACEMENT_RATIO * subsample_size
            msg["fn"] = _with_replacement if large else _without_replacement


def subsampled(prototype_trace: Mapping[str, Any]) -> bool:
    """Whether a model's trace has a plate that subsamples (``subsample_size`` below its
    size)."""
    return any(
        site["type"] == "plate"
        and site["args"][1] is not None
        and site["args"][1] < site["args"][0]
        for site in prototype_trace.values()
    )


def training_model(model: Callable[..., Any], subsamples: bool) -> Callable[..., Any]:
    """`model` with its subsampled plates drawing by `_fast_subsample` (`model` itself when
    it `subsamples` nothing)."""
    return _fast_subsample(model) if subsamples else model


def subsampled_plates(fit: Any) -> list[str]:
    """Names of the model's plates that subsample their data (``subsample_size`` smaller
    than the size). `flowguides.to_arviz` leaves ``observed_data`` and ``log_likelihood``
    out for such a model: each evaluation sees another subsample."""
    return _subsampling(fit.guide.prototype_trace)


def _subsampling(trace: Mapping[str, Any]) -> list[str]:
    return [name for name, site in trace.items() if site["type"] == "plate"
            and site["args"][1] is not None and 0 < site["args"][1] < site["args"][0]]  # fmt: skip


def deterministic_sites(trace: Mapping[str, Any]) -> list[str]:
    """The deterministic sites of the model `trace` that `fit.sample` returns: those inside a
    plate that subsamples are left out, with a `SubsampledSiteWarning` (`whole_data_sites`)."""
    sites = {name: [frame.name for frame in site["cond_indep_stack"]]
             for name, site in trace.items() if site["type"] == "deterministic"}  # fmt: skip
    return whole_data_sites(sites, _subsampling(trace))
