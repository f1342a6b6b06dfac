"""A model called with arguments it does not take, the way users slip: a Pyro/NumPyro option
name (``progress_bar=``, ``rng_seed=``) reaches the model as a keyword; the
error names the model's signature, the keyword and the flowguides option it resembles, in
both backends, before any compile."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.core.calls import FIT_OPTIONS, INFER_OPTIONS, call_error

__all__: list[str] = []

Y = np.random.default_rng(0).normal(size=10)
SPEC = FlowSpec.planar(num_layers=1, dtype="float64")
BACKENDS = [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro", marks=pytest.mark.jax)]  # fmt: skip


def _setup(backend: str):
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import fit_posterior, infer

        pyro.clear_param_store()
        y = torch.tensor(Y)

        def model(y, scale=1.0):
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
            with pyro.plate("n", len(y)):
                pyro.sample("y", dist.Normal(mu, scale), obs=y)

    else:
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        from flowguides.numpyro import fit_posterior, infer

        y = jnp.asarray(Y)

        def model(y, scale=1.0):
            mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
            with numpyro.plate("n", len(y)):
                numpyro.sample("y", dist.Normal(mu, scale), obs=y)

    return model, y, fit_posterior, infer


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_misplaced_keyword_names_the_model_and_the_option(backend: str) -> None:
    model, y, fit_posterior, infer = _setup(backend)
    with pytest.raises(TypeError, match=r"model model\(y, scale=1.0\): does not take the "
                       r"keyword 'progress_bar'.*did you mean flowguides' option 'progress'\?"):  # fmt: skip
        fit_posterior(model, SPEC, y, num_steps=5, progress_bar=False)
    with pytest.raises(TypeError, match=r"keyword 'rng_seed'.*option 'seed'"):
        infer(model, SPEC, y, num_steps=5, progress=False, rng_seed=1)
    with pytest.raises(TypeError, match=r"keyword 'num_warmup'.*; NUTS's num_warmup goes to "
                       r"infer as neutra=\{'num_warmup': ...\}"):  # fmt: skip
        infer(model, SPEC, y, num_steps=5, progress=False, num_warmup=100)
    with pytest.raises(TypeError, match=r"model model\(y, scale=1.0\): cannot be called with 0 "
                       r"positional argument\(s\).*missing a required argument: 'y'"):  # fmt: skip
        fit_posterior(model, SPEC, num_steps=5, progress=False)


def test_a_call_that_binds_is_left_alone() -> None:
    def model(y, *, scale=1.0, **extra):
        return y

    assert call_error(model, (1.0,), {"scale": 2.0, "anything": 3}) is None
    assert call_error(model, (), {"y": 1.0}) is None
    error = call_error(lambda y: y, (1.0,), {"rng_seed": 0})
    assert error is not None and "flowguides' option 'seed'" in str(error)
    error = call_error(lambda y: y, (1.0,), {"num_stepz": 3})  # a typo, by closeness
    assert error is not None and "option 'num_steps'" in str(error)
    error = call_error(lambda y: y, (1.0,), {"colour": 3})  # nothing like an option
    assert error is not None and "did you mean" not in str(error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_option_lists_are_the_signatures(backend: str) -> None:
    import importlib

    module = importlib.import_module(f"flowguides.{backend}")

    def options(fn) -> set[str]:
        return {p.name for p in inspect.signature(fn).parameters.values()
                if p.kind == p.KEYWORD_ONLY}  # fmt: skip

    assert options(module.infer) == set(INFER_OPTIONS)
    # the differences: JAX's static arguments and device mesh, Pyro's particle vectorisation
    own = {"numpyro": {"static_argnames", "devices"}, "pyro": {"vectorize_particles"}}
    assert (
        options(module.fit_posterior)
        == set(FIT_OPTIONS) - own["pyro" if backend == "numpyro" else "numpyro"]
    )


@pytest.mark.filterwarnings("ignore:Out-of-support values")  # NumPyro's validation, on the way
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_observation_is_named(backend: str) -> None:
    model, y, fit_posterior, _ = _setup(backend)
    bad = np.asarray(Y).copy()
    bad[3] = np.nan
    if backend == "pyro":
        import torch

        bad = torch.tensor(bad)
    else:
        import jax.numpy as jnp

        bad = jnp.asarray(bad)
    import contextlib

    if backend == "pyro":  # its default, which another test file may have switched off
        import pyro

        validation = pyro.validation_enabled(True)
    else:
        validation = contextlib.nullcontext()
    with validation, pytest.raises(ValueError, match=r"site 'y': the observed value holds 1 NaN "
                                   r"or inf of 10 entries \(the first at index \(3,\)\).*obs_mask"):  # fmt: skip
        fit_posterior(model, SPEC, bad, num_steps=5, progress=False)


def _primitives(backend: str):
    """``(y, plate, sample, dist, fit_posterior)`` of a backend, for a model written inline."""
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from flowguides.pyro import fit_posterior

        return torch.tensor(Y), pyro.plate, pyro.sample, dist, fit_posterior
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from flowguides.numpyro import fit_posterior

    return jnp.asarray(Y), numpyro.plate, numpyro.sample, dist, fit_posterior


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_local_latent_in_a_subsampled_plate_is_refused(backend: str) -> None:
    """Pyro's `AutoContinuous` takes such a site silently as a global one of the subsample's
    size (each step then pairs its coordinates with other rows); NumPyro's says only "does not
    support local latent variables"."""
    y, plate, sample, dist, fit_posterior = _primitives(backend)

    def model(y):
        mu = sample("mu", dist.Normal(0.0, 5.0))
        with plate("rows", len(y), subsample_size=4) as idx:
            z = sample("z", dist.Normal(mu, 1.0))
            sample("y", dist.Normal(z, 1.0), obs=y[idx])

    with pytest.raises(ValueError, match=r"site 'z': a latent site inside plate 'rows', which "
                       r"subsamples \(4 of 10\).*subsample_size=None"):  # fmt: skip
        fit_posterior(model, SPEC, y, num_steps=5, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_latent_delta_site_is_named_with_the_deterministic_site_it_means(backend: str) -> None:
    """A latent point mass (``sample("d", Delta(2 * mu))``, inside a plate or masked too) got
    a non-finite loss at step 0 and advice about the learning rate."""
    y, plate, sample, dist, fit_posterior = _primitives(backend)

    def model(y):
        mu = sample("mu", dist.Normal(0.0, 5.0))
        with plate("rows", len(y)):
            d = sample("d", dist.Delta(2 * mu).mask(True))
            sample("y", dist.Normal(d, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"site 'd': a latent Delta site .*deterministic\('d'"):
        fit_posterior(model, SPEC, y, num_steps=5, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pandas_argument_is_named_with_its_conversion(backend: str) -> None:
    import pandas as pd

    model, _, fit_posterior, _ = _setup(backend)
    # the model's ``y - mu``: pandas arithmetic with a latent value (anchors: a bare tracer or
    # dtype error that names neither the argument nor the fix)
    convert = "x.to_numpy()" if backend == "numpyro" else r"torch.as_tensor\(x\)"
    with pytest.raises(Exception, match=rf"model 'model': 'y' is a pandas Series: .*{convert}"):
        fit_posterior(model, SPEC, pd.Series(Y), num_steps=5, progress=False)


@pytest.mark.torch
def test_a_numpy_argument_to_a_pyro_model_is_named() -> None:
    model, _, fit_posterior, _ = _setup("pyro")
    with pytest.raises(TypeError, match=r"'y' is a NumPy array: torch distributions .* take "
                       r"tensors; pass torch.as_tensor\(x\).*\(Error while computing log_prob"):  # fmt: skip
        fit_posterior(model, SPEC, Y, num_steps=5, progress=False)
    # a model that converts its NumPy argument itself fits (the check is on failures only)
    import pyro
    import pyro.distributions as dist
    import torch

    def converting(y):
        y = torch.as_tensor(y)
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    fit = fit_posterior(converting, SPEC, Y, num_steps=50, progress=False)
    assert np.isfinite(fit.losses).all()

    def from_a_dict(data):  # the arrays of a dict argument are named by their key
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("n", len(data["y"])):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=data["y"])

    with pytest.raises(TypeError, match=r"\"data\['y'\]\" is a NumPy array: .*torch.as_tensor"):
        fit_posterior(from_a_dict, SPEC, {"y": Y}, num_steps=5, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_python_list_argument_is_named_with_its_conversion(backend: str) -> None:
    model, _, fit_posterior, _ = _setup(backend)
    # ``y - mu`` with y a list: JAX and torch refuse the operand without naming the argument
    convert = r"jnp.asarray\(x\)" if backend == "numpyro" else r"torch.as_tensor\(x\)"
    with pytest.raises(
        TypeError, match=rf"model 'model': 'y' is a Python list of numbers: .*{convert}"
    ):
        fit_posterior(model, SPEC, Y.tolist(), num_steps=5, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_argument_named_like_a_fit_option_is_named_when_the_fit_takes_it(backend: str):
    """``def model(y, init_scale=1.0)``: ``fit_posterior(..., init_scale=0.5)`` sets the guide's
    start, not the model's prior; say so. Left at the fit's default, the model's own default
    applies to the model and nothing is said (this suite turns warnings into errors)."""
    model, y, fit_posterior, _ = _setup(backend)

    def shadowing(y, init_scale=1.0, seed=0):  # a prior scale and a seed of the user's
        return model(y, scale=init_scale)

    fit_posterior(shadowing, SPEC, y, num_steps=2, progress=False)
    with pytest.warns(UserWarning, match=r"model 'shadowing': its argument\(s\) \['init_scale'\] "
                      r"have the names of fit_posterior options.*functools.partial\(model, "
                      r"init_scale=...\)"):  # fmt: skip
        fit_posterior(shadowing, SPEC, y, num_steps=2, init_scale=0.5, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_obs_masks_missing_value_site_is_named_for_its_coordinates_without_density(backend):
    """``obs_mask``: the ``y_unobserved`` latent site spans the observed positions too, masked
    out, so nothing pins the guide there: say so, with the count."""
    from flowguides.core import MaskedLatentWarning

    model, y, fit_posterior, _ = _setup(backend)
    observed = np.arange(len(Y)) % 3 != 0  # 4 of 10 missing
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        mask = torch.as_tensor(observed)

        def imputing(y):
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
            with pyro.plate("n", len(y)):
                pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)

    else:
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        mask = jnp.asarray(observed)

        def imputing(y):
            mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
            with numpyro.plate("n", len(y)):
                numpyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)

    with pytest.warns(MaskedLatentWarning, match=r"site 'y_unobserved': its mask leaves 6 of "
                      r"10 coordinates without density \(the observed positions of obs_mask"):  # fmt: skip
        fit_posterior(imputing, SPEC, y, num_steps=2, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_number_of_draws_is_named(backend: str) -> None:
    model, y, fit_posterior, _ = _setup(backend)
    if backend == "pyro":
        from flowguides.pyro import fit_density
    else:
        from flowguides.numpyro import fit_density
    fit = fit_posterior(model, SPEC, y, num_steps=2, progress=False)
    density = fit_density(np.random.default_rng(0).normal(size=(40, 2)), SPEC, num_steps=2)
    for bad in (-1, 2.5, True):
        with pytest.raises(
            ValueError, match=rf"num_samples: expected a non-negative integer, got {bad!r}"
        ):
            fit.sample(bad)
        with pytest.raises(ValueError, match=rf"n: expected a non-negative integer, got {bad!r}"):
            density.sample(bad)
    assert fit.sample(np.int64(3), seed=0)["mu"].shape == (3,)
