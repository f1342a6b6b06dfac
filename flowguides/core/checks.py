"""Argument checks both backends run before they build or train anything.

Each raises with a message that names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from flowguides.core.errors import MaskedLatentWarning, ToleranceWarning
from flowguides.spec import FIXED_STEP_SOLVERS, FlowSpec, NeuralODESpec, SpecError

__all__ = [
    "FLOAT32_MIN_TOLERANCE",
    "GRADIENTS",
    "POSTERIOR_OBJECTIVES",
    "OBJECTIVES",
    "VECTORIZE_OPTIONS",
    "as_spec",
    "check_data",
    "check_init_scale",
    "check_num_draws",
    "check_neutra_options",
    "check_objective",
    "check_objective_options",
    "check_observed",
    "check_preconditioner",
    "check_tolerances",
    "check_training",
    "check_vectorize_option",
    "check_weights",
    "local_latent_error",
    "spec_in_dtype",
    "warn_masked_latents",
]

OBJECTIVES = ("maximum_likelihood", "flow_matching")
"""`fit_density` objectives: exact maximum likelihood, or conditional flow matching (one
neural-ODE layer)."""

FLOAT32_MIN_TOLERANCE = 1e-6
"""The tightest ``rtol``/``atol`` a float32 solve can honour (float32's epsilon is 1.2e-7)."""

POSTERIOR_OBJECTIVES = ("elbo", "iwelbo")
"""`fit_posterior` objectives: the ELBO, or the importance-weighted ELBO of `num_inner` draws."""
GRADIENTS = ("reparam", "stl")
"""`fit_posterior` gradient estimators: the reparametrisation gradient, or sticking the landing
(DReG for ``objective="iwelbo"``)."""

CONTROL_VARIATES = ("auto", "taylor", "none")
"""`fit_posterior`'s ``control_variate`` for a model whose plates subsample: ``"taylor"`` the
Taylor control variate around the full-data MAP (second order up to `FULL_RANK_MAX_DIM`
latent dimensions, first order above), ``"none"`` the plain minibatch estimate, ``"auto"``
(the default) the Taylor one where the model subsamples and the start search found a mode."""
CONTROL_VARIATE_PREFIX = "_flowguides_cv_"
"""Prefix of the control variate's fixed SVI parameters (the expansion point and the full
data's terms there) and of its factor site."""


def check_control_variate(control_variate: str) -> None:
    """Raise `ValueError` unless `control_variate` is one of `CONTROL_VARIATES`."""
    if control_variate not in CONTROL_VARIATES:
        raise ValueError(
            f"control_variate: expected one of {list(CONTROL_VARIATES)}, got {control_variate!r}"
        )


PRECONDITION = ("precondition.shift", "precondition.scale_tril")
"""Names of a guide's fixed (untrained) last map ``z = shift + scale_tril @ x``: the whitening
it takes from a Laplace start (``shift`` the MAP, ``scale_tril`` the Cholesky factor of the
inverse Hessian of the negative log joint there, or a vector of scales for a diagonal one).
Not spec weights; saved in ``meta.json``."""


JOB_ORIENTATION = {"posterior": "sampling", "density": "density"}
"""The orientation a RealNVP layer's ``orientation="auto"`` takes in each job: posterior fits
(guides) sample, so the sampling direction is the cheap one; density fits score data, so the
density direction is (Dinh et al.'s form, which the densities suite measured the better fit:
the benchmarks page's "RealNVP (density orientation)" rows)."""


def as_spec(spec: FlowSpec | Mapping[str, Any], job: str | None = None) -> FlowSpec:
    """Accept a `FlowSpec` or its dict form; anything else is a `TypeError`.

    With `job` (``"posterior"`` or ``"density"``), each RealNVP layer's ``orientation="auto"``
    becomes `JOB_ORIENTATION`'s entry for that job, so the fit holds (and saves) the spec of
    the flow it built.
    """
    if isinstance(spec, Mapping):
        spec = FlowSpec.from_dict(dict(spec))
    elif not isinstance(spec, FlowSpec):
        raise TypeError(f"spec: expected a FlowSpec or a dict, got {type(spec).__name__}")
    if job is None:
        return spec
    resolved = {"orientation": JOB_ORIENTATION[job]}
    layers = tuple(
        layer.model_copy(update=resolved) if getattr(layer, "orientation", "") == "auto" else layer
        for layer in spec.layers
    )
    return spec if layers == spec.layers else spec.model_copy(update={"layers": layers})


def check_training(
    num_steps: int, learning_rate: float | None, clip_norm: float | None, num_particles: int = 1
) -> None:
    """Raise a `ValueError` unless `num_steps` and `num_particles` are positive integers,
    `learning_rate` a positive number (or None for the default) and `clip_norm` positive or
    None."""
    for name, value in (("num_steps", num_steps), ("num_particles", num_particles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"learning_rate: expected a positive number, got {learning_rate!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm: expected a positive number or None, got {clip_norm!r}")


def check_objective(spec: FlowSpec, objective: str, sigma_min: float) -> None:
    """Raise unless `objective` is one of `OBJECTIVES` that `spec` can train with."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")
    if not 0.0 <= sigma_min < 1.0:
        raise ValueError(f"sigma_min: expected a number in [0, 1), got {sigma_min!r}")
    types = [layer.type for layer in spec.layers]
    if objective == "flow_matching" and types != ["neural_ode"]:
        raise SpecError(
            "layers: objective='flow_matching' trains the vector field of exactly one "
            f"neural_ode layer, expected ['neural_ode'], got {types}"
        )


def check_tolerances(spec: NeuralODESpec, dtype: str, *, stacklevel: int = 4) -> None:
    """Warn (`ToleranceWarning`) when a float32 adaptive solve asks for too tight a tolerance."""
    adaptive = spec.solver not in FIXED_STEP_SOLVERS
    if dtype == "float32" and adaptive and min(spec.rtol, spec.atol) < FLOAT32_MIN_TOLERANCE:
        warnings.warn(
            f"rtol/atol: a float32 neural ODE cannot honour tolerances below "
            f"{FLOAT32_MIN_TOLERANCE:g}, got rtol={spec.rtol:g}, atol={spec.atol:g}; use "
            "dtype='float64' for tighter solves",
            ToleranceWarning,
            stacklevel=stacklevel,
        )


def check_weights(
    spec: FlowSpec,
    dim: int,
    weights: Mapping[str, Any],
    *,
    error: type[Exception] = ValueError,
) -> None:
    """Raise `error` unless `weights` holds exactly the spec's parameter names in `dim`
    dimensions (`FlowSpec.parameter_shapes`), each with its shape."""
    shapes = spec.parameter_shapes(dim)
    missing = [k for k in shapes if k not in weights]
    extra = [k for k in weights if k not in shapes]
    if missing:
        raise error(
            f"weights: missing parameter(s) {missing} for this spec in {dim} dimensions "
            f"(expected {list(shapes)})"
        )
    if extra:
        raise error(
            f"weights: unknown parameter(s) {extra} for this spec in {dim} dimensions "
            f"(expected {list(shapes)})"
        )
    for name, shape in shapes.items():
        actual = tuple(np.shape(weights[name]))
        if actual != tuple(shape):
            raise error(f"weights: parameter {name!r}: expected shape {tuple(shape)}, got {actual}")


def check_data(data: Any, *, name: str = "data", dim: int | None = None) -> np.ndarray:
    """Return `data` as a finite 2-D float array ``(n, dim)``, or raise a `ValueError`.

    The message names the problem: the rank, the dimension, or the rows holding NaN/inf.
    """
    detach = getattr(data, "detach", None)  # a torch tensor that requires grad: its values
    arr = np.asarray(detach() if callable(detach) else data)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        row = dim is not None and dim > 1 and arr.shape[0] == dim
        raise ValueError(
            f"{name}: expected a 2-D array (n_points, dim), got shape {arr.shape}; "
            + ("for one point use x[None, :]" if row else "for 1-D data use data[:, None]")
        )
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n_points, dim), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns, got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"{name}: {len(rows)} row(s) hold NaN or inf, rows [{shown}]")
    return arr.astype(np.float64, copy=False)


def check_preconditioner(fixed: Mapping[str, Any], dim: int) -> dict[str, np.ndarray]:
    """`fixed` as float arrays after checking its names and shapes.

    ``scale_tril`` is either a ``(dim, dim)`` lower-triangular matrix with a positive diagonal
    (full-rank whitening) or a ``(dim,)`` vector of positive scales (a diagonal whitening,
    stored and applied as a vector so that memory and work grow with ``dim``, not ``dim**2``).
    """
    if set(fixed) != set(PRECONDITION):
        raise ValueError(
            f"preconditioner: expected the keys {list(PRECONDITION)}, got {sorted(fixed)}"
        )
    shift, tril = (np.asarray(fixed[k], dtype=float) for k in PRECONDITION)
    if shift.shape != (dim,) or tril.shape not in ((dim,), (dim, dim)):
        raise ValueError(
            f"preconditioner: expected shapes ({dim},) and ({dim}, {dim}) (full) or ({dim},) "
            f"(diagonal), got {shift.shape} and {tril.shape}"
        )
    if not np.all(np.isfinite(shift)) or not np.all(np.isfinite(tril)):
        raise ValueError("preconditioner: expected finite values, got NaN or inf")
    if tril.ndim == 1:
        if not np.all(tril > 0):
            raise ValueError(
                f"preconditioner: a diagonal {PRECONDITION[1]!r} must be positive, got "
                f"min {tril.min()!r}"
            )
    elif np.any(np.triu(tril, 1) != 0) or not np.all(np.diagonal(tril) > 0):
        raise ValueError(
            f"preconditioner: {PRECONDITION[1]!r} must be lower triangular with a positive diagonal"
        )
    return {PRECONDITION[0]: shift, PRECONDITION[1]: tril}


VECTORIZE_OPTIONS = ("auto", True, False)
"""Values of ``vectorize_particles``: ``"auto"`` tries evaluating a batch of draws at once and
falls back to one at a time where the model does not broadcast; ``True`` at once; ``False``
one at a time. NumPyro's fits vectorise every model (``vmap``) and accept it for parity."""


def check_vectorize_option(value: Any, *, allow_none: bool = False) -> None:
    """Raise a `ValueError` unless `value` is ``"auto"``, ``True`` or ``False`` (or None)."""
    if allow_none and value is None:
        return
    if not (isinstance(value, bool) or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"vectorize_particles: expected 'auto', True or False, got {value!r}")


def check_objective_options(spec: FlowSpec, objective: str, gradient: str, num_inner: int) -> None:
    """Raise (`ValueError`, naming the argument) unless `objective`, `gradient` and `num_inner`
    are valid, and (`SpecError`) for neural-ODE layers with anything but the defaults."""
    if objective not in POSTERIOR_OBJECTIVES:
        raise ValueError(
            f"objective: expected one of {list(POSTERIOR_OBJECTIVES)}, got {objective!r}"
        )
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient: expected one of {list(GRADIENTS)}, got {gradient!r}")
    if isinstance(num_inner, bool) or not isinstance(num_inner, int) or num_inner < 1:
        raise ValueError(f"num_inner: expected a positive integer, got {num_inner!r}")
    if objective == "elbo" and num_inner != 1:
        raise ValueError(f"num_inner: only objective='iwelbo' uses it, expected 1, got {num_inner}")
    types = [layer.type for layer in spec.layers]
    if "neural_ode" in types and (objective, gradient) != ("elbo", "reparam"):
        raise SpecError(
            f"layers: objective={objective!r} with gradient={gradient!r} needs planar or realnvp "
            "layers (STL would add an inverse ODE solve per draw, and the RNODE records follow "
            f"the ELBO's particles); neural_ode layers train with 'elbo' and 'reparam', got {types}"
        )


def check_neutra_options(
    spec: FlowSpec,
    num_warmup: int,
    num_samples: int,
    num_chains: int,
    target_accept_prob: float = 0.8,
):
    """Raise unless the budgets and NUTS's target acceptance are valid and `spec` has no
    neural-ODE layer.

    Raises:
        ValueError: a budget that is not a positive integer (`num_warmup` may be 0); a
            `target_accept_prob` that is not a number strictly between 0 and 1.
        SpecError: a neural-ODE layer (see `neutra`).
    """
    p = target_accept_prob
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p < 1.0:
        raise ValueError(f"target_accept_prob: expected a number in (0, 1), got {p!r}")
    for name, value, low in [
        ("num_warmup", num_warmup, 0),
        ("num_samples", num_samples, 1),
        ("num_chains", num_chains, 1),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "a non-negative" if low == 0 else "a positive"
            raise ValueError(f"{name}: expected {kind} integer, got {value!r}")
    types = [layer.type for layer in spec.layers]
    if "neural_ode" in types:
        raise SpecError(
            "layers: NeuTra runs the flow forward, with its log-determinant and their "
            "gradients, at every leapfrog step: for a neural_ode layer that is an ODE solve "
            "and its adjoint per step, so it is refused; fit a planar or realnvp flow for "
            f"NeuTra, got {types}"
        )


def check_observed(values: Mapping[str, Any]) -> None:
    """Raise a `ValueError` naming the first observed site whose value holds NaN or inf
    (`values`: ``{site: array}``), with how many entries and the first index; called where a
    model's set-up has failed, so it never refuses a model that runs."""
    for name, value in values.items():
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"site {name!r}: the observed value holds {int(bad.sum())} NaN or inf of "
                f"{array.size} entries (the first at index {first}), so the log density is NaN "
                f"at every latent value; drop those entries or mask them out (a boolean "
                f"obs_mask= on the site, or the PPL's mask handler)"
            )


def local_latent_error(site: str, plate: str, subsample_size: int, size: int) -> ValueError:
    """The error for a latent site inside a plate that subsamples (a local latent variable)."""
    return ValueError(
        f"site {site!r}: a latent site inside plate {plate!r}, which subsamples "
        f"({subsample_size} of {size}); a flow guide is one joint distribution over fixed-size "
        f"latent sites, so each step's subsample would pair the same guide coordinates with "
        f"other data points. Subsample only plates that hold no latent site, or keep this "
        f"plate whole (subsample_size=None)"
    )


def spec_in_dtype(spec: FlowSpec, dtype: Any) -> FlowSpec:
    """`spec` with the dtype its flow is built in (Pyro's follows the model's latent values,
    ``torch.float64`` or ``"float64"``), so a fit and its saved folder say what the weights
    are. Not a warning where the spec said another: one spec serves both backends, and a
    float64 spec for JAX's x64 mode meets float32 latents in most Pyro models."""
    name = str(dtype).removeprefix("torch.")
    if name == spec.dtype or name not in ("float32", "float64"):
        return spec
    return spec.model_copy(update={"dtype": name})


def check_init_scale(init_scale: Any) -> None:
    """An `AutoFlowGuide`'s `init_scale`: a finite positive number, ``"laplace"`` or ``"auto"``."""
    number = isinstance(init_scale, int | float) and not isinstance(init_scale, bool)
    if init_scale not in ("laplace", "auto") and not (
        number and math.isfinite(init_scale) and init_scale > 0
    ):
        raise ValueError(
            f"init_scale: expected a positive number, 'laplace' or 'auto', got {init_scale!r}"
        )


def warn_masked_latents(masks: Mapping[str, Any], observed: Any) -> None:
    """Warn (`MaskedLatentWarning`) for each ``obs_mask`` missing-value site: the latent
    ``{name}_unobserved`` (`masks`: ``{site: its mask or None}``) beside the observed
    ``{name}_observed`` (in `observed`, the observed site names) spans every position, the
    observed ones masked out and so without density: nothing pins the guide there, so its
    scale grows without bound and the ELBO with it, and `diagnose` and `infer` read those
    coordinates too. (A latent site masked by the user, e.g. NumPyro's imputation recipe's
    ``.mask(False)``, usually gets its density through another site: not warned.)"""
    for name, mask in masks.items():
        base = name.removesuffix("_unobserved")
        if base == name or f"{base}_observed" not in observed:
            continue
        try:
            kept = np.asarray(True if mask is None else mask, dtype=bool)
        except (TypeError, ValueError):  # a traced mask: nothing to read
            continue
        if kept.all():
            continue
        warnings.warn(
            f"site {name!r}: its mask leaves {kept.size - kept.sum()} of {kept.size} coordinates "
            "without density (the observed positions of obs_mask's missing-value site): the "
            "guide cannot fit them (their scale grows without bound, and the ELBO with it), "
            "and diagnose and infer read them; sample only the missing values instead (a site "
            "of their count, placed into the data with an index update)",
            MaskedLatentWarning,
            stacklevel=4,
        )


def check_num_draws(num: Any, name: str = "num_samples") -> int:
    """`num` as an int, or a `ValueError` unless it is a non-negative integer."""
    if isinstance(num, bool) or not isinstance(num, int | np.integer) or num < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {num!r}")
    return int(num)
