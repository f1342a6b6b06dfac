"""`use_compilation_cache`: a fit and its draws in one process write their programs to the
directory, and a new process reads them back (no new entry) with the same losses and draws to
the last digit.

Each fit runs in a fresh subprocess (the cache is per process) with a different
``PYTHONHASHSEED``: NumPyro's `Trace_ELBO` orders its sites by a set of names, so a program
built from it would differ between the two processes and miss the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numpyro")

FIT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import numpyro
import numpyro.distributions as dist
from flowguides.numpyro import fit_posterior, use_compilation_cache
from flowguides.spec import FlowSpec

directory = use_compilation_cache(sys.argv[1])

def schools(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)

y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
sigma = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
spec = FlowSpec.realnvp(num_layers=2, hidden=(8,))
fit = fit_posterior(schools, spec, y, sigma, num_steps=150, init_scale=0.1, progress=False,
                    seed=int(sys.argv[2]))
draws = fit.sample(100, seed=1)["tau"]
log_q = fit.log_densities(100, seed=2)[2]  # diagnose's and to_arviz's program
print(json.dumps({"directory": str(directory), "losses": [repr(v) for v in fit.losses],
                  "draws": [repr(v) for v in draws], "log_q": [repr(v) for v in log_q],
                  "timing": fit.timing}))
"""


def _fit(cache: Path, hash_seed: str, seed: int = 0) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FIT, str(cache), str(seed)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _entries(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def test_a_fit_writes_its_programs_and_a_new_process_reads_them(tmp_path):
    cache = tmp_path / "jax-cache"
    first = _fit(cache, "1")
    assert first["directory"] == str(cache.resolve())
    written = _entries(cache)
    assert any("chunk" in name for name in written), sorted(written)  # the training chunk
    second = _fit(cache, "2")
    assert _entries(cache) == written  # every program came from the cache: nothing new
    assert second["losses"] == first["losses"]
    assert second["draws"] == first["draws"]  # the draws' program too
    assert second["log_q"] == first["log_q"]  # and the densities'
    # another seed: other weights, the same programs (the weights are arguments, not constants)
    third = _fit(cache, "3", seed=1)
    assert _entries(cache) == written
    assert third["losses"] != first["losses"] and third["log_q"] != first["log_q"]
    assert len(set(first["losses"])) > 1  # the fit trained
    assert second["timing"]["draws_s"] > 0 and "start_s" in second["timing"]


def test_the_default_directory_is_per_user(tmp_path, monkeypatch):
    from flowguides.numpyro import use_compilation_cache

    jax = pytest.importorskip("jax")
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        directory = use_compilation_cache()
        assert directory == tmp_path.resolve() / "flowguides" / "jax"
        assert directory.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(directory)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()


@pytest.mark.parametrize("num_particles", [1, 3])
def test_the_elbo_a_fit_trains_on_equals_numpyros_trace_elbo(num_particles):
    """The chunk runs a plain `Trace_ELBO` as `ObjectiveLoss`: the same keys, the same loss
    and gradient (up to the order of the sum)."""
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    from flowguides.numpyro import ObjectiveLoss

    def model():
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("b", dist.Gamma(2.0, 1.0))
        numpyro.sample("y", dist.Normal(a, 0.5), obs=0.3)

    guide = AutoNormal(model)
    with numpyro.handlers.seed(rng_seed=0):
        params = {k: v["value"] for k, v in numpyro.handlers.trace(guide).get_trace().items()
                  if v["type"] == "param"}  # fmt: skip
    ours, theirs = ObjectiveLoss("elbo", "reparam", num_particles, 1), Trace_ELBO(num_particles)
    for seed in range(3):
        key = jax.random.key(seed)
        value, grad = jax.value_and_grad(lambda p, k=key: ours.loss(k, p, model, guide))(params)
        expected, g = jax.value_and_grad(lambda p, k=key: theirs.loss(k, p, model, guide))(params)
        assert float(value) == pytest.approx(float(expected), rel=1e-12)
        for name in params:
            assert float(abs(grad[name] - g[name]).max()) < 1e-10


def test_the_fits_programs_compile_with_flowguides_compiler_options(monkeypatch):
    """Every program of a fit goes through `_training.jit`: with an option XLA does not know,
    the draws, a new model shape's set-up and a refit cached under the old options fail to
    compile, and `compiler_options` is the CPU's."""
    import jax
    import numpyro
    import numpyro.distributions as dist

    from flowguides.numpyro import _training, fit_posterior
    from flowguides.spec import FlowSpec

    assert jax.default_backend() == "cpu"
    assert _training.compiler_options() == _training.CPU_COMPILER_OPTIONS

    def model(y):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        numpyro.sample("y", dist.Normal(a.sum(), 1.0).expand(y.shape).to_event(1), obs=y)

    y = jax.numpy.array([0.1, -0.4, 0.7])
    spec = FlowSpec.realnvp(num_layers=1, hidden=(4,))
    fit = fit_posterior(model, spec, y, num_steps=5, progress=False)
    monkeypatch.setattr(_training, "CPU_COMPILER_OPTIONS", {"xla_no_such_option_here": 1})
    monkeypatch.setattr(_training, "_accepted", lambda options: True)  # not left out
    with pytest.raises(Exception, match="xla_no_such_option_here"):
        fit.sample(17)  # a new number of draws: a new program
    with pytest.raises(Exception, match="xla_no_such_option_here"):
        fit_posterior(model, spec, jax.numpy.ones(4), num_steps=5, progress=False)
    # the in-process cache keys the options: the same fit again compiles anew, under them
    with pytest.raises(Exception, match="xla_no_such_option_here"):
        fit_posterior(model, spec, y, num_steps=5, progress=False)


def test_an_option_the_installed_xla_refuses_is_left_out_and_the_fit_compiles(monkeypatch):
    import jax
    import numpyro
    import numpyro.distributions as dist

    from flowguides.numpyro import _training, fit_posterior
    from flowguides.spec import FlowSpec

    # the shipped options are all taken by the XLA the tests install; programs run once add
    # the set-up options
    assert _training.compiler_options() == _training.CPU_COMPILER_OPTIONS
    setup = {**_training.CPU_COMPILER_OPTIONS, **_training.CPU_SETUP_OPTIONS}
    assert _training.compiler_options(setup=True) == setup
    shipped = dict(_training.CPU_COMPILER_OPTIONS)
    options = {**shipped, "xla_no_such_option_here": 1}
    monkeypatch.setattr(_training, "CPU_COMPILER_OPTIONS", options)
    assert "xla_no_such_option_here" not in _training.compiler_options()
    assert _training.compiler_options().items() <= options.items()

    def model(y):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        numpyro.sample("y", dist.Normal(a.sum(), 1.0).expand(y.shape).to_event(1), obs=y)

    fit = fit_posterior(model, FlowSpec.realnvp(num_layers=1, hidden=(4,)), jax.numpy.ones(3),
                        num_steps=5, progress=False)  # fmt: skip
    assert fit.sample(7)["a"].shape == (7, 2)
    # the programs a fit runs once compile with the set-up options (here one XLA refuses)
    monkeypatch.setattr(_training, "CPU_COMPILER_OPTIONS", shipped)
    monkeypatch.setattr(_training, "CPU_SETUP_OPTIONS", {"xla_no_such_setup_option": 1})
    monkeypatch.setattr(_training, "_accepted", lambda options: True)
    with pytest.raises(Exception, match="xla_no_such_setup_option"):
        fit.sample(9)
    with pytest.raises(Exception, match="xla_no_such_setup_option"):
        fit_posterior(model, FlowSpec.realnvp(num_layers=1, hidden=(4,)), jax.numpy.ones(5),
                      num_steps=5, progress=False)  # fmt: skip


def test_a_start_search_over_large_data_compiles_as_training_does():
    """The start search makes a full-data pass per evaluation: above
    `SEARCH_SETUP_MAX_ELEMENTS` data elements its loops, not its compile, are the cost, so it
    leaves out the set-up options (XLA's slower elemental emitters)."""
    import jax
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from flowguides.numpyro import AutoFlowGuide, _training, clear_compiled
    from flowguides.numpyro.laplace import SEARCH_SETUP_MAX_ELEMENTS
    from flowguides.spec import FlowSpec

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(np.zeros(2), 10.0).to_event(1))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu.sum(), 1.0), obs=y)

    if jax.default_backend() != "cpu":
        pytest.skip("the options are the CPU's")
    for rows, once in ((100, True), (SEARCH_SETUP_MAX_ELEMENTS + 1, False)):
        clear_compiled()
        guide = AutoFlowGuide(model, FlowSpec.planar(num_layers=1), init_scale="laplace")
        with numpyro.handlers.seed(rng_seed=0):
            guide._setup_prototype(np.zeros(rows))
        (key,) = [k for k in _training._COMPILED if k[0] == "laplace"]
        assert dict(key[-1]) == _training.compiler_options(setup=once)
    assert _training.compiler_options(setup=True) != _training.compiler_options(setup=False)


def test_training_on_small_data_compiles_with_the_set_up_options():
    """Up to `CHUNK_SETUP_MAX_ELEMENTS` data elements a step is the flow's work and the compile
    dominates the fit: the training chunk compiles with the set-up options (shorter compiles);
    more data, traced or compiled in as constants, keeps the fusion emitters."""
    import jax
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from flowguides.numpyro import (
        ConstantArgumentsWarning,
        _training,
        clear_compiled,
        fit_posterior,
    )
    from flowguides.spec import FlowSpec

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(np.zeros(2), 10.0).to_event(1))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu.sum(), 1.0), obs=y)

    def reads_its_data(y):  # np.asarray: the data are compiled in as constants
        model(np.asarray(y))

    if jax.default_backend() != "cpu":
        pytest.skip("the options are the CPU's")
    limit = _training.CHUNK_SETUP_MAX_ELEMENTS
    spec = FlowSpec.planar(num_layers=1)
    for fn, rows, small in ((model, limit, True), (model, limit + 1, False),
                            (reads_its_data, limit + 1, False)):  # fmt: skip
        clear_compiled()
        y = np.linspace(-1.0, 1.0, rows)
        if fn is reads_its_data:
            with pytest.warns(ConstantArgumentsWarning):
                fit_posterior(fn, spec, y, num_steps=3, init_scale=0.1, progress=False)
        else:
            fit_posterior(fn, spec, y, num_steps=3, init_scale=0.1, progress=False)
        (key,) = [k for k in _training._COMPILED if k[0] == "posterior"]
        assert dict(key[-1]) == _training.compiler_options(setup=small), (fn.__name__, rows)


def test_a_host_array_goes_to_the_device_without_a_compiled_program(caplog):
    """`on_device` copies (a later change to the host array leaves it) in the dtype asked for,
    and compiles nothing (``jnp.asarray`` of a host array compiles a program per shape)."""
    import logging

    import jax
    import jax.numpy as jnp
    import numpy as np

    from flowguides.numpyro._support import on_device

    host = np.linspace(0.0, 1.0, 37)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        out = on_device(host, np.float32)
        start = on_device(3)
        same = on_device(out)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        jnp.sin(jnp.zeros(41)).block_until_ready()  # the log does show a compile
    assert [r for r in caplog.records if "Compiling" in r.getMessage()]
    host[:] = 5.0
    np.testing.assert_array_equal(np.asarray(out), np.linspace(0.0, 1.0, 37, dtype=np.float32))
    assert out.dtype == np.float32 and same is out
    assert int(start) == 3 and start.dtype == jnp.asarray(3).dtype
