"""How the NumPyro backend compiles its programs, and where it keeps them.

`jit` is `jax.jit` with `CPU_COMPILER_OPTIONS` on the CPU (see the conventions page); every
program a fit compiles (the staged guide set-up, the start search, the training chunks, the
draws, the density-fitting steps) goes through it. Within a process, `cached` keeps programs
in a bounded cache keyed on a fit's static structure (`cache_key`; see
`flowguides.numpyro._model` for the keys of models and arguments), emptied by
`clear_compiled`; across processes, `use_compilation_cache` turns on JAX's persistent cache.
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from functools import cache
from pathlib import Path
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "cache_key",
    "cached",
    "clear_compiled",
    "compiler_options",
    "jit",
    "split3",
    "use_compilation_cache",
]

CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 2}
"""XLA options for the programs flowguides compiles for the CPU: LLVM at ``-O2`` instead of
XLA's default ``-O3``, for shorter compiles (the conventions page says what was measured). The
values a program computes do not depend on it beyond floating-point rounding; an option changes
the program's key in JAX's persistent cache, so a cached program is never served under other
options."""

_CACHE_SIZE = 32
_COMPILED: OrderedDict[Hashable, Callable[..., Any]] = OrderedDict()
_TAKES_OPTIONS = "compiler_options" in inspect.signature(jax.jit).parameters


def compiler_options() -> dict[str, Any] | None:
    """`CPU_COMPILER_OPTIONS` where JAX's default backend is the CPU, else None (XLA's own)."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def jit(fun: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fun, **kwargs)`` with `compiler_options` (a JAX too old to take compiler
    options in `jax.jit` compiles with XLA's defaults)."""
    options = compiler_options() if _TAKES_OPTIONS else None
    if options:
        kwargs = {"compiler_options": options, **kwargs}
    return jax.jit(fun, **kwargs)


@cache
def _splitter() -> Callable[[jax.Array], tuple]:
    return jit(lambda key: tuple(jax.random.split(key, 3)))


def split3(key: jax.Array) -> tuple:
    """``tuple(jax.random.split(key, 3))`` as one program (not one per operation)."""
    return _splitter()(key)


def cache_key(*parts: Hashable, content: tuple) -> tuple | None:
    """The key ``(*parts, *content, compiler options)``, or None where a `content` part is None
    (a model or an argument that cannot be keyed by its contents, see
    `flowguides.numpyro._model`). The options in force are part of it: a program compiled under
    other `CPU_COMPILER_OPTIONS` is not served."""
    if any(c is None for c in content):
        return None
    options = compiler_options() if _TAKES_OPTIONS else None
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
    """Empty the cache of compiled programs (training chunks and guide set-ups).

    The next fit, or guide set-up, compiles anew: for timing a first (cold) call, or to free
    the memory the programs hold. Fits are unaffected otherwise (the cache is keyed by
    content, so it never serves a stale program).
    """
    _COMPILED.clear()


def use_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Turn on JAX's persistent compilation cache for every program a fit compiles, however
    quick or small: a later process loads them instead (see the conventions page).

    Args:
        path: the directory (created where missing); None: ``$XDG_CACHE_HOME/flowguides/jax``
            (``~/.cache/flowguides/jax`` where ``XDG_CACHE_HOME`` is unset).

    Returns:
        The directory, absolute.
    """
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowguides/jax"
    directory = Path(home if path is None else path).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no minimum
    compilation_cache.reset_cache()  # JAX reads the setting once per process: read it anew
    return directory
