"""The density benchmark's training rules: the budget, the checkpoint policy, and the loops
that train the anchors (zuko and normflows in torch, FlowJAX in JAX) under them.

:class:`DensityBudget` holds what every method gets alike (minibatch steps, batch size, Adam's
peak learning rate, seed); the schedule is flowguides' (constant, then cosine decay to 1% over
the second half: `flowguides.core.learning_rate_at`) and minibatches are drawn with
replacement. :class:`CheckpointPolicy` is ``fit_density``'s: the validation rows are
`flowguides.core.split_indices` of the training rows with the budget's seed, scored after the
first step, every ``every`` steps and after the last; training stops after ``patience`` steps
without a better validation NLL, and the best-scoring parameters are restored
(:class:`BestValidation`). :func:`torch_fit` and :func:`flowjax_fit` apply both step for step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.density_data import DensityData
from flowguides.core import VALIDATE_EVERY, decay_steps, learning_rate_at, split_indices

__all__ = [
    "CHECKPOINT",
    "BestValidation",
    "CheckpointPolicy",
    "DensityBudget",
    "flowjax_fit",
    "torch_fit",
]


@dataclass(frozen=True)
class DensityBudget:
    """Equal budget: minibatch steps, batch size, Adam's peak learning rate, seed."""

    num_steps: int
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which parameters a fit keeps: the best validation NLL, scored every `every` steps on a
    `validation_fraction` of the training rows, stopping after `patience` steps without a
    better one (``fit_density``'s defaults)."""

    every: int = VALIDATE_EVERY
    patience: int = 500
    validation_fraction: float = 0.1


CHECKPOINT = CheckpointPolicy()
"""The policy every method runs under."""


class BestValidation:
    """The checkpoint policy as a training loop applies it.

    Args:
        num_steps: the budget (the last step is always scored).
        policy: the `CheckpointPolicy`.
    """

    def __init__(self, num_steps: int, policy: CheckpointPolicy) -> None:
        self.num_steps, self.policy = num_steps, policy
        self.best, self.best_step, self.state = math.inf, 0, None
        self.values: list[float] = []

    def due(self, step: int) -> bool:
        """Whether `step` (0-based, after its update) is scored."""
        return step % self.policy.every == 0 or step == self.num_steps - 1

    def record(self, step: int, value: float, snapshot: Callable[[], Any]) -> bool:
        """Record the validation NLL of `step`, keeping ``snapshot()`` when it is the best;
        returns whether training stops (`patience` steps without a better one)."""
        self.values.append(value)
        if math.isfinite(value) and value < self.best:
            self.best, self.best_step, self.state = value, step, snapshot()
        return step - self.best_step >= self.policy.patience

    def kept(self) -> Any:
        """The best state.

        Raises:
            FloatingPointError: no validation NLL was finite.
        """
        if self.state is None:
            raise FloatingPointError(f"validation NLL: none finite, got {self.values[-3:]}")
        return self.state

    def summary(self, steps_run: int) -> dict[str, Any]:
        """``steps_run``, ``best_step``, ``best_val_nll`` and ``last_val_nll`` (the last score,
        whose parameters the restore replaced) for the row."""
        last = self.values[-1] if self.values else math.nan
        return {"steps_run": steps_run, "best_step": self.best_step, "best_val_nll": self.best,
                "last_val_nll": last}  # fmt: skip


def _split(
    data: DensityData, budget: DensityBudget, policy: CheckpointPolicy
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows: the split ``fit_density`` makes with the budget's seed."""
    train, val = split_indices(len(data.train), policy.validation_fraction, budget.seed)
    return data.train[train], data.train[val]


def torch_fit(
    module: Any,
    loss: Callable,
    data: DensityData,
    budget: DensityBudget,
    policy: CheckpointPolicy = CHECKPOINT,
    *,
    nll: Callable | None = None,
) -> dict[str, Any]:
    """Train a torch module (zuko, normflows) under the budget and policy; restores the best.

    Args:
        module: the flow (its parameters are trained, its ``state_dict`` checkpointed).
        loss: minibatch ``(batch, dim) -> scalar`` training loss.
        data: the split (validation rows are taken from ``data.train``).
        budget, policy: the shared budget and checkpoint policy.
        nll: ``(rows, dim) -> mean NLL`` scoring the validation rows (default: `loss`).

    Returns:
        `BestValidation.summary`.

    Raises:
        FloatingPointError: a training loss or every validation NLL was not finite.
    """
    import torch

    torch.manual_seed(budget.seed)
    train, val = (torch.as_tensor(a) for a in _split(data, budget, policy))
    n, lr = budget.num_steps, budget.learning_rate
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: learning_rate_at(s, n, lr) / lr)
    gen = torch.Generator().manual_seed(budget.seed)
    batch, nll = min(budget.batch_size, len(train)), nll or loss
    best = BestValidation(n, policy)

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    step = 0
    for step in range(n):
        value = loss(train[torch.randint(len(train), (batch,), generator=gen)])
        if not torch.isfinite(value):
            raise FloatingPointError(f"loss: not finite at step {step}, got {float(value)}")
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        if len(val) and best.due(step):
            with torch.no_grad():
                score = float(nll(val))
            if best.record(step, score, snapshot):
                break
    if len(val):
        module.load_state_dict(best.kept())
    return best.summary(step + 1)


def flowjax_fit(
    flow: Any,
    data: DensityData,
    budget: DensityBudget,
    policy: CheckpointPolicy = CHECKPOINT,
    *,
    sign: float = 1.0,
) -> tuple[Any, dict[str, Any]]:
    """Train a FlowJAX distribution under the budget and policy (optax Adam on the shared
    schedule, as the NumPyro backend builds it); returns the best flow and its summary.

    Args:
        flow: the FlowJAX distribution.
        data, budget, policy: as `torch_fit`.
        sign: the training loss is ``sign * NLL`` (tests use ``-1`` to make training worsen
            the validation NLL).

    Raises:
        FloatingPointError: a training loss or every validation NLL was not finite.
    """
    import equinox as eqx
    import jax.numpy as jnp
    import optax
    import paramax

    train, val = (jnp.asarray(a) for a in _split(data, budget, policy))
    n, lr = budget.num_steps, budget.learning_rate
    schedule = optax.join_schedules(
        [optax.constant_schedule(lr), optax.cosine_decay_schedule(lr, decay_steps(n), alpha=0.01)],
        [n // 2],
    )
    optimizer = optax.adam(schedule)
    params, static = eqx.partition(
        flow, eqx.is_inexact_array, is_leaf=lambda x: isinstance(x, paramax.NonTrainable)
    )

    def mean_nll(p: Any, x: Any) -> Any:
        return -paramax.unwrap(eqx.combine(p, static)).log_prob(x).mean()

    @eqx.filter_jit
    def update(p: Any, state: Any, rows: Any) -> tuple[Any, Any, Any]:
        value, grads = eqx.filter_value_and_grad(lambda q: sign * mean_nll(q, train[rows]))(p)
        updates, state = optimizer.update(grads, state, p)
        return eqx.apply_updates(p, updates), state, value

    score = eqx.filter_jit(mean_nll)
    state, rng = optimizer.init(params), np.random.default_rng(budget.seed)
    batch, best, step = min(budget.batch_size, train.shape[0]), BestValidation(n, policy), 0
    for step in range(n):
        params, state, value = update(params, state, rng.integers(0, train.shape[0], batch))
        if not math.isfinite(float(value)):
            raise FloatingPointError(f"loss: not finite at step {step}, got {float(value)}")
        if val.shape[0] and best.due(step):
            if best.record(step, float(score(params, val)), lambda p=params: p):
                break
    params = best.kept() if val.shape[0] else params
    return paramax.unwrap(eqx.combine(params, static)), best.summary(step + 1)
