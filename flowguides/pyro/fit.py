"""Fit a flow guide to a Pyro model's posterior, or a flow to a data set, in a few lines.

Both loops use Adam (with optional global-norm clipping) and the shared schedule from
[`learning_rate_at`][flowguides.core.learning_rate_at]; a NaN or infinite loss stops training
with a `NonFiniteLossError` and leaves the last finite parameters in place.

Flows with neural-ODE layers train with `training_solves` (STEER end times, the RNODE penalty
``kinetic_weight * KE + jacobian_weight * JF`` averaged over points and summed over layers added
to the loss) and record per step, in ``fit.history``, the vector-field evaluations of the loss
(``"nfe_forward"``) and of its gradient (``"nfe_backward"``), plus the penalty
(``"regularization"``) when a weight is positive. `fit_density` can also train a single
neural-ODE layer by flow matching (``objective="flow_matching"``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import init_to_median
from pyro.poutine.util import site_is_subsample
from tqdm import tqdm

from flowguides.core import (
    OBJECTIVES,
    VALIDATE_EVERY,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteValidationError,
    PosteriorFitMethods,
    as_spec,
    check_data,
    check_objective,
    check_training,
    default_learning_rate,
    learning_rate_at,
    split_indices,
    standardization,
    warn_if_below_start,
)
from flowguides.pyro.build import Flow, build_flow
from flowguides.pyro.guide import AutoFlowGuide
from flowguides.pyro.ode import NeuralODE, flow_matching_loss, training_solves
from flowguides.spec import FlowSpec

__all__ = [
    "DEFAULT_INIT_SCALE",
    "OBJECTIVES",
    "DensityFit",
    "NonFiniteGradientError",
    "NonFiniteValidationError",
    "PosteriorFit",
    "fit_density",
    "fit_posterior",
]

DEFAULT_INIT_SCALE: float | str = "auto"


@dataclass
class PosteriorFit(PosteriorFitMethods):
    """A fitted flow guide and what it can tell about the posterior.

    Attributes:
        guide: the trained `AutoFlowGuide` (it holds the parameters).
        model: the model.
        spec: the flow spec.
        losses: the negative ELBO estimate at each step (without the RNODE penalty).
        args, kwargs: the model's arguments used for fitting.
        backend: ``"pyro"``.
        history: per-step arrays for neural-ODE flows (``"nfe_forward"``, ``"nfe_backward"``,
            ``"regularization"`` when a regulariser weight is positive); empty otherwise.
        timing: ``setup_s`` (guide set-up, the `init_scale` search included) and
            ``steps_per_s`` (the training loop), from `fit_posterior`.
    """

    guide: AutoFlowGuide
    model: Callable[..., Any]
    spec: FlowSpec
    losses: np.ndarray
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    backend: str = "pyro"
    history: dict[str, np.ndarray] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def latent_shapes(self) -> dict[str, tuple[int, ...]]:
        """Constrained shape of each latent site."""
        return {
            name: tuple(site["value"].shape)
            for name, site in self.guide.prototype_trace.iter_stochastic_nodes()
        }

    def sample(self, num_samples: int, seed: int | None = None) -> dict[str, np.ndarray]:
        """Constrained posterior draws, ``name -> (num_samples, *site_shape)``."""
        latent, _ = self.guide.draws(num_samples, seed)
        return {k: v.cpu().numpy() for k, v in self.guide.constrain(latent).items()}

    def log_densities(
        self,
        num_samples: int,
        seed: int | None = None,
        *,
        vectorize_particles: bool | str | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """``(draws, log_p, log_q)``: ``log_p - log_q`` is each draw's importance log-weight.

        ``log_p`` is the model's log joint (observations included) at the constrained draw
        plus the log-Jacobian of the unconstraining bijections; ``log_q`` is the guide's
        log-density of the same draw (from its own forward pass, no inverse).

        With a `seed`, the whole evaluation runs under a forked torch RNG seeded with it, so
        the model's own randomness (the indices of a subsampled ``pyro.plate``) repeats too:
        the same seed gives the same result, and the global RNG is left as it was.

        Args:
            num_samples, seed: the draws.
            vectorize_particles: ``True`` (the draws through the model at once), ``False``
                (one at a time), ``"auto"``, or None (default): the guide's own choice (see
                `AutoFlowGuide`).
        """
        with torch.no_grad(), torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            latent, log_q = self.guide.draws(num_samples, seed)
            log_p = self.guide.batch_log_joint(
                latent, self.args, self.kwargs, vectorize_particles=vectorize_particles
            )
        draws = {k: v.cpu().numpy() for k, v in self.guide.constrain(latent).items()}
        return draws, log_p.cpu().numpy(), log_q.cpu().numpy()

    @property
    def subsampled_plates(self) -> list[str]:
        """Names of the model's plates that subsample their data (``subsample_size``).

        `flowguides.to_arviz` leaves ``observed_data`` and ``log_likelihood`` out for such a
        model: each evaluation sees another random subsample, so no single observed value
        pairs with the draws' log-likelihoods.
        """
        return [
            name
            for name, site in self.guide.model_trace.nodes.items()
            if site_is_subsample(site)  # every sized plate has one; a true subsample is smaller
            and site["fn"].subsample_size is not None
            and 0 < site["fn"].subsample_size < site["fn"].size
        ]

    def _observed_sites(self) -> Iterator[tuple[str, dict]]:
        for name, site in self.guide.model_trace.nodes.items():
            infer = site.get("infer", {})
            if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
                if not (infer.get("_deterministic") or infer.get("is_auxiliary")):
                    yield name, site

    def observed_data(self) -> dict[str, np.ndarray]:
        """The value of each observed site, as the model saw it when the guide was built."""
        return {name: site["value"].detach().cpu().numpy() for name, site in self._observed_sites()}

    def log_likelihood(
        self, draws: Mapping[str, Any], *, vectorize_particles: bool | str | None = None
    ) -> dict[str, np.ndarray]:
        """Pointwise log-likelihood of each observed site, ``(S, *site_batch_shape)``.

        Args:
            draws: constrained latent draws ``name -> (S, *site_shape)``, as from `sample`.
            vectorize_particles: as in `log_densities`.
        """
        guide, nest = self.guide, self.guide.max_plate_nesting
        shapes = self.latent_shapes
        missing = [n for n in shapes if n not in draws]
        if missing:
            raise ValueError(f"draws: missing latent site(s) {missing}")
        dtype = guide.flow.affine.loc.dtype
        num = int(np.shape(draws[next(iter(shapes))])[0])
        values = {}
        for name, shape in shapes.items():
            value = torch.as_tensor(np.asarray(draws[name]), dtype=dtype)
            if tuple(value.shape) != (num, *shape):
                raise ValueError(
                    f"draws[{name!r}]: expected shape {(num, *shape)}, got {tuple(value.shape)}"
                )
            values[name] = value
        observed = {name: tuple(proto["fn"].batch_shape) for name, proto in self._observed_sites()}

        def run(data: dict[str, torch.Tensor], plate: Any) -> poutine.Trace:
            with poutine.block(), plate:
                model = poutine.condition(self.model, data=data)
                return poutine.trace(model).get_trace(*self.args, **self.kwargs)

        def together() -> dict[str, torch.Tensor]:
            shaped = {}
            for name, shape in shapes.items():
                batch = len(shape) - guide.prototype_trace.nodes[name]["fn"].event_dim
                shaped[name] = values[name].reshape(num, *([1] * (nest - batch)), *shape)
            trace = run(shaped, pyro.plate("_flowguides_draws", num, dim=-nest - 1))
            out = {}
            for name, batch in observed.items():
                site = trace.nodes[name]
                log_lik = site["fn"].log_prob(site["value"])
                log_lik = log_lik.reshape(*(1,) * (nest + 1 - log_lik.dim()), *log_lik.shape)
                out[name] = log_lik.expand(num, *log_lik.shape[1:]).reshape(num, *batch)
            return out

        def one_by_one() -> dict[str, torch.Tensor]:
            rows: dict[str, list[torch.Tensor]] = {name: [] for name in observed}
            for i in range(num):
                trace = run({k: v[i] for k, v in values.items()}, contextlib.nullcontext())
                for name, batch in observed.items():
                    site = trace.nodes[name]
                    rows[name].append(site["fn"].log_prob(site["value"]).expand(batch))
            return {name: torch.stack(row) for name, row in rows.items()}

        with torch.no_grad():
            out = guide.evaluate_batch(together, one_by_one, vectorize_particles)
        return {name: value.cpu().numpy() for name, value in out.items()}


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
        """Log-density of rows `x` ``(n, dim)`` in the data's own scale (Jacobian included)."""
        x = check_data(x, name="x", dim=self.flow.dim)
        offset = 0.0
        if self.mean is not None:
            x = (x - self.mean) / self.std
            offset = float(np.log(self.std).sum())
        with torch.no_grad():
            log_q = self.flow.log_prob(torch.as_tensor(x, dtype=self.flow.dtype))
        return log_q.cpu().numpy() - offset

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        """`n` draws ``(n, dim)`` in the data's own scale."""
        x = self.flow.sample((n,), seed=seed).cpu().numpy()
        return x * self.std + self.mean if self.mean is not None else x


class _Trainer:
    """Adam + the shared schedule + clipping + the non-finite guard, over fixed parameters."""

    def __init__(
        self, params: list[torch.Tensor], num_steps: int, lr: float, clip_norm: float | None
    ):
        self.params, self.clip_norm = params, clip_norm
        self.optim = torch.optim.Adam(params, lr=lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optim, lambda step: learning_rate_at(step, num_steps, lr) / lr
        )
        self.last_good = [p.detach().clone() for p in params]  # refreshed in place each step

    def step(self, step: int, loss: torch.Tensor, make_fit: Callable[[], Any]) -> float:
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


class _Evaluations:
    """Per-step vector-field evaluations (forward, backward) and RNODE penalties of a flow."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, NeuralODE)]
        self.regularized = any(
            m.spec.kinetic_weight > 0 or m.spec.jacobian_weight > 0 for m in self.layers
        )
        self.steps: dict[str, list[float]] = {"nfe_forward": [], "nfe_backward": []}
        if self.regularized:
            self.steps["regularization"] = []

    def count(self) -> int:
        return sum(m.nfe for m in self.layers)

    def record(self, start: int, after_loss: int, penalty: torch.Tensor) -> None:
        """Log one step: `start`/`after_loss` are `count()` before and after the loss."""
        self.steps["nfe_forward"].append(after_loss - start)
        self.steps["nfe_backward"].append(self.count() - after_loss)
        if self.regularized:
            self.steps["regularization"].append(float(penalty.detach()))

    def history(self) -> dict[str, np.ndarray]:
        if not self.layers:
            return {}
        return {k: np.asarray(v) for k, v in self.steps.items()}


def _with_penalty(
    flow: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, penalty)``: `loss_fn` run with training solves, the mean RNODE penalty."""
    with training_solves(flow) as penalties:
        loss = loss_fn()
    return loss, sum((p.mean() for p in penalties), loss.new_zeros(()))


def _progress(num_steps: int, progress: bool) -> tqdm:
    return tqdm(total=num_steps, disable=not progress, file=sys.stderr, leave=False)


def fit_posterior(
    model: Callable[..., Any],
    spec: FlowSpec | Mapping[str, Any],
    *args: Any,
    num_steps: int = 2000,
    learning_rate: float | None = None,
    num_particles: int = 8,
    clip_norm: float | None = None,
    init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median,
    init_scale: float | str = DEFAULT_INIT_SCALE,
    seed: int = 0,
    progress: bool = True,
    vectorize_particles: bool | str = "auto",
    **kwargs: Any,
) -> PosteriorFit:
    """Fit an `AutoFlowGuide` to ``model(*args, **kwargs)`` by maximising the ELBO.

    ``Trace_ELBO(num_particles, vectorize_particles=guide.vectorized)`` with Adam on the
    guide's weights and any ``pyro.param`` of the model; the learning rate is constant for the
    first half, then decays (cosine) to 1% at the last step. Neural-ODE layers add their RNODE
    penalty (mean over particles) to the loss and use STEER end times (see `training_solves`).

    Args:
        model: a Pyro model with continuous latent sites.
        spec: the flow spec (or its dict form).
        *args, **kwargs: passed to the model (and the guide).
        num_steps, learning_rate, num_particles: the optimisation. `learning_rate` is Adam's
            peak rate; None takes `flowguides.core.default_learning_rate` of the latent
            dimension (1e-2 up to 1,000 dimensions, falling as ``1 / dim`` above).
        clip_norm: global gradient-norm clipping (off when ``None``).
        init_loc_fn, init_scale: the guide's initialisation (see `AutoFlowGuide`).
        seed: seeds Pyro (initial weights, draws, subsampling).
        progress: show a tqdm bar with the smoothed loss on stderr.
        vectorize_particles: ``"auto"`` (default): particles (and the start search's draws)
            go through the model at once where it broadcasts over an extra leading batch
            dimension, else one at a time with a `VectorizationWarning` (models written for
            one draw, such as ``X @ b`` or Python loops over data, work either way);
            ``True``: at once, a `ValueError` where the model does not broadcast;
            ``False``: one at a time. The fit remembers the outcome for `log_densities`,
            `log_likelihood` and the diagnostics.

    Warns:
        FitBelowStartWarning: the last tenth of the losses is clearly above the first steps'
            (see `flowguides.core.warn_if_below_start`): the start was the better guide.

    Raises:
        NonFiniteLossError: when a loss is NaN/inf; the guide keeps the last finite weights
            and the error's ``.fit`` holds the partial fit.
        ValueError: ``vectorize_particles=True`` where the model does not broadcast.
    """
    spec = as_spec(spec)
    check_training(num_steps, learning_rate, clip_norm)
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles: expected a positive integer, got {num_particles!r}")
    pyro.set_rng_seed(seed)
    t0 = time.perf_counter()
    guide = AutoFlowGuide(
        model,
        spec,
        init_loc_fn=init_loc_fn,
        init_scale=init_scale,
        vectorize_particles=vectorize_particles,
    )
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith(f"{guide._pyro_name}.flow$$$")]:
        del store[name]  # stale weights of an earlier guide with the same prefix
    guide._setup_if_needed(*args, **kwargs)
    timing = {"setup_s": time.perf_counter() - t0}
    if learning_rate is None:
        learning_rate = default_learning_rate(guide.latent_dim)
    evaluations = _Evaluations(guide.flow)
    elbos: dict[bool, Trace_ELBO] = {}

    def negative_elbo(vectorized: bool | None = None) -> torch.Tensor:
        vectorized = guide.vectorized if vectorized is None else vectorized
        if vectorized not in elbos:
            elbos[vectorized] = Trace_ELBO(
                num_particles=num_particles,
                vectorize_particles=vectorized,
                max_plate_nesting=guide.max_plate_nesting,
            )
        return elbos[vectorized].differentiable_loss(model, guide, *args, **kwargs)

    with poutine.trace(param_only=True) as param_capture:
        start = evaluations.count()
        loss, penalty = guide.evaluate_batch(  # vectorised particles checked on the ELBO too
            lambda: _with_penalty(guide.flow, negative_elbo),
            lambda: _with_penalty(guide.flow, lambda: negative_elbo(False)),
        )
        after_loss = evaluations.count()
    params = list(guide.parameters())
    seen = {id(p) for p in params}
    for site in param_capture.trace.nodes.values():
        p = site["value"].unconstrained()
        if id(p) not in seen:
            params.append(p)
            seen.add(id(p))
    trainer = _Trainer(params, num_steps, learning_rate, clip_norm)
    losses: list[float] = []

    def partial_fit() -> PosteriorFit:
        losses_so_far = np.asarray(losses)
        if losses:
            timing["steps_per_s"] = len(losses) / (time.perf_counter() - t1)
        return PosteriorFit(
            guide, model, spec, losses_so_far, args, kwargs, history=evaluations.history(),
            timing=dict(timing),
        )  # fmt: skip

    smooth = None
    t1 = time.perf_counter()
    with _progress(num_steps, progress) as bar:
        for step in range(num_steps):
            if step:
                start = evaluations.count()
                loss, penalty = _with_penalty(guide.flow, negative_elbo)
                after_loss = evaluations.count()
            trainer.step(step, loss + penalty, partial_fit)
            value = float(loss.detach())
            losses.append(value)
            evaluations.record(start, after_loss, penalty)
            smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
            bar.set_postfix(loss=f"{smooth:.4g}", refresh=False)
            bar.update()
    warn_if_below_start(np.asarray(losses), learning_rate)
    return partial_fit()


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

    Raises:
        ValueError: for data of the wrong rank or holding NaN/inf (naming the rows), or a
            setting out of range.
        SpecError: ``objective="flow_matching"`` with a spec that is not one neural-ODE layer.
        NonFiniteLossError: when a training loss is NaN/inf (the last finite weights are kept).
        NonFiniteValidationError: no validation loss was finite.

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
    trainer = _Trainer(params, num_steps, learning_rate, None)
    evaluations = _Evaluations(flow)
    rng = np.random.default_rng(seed)
    losses: dict[str, list[float]] = {"train": [], "val": []}
    best, best_step = None, 0

    def result() -> DensityFit:
        arrays = {k: np.asarray(v) for k, v in losses.items()}
        history = evaluations.history()
        return DensityFit(flow, spec, arrays, mean, std, history=history, objective=objective)

    with _progress(num_steps, progress) as bar:
        for step in range(num_steps):
            rows = torch.as_tensor(rng.integers(0, len(train), size=batch))
            start = evaluations.count()
            loss, penalty = _with_penalty(flow, lambda rows=rows: train_loss(train[rows]))
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
