"""NumPyro's guide set-up with its numerical work compiled once, not run op by op.

`AutoGuide._setup_prototype` calls `initialize_model`, which runs the model eagerly several
times (the init strategy's prior draws, the transforms, the potential energy and its gradient):
every distinct eager operation is an XLA compile of its own, about half of `AutoIAFNormal`'s
time to its first step on a 10-D problem. `StagedPrototype` does the same work as one jitted
call of `initialize_model` (cached per model, init strategy and argument shapes, keyed as
`flowguides.numpyro._model` says, so a second guide of the same model pays nothing), and
traces the model at the values it found in the same program, for the prototype trace that
NumPyro's guide machinery reads: the trace's objects are rebuilt outside with the program's
outputs in place of its tracers (`_Tracers`; where a tracer sits where it cannot be replaced,
e.g. in a closure, the model is traced eagerly instead). It is a drop-in base
between `AutoContinuous` and `AutoGuide` in the method resolution order, and falls back to
NumPyro's own set-up wherever the staged path does not apply: a traced key or argument (set-up
inside `jit`), `param`/`mutable` sites or discrete latent sites in the model, a subsampled
plate, no valid initial point (NumPyro then raises its own diagnostics), or a NumPyro without
the helpers used here.

`check_latent_sites` names a latent site no continuous flow guide can take (discrete, or
local to a subsampled plate), where NumPyro's own set-up failed.

Subsampled plates: `full_data` runs a model on all rows of its subsampled plates (the start
search's energy), `training_model` makes their minibatch draws vectorised (see
`flowguides.core.WITH_REPLACEMENT_RATIO`).
"""

from __future__ import annotations

import copy as _copy
import functools
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax import lax
from numpyro import handlers
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.util import get_potential_fn, initialize_model
from numpyro.primitives import Messenger

from flowguides.core import (
    WITH_REPLACEMENT_RATIO,
    DiscreteLatentError,
    NoLatentSitesError,
    local_latent_error,
)
from flowguides.numpyro._model import callable_key, split_args
from flowguides.numpyro._training import cache_key, cached, jit

try:  # NumPyro >= 0.20
    from numpyro.infer.util import _prepare_model_for_potential, _transforms_from_trace
except ImportError:  # pragma: no cover - older NumPyro: its own set-up
    _prepare_model_for_potential = _transforms_from_trace = None

__all__ = [
    "check_latent_sites",
    "StagedPrototype",
    "full_data",
    "full_data_map",
    "staged_prototype",
    "subsampled",
    "training_model",
]

_TRACES = {"init": 0}  # times the init program was traced (tests read it)


class StagedPrototype(AutoGuide):
    """`AutoGuide._setup_prototype`, staged (see the module docstring)."""

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        constants = getattr(self, "_constants", frozenset())
        key = numpyro.prng_key()
        staged = staged_prototype(self.model, self.init_loc_fn, key, args, kwargs, constants)
        if staged is None:
            super()._setup_prototype(*args, **kwargs)
            return
        self._init_locs, self._potential_fn_gen, postprocess_fn_gen, self.prototype_trace = staged
        self._potential_fn = self._potential_fn_gen(*args, **kwargs)
        self._postprocess_fn = handlers.seed(postprocess_fn_gen(*args, **kwargs), rng_seed=0)
        self._prototype_frames = {}
        self._prototype_plate_sizes = {}
        for name, site in self.prototype_trace.items():
            if site["type"] == "sample" and not site["is_observed"]:
                for frame in site["cond_indep_stack"]:
                    known = self._prototype_frames.setdefault(frame.name, frame)
                    if known != frame:
                        raise ValueError(
                            f"plate {frame.name!r}: inconsistent dim or size between sites "
                            f"({known} and {frame} at site {name!r})"
                        )
            elif site["type"] == "plate":
                self._prototype_frame_full_sizes[name] = site["args"][0]


def staged_prototype(
    model: Callable[..., Any],
    init_loc_fn: Callable[..., Any],
    key: jax.Array | None,
    args: tuple,
    kwargs: dict,
    constants: frozenset = frozenset(),
) -> tuple[dict, Callable, Callable, dict] | None:
    """``(init_locs, potential_fn_gen, postprocess_fn_gen, prototype_trace)`` as
    `initialize_model` (``dynamic_args=True``) gives them, or None where the staged path does
    not apply. The arguments in `constants` (see `choose_constants`) are compiled in."""
    if key is None or _transforms_from_trace is None or isinstance(key, jax.core.Tracer):
        return None
    arrays, signature, rebuild = split_args(args, kwargs, constants)
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        return None

    traces: dict[tuple, _Tracers | None] = {}

    def init(key: jax.Array, arrays: list) -> tuple[dict, dict, jax.Array, list]:
        _TRACES["init"] += 1
        a, k = rebuild(arrays)
        with handlers.block():  # hide the model's sites from the caller's handlers
            info = initialize_model(
                key, model, init_strategy=init_loc_fn, dynamic_args=True, model_args=a,
                model_kwargs=k,
            )  # fmt: skip
        z, energy, grad = info.param_info
        valid = jnp.isfinite(energy)
        for g in jax.tree.leaves(grad):
            valid = valid & jnp.all(jnp.isfinite(g))
        # constrained values of the latent sites only (a replayed model adds deterministic ones)
        with handlers.block():
            values = info.postprocess_fn(*a, **k)(z)
        values = {name: values[name] for name in z}
        # the prototype trace at those values, in this program: run eagerly, each operation
        # of the model would be a compile of its own
        with handlers.block():
            seeded = handlers.substitute(handlers.seed(model, key), data=values)
            trace = handlers.trace(seeded).get_trace(*a, **k)
        found = _Tracers(trace, owner=getattr(key, "_trace", None))
        traces[_signature(key, arrays)] = found if found.safe else None
        return z, values, valid, found.leaves if found.safe else []

    try:
        content = (callable_key(model), callable_key(init_loc_fn), signature)
        # the program, and the traces it made keyed by its arguments' types: the prototype
        # trace of a call is the one of the program's trace for those types
        made = cached(cache_key("prototype", content=content), lambda: (jit(init), traces))
        program, traces = made
        z, values, valid, leaves = program(key, arrays)
    except Exception:  # noqa: BLE001 - NumPyro's own set-up raises its own, clearer error
        return None
    if not bool(valid):
        return None
    found = traces.get(_signature(key, arrays))
    trace = found.rebuild(leaves) if found is not None else None
    if trace is None:  # the trace holds tracers where they cannot be replaced: run it eagerly
        with handlers.block():
            trace = handlers.trace(handlers.substitute(handlers.seed(model, key), data=values))
            trace = trace.get_trace(*args, **kwargs)
    for site in trace.values():
        if site["type"] in ("param", "mutable"):
            return None
        if site["type"] == "sample" and not site["is_observed"]:
            if site["fn"].support.is_discrete:
                return None
        if site["type"] == "plate" and site["args"][1] not in (None, site["args"][0]):
            return None  # subsampled: NumPyro replays the prototype's indices
    transforms = _transforms_from_trace(trace, raise_warnings=False)
    replay = transforms.has_deterministic or transforms.dynamic_support
    prepared = _prepare_model_for_potential(model, trace, enum=False)
    potential_gen, postprocess_gen = get_potential_fn(
        prepared, transforms.inv_transforms, replay_model=replay, dynamic_args=True
    )
    # jit returns dicts in sorted key order; NumPyro packs latent sites in model order
    init_locs = {name: z[name] for name in trace if name in z}
    return init_locs, potential_gen, postprocess_gen, trace


def _signature(*args: Any) -> tuple:
    """The types of the array leaves of `args` (what a jitted program is traced for)."""
    return tuple(jax.typeof(leaf) for leaf in jax.tree.leaves(args))


_ATOMS = (str, bytes, int, float, complex, type(None), np.ndarray, np.generic, type,
          types.ModuleType, types.BuiltinFunctionType)  # fmt: skip


class _Tracers:
    """The tracers an object graph (a model's trace, traced in a program) holds, found by
    walking dicts, lists, tuples and objects' attributes, in `leaves`; `rebuild` copies the
    containers on the paths to them with the tracers replaced by the program's outputs.

    ``safe`` is False where a tracer sits where it cannot be replaced (in a function's
    closure, a set, a slot, a cycle), belongs to another trace than `owner`'s (a loop's
    body inside the model), or the graph is deeper or larger than a trace is: the caller
    then traces the model eagerly instead.
    """

    _MAX_DEPTH, _MAX_NODES = 64, 200_000

    def __init__(self, root: Any, owner: Any = None) -> None:
        self._owner = owner
        self.leaves: list[jax.Array] = []
        self._index: dict[int, int] = {}  # id of a tracer -> its position in `leaves`
        self._holds: set[int] = set()  # ids of the objects that hold a tracer
        self._done: set[int] = set()
        self._open: set[int] = set()
        self.safe = True
        self._root = root
        self._visit(root, 0)

    def _visit(self, obj: Any, depth: int) -> bool:
        if isinstance(obj, jax.core.Tracer):
            if getattr(obj, "_trace", None) is not self._owner:
                self.safe = False
            if id(obj) not in self._index:
                self._index[id(obj)] = len(self.leaves)
                self.leaves.append(obj)
            return True
        if isinstance(obj, (jax.Array, *_ATOMS)):
            return False
        if id(obj) in self._open or depth > self._MAX_DEPTH or len(self._done) > self._MAX_NODES:
            self.safe = False
            return False
        if id(obj) in self._done:
            return id(obj) in self._holds
        self._open.add(id(obj))
        if isinstance(obj, dict):
            children, rebuildable = list(obj.values()), True
        elif isinstance(obj, (list, tuple)):
            children, rebuildable = list(obj), True
        elif isinstance(obj, (set, frozenset)):
            children, rebuildable = list(obj), False
        elif isinstance(obj, types.FunctionType):
            cells = [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
            children, rebuildable = [*cells, obj.__defaults__, obj.__kwdefaults__], False
        elif isinstance(obj, (types.MethodType, functools.partial)):
            children = [getattr(obj, n, None) for n in ("__self__", "func", "args", "keywords")]
            rebuildable = False
        else:
            slots = [getattr(obj, n, None) for c in type(obj).__mro__
                     for n in getattr(c, "__slots__", ()) if n not in ("__dict__", "__weakref__")]  # fmt: skip
            children = list(getattr(obj, "__dict__", {}).values())
            holds_in_slots = any([self._visit(c, depth + 1) for c in slots])
            rebuildable = not holds_in_slots and hasattr(obj, "__dict__")
            if holds_in_slots:
                self._holds.add(id(obj))
        if any([self._visit(c, depth + 1) for c in children]):
            self._holds.add(id(obj))
        if id(obj) in self._holds and not rebuildable:
            self.safe = False
        self._open.discard(id(obj))
        self._done.add(id(obj))
        return id(obj) in self._holds

    def rebuild(self, values: Sequence[jax.Array]) -> Any:
        """The walked graph with its tracers replaced by `values` (in `leaves` order): new
        containers on the paths to them, every other object shared."""
        memo: dict[int, Any] = {}

        def copy(obj: Any) -> Any:
            if isinstance(obj, jax.core.Tracer):
                return values[self._index[id(obj)]]
            if id(obj) not in self._holds:
                return obj
            if id(obj) not in memo:
                if isinstance(obj, dict):
                    new = _copy.copy(obj)
                    new.update({k: copy(v) for k, v in obj.items()})
                elif isinstance(obj, list):
                    new = [copy(v) for v in obj]
                elif isinstance(obj, tuple):
                    items = [copy(v) for v in obj]
                    new = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
                else:
                    new = _copy.copy(obj)
                    vars(new).update({k: copy(v) for k, v in vars(obj).items()})
                memo[id(obj)] = new
            return memo[id(obj)]

        return copy(self._root)


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


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


def check_latent_sites(trace: Mapping[str, dict]) -> None:
    """Raise if a latent site of the model `trace` is discrete or inside a plate that
    subsamples, or if there is none at all."""
    latent = {
        name: site
        for name, site in trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary", False)
    }
    if not latent:
        raise NoLatentSitesError(
            "model: found no latent sample sites (every sample site is observed); there is "
            "nothing for a guide to fit"
        )
    for name, site in latent.items():
        if site["fn"].support.is_discrete:
            raise DiscreteLatentError(
                f"site {name!r}: a discrete latent site ({type(site['fn']).__name__}) cannot be "
                f"fitted by a continuous flow guide; marginalise it out by enumeration "
                f"(e.g. infer={{'enumerate': 'parallel'}} with TraceEnum_ELBO and a guide over "
                f"the remaining sites, or numpyro.contrib.funsor.config_enumerate)"
            )
        for frame in site["cond_indep_stack"]:
            plate = trace.get(frame.name, {})
            size, subsample_size = plate.get("args", (frame.size, None))
            if plate.get("type") == "plate" and subsample_size not in (None, size):
                raise local_latent_error(name, frame.name, subsample_size, size)
