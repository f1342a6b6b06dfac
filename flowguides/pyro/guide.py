"""`AutoFlowGuide`: a Pyro `AutoContinuous` guide whose posterior is a flow from a `FlowSpec`.

Latent sites are packed and unconstrained by Pyro's own machinery (`biject_to`); the flow's
final affine starts at ``init_loc_fn``'s location with ``init_scale``, so a new guide is the
diagonal-normal guide Pyro would start from, then the flow layers bend it. A Laplace start
instead whitens: a fixed last map ``z = MAP + L x`` (``L L^T`` the inverse Hessian), with the
affine and layers starting as the identity on ``x``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import ComposeTransform
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoContinuous, init_to_median
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from flowguides.core import (
    PRECONDITION,
    DiscreteLatentError,
    NoLatentSitesError,
    as_spec,
    check_init_scale,
    check_not_delta,
    check_num_draws,
    check_observed,
    check_preconditioner,
    check_vectorize_option,
    coordinate_sites,
    local_latent_error,
    spec_in_dtype,
    warn_masked_latents,
)
from flowguides.core.calls import call_error, first_line, foreign_arguments
from flowguides.core.hessian import Blocks, hessian_blocks, hessian_colors
from flowguides.pyro import _support
from flowguides.pyro._control import reference_terms
from flowguides.pyro._model import BatchLogJoint
from flowguides.pyro._stream import deterministic_sites, full_data_chunks
from flowguides.pyro.build import (
    Flow,
    FlowDistribution,
    Precondition,
    build_flow,
    get_weights,
    set_weights,
)
from flowguides.pyro.laplace import choose_start, laplace_search
from flowguides.spec import FlowSpec, SpecError

__all__ = ["AutoFlowGuide"]

_NUM_SUMMARY_DRAWS = 4000


class AutoFlowGuide(AutoContinuous, BatchLogJoint):
    """A flow guide: ``eps ~ N(0, I)`` -> flow layers -> affine -> unconstrained latents.

    Drop-in for `AutoNormal`/`AutoDiagonalNormal`: works with `SVI` and
    ``Trace_ELBO(num_particles=N, vectorize_particles=guide.vectorized)``, `Predictive`,
    subsampled observation plates, and offers `median`, `quantiles` (from draws) and
    `get_posterior`. The flow follows the model's floating dtype (`spec` then says it).

    Args:
        model: a Pyro model with continuous latent sites.
        spec: the flow spec (or its dict form); its ``base`` must be ``"affine"``.
        init_loc_fn: per-site initial location (Pyro's init strategies); the affine's `loc`
            starts at the packed unconstrained location it gives.
        init_scale: initial posterior scale in unconstrained space, a positive float, or
            ``"laplace"``: a short MAP optimisation (L-BFGS) from the initial location, then
            the `preconditioner` ``z = MAP + L x`` with ``L`` the Cholesky factor of ``H^-1``,
            `H` the Hessian of the negative log joint there (diagonal ``1 / sqrt(diag H)``,
            held as a vector, where `H` is not positive definite or the dimension exceeds
            `FULL_RANK_MAX_DIM`, above which ``diag H`` comes without forming `H`;
            0.1 with a `LaplaceFallbackWarning` where a diagonal entry is not positive, and
            the 0.1 start where there is no mode); or ``"auto"``: whichever of the Laplace
            start and the plain starts with scale 0.1 and 1.0 has the highest ELBO (256
            draws, fixed seed). Laplace wins by far on badly scaled, correlated regressions;
            funnels, whose MAP collapses a scale to zero, want 1.0.
        prefix: the name under which Pyro's param store holds the flow's weights.
        vectorize_particles: how batches of draws (the start search, `batch_log_joint`, a
            fit's particles and diagnostics) go through the model: ``True`` all at once under
            an extra outermost plate; ``False`` one at a time (any model, slower); ``"auto"``
            (default) checks at set-up whether the model broadcasts over such a batch (the
            log joint of a few draws evaluated together against one at a time) and, where it
            does not, evaluates one at a time with one `VectorizationWarning`. The outcome
            is `vectorized`.

    Raises:
        DiscreteLatentError, NoLatentSitesError, SpecError: on first call, naming the site
            or the dimension problem.
        ValueError: with ``vectorize_particles=True``, on first call, where the model does
            not broadcast over a batch of draws.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        spec: FlowSpec | Mapping[str, Any],
        *,
        init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median,
        init_scale: float | str = 0.1,
        prefix: str = "auto",
        vectorize_particles: bool | str = "auto",
    ) -> None:
        spec = as_spec(spec, job="posterior")
        check_vectorize_option(vectorize_particles)
        if spec.base != "affine":
            raise SpecError(
                f"base: AutoFlowGuide centres the flow with its affine base, expected 'affine', "
                f"got {spec.base!r}"
            )
        check_init_scale(init_scale)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._init_loc_fn = init_loc_fn
        # the model without AutoContinuous's InitMessenger, which would draw init values at
        # every site before poutine.condition sets them (per site, per evaluation)
        self._bare_model = (model,)
        self._pyro_name = prefix
        self.spec = spec
        self.init_scale = init_scale
        self.max_plate_nesting = 0
        self.model_trace: poutine.Trace | None = None
        self._chunks: list | None = None  # the full data in chunks, where the model subsamples
        self._reference: dict | None = None  # the start search's full-data MAP and its terms
        self._blocks: Blocks | None = None  # the layout of its sparse Hessian, if any
        self.vectorize_particles = vectorize_particles
        self.vectorized: bool | None = None  # the outcome, decided at set-up
        self.mappable = False  # where not vectorized: whether torch.func.vmap matches the loop
        self._dynamic: tuple[str, ...] = ()  # sites whose support moves with others (`_support`)
        self._warned = False

    # -- set-up ----------------------------------------------------------------------------
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
            if _support.broadcast_init(self, args, kwargs):  # drawn before its plate broadcast it
                super()._setup_prototype(*args, **kwargs)
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
            self._explain_setup_error(exc, args, kwargs)
            raise
        # the prototype trace hides observed sites; plate nesting and data need them all
        self.model_trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        nesting = [0]
        for site in self.model_trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                nesting.append(len(site["fn"].batch_shape))
                nesting += [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
        self.max_plate_nesting = max(nesting)
        self._chunks = full_data_chunks(self.model_trace)
        masks = {n: s["mask"] for n, s in self.prototype_trace.iter_stochastic_nodes()}
        warn_masked_latents(masks, self.model_trace.observation_nodes)
        for name, site in self.prototype_trace.iter_stochastic_nodes():  # no local latents
            check_not_delta(name, site["fn"])
            for frame in site["cond_indep_stack"]:
                plate = self.model_trace.nodes.get(frame.name)
                fn = plate["fn"] if plate and site_is_subsample(plate) else None
                if fn is not None and (fn.subsample_size or fn.size) < fn.size:
                    raise local_latent_error(name, frame.name, fn.subsample_size, fn.size)
        dim = self.latent_dim
        try:
            self.spec.check_dim(dim)
        except SpecError as exc:
            names = ", ".join(repr(n) for n in self._unconstrained_shapes)
            raise SpecError(
                f"{exc}: the model has {dim} latent dimension(s) (sites {names})"
            ) from None
        init = self._init_loc()
        pairs = list(self.split_latent(init))
        self._dynamic = _support.dynamic_sites(self._bare_model[0], pairs, args, kwargs)
        self.spec = spec_in_dtype(self.spec, init.dtype)  # the flow is built in the model's dtype
        flow = build_flow(self.spec, dim, seed=int(torch.randint(2**31 - 1, ()))).to(init.dtype)
        try:  # the first log joints: a NaN observation fails here, say where it is
            self._check_broadcasting(init, args, kwargs)
            loc, scale, fixed = self._initial_start(init, args, kwargs)
        except (ValueError, RuntimeError) as exc:
            check_observed({n: s["value"] for n, s in self.model_trace.nodes.items()
                            if s["type"] == "sample" and s["is_observed"]})  # fmt: skip
            self._explain_setup_error(exc, args, kwargs)
            raise
        with torch.no_grad():
            flow.affine.loc.copy_(loc)
            flow.affine.log_scale.copy_(torch.log(scale))
        if fixed is not None:
            flow.precondition = Precondition(*fixed)
        self.flow = flow

    def _initial_start(self, init: torch.Tensor, args: tuple, kwargs: dict) -> tuple:
        """``(affine loc, affine scale, (shift, scale_tril) or None)`` for `init_scale`."""
        if self.init_scale not in ("laplace", "auto"):
            return init, torch.full_like(init, float(self.init_scale)), None
        tensors = [s["value"] for s in self.model_trace.nodes.values() if s["type"] == "sample"]
        values = self.latent_dim + sum(v.numel() for v in tensors if torch.is_tensor(v))
        sites = [(shape, self.prototype_trace.nodes[name]["fn"].batch_shape)
                 for name, shape in self._unconstrained_shapes.items()]  # fmt: skip
        out = laplace_search(
            lambda z: -self.start_log_joint(z, args, kwargs),
            init,
            energies=lambda z: -self.start_log_joint(z, args, kwargs),
            values_per_copy=values,
            elbos=self.init_scale == "auto",
            colors=hessian_colors(sites),
            blocks=hessian_blocks(sites),
        )
        found = bool(out["finite"]) and not bool(out["moving"].any())
        self._reference = reference_terms(out) if found else None
        self._blocks = hessian_blocks(sites) if found and "hess_rows" in out else None
        return choose_start(self.init_scale, init, out, self._coordinate_sites)

    def _explain_setup_error(self, exc: Exception, args: tuple, kwargs: dict) -> None:
        error = call_error(self.model, args, kwargs)  # a call that does not bind
        foreign = foreign_arguments(self.model, args, kwargs, "torch")  # or a foreign type
        if error or foreign:
            raise (error or TypeError(f"{foreign} ({first_line(exc)})")) from exc
        trace = self.prototype_trace
        if trace is None:
            return
        for name, site in trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:
                raise DiscreteLatentError(
                    f"site {name!r}: a flow guide needs continuous latent sites, got a discrete "
                    f"{type(site['fn']).__name__}, and fit_posterior does not enumerate: enumerate "
                    "it in your own SVI loop (@config_enumerate on the model, TraceEnum_ELBO, "
                    f"and the guide AutoFlowGuide(poutine.block(model, hide=[{name!r}]), spec)), "
                    "or marginalise it out of the model"
                ) from exc
        for name, site in trace.iter_stochastic_nodes():
            support = site["fn"].support
            try:
                biject_to(support)
            except NotImplementedError:
                raise NotImplementedError(
                    f"site {name!r}: its support {support} has no bijection to real space in "
                    f"torch (biject_to), so no continuous guide can cover this "
                    f"{type(site['fn']).__name__}; for a covariance or precision matrix, sample "
                    "a correlation Cholesky factor with LKJCholesky (or LKJ) and scales (e.g. "
                    "HalfCauchy), and build the matrix from them"
                ) from exc
        if not any(True for _ in trace.iter_stochastic_nodes()):
            raise NoLatentSitesError(
                "model: found no latent sample sites (every site is observed); there is "
                "nothing for a guide to fit"
            ) from exc

    def _coordinate_sites(self, coords: Sequence[int]) -> list[str]:
        """Names of the sites that own packed coordinates `coords`."""
        sizes = {name: math.prod(shape) for name, shape in self._unconstrained_shapes.items()}
        return coordinate_sites(sizes, coords)

    # -- the posterior ---------------------------------------------------------------------
    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowDistribution:
        """The flow as a Pyro distribution over the packed unconstrained latent vector."""
        return FlowDistribution(self.flow)

    def get_base_dist(self) -> pyro.distributions.Distribution:
        zeros = self.flow.affine.loc.new_zeros(self.latent_dim)
        return pyro.distributions.Normal(zeros, 1.0).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> ComposeTransform:
        return ComposeTransform(self.flow.transforms)

    def get_flow(self, params: None = None) -> Flow:
        """The trained `Flow` (the guide's own module; `params` exists for NumPyro parity)."""
        self._require_setup()
        return self.flow

    def get_weights(self, params: None = None) -> dict[str, np.ndarray]:
        """The flow weights, keyed by ``spec.parameter_shapes(latent_dim)`` names."""
        return get_weights(self.get_flow(params))

    def set_weights(self, weights: Mapping[str, Any]) -> AutoFlowGuide:
        """Copy `weights` into the guide's flow in place (the guide must have been run once)."""
        set_weights(self.get_flow(), weights)
        return self

    @property
    def preconditioner(self) -> dict[str, torch.Tensor] | None:
        """The fixed last map ``z = shift + scale_tril @ x`` of a Laplace start (``shift`` the
        MAP, ``scale_tril`` the Cholesky factor of the inverse Hessian of the negative log
        joint there; a ``(latent_dim,)`` vector of scales for a diagonal whitening), keyed by
        `PRECONDITION`; None for a plain start. With it, the affine and the layers work in
        whitened coordinates (an Adam step moves about one posterior sd whatever the sites'
        scales) and start as the identity."""
        self._require_setup()
        fixed = self.flow.precondition
        if fixed is None:
            return None
        return {PRECONDITION[0]: fixed.shift, PRECONDITION[1]: fixed.scale_tril}

    def set_preconditioner(self, fixed: Mapping[str, Any] | None) -> AutoFlowGuide:
        """Set (or, with None, remove) the fixed whitening map, keyed by `PRECONDITION`."""
        self._require_setup()
        if fixed is None:
            self.flow.precondition = None
            return self
        arrays = check_preconditioner(fixed, self.latent_dim)
        like = self.flow.affine.loc  # the flow's dtype and device
        self.flow.precondition = Precondition(*(torch.as_tensor(arrays[k]).to(like)
                                                for k in PRECONDITION))  # fmt: skip
        return self

    def _require_setup(self) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                "AutoFlowGuide: the flow is built on the first call; call the guide (or "
                "fit_posterior / SVI.step) with the model's arguments first"
            )

    # -- draws and densities ---------------------------------------------------------------
    def split_latent(self, latent: torch.Tensor) -> Iterator[tuple[dict, torch.Tensor]]:
        """Yield ``(site, unconstrained value of shape (*batch, *site_shape))`` per site."""
        pos, batch = 0, latent.shape[:-1]
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = math.prod(shape)
            yield site, latent[..., pos : pos + size].reshape(batch + shape)
            pos += size

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if not self._dynamic:
            return super().forward(*args, **kwargs)
        return _support.dynamic_forward(self, args, kwargs)  # supports moved by a draw

    def constrain(
        self, latent: torch.Tensor, args: tuple = (), kwargs: Mapping[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Packed unconstrained ``(*batch, latent_dim)`` -> constrained values per site; a
        model with supports that move with other sites is replayed at draws ``(S,
        latent_dim)`` with its arguments `args`, `kwargs` (see `_support`)."""
        if not self._dynamic:
            return {site["name"]: biject_to(site["fn"].support)(u)
                    for site, u in self.split_latent(latent)}  # fmt: skip
        return _support.dynamic_constrain(self, latent, args, dict(kwargs or {}))

    def deterministic(
        self, draws: Mapping[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """The model's ``pyro.deterministic`` sites missing from `draws` (constrained latent draws
        ``{site: (S, *shape)}``): the model run at all draws at once (`_support.trace_at_draws`)
        where it broadcasts over a batch of draws, else Pyro's `Predictive`, one at a time."""
        nodes = self.model_trace.nodes
        missing = [n for n in deterministic_sites(self.model_trace) if n not in draws]
        if not missing:
            return {}
        latent = {n: torch.as_tensor(np.asarray(draws[n])) for n in self._unconstrained_shapes}
        num = next(iter(latent.values())).shape[0]

        def together() -> dict[str, torch.Tensor]:  # Pyro's Predictive misshapes event dims
            trace = _support.trace_at_draws(self, latent, args, kwargs)
            values = {n: trace.nodes[n]["value"] for n in missing}  # one no draw moves: repeated
            return {n: v.expand(num, *v.shape) if v.numel() == nodes[n]["value"].numel() else v
                    for n, v in values.items()}  # fmt: skip

        def one_by_one() -> dict[str, torch.Tensor]:
            return Predictive(self._bare_model[0], posterior_samples=latent, num_samples=num,
                              return_sites=missing, parallel=False)(*args, **kwargs)  # fmt: skip

        with torch.no_grad(), _support.same_global_rng():  # Predictive reads the global state
            out = self.evaluate_batch(together, one_by_one)
        return {n: out[n].reshape(num, *nodes[n]["value"].shape).cpu().numpy() for n in missing}

    def draws(self, num_samples: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latent, log q)``: packed unconstrained draws ``(num_samples, latent_dim)``."""
        self._require_setup()
        with torch.no_grad():
            return self.flow.sample_and_log_prob((check_num_draws(num_samples),), seed)

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinatewise median and standard deviation of unconstrained draws."""
        self._setup_if_needed(*args, **kwargs)
        latent = self.draws(_NUM_SUMMARY_DRAWS, seed=0)[0]
        return latent.median(0).values, latent.std(0)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Posterior quantiles per site, ``(len(quantiles), *site_shape)``, from draws: per
        unconstrained coordinate, mapped through the site's bijection (as Pyro's own guides
        do), so exact for elementwise supports."""
        self._setup_if_needed(*args, **kwargs)
        latent = self.draws(_NUM_SUMMARY_DRAWS, seed=0)[0]
        q = torch.as_tensor(quantiles, dtype=latent.dtype)
        return self.constrain(torch.quantile(latent, q, dim=0), args, kwargs)

    def _setup_if_needed(self, *args: Any, **kwargs: Any) -> None:
        if self.prototype_trace is None:
            with torch.enable_grad():
                self._setup_prototype(*args, **kwargs)
