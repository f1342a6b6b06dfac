"""The log joint at a batch of draws, and models that do not broadcast over such a batch.

Evaluating many draws at once (vectorised ELBO particles, a batch of draws for the start
search or the diagnostics) puts the model under one extra outermost plate, so each latent
value carries extra leading batch dimensions. A model written for one draw (``X @ b``,
``b[0] + b[1] * x``, Python loops over data) then fails, or, worse, broadcasts into values of
the wrong shape. `AutoFlowGuide` compares a few draws evaluated together against the same
draws one at a time, and where they disagree it evaluates draws one at a time: mapped by
`torch.func.vmap` where that agrees with a Python loop (checked alike), else in the loop.

The NumPyro backend's ``_model.py`` holds what its framework needs instead (traced or
constant model arguments and the compile cache's keys); the two files share their job, how a
fit runs the user's model, not their names: each backend's needs are its framework's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from flowguides.core import check_vectorize_option
from flowguides.pyro._stream import mapped_chunks, subsampled_plates
from flowguides.pyro._support import replay_constrained

__all__ = [
    "HOW_TO_VECTORIZE",
    "BatchLogJoint",
    "VectorizationWarning",
    "describe",
    "log_joint_at",
    "mismatch",
]

_CHECK_DRAWS = 3  # draws the broadcasting check evaluates together and one at a time

HOW_TO_VECTORIZE = (
    "to vectorise it, write it so that each latent value may carry extra leading batch "
    "dimensions: data-sized terms inside pyro.plate, indexing and reductions from the right "
    "(b[..., 0] rather than b[0]), and (X * b).sum(-1) rather than X @ b"
)


class VectorizationWarning(UserWarning):
    """The model does not broadcast over a batch of draws; draws run one at a time (slower)."""


def describe(exc: BaseException) -> str:
    """The first line of an exception, with its type, shortened for a message."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def coarsest_eps(*values: Any) -> float:
    """The largest epsilon of the floating tensors in `values` (nested too): a log joint is as
    precise as its coarsest input (a float64 prior over float32 data sums float32 terms)."""
    leaves = torch.utils._pytree.tree_leaves(values)
    floats = [x.dtype for x in leaves if torch.is_tensor(x) and x.is_floating_point()]
    return max((torch.finfo(dtype).eps for dtype in floats), default=torch.finfo().eps)


def mismatch(together: torch.Tensor, one_by_one: torch.Tensor, eps: float | None = None):
    """Why the log joint of draws evaluated together differs from one at a time, or None.

    The tolerance is the square root of `eps` (default: the dtype's epsilon), relative to the
    largest value: summation order differs, wrong broadcasting changes values wholesale."""
    if together.shape != one_by_one.shape:
        return (
            f"evaluated together, {one_by_one.shape[0]} draws gave log densities of shape "
            f"{tuple(together.shape)}, expected {tuple(one_by_one.shape)}"
        )
    tol = (torch.finfo(one_by_one.dtype).eps if eps is None else eps) ** 0.5
    finite = one_by_one[torch.isfinite(one_by_one)]
    size = float(finite.abs().max()) if finite.numel() else 1.0
    close = torch.isclose(together, one_by_one, rtol=tol, atol=tol * max(size, 1.0), equal_nan=True)
    if bool(close.all()):
        return None
    return (
        f"evaluated together, {one_by_one.shape[0]} draws gave log densities "
        f"{together.tolist()}, one at a time {one_by_one.tolist()}"
    )


def log_joint_at(
    model: Callable[..., Any],
    pairs: Iterable[tuple[dict, torch.Tensor]],
    args: tuple,
    kwargs: Mapping[str, Any],
    *,
    num: int | None = None,
    nest: int = 0,
    jacobian: bool = True,
) -> torch.Tensor:
    """``log p(data, z) + log|det J|`` at unconstrained values, by conditioning `model`.

    Args:
        model: the model (without an autoguide's `InitMessenger`).
        pairs: ``(prototype site, unconstrained value)`` per latent site.
        args, kwargs: the model's arguments.
        num: None for one point (no extra plate, a scalar), or the number of draws, which
            lead every value and go through the model at once under an outermost plate at
            ``dim = -nest - 1`` (one value per draw, ``(num,)``).
        nest: the model's plate nesting.
        jacobian: add ``log|det J|`` (False: the log joint alone).
    """
    trace, constrain = replay_constrained(model, pairs, args, kwargs, num=num, nest=nest)
    total = 0.0
    if jacobian:  # each site's bijection is its support's at this draw (`_support`)
        for ladj in constrain.log_dets.values():
            total = total + _per_draw(ladj, num, nest)
    trace.compute_log_prob()
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + _per_draw(site["log_prob"], num, nest)
    return torch.as_tensor(total)


def _per_draw(log_prob: Any, num: int | None, nest: int) -> torch.Tensor:
    """Sum a log-density over everything but the leading draw dimension (all, without one)."""
    log_prob = torch.as_tensor(log_prob)
    if num is None:
        return log_prob.sum()
    if log_prob.dim() == 0:
        return log_prob.expand(num)
    log_prob = log_prob.reshape(*(1,) * (nest + 1 - log_prob.dim()), *log_prob.shape)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(num)


class BatchLogJoint:
    """The log joint of `AutoFlowGuide` at one point or a batch of draws, and the set-up check
    that decides whether the model broadcasts over such a batch (`vectorized`).

    A mixin for `AutoFlowGuide` (the Pyro counterpart of NumPyro's ``_prototype.py``): it
    reads the guide's `prototype_trace`, `model_trace`, `_chunks`, `max_plate_nesting`,
    `vectorize_particles`, `vectorized`, `split_latent` and `_unpack_latent`.
    """

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
            self._warn_if_random()
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
        model = self._bare_model[0]
        return self.evaluate_batch(
            lambda: self._log_joint_together(latent, args, kwargs, model),
            lambda: torch.stack([self._log_joint_one(z, args, kwargs, model) for z in latent]),
            vectorize_particles,
            mapped=lambda: self._log_joint_mapped(latent, args, kwargs, model),
        )

    def evaluate_batch(
        self,
        together: Callable[[], Any],
        one_by_one: Callable[[], Any],
        vectorize_particles: bool | str | None = None,
        mapped: Callable[[], Any] | None = None,
    ) -> Any:
        """Run a batch of draws through the model `together` or `one_by_one`, as set.

        ``False`` runs `one_by_one`. ``True`` and ``"auto"`` run `together` (``"auto"`` runs
        `one_by_one` where set-up found that the model does not broadcast: `mapped`, the
        draws one at a time under `torch.func.vmap`, where set-up found that it agrees with
        the loop (`mappable`) and it runs, else the loop); should `together` fail where
        `one_by_one` works, ``True`` raises a `ValueError` naming the option and ``"auto"``
        switches the guide to one draw at a time with a `VectorizationWarning`. Where both
        fail, the model's own error from `one_by_one` is raised.
        """
        mode = self.vectorize_particles if vectorize_particles is None else vectorize_particles
        check_vectorize_option(mode)
        self._warn_if_random()
        if mode is False or (mode == "auto" and self.vectorized is False):
            if mode == "auto" and mapped is not None and self.mappable:
                try:
                    return mapped()
                except Exception:  # noqa: BLE001 - the loop below runs (or raises) as before
                    self.mappable = False
            return one_by_one()
        try:
            return together()
        except Exception as exc:  # whatever it is, one draw at a time below tells
            result = one_by_one()  # a model error raises here, as it would in Pyro's own loop
            self._not_broadcasting(describe(exc), mode, exc)
            return result

    def start_log_joint(
        self, latent: torch.Tensor, args: tuple, kwargs: Mapping[str, Any]
    ) -> torch.Tensor:
        """`log_joint` as the start search needs it: on all rows of the model's subsampled
        plates (`full_data_chunks`, set up in `_chunks`), so the MAP and the Hessian are the
        full posterior's, not one minibatch's scaled up (whose MAP sits about
        ``sqrt(size / subsample_size)`` posterior sds away), and the same at every call;
        `log_joint` itself where the model subsamples nothing."""
        if self._chunks is None:
            return self.log_joint(latent, *args, **kwargs)
        one = self._log_joint_one
        if latent.dim() == 1:
            self._warn_if_random()
            return self._chunked(latent, args, kwargs, one)
        return self.evaluate_batch(
            lambda: self._chunked(latent, args, kwargs, self._log_joint_together),
            lambda: torch.stack([self._chunked(z, args, kwargs, one) for z in latent]),
            mapped=lambda: self._chunked(latent, args, kwargs, self._log_joint_mapped),
        )

    def _chunked(self, latent: torch.Tensor, args: tuple, kwargs: Mapping, at: Callable):
        """The sum over `_chunks` of ``at(latent, ..., chunk(model))`` (the Jacobian with the
        first): the chunks after the first mapped by `torch.func.vmap` in blocks
        (`mapped_chunks`) where, at first use, that agreed with the loop over them (`mismatch`),
        else that loop."""
        chunks, model = self._chunks, self._bare_model[0]

        def looped() -> torch.Tensor:
            parts = [at(latent, args, kwargs, c(model), jacobian=i == 0)
                     for i, c in enumerate(chunks)]  # fmt: skip
            return torch.stack(parts).sum(0)

        def mapped() -> torch.Tensor:
            draws = 1 if latent.dim() == 1 else latent.shape[0]
            with pyro.validation_enabled(False):  # its checks branch in Python on values
                rest = mapped_chunks(
                    chunks, lambda h: at(latent, args, kwargs, h(model), jacobian=False), draws
                )
            return at(latent, args, kwargs, chunks[0](model)) + rest

        if len(chunks) < 2 or self.chunks_mapped is False:
            return looped()
        if self.chunks_mapped is None:  # the mapped sum from the first call on, if it agrees
            expected = looped()
            try:
                got = mapped()
                agree = mismatch(got.detach().reshape(-1), expected.detach().reshape(-1), self._eps)
                self.chunks_mapped = agree is None
            except Exception:  # noqa: BLE001 - not mappable over chunks: the loop
                self.chunks_mapped = False
            return got if self.chunks_mapped else expected
        try:
            return mapped()
        except Exception:  # noqa: BLE001 - the loop gives the same sum (or the model's error)
            self.chunks_mapped = False
            return looped()

    def _check_broadcasting(self, init: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Decide `vectorized`: the log joint of a few draws near `init`, evaluated together
        and one at a time, with the same subsample of any subsampled plate."""
        self.chunks_mapped: bool | None = None  # decided at the start search's first call
        self._random_log_joint: tuple[float, float] | None = None  # see `_random`
        values = [s["value"] for s in self.model_trace.nodes.values() if s["type"] != "args"]
        self._eps = coarsest_eps(init, args, kwargs, values)
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
            again = self._log_joint_one(draws[0], args, kwargs, model)[None]
            if mismatch(again, one_by_one[:1]) is not None:  # randomness outside the latents
                return self._random(float(one_by_one[0]), float(again[0]))
            try:
                together = self._log_joint_together(draws, args, kwargs, model)
                reason = mismatch(together, one_by_one, self._eps)
            except Exception as exc:  # the draws one at a time worked: a broadcasting failure
                reason = describe(exc)
        if reason is None:
            self.vectorized = True
            if not subsampled_plates(self.model_trace):
                return  # else training maps it where it can (`MappedLoss`): checked below
        else:
            self._not_broadcasting(reason, self.vectorize_particles)
        with torch.no_grad():
            try:
                mapped = self._log_joint_mapped(draws, args, kwargs, model)
                self.mappable = mismatch(mapped, one_by_one, self._eps) is None
            except Exception:  # noqa: BLE001 - not mappable: the loop
                self.mappable = False

    def _random(self, first: float, second: float) -> None:
        """Draws one at a time (or together where `vectorize_particles` is True): a model
        whose log joint at fixed latents changes cannot be checked. Said where the guide
        first evaluates that log joint (`_warn_if_random`): a guide that only draws (in a
        `TraceEnum_ELBO` loop, discrete sites hidden by ``poutine.block``) never does."""
        self.vectorized, self.mappable = self.vectorize_particles is True, False
        if self.vectorize_particles is not True:
            self._random_log_joint = (first, second)

    def _warn_if_random(self) -> None:
        if getattr(self, "_random_log_joint", None) is None:
            return
        first, second = self._random_log_joint
        self._random_log_joint = None  # once
        warnings.warn(
            f"model: its log joint at fixed latent values changes from call to call ({first} "
            f"then {second}): it draws random values outside its latent sites (a site hidden "
            "by poutine.block, torch.randn in the model), so the guide's own log densities "
            "(the start search, diagnose, log_densities) see a noisy log joint, and draws run "
            "through it one at a time (a number as init_scale skips the start search)",
            VectorizationWarning,
            stacklevel=4,
        )

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
        self,
        latent: torch.Tensor,
        args: tuple,
        kwargs: Mapping[str, Any],
        model: Callable,
        jacobian: bool = True,
    ) -> torch.Tensor:
        """`log_joint` at one point ``(latent_dim,)``, without any extra plate."""
        return log_joint_at(model, self.split_latent(latent), args, kwargs, jacobian=jacobian)

    def _log_joint_together(
        self,
        latent: torch.Tensor,
        args: tuple,
        kwargs: Mapping[str, Any],
        model: Callable,
        jacobian: bool = True,
    ) -> torch.Tensor:
        """`log_joint` of draws ``(S, latent_dim)`` at once, under an outermost plate."""
        nest, num = self.max_plate_nesting, latent.shape[0]
        pairs = self._unpack_latent(latent.reshape(num, *([1] * nest), latent.shape[-1]))
        return log_joint_at(model, pairs, args, kwargs, num=num, nest=nest, jacobian=jacobian)

    def _log_joint_mapped(
        self, latent: torch.Tensor, args: tuple, kwargs: Mapping, model: Callable, jacobian=True
    ) -> torch.Tensor:
        """`_log_joint_one` of each draw ``(S, latent_dim)``, mapped by `torch.func.vmap`
        (argument validation off: its checks branch in Python on values)."""
        with pyro.validation_enabled(False):
            one = self._log_joint_one
            return torch.func.vmap(lambda z: one(z, args, kwargs, model, jacobian=jacobian))(latent)
