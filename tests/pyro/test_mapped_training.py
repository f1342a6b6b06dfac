"""Training a model written for one draw (``X[idx] @ w``) with its particles mapped by
`torch.func.vmap` (`MappedLoss`): the same log-weights and gradients as Pyro's own
`Trace_ELBO` loop at the same draws and minibatches (control variate included), a fit that
reaches the closed-form posterior, and the loop kept where mapping cannot see everything."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from flowguides.pyro import VectorizationWarning, _training, fit_posterior
from flowguides.pyro._control import with_control_variate
from flowguides.pyro._stream import draw_indices
from flowguides.pyro._training import MappedLoss, mapped_training
from flowguides.pyro.guide import AutoFlowGuide
from flowguides.spec import FlowSpec

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[8], dtype="float64")
GEN = torch.Generator().manual_seed(0)
N, NOISE, PRIOR_SD = 400, 0.5, 2.0
X = torch.randn(N, 3, generator=GEN, dtype=torch.float64)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
Y = Y + NOISE * torch.randn(N, generator=GEN, dtype=torch.float64)
LABELS = (torch.rand(N, generator=GEN, dtype=torch.float64) < torch.sigmoid(X[:, 0] - X[:, 1])).to(
    torch.float64
)


def regression(x, y):  # as users write it: x[idx] @ b does not broadcast over draws
    b = pyro.sample("b", dist.Normal(x.new_zeros(3), PRIOR_SD).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=200) as idx:  # subsets: 200 of 400
        pyro.sample("obs", dist.Normal(x[idx] @ b, NOISE), obs=y[idx])


def logistic(x, labels):  # a constrained site too (the Jacobian) and a non-quadratic joint
    w = pyro.sample("w", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(x.new_tensor(1.0)))
    with pyro.plate("data", x.shape[0], subsample_size=25) as idx:
        pyro.sample("y", dist.Bernoulli(logits=s * (x[idx] @ w)), obs=labels[idx])


def broadcasting(x, labels):  # the same model written to broadcast over draws
    w = pyro.sample("w", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(x.new_tensor(1.0)))
    with pyro.plate("data", x.shape[0], subsample_size=25) as idx:
        pyro.sample("y", dist.Bernoulli(logits=s * (x[idx] * w).sum(-1)), obs=labels[idx])


def _guide(model, *args):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, SPEC, init_scale="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guide._setup_if_needed(*args)
    warned = any(issubclass(w.category, VectorizationWarning) for w in caught)
    assert warned is (model is not broadcasting) and guide.vectorized is (model is broadcasting)
    with torch.no_grad():  # a flow away from the identity, so log q is not the base's
        for p in guide.flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=GEN, dtype=p.dtype))
    return guide


@pytest.mark.parametrize("model", [logistic, broadcasting])
@pytest.mark.parametrize("control_variate", ["none", "taylor"])
def test_mapped_log_weights_and_gradients_are_the_loops_at_the_same_draws(control_variate, model):
    """Per draw and minibatch, `MappedLoss.weights_at` equals minus Pyro's `Trace_ELBO` loss
    of one particle with the guide's latent and the plate's indices fixed to the same
    values (the model wrapped with the control variate where it is on), value and gradient
    in the flow's weights, to 1e-10. A subsampled model that broadcasts trains mapped too:
    Pyro's vectorised ELBO would give all its particles one minibatch."""
    guide = _guide(model, X, LABELS)
    train, on = with_control_variate(control_variate, model, guide)
    assert mapped_training(guide) and on == (control_variate == "taylor")
    loss = MappedLoss(guide, "elbo", "reparam", 4, 1, guide._reference if on else None)
    pyro.set_rng_seed(3)
    latent, log_q = guide.flow.sample_and_log_prob((4,))
    indices = draw_indices(loss.plates, 4, latent.device)
    weights = loss.weights_at(model, latent, log_q, indices, (X, LABELS), {})[0].reshape(-1)
    params = list(guide.flow.parameters())
    mapped_grad = torch.autograd.grad(weights.sum(), params, retain_graph=True)

    elbo, latent_site = Trace_ELBO(num_particles=1), f"_{guide._pyro_name}_latent"
    looped = []
    for i in range(4):
        model = poutine.condition(train, data={"data": indices["data"][i]})
        one_guide = poutine.condition(guide, data={latent_site: latent[i]})
        looped.append(-elbo.differentiable_loss(model, one_guide, X, LABELS))
    looped = torch.stack(looped)
    loop_grad = torch.autograd.grad(looped.sum(), params)
    torch.testing.assert_close(weights, looped, rtol=1e-10, atol=1e-10)
    for a, b in zip(mapped_grad, loop_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert weights.std() > 0 and max(float(g.abs().max()) for g in mapped_grad) > 0


def test_a_mapped_fit_reaches_the_closed_form_posterior(monkeypatch):
    """A subsampled regression written with ``x[idx] @ b`` trains through `MappedLoss` (one
    mapped loss per step, the loop never) from a plain start (the flow must move), and its
    draws match the conjugate posterior."""
    calls = {"mapped": 0, "loop": 0}
    mapped_loss, loop_loss = MappedLoss.differentiable_loss, Trace_ELBO.differentiable_loss

    def count(kind, original):
        def wrapped(self, *args, **kwargs):
            calls[kind] += 1
            return original(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(MappedLoss, "differentiable_loss", count("mapped", mapped_loss))
    monkeypatch.setattr(Trace_ELBO, "differentiable_loss", count("loop", loop_loss))
    pyro.set_rng_seed(0)
    with pytest.warns(VectorizationWarning):
        fit = fit_posterior(
            regression, SPEC, X, Y, num_steps=2000, init_scale=0.1, seed=1, progress=False
        )
    assert calls == {"mapped": 2000, "loop": 0}
    eye = torch.eye(3, dtype=torch.float64)
    cov = torch.linalg.inv(X.T @ X / NOISE**2 + eye / PRIOR_SD**2)
    mean, sd = (cov @ X.T @ Y / NOISE**2).numpy(), cov.diagonal().sqrt().numpy()
    draws = fit.sample(4000, seed=0)["b"]
    assert np.abs(draws.mean(0) - mean).max() < 0.25 * sd.min()
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.15)
    assert fit.losses[-100:].mean() < fit.losses[:20].mean() - 5.0  # trained from afar


def test_a_model_with_its_own_param_keeps_the_loop_and_trains_it(monkeypatch):
    """A model's ``pyro.param`` is invisible to a mapped log joint (it runs blocked), so such a
    model trains in Pyro's loop, and the parameter moves to its optimum."""

    def with_param(x, y):
        shift = pyro.param("shift", x.new_tensor(0.0))
        b = pyro.sample("b", dist.Normal(x.new_zeros(3), PRIOR_SD).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=40) as idx:
            pyro.sample("obs", dist.Normal(x[idx] @ b + shift, NOISE), obs=y[idx] + 1.0)

    used = []
    monkeypatch.setattr(_training.MappedLoss, "differentiable_loss", lambda *a, **k: used.append(1))
    pyro.clear_param_store()
    with pytest.warns(VectorizationWarning):
        fit = fit_posterior(with_param, SPEC, X, Y, num_steps=400, seed=0, progress=False)
    assert not mapped_training(fit.guide) and fit.guide.mappable and not used
    assert abs(pyro.param("shift").item() - 1.0) < 0.1
