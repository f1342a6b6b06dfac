"""NeuTra HMC (Hoffman et al. 2019): NUTS in the space a fitted flow guide whitens (Pyro).

The model is reparametrised by Pyro's own `NeuTraReparam`: NUTS samples the guide's base
noise ``eps ~ N(0, I)`` (the site ``{first latent site}_shared_latent``), each latent site is
the flow's image of it, and the potential carries the flow's log-determinant. Where the flow
is close to the posterior, NUTS sees a near-standard normal: one step size fits everywhere, and
a funnel's neck or a banana's bend is gone. The draws stay exact MCMC whatever the flow's
quality; a poor flow only slows mixing.

The same names and parameters as `flowguides.numpyro.neutra`, except where the framework
differs: Pyro runs the chains one after another in this process (``seed + chain`` seeds
chain ``chain``), NumPyro runs them with its own ``chain_method``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch.distributions import ComposeTransform

from flowguides.core import NeuTraResult, check_neutra_options
from flowguides.pyro._support import keeps_global_rng

__all__ = ["NeuTraResult", "chains_result", "neutra"]


class _GuideIn:
    """`guide` for `NeuTraReparam` with its flow evaluated in `dtype`: a copy of the trained
    flow cast to the dtype of the model's log density. A float32 guide of a model whose
    likelihood is float64 (float32 latents from ``Normal(0., 10.)``, float64 data) would
    otherwise meet NUTS's float64 positions; the cast widens the weights exactly, so the map
    is the trained one."""

    def __init__(self, guide: Any, dtype: torch.dtype) -> None:
        self._guide = guide
        self.flow = (
            guide.flow
            if guide.flow.affine.loc.dtype == dtype
            else copy.deepcopy(guide.flow).to(dtype)
        )

    def get_transform(self) -> ComposeTransform:
        return ComposeTransform(self.flow.transforms)

    def get_base_dist(self) -> pyro.distributions.Distribution:
        zeros = self.flow.affine.loc.new_zeros(self._guide.latent_dim)
        return pyro.distributions.Normal(zeros, 1.0).to_event(1)

    def __getattr__(self, name: str) -> Any:  # prototype_trace, plates, _unpack_latent
        return getattr(self._guide, name)


def _log_density_dtype(fit: Any) -> torch.dtype:
    """The floating dtype the model's log density comes out in: the promotion of the flow's
    dtype and every floating sample value (latent and observed) of one run of the model."""
    with torch.no_grad(), poutine.block():
        model = poutine.substitute(fit.model, data=fit.model_params)
        trace = poutine.trace(model).get_trace(*fit.args, **fit.kwargs)
    dtype = fit.guide.flow.affine.loc.dtype
    for site in trace.nodes.values():
        value = site.get("value")
        if site["type"] == "sample" and torch.is_tensor(value) and value.is_floating_point():
            dtype = torch.promote_types(dtype, value.dtype)
    return dtype


@keeps_global_rng
def neutra(
    fit: Any,
    num_warmup: int = 500,
    num_samples: int = 1000,
    num_chains: int = 1,
    seed: int = 0,
    progress: bool = True,
    target_accept_prob: float = 0.8,
) -> NeuTraResult:
    """NUTS on `fit`'s model reparametrised by its trained flow (NeuTra HMC).

    The flow's weights are frozen (``requires_grad`` off while sampling, restored after):
    NUTS moves only the base noise. Neural-ODE flows are refused: each leapfrog step would
    solve the ODE (and its gradient) once more.

    Args:
        fit: a `PosteriorFit` (also reached as ``fit.neutra(...)``).
        num_warmup, num_samples: NUTS warm-up and kept draws per chain.
        num_chains: chains, run one after another; chain ``c`` is seeded ``seed + c``.
        seed: seeds Pyro (the global torch RNG) for each chain.
        progress: show Pyro's progress bar.
        target_accept_prob: NUTS's target acceptance rate during warm-up (Pyro's default,
            0.8); raise it (e.g. to 0.9) when the chains report divergences: the step size
            adapts smaller.

    Returns:
        The `NeuTraResult`.

    Raises:
        ValueError: a bad budget.
        SpecError: the flow has a neural-ODE layer.

    References:
        Hoffman, Sountsov, Dillon, Langmore, Tran & Vasudevan (2019), "NeuTra-lizing Bad
        Geometry in Hamiltonian Monte Carlo Using Neural Transport", arXiv:1903.03704.
    """
    check_neutra_options(fit.spec, num_warmup, num_samples, num_chains, target_accept_prob)
    guide = _GuideIn(fit.guide, _log_density_dtype(fit))
    trained = [p for p in fit.guide.parameters() if p.requires_grad]
    chains: list[dict[str, torch.Tensor]] = []
    diverging = np.zeros((num_chains, num_samples), bool)
    t0 = time.perf_counter()
    try:
        for p in trained:
            p.requires_grad_(False)
        for chain in range(num_chains):
            pyro.set_rng_seed(seed + chain)
            reparam = NeuTraReparam(fit.guide)
            reparam.guide = guide  # after its AutoContinuous check
            kernel = NUTS(
                reparam.reparam(poutine.substitute(fit.model, data=fit.model_params)),
                max_plate_nesting=fit.guide.max_plate_nesting,
                target_accept_prob=target_accept_prob,
            )
            mcmc = MCMC(kernel, num_samples, warmup_steps=num_warmup, disable_progbar=not progress)
            mcmc.run(*fit.args, **fit.kwargs)
            draws = mcmc.get_samples()
            site = next(name for name in draws if name.endswith("_shared_latent"))
            with torch.no_grad():  # `reparam.transform_sample`, batched as `fit.sample` is
                values = fit.guide.constrain(
                    guide.flow.forward_and_log_det(draws[site])[0], fit.args, fit.kwargs
                )
            chains.append({name: values[name] for name in fit.latent_shapes})
            diverging[chain, mcmc.diagnostics()["divergences"]["chain 0"]] = True
    finally:
        for p in trained:
            p.requires_grad_(True)
    by_chain = {name: torch.stack([c[name] for c in chains]) for name in chains[0]}
    result = chains_result(by_chain, diverging, site, time.perf_counter() - t0)
    result.samples.update(fit.deterministic(result.samples))  # as `fit.sample` gives them
    return result


def chains_result(
    by_chain: dict[str, torch.Tensor], diverging: np.ndarray, site: str, seconds: float
) -> NeuTraResult:
    """The `NeuTraResult` of NUTS chains: `by_chain` holds each site's draws
    ``(num_chains, num_samples, *shape)``, `diverging` the divergences, `site` the sampled
    base-noise site (empty for plain NUTS)."""
    return NeuTraResult(
        samples={k: v.reshape(-1, *v.shape[2:]).cpu().numpy() for k, v in by_chain.items()},
        diverging=diverging,
        ess={k: effective_sample_size(v).cpu().numpy() for k, v in by_chain.items()},
        r_hat={k: split_gelman_rubin(v).cpu().numpy() for k, v in by_chain.items()},
        num_chains=diverging.shape[0],
        reparam_site=site,
        timing={"sampling_s": seconds},
    )
