"""NeuTra HMC (Hoffman et al. 2019): NUTS in the space a fitted flow guide whitens (NumPyro).

The model is reparametrised by NumPyro's own `NeuTraReparam`: NUTS samples the guide's base
noise ``eps ~ N(0, I)`` (the site ``{guide.prefix}_shared_latent``), each latent site is the
flow's image of it, and the potential carries the flow's log-determinant. Where the flow is
close to the posterior, NUTS sees a near-standard normal: one step size fits everywhere, and a
funnel's neck or a banana's bend is gone. The draws stay exact MCMC whatever the flow's
quality; a poor flow only slows mixing.

The same names and parameters as `flowguides.pyro.neutra`, except where the framework
differs: NumPyro runs the chains with its own ``chain_method`` (``"parallel"`` where there are
as many devices as chains, else ``"sequential"``) from one key, where Pyro runs them one after
another seeded ``seed + chain``.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS
from numpyro.infer.reparam import NeuTraReparam

from flowguides.core import NeuTraResult, check_neutra_options

__all__ = ["NeuTraResult", "chains_result", "neutra", "neutra_refusal"]


def neutra_refusal(fit: Any) -> str:
    """Why NumPyro's `NeuTraReparam` cannot run on `fit`'s model ('' where it can): a latent
    site inside ``numpyro.contrib.control_flow.scan``, whose body the scan replays with its
    values set, which the reparametrisation takes for an observation (NumPyro's own
    ``AssertionError``: "NeuTraReparam does not support observe statements")."""
    inside = [name for name, site in fit.guide.prototype_trace.items()
              if site["type"] == "sample" and not site["is_observed"]
              and "_scan_current_index" in site["infer"]]  # fmt: skip
    if not inside:
        return ""
    return (
        f"NumPyro's NeuTraReparam cannot reparametrise latent site {inside[0]!r}, sampled inside "
        "numpyro.contrib.control_flow.scan"
    )


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

    The flow's weights are frozen: `NeuTraReparam` closes over the fit's SVI parameters as
    constants, and NUTS moves only the base noise. Neural-ODE flows are refused: each leapfrog
    step would solve the ODE (and its gradient) once more.

    Args:
        fit: a `PosteriorFit` (also reached as ``fit.neutra(...)``).
        num_warmup, num_samples: NUTS warm-up and kept draws per chain.
        num_chains: chains (see the module docstring for how they run).
        seed: the key of the run (JAX has no global random state).
        progress: show NumPyro's progress bar.
        target_accept_prob: NUTS's target acceptance rate during warm-up (NumPyro's default,
            0.8); raise it (e.g. to 0.9) when the chains report divergences: the step size
            adapts smaller.

    Returns:
        The `NeuTraResult`.

    Raises:
        ValueError: a bad budget; a latent site inside a ``scan`` (`neutra_refusal`).
        SpecError: the flow has a neural-ODE layer.

    References:
        Hoffman, Sountsov, Dillon, Langmore, Tran & Vasudevan (2019), "NeuTra-lizing Bad
        Geometry in Hamiltonian Monte Carlo Using Neural Transport", arXiv:1903.03704.
    """
    check_neutra_options(fit.spec, num_warmup, num_samples, num_chains, target_accept_prob)
    refused = neutra_refusal(fit)
    if refused:
        raise ValueError(f"{refused}; run NUTS on the model itself (infer does so here)")
    t0 = time.perf_counter()
    reparam = NeuTraReparam(fit.guide, fit.params)
    parallel = jax.local_device_count() >= num_chains
    mcmc = MCMC(
        NUTS(
            reparam.reparam(handlers.substitute(fit.model, data=fit.model_params)),
            target_accept_prob=target_accept_prob,
        ),  # fmt: skip
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="parallel" if parallel else "sequential",
        progress_bar=progress,
    )
    mcmc.run(jax.random.key(seed), *fit.args, extra_fields=("diverging",), **fit.kwargs)
    site = f"{fit.guide.prefix}_shared_latent"
    latent = mcmc.get_samples()[site]
    values = jax.jit(reparam.transform_sample)(latent)
    samples = {name: np.asarray(values[name]) for name in fit.latent_shapes}
    by_chain = {k: v.reshape(num_chains, num_samples, *v.shape[1:]) for k, v in samples.items()}
    diverging = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"], bool)
    result = chains_result(by_chain, diverging, site, time.perf_counter() - t0)
    result.samples.update(fit.deterministic(result.samples))  # as `fit.sample` gives them
    return result


def chains_result(
    by_chain: dict[str, np.ndarray], diverging: np.ndarray, site: str, seconds: float
) -> NeuTraResult:
    """The `NeuTraResult` of NUTS chains: `by_chain` holds each site's draws
    ``(num_chains, num_samples, *shape)``, `diverging` the divergences, `site` the sampled
    base-noise site (empty for plain NUTS)."""
    num_chains, num_samples = diverging.shape[0], diverging.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):  # a chain that never moves: NaN,
        ess = {k: np.asarray(effective_sample_size(v)) for k, v in by_chain.items()}
        r_hat = {k: np.asarray(split_gelman_rubin(v)) for k, v in by_chain.items()}
    return NeuTraResult(  # which `chains_trouble` reports (numpy's warning would only confuse)
        samples={k: v.reshape(-1, *v.shape[2:]) for k, v in by_chain.items()},
        diverging=diverging.reshape(num_chains, num_samples),
        ess=ess,
        r_hat=r_hat,
        num_chains=num_chains,
        reparam_site=site,
        timing={"sampling_s": seconds},
    )
