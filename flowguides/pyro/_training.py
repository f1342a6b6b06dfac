"""The training machinery `posterior.py` and `density.py` share (Pyro).

Adam on the shared schedule with optional global-norm clipping and the non-finite guard
(`Trainer`), the per-step record of vector-field evaluations and RNODE penalties of a flow's
neural-ODE layers (`Evaluations`), the mean penalty of a `training_solves` block
(`mean_penalty`, as in the NumPyro backend) and the progress bar (`progress_bar`, as in the
NumPyro backend).

The NumPyro backend's ``_training.py`` runs the same rules as compiled chunks of steps
(``make_optimizer``, ``run_chunks``, a compile cache); PyTorch steps eagerly, so `Trainer` and
`Evaluations` are this backend's own, and the NumPyro names for compiled programs have no
counterpart here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from flowguides.core import NonFiniteGradientError, NonFiniteLossError, learning_rate_at
from flowguides.pyro.ode import NeuralODE, training_solves

__all__ = ["Evaluations", "Trainer", "mean_penalty", "progress_bar", "with_penalty"]


class Trainer:
    """Adam + the shared schedule + clipping + the non-finite guard, over fixed parameters.

    Args:
        params: the trained tensors.
        num_steps: the steps the schedule runs over.
        lr: Adam's peak learning rate.
        clip_norm: global gradient-norm clipping (off when None).
    """

    def __init__(
        self, params: list[torch.Tensor], num_steps: int, lr: float, clip_norm: float | None
    ) -> None:
        self.params, self.clip_norm = params, clip_norm
        self.optim = torch.optim.Adam(params, lr=lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optim, lambda step: learning_rate_at(step, num_steps, lr) / lr
        )
        self.last_good = [p.detach().clone() for p in params]  # refreshed in place each step

    def step(self, step: int, loss: torch.Tensor, make_fit: Callable[[], Any]) -> float:
        """One optimiser step on `loss`; returns its value.

        Raises:
            NonFiniteLossError: `loss` is NaN/inf (the last finite parameters are restored;
                ``make_fit()`` is the error's ``.fit``).
            NonFiniteGradientError: `loss` is finite but a gradient is not.
        """
        value = float(loss.detach())
        if not np.isfinite(value):
            with torch.no_grad():
                for p, good in zip(self.params, self.last_good, strict=True):
                    p.copy_(good)
            raise NonFiniteLossError(step, value, self.last_good, make_fit())
        with torch.no_grad():
            for good, p in zip(self.last_good, self.params, strict=True):
                good.copy_(p)
        self.optim.zero_grad()
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            raise NonFiniteGradientError(step, value, self.last_good, make_fit())
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optim.step()
        self.schedule.step()
        return value


class Evaluations:
    """Per-step vector-field evaluations (forward, backward) and RNODE penalties of a flow.

    Args:
        module: the flow (or the guide's flow) whose `NeuralODE` layers are counted.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, NeuralODE)]
        self.regularized = any(
            m.spec.kinetic_weight > 0 or m.spec.jacobian_weight > 0 for m in self.layers
        )
        self.steps: dict[str, list[float]] = {"nfe_forward": [], "nfe_backward": []}
        if self.regularized:
            self.steps["regularization"] = []

    def count(self) -> int:
        """The field evaluations of every layer so far."""
        return sum(m.nfe for m in self.layers)

    def record(self, start: int, after_loss: int, penalty: torch.Tensor) -> None:
        """Log one step: `start`/`after_loss` are `count()` before and after the loss."""
        self.steps["nfe_forward"].append(after_loss - start)
        self.steps["nfe_backward"].append(self.count() - after_loss)
        if self.regularized:
            self.steps["regularization"].append(float(penalty.detach()))

    def history(self) -> dict[str, np.ndarray]:
        """The per-step arrays (empty without neural-ODE layers)."""
        if not self.layers:
            return {}
        return {k: np.asarray(v) for k, v in self.steps.items()}


def mean_penalty(records: Sequence[dict], zero: torch.Tensor | float = 0.0) -> torch.Tensor | float:
    """The sum over solves of each solve's mean RNODE penalty (`zero` when none has one).

    Args:
        records: the records of a `training_solves` block.
        zero: the value without penalties (a scalar zero of the loss's dtype and device).
    """
    return sum((r["penalty"].mean() for r in records if "penalty" in r), zero)


def with_penalty(loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, penalty)``: `loss_fn` run inside `training_solves`, the mean RNODE penalty."""
    with training_solves() as records:
        loss = loss_fn()
    return loss, mean_penalty(records, loss.new_zeros(()))


def progress_bar(num_steps: int, progress: bool) -> tqdm:
    """A tqdm bar over `num_steps` on stderr (disabled unless `progress`)."""
    return tqdm(total=num_steps, disable=not progress, file=sys.stderr, leave=False)
