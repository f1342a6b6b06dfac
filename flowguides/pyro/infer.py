"""One call from a Pyro model to draws worth trusting: fit a flow guide, diagnose it, escalate.

`infer` fits the guide (`fit_posterior`), diagnoses it by the Pareto k-hat of its importance
weights (Yao et al. 2018) and returns draws by the cheapest route the diagnosis trusts: the
guide's own draws, their PSIS resample, or NUTS through the flow (NeuTra, Hoffman et al. 2019);
a neural-ODE flow, which NeuTra refuses, falls back to plain NUTS on the model. The routing is
`flowguides.core.route_fit`, written once for both backends.

The same names and parameters as `flowguides.numpyro.infer`, except where the framework
differs: Pyro's plain NUTS runs the chains one after another (``seed + chain`` seeds chain
``chain``), as `neutra` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS

from flowguides.core import InferResult, NeuTraResult, check_infer_options, route_fit
from flowguides.pyro._support import keeps_global_rng
from flowguides.pyro.neutra import chains_result
from flowguides.pyro.posterior import PosteriorFit, fit_posterior
from flowguides.spec import FlowSpec

__all__ = ["InferResult", "infer"]


def infer(
    model: Callable[..., Any],
    spec: FlowSpec | Mapping[str, Any],
    *args: Any,
    num_steps: int = 2000,
    num_draws: int = 4000,
    neutra: Mapping[str, int] | None = None,
    seed: int = 0,
    progress: bool = True,
    fit_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> InferResult:
    """Fit a flow guide to ``model(*args, **kwargs)`` and return draws by the cheapest route
    its PSIS k-hat trusts.

    The routes, by the k-hat of `num_draws` guide draws (see `flowguides.core.choose_route`):

    - ``"guide"``: k-hat below `KHAT_GUIDE` (0.5) and importance weights whose coefficient
      of variation is at most `GUIDE_MAX_WEIGHT_CV` (0.1: weighting would move no mean by
      more than a tenth of an sd), or constant weights: the guide's own draws.
    - ``"psis"``: otherwise k-hat below `KHAT_PSIS` (0.7; ``1 - 1/log10(num_draws)`` where
      lower): the same draws resampled with replacement by their Pareto-smoothed importance
      weights. Resampled draws hold duplicates; their effective size is the PSIS ESS,
      ``result.diagnosis.ess``, not `num_draws`.
    - ``"neutra"``: k-hat at or above that, or not finite: NUTS on the model reparametrised
      by the trained flow (``fit.neutra``), ``num_chains * num_samples`` draws.
    - ``"nuts"``: as ``"neutra"``, for a flow with a neural-ODE layer, which NeuTra refuses
      (an ODE solve per leapfrog step): plain ``MCMC(NUTS(model))``, the reason saying so.

    Args:
        model: a Pyro model with continuous latent sites.
        spec: the flow spec (or its dict form).
        *args, **kwargs: passed to the model, as by `fit_posterior` (whose own parameter
            names, such as ``learning_rate``, reach it rather than the model).
        num_steps: optimisation steps of the fit.
        num_draws: the guide's draws to diagnose (at least 25), returned by the routes
            ``"guide"`` and ``"psis"``.
        neutra: NUTS's budget, for routes ``"neutra"`` and ``"nuts"``: some of
            ``num_warmup``, ``num_samples``, ``num_chains``, ``target_accept_prob``
            (`INFER_NUTS_BUDGET` otherwise: 1,000 + 2,000, one chain, 0.95).
        seed: seeds the fit, the guide's draws, the resampling and NUTS.
        progress: show the fit's and NUTS's progress bars and print the route chosen (stderr).
        fit_options: more options of `fit_posterior` (``learning_rate``, ``init_scale``, ...).

    Returns:
        The `InferResult`: ``route``, ``diagnosis``, ``draws``, ``fit``, ``mcmc``.

    Raises:
        ValueError: a bad `num_draws` or NUTS budget; an unknown option in `neutra` or
            `fit_options` (the error names it), or one that is `infer`'s own argument;
            anything `fit_posterior` raises.
        TypeError: `neutra` or `fit_options` is not a dict.

    References:
        Yao, Vehtari, Simpson & Gelman (2018), "Yes, but Did It Work?: Evaluating Variational
        Inference", ICML. Hoffman, Sountsov, Dillon, Langmore, Tran & Vasudevan (2019),
        "NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport",
        arXiv:1903.03704.
    """
    budget, options = check_infer_options(num_draws, neutra, fit_options, kwargs, fit_posterior)
    fit = fit_posterior(
        model, spec, *args, num_steps=num_steps, seed=seed, progress=progress, **options, **kwargs
    )
    return route_fit(
        fit, num_draws=num_draws, budget=budget, seed=seed, progress=progress, nuts=_nuts
    )


@keeps_global_rng
def _nuts(
    fit: PosteriorFit,
    num_warmup: int,
    num_samples: int,
    num_chains: int,
    seed: int,
    progress: bool,
    target_accept_prob: float = 0.8,
) -> NeuTraResult:
    """Plain NUTS on `fit`'s model (the route ``"nuts"``), as a `NeuTraResult` with an empty
    ``reparam_site``; the model's own ``pyro.param`` values are the fitted ones."""
    chains: list[dict[str, torch.Tensor]] = []
    diverging = np.zeros((num_chains, num_samples), bool)
    t0 = time.perf_counter()
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + chain)
        kernel = NUTS(
            poutine.substitute(fit.model, data=fit.model_params),
            max_plate_nesting=fit.guide.max_plate_nesting,
            target_accept_prob=target_accept_prob,
        )
        mcmc = MCMC(kernel, num_samples, warmup_steps=num_warmup, disable_progbar=not progress)
        mcmc.run(*fit.args, **fit.kwargs)
        draws = mcmc.get_samples()
        chains.append({name: draws[name].detach() for name in fit.latent_shapes})
        diverging[chain, mcmc.diagnostics()["divergences"]["chain 0"]] = True
    by_chain = {name: torch.stack([c[name] for c in chains]) for name in chains[0]}
    return chains_result(by_chain, diverging, "", time.perf_counter() - t0)
