"""Density data sets and the density-fitting methods compared on them (forward KL).

Data: two moons, 8 Gaussians and a checkerboard (2-D, the FFJORD generators), and
scikit-learn's iris (4-D), wine (13-D), breast cancer (30-D) and digits (64-D, dequantised by
adding ``U(0, 1)`` noise to the integer pixels). Each set is split 75/25 with a fixed seed and
standardised with the training mean and sd; every method sees the same standardised arrays, so
test NLLs (mean nats per point) are comparable across methods.

Methods, at matched sizes (:data:`DENSITY_ARCH`), an equal budget of minibatch steps and the
same Adam learning rate and schedule (constant, then cosine decay to 1% over the second half):
flowguides' ``fit_density`` (RealNVP, planar with its exact inverse, neural ODE; both backends),
zuko's ``RealNVP`` and ``CNF``, normflows' RealNVP and planar flows, FlowJAX's coupling and planar
flows (``fit_to_data``). A method that cannot fit a density raises; the runner records the error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DATASETS",
    "DENSITY_ARCH",
    "DENSITY_METHODS",
    "DensityBudget",
    "DensityData",
    "load",
    "timed",
]

DENSITY_ARCH = {"couplings": 4, "hidden": (64, 64), "planar": 16, "ode_hidden": (64, 64)}
"""Matched sizes for every density method."""


@dataclass(frozen=True)
class DensityData:
    """A standardised train/test split."""

    name: str
    train: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class DensityBudget:
    """Equal budget: minibatch steps, batch size, Adam learning rate."""

    num_steps: int
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_moons

    return make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))[0]


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = np.arange(8) * np.pi / 4
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], -1)
    idx = rng.integers(0, 8, n)
    return (centers[idx] + 0.5 * rng.standard_normal((n, 2))) / math.sqrt(2.0)


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0 + np.floor(x1) % 2
    return np.stack([x1, x2], -1) * 2.0


def _sklearn(name: str) -> Callable[[int, np.random.Generator], np.ndarray]:
    def load_set(n: int, rng: np.random.Generator) -> np.ndarray:
        from sklearn import datasets

        x = getattr(datasets, f"load_{name}")().data.astype(float)
        if name == "digits":
            x = x + rng.random(x.shape)
        return x

    return load_set


DATASETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "two_moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "iris": _sklearn("iris"),
    "wine": _sklearn("wine"),
    "breast_cancer": _sklearn("breast_cancer"),
    "digits": _sklearn("digits"),
}
"""Data set name -> ``(n, rng) -> raw array`` (``n`` is used by the 2-D generators only)."""


def load(name: str, n_synthetic: int = 8000, seed: int = 0) -> DensityData:
    """One data set, split 75/25 (fixed seed) and standardised by the training statistics."""
    if name not in DATASETS:
        raise KeyError(f"data set: expected one of {list(DATASETS)}, got {name!r}")
    rng = np.random.default_rng(seed)
    x = DATASETS[name](n_synthetic, rng)
    perm = rng.permutation(len(x))
    cut = int(0.75 * len(x))
    train, test = x[perm[:cut]], x[perm[cut:]]
    mean, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return DensityData(name, (train - mean) / sd, (test - mean) / sd)


# -- methods: each returns the test NLL (mean nats per point) ---------------------------------
def _flowguides(backend: str, family: str) -> Callable[[DensityData, DensityBudget], np.ndarray]:
    def fit(data: DensityData, budget: DensityBudget) -> float:
        import importlib

        from flowguides.spec import FlowSpec

        mod = importlib.import_module(f"flowguides.{backend}")
        spec = {
            "realnvp": FlowSpec.realnvp(
                num_layers=DENSITY_ARCH["couplings"], hidden=DENSITY_ARCH["hidden"], dtype="float64"
            ),
            "planar": FlowSpec.planar(num_layers=DENSITY_ARCH["planar"], dtype="float64"),
            "neural_ode": FlowSpec.neural_ode(hidden=DENSITY_ARCH["ode_hidden"], dtype="float64"),
        }[family]
        res = mod.fit_density(
            data.train, spec, num_steps=budget.num_steps, batch_size=budget.batch_size,
            learning_rate=budget.learning_rate, seed=budget.seed, progress=False,
        )  # fmt: skip
        return -np.asarray(res.log_prob(data.test))

    return fit


def _torch_loop(module: object, nll: Callable, data: DensityData, budget: DensityBudget) -> None:
    """Adam with the shared schedule on minibatch NLL for a torch module (zuko, normflows)."""
    import torch

    from flowguides.core import learning_rate_at

    torch.manual_seed(budget.seed)
    x = torch.as_tensor(data.train)
    opt = torch.optim.Adam(module.parameters(), lr=budget.learning_rate)
    n = budget.num_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: learning_rate_at(s, n, 1.0))
    gen = torch.Generator().manual_seed(budget.seed)
    for _ in range(n):
        idx = torch.randint(len(x), (min(budget.batch_size, len(x)),), generator=gen)
        loss = nll(x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _zuko(kind: str) -> Callable[[DensityData, DensityBudget], np.ndarray]:
    def fit(data: DensityData, budget: DensityBudget) -> float:
        import torch
        import zuko

        d = data.train.shape[1]
        hidden = DENSITY_ARCH["ode_hidden" if kind == "CNF" else "hidden"]
        if kind == "CNF":
            flow = zuko.flows.CNF(d, hidden_features=hidden)
        else:
            flow = zuko.flows.RealNVP(
                d, transforms=DENSITY_ARCH["couplings"], hidden_features=hidden
            )
        flow = flow.double()
        _torch_loop(flow, lambda xb: -flow().log_prob(xb).mean(), data, budget)
        with torch.no_grad():
            return -flow().log_prob(torch.as_tensor(data.test)).numpy()

    return fit


def _normflows(kind: str) -> Callable[[DensityData, DensityBudget], np.ndarray]:
    def fit(data: DensityData, budget: DensityBudget) -> float:
        import normflows as nf
        import torch

        d = data.train.shape[1]
        if kind == "planar":
            flows = [nf.flows.Planar((d,)) for _ in range(DENSITY_ARCH["planar"])]
        else:
            flows = []
            for _ in range(DENSITY_ARCH["couplings"]):
                sizes = [d // 2, *DENSITY_ARCH["hidden"], 2 * (d - d // 2)]
                flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP(sizes, init_zeros=True))]
                flows += [nf.flows.Permute(d, mode="swap")]
        model = nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), flows)
        model = model.double()
        _torch_loop(model, model.forward_kld, data, budget)
        with torch.no_grad():
            return -model.log_prob(torch.as_tensor(data.test)).numpy()

    return fit


def _flowjax(kind: str) -> Callable[[DensityData, DensityBudget], np.ndarray]:
    def fit(data: DensityData, budget: DensityBudget) -> float:
        import jax
        import jax.numpy as jnp
        import optax
        from flowjax.distributions import Normal
        from flowjax.flows import coupling_flow, planar_flow
        from flowjax.train import fit_to_data

        from flowguides.core import decay_steps

        d = data.train.shape[1]
        key, sub = jax.random.split(jax.random.key(budget.seed))
        base = Normal(jnp.zeros(d))
        if kind == "planar":
            flow = planar_flow(sub, base_dist=base, flow_layers=DENSITY_ARCH["planar"])
        else:
            flow = coupling_flow(
                sub, base_dist=base, flow_layers=DENSITY_ARCH["couplings"],
                nn_width=DENSITY_ARCH["hidden"][0], nn_depth=len(DENSITY_ARCH["hidden"]),
            )  # fmt: skip
        n_train = int(0.9 * len(data.train))  # fit_to_data holds out 10% for early stopping
        batch = min(budget.batch_size, n_train)
        per_epoch = max(n_train // batch, 1)
        epochs = max(math.ceil(budget.num_steps / per_epoch), 1)
        total = epochs * per_epoch
        schedule = optax.join_schedules(
            [optax.constant_schedule(budget.learning_rate),
             optax.cosine_decay_schedule(budget.learning_rate, decay_steps(total), alpha=0.01)],
            [total // 2],
        )  # fmt: skip
        flow, _ = fit_to_data(
            key, flow, jnp.asarray(data.train), optimizer=optax.adam(schedule),
            max_epochs=epochs, max_patience=max(epochs // 4, 5), batch_size=batch,
            show_progress=False,
        )  # fmt: skip
        return -np.asarray(flow.log_prob(jnp.asarray(data.test)))

    return fit


DENSITY_METHODS: dict[str, Callable[[DensityData, DensityBudget], np.ndarray]] = {
    "flowguides-pyro RealNVP": _flowguides("pyro", "realnvp"),
    "flowguides-pyro planar": _flowguides("pyro", "planar"),
    "flowguides-pyro neural ODE": _flowguides("pyro", "neural_ode"),
    "flowguides-numpyro RealNVP": _flowguides("numpyro", "realnvp"),
    "flowguides-numpyro planar": _flowguides("numpyro", "planar"),
    "flowguides-numpyro neural ODE": _flowguides("numpyro", "neural_ode"),
    "zuko RealNVP": _zuko("RealNVP"),
    "zuko CNF": _zuko("CNF"),
    "normflows RealNVP": _normflows("realnvp"),
    "normflows planar": _normflows("planar"),
    "flowjax coupling": _flowjax("coupling"),
    "flowjax planar": _flowjax("planar"),
}
"""Density method name -> ``fit(data, budget) -> per-point test NLL``; time it from outside."""


def timed(fit: Callable[[DensityData, DensityBudget], np.ndarray], data: DensityData,
          budget: DensityBudget) -> tuple[np.ndarray, float]:  # fmt: skip
    """``(per-point test NLL, wall seconds)`` of one method (after emptying JAX's compilation
    caches)."""
    import jax

    jax.clear_caches()
    t0 = time.perf_counter()
    nll = fit(data, budget)
    return nll, time.perf_counter() - t0
