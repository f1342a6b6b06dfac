"""The training machinery `posterior.py` and `density.py` share (Pyro).

Adam on the shared schedules, optional global-norm clipping, the non-finite guard (`Trainer`),
the per-step record of vector-field evaluations and RNODE penalties of neural-ODE layers
(`Evaluations`); as in the NumPyro backend: a `training_solves` block's mean penalty
(`mean_penalty`), `progress_bar`, `fit_posterior`'s objectives (`ObjectiveLoss`, `objective_loss`).

The NumPyro backend's ``_training.py`` runs the same rules as compiled chunks of steps
(``make_optimizer``, ``run_chunks``, a compile cache); PyTorch steps eagerly, so `Trainer` and
`Evaluations` are this backend's own, and the compiled-program names have no counterpart.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from tqdm import tqdm

from flowguides.core import NonFiniteGradientError, NonFiniteLossError, training
from flowguides.pyro._control import mapped_factor
from flowguides.pyro._stream import draw_indices, subsampled_plates
from flowguides.pyro.build import Flow, FlowDistribution
from flowguides.pyro.ode import NeuralODE, training_solves

__all__ = [
    "Evaluations",
    "MappedLoss",
    "ObjectiveLoss",
    "Trainer",
    "first_loss",
    "mean_penalty",
    "objective_loss",
    "progress_bar",
    "trained_parameters",
    "with_penalty",
]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite (one check over them all where they share
    a dtype and a device)."""
    if len({(t.dtype, t.device) for t in tensors}) == 1:
        return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all())
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class Trainer:
    """Adam + the shared schedule + clipping + the non-finite guard, over fixed parameters.

    Args:
        params: the trained tensors, or torch's parameter groups (dicts with ``"params"`` and
            their own peak ``"lr"``).
        num_steps: the steps the schedule runs over.
        lr: Adam's peak learning rate (of groups without their own).
        clip_norm: global gradient-norm clipping (off when None).
        posterior: `fit_posterior`'s schedule and Adam, else `fit_density`'s (as NumPyro's
            ``make_optimizer``: `flowguides.core.POSTERIOR_DECAY_START`, `POSTERIOR_ADAM_B2`).
    """

    def __init__(self, params: list, num_steps: int, lr: float, clip_norm, posterior=False):
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        params = [p for g in groups for p in g["params"]]
        self.params, self.clip_norm = params, clip_norm
        # PyTorch's fused Adam (one kernel over all tensors) is the same update as its
        # per-tensor loop, to rounding; on CPU the loop's Python costs more than the arithmetic.
        fused = all(p.dtype in _FUSED_DTYPES and p.device.type in ("cpu", "cuda") for p in params)
        start = training.POSTERIOR_DECAY_START if posterior else training.DENSITY_DECAY_START
        betas = (0.9, training.POSTERIOR_ADAM_B2 if posterior else 0.999)
        self.optim = torch.optim.Adam(groups, lr=lr, betas=betas, fused=fused or None)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(  # the shared schedule's factor
            self.optim, lambda step: training.learning_rate_at(step, num_steps, 1.0, start)
        )
        # the parameters before the step, refreshed in place each step: views of one flat
        # buffer (one copy a step) where the parameters share a dtype and a device
        self._flat: torch.Tensor | None = None
        if params and len({(p.dtype, p.device) for p in params}) == 1:
            self._flat = torch.cat([p.detach().reshape(-1) for p in params])
            chunks = self._flat.split([p.numel() for p in params])
            self.last_good = [c.view(p.shape) for c, p in zip(chunks, params, strict=True)]
        else:
            self.last_good = [p.detach().clone() for p in params]

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
            if self._flat is not None:
                torch.cat([p.reshape(-1) for p in self.params], out=self._flat)
            else:
                for good, p in zip(self.last_good, self.params, strict=True):
                    good.copy_(p)
        self.optim.zero_grad()
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not _all_finite(grads):
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
    """The sum over the solves in `records` (a `training_solves` block's) of each solve's mean
    RNODE penalty (`zero`, a scalar of the loss's dtype and device, when none has one)."""
    return sum((r["penalty"].mean() for r in records if "penalty" in r), zero)


def with_penalty(loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, penalty)``: `loss_fn` run inside `training_solves`, the mean RNODE penalty."""
    with training_solves() as records:
        loss = loss_fn()
    return loss, mean_penalty(records, loss.new_zeros(()))


def progress_bar(num_steps: int, progress: bool) -> tqdm:
    """A tqdm bar over `num_steps` on stderr (disabled unless `progress`)."""
    return tqdm(total=num_steps, disable=not progress, file=sys.stderr, leave=False)


def objective_loss(
    log_w: torch.Tensor, log_w_path: torch.Tensor | None, objective: str, gradient: str
) -> torch.Tensor:
    """The loss of log-weights ``(num_particles, num_inner)``: its value is the negative
    ELBO (mean of `log_w`) or IW-ELBO (mean over rows of ``logsumexp - log K``); its gradient
    the reparametrisation one of that value, or with ``gradient="stl"`` that of `log_w_path`
    (``log q`` at stopped flow parameters): STL for the ELBO, DReG for the IW-ELBO
    (``sum_k stop(w_k^2) log w_k`` with ``w`` the normalised weights of a row)."""
    if objective == "elbo":
        value = log_w.mean()
        path = None if log_w_path is None else log_w_path.mean()
    else:
        value = (torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1])).mean()
        if log_w_path is not None:
            weights = torch.softmax(log_w.detach(), -1)
            path = (weights * weights * log_w_path).sum(-1).mean()
    if gradient == "reparam" or log_w_path is None:
        return -value
    return -(value.detach() + path - path.detach())


class ObjectiveLoss(Trace_ELBO):
    """`fit_posterior`'s loss for ``objective="iwelbo"`` or ``gradient="stl"``: Pyro's traces
    of ``num_particles * num_inner`` draws (vectorised as `Trace_ELBO` does), each draw's
    log-weight ``log p - log q``, then `objective_loss`.

    With ``gradient="stl"``, the flow's ``log q`` of each draw is evaluated again by its
    inverse pass with the flow's parameters detached (Roeder et al. 2017): the draw keeps its
    path gradient and loses the score term, whose expectation is zero.

    Args:
        flow: the guide's flow.
        objective, gradient, num_particles, num_inner: as in `fit_posterior`.
        vectorize_particles, max_plate_nesting: as in `Trace_ELBO`.
    """

    def __init__(
        self,
        flow: Flow,
        objective: str,
        gradient: str,
        num_particles: int,
        num_inner: int,
        *,
        vectorize_particles: bool,
        max_plate_nesting: int,
    ) -> None:
        super().__init__(
            num_particles=num_particles * num_inner,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting,
        )
        self.flow, self.objective, self.gradient = flow, objective, gradient
        self.shape = (num_particles, num_inner)

    def _detached_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return _detached_log_prob(self.flow, value)

    def log_weights(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any):
        """``(log_w, log_w_path)``, each ``(num_particles, num_inner)`` (`log_w_path` None
        unless ``gradient="stl"``)."""
        rows, paths = [], []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w, path = 0.0, 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    log_w = log_w + torch_sum(site["log_prob"], dims)
            for site in guide_trace.nodes.values():
                if site["type"] == "sample":
                    log_q = torch_sum(site["log_prob"], dims)
                    log_w = log_w - log_q
                    if self.gradient == "stl" and isinstance(site["fn"], FlowDistribution):
                        stopped = torch_sum(self._detached_log_prob(site["value"]), dims)
                        path = path + log_q - stopped
            rows.append(log_w)
            paths.append(log_w + path)
        total = math.prod(self.shape)

        def shaped(values: list) -> torch.Tensor:
            out = values[0] if len(values) == 1 else torch.stack(values)
            return torch.broadcast_to(out, (total,)).reshape(self.shape)

        return shaped(rows), shaped(paths) if self.gradient == "stl" else None

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any):
        """The loss (see `objective_loss`); its value is the negative (IW-)ELBO estimate."""
        log_w, log_w_path = self.log_weights(model, guide, *args, **kwargs)
        return objective_loss(log_w, log_w_path, self.objective, self.gradient)


class _LogProb(torch.nn.Module):
    """``flow.log_prob`` as a module's ``forward`` (for `torch.func.functional_call`)."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x)


def _detached_log_prob(flow: Flow, value: torch.Tensor) -> torch.Tensor:
    """``flow.log_prob(value)`` at the flow's parameters detached (STL's ``log q``)."""
    params = {f"flow.{n}": p.detach() for n, p in flow.named_parameters()}
    return torch.func.functional_call(_LogProb(flow), params, (value,))


class MappedLoss:
    """`fit_posterior`'s loss where `torch.func.vmap` maps the model (`AutoFlowGuide.mappable`)
    and it does not broadcast over a batch of draws or it subsamples (`mapped_training`): what
    `Trace_ELBO` (or `ObjectiveLoss`) computes in its loop over particles, in one pass.

    The ``num_particles * num_inner`` draws and their ``log q`` come from the flow at once;
    each draw takes its own minibatch of every subsampled plate, as in the loop, drawn as the
    NumPyro backend draws them (uniformly with replacement where the plate is at least
    `flowguides.core.WITH_REPLACEMENT_RATIO` times its ``subsample_size``, else a uniform
    subset; both unbiased); the log joint of every (draw, minibatch) pair is mapped by
    `torch.func.vmap`, and with a `reference` (the Taylor control variate's terms) each draw
    adds its `mapped_factor`. Only for models without ``pyro.param`` sites (see
    `mapped_training`): the log joint runs under `poutine.block`, where an optimiser would not
    see a model's own parameters.

    Args:
        guide: the set-up `AutoFlowGuide`.
        objective, gradient, num_particles, num_inner: as in `fit_posterior`.
        reference: the control variate's `reference_terms`, or None.
    """

    def __init__(
        self,
        guide: Any,
        objective: str,
        gradient: str,
        num_particles: int,
        num_inner: int,
        reference: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.guide, self.objective, self.gradient = guide, objective, gradient
        self.shape, self.reference = (num_particles, num_inner), reference
        self.plates = subsampled_plates(guide.model_trace)

    def log_weights(self, model: Callable, *args: Any, **kwargs: Any):
        """``(log_w, log_w_path)`` as `ObjectiveLoss.log_weights` returns them."""
        latent, log_q = self.guide.flow.sample_and_log_prob((math.prod(self.shape),))
        indices = draw_indices(self.plates, latent.shape[0], latent.device)
        return self.weights_at(model, latent, log_q, indices, args, kwargs)

    def weights_at(self, model, latent, log_q, indices, args, kwargs):
        """`log_weights` at given draws ``(S, d)``, their ``log q`` and minibatches."""
        guide = self.guide

        def one(z: torch.Tensor, idx: dict[str, torch.Tensor]) -> torch.Tensor:
            return guide._log_joint_one(z, args, kwargs, poutine.condition(model, data=idx))

        with pyro.validation_enabled(False):  # its checks branch in Python on values
            log_p = torch.func.vmap(one)(latent, indices)
        if self.reference is not None:
            log_p = log_p + mapped_factor(
                model, guide, self.reference, latent, indices, args, kwargs
            )
        log_w = (log_p - log_q).reshape(self.shape)
        if self.gradient != "stl":
            return log_w, None
        return log_w, (log_p - _detached_log_prob(guide.flow, latent)).reshape(self.shape)

    def differentiable_loss(self, model: Callable, guide: Any, *args: Any, **kwargs: Any):
        """The loss (see `objective_loss`); `guide` is the one given at construction."""
        return objective_loss(*self.log_weights(model, *args, **kwargs), self.objective,
                              self.gradient)  # fmt: skip


def mapped_training(guide: Any) -> bool:
    """Whether `fit_posterior` trains with `MappedLoss`: `torch.func.vmap` maps the model
    (set-up's check), its supports are fixed, it has no ``pyro.param`` sites, and it does not
    broadcast over draws or it subsamples (Pyro's vectorised `Trace_ELBO` would share one
    minibatch among the particles; `MappedLoss` draws one for each, as the NumPyro backend
    and Pyro's own loop do)."""
    if not guide.mappable or guide._dynamic:
        return False
    if guide.vectorized is not False and not subsampled_plates(guide.model_trace):
        return False
    return not any(site["type"] == "param" for site in guide.model_trace.nodes.values())


def first_loss(
    guide: Any, mapped: MappedLoss | None, loss_fn: Callable, loop_fn: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step's ``(loss, penalty)`` (`with_penalty`): `loss_fn` through `mapped`
    where it applies; where that raises, the guide stops mapping and the PPL's loss runs
    through `AutoFlowGuide.evaluate_batch` (vectorised particles checked on the ELBO too,
    `loop_fn` one particle at a time), which raises the model's own error if it fails too."""
    if mapped is not None and guide.mappable:
        try:
            return with_penalty(loss_fn)
        except Exception:  # noqa: BLE001 - Pyro's own loss below (or the model's error)
            guide.mappable = False
    return guide.evaluate_batch(lambda: with_penalty(loss_fn), lambda: with_penalty(loop_fn))


def trained_parameters(
    guide: Any, param_trace: poutine.Trace, options: tuple[str, str]
) -> list[torch.Tensor]:
    """The guide's weights, then the unconstrained tensors of the ``pyro.param`` sites of
    `param_trace` (a ``param_only`` trace of the first loss) that are not among them.
    `options` is ``(objective, gradient)``: DReG (``("iwelbo", "stl")``) refuses a model with
    its own parameters (its gradient is the guide's only)."""
    own = list(guide.parameters())
    params, seen = list(own), {id(p) for p in own}
    for site in param_trace.nodes.values():
        p = site["value"].unconstrained()
        if id(p) not in seen:
            params.append(p)
            seen.add(id(p))
    if options == ("iwelbo", "stl") and len(params) > len(own):
        raise ValueError(
            "gradient: 'stl' with objective='iwelbo' (DReG) trains the guide only, but the "
            "model has its own pyro.param sites; use gradient='reparam'"
        )
    return params
