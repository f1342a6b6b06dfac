"""The staged guide set-up and `fit_posterior`'s direct SVI state agree with NumPyro's own
`initialize_model` and `svi.init`."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.initialization import init_to_median
from numpyro.infer.util import initialize_model

from flowguides.numpyro import AutoFlowGuide, clear_compiled
from flowguides.numpyro import posterior as posterior_module
from flowguides.spec import FlowSpec

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[4], dtype="float64")


MODEL_RUNS = itertools.count()  # how often the model's Python code ran (keyed by identity)


def model(x, y=None):
    next(MODEL_RUNS)
    # sites out of alphabetical order, constrained supports, a plate and a deterministic site
    sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    rho = numpyro.sample("rho", dist.Uniform(-1.0, 1.0))
    numpyro.deterministic("w_sum", w.sum() + rho)
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w + rho, sigma), obs=y)


X = np.linspace(-1.0, 1.0, 16).reshape(8, 2)
Y = np.sin(np.arange(8.0))


def _set_up(guide: AutoFlowGuide, key: jax.Array) -> None:
    with handlers.seed(rng_seed=key):
        guide._setup_prototype(X, Y)


def test_staged_set_up_matches_initialize_model_and_compiles_once():
    key = jax.random.key(3)
    clear_compiled()  # whatever ran before, this test's first guide compiles
    before = next(MODEL_RUNS)
    guide = AutoFlowGuide(model, SPEC)
    _set_up(guide, key)
    first = next(MODEL_RUNS) - before - 1
    with handlers.seed(rng_seed=key):
        guide_key = numpyro.prng_key()  # the key AutoGuide's set-up draws
    info = initialize_model(
        guide_key, model, init_strategy=init_to_median, dynamic_args=True, model_args=(X, Y)
    )
    # same values (same key, same draws) and NumPyro's packing order: model order
    assert list(guide._init_locs) == list(info.param_info.z) == ["sigma", "w", "rho"]
    for name, value in info.param_info.z.items():
        np.testing.assert_allclose(guide._init_locs[name], value, rtol=1e-12)
    # the same potential and constraining at a point away from the start
    z = {k: v + 0.3 for k, v in info.param_info.z.items()}
    np.testing.assert_allclose(guide._potential_fn(z), info.potential_fn(X, Y)(z), rtol=1e-12)
    ours = guide._postprocess_fn(z)
    theirs = info.postprocess_fn(X, Y)(z)
    assert set(ours) == set(theirs) == {"sigma", "w", "rho", "w_sum"}
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-12)
    assert set(guide.prototype_trace) == set(info.model_trace)
    # a second guide of the same model and argument shapes reuses the compiled program: its
    # set-up runs the model's code fewer times (no trace of the set-up program), and after
    # `clear_compiled` as many as the first
    runs = []
    for clear in (False, True):
        if clear:
            clear_compiled()
        before = next(MODEL_RUNS)
        _set_up(AutoFlowGuide(model, SPEC), jax.random.key(4))
        runs.append(next(MODEL_RUNS) - before - 1)
    assert runs[0] < first == runs[1]


def test_model_with_its_own_params_takes_numpyros_set_up_and_svi_init():
    def with_param(x, y=None):
        shift = numpyro.param("shift", jnp.zeros(()))
        w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(x @ w + shift, 1.0).to_event(1), obs=y)

    guide = AutoFlowGuide(with_param, SPEC)
    svi = SVI(with_param, guide, optax.adam(1e-2), Trace_ELBO())
    with handlers.seed(rng_seed=jax.random.split(jax.random.key(0), 3)[2]):
        guide._setup_prototype(X, Y)  # as `fit_posterior` sets it up
    state = posterior_module._init_state(svi, guide, jax.random.key(0), (X, Y), {})
    params = svi.get_params(state)
    assert "shift" in params and "auto_affine.loc" in params
    assert guide.latent_dim == 2


def test_staged_set_up_steps_aside_inside_jit_without_leaking_tracers():
    def draw(key):
        guide = AutoFlowGuide(model, SPEC)
        with handlers.seed(rng_seed=key):
            # NumPyro's `AutoContinuous` set-up, which stages it (the flow's own set-up after
            # it needs concrete values): with a traced key it takes NumPyro's path
            super(AutoFlowGuide, guide)._setup_prototype(X, Y)
        with handlers.seed(rng_seed=key):
            numpyro.prng_key()  # the staged path's key, which it leaves unused here
            guide_key = numpyro.prng_key()  # the key NumPyro's set-up draws after it
        info = initialize_model(
            guide_key, model, init_strategy=init_to_median, dynamic_args=True, model_args=(X, Y)
        )
        return guide._init_locs["w"], info.param_info.z["w"]

    with jax.checking_leaks():
        ours, theirs = jax.jit(draw)(jax.random.key(0))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_direct_state_equals_svi_init():
    key = jax.random.key(7)
    guides = [AutoFlowGuide(model, SPEC, init_scale="laplace") for _ in range(2)]
    svis = [
        SVI(model, g, optax.adam(1e-2), Trace_ELBO(num_particles=2, vectorize_particles=True))
        for g in guides
    ]
    with handlers.seed(rng_seed=jax.random.split(key, 3)[2]):
        guides[0]._setup_prototype(X, Y)  # as `fit_posterior` sets it up
    ours = posterior_module._init_state(svis[0], guides[0], key, (X, Y), {})
    theirs = svis[1].init(key, X, Y)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(a, b, rtol=1e-12)
    p_ours, p_theirs = svis[0].get_params(ours), svis[1].get_params(theirs)
    assert "auto_precondition.scale_tril" in p_ours
    # one step from each state: the same loss and the same parameters
    (s1, l1), (s2, l2) = svis[0].update(ours, X, Y), svis[1].update(theirs, X, Y)
    np.testing.assert_allclose(l1, l2, rtol=1e-10)
    for name in p_theirs:
        np.testing.assert_allclose(
            svis[0].get_params(s1)[name], svis[1].get_params(s2)[name], rtol=1e-10
        )
