"""Power tests: posteriors that only trained flow layers reach, in both backends.

A closed-form Gaussian posterior is reached by a guide's own start (the Laplace whitening under
the default ``init_scale="auto"``), so a test on one passes with every flow layer frozen at the
identity. The four targets here are not Gaussian (see `_power_models`): a banana, skewed
Gamma-Poisson rates, a 0.3/0.7 mixture of two well-separated Gaussians and Neal's 10-D funnel.
Each case fits one family with `fit_posterior` at a fixed budget and asserts that its
``KL(q || p)`` (``log Z`` is known in closed form) lies `MARGIN` below both

* the guide's start: the same fit before any step (every layer the identity), and
* the layer-free fit: the same budget with the layers' gradients cut, so only the affine
  trains: the best the start's Gaussian family reaches;

and, for the mixture, that the flow puts the known 0.3 weight in the minor mode.

Power: the layer-free fit is itself checked against the closed-form best Gaussian (banana,
Gamma-Poisson), and one case per backend is rerun with its layers frozen and must fail.

What each family is asserted to reach: planar on the banana and the Gamma-Poisson rates,
RealNVP on the banana, the mixture and the funnel, the neural ODE on the banana and the mixture
(planar layers do not split the mixture's modes, nor gain much on the funnel, at this budget).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from flowguides import FlowSpec
from tests.conformance import _power_models as pm

F64 = {"dtype": "float64"}
PLANAR = FlowSpec.planar(num_layers=8, **F64)
REALNVP_2 = FlowSpec.realnvp(num_layers=2, hidden=[16], **F64)
REALNVP_4 = FlowSpec.realnvp(num_layers=4, hidden=[16], **F64)
NEURAL_ODE = FlowSpec.neural_ode(hidden=[8], solver="rk4", num_steps=2, **F64)
UNIT = {"init_scale": 1.0}  # the funnel: "auto" may pick the 0.1 start, where it is stuck
WIDE = {"init_scale": 1.0, "num_particles": 16}  # the mixture: start over both modes

CASES = {  # (family, posterior): how that family is fitted to it
    ("planar", "banana"): pm.Setting(PLANAR, 500),
    ("planar", "gamma_poisson"): pm.Setting(PLANAR, 800),
    ("realnvp", "banana"): pm.Setting(REALNVP_2, 500),
    ("realnvp", "mixture"): pm.Setting(REALNVP_4, 500, **WIDE),
    ("realnvp", "funnel"): pm.Setting(REALNVP_4, 500, **UNIT),
    ("neural_ode", "banana"): pm.Setting(NEURAL_ODE, 400),
    ("neural_ode", "mixture"): pm.Setting(NEURAL_ODE, 400, **WIDE),
}
# the layer-free fit of each posterior: one planar layer, frozen (so the spec does not matter),
# with the posterior's longest budget and its options
BASELINES = {
    "banana": pm.Setting(FlowSpec.planar(num_layers=1, **F64), 500),
    "gamma_poisson": pm.Setting(FlowSpec.planar(num_layers=1, **F64), 800),
    "mixture": pm.Setting(FlowSpec.planar(num_layers=1, **F64), 500, **WIDE),
    "funnel": pm.Setting(FlowSpec.planar(num_layers=1, **F64), 500, **UNIT),
}
MARGIN = {"banana": 0.15, "gamma_poisson": 0.04, "mixture": 0.15, "funnel": 0.4}  # nats
MINOR_WEIGHT, MINOR_TOLERANCE = pm.MIXTURE_WEIGHTS[0], 0.1

BACKENDS = {
    "pyro": [pytest.mark.torch],
    "numpyro": [pytest.mark.jax],
}


def _backend(name: str) -> pytest.param:
    return pytest.param(name, marks=BACKENDS[name], id=name)


@functools.cache
def baseline(backend: str, posterior: str) -> tuple[dict, dict]:
    """``(start, layer_free)`` metrics of `posterior` in `backend` (computed once a session)."""
    pytest.importorskip("torch" if backend == "pyro" else "numpyro")
    setting = BASELINES[posterior]
    layer_free = pm.fit(backend, posterior, setting, frozen="layers")
    start = pm.start_of(backend, posterior, setting, layer_free)
    return pm.metrics(posterior, start), pm.metrics(posterior, layer_free)


@functools.cache
def trained(backend: str, family: str, posterior: str) -> dict:
    """Metrics of the trained case (computed once a session)."""
    pytest.importorskip("torch" if backend == "pyro" else "numpyro")
    return pm.metrics(posterior, pm.fit(backend, posterior, CASES[family, posterior]))


def banana_gaussian_floor() -> float:
    """The least ``KL(q || p)`` of a Gaussian `q` symmetric in ``x1`` to the banana:
    ``min_s s^2/2 - 1/2 - log s + k s^4`` (``s`` the sd of ``x1``, ``k = twist^2 / sd^2``;
    the mean and sd of ``x2`` at their optimum ``(twist (s^2 - 1), sd)``)."""
    k = (pm.BANANA_TWIST / pm.BANANA_SD) ** 2
    s2 = (math.sqrt(1 + 16 * k) - 1) / (8 * k)
    return s2 / 2 - 0.5 - math.log(s2) / 2 + k * s2**2


def gamma_poisson_gaussian_floor() -> float:
    """The least ``KL(q || p)`` of a Gaussian `q` to the log-rates' posterior: per group with
    posterior shape ``a``, ``N(log(a / b) - 1 / (2a), 1 / a)`` is optimal (the target is
    log-concave, so the optimum is global), at ``a + lgamma(a) - a log a + 1/2 -
    log(2 pi e / a) / 2`` whatever the rate ``b``."""
    total = 0.0
    for g in np.unique(pm.GROUP):
        a = pm.RATE_PRIOR[0] + pm.COUNTS[pm.GROUP == g].sum()
        total += a + math.lgamma(a) - a * math.log(a) + 0.5 - math.log(2 * math.pi * math.e / a) / 2
    return total


FLOORS = {"banana": banana_gaussian_floor, "gamma_poisson": gamma_poisson_gaussian_floor}


def shortfall(posterior: str, metric: dict, start: dict, layer_free: dict) -> list[str]:
    """What keeps `metric` from beating the start, the layer-free fit and, where known, the
    best Gaussian by the margin, or from the mixture's minor weight (empty: nothing)."""
    margin, kl = MARGIN[posterior], metric["kl"]
    rivals = {"the start": start["kl"], "the layer-free fit": layer_free["kl"]}
    if posterior in FLOORS:
        rivals["the best Gaussian"] = FLOORS[posterior]()
    out = [
        f"KL {kl:.4f} is not {margin} below {name}'s {value:.4f}"
        for name, value in rivals.items()
        if not kl <= value - margin
    ]
    if posterior == "mixture" and not abs(metric["minor_mass"] - MINOR_WEIGHT) <= MINOR_TOLERANCE:
        out.append(f"minor-mode mass {metric['minor_mass']:.3f}, expected {MINOR_WEIGHT} ± 0.1")
    return out


@pytest.mark.parametrize("family, posterior", list(CASES), ids=[f"{f}-{p}" for f, p in CASES])
@pytest.mark.parametrize("backend", [_backend("pyro"), _backend("numpyro")])
def test_trained_layers_beat_the_start_and_the_layer_free_fit(backend, family, posterior):
    start, layer_free = baseline(backend, posterior)
    metric = trained(backend, family, posterior)
    print(f"{backend} {family} {posterior}: start {start} layer-free {layer_free} trained {metric}")
    assert not shortfall(posterior, metric, start, layer_free)


@pytest.mark.parametrize("posterior", list(FLOORS))
@pytest.mark.parametrize("backend", [_backend("pyro"), _backend("numpyro")])
def test_the_layer_free_fit_is_no_better_than_the_best_gaussian(backend, posterior):
    """The layer-free fit really has no layers to use: it does not beat the closed-form best
    Gaussian (by more than Monte Carlo error), while the trained cases must beat it."""
    start, layer_free = baseline(backend, posterior)
    floor = FLOORS[posterior]()
    assert layer_free["kl"] >= floor - 4 * layer_free["kl_se"] - 0.01, (layer_free, floor)
    assert start["kl"] >= floor - 4 * start["kl_se"] - 0.01, (start, floor)


@pytest.mark.parametrize("backend", [_backend("pyro"), _backend("numpyro")])
def test_power_a_case_with_frozen_layers_fails(backend):
    """The RealNVP banana case, rerun with its layers frozen at the identity, fails the test
    that the trained case passes."""
    family, posterior = "realnvp", "banana"
    start, layer_free = baseline(backend, posterior)
    fitted = pm.fit(backend, posterior, CASES[family, posterior], frozen="layers")
    frozen = pm.metrics(posterior, fitted)
    print(f"{backend} {family} {posterior} frozen: {frozen}")
    assert shortfall(posterior, frozen, start, layer_free)
    assert not shortfall(posterior, trained(backend, family, posterior), start, layer_free)
