"""The model zoo through the Pyro backend: every model, every step a user takes.

Each model goes through `fit_posterior` -> `sample` (shapes and supports against the model's
own trace, moments against the closed form where one exists) -> `diagnose` -> `to_arviz` ->
`Predictive` with the trained guide (the observed sites predicted with the data left out) ->
save, a fresh param store, load (the same draws and densities for the same seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Predictive
from pyro.poutine.util import site_is_subsample

import flowguides
from flowguides.core import FitBelowStartWarning, MaskedLatentWarning
from flowguides.pyro import PosteriorFit, VectorizationWarning, fit_posterior
from flowguides.spec import FlowSpec
from tests.zoo import data
from tests.zoo import models_pyro as m
from tests.zoo.checks import (
    NUM_DRAWS,
    Warnings,
    check_moments,
    check_posterior_group,
)

pytestmark = pytest.mark.torch

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[16])
PLANAR = FlowSpec.planar(num_layers=2)  # one latent dimension: a coupling has nothing to split
NUM_PREDICTIVE = 20
FEW_STEPS = 100  # models that run one particle at a time, or have no closed form to meet
NUM_WEIGHTED = 100  # draws for diagnose, to_arviz and log_densities (one compile in NumPyro)


def _tau_is_the_type2_estimate(fit: PosteriorFit) -> None:
    """The ELBO's maximiser over tau, with a guide close to the posterior, is the marginal
    likelihood's (tau left at its initial 1.0 would be 46% off)."""
    tau = float(pyro.param("tau").detach())
    assert abs(tau - data.type2_tau_hat()) < 0.06 * data.type2_tau_hat(), tau


def _covariance_is_positive_definite(predictions: dict) -> None:
    assert bool((torch.linalg.eigvalsh(predictions["cov"]) > 0).all())


@dataclass(frozen=True)
class Case:
    """One zoo model: how to fit it, how to predict with it, and what to check.

    Attributes:
        model: the model.
        args: its arguments for fitting.
        predict_args: its arguments for prediction (the observed data left out).
        predicted: ``{site: shape}`` that `Predictive` must return (observed and
            deterministic sites).
        exact: the closed-form posterior ``{site: (mean, sd)}``, where there is one.
        vectorizes: whether the model broadcasts over a leading particle dimension (when it
            does not, the fit runs particles one by one and says so in one warning).
        fit_check: a check of the fit itself (a learned model parameter).
        may_warn: warnings the fit may give (not required), with the reason at the case.
        predictive_check: a check of `Predictive`'s output.
        spec, steps, learning_rate: the flow and its training.
    """

    model: Callable
    args: tuple
    predict_args: tuple
    predicted: dict[str, tuple]
    exact: Callable[[], dict] | None = None
    vectorizes: bool = True
    fit_check: Callable[[PosteriorFit], None] | None = None
    predictive_check: Callable[[dict], None] | None = None
    may_warn: tuple[type[Warning], ...] = ()
    spec: FlowSpec = SPEC
    steps: int = 200
    learning_rate: float = 5e-3


CASES = {
    "one_latent": Case(
        m.one_latent, (m.ONE_Y,), (), {"y": (10,)}, data.one_latent_exact, spec=PLANAR
    ),
    "linear_regression_global_X": Case(
        m.linear_regression, (m.LIN_Y,), (), {"y": (30,)}, data.linreg_exact, vectorizes=False
    ),
    "beta_bernoulli_loop": Case(
        m.beta_bernoulli,
        (len(data.FLIPS), m.FLIPS),
        (len(data.FLIPS),),
        {f"flip_{i}": () for i in range(len(data.FLIPS))},
        data.beta_bernoulli_exact,
        spec=PLANAR,
    ),
    "gamma_poisson_closure": Case(
        m.make_gamma_poisson(m.EXPOSURE),
        (m.COUNTS,),
        (),
        {"counts": (12,)},
        data.gamma_poisson_exact,
        spec=PLANAR,
    ),
    "dirichlet_multinomial": Case(
        m.dirichlet_multinomial,
        (m.CATEGORY_COUNTS,),
        (None, 40),
        {"counts": (4,)},
        data.dirichlet_multinomial_exact,
    ),
    "ordered_logistic": Case(m.ordered_logistic, (m.ORD_X, m.ORD_Y), (m.ORD_X,), {"y": (60,)}),
    "lkj_cholesky": Case(
        m.lkj_cholesky,
        (50, m.MVN_DATA),
        (50,),
        {"obs": (50, 3)},
        vectorizes=False,
        steps=FEW_STEPS,
    ),
    "covariance_matrix": Case(
        m.covariance_matrix,
        (50, m.MVN_DATA),
        (50,),
        {"obs": (50, 3), "cov": (3, 3)},
        vectorizes=False,
        predictive_check=_covariance_is_positive_definite,
        steps=FEW_STEPS,
    ),
    "type2_ml_param": Case(
        m.type2_ml,
        (m.T2_Y,),
        (),
        {"y": (10,)},
        data.type2_exact,
        fit_check=_tau_is_the_type2_estimate,
        steps=300,
        learning_rate=1e-2,
    ),
    "subsampled_logistic": Case(
        m.subsampled_logistic,
        (m.LOGIT_X, m.LOGIT_Y),
        (m.LOGIT_X,),
        {"y": (data.SUBSAMPLE_SIZE,)},
        vectorizes=False,
        steps=FEW_STEPS,
    ),
    "masked_outliers": Case(
        m.masked_outliers, (m.OUT_Y,), (), {"y": (20,)}, data.outliers_exact, spec=PLANAR
    ),
    "missing_values_obs_mask": Case(
        m.missing_values,
        (20, m.MISS_Y, m.MISS_OBSERVED),
        (20,),
        {"y": (20,)},
        data.obs_mask_exact,
        # y_unobserved's observed positions carry no density: said, not required to fail
        may_warn=(MaskedLatentWarning,),
    ),
    "eight_schools_deterministic": Case(
        m.eight_schools,
        (m.SCHOOLS_SIGMA, m.SCHOOLS_Y),
        (m.SCHOOLS_SIGMA,),
        {"y": (8,), "theta": (8,)},
    ),
    "many_sites": Case(
        m.many_sites,
        (m.MANY_Y,),
        (),
        {"y": (20,)},
        data.many_sites_exact,
        vectorizes=False,
        steps=FEW_STEPS,
    ),
    "varying_intercepts": Case(
        m.varying_intercepts,
        (m.GROUP, m.GROUP_Y),
        (m.GROUP,),
        {"y": (30,)},
        vectorizes=False,
        steps=FEW_STEPS,
        # the first loss is one 4-particle estimate at the start, over seeds 0-3 31.0-33.3
        # (mapped; 32.5-33.7 in Pyro's loop), the trained guide's 32.8: a start drawn that
        # low reads as "clearly" better than the end (FitBelowStartWarning judges the start's
        # noise by the end's smaller spread); it did at seed 0 once training was mapped
        may_warn=(FitBelowStartWarning,),
    ),
    "ar1_loop": Case(
        m.ar1,
        (len(data.AR_Y), m.AR_Y),
        (len(data.AR_Y),),
        {f"y_{t}": () for t in range(len(data.AR_Y))},
    ),
}


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def _latent_sites(model: Callable, args: tuple) -> dict[str, dict]:
    """The model's latent sample sites, from Pyro's own trace of it."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args)
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _deterministic_shapes(model: Callable, args: tuple) -> dict[str, tuple]:
    """``{site: shape}`` of the model's ``pyro.deterministic`` sites, which draws carry too."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args)
    return {
        name: tuple(site["value"].shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site["infer"].get("_deterministic")
    }


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model(name, tmp_path):
    case = CASES[name]
    latent = _latent_sites(case.model, case.args)
    shapes = {n: tuple(site["value"].shape) for n, site in latent.items()}
    pyro.clear_param_store()
    with Warnings() as caught:
        fit = fit_posterior(
            case.model,
            case.spec,
            *case.args,
            num_steps=case.steps,
            num_particles=4,
            learning_rate=case.learning_rate,
            progress=False,
        )
        assert np.all(np.isfinite(fit.losses)) and fit.losses.shape == (case.steps,)
        if case.fit_check is not None:
            case.fit_check(fit)

        draws = fit.sample(NUM_DRAWS, seed=1)
        determ = _deterministic_shapes(case.model, case.args)
        assert set(draws) == set(shapes) | set(determ)
        for site, shape in determ.items():
            assert draws[site].shape == (NUM_DRAWS, *shape), site
        for site, shape in shapes.items():
            assert draws[site].shape == (NUM_DRAWS, *shape), site
            inside = latent[site]["fn"].support.check(torch.as_tensor(draws[site]))
            assert bool(inside.all()), f"site {site!r}: draws outside {latent[site]['fn'].support}"
        if case.exact is not None:
            check_moments(draws, case.exact())

        diagnosis = flowguides.diagnose(fit, num_samples=NUM_WEIGHTED, seed=2)
        assert isinstance(diagnosis, flowguides.Diagnosis)
        assert math.isfinite(diagnosis.khat) and math.isfinite(diagnosis.elbo), diagnosis

        idata = flowguides.to_arviz(fit, num_samples=NUM_WEIGHTED, seed=3)
        check_posterior_group(idata, {**shapes, **determ}, NUM_WEIGHTED)

        predictive = Predictive(case.model, guide=fit.guide, num_samples=NUM_PREDICTIVE)
        predictions = predictive(*case.predict_args)
        running = _latent_sites(case.model, case.predict_args)  # with the data left out
        returned = {**case.predicted, **{n: s for n, s in shapes.items() if n in running}}
        for site, shape in returned.items():
            value = predictions[site]  # Pyro pads sites outside plates: (S, 1, ..., *shape)
            pad = value.dim() - 1 - len(shape)
            expected = (NUM_PREDICTIVE, *(1,) * pad, *shape)
            assert pad >= 0 and tuple(value.shape) == expected, (site, tuple(value.shape))
            assert bool(torch.isfinite(value.double()).all()), site
        if case.predictive_check is not None:
            case.predictive_check(predictions)

        before = fit.log_densities(NUM_WEIGHTED, seed=4)
        path = flowguides.save(fit, tmp_path / "fit")
        pyro.clear_param_store()  # as in a new session
        loaded = flowguides.load(path, backend="pyro", model=case.model, model_args=case.args)
        after = loaded.log_densities(NUM_WEIGHTED, seed=4)
        for site in shapes:
            np.testing.assert_allclose(after[0][site], before[0][site], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-4, err_msg="log p")
        np.testing.assert_allclose(after[2], before[2], rtol=1e-5, atol=1e-4, err_msg="log q")
    caught.check(None if case.vectorizes else VectorizationWarning, case.may_warn)


def test_zoo_has_every_kind_of_model():
    """The zoo covers what the issue asks: at least 15 models, every common support (torch
    has no bijection onto positive-definite matrices: an LKJ correlation matrix stands in)."""
    assert len(CASES) >= 15
    sites = [
        site for case in CASES.values() for site in _latent_sites(case.model, case.args).values()
    ]
    supports = [site["fn"].support for site in sites]
    supports = [getattr(c, "base_constraint", c) for c in supports]  # independent(...)

    def interval(lower: float, upper: float) -> Callable:
        return lambda c: (
            isinstance(c, type(constraints.interval(0, 1)))
            and (float(c.lower_bound), float(c.upper_bound)) == (lower, upper)
        )

    kinds = {
        "real": lambda c: c is constraints.real,
        "positive": lambda c: c in (constraints.positive, constraints.nonnegative),
        "unit interval": interval(0.0, 1.0),
        "interval": interval(-1.0, 1.0),
        "simplex": lambda c: c is constraints.simplex,
        "ordered vector": lambda c: c is constraints.ordered_vector,
        "correlation Cholesky": lambda c: c is constraints.corr_cholesky,
        "correlation matrix": lambda c: c is constraints.corr_matrix,
    }
    for kind, is_kind in kinds.items():
        assert any(is_kind(c) for c in supports), kind
    assert any(len(_latent_sites(c.model, c.args)) == 1 for c in CASES.values())
    assert any(len(_latent_sites(c.model, c.args)) >= 20 for c in CASES.values())
