"""The compiled-training machinery `fit.py` shares between posteriors and densities.

The shared schedule as an optax optimiser, a bounded cache of jitted chunk functions keyed on a
fit's static structure (see `flowguides.numpyro._args` for the keys of models and arguments),
and the host loop that runs chunks of `CHUNK` steps and advances the progress bar between them.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from flowguides.core import PRECONDITION, decay_steps

__all__ = [
    "CHUNK",
    "cache_key",
    "cached",
    "default_float",
    "make_optimizer",
    "run_chunks",
    "timing",
]

CHUNK = 100
_CACHE_SIZE = 32
_COMPILED: OrderedDict[Hashable, Callable[..., Any]] = OrderedDict()


def default_float() -> jnp.dtype:
    """The default float dtype at trace time (float64 when x64 is on)."""
    return jnp.result_type(float)


def make_optimizer(num_steps: int, learning_rate: float, clip_norm: float | None):
    """Adam on the shared schedule (after global-norm clipping when `clip_norm` is set); the
    fixed whitening of a Laplace start (SVI parameters named after `PRECONDITION`) is left
    out: no update and no Adam moments."""
    schedule = optax.join_schedules(
        [
            optax.constant_schedule(learning_rate),
            optax.cosine_decay_schedule(learning_rate, decay_steps(num_steps), alpha=0.01),
        ],
        [num_steps // 2],
    )
    adam = optax.adam(schedule)
    trained = adam if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adam)

    def labels(params: Any) -> Any:
        if not isinstance(params, dict):
            return jax.tree.map(lambda _: "trained", params)
        return {k: "fixed" if k.endswith(PRECONDITION) else "trained" for k in params}

    return optax.multi_transform({"trained": trained, "fixed": optax.set_to_zero()}, labels)


def cache_key(*parts: Hashable, content: tuple) -> tuple | None:
    """The key ``(*parts, *content)``, or None where a `content` part is None (a model or an
    argument that cannot be keyed by its contents, see `flowguides.numpyro._args`)."""
    return None if any(c is None for c in content) else (*parts, *content)


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
    with tqdm(total=num_steps, disable=not progress, file=sys.stderr, leave=False) as bar:
        for start in range(0, num_steps, CHUNK):
            t0 = time.perf_counter()
            carry, out = run_chunk(carry, jnp.asarray(start), data)
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


def timing(setup_s: float, seconds: list[float], num_steps: int) -> dict[str, float]:
    """``setup_s`` (guide set-up and start search), ``compile_s`` (first chunk minus a steady
    one; 0 when the compiled chunk came from the cache) and steady ``steps_per_s``: that of
    the fastest full chunk after the first (the first compiles; the fastest, as ``timeit``
    takes the best of its repeats, is the least disturbed by other work on the machine)."""
    full = [s for i, s in enumerate(seconds) if i > 0 and (i + 1) * CHUNK <= num_steps]
    per_step = (min(full) if full else seconds[0]) / CHUNK
    compile_s = max(seconds[0] - per_step * min(CHUNK, num_steps), 0.0)
    return {"setup_s": setup_s, "compile_s": compile_s, "steps_per_s": 1.0 / per_step}
