"""A fit of a model that subsamples its data is diagnosed on the full posterior: the ``log_p``
of its draws (PSIS weights, k-hat, `infer`'s route) is the full-data log joint, not one
minibatch's scaled up, whose noise alone would put k-hat far above 0.7. Checked against the
closed-form log joint of a Bayesian logistic regression, both backends."""

from __future__ import annotations

import numpy as np
import pytest

from flowguides import FlowSpec

__all__: list[str] = []

RNG = np.random.default_rng(0)
X = RNG.normal(size=(400, 3))
Y = (RNG.random(400) < 1 / (1 + np.exp(-X @ np.array([1.0, -1.0, 0.5])))).astype(np.float64)
SPEC = FlowSpec.planar(num_layers=1, dtype="float64")
BACKENDS = [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro", marks=pytest.mark.jax)]  # fmt: skip


def log_joint(b: np.ndarray) -> np.ndarray:
    """``log N(b; 0, I) + sum_n log Bernoulli(y_n; sigmoid(x_n b))`` on all 400 rows, per draw."""
    logits = b @ X.T  # (S, n)
    lik = Y * logits - np.logaddexp(0.0, logits)
    prior = -0.5 * np.sum(b**2, axis=-1) - 1.5 * np.log(2 * np.pi)
    return prior + lik.sum(-1)


def _fit(backend: str):
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import fit_posterior

        pyro.clear_param_store()

        def model(x, y):
            b = pyro.sample("b", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
            with pyro.plate("n", x.shape[0], subsample_size=50) as idx:
                logits = (x[idx] * b).sum(-1)  # broadcasts over draws (b: (..., 1, 3))
                pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])

        return fit_posterior(model, SPEC, torch.tensor(X), torch.tensor(Y), num_steps=30,
                             progress=False)  # fmt: skip
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from flowguides.numpyro import fit_posterior

    def model(x, y):
        b = numpyro.sample("b", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
        with numpyro.plate("n", x.shape[0], subsample_size=50) as idx:
            numpyro.sample("y", dist.Bernoulli(logits=x[idx] @ b), obs=y[idx])

    return fit_posterior(model, SPEC, jnp.asarray(X), jnp.asarray(Y), num_steps=30,
                         progress=False)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_p_of_a_subsampled_fit_is_the_full_data_log_joint(backend: str) -> None:
    fit = _fit(backend)
    draws, log_p, _ = fit.log_densities(64, seed=0)
    np.testing.assert_allclose(log_p, log_joint(np.asarray(draws["b"], np.float64)), rtol=1e-6)
    again = fit.log_densities(64, seed=0)[1]  # the same every call: no minibatch in it
    np.testing.assert_allclose(again, log_p, rtol=1e-9)


@pytest.mark.jax
def test_numpyro_evaluates_the_full_data_in_batches_of_draws_with_the_same_values(
    monkeypatch,
) -> None:
    from flowguides.numpyro import _stream

    fit = _fit("numpyro")
    draws, log_p, _ = fit.log_densities(64, seed=1)
    # 400 rows x 10 draws at a time: `lax.map` over 7 batches (the last one short)
    monkeypatch.setattr(_stream, "FULL_DATA_ELEMENTS", 400 * 10)
    fit.__post_init__()  # a fresh compiled program under the smaller budget
    draws2, log_p2, _ = fit.log_densities(64, seed=1)
    np.testing.assert_allclose(np.asarray(draws2["b"]), np.asarray(draws["b"]), rtol=1e-12)
    np.testing.assert_allclose(log_p2, log_p, rtol=1e-10)
    np.testing.assert_allclose(log_p2, log_joint(np.asarray(draws2["b"], np.float64)), rtol=1e-6)
