"""`infer` in both backends: each route taken on a posterior built to need it.

- route ``"guide"``: a conjugate normal posterior, fitted; the draws match its closed form.
- route ``"psis"``: a skewed posterior ``p(x) ∝ N(x; 0, 1) Φ(-x)^(-K)`` against an untrained
  guide ``N(0, 1)`` (one step at a negligible learning rate). Under that guide ``Φ(-x)`` is
  uniform, so the importance weights ``Φ(-x)^(-K)`` are exactly Pareto with shape ``K = 0.6``:
  k-hat lands in ``[0.5, 0.7)`` at the fixed seed. Its estimate still scatters from seed to
  seed, so the routing itself is also tested on injected weights (backend-free, below).
- route ``"neutra"``: Neal's funnel fitted by one planar layer for a few steps from a start
  far too narrow (scale 0.1 where v has sd 3), so k-hat is far above 0.7.
- route ``"nuts"``: the funnel with that narrow start in an untrained neural-ODE flow, which
  NeuTra refuses.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.core import (
    GUIDE_MAX_WEIGHT_CV,
    INFER_NUTS_BUDGET,
    KHAT_GUIDE,
    KHAT_PSIS,
    NEURAL_ODE_REFUSAL,
    PSIS_MAX_WEIGHT_CV,
    InferResult,
    NeuTraResult,
    chains_trouble,
    check_infer_options,
    choose_route,
    route_fit,
)

__all__: list[str] = []

BACKENDS = [
    pytest.param("pyro", marks=pytest.mark.torch),
    pytest.param("numpyro", marks=pytest.mark.jax),
]
Y = np.random.default_rng(0).normal(1.0, 1.0, size=20)
POST_MEAN, POST_SD = Y.sum() / (20 + 1e-2), 1.0 / math.sqrt(20 + 1e-2)  # prior N(0, 10)
SKEW = 0.6  # the Pareto shape of the skewed posterior's weights under N(0, 1)
SKEW_MIX = 0.2  # ... on this share of the mass: a guide right in the bulk (PSIS ESS > S/2)
UNTRAINED = {"learning_rate": 1e-12, "init_scale": 1.0}  # with num_steps=1: the start
NARROW = {"init_scale": 0.1}  # on the funnel (sd 3 in v): k-hat far above 0.7 at 2,000 draws


def _skewed_mean() -> float:
    """``E_p[x]`` of the skewed posterior, by quadrature (the untrained guide's mean is 0)."""
    from scipy.special import log_ndtr

    x = np.linspace(-12.0, 30.0, 200_001)
    density = np.exp(-(x**2) / 2 + np.logaddexp(0.0, np.log(SKEW_MIX) - SKEW * log_ndtr(-x)))
    return float((x * density).sum() / density.sum())


def _backend(name: str) -> SimpleNamespace:
    """The backend's `infer`, the test models written in it, and `init_to_value`."""
    if name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch as xp
        from pyro.infer.autoguide import init_to_value

        from flowguides.pyro import infer

        pyro.clear_param_store()
        ppl, special, y, zero = pyro, xp.special, xp.tensor(Y, dtype=xp.float32), xp.tensor(0.0)
    else:
        import jax.numpy as xp
        import jax.scipy.special as special
        import numpyro as ppl
        import numpyro.distributions as dist
        from numpyro.infer import init_to_value

        from flowguides.numpyro import infer

        y, zero = Y, 0.0

    def normal(y):
        mu = ppl.sample("mu", dist.Normal(0.0, 10.0))
        with ppl.plate("n", len(y)):
            ppl.sample("y", dist.Normal(mu, 1.0), obs=y)

    def skewed():
        x = ppl.sample("x", dist.Normal(0.0, 1.0))
        # p = N(0, 1) (1 + SKEW_MIX / Phi(-x)^SKEW): weights under N(0, 1) with a Pareto tail
        ppl.factor(
            "skew", xp.logaddexp(xp.zeros(()), np.log(SKEW_MIX) - SKEW * special.log_ndtr(-x))
        )

    def funnel():
        v = ppl.sample("v", dist.Normal(0.0, 3.0))
        with ppl.plate("d", 2):
            ppl.sample("x", dist.Normal(0.0, xp.exp(v / 2)))

    at_zero = init_to_value(values={"x": zero})
    return SimpleNamespace(
        infer=infer, normal=normal, skewed=skewed, funnel=funnel, y=y, at_zero=at_zero
    )


# -- the routing, backend-free: weights injected ---------------------------------------------


def test_choose_route_at_the_thresholds() -> None:
    assert (KHAT_GUIDE, KHAT_PSIS) == (0.5, 0.7)
    assert GUIDE_MAX_WEIGHT_CV == 0.1
    routes = [choose_route(k, weight_cv=0.1)[0] for k in (0.49, 0.5, 0.69, 0.7, math.nan, math.inf)]
    assert routes == [
        "guide", "psis", "psis", "neutra", "neutra", "neutra"
    ]  # fmt: skip
    assert choose_route(math.nan, exact=True)[0] == "guide"
    assert choose_route(0.65, khat_psis=0.6)[0] == "neutra"  # fewer draws: a lower threshold
    assert (
        choose_route(0.42, weight_cv=0.02, khat_psis=0.29)[0] == "neutra"
    )  # 25 draws: not the guide
    assert choose_route(0.3, weight_cv=0.05, neutra_refused=NEURAL_ODE_REFUSAL)[0] == "guide"
    # k-hat below 0.5, but weights spread enough to move a mean by more than 0.1 sd: resample
    route, reason = choose_route(0.3, weight_cv=0.25)
    assert route == "psis" and "cv 0.25 > 0.1" in reason
    assert choose_route(0.3)[0] == "neutra"  # the spread unknown: the least trusted
    # k-hat below 0.7, but a PSIS ESS below half the draws: NUTS
    route, reason = choose_route(0.6, weight_cv=1.3)
    assert route == "neutra" and "cv 1.30 > 1.0" in reason and "half the draws" in reason
    assert PSIS_MAX_WEIGHT_CV == 1.0


def test_the_nuts_budget_defaults_to_infers_own_and_takes_each_setting() -> None:
    """`infer` runs NUTS where the guide failed, so its draws are the answer: twice `neutra`'s
    own defaults unless the `neutra` dict sets a value."""

    def fit_fn(model, spec, *, num_steps=1, learning_rate=None): ...

    budget, options = check_infer_options(100, None, {"learning_rate": 0.1}, {}, fit_fn)
    assert budget == INFER_NUTS_BUDGET
    assert budget == {
        "num_warmup": 1000, "num_samples": 2000, "num_chains": 1, "target_accept_prob": 0.95
    }  # fmt: skip
    assert options == {"learning_rate": 0.1}
    budget, _ = check_infer_options(100, {"num_samples": 50}, None, {}, fit_fn)
    assert budget == {**INFER_NUTS_BUDGET, "num_samples": 50}
    route, reason = choose_route(0.8, neutra_refused=NEURAL_ODE_REFUSAL)
    assert route == "nuts" and "k-hat 0.80 >= 0.70" in reason and "neural-ODE" in reason
    assert "0.5 <= k-hat 0.62 < 0.70" in choose_route(0.62, weight_cv=0.5)[1]


class _StubFit:
    """A fit whose importance log-weights are set: ``-k log u`` at the quantiles ``u`` of a
    uniform, a Pareto sample of shape `k` without sampling noise, on the first `tail` fraction
    of the draws (the rest weigh 1: a guide right in the bulk, short in one tail)."""

    def __init__(
        self,
        k: float,
        layer: str = "planar",
        num: int = 4000,
        stuck: tuple[str, ...] = (),
        tail: float = 1.0,
    ) -> None:
        u = (np.arange(num) + 0.5) / num
        self.log_weights = np.where(u < tail, -k * np.log(u / tail), 0.0)
        self.x = np.arange(num, dtype=float)  # draw i is the value i: a resample shows its rows
        self.spec = SimpleNamespace(layers=[SimpleNamespace(type=layer)])
        self.ran: list[str] = []
        self.stuck = stuck  # the kinds of chain that do not move, every transition divergent

    def log_densities(self, num_samples: int, seed: int | None = None):
        assert num_samples == self.x.size
        return {"x": self.x}, self.log_weights, np.zeros(num_samples)

    def _mcmc(self, kind: str, **budget) -> NeuTraResult:
        self.ran.append(kind)
        samples = {"x": np.full(budget["num_chains"] * budget["num_samples"], -1.0)}
        diverging = np.full((budget["num_chains"], budget["num_samples"]), kind in self.stuck)
        r_hat = {"x": np.array(np.nan if kind in self.stuck else 1.0)}
        return NeuTraResult(samples, diverging, {}, r_hat, budget["num_chains"], kind)

    def neutra(self, **budget) -> NeuTraResult:
        return self._mcmc("neutra", **budget)

    def deterministic(self, draws: dict) -> dict:
        return {}


def _route(fit: _StubFit) -> InferResult:
    budget = {"num_warmup": 1, "num_samples": 5, "num_chains": 2}
    nuts = lambda fit, **options: fit._mcmc("nuts", **options)  # noqa: E731
    return route_fit(fit, num_draws=fit.x.size, budget=budget, seed=0, progress=False, nuts=nuts)


def test_route_fit_takes_each_route_on_injected_weights() -> None:
    guide = _route(_StubFit(0.05))  # weights u^-0.05: cv about 0.05
    assert guide.route == "guide" and guide.mcmc is None and guide.diagnosis.khat < 0.5
    assert guide.diagnosis.weight_cv < GUIDE_MAX_WEIGHT_CV
    np.testing.assert_array_equal(guide.draws["x"], np.arange(4000.0))  # the draws themselves

    spread = _route(_StubFit(0.3))  # k-hat below 0.5, but cv about 0.46: resampled
    assert spread.route == "psis" and spread.diagnosis.khat < 0.5
    assert spread.diagnosis.weight_cv == pytest.approx(0.46, abs=0.02)

    psis = _route(_StubFit(0.6, tail=0.05))  # a 5% Pareto tail: cv about 0.71
    assert psis.route == "psis" and 0.5 <= psis.diagnosis.khat < 0.7
    assert psis.diagnosis.weight_cv < PSIS_MAX_WEIGHT_CV
    rows = psis.draws["x"]
    assert rows.shape == (4000,) and np.isin(rows, np.arange(4000.0)).all()
    assert np.unique(rows).size < 4000  # a resample: duplicates
    assert psis.diagnosis.ess < 4000
    # the heavy weights sit on the first 200 rows: about 500 of their 4,300 units of weight
    assert np.mean(rows < 200) > 0.09

    wide = _route(_StubFit(0.6))  # a Pareto tail on every draw: cv about 2, ESS below half
    assert wide.route == "neutra" and wide.diagnosis.weight_cv > PSIS_MAX_WEIGHT_CV

    exact = _route(_StubFit(0.0))  # constant weights
    assert exact.route == "guide" and math.isnan(exact.diagnosis.khat)

    for layer, route in [("planar", "neutra"), ("neural_ode", "nuts")]:
        fit = _StubFit(0.9, layer)
        result = _route(fit)
        assert result.route == route and fit.ran == [route]
        assert result.draws["x"].shape == (10,) and result.mcmc.reparam_site == route
        assert f"route={route!r}" in repr(result) and "k-hat 0.8" in repr(result)


def test_failed_neutra_chains_fall_back_to_plain_nuts_and_failed_nuts_warns() -> None:
    """NeuTra chains that do not move (every transition divergent: a flow whose pulled-back
    density traps NUTS) are not returned as trustworthy: plain NUTS runs, and says why."""
    fit = _StubFit(0.9, stuck=("neutra",))
    with pytest.warns(UserWarning, match="NeuTra's chains failed .* NUTS alone can miss"):
        result = _route(fit)  # plain NUTS's chains pass, on a posterior found hard: a warning
    assert fit.ran == ["neutra", "nuts"] and result.route == "nuts"
    assert result.mcmc.reparam_site == "nuts"
    assert "NeuTra's chains failed (100% of transitions diverged" in result.diagnosis.reason
    fit = _StubFit(0.9, stuck=("neutra", "nuts"))
    with pytest.warns(UserWarning, match="route 'nuts': NUTS's chains failed"):
        assert _route(fit).route == "nuts"
    fit = _StubFit(0.9, layer="neural_ode", stuck=("nuts",))
    with pytest.warns(UserWarning, match="split R-hat not finite"):
        assert _route(fit).route == "nuts" and fit.ran == ["nuts"]


def test_route_fit_sends_non_finite_weights_to_nuts() -> None:
    fit = _StubFit(0.2)
    fit.log_weights[3] = -np.inf
    result = _route(fit)
    assert result.route == "neutra" and math.isinf(result.diagnosis.khat)
    assert "infinite" in result.diagnosis.reason


# -- each route end to end, both backends ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_guide_route_on_a_gaussian_posterior(backend: str) -> None:
    b = _backend(backend)
    spec = FlowSpec.planar(num_layers=2, dtype="float64")
    result = b.infer(b.normal, spec, b.y, num_steps=100, num_draws=2000, progress=False)
    assert result.route == "guide" and result.mcmc is None
    assert result.diagnosis.khat < KHAT_GUIDE or "constant" in result.diagnosis.reason
    mu = result.draws["mu"]
    assert mu.shape == (2000,)
    # the fit's own error and 2,000 draws: within a tenth of a posterior sd, and 10% in sd
    assert abs(mu.mean() - POST_MEAN) < 0.1 * POST_SD
    assert mu.std() == pytest.approx(POST_SD, rel=0.1)
    assert result.to_arviz().posterior["mu"].shape == (1, 2000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_psis_route_on_a_skewed_posterior(backend: str, capsys) -> None:
    b = _backend(backend)
    spec = FlowSpec.planar(num_layers=1, dtype="float64")
    options = {**UNTRAINED, "init_loc_fn": b.at_zero}
    result = b.infer(b.skewed, spec, num_steps=1, seed=1, fit_options=options)
    assert "infer: route 'psis'" in capsys.readouterr().err  # progress names the route
    assert result.route == "psis" and 0.5 <= result.diagnosis.khat < 0.7
    proposals, _, _ = result.fit.log_densities(4000, 1)  # the same seed: the same draws
    x = result.draws["x"]
    assert x.shape == (4000,) and np.isin(x, proposals["x"]).all()
    assert np.unique(x).size < 4000 and result.diagnosis.ess < 4000
    assert abs(proposals["x"].mean()) < 0.1  # the guide is N(0, 1)
    assert abs(x.mean() - _skewed_mean()) < 0.12  # moved most of the way from 0 (the guide's)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neutra_route_on_a_funnel_with_a_weak_flow(backend: str) -> None:
    b = _backend(backend)
    spec = FlowSpec.planar(num_layers=1, dtype="float64")
    result = b.infer(
        b.funnel, spec, num_steps=10, num_draws=2000, progress=False, fit_options=NARROW,
        neutra={"num_warmup": 30, "num_samples": 20, "target_accept_prob": 0.9},
    )  # fmt: skip
    assert result.route == "neutra" and result.diagnosis.khat >= result.diagnosis.khat_psis
    assert "NeuTra" in result.diagnosis.reason and "route='neutra'" in repr(result)
    assert isinstance(result.mcmc, NeuTraResult) and result.mcmc.reparam_site
    assert result.draws is result.mcmc.samples
    assert result.draws["v"].shape == (20,) and result.draws["x"].shape == (20, 2)
    assert "diverging" in result.to_arviz().sample_stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_nuts_route_for_a_neural_ode_flow(backend: str) -> None:
    b = _backend(backend)
    spec = FlowSpec.neural_ode(hidden=[4], solver="rk4", num_steps=2, dtype="float64")
    budget = {"num_warmup": 30, "num_samples": 20, "num_chains": 2}
    result = b.infer(
        b.normal, spec, b.y, num_steps=1, num_draws=2000, neutra=budget, progress=False,
        fit_options={**UNTRAINED, **NARROW},
    )  # fmt: skip
    assert result.route == "nuts" and "neural-ODE" in result.diagnosis.reason
    assert result.mcmc.reparam_site == "" and result.mcmc.diverging.shape == (2, 20)
    assert result.draws["mu"].shape == (40,)
    assert np.ptp(result.draws["mu"]) > 0  # the chains moved
    assert abs(result.draws["mu"].mean() - POST_MEAN) < 3 * POST_SD
    assert result.to_arviz().posterior["mu"].shape == (2, 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_options_are_named_before_fitting(backend: str) -> None:
    b = _backend(backend)
    spec = FlowSpec.planar(num_layers=1)
    call = lambda **options: b.infer(b.skewed, spec, progress=False, **options)  # noqa: E731
    with pytest.raises(ValueError, match=r"neutra: unknown option\(s\) \['num_warmups'\]"):
        call(neutra={"num_warmups": 10})
    with pytest.raises(ValueError, match=r"neutra: \['seed'\] are infer's own arguments"):
        call(neutra={"seed": 1})
    with pytest.raises(ValueError, match="num_samples: expected a positive integer, got 0"):
        call(neutra={"num_samples": 0})
    with pytest.raises(ValueError, match=r"target_accept_prob: expected a number in \(0, 1\)"):
        call(neutra={"target_accept_prob": 1.5})
    with pytest.raises(ValueError, match=r"fit_options: unknown option\(s\) \['learning_rat'\]"):
        call(fit_options={"learning_rat": 0.1})
    with pytest.raises(ValueError, match=r"fit_options: \['num_steps'\] are infer's own"):
        call(fit_options={"num_steps": 5})
    with pytest.raises(ValueError, match="num_draws: expected an integer >= 25, got 10"):
        call(num_draws=10)
    with pytest.raises(TypeError, match="neutra: expected a dict or None, got int"):
        call(neutra=3)


def test_a_coordinate_fixed_in_every_draw_is_no_stuck_chain() -> None:
    """A site with a fixed entry (an LKJ Cholesky factor's ``L[0, 0] = 1``, ``L[0, 1] = 0``)
    has no split R-hat there (NaN): `chains_trouble` leaves such coordinates out, so good
    chains are not thrown away, but still flags chains in which nothing moves."""
    rng = np.random.default_rng(0)
    draws = np.zeros((200, 2, 2))
    draws[:, 0, 0] = draws[:, 1, 1] = 1.0
    draws[:, 1, 0] = rng.normal(size=200)
    rhat = np.array([[np.nan, np.nan], [1.01, np.nan]])  # [1, 1] also fixed here
    ok = NeuTraResult({"L": draws}, np.zeros((1, 200), bool), {}, {"L": rhat}, 1, "")
    np.testing.assert_array_equal(ok.moving_r_hat(), [1.01])
    assert chains_trouble(ok) is None and "max R-hat 1.01" in repr(ok)
    stuck = NeuTraResult({"L": np.ones((200, 2, 2))}, np.zeros((1, 200), bool), {},
                         {"L": np.full((2, 2), np.nan)}, 1, "")  # fmt: skip
    assert chains_trouble(stuck) == "split R-hat not finite (a chain that does not move)"
    ok.r_hat["L"][1, 0] = 1.3  # a moving coordinate's R-hat still counts
    assert chains_trouble(ok) == "split R-hat 1.30 > 1.1"
