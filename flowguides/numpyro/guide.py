"""`AutoFlowGuide`: a NumPyro `AutoContinuous` guide whose posterior is a flowguides flow.

Latent sites are packed and unconstrained by NumPyro's own machinery (`biject_to`); the flow
maps ``N(0, I)`` through the spec's layers and the affine ``loc + exp(log_scale) * y``, whose
`loc` starts at the guide's `init_loc_fn` location and whose scale is `init_scale` (or, with
``init_scale="laplace"``, the diagonal Laplace scale at a short MAP fit). Every layer starts as
the identity, so a fresh guide is `AutoDiagonalNormal` at the same location and scale. A draw
carries its log-density from the forward pass, so scoring it needs no inverse.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median

from flowguides._common import AUTO_SCALES, as_spec
from flowguides.numpyro import ode
from flowguides.numpyro.build import (
    Flow,
    FlowTransform,
    check_flow_tolerances,
    check_weights,
    init_params,
)
from flowguides.spec import FlowSpec, SpecError

__all__ = ["AutoFlowGuide", "DiscreteLatentError", "LaplaceFallbackWarning", "NoLatentSitesError"]

_QUANTILE_SAMPLES = 4000
_MAP_ITERATIONS = 200


class DiscreteLatentError(ValueError):
    """The model has a discrete latent site, which a continuous flow cannot represent."""


class NoLatentSitesError(ValueError):
    """The model has no latent sample site to fit."""


class LaplaceFallbackWarning(UserWarning):
    """The Laplace scale was unavailable at some coordinates; 0.1 was used there."""


_MODE_TOLERANCE = 0.1  # largest |gradient| x Laplace scale accepted as a mode


class AutoFlowGuide(AutoContinuous):
    """A flow guide over all latent sites of `model`, built from a `FlowSpec`.

    Works with `SVI`, `Trace_ELBO(num_particles=N, vectorize_particles=True)`, `Predictive`,
    `sample_posterior`, `get_posterior`, `get_transform`, `median` and `quantiles` (the last two
    from 4,000 draws with a fixed seed, as a flow has no closed-form quantiles).

    Args:
        model: a NumPyro model.
        spec: a `FlowSpec` (or its dict form); ``base="affine"`` is needed to centre the guide.
        init_loc_fn: per-site initial location (NumPyro's init strategies).
        init_scale: the initial scale of the affine, a positive float, ``"laplace"`` (a
            short MAP fit, then the diagonal Laplace scale; 0.1 with a warning where no
            mode is found) or ``"auto"``: whichever of the Laplace start and the plain starts
            with scale 0.1 and 1.0 has the highest ELBO (256 draws, fixed seed).
        prefix: the prefix of the guide's parameter names (``f"{prefix}_{name}"``).

    Usage::

        guide = AutoFlowGuide(model, FlowSpec.realnvp(num_layers=4, hidden=[32]))
        svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO(num_particles=8,
                  vectorize_particles=True))
        result = svi.run(jax.random.key(0), 2000, data)
        draws = guide.sample_posterior(jax.random.key(1), result.params, sample_shape=(1000,))
    """

    def __init__(
        self,
        model: Callable[..., Any],
        spec: FlowSpec | Mapping[str, Any],
        *,
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float | str = 0.1,
        prefix: str = "auto",
    ) -> None:
        self.spec = as_spec(spec)
        check_flow_tolerances(self.spec)
        if self.spec.base != "affine":
            raise SpecError(f"base: AutoFlowGuide needs base='affine', got {self.spec.base!r}")
        if isinstance(init_scale, str):
            if init_scale not in ("laplace", "auto"):
                raise ValueError(
                    f"init_scale: expected a positive number, 'laplace' or 'auto', got {init_scale!r}"
                )
        elif not (isinstance(init_scale, int | float) and init_scale > 0):
            raise ValueError(
                f"init_scale: expected a positive number, 'laplace' or 'auto', got {init_scale!r}"
            )
        self.init_scale = init_scale
        self._init_weights: dict[str, jax.Array] | None = None
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    # -- set-up ----------------------------------------------------------------------------
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
        except (ValueError, RuntimeError, NotImplementedError):
            with handlers.block():
                trace = handlers.trace(handlers.seed(self.model, 0)).get_trace(*args, **kwargs)
            _check_latent_sites(trace)  # a clearer message where it applies
            raise
        _check_latent_sites(self.prototype_trace)
        try:
            self.spec.check_dim(self.latent_dim)
        except SpecError as exc:
            sites = sorted(self._init_locs)
            raise SpecError(
                f"{exc}: the model has {self.latent_dim} latent dimension(s) in total "
                f"(sites {sites})"
            ) from None
        key = numpyro.prng_key()
        key = jax.random.key(0) if key is None else key
        weights = dict(init_params(self.spec, self.latent_dim, key))
        with handlers.block():  # the MAP search runs the model: hide it from outer handlers
            loc, scale = self._initial_loc_scale(args, kwargs)
        dtype = weights["affine.loc"].dtype
        weights["affine.loc"] = jnp.asarray(loc, dtype)
        weights["affine.log_scale"] = jnp.log(jnp.asarray(scale, dtype))
        self._init_weights = weights
        odes = [layer for layer in self.spec.layers if layer.type == "neural_ode"]
        self._needs_noise = any(o.resolved_trace(self.latent_dim) == "hutchinson" for o in odes)
        self._steer = any(o.steer > 0 for o in odes)

    def _initial_loc_scale(self, args: tuple, kwargs: dict) -> tuple[jax.Array, jax.Array]:
        loc = self._init_latent
        if self.init_scale not in ("laplace", "auto"):
            return loc, np.full(loc.shape, float(self.init_scale), loc.dtype)
        unpack = self._unpack_latent
        potential = self._potential_fn_gen(*args, **kwargs)

        def energy(z: jax.Array) -> jax.Array:
            return potential(unpack(z))

        if self.init_scale == "laplace":
            return self._laplace(energy, loc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LaplaceFallbackWarning)
            laplace = self._laplace(energy, loc)
        eps = jax.random.normal(jax.random.key(0), (256, loc.shape[0]), loc.dtype)

        def elbo(start: tuple[jax.Array, jax.Array]) -> float:
            z = start[0] + start[1] * eps
            value = float(-jnp.mean(jax.vmap(energy)(z)) + jnp.sum(jnp.log(start[1])))
            return value if np.isfinite(value) else -np.inf

        starts = [(loc, jnp.full(loc.shape, scale, loc.dtype)) for scale in AUTO_SCALES]
        return max([*starts, laplace], key=elbo)

    def _laplace(self, energy: Callable, loc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """MAP in unconstrained space, then the diagonal Laplace scale (or a fallback)."""
        fallback = (loc, jnp.full(loc.shape, 0.1, loc.dtype))
        loc_map = _minimize(energy, loc)
        if not bool(jnp.all(jnp.isfinite(loc_map))):
            warnings.warn(
                "init_scale='laplace': the MAP search did not stay finite; starting from the "
                "init_loc_fn location with scale 0.1",
                LaplaceFallbackWarning,
                stacklevel=5,
            )
            return fallback
        curvature = jnp.diag(jax.hessian(energy)(loc_map))
        good = jnp.isfinite(curvature) & (curvature > 0)
        scale = jnp.where(good, 1.0 / jnp.sqrt(jnp.where(good, curvature, 1.0)), 0.1)
        # A mode is stationary: its Newton step, in its own scale, is small. A density that
        # grows without bound (a funnel's scale collapsing to 0) leaves a large step behind.
        moving = ~(jnp.abs(jax.grad(energy)(loc_map)) * scale < _MODE_TOLERANCE)
        eps = jax.random.normal(jax.random.key(0), (16, loc.shape[0]), loc.dtype)
        around = jax.vmap(energy)(loc_map + scale * eps)
        if bool(jnp.any(moving)) or not bool(jnp.all(jnp.isfinite(around))):
            where = np.flatnonzero(np.asarray(moving)).tolist()
            warnings.warn(
                "init_scale='laplace': the MAP search found no mode (the density grows "
                f"without bound along latent coordinate(s) {where}, or is not finite around "
                "the point it reached); starting from the initial location with scale 0.1",
                LaplaceFallbackWarning,
                stacklevel=5,
            )
            return fallback
        if not bool(jnp.all(good)):
            bad = np.flatnonzero(~np.asarray(good)).tolist()
            warnings.warn(
                f"init_scale='laplace': the Hessian of the negative log joint is not positive "
                f"at latent coordinate(s) {bad}; using scale 0.1 there",
                LaplaceFallbackWarning,
                stacklevel=5,
            )
        return loc_map, scale

    # -- the posterior ---------------------------------------------------------------------
    def _flow_params(self) -> dict[str, jax.Array]:
        return {
            name: numpyro.param(f"{self.prefix}_{name}", value)
            for name, value in self._init_weights.items()
        }

    def _sample_latent(self, *args: Any, **kwargs: Any) -> jax.Array:
        """The packed latent draw; traced inside `training_solves`, with the RNODE penalty.

        A ``numpyro.factor`` site in a guide adds to ``log q``, so the factor
        ``+sum_layers mean_points(kinetic_weight KE + jacobian_weight JF)`` makes the negative
        ELBO (``E[log q - log p]``) grow by the penalty; it exists only in training solves.
        """
        if not ode.in_training_solves():
            return super()._sample_latent(*args, **kwargs)
        with ode.training_solves() as records:  # this draw's own solves (inside vmap)
            latent = super()._sample_latent(*args, **kwargs)
        penalties = [jnp.mean(r["penalty"]) for r in records if "penalty" in r]
        if penalties:
            numpyro.factor(f"_{self.prefix}_rnode_penalty", sum(penalties))
        return latent

    def _get_posterior(self) -> dist.TransformedDistribution:
        steer = self._steer and ode.in_training_solves()
        key = numpyro.prng_key() if self._needs_noise or steer else None
        transform = FlowTransform(self._flow_params(), self.spec, self.latent_dim, key)
        return dist.TransformedDistribution(self.get_base_dist(), transform)

    def get_base_dist(self) -> dist.Distribution:
        """The standard-normal base ``N(0, I_latent_dim)``."""
        dtype = self._init_weights["affine.loc"].dtype
        return dist.Normal(jnp.zeros(self.latent_dim, dtype), 1.0).to_event(1)

    def get_transform(self, params: Mapping[str, jax.Array]) -> FlowTransform:
        """The flow (base noise -> unconstrained latent) at the SVI `params`."""
        return self.get_flow(params).transform()

    def get_posterior(self, params: Mapping[str, jax.Array]) -> dist.TransformedDistribution:
        """The posterior over the packed unconstrained latent vector."""
        return self.get_flow(params).distribution()

    def quantiles(self, params: Mapping[str, jax.Array], quantiles: Sequence[float]) -> dict:
        """Per-site constrained quantiles ``(len(quantiles), *site_shape)`` from 4,000 draws."""
        draws = self.sample_posterior(jax.random.key(0), params, sample_shape=(_QUANTILE_SAMPLES,))
        q = jnp.asarray(quantiles)
        return {name: jnp.quantile(draws[name], q, axis=0) for name in self._init_locs}

    def median(self, params: Mapping[str, jax.Array]) -> dict:
        """Per-site constrained medians, from 4,000 draws with a fixed seed."""
        return {k: v[0] for k, v in self.quantiles(params, [0.5]).items()}

    # -- weights ---------------------------------------------------------------------------
    def _require_setup(self) -> None:
        if self._init_weights is None:
            raise RuntimeError(
                "AutoFlowGuide: the latent dimension is not known yet; run the guide once "
                "(e.g. svi.init(rng_key, *args)) before reading or setting its weights"
            )

    def get_weights(self, params: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The flow weights keyed by the spec's names, from SVI `params` (default: initial)."""
        self._require_setup()
        if params is None:
            return {name: np.asarray(v) for name, v in self._init_weights.items()}
        return {name: np.asarray(params[f"{self.prefix}_{name}"]) for name in self._init_weights}

    def set_weights(self, weights: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Make `weights` the guide's initial weights (used by the next `svi.init`).

        Returns:
            The SVI parameter dict ``{f"{prefix}_{name}": array}`` holding them, usable as
            `params` in `sample_posterior`, `median`, `get_flow`, ...
        """
        self._require_setup()
        self._init_weights = check_weights(self.spec, self.latent_dim, weights)
        return {f"{self.prefix}_{name}": v for name, v in self._init_weights.items()}

    def get_flow(self, params: Mapping[str, Any] | None = None) -> Flow:
        """The `Flow` on the unconstrained latent space at SVI `params` (default: initial)."""
        weights = self.get_weights(params)
        return Flow(self.spec, self.latent_dim, check_weights(self.spec, self.latent_dim, weights))


def _check_latent_sites(trace: Mapping[str, dict]) -> None:
    """Raise if a latent site of the model `trace` is discrete, or if there is none at all."""
    latent = {
        name: site
        for name, site in trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary", False)
    }
    if not latent:
        raise NoLatentSitesError(
            "model: found no latent sample sites (every sample site is observed); there is "
            "nothing for a guide to fit"
        )
    for name, site in latent.items():
        if site["fn"].support.is_discrete:
            raise DiscreteLatentError(
                f"site {name!r}: a discrete latent site ({type(site['fn']).__name__}) cannot be "
                f"fitted by a continuous flow guide; marginalise it out by enumeration "
                f"(e.g. infer={{'enumerate': 'parallel'}} with TraceEnum_ELBO and a guide over "
                f"the remaining sites, or numpyro.contrib.funsor.config_enumerate)"
            )


def _minimize(energy: Callable[[jax.Array], jax.Array], x0: jax.Array) -> jax.Array:
    """A short L-BFGS search for the minimum of `energy` (robust to badly scaled sites)."""
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(energy)

    @jax.jit
    def run(x: jax.Array) -> jax.Array:
        def step(carry: tuple, _: None) -> tuple:
            x, state = carry
            value, grad = value_and_grad(x, state=state)
            updates, state = solver.update(grad, state, x, value=value, grad=grad, value_fn=energy)
            return (optax.apply_updates(x, updates), state), None

        return jax.lax.scan(step, (x, solver.init(x)), None, length=_MAP_ITERATIONS)[0][0]

    return run(x0)
