"""`infer`'s routing, shared by both backends: the guide's PSIS k-hat picks the cheapest
trustworthy route (`choose_route`), `route_fit` takes it (and drops NeuTra's chains for plain
NUTS where they fail, `chains_trouble`), and `InferResult` holds the outcome."""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from flowguides.core.checks import check_neutra_options
from flowguides.core.results import NEUTRA_OPTIONS, NeuTraResult
from flowguides.psis import shown

__all__ = [
    "INFER_NUTS_BUDGET",
    "INFER_ROUTES",
    "GUIDE_MAX_WEIGHT_CV",
    "KHAT_GUIDE",
    "KHAT_PSIS",
    "PSIS_MAX_WEIGHT_CV",
    "NEURAL_ODE_REFUSAL",
    "NEUTRA_MAX_DIVERGENT",
    "NEUTRA_MAX_RHAT",
    "InferDiagnosis",
    "InferResult",
    "chains_trouble",
    "check_infer_options",
    "choose_route",
    "route_fit",
]

KHAT_GUIDE = 0.5
"""`infer` uses the guide's own draws below this k-hat (Yao et al. 2018), where also
`GUIDE_MAX_WEIGHT_CV` holds."""

GUIDE_MAX_WEIGHT_CV = 0.1
"""... and where the coefficient of variation of the smoothed importance weights is at most
this (a relative PSIS ESS of at least ``1 / (1 + 0.1**2)``, about 0.99). Weighting moves the
mean of any function ``h`` of the draws by ``Cov_q(w, h) <= cv(w) sd_q(h)`` (Cauchy-Schwarz,
``E_q w = 1``), so the guide's own draws are then within a tenth of an sd of the weighted
estimate; with more spread in the weights, PSIS resampling is the more accurate route even
below `KHAT_GUIDE` (measured: docs/infer.md, "The routes")."""

PSIS_MAX_WEIGHT_CV = 1.0
"""`infer` resamples by the PSIS weights (k-hat below `KHAT_PSIS`) only where their
coefficient of variation is at most this, i.e. a PSIS ESS of at least half the draws; beyond
it weighting moves means by more than the guide's own sd, and NUTS runs. A calibration on the
posteriordb posteriors, not a bound: docs/infer.md, "The routes"."""

NEURAL_ODE_REFUSAL = "NeuTra refuses neural-ODE flows (an ODE solve per leapfrog step)"
"""`choose_route`'s reason for plain NUTS where the flow has a neural-ODE layer."""

KHAT_PSIS = 0.7
"""`infer` resamples the guide's draws by their PSIS weights from `KHAT_GUIDE` up to this k-hat
(or up to the sample-size-aware ``min(1 - 1/log10(S), 0.7)`` of Vehtari et al. 2024, where
``S`` draws make it lower) and runs NUTS from it on."""

INFER_ROUTES = ("guide", "psis", "neutra", "nuts")
"""The routes of `infer`, cheapest first."""

INFER_NUTS_BUDGET = {"num_warmup": 1000, "num_samples": 2000, "num_chains": 1,
                     "target_accept_prob": 0.95}  # fmt: skip
"""`infer`'s NUTS budget (routes ``"neutra"`` and ``"nuts"``) where its `neutra` argument does
not set one: twice `neutra`'s own draws, and a target acceptance above the PPLs' 0.8, since
`infer` runs NUTS where the guide failed (the hard posteriors, where 0.8 diverges) and its draws
are the answer (measured: docs/infer.md, "The routes" and "NUTS")."""

NEUTRA_MAX_DIVERGENT = 0.1
"""`infer` drops NeuTra's chains for plain NUTS where more than this fraction of transitions
diverged (a flow whose pulled-back density has a region NUTS cannot move through)."""

NEUTRA_MAX_RHAT = 1.1
"""... or where the largest split R-hat is not finite (a chain that does not move) or, with at
least `RHAT_MIN_SAMPLES` draws per chain (fewer make it too noisy to act on), above this."""

RHAT_MIN_SAMPLES = 100


@dataclass(frozen=True)
class InferDiagnosis:
    """Why `infer` took its route: the PSIS diagnosis of the fitted guide.

    Attributes:
        khat: the Pareto k-hat of the guide's importance weights (``nan`` where it could not
            be estimated, ``inf`` where the weights' tail is too heavy or some are not finite).
        weight_cv: the smoothed weights' coefficient of variation, ``sqrt(S / ess - 1)``
            (``nan`` where `ess` is).
        khat_guide: below it, the guide's own draws (`KHAT_GUIDE`).
        khat_psis: below it, PSIS resampling: `KHAT_PSIS`, or ``1 - 1/log10(S)`` where lower.
        ess: the PSIS effective sample size of the guide's `num_proposals` draws (``nan``
            where some importance weights are not finite).
        num_proposals: ``S``, the guide's draws the diagnosis used.
        reason: one sentence: the route and why.
    """

    khat: float
    khat_guide: float
    khat_psis: float
    ess: float
    num_proposals: int
    reason: str
    weight_cv: float = math.nan


@dataclass(repr=False, eq=False)
class InferResult:
    """What `infer` returns: draws from the cheapest route the PSIS diagnosis trusts.

    Attributes:
        route: ``"guide"`` (the guide's draws), ``"psis"`` (its draws resampled by their
            smoothed importance weights: duplicates, of effective size ``diagnosis.ess``),
            ``"neutra"`` (NUTS through the flow) or ``"nuts"`` (plain NUTS on the model).
        diagnosis: the `InferDiagnosis`.
        draws: constrained draws ``{site: (num_draws, *site_shape)}``, the layout of
            `PosteriorFit.sample` (after NUTS: ``num_chains * num_samples`` draws, chains one
            after another).
        fit: the `PosteriorFit`.
        mcmc: the `NeuTraResult` where NUTS ran, else None.
    """

    route: str
    diagnosis: InferDiagnosis
    draws: dict[str, np.ndarray]
    fit: Any
    mcmc: NeuTraResult | None = None

    def to_arviz(self, *, coords: Mapping | None = None, dims: Mapping | None = None) -> Any:
        """ArviZ's data object (``InferenceData`` on 0.x, ``DataTree`` on 1.x) of `draws`
        (`coords` and `dims` as in `flowguides.to_arviz`).

        After NUTS, `NeuTraResult.to_arviz` (one chain per chain, ``sample_stats`` with
        ``diverging``); else the group ``posterior`` with one chain. For the guide's own
        draws with their importance weights and log-likelihood, use
        ``flowguides.to_arviz(result.fit)``."""
        if self.mcmc is not None:
            return self.mcmc.to_arviz(coords=coords, dims=dims)
        from flowguides.inference_data import groups_to_arviz, site_dims

        posterior = {name: value[None] for name, value in self.draws.items()}
        labels = {"coords": coords, "user_dims": dims}
        return groups_to_arviz({"posterior": posterior}, site_dims(posterior, 2), **labels)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(np.shape(v))}" for k, v in self.draws.items())
        return f"InferResult(route={self.route!r}, draws={{{shapes}}}): {self.diagnosis.reason}"


def choose_route(
    khat: float,
    *,
    weight_cv: float = math.inf,
    khat_psis: float = KHAT_PSIS,
    exact: bool = False,
    neutra_refused: str = "",
) -> tuple[str, str]:
    """`infer`'s route for a guide with Pareto `khat`, and the reason, in one sentence.

    >>> choose_route(0.3, weight_cv=0.05)[0], choose_route(0.3, weight_cv=0.5)[0]
    ('guide', 'psis')
    >>> choose_route(0.6, weight_cv=0.5)[0], choose_route(0.6, weight_cv=1.5)[0]
    ('psis', 'neutra')
    >>> choose_route(0.9)[0], choose_route(0.9, neutra_refused=NEURAL_ODE_REFUSAL)[0]
    ('neutra', 'nuts')

    Args:
        khat: the guide's k-hat (``nan`` or ``inf`` take NUTS, as the least trusted).
        weight_cv: the smoothed importance weights' coefficient of variation (unknown:
            ``inf``); the guide's own draws need it at most `GUIDE_MAX_WEIGHT_CV`, their
            PSIS resample at most `PSIS_MAX_WEIGHT_CV`.
        khat_psis: the upper end of the PSIS route.
        exact: the importance weights are constant (the guide is the posterior, up to a
            constant; k-hat is then ``nan``): the guide's draws.
        neutra_refused: why NeuTra cannot run on this fit (`NEURAL_ODE_REFUSAL`, or the
            backend's reason), empty where it can: a reason takes plain NUTS instead.

    Returns:
        ``(route, reason)``, the route one of `INFER_ROUTES`.
    """
    if exact:
        return "guide", (
            "the importance weights are constant, so the guide matches the posterior: its own "
            "draws are used"
        )
    k = lambda bound: shown(khat, bound)  # noqa: E731 - "k-hat 0.70 < 0.70" never reads
    cv = lambda bound: shown(weight_cv, bound)  # noqa: E731
    if khat < min(KHAT_GUIDE, khat_psis) and weight_cv <= GUIDE_MAX_WEIGHT_CV:  # few draws
        return "guide", (
            f"k-hat {k(KHAT_GUIDE)[0]} < {KHAT_GUIDE} and the weights' cv "
            f"{cv(GUIDE_MAX_WEIGHT_CV)[0]} <= {GUIDE_MAX_WEIGHT_CV}: the guide is close to the "
            "posterior (weighting would move no mean by more than a tenth of an sd), so its own "
            "draws are used"
        )
    if khat < khat_psis and weight_cv <= PSIS_MAX_WEIGHT_CV:
        why = (
            f"k-hat {k(KHAT_GUIDE)[0]} < {KHAT_GUIDE}, but the weights' cv "
            f"{cv(GUIDE_MAX_WEIGHT_CV)[0]} > {GUIDE_MAX_WEIGHT_CV} (weighting moves means by up "
            "to that many sds)"
            if khat < KHAT_GUIDE
            else "{} <= k-hat {} < {}: the guide is usable after Pareto smoothing".format(
                KHAT_GUIDE, *k(khat_psis)
            )
        )
        return "psis", f"{why}, so its draws are resampled by their smoothed importance weights"
    cause = (
        "k-hat could not be estimated (the largest importance weights are tied)"
        if math.isnan(khat)
        else "k-hat {} < {}, but the weights' cv {} > {} (a PSIS ESS below half the draws)".format(
            *k(khat_psis), cv(PSIS_MAX_WEIGHT_CV)[0], PSIS_MAX_WEIGHT_CV
        )
        if khat < khat_psis
        else "k-hat is infinite (the importance weights' tail is too heavy, or not finite)"
        if math.isinf(khat)
        else "k-hat {} >= {}".format(*k(khat_psis))
    )
    if neutra_refused:
        return "nuts", (
            f"{cause}: importance sampling cannot correct the guide, and {neutra_refused}, so "
            "plain NUTS ran on the model"
        )
    return "neutra", (
        f"{cause}: importance sampling cannot correct the guide, so NUTS ran on the model "
        "reparametrised by the flow (NeuTra)"
    )


def _as_options(name: str, options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{name}: expected a dict or None, got {type(options).__name__}")
    return dict(options)


def check_infer_options(
    num_draws: int,
    neutra: Mapping[str, Any] | None,
    fit_options: Mapping[str, Any] | None,
    model_kwargs: Mapping[str, Any],
    fit_fn: Callable[..., Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check `infer`'s options before anything is fitted.

    Args:
        num_draws, neutra, fit_options: as `infer` took them.
        model_kwargs: `infer`'s keyword arguments for the model.
        fit_fn: the backend's `fit_posterior` (its signature says which options it takes).

    Returns:
        The NUTS budget (`NEUTRA_OPTIONS`, `INFER_NUTS_BUDGET` filling in) and the fit's
        options.

    Raises:
        ValueError: `num_draws` is not an integer of at least 25 (PSIS needs them); an option
            that is unknown, is `infer`'s own or is also a model keyword; a bad NUTS budget.
        TypeError: `neutra` or `fit_options` is not a dict.
    """
    from flowguides.diagnostics import MIN_DRAWS

    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < MIN_DRAWS:
        raise ValueError(f"num_draws: expected an integer >= {MIN_DRAWS}, got {num_draws!r}")
    neutra, fit_options = _as_options("neutra", neutra), _as_options("fit_options", fit_options)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    fit_takes = [p.name for p in inspect.signature(fit_fn).parameters.values() if p.kind in kinds]
    for name, options, own, takes in [
        ("neutra", neutra, ("seed", "progress"), NEUTRA_OPTIONS),
        ("fit_options", fit_options, ("model", "spec", "num_steps", "seed", "progress"), fit_takes),
    ]:
        if mine := sorted(set(options) & set(own)):
            raise ValueError(f"{name}: {mine} are infer's own arguments; pass them to infer")
        allowed = [option for option in takes if option not in own]
        if unknown := sorted(set(options) - set(allowed)):
            raise ValueError(f"{name}: unknown option(s) {unknown}; expected some of {allowed}")
    if both := sorted(set(fit_options) & set(model_kwargs)):
        raise ValueError(f"fit_options: {both} also given as keyword arguments; give them once")
    budget = {name: neutra.get(name, INFER_NUTS_BUDGET[name]) for name in NEUTRA_OPTIONS}
    check_neutra_options(_NO_LAYERS, **budget)  # the budgets now, for NeuTra and plain NUTS
    return budget, fit_options


_NO_LAYERS = SimpleNamespace(layers=())  # a spec stand-in: `check_neutra_options` reads layers


def route_fit(
    fit: Any,
    *,
    num_draws: int,
    budget: Mapping[str, Any],
    seed: int,
    progress: bool,
    nuts: Callable[..., NeuTraResult],
    neutra_refused: str = "",
) -> InferResult:
    """`infer` after the fit: diagnose `fit`'s guide from `num_draws` draws, take the route.

    Args:
        fit: a `PosteriorFit`.
        num_draws: the guide's draws, diagnosed and (routes ``"guide"``, ``"psis"``) returned.
        budget: NUTS's ``num_warmup``, ``num_samples``, ``num_chains`` and
            ``target_accept_prob``.
        seed: seeds the guide's draws, the resampling and NUTS.
        progress: print the route chosen (to stderr) and show NUTS's progress bar.
        nuts: the backend's plain NUTS, called as ``nuts(fit, **budget, seed=, progress=)``.
        neutra_refused: the backend's reason NeuTra cannot run on `fit` (see `choose_route`);
            a neural-ODE flow adds `NEURAL_ODE_REFUSAL`.

    Returns:
        The `InferResult`.
    """
    from flowguides.diagnostics import diagnose_weights, khat_threshold, resample

    proposals, log_p, log_q = fit.log_densities(num_draws, seed)
    log_weights = np.asarray(log_p, np.float64) - np.asarray(log_q, np.float64)
    khat, ess, exact = math.inf, math.nan, False
    khat_psis = min(KHAT_PSIS, khat_threshold(num_draws))
    if np.isfinite(log_weights).all():
        psis = diagnose_weights(log_p, log_q)
        khat, ess, exact = psis.khat, psis.ess, psis.verdict.startswith("exact")
    cv = math.sqrt(max(num_draws / ess - 1.0, 0.0)) if ess > 0 else math.nan
    if any(layer.type == "neural_ode" for layer in fit.spec.layers):
        neutra_refused = NEURAL_ODE_REFUSAL
    route, reason = choose_route(
        khat,
        weight_cv=math.inf if math.isnan(cv) else cv,
        khat_psis=khat_psis,
        exact=exact,
        neutra_refused=neutra_refused,
    )
    diagnosis = InferDiagnosis(khat, KHAT_GUIDE, khat_psis, ess, num_draws, reason, cv)
    if progress:
        print(f"infer: route {route!r}: {reason}", file=sys.stderr, flush=True)
    mcmc = None
    if route == "guide":
        draws = {name: np.asarray(value) for name, value in proposals.items()}
    elif route == "psis":
        draws = resample(proposals, log_weights, num_draws, seed=[seed, 1])
    else:
        run = fit.neutra if route == "neutra" else lambda **options: nuts(fit, **options)
        mcmc = run(**budget, seed=seed, progress=progress)
        trouble = chains_trouble(mcmc)
        if route == "neutra" and trouble is not None:
            route = "nuts"
            reason = f"{reason}; but NeuTra's chains failed ({trouble}), so NUTS ran on the model"
            diagnosis = InferDiagnosis(khat, KHAT_GUIDE, khat_psis, ess, num_draws, reason, cv)
            if progress:
                print(f"infer: route 'nuts': {reason}", file=sys.stderr, flush=True)
            mcmc = nuts(fit, **budget, seed=seed, progress=progress)
            trouble = chains_trouble(mcmc)
            if trouble is None:  # passed, but on a posterior the guide and NeuTra found hard
                warnings.warn(f"infer: {reason}; plain NUTS's chains pass the divergence and "
                              "R-hat checks, but NUTS alone can miss the regions that defeated "
                              "the guide (a funnel's neck): compare with a longer fit "
                              "(num_steps) or reparametrise", UserWarning, stacklevel=3)  # fmt: skip
        if trouble is not None:
            warnings.warn(
                f"infer: route {route!r}: NUTS's chains failed ({trouble}); its draws may be "
                "far from the posterior: run longer chains or reparametrise the model",
                UserWarning,
                stacklevel=3,
            )
        draws = mcmc.samples
    draws.update(fit.deterministic(draws))  # after NUTS: into `mcmc.samples` too
    return InferResult(route, diagnosis, draws, fit, mcmc)


def chains_trouble(mcmc: NeuTraResult) -> str | None:
    """Why NUTS chains cannot be trusted, or None: more than `NEUTRA_MAX_DIVERGENT` of the
    transitions diverged, or the largest split R-hat is not finite or (from at least
    `RHAT_MIN_SAMPLES` draws per chain) above `NEUTRA_MAX_RHAT`.

    >>> ok = NeuTraResult({}, np.zeros((1, 100), bool), {}, {"x": np.array(1.01)}, 1, "")
    >>> chains_trouble(ok) is None
    True
    >>> stuck = NeuTraResult({}, np.ones((1, 100), bool), {}, {"x": np.array(np.nan)}, 1, "")
    >>> chains_trouble(stuck)
    '100% of transitions diverged; split R-hat not finite (a chain that does not move)'
    """
    out = []
    frac = float(np.mean(mcmc.diverging)) if mcmc.diverging.size else 0.0
    if frac > NEUTRA_MAX_DIVERGENT:
        out.append(f"{frac:.0%} of transitions diverged")
    rhat = mcmc.moving_r_hat()  # a coordinate fixed in every draw (no R-hat) left out
    if rhat.size and not np.isfinite(rhat).all():
        out.append("split R-hat not finite (a chain that does not move)")
    elif (
        rhat.size and mcmc.diverging.shape[-1] >= RHAT_MIN_SAMPLES and rhat.max() > NEUTRA_MAX_RHAT
    ):
        out.append(f"split R-hat {rhat.max():.2f} > {NEUTRA_MAX_RHAT}")
    return "; ".join(out) or None
