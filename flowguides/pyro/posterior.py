"""Fit a flow guide to a Pyro model's posterior: `PosteriorFit` and `fit_posterior`.

Adam (optional global-norm clipping) on `Trainer`'s posterior schedule; a
NaN or infinite loss stops training with a `NonFiniteLossError`, the last finite parameters kept.

Flows with neural-ODE layers train with `training_solves` (STEER end times, the RNODE penalty
added to the loss) and record per step, in ``fit.history``, the field evaluations of the loss
(``"nfe_forward"``) and its gradient (``"nfe_backward"``) and the penalty (``"regularization"``).

The same names and parameters as `flowguides.numpyro.posterior`, except that NumPyro's
`fit_posterior` takes ``static_argnames`` and Pyro's ``vectorize_particles``.
"""

from __future__ import annotations

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

from flowguides.core import (
    DEFAULT_LEARNING_RATE,
    PosteriorFitMethods,
    as_spec,
    check_control_variate,
    check_objective_options,
    check_training,
    default_learning_rate,
    warn_if_below_start,
)
from flowguides.core.calls import warn_shadowed_options
from flowguides.core.timing import add_seconds, fit_timing, timed_calls
from flowguides.pyro._control import with_control_variate
from flowguides.pyro._support import is_computed, keeps_global_rng, trace_at_draws
from flowguides.pyro._training import (
    Evaluations,
    MappedLoss,
    ObjectiveLoss,
    Trainer,
    first_loss,
    mapped_training,
    progress_bar,
    trained_parameters,
    with_penalty,
)
from flowguides.pyro.guide import AutoFlowGuide
from flowguides.pyro.neutra import neutra as _neutra
from flowguides.spec import FlowSpec

__all__ = ["PosteriorFit", "fit_posterior"]


@dataclass
class PosteriorFit(PosteriorFitMethods):
    """A fitted flow guide and what it can tell about the posterior.

    Attributes:
        guide, model: the trained `AutoFlowGuide` (it holds the parameters), the model.
        spec: the flow spec (the guide's: in the dtype its flow was built in).
        losses: the negative ELBO estimate at each step (without the RNODE penalty); with
            ``objective="iwelbo"`` the negative IW-ELBO estimate (see `fit_posterior`).
        args, kwargs: the model's arguments used for fitting.
        backend: ``"pyro"``.
        history: per-step arrays for neural-ODE flows (``"nfe_forward"``, ``"nfe_backward"``,
            ``"regularization"`` when a regulariser weight is positive); empty otherwise.
        timing: where the call's time went, `flowguides.core.timing.FIT_TIMING_KEYS`
            (``setup_s`` up to the first step: the guide's set-up, the `init_scale` search
            and the vectorisation check; ``compile_s`` 0: nothing compiles; ``steps_per_s``:
            the training loop's), and ``draws_s``: all `sample` calls so far.
        model_params: the fitted (constrained) value of each ``pyro.param`` site of the model.
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
    model_params: dict[str, torch.Tensor] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()  # its later runs of the model read its fitted pyro.param values,
        # not Pyro's global store, which pyro.clear_param_store() or a later fit changes
        nodes, store = self.guide.model_trace.nodes.items(), pyro.get_param_store()
        self.model_params = {n: store[n].detach().clone()
                             for n, s in nodes if s["type"] == "param" and n in store}  # fmt: skip
        self.guide._bare_model = (poutine.substitute(self.model, data=self.model_params),)

    neutra = _neutra  # fit.neutra(num_warmup, num_samples, num_chains, seed, ...)

    @property
    def latent_shapes(self) -> dict[str, tuple[int, ...]]:
        """Constrained shape of each latent site."""
        return {
            name: tuple(site["value"].shape)
            for name, site in self.guide.prototype_trace.iter_stochastic_nodes()
        }

    def sample(self, num_samples: int, seed: int | None = None) -> dict[str, np.ndarray]:
        """Constrained posterior draws, ``name -> (num_samples, *site_shape)``, of the latent
        sites and the model's ``pyro.deterministic`` sites (the call's time is added to
        ``timing["draws_s"]``).

        Raises:
            MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        """
        t0 = time.perf_counter()
        latent, _ = self.guide.draws(num_samples, seed)
        values = self.guide.constrain(latent, self.args, self.kwargs)
        out = {k: v.cpu().numpy() for k, v in values.items()}
        out.update(self.deterministic(out))
        add_seconds(self.timing, "draws_s", time.perf_counter() - t0)
        return out

    def log_densities(
        self,
        num_samples: int,
        seed: int | None = None,
        *,
        vectorize_particles: bool | str | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """``(draws, log_p, log_q)``: ``log_p - log_q`` is each draw's importance log-weight.

        ``log_p`` is the model's log joint (observations included, all rows of a subsampled
        plate) at the constrained draw plus the log-Jacobian of the unconstraining bijections;
        ``log_q`` is the guide's log-density of the same draw (its forward pass, no inverse).
        With a `seed`, it all runs under a forked torch RNG seeded with it: the same seed gives
        the same result, and the global RNG is left as it was.

        Args:
            num_samples, seed: the draws.
            vectorize_particles: ``True`` (the draws through the model at once), ``False`` (one
                at a time), ``"auto"``, or None (default): the guide's own (`AutoFlowGuide`).

        Raises:
            MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        """
        with torch.no_grad(), torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            (latent, log_q), args = self.guide.draws(num_samples, seed), (self.args, self.kwargs)
            if self.guide._chunks is not None:  # all rows of a subsampled plate
                log_p = self.guide.start_log_joint(latent, *args)
            else:
                log_p = self.guide.batch_log_joint(
                    latent, *args, vectorize_particles=vectorize_particles
                )
        values = self.guide.constrain(latent, self.args, self.kwargs)
        draws = {k: v.cpu().numpy() for k, v in values.items()}
        return draws, log_p.cpu().numpy(), log_q.cpu().numpy()

    @property
    def subsampled_plates(self) -> list[str]:
        """Names of the model's plates that subsample their data (``subsample_size``).

        `flowguides.to_arviz` leaves ``observed_data`` and ``log_likelihood`` out for such a
        model: each evaluation sees another random subsample, so no single observed value
        pairs with the draws' log-likelihoods.
        """
        return [name for name, site in self.guide.model_trace.nodes.items()
                if site_is_subsample(site)  # every sized plate has one; a true subsample is smaller
                and site["fn"].subsample_size is not None
                and 0 < site["fn"].subsample_size < site["fn"].size]  # fmt: skip

    def _observed_sites(self) -> Iterator[tuple[str, dict]]:
        for name, site in self.guide.model_trace.nodes.items():
            infer = site.get("infer", {})
            if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
                if not (is_computed(site) or infer.get("is_auxiliary")):
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

        def together() -> dict[str, torch.Tensor]:
            trace = trace_at_draws(guide, values, self.args, self.kwargs)
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
                with poutine.block():
                    data = {k: v[i] for k, v in values.items()}
                    model = poutine.condition(guide._bare_model[0], data=data)
                    trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
                for name, batch in observed.items():
                    site = trace.nodes[name]
                    rows[name].append(site["fn"].log_prob(site["value"]).expand(batch))
            return {name: torch.stack(row) for name, row in rows.items()}

        with torch.no_grad():
            out = guide.evaluate_batch(together, one_by_one, vectorize_particles)
        return {name: value.cpu().numpy() for name, value in out.items()}


@keeps_global_rng
def fit_posterior(
    model: Callable[..., Any],
    spec: FlowSpec | Mapping[str, Any],
    *args: Any,
    num_steps: int = 2000,
    learning_rate: float | None = None,
    num_particles: int = 8,
    clip_norm: float | None = None,
    init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median,
    init_scale: float | str = "auto",
    seed: int = 0,
    progress: bool = True,
    vectorize_particles: bool | str = "auto",
    objective: str = "elbo",
    gradient: str = "reparam",
    num_inner: int = 1,
    control_variate: str = "auto",
    **kwargs: Any,
) -> PosteriorFit:
    """Fit an `AutoFlowGuide` to ``model(*args, **kwargs)`` by maximising the ELBO.

    ``Trace_ELBO(num_particles, vectorize_particles=guide.vectorized)`` with Adam on the
    guide's weights and any ``pyro.param`` of the model (``betas=(0.9, POSTERIOR_ADAM_B2)``);
    the learning rate decays (cosine) after the first quarter to 1% at the last step
    (`flowguides.core.POSTERIOR_DECAY_START`). Neural-ODE layers add their RNODE penalty (mean
    over particles) to the loss and use STEER end times (see `training_solves`).

    Args:
        model: a Pyro model with continuous latent sites.
        spec: the flow spec (or its dict form).
        *args, **kwargs: passed to the model (and the guide).
        num_steps, learning_rate, num_particles: the optimisation. `learning_rate` is Adam's
            peak rate; None takes `flowguides.core.default_learning_rate` of the latent
            dimension (1e-2 up to 1,000 dimensions, falling as ``1 / dim`` above) for the
            flow's layers and 1e-2 for its affine base (`flowguides.core.AFFINE_PARAMETERS`).
        clip_norm: global gradient-norm clipping (off when ``None``).
        init_loc_fn, init_scale: the guide's initialisation (see `AutoFlowGuide`).
        seed: seeds Pyro (initial weights, draws, subsampling).
        progress: show a tqdm bar with the smoothed loss on stderr.
        vectorize_particles: ``"auto"`` (default): particles (and the start search's draws)
            go through the model at once where it broadcasts over an extra leading batch
            dimension, else one at a time with a `VectorizationWarning` (models written for
            one draw, such as ``X @ b`` or Python loops over data, work either way; training
            maps its particles with `torch.func.vmap` where set-up found that this agrees
            with the loop and the model has no ``pyro.param``, a subsampled model too, each
            particle on its own minibatch: see `MappedLoss`);
            ``True``: at once, a `ValueError` where the model does not broadcast;
            ``False``: one at a time. The fit remembers the outcome for `log_densities`,
            `log_likelihood` and the diagnostics.
        objective: ``"elbo"`` (default) or ``"iwelbo"``: the importance-weighted ELBO
            ``log (1/K) sum_k p(x, z_k) / q(z_k)`` of ``K = num_inner`` draws (Burda et al.
            2016), averaged over `num_particles` groups; `losses` then holds its negative.
        gradient: ``"reparam"`` (default) or ``"stl"``: sticking the landing (Roeder et al.
            2017), the path gradient with ``log q`` at detached flow parameters (one inverse
            pass of the flow per draw); with ``"iwelbo"`` its IW form DReG (Tucker et al.
            2019), which trains the guide only (a model with its own ``pyro.param`` is
            refused). See the NeuTra and objectives page of the docs.
        num_inner: `K` of the IW-ELBO (1 with ``"elbo"``).
        control_variate: for a model whose plates subsample: ``"auto"`` (the default) the
            Taylor control variate around the full-data MAP where the start search found it,
            ``"taylor"`` always (an error where it cannot), ``"none"`` the plain minibatch
            estimate; unbiased either way (see the conventions page, "Subsampled models").

    Returns:
        The `PosteriorFit`.

    Warns:
        FitBelowStartWarning: the last tenth of the losses is clearly above the first steps'
            (see `flowguides.core.warn_if_below_start`): the start was the better guide.

    Raises:
        NonFiniteLossError: when a loss is NaN/inf; the guide keeps the last finite weights
            and the error's ``.fit`` holds the partial fit.
        NonFiniteGradientError: the loss was finite but a gradient was not (as above).
        MaxStepsExceededError: an adaptive neural-ODE solve ran out of ``max_steps``.
        ValueError: ``vectorize_particles=True`` where the model does not broadcast; an
            unknown `objective`, `gradient` or `control_variate`, a bad `num_inner`;
            ``control_variate="taylor"`` where it cannot apply (the message says why).
        SpecError: neural-ODE layers with an objective or gradient other than the defaults.
    """
    warn_shadowed_options(fit_posterior, model, locals())  # before any other local
    spec = as_spec(spec, job="posterior")
    check_training(num_steps, learning_rate, clip_norm, num_particles)
    check_objective_options(spec, objective, gradient, num_inner)
    check_control_variate(control_variate)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
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
    with timed_calls(guide, "_initial_start", times, "start_s"):
        guide._setup_if_needed(*args, **kwargs)
    affine_rate = learning_rate or DEFAULT_LEARNING_RATE  # checked: None or positive
    learning_rate = learning_rate or default_learning_rate(guide.latent_dim)
    train, on = with_control_variate(control_variate, model, guide)
    options = (objective, gradient, num_particles, num_inner, guide._reference if on else None)
    mapped = MappedLoss(guide, *options) if mapped_training(guide) else None
    evaluations = Evaluations(guide.flow)
    nesting = guide.max_plate_nesting
    elbos: dict[bool, Trace_ELBO] = {}
    plain = (objective, gradient) == ("elbo", "reparam")

    def negative_elbo(vectorized: bool | None = None) -> torch.Tensor:
        if vectorized is None and mapped is not None and guide.mappable:
            return mapped.differentiable_loss(model, guide, *args, **kwargs)
        vectorized = guide.vectorized if vectorized is None else vectorized
        if vectorized not in elbos:
            options = {"vectorize_particles": vectorized, "max_plate_nesting": nesting}
            elbos[vectorized] = (
                Trace_ELBO(num_particles=num_particles, **options)
                if plain
                else ObjectiveLoss(
                    guide.flow, objective, gradient, num_particles, num_inner, **options
                )
            )
        return elbos[vectorized].differentiable_loss(train, guide, *args, **kwargs)

    with poutine.trace(param_only=True) as param_capture:
        start = evaluations.count()
        loss, penalty = first_loss(guide, mapped, negative_elbo, lambda: negative_elbo(False))
        after_loss = evaluations.count()
    params = trained_parameters(guide, param_capture.trace, (objective, gradient))
    affine = [p for p in params if any(p is a for a in guide.flow.affine.parameters())]
    rest = [{"params": [p for p in params if all(p is not a for a in affine)]}]
    trainer = Trainer([*rest, {"params": affine, "lr": affine_rate}], num_steps, learning_rate, clip_norm, posterior=True)  # fmt: skip
    losses: list[float] = []

    def partial_fit() -> PosteriorFit:
        steps_per_s = len(losses) / (time.perf_counter() - t1) if losses else 0.0
        timing = fit_timing(t0, t1 - t0, times["start_s"], 0.0, steps_per_s)
        return PosteriorFit(
            guide, model, spec, np.asarray(losses), args, kwargs, history=evaluations.history(),
            timing=timing,
        )  # fmt: skip

    smooth = None
    t1 = time.perf_counter()
    with progress_bar(num_steps, progress) as bar:
        for step in range(num_steps):
            if step:
                start = evaluations.count()
                loss, penalty = with_penalty(negative_elbo)
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
