"""Fit a flow to a data set: `DensityFit` and `fit_density` (Pyro).

The loop uses Adam and the shared schedule from
[`learning_rate_at`][flowguides.core.learning_rate_at] on minibatches, with early stopping on a
held-out share of the rows; a NaN or infinite loss stops training with a `NonFiniteLossError`
and leaves the last finite parameters in place. Flows with neural-ODE layers train with
`training_solves` and record per step, in ``fit.history``, the vector-field evaluations of the
loss (``"nfe_forward"``) and of its gradient (``"nfe_backward"``), plus the RNODE penalty
(``"regularization"``) when a weight is positive. ``objective="flow_matching"`` trains a single
neural-ODE layer by flow matching.

The same names and parameters as `flowguides.numpyro.density`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flowguides.core import (
    VALIDATE_EVERY,
    NonFiniteValidationError,
    as_spec,
    check_data,
    check_objective,
    check_training,
    split_indices,
    standardization,
)
from flowguides.pyro._training import Evaluations, Trainer, progress_bar, with_penalty
from flowguides.pyro.build import Flow, build_flow
from flowguides.pyro.ode import flow_matching_loss
from flowguides.spec import FlowSpec

__all__ = ["DensityFit", "fit_density"]


@dataclass
class DensityFit:
    """A flow fitted to data by maximum likelihood or flow matching.

    Attributes:
        flow: the trained `Flow` (on standardised data when `mean`/`std` are set).
        spec: the flow spec.
        losses: ``{"train": per step, "val": per validation (every 25 steps)}``: mean negative
            log-likelihoods in the standardised space (without the RNODE penalty), or the
            flow-matching losses under ``objective="flow_matching"``.
        mean, std: the standardisation (``None`` when off).
        backend: ``"pyro"``.
        history: per-step arrays for neural-ODE flows (``"nfe_forward"``, ``"nfe_backward"``,
            ``"regularization"`` when a regulariser weight is positive); empty otherwise.
        objective: ``"maximum_likelihood"`` or ``"flow_matching"``.
    """

    flow: Flow
    spec: FlowSpec
    losses: dict[str, np.ndarray]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    backend: str = "pyro"
    history: dict[str, np.ndarray] = field(default_factory=dict)
    objective: str = "maximum_likelihood"

    def log_prob(self, x: Any) -> np.ndarray:
        """Log-density of rows `x` ``(n, dim)`` in the data's own scale (Jacobian included).

        Raises:
            ValueError: `x` is not a finite ``(n, dim)`` array.
            MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        """
        x = check_data(x, name="x", dim=self.flow.dim)
        offset = 0.0
        if self.mean is not None:
            x = (x - self.mean) / self.std
            offset = float(np.log(self.std).sum())
        with torch.no_grad():
            log_q = self.flow.log_prob(torch.as_tensor(x, dtype=self.flow.dtype))
        return log_q.cpu().numpy() - offset

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        """`n` draws ``(n, dim)`` in the data's own scale.

        Raises:
            MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        """
        x = self.flow.sample((n,), seed=seed).cpu().numpy()
        return x * self.std + self.mean if self.mean is not None else x


def fit_density(
    data: Any,
    spec: FlowSpec | Mapping[str, Any],
    *,
    num_steps: int = 2000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    validation_fraction: float = 0.1,
    patience: int = 500,
    standardize: bool = True,
    objective: str = "maximum_likelihood",
    sigma_min: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> DensityFit:
    """Fit a flow to the rows of `data` ``(n, dim)`` on minibatches.

    A `validation_fraction` of the rows is held out and scored after the first step, every 25
    steps and after the last; training stops
    after `patience` steps without a better validation loss and the best parameters are kept.

    ``objective="maximum_likelihood"`` (the default) minimises the negative log-likelihood
    (plus the RNODE penalty of neural-ODE layers). ``objective="flow_matching"`` needs a spec
    whose layers are exactly one neural-ODE layer and fits its vector field without solving
    (`flow_matching_loss`, base draws ``x0 ~ N(0, I)``, ``t ~ U(0, 1)``); the validation loss is
    the same loss on the held-out rows (with noise fixed for the whole fit). The affine base is
    not trained and stays the identity: the path joins N(0, I) to the (standardised) data
    directly. `log_prob` afterwards is exact through the ODE.

    Args:
        data: the rows ``(n, dim)``.
        spec: the flow spec (or its dict form).
        num_steps, batch_size, learning_rate: the optimisation (Adam, shared schedule).
        validation_fraction, patience: early stopping.
        standardize: fit the flow to standardised data (the Jacobian enters `log_prob`).
        objective: ``"maximum_likelihood"`` or ``"flow_matching"``.
        sigma_min: the flow-matching path's width at the data end.
        seed: seeds the split, the initial weights, minibatches and noise.
        progress: show a tqdm bar on stderr.

    Returns:
        The `DensityFit`.

    Raises:
        ValueError: for data of the wrong rank or holding NaN/inf (naming the rows), or a
            setting out of range.
        SpecError: ``objective="flow_matching"`` with a spec that is not one neural-ODE layer.
        NonFiniteLossError: when a training loss is NaN/inf (the last finite weights are kept).
        NonFiniteGradientError: the loss was finite but a gradient was not.
        NonFiniteValidationError: no validation loss was finite.
        MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.

    References:
        Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023.
    """
    spec = as_spec(spec)
    check_training(num_steps, learning_rate, None)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    check_objective(spec, objective, sigma_min)
    data = check_data(data)
    n, dim = data.shape
    train_idx, val_idx = split_indices(n, validation_fraction, seed)
    scaling = standardization(data[train_idx], standardize)
    mean, std = scaling if scaling is not None else (None, None)
    if scaling is not None:
        data = (data - mean) / std
    torch.manual_seed(seed)
    flow = build_flow(spec, dim, seed=seed)
    train = torch.as_tensor(data[train_idx], dtype=flow.dtype)
    val = torch.as_tensor(data[val_idx], dtype=flow.dtype)
    batch = min(batch_size, len(train))
    if objective == "flow_matching":
        ode = flow.layers[0]
        val_noise = (torch.randn_like(val), torch.rand(len(val), dtype=flow.dtype))

        def train_loss(x: torch.Tensor) -> torch.Tensor:
            x0, t = torch.randn_like(x), torch.rand(len(x), dtype=x.dtype)
            return flow_matching_loss(ode, x, x0, t, sigma_min)

        def val_loss_fn() -> torch.Tensor:
            return flow_matching_loss(ode, val, *val_noise, sigma_min)

        params = list(ode.parameters())
    else:

        def train_loss(x: torch.Tensor) -> torch.Tensor:
            return -flow.log_prob(x).mean()

        def val_loss_fn() -> torch.Tensor:
            return -flow.log_prob(val).mean()

        params = list(flow.parameters())
    trainer = Trainer(params, num_steps, learning_rate, None)
    evaluations = Evaluations(flow)
    rng = np.random.default_rng(seed)
    losses: dict[str, list[float]] = {"train": [], "val": []}
    best, best_step = None, 0

    def result() -> DensityFit:
        arrays = {k: np.asarray(v) for k, v in losses.items()}
        history = evaluations.history()
        return DensityFit(flow, spec, arrays, mean, std, history=history, objective=objective)

    with progress_bar(num_steps, progress) as bar:
        for step in range(num_steps):
            rows = torch.as_tensor(rng.integers(0, len(train), size=batch))
            start = evaluations.count()
            loss, penalty = with_penalty(lambda rows=rows: train_loss(train[rows]))
            after_loss = evaluations.count()
            trainer.step(step, loss + penalty, result)
            losses["train"].append(float(loss.detach()))
            evaluations.record(start, after_loss, penalty)
            if len(val) and (step % VALIDATE_EVERY == 0 or step == num_steps - 1):
                with torch.no_grad():
                    val_loss = float(val_loss_fn())
                losses["val"].append(val_loss)
                if np.isfinite(val_loss) and (best is None or val_loss < best[0]):
                    best = (val_loss, {k: v.clone() for k, v in flow.state_dict().items()})
                    best_step = step
                bar.set_postfix(val=f"{val_loss:.4g}", refresh=False)
                if step - best_step >= patience:
                    break
            bar.update()
    if len(val) and best is None:
        last = [p.detach().clone() for p in params]
        raise NonFiniteValidationError(len(losses["train"]) - 1, losses["val"][-1], last, result())
    if best is not None:
        flow.load_state_dict(best[1])
    return result()
