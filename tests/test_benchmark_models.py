"""The benchmark model zoo: the posteriordb loader, and Pyro and NumPyro models that agree.

The loader tests are backend-free. The cross-check evaluates both translations of each posterior
at reference draws and requires the same log joint (constrained space) and the same potential
(unconstrained space, log-Jacobians included) to 1e-8 in float64: the two models then have the
same density, supports and bijections, so NUTS on the NumPyro one (``benchmarks/check_models.py``)
vouches for both.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest

from benchmarks.models import posteriordb
from benchmarks.models.posteriordb import NAMES, Posterior, latent_values, load

DRAWS = (0, 4321, 9999)
"""Reference draws at which the two backends are compared."""
ATOL = 1e-8


@cache
def _posterior(name: str) -> Posterior:
    return load(name)


@pytest.mark.parametrize("name", NAMES)
def test_reference_shapes_follow_posterior_json(name: str) -> None:
    post = _posterior(name)
    meta = json.loads((posteriordb.DATA_DIR / name / "posterior.json").read_text())
    assert post.names == list(meta["dimensions"])
    for site, size in meta["dimensions"].items():
        array = post.reference[site]
        assert array.shape[0] == 10_000
        assert int(np.prod(array.shape[1:])) == size
        assert np.isfinite(array).all()
    assert set(post.deterministic) <= set(post.names)
    assert post.latent_names == [n for n in post.names if n not in post.deterministic]


def test_reference_reassembles_one_based_names_chain_by_chain() -> None:
    post = _posterior("eight_schools-eight_schools_noncentered")
    with zipfile.ZipFile(posteriordb.DATA_DIR / post.name / "reference_draws.json.zip") as z:
        chains = json.loads(z.read(z.namelist()[0]))
    assert post.reference["theta"].shape == (10_000, 8)
    np.testing.assert_array_equal(post.reference["theta"][:1000, 2], chains[0]["theta[3]"])
    np.testing.assert_array_equal(post.reference["theta"][-1000:, 7], chains[9]["theta[8]"])
    np.testing.assert_array_equal(post.reference["tau"][1000:2000], chains[1]["tau"])
    assert post.data["y"].tolist() == [28, 8, -3, 7, -1, 1, 18, 12]


def test_unknown_posterior_names_the_choices() -> None:
    with pytest.raises(posteriordb.UnknownPosteriorError, match=r"got 'eight_schools'.*") as info:
        load("eight_schools")
    assert "arK-arK" in str(info.value)


def test_reference_name_that_cannot_be_parsed_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot parse parameter name 'theta\\[a\\]'"):
        posteriordb._assemble([{"theta[a]": [0.0]}])


@cache
def _numpyro_evaluator(name: str) -> Callable[[dict[str, np.ndarray]], tuple]:
    """One jitted function per model (op-by-op NumPyro would compile every primitive anew).

    It returns, at constrained latent values, the log joint, the values and types of the
    reference sites, the unconstrained point and the potential (minus the log density there).
    """
    import jax
    from numpyro.infer.util import log_density, potential_energy, unconstrain_fn

    from benchmarks.models.numpyro_models import MODELS

    model, post = MODELS[name], _posterior(name)

    @jax.jit
    def evaluate(values: dict[str, np.ndarray]) -> tuple:
        log_joint, trace = log_density(model, (), post.data, values)
        unconstrained = unconstrain_fn(model, (), post.data, values)
        potential = potential_energy(model, (), post.data, unconstrained)
        sites = {k: trace[k]["value"] for k in post.names}
        return log_joint, sites, unconstrained, potential

    kinds: dict[str, str] = {}

    def record_kinds(values: dict[str, np.ndarray]) -> None:
        _, trace = log_density(model, (), post.data, values)
        for k, s in trace.items():
            observed = s["type"] == "sample" and s["is_observed"]
            kinds[k] = "observed" if observed else s["type"]

    jax.eval_shape(record_kinds, latent_values(post, 0))  # abstract trace: no compilation
    latent = {k for k, kind in kinds.items() if kind == "sample"}
    deterministic = {k for k, kind in kinds.items() if kind == "deterministic"}
    return evaluate, latent, deterministic


@pytest.mark.jax
def test_centered_eight_schools_is_the_noncentered_density_changed_by_its_jacobian() -> None:
    """``theta = mu + tau * theta_trans``: ``log p_c(theta) = log p_nc(theta_trans) - J log tau``.

    NUTS on the centered funnel is unreliable with 1,000 draws, so this identity ties the
    centered model exactly to the non-centered one, whose NUTS check passes.
    """
    centered = _numpyro_evaluator("eight_schools-eight_schools_centered")[0]
    noncentered = _numpyro_evaluator("eight_schools-eight_schools_noncentered")[0]
    post = _posterior("eight_schools-eight_schools_noncentered")
    for index in DRAWS:
        values = latent_values(post, index)
        log_nc = float(noncentered(values)[0])
        theta = post.reference["theta"][index]
        log_c = float(centered({"mu": values["mu"], "tau": values["tau"], "theta": theta})[0])
        assert abs(log_c - (log_nc - theta.size * np.log(values["tau"]))) < ATOL


@pytest.mark.torch
@pytest.mark.jax
@pytest.mark.parametrize("name", NAMES)
def test_pyro_and_numpyro_models_have_the_same_density(name: str) -> None:
    import torch
    from pyro import poutine
    from pyro.infer.mcmc.util import initialize_model

    from benchmarks.models.pyro_models import MODELS

    post, model = _posterior(name), MODELS[name]
    evaluate, numpyro_latent, numpyro_deterministic = _numpyro_evaluator(name)
    assert numpyro_deterministic == set(post.deterministic)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _, pyro_potential, transforms, prototype = initialize_model(
            model, model_kwargs=post.data, max_plate_nesting=0
        )
        latent = {
            k for k, s in prototype.nodes.items() if s["type"] == "sample" and not s["is_observed"]
        }
        deterministic = {
            k for k, s in prototype.nodes.items() if s.get("infer", {}).get("_deterministic")
        }
        assert set(transforms) == latent == numpyro_latent
        assert deterministic == set(post.deterministic)
        for index in DRAWS:
            values = latent_values(post, index)
            assert set(values) == latent
            log_joint, sites, unconstrained, potential = evaluate(values)
            tensors = {k: torch.as_tensor(v) for k, v in values.items()}

            # Constrained space: the log joint of both models and the reference sites' values.
            trace = poutine.trace(poutine.condition(model, tensors)).get_trace(**post.data)
            assert abs(trace.log_prob_sum().item() - float(log_joint)) < ATOL
            for site in post.names:
                expected = post.reference[site][index]
                pyro_value = trace.nodes[site]["value"].numpy()
                np.testing.assert_allclose(pyro_value, expected, rtol=1e-8, atol=ATOL)
                np.testing.assert_allclose(sites[site], expected, rtol=1e-8, atol=ATOL)

            # Unconstrained space: same bijections, same potential (log-Jacobians included).
            pyro_unconstrained = {k: transforms[k](t) for k, t in tensors.items()}
            for k, u in unconstrained.items():
                np.testing.assert_allclose(pyro_unconstrained[k].numpy(), u, rtol=1e-10, atol=ATOL)
            assert abs(pyro_potential(pyro_unconstrained).item() - float(potential)) < ATOL

            # The comparison sees the likelihood: shifting Pyro's observations by 1 breaks it.
            observed = {k: trace.nodes[k]["value"] + 1.0 for k in trace.nodes if k in post.data}
            assert observed
            shifted = poutine.trace(poutine.condition(model, {**tensors, **observed}))
            shifted_log_joint = shifted.get_trace(**post.data).log_prob_sum().item()
            assert abs(shifted_log_joint - float(log_joint)) > 1e-3
    finally:
        torch.set_default_dtype(old_dtype)
