"""`AutoFlowGuide`: a Pyro `AutoContinuous` guide whose posterior is a flow from a `FlowSpec`.

Latent sites are packed and unconstrained by Pyro's own machinery (`biject_to`); the flow's
final affine starts at ``init_loc_fn``'s location with ``init_scale``, so a new guide is the
diagonal-normal guide Pyro would start from, then the flow layers bend it. A Laplace start
instead whitens: a fixed last map ``z = MAP + L x`` (``L L^T`` the inverse Hessian), with the
affine and layers starting as the identity on ``x``.
"""

from __future__ import annotations

import contextlib
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

from flowguides._common import (
    AUTO_SCALES,
    FULL_RANK_MAX_DIM,
    PRECONDITION,
    as_spec,
    check_preconditioner,
)
from flowguides.pyro.build import (
    Flow,
    FlowDistribution,
    Precondition,
    build_flow,
    get_weights,
    set_weights,
)
from flowguides.spec import FlowSpec, SpecError

__all__ = [
    "AutoFlowGuide",
    "DiscreteLatentError",
    "LaplaceFallbackWarning",
    "NoLatentSitesError",
]

_NUM_SUMMARY_DRAWS = 4000


class DiscreteLatentError(ValueError):
    """The model has a discrete latent site, which a continuous flow cannot represent."""


class NoLatentSitesError(ValueError):
    """The model has no latent sample sites, so there is nothing for a guide to fit."""


class LaplaceFallbackWarning(UserWarning):
    """``init_scale="laplace"`` met a non-positive Hessian diagonal and used 0.1 there."""


_MODE_TOLERANCE = 0.1  # largest |gradient| x Laplace scale accepted as a mode


class _LeftSupport(Exception):
    """The MAP search evaluated the model outside a support (stop there, keep the best)."""


class AutoFlowGuide(AutoContinuous):
    """A flow guide: ``eps ~ N(0, I)`` -> flow layers -> affine -> unconstrained latents.

    Drop-in for `AutoNormal`/`AutoDiagonalNormal`: works with `SVI` and
    ``Trace_ELBO(num_particles=N, vectorize_particles=True)``, `Predictive`, subsampled
    observation plates, and offers `median`, `quantiles` (from draws) and `get_posterior`.
    The flow follows the model's floating dtype.

    Args:
        model: a Pyro model with continuous latent sites.
        spec: the flow spec (or its dict form); its ``base`` must be ``"affine"``.
        init_loc_fn: per-site initial location (Pyro's init strategies); the affine's `loc`
            starts at the packed unconstrained location it gives.
        init_scale: initial posterior scale in unconstrained space, a positive float, or
            ``"laplace"``: a short MAP optimisation (L-BFGS) from the initial location, then
            the `preconditioner` ``z = MAP + L x`` with ``L`` the Cholesky factor of ``H^-1``,
            `H` the Hessian of the negative log joint there (diagonal ``1 / sqrt(diag H)``
            where `H` is not positive definite or the dimension exceeds `FULL_RANK_MAX_DIM`;
            0.1 with a `LaplaceFallbackWarning` where a diagonal entry is not positive, and
            the 0.1 start where there is no mode); or ``"auto"``: whichever of the Laplace
            start and the plain starts with scale 0.1 and 1.0 has the highest ELBO (256
            draws, fixed seed). Laplace wins by far on badly scaled, correlated regressions;
            funnels, whose MAP collapses a scale to zero, want 1.0.
        prefix: the name under which Pyro's param store holds the flow's weights.

    Raises:
        DiscreteLatentError, NoLatentSitesError, SpecError: on first call, naming the site
            or the dimension problem.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        spec: FlowSpec | Mapping[str, Any],
        *,
        init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median,
        init_scale: float | str = 0.1,
        prefix: str = "auto",
    ) -> None:
        spec = as_spec(spec)
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
        self._pyro_name = prefix
        self.spec = spec
        self.init_scale = init_scale
        self.max_plate_nesting = 0
        self.model_trace: poutine.Trace | None = None

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
        if self.init_scale == "laplace":
            loc, scale, fixed = self._laplace(init, *args, **kwargs)
        elif self.init_scale == "auto":
            loc, scale, fixed = self._best_start(init, *args, **kwargs)
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
        if not any(True for _ in trace.iter_stochastic_nodes()):
            raise NoLatentSitesError(
                "model: found no latent sample sites (every site is observed); there is "
                "nothing for a guide to fit"
            ) from exc

    def _laplace(self, init: torch.Tensor, *args: Any, **kwargs: Any) -> Start:
        """MAP in unconstrained space, then the Laplace whitening: the affine starts as the
        identity and the fixed preconditioner holds the MAP and the Cholesky factor of the
        inverse Hessian (its diagonal alone where the Hessian is not positive definite or the
        dimension exceeds `FULL_RANK_MAX_DIM`). Falls back to the 0.1 start without a mode."""

        def energy(z: torch.Tensor) -> torch.Tensor:
            return -self.log_joint(z, *args, **kwargs)

        z = init.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], max_iter=2000, line_search_fn="strong_wolfe")
        best = [math.inf, init]  # the lowest finite energy seen, and where

        def closure() -> torch.Tensor:
            opt.zero_grad()
            try:
                value = energy(z)
            except ValueError as exc:  # the line search stepped outside a support
                raise _LeftSupport from exc
            if torch.isfinite(value) and float(value.detach()) < best[0]:
                best[:] = [float(value.detach()), z.detach().clone()]
            value.backward()
            return value

        try:
            opt.step(closure)
        except _LeftSupport:
            pass
        loc = best[1]
        hessian = torch.autograd.functional.hessian(energy, loc)
        hess = hessian.diagonal()
        good = torch.isfinite(hess) & (hess > 0)
        scale = torch.where(good, hess.clamp_min(1e-300).rsqrt(), torch.full_like(hess, 0.1))
        # A mode is stationary: its Newton step, in its own scale, is small. A density that
        # grows without bound (a funnel's scale collapsing to 0) leaves a large step behind.
        point = loc.clone().requires_grad_(True)
        grad = torch.autograd.grad(energy(point), point)[0].detach()
        moving = ~(grad.abs() * scale < _MODE_TOLERANCE)
        if moving.any() or not self._finite_around(energy, loc, scale):
            where = self._coordinate_sites(torch.nonzero(moving).flatten().tolist())
            warnings.warn(
                "init_scale='laplace': the MAP search found no mode (the density grows "
                f"without bound along sites {where}, or is not finite around the point it "
                "reached); starting from the initial location with scale 0.1 instead",
                LaplaceFallbackWarning,
                stacklevel=4,
            )
            return init, torch.full_like(init, 0.1), None
        identity = (torch.zeros_like(loc), torch.ones_like(loc))
        if good.all() and loc.numel() <= FULL_RANK_MAX_DIM:
            tril = _inverse_cholesky(hessian)
            if tril is not None:
                return (*identity, (loc, tril))
        if not good.all():
            bad = self._coordinate_sites(torch.nonzero(~good).flatten().tolist())
            warnings.warn(
                f"init_scale='laplace': the Hessian diagonal is not positive for sites {bad}; "
                "using scale 0.1 there",
                LaplaceFallbackWarning,
                stacklevel=4,
            )
        return (*identity, (loc, torch.diag(scale)))

    def _best_start(self, init: torch.Tensor, *args: Any, **kwargs: Any) -> Start:
        """The Laplace start or a plain start (`AUTO_SCALES`), whichever has the highest ELBO."""
        starts: list[Start] = [(init, torch.full_like(init, s), None) for s in AUTO_SCALES]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LaplaceFallbackWarning)
            starts.append(self._laplace(init, *args, **kwargs))
        gen = torch.Generator().manual_seed(0)
        eps = torch.randn((256, init.numel()), generator=gen, dtype=init.dtype)

        def elbo(start: Start) -> float:
            loc, scale, fixed = start
            z, log_det = loc + scale * eps, scale.log().sum()
            if fixed is not None:
                z, log_det = fixed[0] + z @ fixed[1].T, log_det + fixed[1].diagonal().log().sum()
            try:
                with torch.no_grad():
                    log_p = self.log_joint(z, *args, **kwargs)
            except ValueError:  # values outside a support: the start is unusable
                return -math.inf
            value = float(log_p.mean() + log_det)
            return value if math.isfinite(value) else -math.inf

        return max(starts, key=elbo)

    @staticmethod
    def _finite_around(
        energy: Callable[[torch.Tensor], torch.Tensor], loc: torch.Tensor, scale: torch.Tensor
    ) -> bool:
        """Whether the log joint is finite at a few draws of the Laplace approximation."""
        gen = torch.Generator().manual_seed(0)
        eps = torch.randn((16, loc.numel()), generator=gen, dtype=loc.dtype)
        try:
            with torch.no_grad():
                return bool(torch.isfinite(energy(loc + scale * eps)).all())
        except ValueError:  # a distribution's argument validation: values outside a support
            return False

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
        joint there), keyed by `PRECONDITION`; None for a plain start. With it, the affine
        and the layers work in whitened coordinates (an Adam step moves about one posterior
        sd whatever the sites' scales) and start as the identity."""
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
                safe inside a running `SVI` step) or draws ``(S, latent_dim)``, evaluated all
                at once under an extra outermost plate.
            *args, **kwargs: the model's arguments.

        Returns:
            A scalar, or one value per draw ``(S,)``.
        """
        nest = self.max_plate_nesting
        if latent.dim() == 1:
            num, pairs, plate = None, self.split_latent(latent), contextlib.nullcontext()
        else:
            num = latent.shape[0]
            shaped = latent.reshape(num, *([1] * nest), latent.shape[-1])
            pairs = self._unpack_latent(shaped)
            plate = pyro.plate("_flowguides_draws", num, dim=-nest - 1)
        values, total = {}, latent.new_zeros(() if num is None else (num,))
        for site, u in pairs:
            transform = biject_to(site["fn"].support)
            x = transform(u)
            values[site["name"]] = x
            total = total + _per_draw(transform.log_abs_det_jacobian(u, x), num, nest)
        model = poutine.condition(self.model, data=values)
        with poutine.block(), plate:
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] == "sample":
                total = total + _per_draw(site["log_prob"], num, nest)
        return total

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


def _per_draw(log_prob: torch.Tensor, num: int | None, nest: int) -> torch.Tensor:
    """Sum a log-density over everything but the leading draw dimension (all, if `num` is None)."""
    log_prob = torch.as_tensor(log_prob)
    if num is None:
        return log_prob.sum()
    if log_prob.dim() == 0:
        return log_prob.expand(num)
    log_prob = log_prob.reshape(*(1,) * (nest + 1 - log_prob.dim()), *log_prob.shape)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(num)


Start = tuple  # (affine loc, affine scale, (shift, scale_tril) or None)


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of ``hessian^-1``, or None where it is not positive definite."""
    chol, info = torch.linalg.cholesky_ex((hessian + hessian.T) / 2)
    if int(info) != 0:
        return None
    cov = torch.cholesky_inverse(chol)
    tril, info = torch.linalg.cholesky_ex((cov + cov.T) / 2)
    return tril if int(info) == 0 and bool(torch.isfinite(tril).all()) else None
