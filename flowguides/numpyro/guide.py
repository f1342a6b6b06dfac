"""`AutoFlowGuide`: a NumPyro `AutoContinuous` guide whose posterior is a flowguides flow.

Latent sites are packed and unconstrained by NumPyro's own machinery (`biject_to`); the flow
maps ``N(0, I)`` through the spec's layers and the affine ``loc + exp(log_scale) * y``, whose
`loc` starts at the guide's `init_loc_fn` location and whose scale is `init_scale`. Every layer
starts as the identity, so a fresh guide is `AutoDiagonalNormal` at the same location and
scale. A Laplace start (``init_scale="laplace"``, or ``"auto"`` where it wins) instead whitens:
a fixed last map ``z = MAP + L x`` (``L L^T`` the inverse Hessian, see `preconditioner`), with
the affine and layers starting as the identity on ``x``. A draw carries its log-density from
the forward pass, so scoring it needs no inverse.

The guide mirrors `flowguides.pyro.guide.AutoFlowGuide` method for method, where NumPyro's
functional parameters allow: `get_weights`, `get_flow` take the SVI `params` (Pyro's guide
holds its own), `set_weights` and `set_preconditioner` return the guide in both, and
`initial_params` (NumPyro only) gives the SVI parameter dict the guide starts from.
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
from jax import lax
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer import Predictive
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median, init_to_uniform

from flowguides.core import (
    FULL_RANK_MAX_DIM,
    PRECONDITION,
    as_spec,
    check_init_scale,
    check_observed,
    check_preconditioner,
    coordinate_sites,
)
from flowguides.core.calls import call_error, first_line, foreign_arguments
from flowguides.core.hessian import Blocks, hessian_blocks, hessian_colors
from flowguides.numpyro import ode
from flowguides.numpyro._control import reference_params
from flowguides.numpyro._model import as_constants, callable_key, choose_constants, split_args
from flowguides.numpyro._prototype import StagedPrototype, check_latent_sites
from flowguides.numpyro._stream import deterministic_sites, full_data
from flowguides.numpyro._support import data_elements, dynamic_call, dynamic_sites, on_device
from flowguides.numpyro._training import cache_key, cached, jit
from flowguides.numpyro.build import (
    Flow,
    FlowTransform,
    as_weight_arrays,
    check_flow_tolerances,
    init_params,
)
from flowguides.numpyro.laplace import SEARCH_SETUP_MAX_ELEMENTS, choose_start, laplace_search
from flowguides.spec import FlowSpec, SpecError

__all__ = ["AutoFlowGuide"]

_QUANTILE_SAMPLES = 4000


class AutoFlowGuide(AutoContinuous, StagedPrototype):
    """A flow guide over all latent sites of `model`, built from a `FlowSpec`.

    Works with `SVI`, `Trace_ELBO(num_particles=N, vectorize_particles=True)`, `Predictive`,
    `sample_posterior`, `get_posterior`, `get_transform`, `median` and `quantiles` (the last two
    from 4,000 draws with a fixed seed, as a flow has no closed-form quantiles).

    Args:
        model: a NumPyro model.
        spec: a `FlowSpec` (or its dict form); ``base="affine"`` is needed to centre the guide.
        init_loc_fn: per-site initial location (NumPyro's init strategies).
        init_scale: the initial scale of the affine, a positive float, ``"laplace"`` (a
            short MAP fit, then the full-rank Laplace whitening, see `preconditioner`:
            diagonal, held as a vector, where the Hessian is not positive definite or the
            dimension exceeds `FULL_RANK_MAX_DIM` (its diagonal then comes from
            Hessian-vector products, see `laplace.hessian_diagonal`); the 0.1 start with a
            `LaplaceFallbackWarning` where no mode is found) or
            ``"auto"``: whichever of the Laplace start and the plain starts with scale 0.1 and
            1.0 has the highest ELBO (256 draws, fixed seed; one compiled program, cached per
            model and argument shapes).
        prefix: the prefix of the guide's parameter names (``f"{prefix}_{name}"``).
        static_argnames: names of model arguments to compile in as constants rather than
            trace (see `flowguides.numpyro._model`); without them, a model whose set-up fails
            to trace its array arguments (it uses a data value in Python, e.g.
            ``int(counts.sum())``) gets every array argument as a constant, with a
            `ConstantArgumentsWarning`. Constant JAX arrays are passed to the model as numpy.

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
        static_argnames: Sequence[str] | None = None,
    ) -> None:
        self.spec = as_spec(spec, job="posterior")
        check_flow_tolerances(self.spec)
        if self.spec.base != "affine":
            raise SpecError(f"base: AutoFlowGuide needs base='affine', got {self.spec.base!r}")
        check_init_scale(init_scale)
        self.init_scale = init_scale
        self._init_weights: dict[str, jax.Array] | None = None
        self._precondition: dict[str, jax.Array] | None = None
        # the start search's full-data MAP and its terms (`control_variate_model`), where it
        # found a mode
        self._reference: dict[str, np.ndarray] | None = None
        self._blocks: Blocks | None = None  # a sparse Hessian's layout (`sparse_quadratic`)
        self.static_argnames = static_argnames
        self._constants: frozenset = frozenset()  # labels of constant arguments, see set-up
        self._dynamic: tuple[str, ...] = ()  # sites whose support moves with others (`_support`)
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    # -- set-up ----------------------------------------------------------------------------
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        self._constants = choose_constants(self.model, args, kwargs, self.static_argnames)
        given = args, kwargs
        args, kwargs = as_constants(args, kwargs, self._constants)
        try:
            with warnings.catch_warnings():  # a discrete latent site: refused below, by name
                warnings.filterwarnings("ignore", "Some algorithms will automatically enumerate")
                super()._setup_prototype(*args, **kwargs)
        except TypeError as exc:  # say which argument: a call that does not bind, a list
            error = call_error(self.model, *given)
            foreign = foreign_arguments(self.model, *given, "jax")
            if error is None and foreign is None:
                raise
            raise (error or TypeError(f"{foreign} ({first_line(exc)})")) from exc
        except (ValueError, RuntimeError, NotImplementedError, ImportError) as exc:
            # (set-up imports funsor for a discrete site); init_to_uniform: ImproperUniform cannot sample
            start = handlers.substitute(handlers.seed(self.model, 0), substitute_fn=init_to_uniform)
            try:
                with handlers.block():
                    trace = handlers.trace(start).get_trace(*args, **kwargs)
            except Exception:  # noqa: BLE001 - the model's own error is `exc`, raised below
                raise exc from exc.__cause__
            check_latent_sites(trace)  # a clearer message where it applies
            check_observed({n: s["value"] for n, s in trace.items()
                            if s["type"] == "sample" and s["is_observed"]})  # fmt: skip
            raise
        check_latent_sites(self.prototype_trace)
        self._dynamic = dynamic_sites(
            self.model, args, kwargs, self._init_locs, self.prototype_trace
        )
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
            loc, scale, fixed = self._initial_start(args, kwargs)
        dtype = weights["affine.loc"].dtype
        weights["affine.loc"] = on_device(loc, dtype)
        weights["affine.log_scale"] = on_device(np.log(np.asarray(scale, dtype)))
        self._init_weights = weights
        self._precondition = (
            None
            if fixed is None
            else {k: on_device(v, dtype) for k, v in zip(PRECONDITION, fixed, strict=True)}
        )
        odes = [layer for layer in self.spec.layers if layer.type == "neural_ode"]
        self._needs_noise = any(o.resolved_trace(self.latent_dim) == "hutchinson" for o in odes)
        self._steer = any(o.steer > 0 for o in odes)

    def _initial_start(self, args: tuple, kwargs: dict) -> tuple[Any, Any, tuple | None]:
        """``(affine loc, affine scale, (shift, scale_tril) or None)`` for `init_scale`."""
        loc = np.asarray(self._init_latent)
        if self.init_scale not in ("laplace", "auto"):
            return loc, np.full(loc.shape, float(self.init_scale), loc.dtype), None
        arrays, signature, rebuild = split_args(args, kwargs, self._constants)
        full_rank = self.latent_dim <= FULL_RANK_MAX_DIM
        potential_gen, unpack = self._potential_fn_gen, self._unpack_latent
        trace = self.prototype_trace
        sites = [
            (np.shape(v), trace[name]["fn"].batch_shape) for name, v in self._init_locs.items()
        ]
        colors = None if full_rank else hessian_colors(sites)
        blocks = None if full_rank else hessian_blocks(sites)

        def search(z0: jax.Array, arrays: list) -> dict[str, jax.Array]:
            a, k = rebuild(arrays)
            potential = potential_gen(*a, **k)
            with full_data():  # traced once: the program holds the full-data energy
                return laplace_search(lambda z: potential(unpack(z)), z0, full_rank, colors, blocks)

        shapes = (loc.shape, str(loc.dtype), full_rank)
        once = data_elements(args, kwargs) <= SEARCH_SETUP_MAX_ELEMENTS
        key = cache_key(
            "laplace", *shapes, content=(callable_key(self.model), signature), setup=once
        )
        out = jax.tree.map(np.asarray, cached(key, lambda: jit(search, setup=once))(loc, arrays))
        found = bool(out["finite"]) and not bool(np.any(out["moving"]))
        if found and not np.all(np.isfinite(out.get("hess", 0.0))):
            out = {k: v for k, v in out.items() if k != "hess"}  # first order only
        form = [k for k in out if k == "hess_rows" or k.startswith("hess_block_")]
        if not (bool(out.get("sparse", False)) and all(np.isfinite(out[k]).all() for k in form)):
            out = {k: v for k, v in out.items() if k not in form}  # first order
        self._reference = reference_params(out) if found else None
        self._blocks = blocks if found and "hess_rows" in out else None
        return choose_start(self.init_scale, loc, out, self._coordinate_sites)

    def _coordinate_sites(self, coords: Sequence[int]) -> list[str]:
        """Names of the sites that own packed coordinates `coords` (packing order)."""
        sizes = {name: int(np.size(value)) for name, value in self._init_locs.items()}
        return coordinate_sites(sizes, coords)

    @property
    def preconditioner(self) -> dict[str, jax.Array] | None:
        """The fixed last map ``z = shift + scale_tril @ x`` of a Laplace start (``shift`` the
        MAP, ``scale_tril`` the Cholesky factor of the inverse Hessian of the negative log
        joint there, or, for a diagonal whitening, the ``(dim,)`` vector of scales with
        ``z = shift + scale_tril * x``), keyed by `PRECONDITION`; None for a plain start.
        With it, the affine and the layers work in whitened coordinates (an Adam step moves
        about one posterior sd whatever the sites' scales) and start as the identity."""
        self._require_setup()
        return self._precondition

    def set_preconditioner(self, fixed: Mapping[str, Any] | None) -> AutoFlowGuide:
        """Set (or, with None, remove) the fixed whitening map, keyed by `PRECONDITION`.

        Returns:
            The guide.
        """
        self._require_setup()
        dtype = self._init_weights["affine.loc"].dtype
        self._precondition = (
            None
            if fixed is None
            else {
                k: v.astype(dtype) for k, v in check_preconditioner(fixed, self.latent_dim).items()
            }
        )
        return self

    def initial_params(self) -> dict[str, jax.Array]:
        """The SVI parameters the guide registers at its first call, ``{f"{prefix}_{name}":
        value}`` (the whitening included, for a Laplace start): all unconstrained, usable as
        `params` in `sample_posterior`, `median`, `get_flow`, ... (NumPyro only: a Pyro guide
        holds its parameters itself)."""
        self._require_setup()
        values = {**self._init_weights, **(self._precondition or {})}
        return {f"{self.prefix}_{name}": jnp.asarray(v) for name, v in values.items()}

    # -- the posterior ---------------------------------------------------------------------
    def _flow_params(self) -> dict[str, jax.Array]:
        params = {
            name: numpyro.param(f"{self.prefix}_{name}", value)
            for name, value in self._init_weights.items()
        }
        # The whitening is SVI state too (so a compiled training step cached for another
        # guide of the same shapes reads this guide's), but not trained: its gradient is cut,
        # and `fit_posterior`'s optimiser keeps neither updates nor Adam moments for it.
        for name, value in (self._precondition or {}).items():
            params[name] = lax.stop_gradient(numpyro.param(f"{self.prefix}_{name}", value))
        return params

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if not self._dynamic:
            return super().__call__(*args, **kwargs)
        return dynamic_call(self, args, kwargs)  # supports moved by a draw

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
        ode.pass_up(records)  # for the caller's history (see `fit_posterior`)
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

    def _unpack_and_constrain(self, latent_sample: jax.Array, params: Mapping[str, Any]) -> dict:
        # NumPyro's replay applies each model `numpyro.param`'s constraint to the value it is
        # given, and is given the constrained value (constrained twice: a deterministic site
        # reading an `exp`-constrained 2.0 saw e^2): give it the unconstrained value instead
        trace = self.prototype_trace
        own = {k: biject_to(trace[k]["kwargs"].get("constraint", constraints.real)).inv(v)
               for k, v in params.items() if trace.get(k, {}).get("type") == "param"}  # fmt: skip
        return super()._unpack_and_constrain(latent_sample, {**params, **own})

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
    def deterministic(
        self, draws: Mapping[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """The model's ``numpyro.deterministic`` sites missing from `draws` (constrained latent
        draws ``{site: (S, *shape)}``), by NumPyro's `Predictive` over them."""
        self._require_setup()
        trace = self.prototype_trace
        missing = [n for n in deterministic_sites(trace) if n not in draws]
        if not missing:
            return {}
        latent = {
            n: jnp.asarray(v)
            for n, v in draws.items()
            if trace.get(n, {}).get("type") == "sample" and not trace[n]["is_observed"]
        }
        out = Predictive(self.model, posterior_samples=latent, return_sites=missing)(
            jax.random.key(0), *args, **kwargs
        )
        return {n: np.asarray(out[n]) for n in missing}

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

    def set_weights(self, weights: Mapping[str, Any]) -> AutoFlowGuide:
        """Make `weights` the guide's initial weights (used by the next `svi.init`; read them
        back as SVI parameters with `initial_params`).

        Returns:
            The guide.

        Raises:
            ValueError: a name is missing or unknown, or an array has the wrong shape.
        """
        self._require_setup()
        self._init_weights = as_weight_arrays(self.spec, self.latent_dim, weights)
        return self

    def get_flow(self, params: Mapping[str, Any] | None = None) -> Flow:
        """The `Flow` on the unconstrained latent space at SVI `params` (default: initial)."""
        weights = as_weight_arrays(self.spec, self.latent_dim, self.get_weights(params))
        fixed = {
            name: (params or {}).get(f"{self.prefix}_{name}", value)
            for name, value in (self._precondition or {}).items()
        }
        return Flow(self.spec, self.latent_dim, {**weights, **fixed})
