"""Per-draw log weights of any Pyro or NumPyro guide, and the benchmark's scores.

:func:`pyro_log_densities` and :func:`numpyro_log_densities` draw from a trained guide
(vectorised over particles, in chunks) and replay the model on each draw, returning the draws of
every latent and ``deterministic`` site (constrained), ``log p(x, z)`` and ``log q(z)``; their
difference is the importance log weight. Both work for any guide, flow or not, since they read
the log densities off the traces exactly as the PPLs' own ``Trace_ELBO`` does.
:func:`score` turns log weights and draws into the reported numbers: the ELBO, the PSIS k-hat
(ArviZ's PSIS via ``flowguides.diagnostics.psis_khat``), the standardised mean error ``max_i |E_q - E_ref| / sd_ref`` and the range
of ``sd_q / sd_ref``. :func:`timed_steps` times a step function: compile time (first step minus
a steady step) and steady steps per second.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "Reference",
    "moments_of",
    "numpyro_log_densities",
    "pyro_log_densities",
    "score",
    "timed_steps",
]

Reference = dict[str, tuple[np.ndarray, np.ndarray]]
"""``site name -> (mean, sd)`` of the exact or reference posterior, each of the site's shape."""

Draws = dict[str, np.ndarray]


def moments_of(draws: Mapping[str, np.ndarray]) -> Reference:
    """Mean and sd over the first axis of each array of draws."""
    return {k: (np.mean(v, 0), np.std(v, 0)) for k, v in draws.items()}


def _concat(parts: list[Draws]) -> Draws:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def pyro_log_densities(
    model: Callable[[], None], guide: Callable[[], Any], num_samples: int, *, chunk: int = 1000,
    seed: int = 0,
) -> tuple[Draws, np.ndarray, np.ndarray]:  # fmt: skip
    """Draws, ``log p`` and ``log q`` of a Pyro guide, vectorised in a particle plate.

    The model must have no plates of its own (the benchmark models are plate-free and
    batch-polymorphic), so the particle plate sits at ``dim=-1``, as ``Trace_ELBO`` with
    ``vectorize_particles=True`` puts it.

    Args:
        model: a Pyro model without arguments.
        guide: a trained guide for it.
        num_samples: how many draws.
        chunk: draws per vectorised pass.
        seed: Pyro's RNG seed.

    Returns:
        ``(draws, log_p, log_q)`` with ``draws[name]`` of shape ``(num_samples, *site_shape)``.
    """
    import pyro
    import torch
    from pyro import poutine

    pyro.set_rng_seed(seed)
    parts, lps, lqs = [], [], []
    done = 0
    with torch.no_grad():
        while done < num_samples:
            k = min(chunk, num_samples - done)
            with pyro.plate("_num_draws", k, dim=-1):
                guide_tr = poutine.trace(guide).get_trace()
                model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace()
            lqs.append(_pyro_per_draw(guide_tr, k))
            lps.append(_pyro_per_draw(model_tr, k))
            parts.append(
                {
                    name: site["value"].detach().cpu().numpy().reshape(k, *site["value"].shape[1:])
                    for name, site in model_tr.nodes.items()
                    if site["type"] == "sample"
                    and (not site["is_observed"] or site["infer"].get("_deterministic"))
                }
            )
            done += k
    return _concat(parts), np.concatenate(lps), np.concatenate(lqs)


def _pyro_per_draw(trace: Any, k: int) -> np.ndarray:
    import torch

    trace.compute_log_prob()
    total = torch.zeros(k, dtype=torch.float64)
    for site in trace.nodes.values():
        if site["type"] == "sample":
            lp = site["log_prob"]
            total = total + torch.broadcast_to(lp.to(torch.float64).reshape(-1), (k,))
    return total.cpu().numpy()


def numpyro_log_densities(
    model: Callable[[], None], guide: Callable[[], Any], params: Mapping[str, Any],
    num_samples: int, *, chunk: int = 1000, seed: int = 0,
) -> tuple[Draws, np.ndarray, np.ndarray]:  # fmt: skip
    """Draws, ``log p`` and ``log q`` of a NumPyro guide, ``vmap``-ed over draws in chunks.

    Args:
        model: a NumPyro model without arguments.
        guide: a trained guide for it.
        params: the guide's parameters (``svi.get_params(state)``).
        num_samples: how many draws.
        chunk: draws per vectorised pass (one compilation for all full chunks).
        seed: the PRNG seed.

    Returns:
        ``(draws, log_p, log_q)`` with ``draws[name]`` of shape ``(num_samples, *site_shape)``.
    """
    import jax
    from numpyro import handlers
    from numpyro.infer.util import log_density

    def one(key: Any) -> tuple[dict, Any, Any]:
        log_q, guide_tr = log_density(handlers.seed(guide, key), (), {}, params)
        log_p, model_tr = log_density(handlers.replay(model, trace=guide_tr), (), {}, params)
        values = {
            name: site["value"]
            for name, site in model_tr.items()
            if (site["type"] == "sample" and not site["is_observed"])
            or site["type"] == "deterministic"
        }
        return values, log_p, log_q

    batched = jax.jit(jax.vmap(one))
    keys = jax.random.split(jax.random.PRNGKey(seed), num_samples)
    parts, lps, lqs = [], [], []
    for start in range(0, num_samples, chunk):
        values, lp, lq = batched(keys[start : start + chunk])
        parts.append({k: np.asarray(v) for k, v in values.items()})
        lps.append(np.asarray(lp))
        lqs.append(np.asarray(lq))
    return _concat(parts), np.concatenate(lps), np.concatenate(lqs)


def _psis_khat(log_weights: np.ndarray) -> float:
    from flowguides.diagnostics import psis_khat  # ArviZ's PSIS, on the 0.x and 1.x lines

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arviz warns when k-hat is large; we report it
        _, khat = psis_khat(log_weights)
    return float(khat)


def score(
    log_p: np.ndarray | None,
    log_q: np.ndarray | None,
    draws: Mapping[str, np.ndarray],
    reference: Reference | None,
    log_z: float | None = None,
) -> dict[str, float | None]:
    """The reported numbers for one fit.

    Args:
        log_p: ``log p(x, z)`` per draw, or None (a sampler such as NUTS has no ``log q``).
        log_q: ``log q(z)`` per draw, or None.
        draws: ``name -> (S, *shape)`` draws; names missing from ``reference`` are ignored.
        reference: exact or reference ``(mean, sd)`` per site, or None.
        log_z: the log normalising constant where known (adds ``elbo_gap = log_z - elbo``).

    Returns:
        ``elbo``, ``khat``, ``elbo_gap``, ``nonfinite_frac``, ``mean_err``, ``sd_ratio_min``,
        ``sd_ratio_max`` (None where not applicable).
    """
    out: dict[str, float | None] = dict.fromkeys(
        ("elbo", "khat", "elbo_gap", "nonfinite_frac", "mean_err", "sd_ratio_min", "sd_ratio_max")
    )
    if log_p is not None and log_q is not None:
        lw = np.asarray(log_p, dtype=float) - np.asarray(log_q, dtype=float)
        finite = np.isfinite(lw)
        out["nonfinite_frac"] = float(1.0 - finite.mean())
        if finite.all():
            out["elbo"] = float(lw.mean())
            out["khat"] = _psis_khat(lw)
            if log_z is not None:
                out["elbo_gap"] = float(log_z - out["elbo"])
    if reference:
        errs, ratios = [], []
        for name, (ref_mean, ref_sd) in reference.items():
            if name not in draws:
                raise KeyError(f"draws: reference site {name!r} missing; got {sorted(draws)}")
            x = np.asarray(draws[name], dtype=float).reshape(len(draws[name]), -1)
            ok = np.isfinite(x).all(1)
            x = x[ok]
            ref_mean, ref_sd = np.ravel(ref_mean), np.ravel(ref_sd)
            errs.append(
                np.abs(x.mean(0) - ref_mean) / ref_sd if len(x) else np.full_like(ref_sd, np.nan)
            )
            ratios.append(x.std(0) / ref_sd if len(x) else np.full_like(ref_sd, np.nan))
        err, ratio = np.concatenate(errs), np.concatenate(ratios)
        out["mean_err"] = _finite_or_none(np.max(err))
        out["sd_ratio_min"] = _finite_or_none(np.min(ratio))
        out["sd_ratio_max"] = _finite_or_none(np.max(ratio))
    return out


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def timed_steps(
    step: Callable[[int], Any],
    num_steps: int,
    block: Callable[[Any], Any] = lambda out: out,
    block_size: int = 100,
) -> dict[str, float]:
    """Run ``step(i)`` for ``i < num_steps`` and time it.

    Steady speed is that of the fastest block of `block_size` consecutive steps after the
    first two (the best-of-repeats defence of ``timeit`` against a shared machine's noise; the
    NumPyro ``fit_posterior`` rows report their fastest 100-step chunk the same way).

    Args:
        step: one optimisation step; its result is passed to ``block``.
        num_steps: total steps (at least 3).
        block: waits for the result (``jax.block_until_ready``) before the clock is read.
        block_size: steps per timed block (fewer when fewer steps remain).

    Returns:
        ``wall_s`` (all steps), ``first_step_s``, ``steady_step_s`` (per step, in the fastest
        block), ``mean_step_s`` (over steps 2..n), ``compile_s`` (first step minus a steady
        step) and ``steps_per_s`` (``1 / steady_step_s``).
    """
    t0 = time.perf_counter()
    block(step(0))
    t1 = time.perf_counter()
    block(step(1))
    t2 = time.perf_counter()
    per_step = []
    for lo in range(2, num_steps, block_size):
        hi = min(lo + block_size, num_steps)
        tb = time.perf_counter()
        out = None
        for i in range(lo, hi):
            out = step(i)
        block(out)
        per_step.append((time.perf_counter() - tb) / (hi - lo))
    t3 = time.perf_counter()
    steady = min(per_step) if per_step else t2 - t1
    return {
        "wall_s": t3 - t0,
        "first_step_s": t1 - t0,
        "steady_step_s": steady,
        "mean_step_s": (t3 - t2) / max(num_steps - 2, 1),
        "compile_s": max(t1 - t0 - steady, 0.0),
        "steps_per_s": 1.0 / steady,
    }
