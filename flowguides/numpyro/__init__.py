"""The NumPyro (JAX) backend: flows, guides and fitting built from a `FlowSpec`.

The same file, function and parameter names as `flowguides.pyro`; one weight file serves
both. The errors and warnings are `flowguides.core`'s (one class each, for both backends).
Names only this backend exports: `FlowTransform` (the flow as one numpyro `Transform`),
`ConstantArgumentsWarning` and `ModelTracingError` (a model's arguments are traced by JAX or
compiled in as constants), `clear_compiled` (the cache of compiled programs) and
`use_compilation_cache` (JAX's persistent compilation cache, across processes).
"""

from __future__ import annotations

from flowguides.core import (
    FLOAT32_MIN_TOLERANCE,
    DiscreteLatentError,
    FitBelowStartWarning,
    LaplaceFallbackWarning,
    MaskedLatentWarning,
    MaxStepsExceededError,
    NoLatentSitesError,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteValidationError,
    SubsampledSiteWarning,
    ToleranceWarning,
)
from flowguides.numpyro._model import ConstantArgumentsWarning, ModelTracingError
from flowguides.numpyro._training import ObjectiveLoss, clear_compiled
from flowguides.numpyro.build import Flow, FlowTransform, build_flow, get_weights, set_weights
from flowguides.numpyro.coupling import RealNVP
from flowguides.numpyro.density import DensityFit, fit_density
from flowguides.numpyro.guide import AutoFlowGuide
from flowguides.numpyro.infer import InferResult, infer
from flowguides.numpyro.io import export_state, import_state, use_compilation_cache
from flowguides.numpyro.neutra import NeuTraResult
from flowguides.numpyro.ode import NeuralODE, flow_matching_loss, training_solves
from flowguides.numpyro.planar import Planar
from flowguides.numpyro.posterior import PosteriorFit, fit_posterior

__all__ = [
    "FLOAT32_MIN_TOLERANCE",
    "AutoFlowGuide",
    "ConstantArgumentsWarning",
    "DensityFit",
    "DiscreteLatentError",
    "FitBelowStartWarning",
    "InferResult",
    "Flow",
    "FlowTransform",
    "LaplaceFallbackWarning",
    "MaskedLatentWarning",
    "SubsampledSiteWarning",
    "MaxStepsExceededError",
    "ModelTracingError",
    "NeuTraResult",
    "ObjectiveLoss",
    "NeuralODE",
    "NoLatentSitesError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NonFiniteValidationError",
    "Planar",
    "PosteriorFit",
    "RealNVP",
    "ToleranceWarning",
    "build_flow",
    "clear_compiled",
    "export_state",
    "fit_density",
    "fit_posterior",
    "flow_matching_loss",
    "get_weights",
    "import_state",
    "infer",
    "set_weights",
    "training_solves",
    "use_compilation_cache",
]
