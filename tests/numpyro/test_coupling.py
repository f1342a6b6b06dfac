"""RealNVP couplings: properties, identity at init, the conventions, the soft clamp."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowguides.numpyro.build import build_flow, get_weights
from flowguides.numpyro.coupling import RealNVP, init_realnvp
from flowguides.spec import FlowSpec, RealNVPSpec
from tests.numpyro._jax_properties import perturbed, transform_report

# odd dim (d1 = 2, d2 = 3), random permutations, gelu: the least symmetric case
SPEC = FlowSpec.realnvp(
    num_layers=3, hidden=[6], activation="gelu", permutation="random", seed=3, dtype="float64"
)
X = np.random.default_rng(1).normal(size=(2, 4, 5))


@pytest.mark.parametrize("orientation", ["sampling", "density"])
def test_realnvp_matches_the_conventions_in_numpy(orientation):
    from scipy.special import erf

    spec = SPEC.model_copy(
        update={"layers": (SPEC.layers[0].model_copy(update={"orientation": orientation}),)}
    )
    flow = perturbed(build_flow(spec, 5, seed=2), 0.6, seed=5)
    w = get_weights(flow)
    perms = SPEC.layers[0].permutations(5)
    z, ladj = X.copy(), np.zeros(X.shape[:-1])
    for r in range(3):
        h = z[..., :2] @ w["layers.0.net.0.weight"][r].T + w["layers.0.net.0.bias"][r]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        o = h @ w["layers.0.net.1.weight"][r].T + w["layers.0.net.1.bias"][r]
        t, s = o[..., :3], 3.0 * np.tanh(o[..., 3:] / 3.0)
        if orientation == "sampling":
            z = np.concatenate([z[..., :2], z[..., 2:] * np.exp(s) + t], axis=-1)
            ladj += s.sum(-1)
        else:  # the density direction is z * exp(s) + t: sampling runs its inverse
            z = np.concatenate([z[..., :2], (z[..., 2:] - t) * np.exp(-s)], axis=-1)
            ladj -= s.sum(-1)
        if r < 2:
            z = z[..., perms[r]]
    z = w["affine.loc"] + np.exp(w["affine.log_scale"]) * z
    ladj += w["affine.log_scale"].sum()
    r = transform_report(flow, X)
    np.testing.assert_allclose(r["y"], z, rtol=1e-12)
    np.testing.assert_allclose(r["ladj"], ladj, rtol=1e-12)


def test_soft_clamp_bounds_the_log_scale():
    spec = RealNVPSpec(repeat=1, hidden=(4,), scale_clamp=0.5)
    params = jax.tree.map(lambda v: v + 50.0, init_realnvp(spec, 4, jax.random.key(0), jnp.float64))
    t = RealNVP(params, spec, 4)
    _, ladj = t.forward_and_log_det(jnp.asarray(X[..., :4]) * 10)
    assert np.all(np.abs(ladj) <= 2 * 0.5 + 1e-12)
    assert np.any(np.abs(ladj) > 0.9)
