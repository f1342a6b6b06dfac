"""`fit_posterior`'s default learning rates in both backends: above
`LEARNING_RATE_REFERENCE_DIM` latent dimensions the flow's layers train at
`default_learning_rate(dim)` (their fan-in grows with the dimension) and its affine base at
`DEFAULT_LEARNING_RATE` (vector-like: each entry moves one coordinate); a given
`learning_rate` applies to both.

Adam's first step moves every parameter whose gradient is not zero by its rate exactly (the
bias-corrected moments give ``m / sqrt(v) = sign(g)``), so one step shows each rate.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.core import DEFAULT_LEARNING_RATE, default_learning_rate

DIM = 4000  # default_learning_rate(DIM) is a quarter of DEFAULT_LEARNING_RATE
SPEC = FlowSpec.planar(num_layers=1, dtype="float64")


def _first_steps(backend: str, learning_rate: float | None) -> dict[str, np.ndarray]:
    """|change| of every trained parameter over one step of `fit_posterior`."""
    if backend == "numpyro":
        import numpyro
        import numpyro.distributions as dist

        from flowguides.numpyro import fit_posterior

        def model():
            with numpyro.plate("d", DIM):
                numpyro.sample("x", dist.Normal(1.0, 2.0))

        fit = fit_posterior(model, SPEC, num_steps=1, learning_rate=learning_rate, progress=False)
        before, after = fit.guide.get_weights(), fit.guide.get_weights(fit.params)
        return {k: np.abs(after[k] - before[k]) for k in before}
    import pyro
    import pyro.distributions as dist
    import torch

    from flowguides.pyro import AutoFlowGuide, fit_posterior

    def model():
        with pyro.plate("d", DIM):
            pyro.sample("x", dist.Normal(torch.tensor(1.0, dtype=torch.float64), 2.0))

    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, SPEC, init_scale="auto")
    guide()  # the same start and weights as the fit below builds (same seed)
    before = {k: np.array(v) for k, v in guide.get_weights().items()}
    pyro.clear_param_store()
    fit = fit_posterior(
        model, SPEC, num_steps=1, learning_rate=learning_rate, seed=0, progress=False
    )
    after = fit.guide.get_weights()
    return {k: np.abs(np.asarray(after[k]) - before[k]) for k in before}


@pytest.mark.parametrize(
    "backend", [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro")]
)
@pytest.mark.parametrize("given", [None, 3e-3], ids=["default", "given"])
def test_the_affine_keeps_the_base_rate_and_the_layers_scale_with_the_dimension(backend, given):
    moved = _first_steps(backend, given)
    layers = default_learning_rate(DIM) if given is None else given
    affine = DEFAULT_LEARNING_RATE if given is None else given
    seen = set()
    for name, change in moved.items():
        if name.startswith("precondition"):
            assert change.max() == 0.0, name  # the fixed whitening does not train
            continue
        rate = affine if name.startswith("affine") else layers
        assert change.max() <= rate * (1 + 1e-6), name  # no step beyond its rate
        # exactly the rate where |g| is well above Adam's eps (a gradient of about 0 moves less)
        changed = change[change > 1e-3 * rate]
        np.testing.assert_allclose(changed, rate, rtol=1e-3, err_msg=name)
        seen.update([name] if changed.size else [])
    assert {"affine.loc", "affine.log_scale", "layers.0.u"} <= seen


@pytest.mark.torch
@pytest.mark.parametrize("posterior", [True, False], ids=["posterior", "density"])
def test_adam_and_the_schedule_step_alike_in_both_backends(posterior):
    """NumPyro's `make_optimizer` and Pyro's `Trainer` on the same gradients give the same
    parameters step for step (float64), `fit_posterior`'s rules (cosine after the first quarter,
    Adam's ``b2 = POSTERIOR_ADAM_B2``) differing from `fit_density`'s (constant first half)."""
    import jax
    import optax
    import torch

    from flowguides.core import learning_rate_at, training
    from flowguides.numpyro._training import make_optimizer
    from flowguides.pyro._training import Trainer

    steps, lr = 40, 0.1
    dtype = np.asarray(jax.numpy.zeros(())).dtype  # float64 where x64 is on, else float32
    tol = 1e-12 if dtype == np.float64 else 1e-5
    target = np.array([1.0, -2.0, 0.5, 3.0], dtype)
    weight = np.array([1.0, 10.0, 0.1, 3.0], dtype)  # unequal curvatures: Adam's moments matter
    optim = make_optimizer(steps, lr, None, posterior=posterior)
    ours = {"w": jax.numpy.zeros(4, dtype)}
    state = optim.init(ours)
    theirs = torch.zeros(4, dtype=torch.from_numpy(target).dtype, requires_grad=True)
    trainer = Trainer([theirs], steps, lr, None, posterior=posterior)
    for step in range(steps):
        grad = 2 * weight * (np.asarray(ours["w"]) - target)
        updates, state = optim.update({"w": jax.numpy.asarray(grad)}, state, ours)
        ours = optax.apply_updates(ours, updates)
        loss = (torch.from_numpy(weight) * (theirs - torch.from_numpy(target)) ** 2).sum()
        trainer.step(step, loss, lambda: None)
        np.testing.assert_allclose(np.asarray(ours["w"]), theirs.detach().numpy(), atol=tol)
    start_at = training.POSTERIOR_DECAY_START if posterior else training.DENSITY_DECAY_START
    assert (learning_rate_at(steps // 3, steps, 1.0, start_at) < 1.0) == posterior  # decaying
    assert trainer.optim.param_groups[0]["betas"][1] == (0.99 if posterior else 0.999)
