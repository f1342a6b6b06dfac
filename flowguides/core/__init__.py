"""Every rule of flowguides that needs no framework, written once for both backends.

Importing it imports neither torch nor jax. Both backends re-export its errors and warnings
(one class each: ``except flowguides.core.NonFiniteLossError`` catches either backend's), call
its checks so that both refuse the same input with the same message, and follow its training
rules (schedule, default learning rate, data splits, the start search's constants).

- `flowguides.core.errors`: the errors and warnings.
- `flowguides.core.checks`: argument, spec, weight and data checks.
- `flowguides.core.training`: schedule, default learning rate, splits, starts.
- `flowguides.core.coupling`: flow matching's minibatch coupling and validation schedule.
- `flowguides.core.results`: the methods both `PosteriorFit` classes share, `NeuTraResult`.
- `flowguides.core.routes`: `infer`'s routing by PSIS k-hat and weight spread (`KHAT_GUIDE`,
  `GUIDE_MAX_WEIGHT_CV`, `KHAT_PSIS`, `PSIS_MAX_WEIGHT_CV`, `choose_route`), its check of NUTS
  chains (`chains_trouble`) and its `InferResult`.
- `flowguides.core.data`: what `fit_density` accepts (arrays, memory-mapped arrays,
  iterables of minibatches): checks, splits and standardisation, streamed.
- `flowguides.core.timing`: the keys of `fit.timing` (set-up parts, compile, training, draws).
- `flowguides.core.calls`: what flowguides reads off user callables (names, parameter labels,
  the stack level of a warning).
- `flowguides.core.state`: the saved-folder format the backends' ``io.py`` read and write.
"""

from __future__ import annotations

from flowguides.core.checks import (
    CONTROL_VARIATE_PREFIX,
    CONTROL_VARIATES,
    FLOAT32_MIN_TOLERANCE,
    GRADIENTS,
    OBJECTIVES,
    POSTERIOR_OBJECTIVES,
    PRECONDITION,
    VECTORIZE_OPTIONS,
    as_spec,
    check_control_variate,
    check_data,
    check_neutra_options,
    check_objective,
    check_objective_options,
    check_observed,
    check_preconditioner,
    check_tolerances,
    check_training,
    check_vectorize_option,
    check_weights,
    local_latent_error,
)
from flowguides.core.coupling import (
    COUPLINGS,
    FLOW_MATCHING_VALIDATE_EVERY,
    FLOW_MATCHING_VALIDATION_ROWS,
    check_coupling,
    ot_permutation,
    validation_spec,
)
from flowguides.core.data import STREAM_BLOCK_BYTES, data_kind, prepare_data
from flowguides.core.errors import (
    DiscreteLatentError,
    FitBelowStartWarning,
    LaplaceFallbackWarning,
    LoadError,
    MaxStepsExceededError,
    NoLatentSitesError,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteValidationError,
    SaveError,
    ToleranceWarning,
)
from flowguides.core.results import (
    NEUTRA_OPTIONS,
    NeuTraResult,
    PosteriorFitMethods,
    call_with_vectorize,
)
from flowguides.core.routes import (
    GUIDE_MAX_WEIGHT_CV,
    INFER_NUTS_BUDGET,
    INFER_ROUTES,
    KHAT_GUIDE,
    KHAT_PSIS,
    NEUTRA_MAX_DIVERGENT,
    NEUTRA_MAX_RHAT,
    PSIS_MAX_WEIGHT_CV,
    InferDiagnosis,
    InferResult,
    chains_trouble,
    check_infer_options,
    choose_route,
    route_fit,
)
from flowguides.core.training import (
    AUTO_SCALES,
    DEFAULT_LEARNING_RATE,
    DENSITY_BUDGETS,
    DENSITY_LEARNING_RATE,
    DENSITY_PATIENCE,
    FULL_RANK_MAX_DIM,
    LEARNING_RATE_REFERENCE_DIM,
    MODE_TOLERANCE,
    VALIDATE_EVERY,
    WITH_REPLACEMENT_RATIO,
    coordinate_sites,
    decay_steps,
    default_learning_rate,
    density_budget,
    density_patience,
    learning_rate_at,
    split_indices,
    standardization,
    warn_if_below_start,
)

__all__ = [
    "WITH_REPLACEMENT_RATIO",
    "DENSITY_LEARNING_RATE",
    "DENSITY_PATIENCE",
    "STREAM_BLOCK_BYTES",
    "data_kind",
    "prepare_data",
    "GUIDE_MAX_WEIGHT_CV",
    "INFER_NUTS_BUDGET",
    "INFER_ROUTES",
    "KHAT_GUIDE",
    "KHAT_PSIS",
    "PSIS_MAX_WEIGHT_CV",
    "NEUTRA_MAX_DIVERGENT",
    "NEUTRA_MAX_RHAT",
    "NEUTRA_OPTIONS",
    "InferDiagnosis",
    "InferResult",
    "check_infer_options",
    "chains_trouble",
    "choose_route",
    "route_fit",
    "GRADIENTS",
    "POSTERIOR_OBJECTIVES",
    "NeuTraResult",
    "check_neutra_options",
    "check_objective_options",
    "check_observed",
    "AUTO_SCALES",
    "CONTROL_VARIATES",
    "CONTROL_VARIATE_PREFIX",
    "COUPLINGS",
    "DEFAULT_LEARNING_RATE",
    "FLOAT32_MIN_TOLERANCE",
    "FLOW_MATCHING_VALIDATE_EVERY",
    "FLOW_MATCHING_VALIDATION_ROWS",
    "FULL_RANK_MAX_DIM",
    "LEARNING_RATE_REFERENCE_DIM",
    "MODE_TOLERANCE",
    "OBJECTIVES",
    "PRECONDITION",
    "VALIDATE_EVERY",
    "VECTORIZE_OPTIONS",
    "DiscreteLatentError",
    "FitBelowStartWarning",
    "LaplaceFallbackWarning",
    "LoadError",
    "MaxStepsExceededError",
    "NoLatentSitesError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NonFiniteValidationError",
    "PosteriorFitMethods",
    "SaveError",
    "ToleranceWarning",
    "as_spec",
    "call_with_vectorize",
    "check_coupling",
    "check_control_variate",
    "check_data",
    "check_objective",
    "check_preconditioner",
    "check_tolerances",
    "check_training",
    "check_vectorize_option",
    "check_weights",
    "local_latent_error",
    "coordinate_sites",
    "decay_steps",
    "default_learning_rate",
    "DENSITY_BUDGETS",
    "density_budget",
    "density_patience",
    "learning_rate_at",
    "ot_permutation",
    "split_indices",
    "standardization",
    "validation_spec",
    "warn_if_below_start",
]
