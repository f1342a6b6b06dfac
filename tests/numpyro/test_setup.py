"""The staged guide set-up and `fit_posterior`'s direct SVI state agree with NumPyro's own
`initialize_model` and `svi.init`; the start search, the timings and the draws' program."""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.initialization import init_to_median
from numpyro.infer.util import initialize_model
from numpyro.optim import optax_to_numpyro

from flowguides.core import AUTO_SCALES
from flowguides.core.timing import FIT_TIMING_KEYS
from flowguides.numpyro import AutoFlowGuide, clear_compiled, fit_posterior, laplace
from flowguides.numpyro import guide as guide_module
from flowguides.numpyro._control import initial_state
from flowguides.numpyro._training import cached
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


class _Shifted(dist.Normal):
    """A user's distribution with an attribute of its own (not a pytree field) and, with
    `hold`, a function that closes over a value computed in the model."""

    def __init__(self, loc, scale, hold=False):
        super().__init__(loc, scale)
        self.offset = loc + 1.0  # dropped by NumPyro's pytree round trip
        self.hint = (lambda: loc) if hold else None


def _user_model(hold):
    def user_model(x, y=None):
        next(MODEL_RUNS)
        w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
        s = numpyro.sample("s", _Shifted(w.sum(), 1.0, hold))
        mix = dist.MixtureSameFamily(
            dist.Categorical(probs=jnp.array([0.3, 0.7])), dist.Normal(jnp.array([-1.0, 1.0]), 1.0)
        )
        numpyro.sample("m", mix)
        numpyro.factor("f", -(w**2).sum())
        with numpyro.plate("n", x.shape[0]):
            numpyro.sample("y", dist.Normal(x @ w + s, 1.0), obs=y)

    return user_model


@pytest.mark.parametrize("hold", [False, True], ids=["in-program", "eager-fallback"])
def test_the_prototype_trace_comes_from_the_set_up_program_as_an_eager_trace_gives_it(hold):
    from flowguides.numpyro._prototype import staged_prototype

    user_model = _user_model(hold)
    key = jax.random.key(5)
    staged_prototype(user_model, init_to_median, key, (X, Y), {})  # compiles the program
    before = next(MODEL_RUNS)
    init_locs, _, _, trace = staged_prototype(user_model, init_to_median, key, (X, Y), {})
    # the program is cached: the model's code runs again only where a function in the trace
    # holds a value of the program (it cannot be replaced) and the trace is taken eagerly
    assert next(MODEL_RUNS) - before - 1 == (1 if hold else 0)
    with handlers.block():
        values = {name: trace[name]["value"] for name in init_locs}
        seeded = handlers.substitute(handlers.seed(user_model, key), data=values)
        eager = handlers.trace(seeded).get_trace(X, Y)
    assert list(trace) == list(eager) == ["w", "s", "m", "f", "n", "y"]
    for name, site in eager.items():
        ours = trace[name]
        assert ours.keys() == site.keys() and ours["type"] == site["type"]
        assert not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(ours))
        if site["type"] == "sample":
            assert type(ours["fn"]) is type(site["fn"])
            np.testing.assert_allclose(ours["value"], site["value"], rtol=1e-12)
            np.testing.assert_allclose(
                ours["fn"].log_prob(ours["value"]), site["fn"].log_prob(site["value"]), rtol=1e-12
            )
    # the user's own attribute is kept (NumPyro's pytree round trip would drop it)
    np.testing.assert_allclose(trace["s"]["fn"].offset, eager["s"]["fn"].offset, rtol=1e-12)
    assert not isinstance(trace["s"]["fn"].offset, jax.core.Tracer)
    # and the fit of that model runs
    assert np.isfinite(
        fit_posterior(user_model, SPEC, X, Y, num_steps=20, progress=False).losses
    ).all()


def _half_line(x=None):
    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    numpyro.factor("half", jnp.where(u > 0.0, 0.0, -jnp.inf))  # valid on one half only
    numpyro.sample("x", dist.Normal(u, 1.0), obs=x)


@pytest.mark.parametrize("strategy", ["median", "sample", "uniform"])
def test_the_set_up_takes_initialize_models_point_by_its_first_attempt_or_its_retries(strategy):
    from numpyro.infer.initialization import init_to_sample, init_to_uniform

    from flowguides.numpyro._prototype import staged_prototype
    from flowguides.numpyro._training import _COMPILED

    init = {"median": init_to_median, "sample": init_to_sample, "uniform": init_to_uniform}
    init = init[strategy]
    retried = 0
    for seed in range(6):  # init_to_sample's first draw is invalid at about half the keys
        clear_compiled()
        key = jax.random.key(seed)
        init_locs, _, _, _ = staged_prototype(_half_line, init, key, (), {"x": 0.3})
        info = initialize_model(
            key, _half_line, init_strategy=init, dynamic_args=True, model_kwargs={"x": 0.3}
        )
        np.testing.assert_allclose(init_locs["u"], info.param_info.z["u"], rtol=1e-12)
        programs = {k[1] for k in _COMPILED if k[0] == "prototype"}
        # the first attempt's program, and `initialize_model`'s only where that was not valid
        # (init_to_uniform draws without the model: always `initialize_model`'s)
        if strategy == "uniform":
            assert programs == {False}
        else:
            assert programs in ({True}, {True, False})
            retried += programs == {True, False}
    if strategy != "uniform":
        assert 0 < retried < 6  # both paths were taken


X_SUB = np.linspace(-2.0, 2.0, 20)


def _subsampled_half_line(x):
    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", 20, subsample_size=5) as idx:
        numpyro.sample("x", dist.Normal(u, 1.0), obs=x[idx])
    # drawn after the plate: its init draw's key depends on whether the plate drew one
    numpyro.sample("t", dist.Normal(u, 1.0))
    # valid only above the minibatch's least value: the point depends on the indices drawn
    numpyro.factor("above", jnp.where(u > x[idx].min(), 0.0, -jnp.inf))


@pytest.mark.parametrize("strategy", ["median", "sample"])
def test_a_subsampled_model_sets_up_staged_on_the_indices_initialize_model_draws(strategy):
    from numpyro.infer.initialization import init_to_sample

    from flowguides.numpyro._prototype import staged_prototype

    init = {"median": init_to_median, "sample": init_to_sample}[strategy]
    for seed in range(8):
        clear_compiled()
        key = jax.random.key(seed)
        staged = staged_prototype(_subsampled_half_line, init, key, (X_SUB,), {})
        assert staged is not None  # not NumPyro's eager set-up
        init_locs, _, _, trace = staged
        info = initialize_model(
            key, _subsampled_half_line, init_strategy=init, dynamic_args=True, model_args=(X_SUB,)
        )
        for name in ("u", "t"):
            np.testing.assert_allclose(init_locs[name], info.param_info.z[name], rtol=1e-12)
        np.testing.assert_array_equal(trace["data"]["value"], info.model_trace["data"]["value"])


def test_model_with_its_own_params_takes_numpyros_set_up_and_svi_init():
    def with_param(x, y=None):
        shift = numpyro.param("shift", jnp.zeros(()))
        w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(x @ w + shift, 1.0).to_event(1), obs=y)

    guide = AutoFlowGuide(with_param, SPEC)
    svi = SVI(with_param, guide, optax.adam(1e-2), Trace_ELBO())
    with handlers.seed(rng_seed=jax.random.split(jax.random.key(0), 3)[2]):
        guide._setup_prototype(X, Y)  # as `fit_posterior` sets it up
    state = initial_state(svi, guide, jax.random.key(0), (X, Y), {})
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
    ours = initial_state(svis[0], guides[0], key, (X, Y), {})
    theirs = svis[1].init(key, X, Y)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(a, b, rtol=1e-12)
    p_ours, p_theirs = svis[0].get_params(ours), svis[1].get_params(theirs)
    assert "auto_precondition.scale_tril" in p_ours
    # one step from each state: the same loss and the same parameters
    states = (ours, theirs)
    (s1, l1), (s2, l2) = (jax.jit(s.update)(st, X, Y) for s, st in zip(svis, states, strict=True))
    np.testing.assert_allclose(l1, l2, rtol=1e-10)
    for name in p_theirs:
        np.testing.assert_allclose(
            svis[0].get_params(s1)[name], svis[1].get_params(s2)[name], rtol=1e-10
        )


def test_initial_optimizer_state_equals_init_and_compiles_nothing():
    from flowguides.numpyro._control import initial_optimizer_state
    from flowguides.numpyro._training import make_optimizer

    params = {  # a Laplace start's fixed whitening has no Adam state
        "auto_affine.loc": jnp.arange(3.0),
        "auto_layers.0.w": jnp.ones((2, 3), jnp.float32),
        "auto_precondition.scale_tril": jnp.eye(3),
    }
    optim = optax_to_numpyro(make_optimizer(300, 1e-2, 5.0))  # clipping, schedule, Adam
    compiles = []

    def listen(event: str, seconds: float, **kwargs) -> None:
        if event.endswith("backend_compile_duration"):
            compiles.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        ours = initial_optimizer_state(optim, params)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    theirs = optim.init(params)
    assert compiles == []
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        a, b = jnp.asarray(a), jnp.asarray(b)
        assert (a.shape, a.dtype, a.weak_type) == (b.shape, b.dtype, b.weak_type)
        np.testing.assert_array_equal(a, b)
    # the same first update from either state
    grads = jax.tree.map(jnp.ones_like, params)
    for a, b in zip(
        jax.tree.leaves(optim.update(grads, ours, value=1.0)),
        jax.tree.leaves(optim.update(grads, theirs, value=1.0)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_timing_accounts_for_the_whole_call_and_the_draws(monkeypatch):
    requested = []  # the programs the guide asks for, by name

    def spy(key, make):
        requested.append(key[0] if key else None)
        return cached(key, make)

    monkeypatch.setattr(guide_module, "cached", spy)
    t0 = time.perf_counter()
    fit = fit_posterior(model, SPEC, X, Y, num_steps=300, init_scale="auto", progress=False)
    wall = time.perf_counter() - t0
    timing = fit.timing
    assert tuple(timing) == FIT_TIMING_KEYS
    assert all(np.isfinite(v) and v >= 0 for v in timing.values())
    assert timing["start_s"] > 0  # the "auto" search ran and was timed
    assert timing["init_s"] + timing["start_s"] == pytest.approx(timing["setup_s"])
    parts = timing["setup_s"] + timing["compile_s"] + timing["train_s"]
    assert parts == pytest.approx(timing["fit_s"]) and timing["fit_s"] <= wall
    assert "laplace" in requested  # the spy sees the search
    requested.clear()
    plain = fit_posterior(model, SPEC, X, Y, num_steps=100, init_scale=0.1, progress=False)
    assert "laplace" not in requested  # no search: the start is the given scale
    assert 0 <= plain.timing["start_s"] <= plain.timing["setup_s"]
    # every draw call adds its time; the second call of the same size reuses the program
    t0 = time.perf_counter()
    fit.sample(1000, seed=0)
    first = time.perf_counter() - t0
    assert 0 < fit.timing["draws_s"] <= first
    fit.sample(1000, seed=1)
    assert first < fit.timing["draws_s"] <= time.perf_counter() - t0
    assert "draws_s" not in plain.timing


def test_draws_are_one_program_shared_by_fits_of_the_same_model_and_data():
    fit = fit_posterior(model, SPEC, X, Y, num_steps=100, init_scale=0.1, progress=False)
    draws = fit.sample(500, seed=2)
    # the program gives NumPyro's own (eager) draws of the same key
    eager = fit.guide.sample_posterior(jax.random.key(2), fit.params, X, Y, sample_shape=(500,))
    assert set(draws) == {"sigma", "w", "rho", "w_sum"}  # latent and deterministic sites
    assert set(eager) == set(draws)
    for name, value in draws.items():
        assert value.shape == (500, *fit.latent_shapes.get(name, ()))
        np.testing.assert_allclose(value, eager[name], rtol=1e-10, atol=1e-12)
    again = fit_posterior(model, SPEC, X, Y, num_steps=100, init_scale=0.3, seed=1, progress=False)
    again.sample(500, seed=2)
    assert (
        again._programs["draws", 500] is fit._programs["draws", 500]
    )  # same model, data and shapes: no compile
    whitened = fit_posterior(model, SPEC, X, Y, num_steps=100, init_scale="laplace", progress=False)
    whitened.sample(500, seed=2)
    assert (
        whitened._programs["draws", 500] is not fit._programs["draws", 500]
    )  # more parameters: its own program
    other = fit_posterior(model, SPEC, X, Y + 1.0, num_steps=100, init_scale=0.1, progress=False)
    ours = other.sample(500, seed=2)["w"]
    key = jax.random.key(2)
    eager = other.guide.sample_posterior(key, other.params, X, Y + 1.0, sample_shape=(500,))
    np.testing.assert_allclose(ours, eager["w"], rtol=1e-10, atol=1e-12)
    assert (
        other._programs["draws", 500] is not fit._programs["draws", 500]
    )  # new data: its own program


def test_the_search_reads_the_gradient_at_the_mode_and_scores_every_start():
    a = jnp.asarray([[2.0, 0.3], [0.3, 0.5]])

    def energy(z):  # a skewed, non-quadratic bowl with its minimum away from the start
        return 0.5 * (z - 1.0) @ a @ (z - 1.0) + 0.1 * jnp.sum((z - 1.0) ** 4)

    x, grad, value = laplace._lbfgs(energy, jnp.zeros(2))
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(grad, jax.grad(energy)(x), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(value, energy(x), rtol=1e-12, atol=1e-15)
    loc = jnp.asarray([0.5, -0.5])
    out = jax.jit(lambda z: laplace.laplace_search(energy, z))(loc)
    np.testing.assert_allclose(out["loc_map"], x, rtol=1e-12)
    np.testing.assert_allclose(out["energy_map"], energy(x), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out["hess"], jax.hessian(energy)(x), rtol=1e-10)
    # each start's ELBO from its 256 draws, evaluated here one by one
    eps = jax.random.normal(jax.random.key(0, impl=laplace._ELBO_PRNG), (256, 2))
    elbo = lambda z, log_det: -jnp.mean(jax.vmap(energy)(z)) + log_det  # noqa: E731
    for scale, value in zip(AUTO_SCALES, out["elbo_plain"], strict=True):
        expected = elbo(loc + scale * eps, 2 * jnp.log(scale))
        np.testing.assert_allclose(value, expected, rtol=1e-12)
    tril = out["tril"]
    expected = elbo(x + eps @ tril.T, jnp.sum(jnp.log(jnp.diagonal(tril))))
    np.testing.assert_allclose(out["elbo_full"], expected, rtol=1e-12)
    assert not np.any(out["moving"]) and bool(out["finite"])
