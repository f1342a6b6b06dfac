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

Subsampled plates (`full_data`, `training_model`) are `flowguides.numpyro._stream`'s.
"""

from __future__ import annotations

import copy as _copy
import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.initialization import init_to_uniform, init_to_value
from numpyro.infer.util import get_potential_fn, initialize_model, potential_energy, transform_fn

from flowguides.core import (
    DiscreteLatentError,
    NoLatentSitesError,
    check_not_delta,
    local_latent_error,
    warn_masked_latents,
)
from flowguides.numpyro._model import callable_key, split_args
from flowguides.numpyro._training import cache_key, cached, jit

try:  # NumPyro >= 0.20
    from numpyro.infer.util import (
        _init_to_unconstrained_value,
        _prepare_model_for_potential,
        _substitute_default_key,
        _transforms_from_trace,
    )

    # init strategies whose draws `find_valid_initial_params` may make without the model
    _RETRIED = (init_to_uniform, init_to_value, _init_to_unconstrained_value)
except ImportError:  # pragma: no cover - older NumPyro: its own set-up
    _prepare_model_for_potential = _transforms_from_trace = None

__all__ = [
    "check_latent_sites",
    "StagedPrototype",
    "staged_prototype",
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

    def init(key: jax.Array, arrays: list, first: bool, traces: dict) -> tuple:
        _TRACES["init"] += 1
        a, k = rebuild(arrays)
        with handlers.block():  # hide the model's sites from the caller's handlers
            if first:
                z, energy, grad, postprocess = _first_attempt(model, strategy, key, a, k)
            else:
                info = initialize_model(
                    key, model, init_strategy=init_loc_fn, dynamic_args=True, model_args=a,
                    model_kwargs=k,
                )  # fmt: skip
                (z, energy, grad), postprocess = info.param_info, info.postprocess_fn
        valid = jnp.isfinite(energy)
        for g in jax.tree.leaves(grad):
            valid = valid & jnp.all(jnp.isfinite(g))
        # constrained values of the latent sites only (a replayed model adds deterministic ones)
        with handlers.block():
            values = postprocess(*a, **k)(z)
        values = {name: values[name] for name in z}
        # the prototype trace at those values, in this program: run eagerly, each operation
        # of the model would be a compile of its own
        with handlers.block():
            seeded = handlers.substitute(handlers.seed(model, key), data=values)
            trace = handlers.trace(seeded).get_trace(*a, **k)
        found = _Tracers(trace, owner=getattr(key, "_trace", None))
        traces[_signature(key, arrays)] = found if found.safe else None
        return z, values, valid, found.leaves if found.safe else []

    def make(first: bool) -> tuple[Callable, dict]:
        # the program, and the traces it made keyed by its arguments' types: the prototype
        # trace of a call is the one of the program's trace for those types
        traces: dict[tuple, _Tracers | None] = {}
        return jit(functools.partial(init, first=first, traces=traces), setup=True), traces

    try:
        strategy = init_loc_fn if isinstance(init_loc_fn, functools.partial) else init_loc_fn()
        content = (callable_key(model), callable_key(init_loc_fn), signature)
        # `initialize_model`'s first attempt, and where it fails its retries (a second program)
        for first in (True, False) if getattr(strategy, "func", None) not in _RETRIED else (False,):
            program, traces = cached(
                cache_key("prototype", first, content=content, setup=True),
                lambda first=first: make(first),
            )
            z, values, valid, leaves = program(key, arrays)
            if bool(valid):
                break
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
    transforms = _transforms_from_trace(trace, raise_warnings=False)
    replay = transforms.has_deterministic or transforms.dynamic_support
    prepared = _prepare_model_for_potential(model, trace, enum=False)
    potential_gen, postprocess_gen = get_potential_fn(
        prepared, transforms.inv_transforms, replay_model=replay, dynamic_args=True
    )
    # jit returns dicts in sorted key order; NumPyro packs latent sites in model order
    init_locs = {name: z[name] for name in trace if name in z}
    return init_locs, potential_gen, postprocess_gen, trace


def _first_attempt(model: Callable, strategy: Callable, key: jax.Array, a: tuple, k: dict) -> tuple:
    """``(z, potential energy, its gradient, postprocess_fn_gen)`` of `initialize_model`'s first
    attempt at valid initial values: `find_valid_initial_params` draws from the init strategy
    at ``split(key)[1]`` and evaluates the potential there, then retries (a loop in the
    program, with a second copy of the model and of its prior draws) only where that point is
    not valid. Traced once, without the loop; `staged_prototype` runs `initialize_model` where
    the point is not valid, so the values are the same either way. For a model without
    ``param`` sites (the staged path refuses them). A model whose plates subsample runs, as
    in `initialize_model`, on the indices its prototype trace drew (a trace of the model
    seeded with `key` under the init strategy), so it is traced once more."""
    prepared = _substitute_default_key(model)  # the model `find_valid_initial_params` runs

    def first_trace(prepared: Callable) -> dict:
        seeded = handlers.seed(prepared, jax.random.split(key)[1])
        return handlers.trace(handlers.substitute(seeded, substitute_fn=strategy)).get_trace(
            *a, **k
        )

    trace = first_trace(prepared)
    if any(
        s["type"] == "plate" and s["args"][1] not in (None, s["args"][0]) for s in trace.values()
    ):
        seeded = handlers.substitute(handlers.seed(model, key), substitute_fn=strategy)
        plates = {n: s["value"] for n, s in handlers.trace(seeded).get_trace(*a, **k).items()
                  if s["type"] == "plate"}  # fmt: skip
        prepared = handlers.substitute(prepared, data=plates)
        trace = first_trace(prepared)
    latent = {
        name: site for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"] and not site["fn"].support.is_discrete
    }  # fmt: skip
    inverse = {name: biject_to(site["fn"].support) for name, site in latent.items()}
    z = transform_fn(inverse, {name: site["value"] for name, site in latent.items()}, invert=True)
    potential = functools.partial(potential_energy, prepared, a, k)
    energy, grad = jax.value_and_grad(potential)(z)
    transforms = _transforms_from_trace(trace, raise_warnings=False)
    _, postprocess = get_potential_fn(
        _prepare_model_for_potential(model, trace, enum=False),
        transforms.inv_transforms,
        replay_model=transforms.has_deterministic or transforms.dynamic_support,
        dynamic_args=True,
    )
    return z, energy, grad, postprocess


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


def check_latent_sites(trace: Mapping[str, dict]) -> None:
    """Raise if a latent site of the model `trace` is discrete or inside a plate that
    subsamples, or if there is none at all; warn where a mask leaves coordinates of one
    without density (`flowguides.core.warn_masked_latents`)."""
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
        check_not_delta(name, site["fn"])
        if site["fn"].support.is_discrete:
            raise DiscreteLatentError(
                f"site {name!r}: a discrete latent site ({type(site['fn']).__name__}) cannot be "
                "fitted by a continuous flow guide, and fit_posterior does not enumerate: "
                "enumerate it in your own SVI loop (infer={'enumerate': 'parallel'} on the site, "
                "TraceEnum_ELBO, and the guide AutoFlowGuide(handlers.block(model, "
                f"hide=[{name!r}]), spec)), or marginalise it out of the model"
            )
        for frame in site["cond_indep_stack"]:
            plate = trace.get(frame.name, {})
            size, subsample_size = plate.get("args", (frame.size, None))
            if plate.get("type") == "plate" and subsample_size not in (None, size):
                raise local_latent_error(name, frame.name, subsample_size, size)
    observed = [n for n, site in trace.items() if site["type"] == "sample" and site["is_observed"]]
    warn_masked_latents({name: _fn_mask(site["fn"]) for name, site in latent.items()}, observed)


def _fn_mask(fn: Any) -> Any:
    """The mask of a site's distribution (NumPyro's mask handler and ``obs_mask`` wrap the
    distribution in a `MaskedDistribution`), or None."""
    while isinstance(fn, numpyro.distributions.Independent):
        fn = fn.base_dist
    return fn._mask if isinstance(fn, numpyro.distributions.MaskedDistribution) else None
