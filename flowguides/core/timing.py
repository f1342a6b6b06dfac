"""Where a posterior fit's time goes: the keys of both backends' ``PosteriorFit.timing``.

`fit_posterior` records the whole call, in parts that add up:
``fit_s = setup_s + compile_s + train_s`` and ``setup_s = init_s + start_s``
(`fit_timing`); each ``fit.sample(...)`` call adds its time to ``draws_s`` (`add_seconds`).
The NumPyro backend reads ``compile_s`` and ``steps_per_s`` off its chunks' wall times
(`chunk_timing`); the Pyro backend compiles nothing (``compile_s`` is 0). Imports neither
torch nor jax.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["FIT_TIMING_KEYS", "add_seconds", "chunk_timing", "fit_timing", "timed_calls"]

FIT_TIMING_KEYS = ("fit_s", "setup_s", "init_s", "start_s", "compile_s", "train_s", "steps_per_s")
"""`fit_posterior`'s timing keys, in seconds (``steps_per_s``: steady training steps a second):

- ``fit_s``: the whole call;
- ``setup_s``: everything before training: ``init_s`` (the model's tracing and initial
  location, the flow's weights, the optimiser's state) plus ``start_s`` (the `init_scale`
  search: MAP, Hessian, the starts' ELBOs; 0 for a numeric `init_scale`), each with the XLA
  compiles it needs (NumPyro);
- ``compile_s``: the training program's compile (NumPyro; a load when the persistent cache
  holds it, 0 when this process compiled it already; 0 in Pyro);
- ``train_s``: the rest: the training steps and the fit's assembly.
"""


def add_seconds(timing: MutableMapping[str, float], key: str, seconds: float) -> None:
    """Add `seconds` to ``timing[key]`` (from 0 where it is missing)."""
    timing[key] = timing.get(key, 0.0) + seconds


@contextmanager
def timed_calls(
    obj: Any, name: str, timing: MutableMapping[str, float], key: str
) -> Iterator[None]:
    """Within the block, add the wall time of every call of ``obj.<name>`` to ``timing[key]``
    (set to 0 on entry); the method is wrapped on this one object and restored on exit."""
    method = getattr(obj, name)
    own = name in vars(obj)
    timing[key] = 0.0

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            add_seconds(timing, key, time.perf_counter() - t0)

    setattr(obj, name, timed)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, method)
        else:
            delattr(obj, name)


def chunk_timing(seconds: Sequence[float], num_steps: int, chunk: int) -> dict[str, float]:
    """``compile_s`` and ``steps_per_s`` from the wall times of chunks of `chunk` steps.

    ``steps_per_s`` is that of the fastest full chunk after the first (the first compiles;
    the fastest, as ``timeit`` takes the best of its repeats, is the least disturbed by other
    work on the machine); ``compile_s`` the first chunk's time beyond that pace (0 when the
    compiled chunk came from the cache).
    """
    full = [s for i, s in enumerate(seconds) if i > 0 and (i + 1) * chunk <= num_steps]
    per_step = (min(full) if full else seconds[0]) / chunk
    compile_s = max(seconds[0] - per_step * min(chunk, num_steps), 0.0)
    return {"compile_s": compile_s, "steps_per_s": 1.0 / per_step}


def fit_timing(
    started: float, setup_s: float, start_s: float, compile_s: float, steps_per_s: float
) -> dict[str, float]:
    """The `FIT_TIMING_KEYS` of a call that began at ``time.perf_counter() == started`` and
    ends now."""
    fit_s = time.perf_counter() - started
    return {
        "fit_s": fit_s,
        "setup_s": setup_s,
        "init_s": max(setup_s - start_s, 0.0),
        "start_s": start_s,
        "compile_s": compile_s,
        "train_s": max(fit_s - setup_s - compile_s, 0.0),
        "steps_per_s": steps_per_s,
    }
