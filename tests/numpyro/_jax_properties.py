"""Property checks every NumPyro-backend transform passes, compiled once per flow type.

`transform_report` evaluates, in one jitted function, everything the property tests compare:
the fused and separate methods, the round trip, autodiff Jacobians, batch shapes and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowguides.numpyro.build import Flow


def perturbed(flow: Flow, scale: float, seed: int = 0) -> Flow:
    """`flow` with every weight moved by Gaussian noise of sd `scale`."""
    rng = np.random.default_rng(seed)
    params = {k: v + scale * rng.normal(size=v.shape) for k, v in flow.params.items()}
    return Flow(flow.spec, flow.dim, params)


def _report(flow: Flow, x: jax.Array, light: bool = False) -> dict:
    t = flow.transform()
    y, ladj = t.forward_and_log_det(x)
    x_back, ladj_inv = t.inverse_and_log_det(y)
    points = x[0, :3]

    def one(e: jax.Array) -> jax.Array:
        return t.forward_and_log_det(e)[0]

    def objective(params: dict) -> jax.Array:
        other = Flow(flow.spec, flow.dim, params)
        fwd, ladj = other.forward_and_log_det(x)
        return jnp.sum(other.log_prob(x)) + jnp.sum(jnp.sin(fwd)) + jnp.sum(ladj)

    report = {
        "y": y,
        "ladj": ladj,
        "x_back": x_back,
        "ladj_inv": ladj_inv,
        "jacobian": jax.vmap(jax.jacrev(one))(points),
        "grads": jax.grad(objective)(flow.params),
    }
    if light:  # the separate methods are the shared base class's wrappers of the fused ones
        return report
    return report | {
        "y_call": t(x),
        "ladj_separate": t.log_abs_det_jacobian(x, y),
        "x_inv": t.inv(y),
        "scalar": t.forward_and_log_det(x[0, 0]),
        "batch3": t.forward_and_log_det(points),
    }


transform_report = jax.jit(_report, static_argnames="light")


def check_report(r: dict, x: np.ndarray, tol: float) -> None:
    """Assert every property the report holds, to relative tolerance `tol`."""
    close = dict(rtol=tol, atol=tol)
    assert r["y"].shape == x.shape and r["ladj"].shape == x.shape[:-1]
    np.testing.assert_allclose(r["x_back"], x, **close)
    np.testing.assert_allclose(r["ladj_inv"], -r["ladj"], **close)
    _, logdet = np.linalg.slogdet(np.asarray(r["jacobian"]))
    np.testing.assert_allclose(logdet, r["ladj"][0, :3], **close)
    for name, grad in r["grads"].items():
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), name
        assert np.any(grad != 0), f"no gradient reaches {name}"
    if "y_call" not in r:
        return
    np.testing.assert_allclose(r["y_call"], r["y"], **close)
    np.testing.assert_allclose(r["ladj_separate"], r["ladj"], **close)
    np.testing.assert_allclose(r["x_inv"], x, **close)
    y0, l0 = r["scalar"]
    assert y0.shape == x.shape[-1:] and l0.shape == ()
    np.testing.assert_allclose(y0, r["y"][0, 0], **close)
    np.testing.assert_allclose(l0, r["ladj"][0, 0], **close)
    y3, l3 = r["batch3"]
    assert y3.shape == (3, x.shape[-1]) and l3.shape == (3,)
    np.testing.assert_allclose(y3, r["y"][0, :3], **close)


def check_identity(r: dict, x: np.ndarray) -> None:
    """A fresh flow is the identity with log-determinant 0."""
    np.testing.assert_allclose(r["y"], x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r["ladj"], 0.0, atol=1e-12)
