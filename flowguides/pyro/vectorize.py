"""The log joint at a batch of draws, and models that do not broadcast over such a batch.

Evaluating many draws at once (vectorised ELBO particles, a batch of draws for the start
search or the diagnostics) puts the model under one extra outermost plate, so each latent
value carries extra leading batch dimensions. A model written for one draw (``X @ b``,
``b[0] + b[1] * x``, Python loops over data) then fails, or, worse, broadcasts into values of
the wrong shape. `AutoFlowGuide` compares a few draws evaluated together against the same
draws one at a time, and where they disagree it evaluates draws one at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to

__all__ = ["HOW_TO_VECTORIZE", "VectorizationWarning", "describe", "log_joint_at", "mismatch"]

HOW_TO_VECTORIZE = (
    "to vectorise it, write it so that each latent value may carry extra leading batch "
    "dimensions: data-sized terms inside pyro.plate, indexing and reductions from the right "
    "(b[..., 0] rather than b[0]), and (X * b).sum(-1) rather than X @ b"
)


class VectorizationWarning(UserWarning):
    """The model does not broadcast over a batch of draws; draws run one at a time (slower)."""


def describe(exc: BaseException) -> str:
    """The first line of an exception, with its type, shortened for a message."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def mismatch(together: torch.Tensor, one_by_one: torch.Tensor) -> str | None:
    """Why the log joint of draws evaluated together differs from one at a time, or None.

    The tolerance is the square root of the dtype's epsilon, relative to the largest value:
    summation order differs between the two paths, wrong broadcasting changes values wholesale.
    """
    if together.shape != one_by_one.shape:
        return (
            f"evaluated together, {one_by_one.shape[0]} draws gave log densities of shape "
            f"{tuple(together.shape)}, expected {tuple(one_by_one.shape)}"
        )
    tol = torch.finfo(one_by_one.dtype).eps ** 0.5
    finite = one_by_one[torch.isfinite(one_by_one)]
    size = float(finite.abs().max()) if finite.numel() else 1.0
    close = torch.isclose(together, one_by_one, rtol=tol, atol=tol * max(size, 1.0), equal_nan=True)
    if bool(close.all()):
        return None
    return (
        f"evaluated together, {one_by_one.shape[0]} draws gave log densities "
        f"{together.tolist()}, one at a time {one_by_one.tolist()}"
    )


def log_joint_at(
    model: Callable[..., Any],
    pairs: Iterable[tuple[dict, torch.Tensor]],
    args: tuple,
    kwargs: Mapping[str, Any],
    *,
    num: int | None = None,
    nest: int = 0,
) -> torch.Tensor:
    """``log p(data, z) + log|det J|`` at unconstrained values, by conditioning `model`.

    Args:
        model: the model (without an autoguide's `InitMessenger`).
        pairs: ``(prototype site, unconstrained value)`` per latent site.
        args, kwargs: the model's arguments.
        num: None for one point (no extra plate, a scalar), or the number of draws, which
            lead every value and go through the model at once under an outermost plate at
            ``dim = -nest - 1`` (one value per draw, ``(num,)``).
        nest: the model's plate nesting.
    """
    values, total = {}, 0.0
    for site, u in pairs:
        transform = biject_to(site["fn"].support)
        x = transform(u)
        values[site["name"]] = x
        total = total + _per_draw(transform.log_abs_det_jacobian(u, x), num, nest)
    plate = (
        contextlib.nullcontext()
        if num is None
        else pyro.plate("_flowguides_draws", num, dim=-nest - 1)
    )
    with poutine.block(), plate:
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + _per_draw(site["log_prob"], num, nest)
    return torch.as_tensor(total)


def _per_draw(log_prob: Any, num: int | None, nest: int) -> torch.Tensor:
    """Sum a log-density over everything but the leading draw dimension (all, without one)."""
    log_prob = torch.as_tensor(log_prob)
    if num is None:
        return log_prob.sum()
    if log_prob.dim() == 0:
        return log_prob.expand(num)
    log_prob = log_prob.reshape(*(1,) * (nest + 1 - log_prob.dim()), *log_prob.shape)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(num)
