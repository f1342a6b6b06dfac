"""`AutoFlowGuide`: a Pyro `AutoContinuous` guide whose posterior is a flow from a `FlowSpec`.

Latent sites are packed and unconstrained by Pyro's own machinery (`biject_to`); the flow's
final affine starts at ``init_loc_fn``'s location with ``init_scale``, so a new guide is the
diagonal-normal guide Pyro would start from, then the flow layers bend it. A Laplace start
instead whitens: a fixed last map ``z = MAP + L x`` (``L L^T`` the inverse Hessian), with the
affine and layers starting as the identity on ``x``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import ComposeTransform
from pyro.infer.autoguide import AutoContinuous, init_to_median
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from flowguides.core import (
    PRECONDITION,
    DiscreteLatentError,
    NoLatentSitesError,
    as_spec,
    check_preconditioner,
    check_vectorize_option,
)
from flowguides.pyro.build import (
    Flow,
    FlowDistribution,
    Precondition,
    build_flow,
    get_weights,
    set_weights,
)
from flowguides.pyro.laplace import best_start, laplace_start
from flowguides.pyro.vectorize import (
    HOW_TO_VECTORIZE,
    VectorizationWarning,
    describe,
    log_joint_at,
    mismatch,
)
from flowguides.spec import FlowSpec, SpecError

__all__ = ["AutoFlowGuide", "VectorizationWarning"]

_NUM_SUMMARY_DRAWS = 4000
_CHECK_DRAWS = 3  # draws the broadcasting check evaluates together and one at a time


class AutoFlowGuide(AutoContinuous):
    """A flow guide: ``eps ~ N(0, I)`` -> flow layers -> affine -> unconstrained latents.

    Drop-in for `AutoNormal`/`AutoDiagonalNormal`: works with `SVI` and
    ``Trace_ELBO(num_particles=N, vectorize_particles=guide.vectorized)``, `Predictive`,
    subsampled observation plates, and offers `median`, `quantiles` (from draws) and
    `get_posterior`. The flow follows the model's floating dtype.

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
        spec = as_spec(spec)
        check_vectorize_option(vectorize_particles)
        if spec.base != "affine":
            raise SpecError(
                f"base: AutoFlowGuide centres the flow with its affine base, expected 'affine', "
                f"got {spec.base!r}"
            )
        if init_scale not in ("laplace", "auto") and not (
            isinstance(init_scale, int | float)
            and not isinstance(init_scale, bool)
            and math.isfinite(init_scale)
            and init_scale > 0
        ):
            raise ValueError(
                f"init_scale: expected a positive number, 'laplace' or 'auto', got {init_scale!r}"
            )
        super().__init__(model, init_loc_fn=init_loc_fn)
        # the model without AutoContinuous's InitMessenger, which would draw init values at
        # every site before poutine.condition sets them (per site, per evaluation)
        self._bare_model = (model,)
        self._pyro_name = prefix
        self.spec = spec
        self.init_scale = init_scale
        self.max_plate_nesting = 0
        self.model_trace: poutine.Trace | None = None
        self.vectorize_particles = vectorize_particles
        self.vectorized: bool | None = None  # the outcome, decided at set-up
        self._warned = False

    # -- set-up ----------------------------------------------------------------------------
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            self._explain_setup_error(exc)
            raise
        # the prototype trace hides observed sites; plate nesting and data need them all
        self.model_trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        nesting = [0]
        for site in self.model_trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                nesting.append(len(site["fn"].batch_shape))
                nesting += [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
        self.max_plate_nesting = max(nesting)
        dim = self.latent_dim
        try:
            self.spec.check_dim(dim)
        except SpecError as exc:
            names = ", ".join(repr(n) for n in self._unconstrained_shapes)
            raise SpecError(
                f"{exc}: the model has {dim} latent dimension(s) (sites {names})"
            ) from None
        init = self._init_loc()
        flow = build_flow(self.spec, dim, seed=int(torch.randint(2**31 - 1, ()))).to(init.dtype)
        self._check_broadcasting(init, args, kwargs)
        if self.init_scale == "laplace":
            loc, scale, fixed = laplace_start(self, init, args, kwargs)
        elif self.init_scale == "auto":
            loc, scale, fixed = best_start(self, init, args, kwargs)
        else:
            loc, scale, fixed = init, torch.full_like(init, float(self.init_scale)), None
        with torch.no_grad():
            flow.affine.loc.copy_(loc)
            flow.affine.log_scale.copy_(torch.log(scale))
        if fixed is not None:
            flow.precondition = Precondition(*fixed)
        self.flow = flow

    def _explain_setup_error(self, exc: Exception) -> None:
        trace = self.prototype_trace
        if trace is None:
            return
        for name, site in trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:
                raise DiscreteLatentError(
                    f"site {name!r}: a flow guide needs continuous latent sites, got a discrete "
                    f"{type(site['fn']).__name__}; enumerate it (@config_enumerate on the model "
                    f"with TraceEnum_ELBO, and guide poutine.block(model, hide=[{name!r}])) or "
                    "marginalise it out of the model"
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
        owners, pos = [], 0
        for name, shape in self._unconstrained_shapes.items():
            size = math.prod(shape)
            if any(pos <= c < pos + size for c in coords):
                owners.append(name)
            pos += size
        return owners

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
        like = self.flow.affine.loc
        arrays = check_preconditioner(fixed, self.latent_dim)
        self.flow.precondition = Precondition(
            *(
                torch.as_tensor(arrays[k], dtype=like.dtype, device=like.device)
                for k in PRECONDITION
            )
        )
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

    def constrain(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """Packed unconstrained ``(*batch, latent_dim)`` -> constrained values per site."""
        return {
            site["name"]: biject_to(site["fn"].support)(u) for site, u in self.split_latent(latent)
        }

    def log_joint(self, latent: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``log p(data, z) + log|det J|`` of packed unconstrained `latent`.

        The model's joint density (observations included, plate scales applied) at the
        constrained values, plus the log-Jacobian of the unconstraining bijections: the target
        density in the guide's space, so ``log_joint - log q`` is an importance log-weight.

        Args:
            latent: one point ``(latent_dim,)`` (evaluated without any extra plate, so this is
                safe inside a running `SVI` step) or draws ``(S, latent_dim)``, evaluated as
                `batch_log_joint` does.
            *args, **kwargs: the model's arguments.

        Returns:
            A scalar, or one value per draw ``(S,)``.
        """
        if latent.dim() == 1:
            return self._log_joint_one(latent, args, kwargs, self._bare_model[0])
        return self.batch_log_joint(latent, args, kwargs)

    def batch_log_joint(
        self,
        latent: torch.Tensor,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        vectorize_particles: bool | str | None = None,
    ) -> torch.Tensor:
        """`log_joint` of draws ``(S, latent_dim)``, one value per draw ``(S,)``.

        Vectorised, the draws go through the model at once under an extra outermost plate;
        otherwise one at a time (see `evaluate_batch`).

        Args:
            latent: the draws.
            args, kwargs: the model's arguments.
            vectorize_particles: ``True``, ``False``, ``"auto"``, or None for the guide's own
                setting (with ``"auto"``, its outcome at set-up: `vectorized`).
        """
        kwargs = dict(kwargs or {})
        return self.evaluate_batch(
            lambda: self._log_joint_together(latent, args, kwargs, self._bare_model[0]),
            lambda: torch.stack(
                [self._log_joint_one(z, args, kwargs, self._bare_model[0]) for z in latent]
            ),
            vectorize_particles,
        )

    def evaluate_batch(
        self,
        together: Callable[[], Any],
        one_by_one: Callable[[], Any],
        vectorize_particles: bool | str | None = None,
    ) -> Any:
        """Run a batch of draws through the model `together` or `one_by_one`, as set.

        ``False`` runs `one_by_one`. ``True`` and ``"auto"`` run `together` (``"auto"`` runs
        `one_by_one` where set-up found that the model does not broadcast); should `together`
        fail where `one_by_one` works, ``True`` raises a `ValueError` naming the option and
        ``"auto"`` switches the guide to one draw at a time with a `VectorizationWarning`.
        Where both fail, the model's own error from `one_by_one` is raised.
        """
        mode = self.vectorize_particles if vectorize_particles is None else vectorize_particles
        check_vectorize_option(mode)
        if mode is False or (mode == "auto" and self.vectorized is False):
            return one_by_one()
        try:
            return together()
        except Exception as exc:  # whatever it is, one draw at a time below tells
            result = one_by_one()  # a model error raises here, as it would in Pyro's own loop
            self._not_broadcasting(describe(exc), mode, exc)
            return result

    def _check_broadcasting(self, init: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Decide `vectorized`: the log joint of a few draws near `init`, evaluated together
        and one at a time, with the same subsample of any subsampled plate."""
        if self.vectorize_particles is False:
            self.vectorized = False
            return
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn((_CHECK_DRAWS, init.numel()), generator=gen, dtype=init.dtype)
        draws = init + 0.1 * noise
        fixed = poutine.Trace()  # the subsample indices of the model's plates
        for name, site in self.model_trace.nodes.items():
            if site_is_subsample(site):
                fixed.add_node(name, **site)
        model = poutine.replay(self._bare_model[0], trace=fixed)
        with torch.no_grad():
            one_by_one = torch.stack([self._log_joint_one(z, args, kwargs, model) for z in draws])
            try:
                reason = mismatch(self._log_joint_together(draws, args, kwargs, model), one_by_one)
            except Exception as exc:  # the draws one at a time worked: a broadcasting failure
                reason = describe(exc)
        if reason is None:
            self.vectorized = True
        else:
            self._not_broadcasting(reason, self.vectorize_particles)

    def _not_broadcasting(
        self, reason: str, mode: bool | str, exc: Exception | None = None
    ) -> None:
        if mode is True:
            raise ValueError(
                "vectorize_particles=True: the model does not broadcast over a batch of draws "
                f"evaluated at once ({reason}); pass vectorize_particles='auto' or False to "
                f"evaluate draws one at a time, or {HOW_TO_VECTORIZE}"
            ) from exc
        self.vectorized = False
        if not self._warned:
            self._warned = True
            warnings.warn(
                "model: it does not broadcast over a batch of draws evaluated at once "
                f"({reason}), so particles and draws run through it one at a time (slower); "
                f"{HOW_TO_VECTORIZE}; or pass vectorize_particles=False to skip this check",
                VectorizationWarning,
                stacklevel=4,
            )

    def _log_joint_one(
        self, latent: torch.Tensor, args: tuple, kwargs: Mapping[str, Any], model: Callable
    ) -> torch.Tensor:
        """`log_joint` at one point ``(latent_dim,)``, without any extra plate."""
        return log_joint_at(model, self.split_latent(latent), args, kwargs)

    def _log_joint_together(
        self, latent: torch.Tensor, args: tuple, kwargs: Mapping[str, Any], model: Callable
    ) -> torch.Tensor:
        """`log_joint` of draws ``(S, latent_dim)`` at once, under an outermost plate."""
        nest, num = self.max_plate_nesting, latent.shape[0]
        pairs = self._unpack_latent(latent.reshape(num, *([1] * nest), latent.shape[-1]))
        return log_joint_at(model, pairs, args, kwargs, num=num, nest=nest)

    def draws(self, num_samples: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latent, log q)``: packed unconstrained draws ``(num_samples, latent_dim)``."""
        self._require_setup()
        with torch.no_grad(), torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return self.flow.rsample_and_log_prob((num_samples,))

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinatewise median and standard deviation of unconstrained draws."""
        self._setup_if_needed(*args, **kwargs)
        latent = self.draws(_NUM_SUMMARY_DRAWS, seed=0)[0]
        return latent.median(0).values, latent.std(0)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Posterior quantiles per site, ``(len(quantiles), *site_shape)``, from draws.

        Quantiles are taken per unconstrained coordinate and mapped through the site's
        bijection (as Pyro's own guides do), so they are exact for elementwise supports.
        """
        self._setup_if_needed(*args, **kwargs)
        latent = self.draws(_NUM_SUMMARY_DRAWS, seed=0)[0]
        q = torch.as_tensor(quantiles, dtype=latent.dtype)
        return self.constrain(torch.quantile(latent, q, dim=0))

    def _setup_if_needed(self, *args: Any, **kwargs: Any) -> None:
        if self.prototype_trace is None:
            with torch.enable_grad():
                self._setup_prototype(*args, **kwargs)
