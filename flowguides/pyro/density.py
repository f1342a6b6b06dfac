"""Fit a flow to a data set: `DensityFit` and `fit_density` (Pyro).

The loop uses Adam and the shared schedule from
[`learning_rate_at`][flowguides.core.learning_rate_at] on minibatches, with early stopping on a
held-out share of the rows; a NaN or infinite loss stops training with a `NonFiniteLossError`
and leaves the last finite parameters in place. Flows with neural-ODE layers train with
`training_solves` and record per step, in ``fit.history``, the vector-field evaluations of the
loss (``"nfe_forward"``) and of its gradient (``"nfe_backward"``), plus the RNODE penalty
(``"regularization"``) when a weight is positive. ``objective="flow_matching"`` trains a single
neural-ODE layer by flow matching (independent or minibatch optimal-transport coupling) and
early-stops on an exact-trace validation negative log-likelihood
(`flowguides.core.coupling`).

The same names and parameters as `flowguides.numpyro.density`, less ``devices`` (NumPyro's
sharding over several devices; here, a `torch.distributed` group of processes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flowguides.core import (
    DENSITY_LEARNING_RATE,
    FLOW_MATCHING_VALIDATION_ROWS,
    NonFiniteValidationError,
    as_spec,
    check_coupling,
    check_data,
    check_num_draws,
    check_objective,
    check_training,
    density_budget,
    density_patience,
    validate_every,
)
from flowguides.core.data import prepare_data
from flowguides.pyro._stream import (
    agree_stats,
    all_have,
    data_parallel,
    global_mean,
    minibatches,
    process_group,
)
from flowguides.pyro._support import keeps_global_rng
from flowguides.pyro._training import Evaluations, Trainer, progress_bar, with_penalty
from flowguides.pyro.build import Flow, build_flow
from flowguides.pyro.ode import NeuralODE, couple_noise, flow_matching_loss
from flowguides.spec import FlowSpec

__all__ = ["DensityFit", "fit_density"]


@dataclass
class DensityFit:
    """A flow fitted to data by maximum likelihood or flow matching.

    Attributes:
        flow: the trained `Flow` (on standardised data when `mean`/`std` are set).
        spec: the flow spec.
        losses: in the standardised space. Maximum likelihood: ``{"train": per step, "val":
            per validation}``, mean negative log-likelihoods (without the RNODE penalty).
            Flow matching: ``{"flow_matching": per step, the flow-matching training loss;
            "val_nll": per validation, the mean negative log-likelihood of the validation
            subset}``.
        mean, std: the standardisation (``None`` when off).
        backend: ``"pyro"``.
        history: per-step arrays for neural-ODE flows (``"nfe_forward"``, ``"nfe_backward"``,
            ``"regularization"`` when a regulariser weight is positive); empty otherwise.
            Flow matching adds ``"nfe_val"``, per validation (aligned with
            ``losses["val_nll"]``): the field evaluations of the exact-trace solve that scored
            the validation subset, so the returned flow's scoring cost is ``nfe_val`` at the
            best ``val_nll``.
        objective: ``"maximum_likelihood"`` or ``"flow_matching"``.
        coupling: ``"independent"`` or ``"ot"`` (flow matching's pairing of noise and data).
    """

    flow: Flow
    spec: FlowSpec
    losses: dict[str, np.ndarray]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    backend: str = "pyro"
    history: dict[str, np.ndarray] = field(default_factory=dict)
    objective: str = "maximum_likelihood"
    coupling: str = "independent"

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
        x = self.flow.sample((check_num_draws(n, "n"),), seed=seed).cpu().numpy()
        return x * self.std + self.mean if self.mean is not None else x


@contextlib.contextmanager
def _exact_trace(ode: NeuralODE) -> Iterator[None]:
    """Solve `ode` with the exact trace inside the block (as `flowguides.core.validation_spec`)."""
    trace, ode.trace = ode.trace, "exact"
    try:
        yield
    finally:
        ode.trace = trace


@keeps_global_rng
def fit_density(
    data: Any,
    spec: FlowSpec | Mapping[str, Any],
    *,
    num_steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float = DENSITY_LEARNING_RATE,
    validation_fraction: float = 0.1,
    patience: int | None = None,
    standardize: bool = True,
    objective: str = "maximum_likelihood",
    coupling: str = "independent",
    sigma_min: float = 1e-4,
    validation_data: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> DensityFit:
    """Fit a flow to the rows of `data` ``(n, dim)`` on minibatches.

    A `validation_fraction` of the rows is held out. Training stops after `patience` steps
    without a better validation negative log-likelihood and the best parameters are kept.

    `data` is one of (`flowguides.core.data`): an in-memory array, each step drawing its
    minibatch from the training rows; a memory-mapped array (``np.load(path, mmap_mode="r")``,
    an h5py or zarr data set), split as an in-memory one, checked and standardised in one pass
    over the file, its validation rows read into memory once, and each step's minibatch (the
    in-memory path's rows for the same seed, so the same fit) read in sorted row order; or an
    iterable of minibatches ``(n_k, dim)`` (an iterator or generator, or a re-iterable such as
    a ``DataLoader``, read epoch after epoch) that ends training when an iterator runs out
    (validating after its last step), is standardised by its first minibatch and validated on
    `validation_data`; `batch_size` and `validation_fraction` do not apply to it. A list is
    read as rows: stream a list of minibatches with ``iter(batches)``. Streamed minibatches
    are prefetched: minibatch ``k + 1`` is read on a worker thread while step ``k`` runs.

    Inside a `torch.distributed` group of several processes (launched with ``torchrun``, the
    group initialised by the caller with ``torch.distributed.init_process_group``), every
    process makes the same call: `batch_size` is the global minibatch (divisible by the number
    of processes), drawn alike in each process, each training on its contiguous share of the
    rows through `DistributedDataParallel`, which averages the gradients. The losses are the
    means over the processes, so all log, validate and stop alike and return the same flow. An
    iterable yields each process's own share (training ends when one process's runs out),
    standardised by process 0's first minibatch. NumPyro splits minibatches over devices
    with ``devices`` instead.

    ``objective="maximum_likelihood"`` (the default) minimises the negative log-likelihood
    (plus the RNODE penalty of neural-ODE layers) and scores every validation row after the
    first step, every `flowguides.core.VALIDATE_EVERY` (25) steps and after the last.

    ``objective="flow_matching"`` needs a spec whose layers are exactly one neural-ODE layer
    and fits its vector field without solving (`flow_matching_loss`, base draws
    ``x0 ~ N(0, I)`` paired with the minibatch by `coupling`, ``t ~ U(0, 1)``). It is
    validated by the negative log-likelihood all the same: after the first step, every
    `flowguides.core.validate_every` steps (100; in fits over 5,000 steps, a fiftieth of the
    steps) and after the last, an
    exact-trace solve (the spec's solver) scores a fixed subset of the first
    `flowguides.core.FLOW_MATCHING_VALIDATION_ROWS` (512) validation rows, so validation stays
    a small share of training. The affine base is not trained and stays the identity: the
    path joins N(0, I) to the (standardised) data directly. `log_prob` afterwards is exact
    through the ODE.

    Args:
        data: an in-memory or memory-mapped array ``(n, dim)`` of finite values, or an
            iterable of finite float minibatches ``(n_k, dim)``.
        spec: the flow spec (or its dict form); a RealNVP layer's ``orientation="auto"`` (the
            default) fits in the density direction (the fit's `spec` records it).
        num_steps, batch_size, learning_rate: the optimisation (Adam, shared schedule);
            `num_steps` and `batch_size` None: 2,000 and 256, for flow matching 20,000 and
            1,024 (256 with ``coupling="ot"``; `flowguides.core.DENSITY_BUDGETS`).
        validation_fraction, patience: early stopping (`patience` in steps; None: 500 for
            maximum likelihood, none for flow matching, see `flowguides.core.density_patience`).
        standardize: fit the flow to standardised data (the Jacobian enters `log_prob`).
        objective: ``"maximum_likelihood"`` or ``"flow_matching"``.
        coupling: flow matching's pairing of base draws and data in a minibatch:
            ``"independent"`` or ``"ot"`` (the exact minibatch optimal-transport assignment,
            Tong et al., 2023; `couple_noise`; needs Scipy).
        sigma_min: the flow-matching path's width at the data end.
        validation_data: an iterable's validation rows ``(n_val, dim)``; None: no validation
            (the last parameters are kept). Only for an iterable (arrays hold out
            `validation_fraction` of their rows).
        seed: seeds the split, the initial weights, minibatches and noise.
        progress: show a tqdm bar on stderr.

    Returns:
        The `DensityFit`.

    Raises:
        TypeError: `data` is not numeric, or a minibatch not floating-point (naming it).
        ValueError: for data of the wrong rank or holding NaN/inf (naming the rows), a bad
            minibatch (naming its index, its shape and what was expected), or a setting out of
            range (``coupling="ot"`` without flow matching, `validation_data` with an array, a
            `batch_size` that does not divide over a group's processes included).
        SpecError: ``objective="flow_matching"`` with a spec that is not one neural-ODE layer.
        NonFiniteLossError: when a training loss is NaN/inf (the last finite weights are kept).
        NonFiniteGradientError: the loss was finite but a gradient was not.
        NonFiniteValidationError: no validation loss was finite.
        MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.

    References:
        Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023.
        Tong et al., "Improving and Generalizing Flow-Based Generative Models with Minibatch
        Optimal Transport", TMLR 2024.
    """
    spec = as_spec(spec, job="density")
    num_steps, batch_size = density_budget(num_steps, batch_size, objective, coupling)
    check_training(num_steps, learning_rate, None)
    patience = density_patience(patience, objective, num_steps)
    check_objective(spec, objective, sigma_min)
    check_coupling(coupling, objective)
    flow_matching = objective == "flow_matching"
    group = process_group()
    source = prepare_data(
        data,
        validation_fraction=validation_fraction,
        validation_data=validation_data,
        standardize=standardize,
        seed=seed,
        validation_rows=FLOW_MATCHING_VALIDATION_ROWS if flow_matching else None,
        agree_stats=None if group is None else agree_stats,
    )
    dim = source.dim
    mean, std = source.stats if source.stats is not None else (None, None)
    flow = build_flow(spec, dim, seed=seed)
    val = torch.as_tensor(source.val, dtype=flow.dtype)
    n_train = len(source.train) if source.train is not None else 0
    batch = min(batch_size, source.mapped.n_train if source.mapped is not None else n_train)
    if group is not None and batch % group[1]:
        raise ValueError(
            f"batch_size: expected a row count divisible by the {group[1]} processes, got {batch}"
        )
    every, keys = validate_every(objective, num_steps, patience), ("train", "val")
    nfe_val: list[int] = []
    if flow_matching:
        ode = flow.layers[0]
        keys = ("flow_matching", "val_nll")

        def train_loss(x: torch.Tensor) -> torch.Tensor:
            x0 = couple_noise(torch.randn_like(x), x, coupling)
            return flow_matching_loss(ode, x, x0, torch.rand(len(x), dtype=x.dtype), sigma_min)

        def val_loss_fn() -> torch.Tensor:
            start = ode.nfe
            with _exact_trace(ode):
                nll = -flow.log_prob(val).mean()
            nfe_val.append(ode.nfe - start)
            return nll

        params = list(ode.parameters())
    else:

        def train_loss(x: torch.Tensor) -> torch.Tensor:
            return -flow.log_prob(x).mean()

        def val_loss_fn() -> torch.Tensor:
            return -flow.log_prob(val).mean()

        params = list(flow.parameters())
    step_loss = train_loss
    if group is not None:  # gradients averaged over the processes
        step_loss = data_parallel(ode if flow_matching else flow, train_loss)
    trainer = Trainer(params, num_steps, learning_rate, None)
    evaluations = Evaluations(flow)
    losses: dict[str, list[float]] = {key: [] for key in keys}
    best, best_step = None, 0

    def result() -> DensityFit:
        arrays = {k: np.asarray(v) for k, v in losses.items()}
        history = evaluations.history()
        if flow_matching:
            history["nfe_val"] = np.asarray(nfe_val, dtype=np.int64)
        return DensityFit(
            flow, spec, arrays, mean, std, history=history, objective=objective, coupling=coupling
        )

    def validate(step: int) -> bool:
        """Score the validation rows after `step`; whether patience has run out."""
        nonlocal best, best_step
        with torch.no_grad():
            val_loss = float(val_loss_fn())
        losses[keys[1]].append(val_loss)
        if np.isfinite(val_loss) and (best is None or val_loss < best[0]):
            best = (val_loss, {k: v.clone() for k, v in flow.state_dict().items()})
            best_step = step
        bar.set_postfix(val=f"{val_loss:.4g}", refresh=False)
        return step - best_step >= patience

    batches = minibatches(source, batch, np.random.default_rng(seed), flow.dtype, group)
    with progress_bar(num_steps, progress) as bar, contextlib.closing(batches):
        step, ended = -1, False
        for step in range(num_steps):
            x = next(batches, None)
            if x is None if group is None else not all_have(x):  # step - 1 was the last
                ended = True
                break
            start = evaluations.count()
            loss, penalty = with_penalty(lambda x=x: step_loss(x))
            after_loss = evaluations.count()
            total, value = loss + penalty, None
            if group is not None:  # the mean over the processes, the local gradient
                value, mean_penalty = global_mean(loss, penalty)
                total = total + ((value + mean_penalty) - total.detach())
            trainer.step(step, total, result)
            losses[keys[0]].append(float(loss.detach()) if value is None else value)
            evaluations.record(start, after_loss, penalty)
            due = step % every == 0 or step == num_steps - 1
            if len(val) and due and validate(step):
                break
            bar.update()
        if ended and len(val) and (step - 1) % every != 0:
            validate(step - 1)
    if len(val) and best is None:
        last = [p.detach().clone() for p in params]
        raise NonFiniteValidationError(
            len(losses[keys[0]]) - 1, losses[keys[1]][-1], last, result()
        )
    if best is not None:
        flow.load_state_dict(best[1])
    return result()
