"""Latent sites whose support depends on other latent sites (``x ~ Uniform(0, a)`` with `a`
latent): each draw is constrained by the support the model gives it at that draw's upstream
values, by replaying the model (`replay_constrained`).

Pyro's `AutoContinuous.forward` constrains every site by the support its prototype trace saw;
for such a site that puts draws outside their support (Pyro's support check fails at the first
step). The log joint (`flowguides.pyro._model.log_joint_at`) always constrains during its own
model run, so it costs nothing there; the guide's draws replay the model only where set-up
found a moving support (`dynamic_sites`). The NumPyro guide mirrors this in
`flowguides.numpyro._support`. Also `keeps_global_rng`: the entry points that seed Pyro's
global random state give the caller's state back.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to, constraints

__all__ = [
    "Constrain",
    "broadcast_init",
    "dynamic_constrain",
    "dynamic_forward",
    "dynamic_sites",
    "is_computed",
    "keeps_global_rng",
    "replay_constrained",
    "same_global_rng",
    "trace_at_draws",
]

_SHIFTS = (0.0, 0.5, -0.75)  # unconstrained offsets at which supports are compared


def broadcast_init(guide: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """Where the guide's prototype trace holds a latent value smaller than its distribution
    (a site ``poutine.reparam`` adds inside a plate, e.g. `LocScaleReparam`'s
    ``theta_decentered``: Pyro's init strategy draws the original site before the plate
    broadcasts it, so an `AutoContinuous` gives the whole plate one value), wrap the model anew
    with an init strategy that broadcasts each value to its site's shape in a plain trace of
    the model; True where it did (the set-up then runs again)."""
    nodes = guide.prototype_trace.iter_stochastic_nodes()
    if all(site["value"].shape == site["fn"].shape() for _, site in nodes):
        return False
    plain = poutine.block(poutine.trace(guide._bare_model[0]).get_trace)(*args, **kwargs)
    shapes = {name: s["value"].shape for name, s in plain.nodes.items() if s["type"] == "sample"}
    init = guide._init_loc_fn

    def broadcast(site: dict) -> torch.Tensor:
        value, shape = init(site), shapes.get(site["name"])
        return value if shape is None or value.shape == shape else value.expand(shape)

    guide._model = (InitMessenger(broadcast)(guide._bare_model[0]),)  # `AutoGuide.model`
    return True


def is_computed(site: dict) -> bool:
    """Whether a model's sample site holds a value the model computes, not data: a
    ``pyro.deterministic`` site, or one that ``poutine.reparam`` reparametrised (both are
    observed ``Delta`` sites of the computed value)."""
    fn = site["fn"] if site["type"] == "sample" and site["is_observed"] else None
    while isinstance(fn, dist.MaskedDistribution | dist.Independent):
        fn = fn.base_dist
    return bool(site.get("infer", {}).get("_deterministic")) or isinstance(fn, dist.Delta)


@contextlib.contextmanager
def same_global_rng():
    """Pyro's global random state (torch, numpy, random) set back after the block: for code
    that draws from it without its draws mattering (Pyro's `Predictive` running a model at
    given latent values), which must not move the caller's state."""
    state = pyro.util.get_rng_state()
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)


def keeps_global_rng(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run with Pyro's global random state (torch, numpy, random) seeded by its own
    ``seed`` argument (`pyro.set_rng_seed`, so a fit repeats), then set back to the caller's:
    a fit in a loop must not reseed the caller's draws (``np.random.normal`` in a simulation
    study would repeat its data set after every fit)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def seeded(*args: Any, **kwargs: Any) -> Any:
        try:
            seed = signature.bind(*args, **kwargs).arguments.get("seed")
        except TypeError:  # the call does not bind: `fn` raises its own error
            return fn(*args, **kwargs)
        with same_global_rng():
            pyro.set_rng_seed(signature.parameters["seed"].default if seed is None else seed)
            return fn(*args, **kwargs)

    return seeded


class Constrain(Messenger):
    """Condition each latent site named in `unconstrained` on that value mapped through the
    bijection of the support the model gives the site at this run; ``values``, ``log_dets``
    (elementwise ``log |det J|``) and ``supports`` record them."""

    def __init__(self, unconstrained: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.unconstrained = unconstrained
        self.values: dict[str, torch.Tensor] = {}
        self.log_dets: dict[str, torch.Tensor] = {}
        self.supports: dict[str, Any] = {}

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if name not in self.unconstrained or msg["is_observed"]:
            return
        u = self.unconstrained[name]
        support = msg["fn"].support
        transform = biject_to(support)
        value = transform(u)
        self.values[name], self.supports[name] = value, support
        self.log_dets[name] = transform.log_abs_det_jacobian(u, value)
        msg["value"], msg["is_observed"] = value, True


def replay_constrained(
    model: Callable[..., Any],
    pairs: Iterable[tuple[dict, torch.Tensor]],
    args: tuple,
    kwargs: Mapping[str, Any],
    *,
    num: int | None = None,
    nest: int = 0,
) -> tuple[poutine.Trace, Constrain]:
    """The model's trace with each latent site constrained by `Constrain`, and the messenger.

    Args:
        model: the model (without an autoguide's `InitMessenger`).
        pairs: ``(prototype site, unconstrained value)`` per latent site.
        args, kwargs: the model's arguments.
        num: None for one point, or the number of draws that lead every value and go through
            the model at once under an outermost plate at ``dim = -nest - 1``.
        nest: the model's plate nesting.
    """
    constrain = Constrain({site["name"]: u for site, u in pairs})
    with poutine.block():  # a Pyro plate records its subsample site when built: build it here
        plate = (
            contextlib.nullcontext()
            if num is None
            else pyro.plate("_flowguides_draws", num, dim=-nest - 1)
        )
        with plate:
            trace = poutine.trace(constrain(model)).get_trace(*args, **kwargs)
    return trace, constrain


def trace_at_draws(
    guide: Any, values: Mapping[str, torch.Tensor], args: tuple, kwargs: Mapping[str, Any]
) -> poutine.Trace:
    """The model's trace conditioned on constrained latent `values` ``{site: (S, *shape)}``,
    the `S` draws at once under an outermost plate at ``dim = -guide.max_plate_nesting - 1``
    (each value's batch dimensions right-aligned under the model's plates; Pyro's `Predictive`
    counts a site's event dimensions as batch dimensions there)."""
    nest, shaped = guide.max_plate_nesting, {}
    for name, value in values.items():
        shape = value.shape[1:]
        batch = len(shape) - guide.prototype_trace.nodes[name]["fn"].event_dim
        shaped[name] = value.reshape(value.shape[0], *([1] * (nest - batch)), *shape)
    num = next(iter(values.values())).shape[0]
    with poutine.block(), pyro.plate("_flowguides_draws", num, dim=-nest - 1):
        model = poutine.condition(guide._bare_model[0], data=shaped)
        return poutine.trace(model).get_trace(*args, **kwargs)


def dynamic_sites(model: Callable[..., Any], pairs: list[tuple[dict, torch.Tensor]],
                  args: tuple, kwargs: Mapping[str, Any]) -> tuple[str, ...]:  # fmt: skip
    """The latent sites whose support changes when the other latent values move (compared at
    a few unconstrained offsets from `pairs`); empty at once where no latent support holds a
    tensor (a bound that is a Python number cannot move)."""
    if not any(_bounds(site["fn"].support) for site, _ in pairs):
        return ()
    seen: dict[str, list] = {site["name"]: [] for site, _ in pairs}
    with torch.no_grad():
        for shift in _SHIFTS:
            moved = [(site, u.detach() + shift) for site, u in pairs]
            _, constrain = replay_constrained(model, moved, args, kwargs)
            for name in seen:
                seen[name].append(_bounds(constrain.supports.get(name)))
    return tuple(n for n, b in seen.items() if any(not _same(b[0], x) for x in b[1:]))


def dynamic_forward(guide: Any, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """`AutoContinuous.forward` for a guide with dynamic supports: the latent draw unpacked,
    constrained by `replay_constrained`, each site a ``Delta`` carrying ``-log |det J|``, in its plates."""
    latent = guide.sample_latent(*args, **kwargs)
    plates = guide._create_plates(*args, **kwargs)
    pairs = list(guide._unpack_latent(latent))
    # no plate of its own: a vectorised ELBO's particle plate already gave the draw its
    # leading dimension, laid out as the model's plates need it
    _, constrain = replay_constrained(guide._bare_model[0], pairs, args, kwargs)
    result = {}
    for site, _ in pairs:
        name = site["name"]
        value, ladj = constrain.values[name], constrain.log_dets[name]
        event_dim = site["fn"].event_dim
        log_density = 0.0 if poutine.get_mask() is False else -sum_rightmost(
            ladj, ladj.dim() - value.dim() + event_dim
        )  # fmt: skip
        delta = dist.Delta(value, log_density=log_density, event_dim=event_dim)
        with ExitStack() as stack:
            for frame in guide._cond_indep_stacks[name]:
                stack.enter_context(plates[frame.name])
            result[name] = pyro.sample(name, delta)
    return result


def dynamic_constrain(
    guide: Any, latent: torch.Tensor, args: tuple, kwargs: dict
) -> dict[str, torch.Tensor]:
    """`guide.constrain` for a guide with dynamic supports: packed draws ``(*batch,
    latent_dim)`` constrained by `replay_constrained`, all at once under a plate where the
    model broadcasts, else one at a time (`evaluate_batch` decides, as for the log joint)."""
    model, nest = guide._bare_model[0], guide.max_plate_nesting
    flat = latent.reshape(-1, latent.shape[-1])

    def together() -> dict[str, torch.Tensor]:
        pairs = guide._unpack_latent(flat.reshape(len(flat), *([1] * nest), flat.shape[-1]))
        _, c = replay_constrained(model, pairs, args, kwargs, num=len(flat), nest=nest)
        shapes = {n: guide.prototype_trace.nodes[n]["value"].shape for n in c.values}
        return {n: v.reshape(len(flat), *shapes[n]) for n, v in c.values.items()}

    def one_by_one() -> dict[str, torch.Tensor]:
        each = [replay_constrained(model, guide.split_latent(z), args, kwargs)[1].values
                for z in flat]  # fmt: skip
        return {n: torch.stack([e[n] for e in each]) for n in each[0]}

    out = guide.evaluate_batch(together, one_by_one)
    return {n: v.reshape(*latent.shape[:-1], *v.shape[1:]) for n, v in out.items()}


def _bounds(constraint: Any) -> list[torch.Tensor]:
    """The tensor-valued attributes of a constraint, nested constraints' included."""
    if constraint is None:
        return []
    out: list[torch.Tensor] = []
    for value in vars(constraint).values():
        if isinstance(value, constraints.Constraint):
            out += _bounds(value)
        elif isinstance(value, torch.Tensor):
            out.append(value.detach())
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))
