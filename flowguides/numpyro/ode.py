"""Neural-ODE flows (Chen et al., 2018; Grathwohl et al., 2019) solved with diffrax.

``dz/dt = f(z, t)``, `f` an MLP of concatsquash layers; the state is augmented with the
log-determinant, ``d(ladj)/dt = tr(df/dz)``, computed exactly (one vector-Jacobian product per
dimension, vmapped) or by Hutchinson's estimator with one noise draw held fixed for the whole
solve. Base at ``t = 0``, data at ``t = t1``; the inverse integrates from ``t1`` back to 0.
The whole batch is one ODE state (one step-size sequence for the batch, as in torchdiffeq).

Solvers: ``dopri5``/``tsit5`` (adaptive, `diffrax.PIDController` with the spec's `rtol`/`atol`,
at most `max_steps` steps: more raises an Equinox runtime error when the program runs, which
`solver_errors` turns into `flowguides.core.MaxStepsExceededError`), ``rk4`` (Kutta's 3/8 rule, the
``rk4`` of torchdiffeq, as a diffrax tableau) and ``euler`` (`num_steps` fixed steps).
Gradients: `diffrax.RecursiveCheckpointAdjoint` (`diffrax.BacksolveAdjoint` with ``adjoint``).

Training extras (Finlay et al., 2020; Ghosh et al., 2020): solves traced inside
`training_solves` also integrate the RNODE regularisers ``∫ |f|² dt`` and ``∫ |∂f/∂z|_F² dt``
as two more states (left out of the step-size control) when ``kinetic_weight`` or
``jacobian_weight`` is positive, and with ``steer > 0`` end at a time drawn from the layer's
PRNG key. Outside the block every solve ends at ``t1`` and carries no extra state.
`flow_matching_loss` trains the field without solving, on base draws paired with the data by
`couple_noise` (independently, or by minibatch optimal transport).

Hutchinson's estimator is unbiased for the log-determinant, not for the density, so importance
weights from it are biased: use ``trace="exact"`` (the default for ``dim <= 10``) for diagnostics.

Public names match `flowguides.pyro.ode` but for framework-only ones: the functional
`init_neural_ode`/`vector_field`, the tableau `RK4` and `solver_errors` (a JAX solve fails at
run time, so eager entry points translate the error); Pyro has its module `ConcatSquash`.

References:
    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018.
    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019.
    Finlay et al., "How to train your neural ODE: the world of Jacobian and kinetic
    regularization", ICML 2020.
    Ghosh et al., "STEER: Simple Temporal Regularization For Neural ODEs", NeurIPS 2020.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Iterator, Mapping
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from flowguides.core import MaxStepsExceededError, check_coupling, ot_permutation
from flowguides.numpyro._base import FlowLayerTransform, as_init_random
from flowguides.numpyro.coupling import ACTIVATIONS
from flowguides.spec import FIXED_STEP_SOLVERS, NeuralODESpec

__all__ = [
    "RK4",
    "NeuralODE",
    "couple_noise",
    "flow_matching_loss",
    "in_training_solves",
    "init_neural_ode",
    "pass_up",
    "solver_errors",
    "training_solves",
    "vector_field",
]

_RECORDERS: list[list[dict]] = []  # the open `training_solves` blocks, innermost last


class RK4(diffrax.AbstractERK):
    """Kutta's 3/8-rule fourth-order Runge-Kutta method (torchdiffeq's ``rk4``), fixed steps."""

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]),
        b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
        b_error=np.zeros(4),
        a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])),
    )
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms: object) -> int:
        del terms
        return 4


_MAX_STEPS_MESSAGE = re.compile(
    r"max_steps: the \w+ solve needed more than max_steps=\d+ steps[^\n]*"
)

_SOLVERS = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "rk4": RK4, "euler": diffrax.Euler}
# Field evaluations diffrax makes per step (accepted or rejected; the first-same-as-last
# methods reuse their last stage) and once per solve, as counted by a callback in the field.
_EVALUATIONS = {"dopri5": (6, 1), "tsit5": (6, 1), "rk4": (4, 0), "euler": (1, 0)}


def init_neural_ode(spec: NeuralODESpec, dim: int, key: jax.Array, dtype: jnp.dtype) -> dict:
    """Hidden layers uniform ``±1/sqrt(in)``, gates and time biases 0, the last layer zero."""
    sizes = spec.mlp_sizes(dim)
    last = len(sizes) - 2
    params = {}
    rng = as_init_random(key)
    for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = 1.0 / math.sqrt(n_in)
        w = rng.uniform((n_out, n_in), dtype, -bound, bound)
        b = rng.uniform((n_out,), dtype, -bound, bound)
        params[f"net.{j}.weight"] = np.zeros((n_out, n_in), dtype) if j == last else w
        params[f"net.{j}.bias"] = np.zeros((n_out,), dtype) if j == last else b
        for name in ("gate_weight", "gate_bias", "time_bias"):
            params[f"net.{j}.{name}"] = np.zeros((n_out,), dtype)
    return params


def vector_field(
    params: Mapping[str, jax.Array], spec: NeuralODESpec, t: jax.Array, z: jax.Array
) -> jax.Array:
    """``f(z, t)``: concatsquash layers ``(h W^T + b) sigmoid(g_w t + g_b) + c t``."""
    act = ACTIVATIONS[spec.activation]
    depth = len(spec.hidden) + 1
    h = z
    for j in range(depth):
        p = f"net.{j}."
        gate = jax.nn.sigmoid(params[p + "gate_weight"] * t + params[p + "gate_bias"])
        h = (h @ params[p + "weight"].T + params[p + "bias"]) * gate + params[p + "time_bias"] * t
        if j < depth - 1:
            h = act(h)
    return h


def _solution_norm(y: tuple[jax.Array, ...]) -> jax.Array:
    """Step-size control on ``[z, log-det]`` only (RMS per part, the larger of the two)."""
    return jnp.maximum(optx.rms_norm(y[0]), optx.rms_norm(y[1]))


@functools.cache  # one function per layer shape: eager solves reuse diffrax's compiled solve
def _dynamics(spec: NeuralODESpec, dim: int, regularize: bool):
    eye = np.eye(dim)  # closed over as a constant (BacksolveAdjoint); params, noise: `args`

    def rhs(t: jax.Array, state: tuple[jax.Array, ...], args: tuple):
        (params, noise), z = args, state[0]
        dz, vjp = jax.vjp(lambda z_: vector_field(params, spec, t, z_), z)
        if noise is None:
            rows = jax.vmap(lambda e: vjp(jnp.broadcast_to(e.astype(z.dtype), z.shape))[0])(eye)
            diag = eye.reshape((dim,) + (1,) * (z.ndim - 1) + (dim,))
            trace = jnp.sum(rows * diag, axis=(0, -1))
            frobenius = jnp.sum(rows * rows, axis=(0, -1))
        else:
            row = vjp(noise)[0]
            trace = jnp.sum(row * noise, axis=-1)
            frobenius = jnp.sum(row * row, axis=-1)
        if not regularize:
            return dz, trace
        return dz, trace, jnp.sum(dz * dz, axis=-1), frobenius

    return rhs


class NeuralODE(FlowLayerTransform):
    """One neural-ODE block from ``t = 0`` (base) to ``t = t1`` (data).

    `key` fixes the Hutchinson noise of a solve (unused with the exact trace; without a key
    the estimator uses ``jax.random.key(0)``) and, in `training_solves`, the STEER end time.
    """

    def _noise(self, z: jax.Array) -> jax.Array | None:
        if self.spec.resolved_trace(self.dim) == "exact":
            return None
        key = jax.random.key(0) if self.key is None else self.key
        if self.spec.noise == "rademacher":
            return jax.random.rademacher(key, z.shape, dtype=z.dtype)
        return jax.random.normal(key, z.shape, dtype=z.dtype)

    def _integrate(
        self, x: jax.Array, inverse: bool, end_time: jax.Array | float | None, regularize: bool
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
        spec = self.spec
        end = spec.t1 if end_time is None else end_time
        t0, t1 = (end, 0.0) if inverse else (0.0, end)
        adaptive = spec.solver not in FIXED_STEP_SOLVERS
        if adaptive:
            norm = _solution_norm if regularize else optx.rms_norm
            controller = diffrax.PIDController(rtol=spec.rtol, atol=spec.atol, norm=norm)
            dt0, max_steps = None, spec.max_steps
        else:
            controller = diffrax.ConstantStepSize()
            dt0, max_steps = (t1 - t0) / spec.num_steps, spec.num_steps
        adjoint = (
            diffrax.BacksolveAdjoint() if spec.adjoint else diffrax.RecursiveCheckpointAdjoint()
        )
        zero = jnp.zeros(x.shape[:-1], x.dtype)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_dynamics(spec, self.dim, regularize)),
            _SOLVERS[spec.solver](),
            t0,
            t1,
            dt0,
            (x, zero, zero, zero) if regularize else (x, zero),
            args=(self.params, self._noise(x)),
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=False,
        )
        ends = [y[0] for y in sol.ys]
        failed = sol.result != diffrax.RESULTS.successful
        message = (  # `solver_errors` finds it by `_MAX_STEPS_MESSAGE`; as torch's message
            f"max_steps: the {spec.solver} solve needed more than max_steps={max_steps} steps; "
            f"raise max_steps, loosen rtol/atol (now {spec.rtol}/{spec.atol}), or use a "
            "fixed-step solver"
        )
        y = eqx.error_if(ends[0], failed, message)
        per_step, start_up = _EVALUATIONS[spec.solver]
        nfe = per_step * sol.stats["num_steps"] + start_up
        if not regularize:
            return y, ends[1], {}, nfe
        sign = -1.0 if inverse else 1.0  # a backwards solve accumulates -∫
        return y, ends[1], {"kinetic": sign * ends[2], "jacobian": sign * ends[3]}, nfe

    def solve(
        self,
        x: jax.Array,
        *,
        inverse: bool = False,
        end_time: jax.Array | float | None = None,
        regularize: bool = True,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Integrate between 0 and `end_time` (default ``t1``), forward or backwards.

        Args:
            x: points ``(..., dim)`` (base side when forward, data side when `inverse`).
            inverse: integrate from `end_time` back to 0 instead of from 0 to `end_time`.
            end_time: the data-side time (STEER draws it in training); ``t1`` when None.
            regularize: also integrate the RNODE regularisers.

        Returns:
            ``(y, ladj, reg)``: the end point, ``log|det dy/dx|`` and, when `regularize`,
            ``reg = {"kinetic": ∫|f|² dt, "jacobian": ∫|ε^T ∂f/∂z|² dt}`` over ``[0, end_time]``
            per point (shape ``(...)``, the exact Frobenius norm with the exact trace), else ``{}``.
        """
        return self._integrate(x, inverse, end_time, regularize)[:3]

    def _training_solve(self, x: jax.Array, inverse: bool) -> tuple[jax.Array, jax.Array]:
        spec = self.spec
        if not _RECORDERS:
            return self._integrate(x, inverse, None, False)[:2]
        end_time = None
        if spec.steer > 0:
            if self.key is None:
                raise ValueError(
                    f"neural_ode: steer={spec.steer} draws the end time of a training solve "
                    "from the layer's PRNG key, got key=None"
                )
            u = jax.random.uniform(jax.random.fold_in(self.key, 1), (), x.dtype, -1.0, 1.0)
            end_time = spec.t1 * (1.0 + spec.steer * u)
        regularize = spec.kinetic_weight > 0 or spec.jacobian_weight > 0
        y, ladj, reg, nfe = self._integrate(x, inverse, end_time, regularize)
        record: dict[str, jax.Array] = {"nfe": nfe, "backward": not spec.adjoint}
        if regularize:
            record["penalty"] = (
                spec.kinetic_weight * reg["kinetic"] + spec.jacobian_weight * reg["jacobian"]
            )
        _RECORDERS[-1].append(record)
        return y, ladj

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._training_solve(x, inverse=False)

    def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._training_solve(y, inverse=True)


@contextlib.contextmanager
def training_solves() -> Iterator[list[dict]]:
    """Make the `NeuralODE` solves traced inside the block solve as in training.

    Each solve ends at a random time when ``steer > 0`` (drawn from the layer's key) and
    appends a record to the yielded list: ``"nfe"`` (its field evaluations, a traced integer),
    ``"backward"`` (False for ``adjoint=True``, whose backward count is unknown) and, when a
    regulariser weight is positive, ``"penalty"``: ``kinetic_weight * KE + jacobian_weight * JF``
    per point. The records are traced values: use them inside the same traced function (the
    training loss adds the mean of each penalty). Blocks nest; a solve records in the innermost.

    Example:
        ```python
        with training_solves() as records:
            loss = -flow.log_prob(batch, key).mean()
        loss = loss + sum(r["penalty"].mean() for r in records if "penalty" in r)
        ```
    """
    records: list[dict] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.pop()


@contextlib.contextmanager
def solver_errors() -> Iterator[None]:
    """Turn the run-time error of an adaptive solve that ran out of ``max_steps`` into
    `flowguides.core.MaxStepsExceededError` (whose message names ``max_steps``, the solver and
    the tolerances), for code run inside the block.

    A JAX solve fails when the compiled program runs (`equinox.error_if`), as an
    `equinox.EquinoxRuntimeError` (or, on some platforms, an XLA runtime error) that names no
    flowguides class; any other error passes through unchanged.

    Raises:
        MaxStepsExceededError: from the original error, which it chains.
    """
    try:
        yield
    except Exception as exc:  # the error's class depends on the platform: read its message
        found = _MAX_STEPS_MESSAGE.search(str(exc))
        if found is None or isinstance(exc, MaxStepsExceededError):
            raise
        raise MaxStepsExceededError(found.group(0)) from exc


def pass_up(records: list[dict]) -> None:
    """Append `records` (of an inner block that has ended) to the innermost open block."""
    if _RECORDERS:
        _RECORDERS[-1].extend(records)


def in_training_solves() -> bool:
    """Whether the code being traced runs inside a `training_solves` block."""
    return bool(_RECORDERS)


def flow_matching_loss(
    ode: NeuralODE,
    x1: jax.Array,
    x0: jax.Array,
    t: jax.Array,
    sigma_min: float,
) -> jax.Array:
    """Conditional flow matching on the optimal-transport path (Lipman et al., 2022).

    ``x_t = (1 - (1 - sigma_min) t) x0 + t x1`` has velocity ``u = x1 - (1 - sigma_min) x0``
    in ``t ∈ [0, 1]``; the field runs on ODE time ``s = t * t1``, so it is fitted to ``u / t1``.
    Inside `training_solves` it records one field evaluation (``{"nfe": 1}``).

    Args:
        ode: the neural-ODE layer whose field is trained.
        x1: data points ``(n, dim)``; x0: base draws ``(n, dim)``; t: times ``(n,)`` in [0, 1].
        sigma_min: the width of the path at ``t = 1``.

    Returns:
        The mean over points of ``|f(x_t, t t1) - u / t1|²``.

    References:
        Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023.
    """
    t = t[..., None]
    xt = (1.0 - (1.0 - sigma_min) * t) * x0 + t * x1
    target = (x1 - (1.0 - sigma_min) * x0) / ode.spec.t1
    velocity = vector_field(ode.params, ode.spec, t * ode.spec.t1, xt)
    if _RECORDERS:
        _RECORDERS[-1].append({"nfe": jnp.asarray(1), "backward": True})
    return jnp.mean(jnp.sum((velocity - target) ** 2, axis=-1))


def _host_permutation(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    return ot_permutation(x0, x1).astype(np.int32)


def couple_noise(x0: jax.Array, x1: jax.Array, coupling: str) -> jax.Array:
    """The base draws `x0` ``(n, dim)`` in the order that pairs them with the data rows `x1`.

    ``coupling="independent"`` returns `x0` as it is; ``"ot"`` returns ``x0[perm]`` with
    ``perm`` the exact minibatch optimal-transport assignment
    (`flowguides.core.ot_permutation`), computed on the host through `jax.pure_callback`, so
    it runs inside jitted and scanned training steps; row ``j`` of the result is the base
    draw paired with ``x1[j]``. The same contract as `flowguides.pyro.ode.couple_noise`.

    Raises:
        ValueError: an unknown `coupling`, or `x0` and `x1` of different shapes.

    References:
        Tong et al., "Improving and Generalizing Flow-Based Generative Models with Minibatch
        Optimal Transport", TMLR 2024.
    """
    check_coupling(coupling, "flow_matching")
    if coupling == "independent":
        return x0
    if jnp.shape(x0) != jnp.shape(x1) or jnp.ndim(x0) != 2:
        raise ValueError(
            f"x0, x1: expected two (n, dim) arrays of the same shape, got {jnp.shape(x0)} and "
            f"{jnp.shape(x1)}"
        )
    result = jax.ShapeDtypeStruct(jnp.shape(x0)[:1], jnp.int32)
    perm = jax.pure_callback(_host_permutation, result, x0, x1, vmap_method="sequential")
    return x0[perm]
