"""`AutoFlowGuide`: initial location, Pyro integration (SVI, Predictive, plates), errors."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, init_to_sample

from flowguides.pyro import (
    AutoFlowGuide,
    DiscreteLatentError,
    LaplaceFallbackWarning,
    NoLatentSitesError,
    VectorizationWarning,
)
from flowguides.spec import FlowSpec, SpecError

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64")
DATA = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.1], dtype=torch.float64)


def constrained_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)))
    p = pyro.sample("p", dist.Beta(torch.tensor(2.0, dtype=torch.float64), 2.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=torch.float64)))
    loc = mu[..., 0] + p * w[..., 0]  # indexed from the right: broadcasts over draws
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, sigma), obs=data)


def conjugate_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(mu, 0.5), obs=data)


@pytest.mark.parametrize("init_loc_fn", [None, init_to_sample])
def test_fresh_guide_starts_where_auto_diagonal_normal_does(init_loc_fn):
    kwargs = {} if init_loc_fn is None else {"init_loc_fn": init_loc_fn}
    pyro.set_rng_seed(3)
    reference = AutoDiagonalNormal(constrained_model, **kwargs)
    reference()
    pyro.set_rng_seed(3)
    guide = AutoFlowGuide(constrained_model, SPEC, init_scale=0.2, **kwargs)
    guide()
    loc, scale = reference._loc_scale()
    torch.testing.assert_close(guide.flow.affine.loc.detach(), loc.detach())
    log_scale = guide.flow.affine.log_scale.detach()
    torch.testing.assert_close(log_scale, torch.full_like(log_scale, np.log(0.2)))


def test_draws_respect_the_supports():
    guide = AutoFlowGuide(constrained_model, SPEC, init_scale=1.0)
    draws = Predictive(constrained_model, guide=guide, num_samples=200)()
    assert draws["sigma"].min() > 0
    assert ((draws["p"] > 0) & (draws["p"] < 1)).all()
    sums = draws["w"].sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert draws["obs"].shape == (200, len(DATA))


def test_svi_with_vectorised_particles_and_subsampling_runs_and_learns():
    data = torch.randn(40, dtype=torch.float64) + 3.0

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=torch.float64), 5.0).to_event(1))
        with pyro.plate("data", len(data), subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(mu.sum(-1), 1.0), obs=data[idx])

    guide = AutoFlowGuide(model, FlowSpec.planar(num_layers=2, dtype="float64"))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(4, vectorize_particles=True))
    losses = [svi.step() for _ in range(150)]
    assert np.isfinite(losses).all()
    assert abs(float(guide.median()["mu"].sum()) - 3.0) < 0.5


def test_median_quantiles_and_posterior_of_a_fresh_guide():
    pyro.set_rng_seed(1)
    guide = AutoFlowGuide(constrained_model, SPEC, init_scale=0.05)
    median = guide.median()
    pyro.set_rng_seed(1)
    reference = AutoDiagonalNormal(constrained_model)
    reference()
    expected = reference.median()
    for name, value in expected.items():
        torch.testing.assert_close(median[name], value, rtol=0, atol=0.02)
    q = guide.quantiles([0.1, 0.5, 0.9])
    assert q["w"].shape == (3, 3) and q["mu"].shape == (3, 2) and q["sigma"].shape == (3,)
    assert (q["sigma"][0] < q["sigma"][1]).all() and (q["sigma"][1] < q["sigma"][2]).all()
    posterior = guide.get_posterior()
    x = posterior.rsample((4,))
    assert x.shape == (4, guide.latent_dim)
    torch.testing.assert_close(posterior.log_prob(x), guide.flow.log_prob(x))


def test_laplace_is_exact_for_a_gaussian_posterior():
    guide = AutoFlowGuide(
        conjugate_model,
        SPEC.model_copy(update={"layers": (FlowSpec.planar(num_layers=1).layers[0],)}),
        init_scale="laplace",
    )
    guide()
    precision = 1 / 2.0**2 + len(DATA) / 0.5**2
    mean = (DATA.sum() / 0.5**2) / precision
    fixed = guide.preconditioner
    torch.testing.assert_close(fixed["precondition.shift"], mean.reshape(1))
    expected = torch.tensor([[precision**-0.5]], dtype=torch.float64)
    torch.testing.assert_close(fixed["precondition.scale_tril"], expected)
    # the affine starts as the identity on the whitened coordinates
    assert not guide.flow.affine.loc.detach().any() and not guide.flow.affine.log_scale.any()


def test_laplace_falls_back_with_a_warning_where_the_hessian_is_flat():
    def model():
        pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        normal = dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
        flat = pyro.sample("flat", normal)
        pyro.factor("cancel", -normal.log_prob(flat))  # log p(flat) is constant

    guide = AutoFlowGuide(
        model, FlowSpec.planar(num_layers=1, dtype="float64"), init_scale="laplace"
    )
    with pytest.warns(LaplaceFallbackWarning, match=r"sites \['flat'\]"):
        guide()
    scale = guide.preconditioner["precondition.scale_tril"]  # a diagonal, held as a vector
    torch.testing.assert_close(scale, torch.tensor([1.0, 0.1], dtype=torch.float64))


def eight_schools_centred():
    f64 = torch.float64
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=f64)
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=f64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=f64)))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, 10.0), obs=y)


def test_laplace_refuses_a_funnel_whose_map_runs_off_to_a_collapsed_scale():
    # the joint density of a centred hierarchy grows without bound as tau -> 0: no mode
    guide = AutoFlowGuide(eight_schools_centred, SPEC, init_scale="laplace")
    with pytest.warns(LaplaceFallbackWarning, match="found no mode"):
        guide()
    scale = guide.flow.affine.log_scale.detach().exp()
    torch.testing.assert_close(scale, torch.full_like(scale, 0.1))


def test_auto_start_takes_the_laplace_scales_of_a_badly_scaled_regression():
    f64 = torch.float64
    gen = torch.Generator().manual_seed(0)
    x = 500.0 + 100.0 * torch.randn(50, generator=gen, dtype=f64)
    y = 3.0 + 0.02 * x + torch.randn(50, generator=gen, dtype=f64)

    def regression():
        a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=f64), 100.0))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=f64), 100.0))
        with pyro.plate("data", 50):
            pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)

    guide = AutoFlowGuide(regression, SPEC, init_scale="auto")
    guide()
    design = torch.stack([torch.ones_like(x), x], dim=1)
    precision = design.T @ design + torch.eye(2, dtype=f64) / 100.0**2
    cov = torch.linalg.inv(precision)
    mean = cov @ design.T @ y
    assert cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt() < -0.95  # strongly correlated
    fixed = guide.preconditioner  # full rank: the posterior (Gaussian) exactly
    torch.testing.assert_close(fixed["precondition.shift"], mean, rtol=1e-5, atol=1e-6)
    tril = fixed["precondition.scale_tril"]
    torch.testing.assert_close(tril @ tril.T, cov, rtol=1e-4, atol=0)
    assert tril[1, 1] < 1e-3  # far below the 0.1 a plain start would take
    # the guide's density is that Gaussian's, through the fixed map and its log-determinant
    z = guide.get_posterior().sample((5,))
    expected = dist.MultivariateNormal(mean, covariance_matrix=cov).log_prob(z)
    torch.testing.assert_close(guide.get_posterior().log_prob(z), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(guide.flow.log_prob(z), expected, rtol=0, atol=1e-4)


def funnel():
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 3.0))
    scale = (v / 2).exp().unsqueeze(-1)  # batch-aware, as vectorised particles need
    pyro.sample("x", dist.Normal(torch.zeros(4, dtype=torch.float64), scale).to_event(1))


def test_auto_start_takes_the_wide_start_on_a_funnel_without_a_mode():
    # the MAP runs down the neck (no mode): the 1.0 start has a far higher ELBO than 0.1
    guide = AutoFlowGuide(funnel, SPEC, init_scale="auto")
    guide()
    scale = guide.flow.affine.log_scale.detach().exp()
    torch.testing.assert_close(scale, torch.ones_like(scale))


def test_guide_weights_round_trip():
    guide = AutoFlowGuide(constrained_model, SPEC)
    with pytest.raises(RuntimeError, match="call the guide"):
        guide.get_weights()
    guide()
    weights = guide.get_weights()
    assert list(weights) == list(SPEC.parameter_shapes(guide.latent_dim))
    weights["affine.loc"] = weights["affine.loc"] + 1.0
    assert guide.set_weights(weights) is guide  # chains, as in NumPyro
    np.testing.assert_array_equal(guide.get_weights()["affine.loc"], weights["affine.loc"])
    assert guide.get_flow() is guide.flow


def test_set_preconditioner_sets_removes_and_returns_the_guide():
    guide = AutoFlowGuide(constrained_model, SPEC)
    guide()
    dim = guide.latent_dim
    shift, scales = np.linspace(-1.0, 1.0, dim), np.linspace(0.5, 2.0, dim)
    fixed = {"precondition.shift": shift, "precondition.scale_tril": scales}
    eps = torch.randn(3, dim, dtype=torch.float64)
    with torch.no_grad():
        plain, plain_ladj = guide.flow.forward_and_log_det(eps)
    assert guide.set_preconditioner(fixed) is guide
    np.testing.assert_allclose(guide.preconditioner["precondition.scale_tril"], scales)
    with torch.no_grad():  # z = shift + scales * (the plain flow's output)
        z, ladj = guide.flow.forward_and_log_det(eps)
    torch.testing.assert_close(z, torch.as_tensor(shift) + torch.as_tensor(scales) * plain)
    torch.testing.assert_close(ladj, plain_ladj + float(np.log(scales).sum()))
    assert guide.set_preconditioner(None) is guide and guide.preconditioner is None


def test_discrete_latent_site_is_named_with_a_suggestion():
    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(DiscreteLatentError, match="site 'coin'.*config_enumerate.*TraceEnum_ELBO"):
        AutoFlowGuide(model, SPEC)()


def test_a_guide_over_the_continuous_sites_trains_with_enumeration_in_a_users_loop():
    """The route the discrete-site error names: a mixture with its assignments enumerated
    (``config_enumerate``, `TraceEnum_ELBO`), the guide over the blocked model. Its trace holds
    no site of flowguides' own (a set-up plate's site would fail Pyro's model-guide check under
    this suite's warnings-as-errors), and it finds the two components."""
    from pyro import poutine
    from pyro.infer import TraceEnum_ELBO, config_enumerate
    from pyro.ops.indexing import Vindex

    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(60, generator=gen) - 2.5, torch.randn(60, generator=gen) + 2.5])

    @config_enumerate
    def model(y):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 5.0).to_event(1))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("y", dist.Normal(Vindex(mu)[..., z], 1.0), obs=y)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(poutine.block(model, hide=["z"]), SPEC, init_scale=0.1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), TraceEnum_ELBO(max_plate_nesting=1))
    # the blocked model still draws z: the guide only draws here, so training says nothing
    # (this suite turns warnings into errors) ...
    losses = [svi.step(y) for _ in range(400)]
    assert guide.vectorized is False
    names = {n for n, s in poutine.trace(guide).get_trace(y).nodes.items() if s["type"] == "sample"}
    assert names == {"_auto_latent", "w", "mu"}
    assert np.mean(losses[-50:]) < np.mean(losses[:50]) - 10
    means = torch.sort(guide.median(y)["mu"]).values
    torch.testing.assert_close(means, torch.tensor([-2.5, 2.5]), atol=0.5, rtol=0)
    # ... until the guide evaluates that log joint itself: then it says why it is noisy, once
    draws = guide.get_posterior(y).sample((3,))
    with pytest.warns(VectorizationWarning, match="changes from call to call .* poutine.block"):
        guide.batch_log_joint(draws, (y,))
    guide.batch_log_joint(draws, (y,))


def test_the_guides_first_call_records_no_site_of_its_own():
    """Set-up (its vectorisation check runs the model under a plate of draws) inside a
    user's trace of the guide: the trace holds the guide's latent and the model's sites only
    (a Pyro plate records its subsample site when built; `TraceEnum_ELBO` warns on it)."""
    from pyro import poutine

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=y.dtype), 5.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu.sum(-1), 1.0), obs=y)

    pyro.clear_param_store()
    guide = AutoFlowGuide(model, SPEC)
    trace = poutine.trace(guide).get_trace(torch.zeros(5, dtype=torch.float64))
    assert guide.vectorized
    assert {n for n, s in trace.nodes.items() if s["type"] == "sample"} == {"_auto_latent", "mu"}


def test_model_without_latent_sites_is_rejected():
    def model():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(NoLatentSitesError, match="no latent sample sites"):
        AutoFlowGuide(model, SPEC)()


def test_spec_needing_more_dimensions_than_the_model_has():
    with pytest.raises(SpecError, match="needs dim >= 2, got dim=1.*1 latent dimension.*'mu'"):
        AutoFlowGuide(conjugate_model, SPEC)()


@pytest.mark.parametrize("init_scale", [0.0, -1.0, "wide", float("nan"), float("inf"), True])
def test_bad_init_scale(init_scale):
    with pytest.raises(
        ValueError, match="init_scale: expected a positive number, 'laplace' or 'auto'"
    ):
        AutoFlowGuide(conjugate_model, SPEC, init_scale=init_scale)


def test_normal_base_is_rejected():
    with pytest.raises(SpecError, match="base: .*expected 'affine', got 'normal'"):
        AutoFlowGuide(conjugate_model, FlowSpec.planar(num_layers=1, base="normal"))


def test_neural_ode_guide_scores_its_own_draws_without_an_inverse_solve(monkeypatch):
    spec = FlowSpec.neural_ode(hidden=[4], solver="euler", num_steps=2, dtype="float64")
    guide = AutoFlowGuide(constrained_model, spec)
    guide()

    def no_inverse(*_):
        raise AssertionError("the inverse solve was called")

    monkeypatch.setattr(guide.flow.layers[0], "inverse_and_log_det", no_inverse)
    svi = SVI(
        constrained_model,
        guide,
        pyro.optim.Adam({"lr": 0.01}),
        Trace_ELBO(3, vectorize_particles=True),
    )
    assert np.isfinite([svi.step() for _ in range(3)]).all()
