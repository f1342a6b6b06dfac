"""Posteriors that only trained flow layers reach, written as users write them, in both backends.

Four targets whose normalising constant is known in closed form, so ``KL(q || p) = log Z -
ELBO`` is measured directly: a banana (twisted Gaussian), two skewed Gamma-Poisson rates (on the
log scale), a 0.3/0.7 mixture of two well-separated Gaussians, and Neal's 10-D funnel. A
guide's own start (the Laplace whitening or a plain Gaussian, with every layer the identity) is
a Gaussian, and no Gaussian is close to any of them.

`fit` runs `fit_posterior` on one of them; ``frozen="layers"`` cuts the gradient of the flow
layers' weights (`frozen_weights`), so they stay the identity and only the affine trains: the
layer-free fit. `start_of` gives the guide before its first step, and `metrics` the KL of a
fit (and, for the mixture, the mass in the minor mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy.special import gammaln

__all__ = ["LOG_EVIDENCE", "POSTERIORS", "Setting", "fit", "frozen_weights", "metrics", "start_of"]

# -- the posteriors' constants --------------------------------------------------------------
BANANA_TWIST, BANANA_SD = 1.0, 0.5  # x2 | x1 ~ N(twist (x1^2 - 1), sd)
RATE_PRIOR = (1.0, 1.0)  # Gamma(shape, rate) prior on each group's Poisson rate
COUNTS = np.array([0.0, 1.0, 0.0, 0.0])  # few counts: a skewed posterior on the log scale
GROUP = np.array([0, 1, 1, 1])  # the group of each count
MIXTURE_WEIGHTS = (0.3, 0.7)
MIXTURE_LOCS = np.array([[-1.0, -1.0], [1.0, 1.0]])  # modes 5.7 sd apart along (1, 1)
MIXTURE_SD = 0.5
FUNNEL_DIM = 10  # v ~ N(0, 3), x_i ~ N(0, exp(v / 2)), i < 9

POSTERIORS = ("banana", "gamma_poisson", "mixture", "funnel")


def gamma_poisson_log_evidence() -> float:
    """``log p(counts)``: per group a negative-binomial marginal of the Gamma prior."""
    a, b = RATE_PRIOR
    total = -float(gammaln(COUNTS + 1).sum())
    for g in np.unique(GROUP):
        y = COUNTS[GROUP == g]
        s, n = y.sum(), len(y)
        total += a * math.log(b) - gammaln(a) + gammaln(a + s) - (a + s) * math.log(b + n)
    return total


LOG_EVIDENCE = {  # log Z; the models without observations are normalised densities
    "banana": 0.0,
    "gamma_poisson": gamma_poisson_log_evidence(),
    "mixture": 0.0,
    "funnel": 0.0,
}


# -- the models, in each backend ------------------------------------------------------------
@functools.cache
def pyro_models() -> dict[str, tuple[Callable[..., None], tuple, dict]]:
    """``{posterior: (model, args, options)}`` in Pyro, float64; `options` are the
    `fit_posterior` options the model needs. Built once, so compiles cached on the model
    function are reused."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints
    from pyro.infer.autoguide import init_to_value

    f64 = torch.float64
    zero = torch.tensor(0.0, dtype=f64)

    def banana() -> None:
        x1 = pyro.sample("x1", dist.Normal(zero, 1.0))
        pyro.sample("x2", dist.Normal(BANANA_TWIST * (x1**2 - 1.0), BANANA_SD))

    def gamma_poisson(counts: torch.Tensor, group: torch.Tensor) -> None:
        a, b = (torch.tensor(v, dtype=f64) for v in RATE_PRIOR)
        with pyro.plate("groups", 2):
            rate = pyro.sample("rate", dist.Gamma(a, b))
        with pyro.plate("data", len(counts)):
            pyro.sample("obs", dist.Poisson(rate[..., group]), obs=counts)

    def mixture() -> None:
        # torch cannot unconstrain a MixtureSameFamily's support: the density as a factor
        z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (2,)))
        weights = torch.tensor(MIXTURE_WEIGHTS, dtype=f64)
        components = dist.Normal(torch.tensor(MIXTURE_LOCS, dtype=f64), MIXTURE_SD).to_event(1)
        mixing = dist.MixtureSameFamily(dist.Categorical(weights), components)
        pyro.factor("mixture", mixing.log_prob(z))

    def funnel() -> None:
        v = pyro.sample("v", dist.Normal(zero, 3.0))
        with pyro.plate("x_plate", FUNNEL_DIM - 1):
            pyro.sample("x", dist.Normal(zero, torch.exp(v / 2)))

    data = (torch.tensor(COUNTS, dtype=f64), torch.tensor(GROUP))
    between = {"init_loc_fn": init_to_value(values={"z": torch.zeros(2, dtype=f64)})}
    return {
        "banana": (banana, (), {}),
        "gamma_poisson": (gamma_poisson, data, {}),
        "mixture": (mixture, (), between),
        "funnel": (funnel, (), {}),
    }


@functools.cache
def numpyro_models() -> dict[str, tuple[Callable[..., None], tuple, dict]]:
    """``{posterior: (model, args, options)}`` in NumPyro (float64 under the suite's
    JAX_ENABLE_X64); `options` are the `fit_posterior` options the model needs."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer.initialization import init_to_value

    def banana() -> None:
        x1 = numpyro.sample("x1", dist.Normal(0.0, 1.0))
        numpyro.sample("x2", dist.Normal(BANANA_TWIST * (x1**2 - 1.0), BANANA_SD))

    def gamma_poisson(counts: jnp.ndarray, group: jnp.ndarray) -> None:
        with numpyro.plate("groups", 2):
            rate = numpyro.sample("rate", dist.Gamma(*RATE_PRIOR))
        with numpyro.plate("data", counts.shape[0]):
            numpyro.sample("obs", dist.Poisson(rate[..., group]), obs=counts)

    def mixture() -> None:
        components = dist.Normal(jnp.asarray(MIXTURE_LOCS), MIXTURE_SD).to_event(1)
        mixing = dist.Categorical(probs=jnp.asarray(MIXTURE_WEIGHTS))
        numpyro.sample("z", dist.MixtureSameFamily(mixing, components))

    def funnel() -> None:
        v = numpyro.sample("v", dist.Normal(0.0, 3.0))
        with numpyro.plate("x_plate", FUNNEL_DIM - 1):
            numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))

    data = (jnp.asarray(COUNTS), jnp.asarray(GROUP))
    between = {"init_loc_fn": init_to_value(values={"z": jnp.zeros(2)})}
    return {
        "banana": (banana, (), {}),
        "gamma_poisson": (gamma_poisson, data, {}),
        "mixture": (mixture, (), between),
        "funnel": (funnel, (), {}),
    }


# -- freezing the flow's weights at their start ---------------------------------------------
@contextlib.contextmanager
def frozen_weights(backend: str, which: str = "layers") -> Iterator[None]:
    """Inside, every flow built has the gradient of its layers' weights (``which="layers"``) or
    of all its weights (``"all"``) cut, so Adam never moves them from their start.

    Pyro: every `Flow` gets hooks that zero those gradients. NumPyro: `FlowTransform` sees those
    weights through `lax.stop_gradient` (a compile made inside keeps the cut, see `fit`).
    """
    if backend == "pyro":
        import torch

        from flowguides.pyro.build import Flow

        init = Flow.__init__

        def init_frozen(self: Flow, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            for p in (self.layers if which == "layers" else self).parameters():
                p.register_hook(torch.zeros_like)

        Flow.__init__ = init_frozen
        try:
            yield
        finally:
            Flow.__init__ = init
    else:
        from jax import lax

        from flowguides.numpyro.build import FlowTransform

        init = FlowTransform.__init__

        def init_frozen(self: FlowTransform, params: dict, *args: Any, **kwargs: Any) -> None:
            cut = {
                name: lax.stop_gradient(v) if which == "all" or name.startswith("layers.") else v
                for name, v in params.items()
            }
            init(self, cut, *args, **kwargs)

        FlowTransform.__init__ = init_frozen
        try:
            yield
        finally:
            FlowTransform.__init__ = init


# -- fits and their KL ----------------------------------------------------------------------
class Setting:
    """How one family is fitted to one posterior: the spec, the steps, `fit_posterior` options."""

    def __init__(self, spec: Any, num_steps: int, **options: Any) -> None:
        self.spec, self.num_steps, self.options = spec, num_steps, options

    def __repr__(self) -> str:
        layer = self.spec.layers[0]
        return f"Setting({layer.type}, num_steps={self.num_steps}, {self.options})"


def fit(backend: str, posterior: str, setting: Setting, frozen: str | None = None) -> Any:
    """`fit_posterior` on `posterior`; with `frozen` (``"layers"`` or ``"all"``, which also
    takes a single step), inside `frozen_weights`.

    NumPyro caches the compiled training step on the model and the spec: a frozen fit must
    use a spec that no unfrozen fit uses (or the two would share one compile).
    """
    if backend == "pyro":
        from flowguides.pyro import fit_posterior

        model, args, needs = pyro_models()[posterior]
    else:
        from flowguides.numpyro import fit_posterior

        model, args, needs = numpyro_models()[posterior]
    options = {"num_steps": setting.num_steps, "progress": False, **needs, **setting.options}
    if frozen is None:
        return fit_posterior(model, setting.spec, *args, **options)
    if frozen == "all":
        options["num_steps"] = 1
    with frozen_weights(backend, frozen):
        return fit_posterior(model, setting.spec, *args, **options)


def start_of(backend: str, posterior: str, setting: Setting, layer_free: Any) -> Any:
    """The guide at its start (every weight as initialised, no step taken).

    NumPyro: `layer_free` (a fit of the same setting) at its guide's initial weights. Pyro,
    whose guide keeps no initial weights: a one-step fit with every flow weight frozen.
    """
    if backend == "pyro":
        return fit(backend, posterior, setting, frozen="all")
    guide = layer_free.guide
    return dataclasses.replace(
        layer_free, params=guide.set_weights(guide.get_weights()).initial_params()
    )


def metrics(posterior: str, fitted: Any, num_draws: int = 4000) -> dict[str, float]:
    """``{"kl", "kl_se", "minor_mass"}`` of a fit over `num_draws` draws (fixed seed).

    ``kl = log Z - mean(log p - log q)`` with its Monte Carlo standard error;
    ``minor_mass``: the share of draws on the 0.3-weight side of the mixture (NaN elsewhere).
    """
    draws, log_w = fitted.importance_sample(num_draws, seed=1)
    kl = LOG_EVIDENCE[posterior] - float(np.mean(log_w))
    minor = float("nan")
    if posterior == "mixture":
        minor = float(np.mean(np.asarray(draws["z"]).sum(-1) < 0))
    return {"kl": kl, "kl_se": float(np.std(log_w) / np.sqrt(num_draws)), "minor_mass": minor}
