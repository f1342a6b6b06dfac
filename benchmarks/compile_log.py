"""Which XLA programs a block of code compiles (or loads), and how long each step took.

`CompileLog` turns on ``jax_log_compiles`` and reads JAX's own log messages (its loggers
``jax._src.dispatch`` and ``jax._src.compiler``/``compilation_cache``): per program, in the
order they were compiled, the seconds spent tracing it, lowering it to StableHLO, and compiling
it (or loading it from the persistent cache: ``cached``). `benchmarks/first_call.py` puts them in
its rows with ``--log-compiles``.

Usage::

    with CompileLog() as log:
        fit = fit_posterior(...)
    log.programs  # [{"name": "init", "trace_s": ..., "lower_s": ..., "compile_s": ..., "cached": False}, ...]
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["CompileLog", "parse"]

_TRACED = re.compile(
    r"Finished tracing(?: \+ transforming)? (.+?) for (?:jit|pjit) in ([0-9.e+-]+) sec"
)
_LOWERED = re.compile(r"Finished jaxpr to MLIR module conversion jit\((.+?)\) in ([0-9.e+-]+) sec")
_COMPILED = re.compile(r"Finished XLA compilation of jit\((.+?)\) in ([0-9.e+-]+) sec")
_HIT = re.compile(r"Persistent compilation cache hit for 'jit_(.+?)'")


def _module(name: str) -> str:
    """The name's form in an XLA module name (``<lambda>`` -> ``_lambda``)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_")


def parse(messages: list[str]) -> list[dict[str, Any]]:
    """Per compiled program, in order: ``name``, ``trace_s`` (0 where JAX reused a trace),
    ``lower_s``, ``compile_s`` (compile or cache load) and ``cached`` (a persistent-cache hit).
    A program's trace and lowering are the last ones logged under its name before it compiled."""
    traced: dict[str, float] = {}
    lowered: dict[str, float] = {}
    hits: set[str] = set()
    programs = []
    for message in messages:
        if m := _TRACED.search(message):
            traced[m.group(1)] = float(m.group(2))
        elif m := _LOWERED.search(message):
            lowered[m.group(1)] = float(m.group(2))
        elif m := _HIT.search(message):
            hits.add(m.group(1).strip("_"))
        elif m := _COMPILED.search(message):
            name = m.group(1)
            cached = _module(name) in hits
            hits.discard(_module(name))
            programs.append({"name": name, "trace_s": traced.pop(name, 0.0),
                             "lower_s": lowered.pop(name, 0.0), "compile_s": float(m.group(2)),
                             "cached": cached})  # fmt: skip
    return programs


class CompileLog(logging.Handler):
    """A context manager that records JAX's compile log messages while it is open."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []
        self._before: bool | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> CompileLog:
        import jax

        self._before = bool(jax.config.jax_log_compiles)
        jax.config.update("jax_log_compiles", True)
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        import jax

        logging.getLogger("jax").removeHandler(self)
        jax.config.update("jax_log_compiles", self._before)

    @property
    def programs(self) -> list[dict[str, Any]]:
        """`parse` of the messages recorded so far."""
        return parse(self.messages)
