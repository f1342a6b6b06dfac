"""The Pyro (torch) backend: flows, guides and fitting built from a `FlowSpec`.

The same file, function and parameter names as `flowguides.numpyro`; one weight file serves
both. The errors and warnings are `flowguides.core`'s (one class each, for both backends).
Names only this backend exports: `Affine` and `FlowDistribution` (torch modules and a Pyro
distribution with no JAX counterpart) and `VectorizationWarning` (Pyro evaluates a model's
batch of draws under an extra plate only where the model broadcasts).
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
from flowguides.pyro._model import VectorizationWarning
from flowguides.pyro._training import ObjectiveLoss
from flowguides.pyro.build import (
    Affine,
    Flow,
    FlowDistribution,
    build_flow,
    get_weights,
    set_weights,
)
from flowguides.pyro.coupling import RealNVP
from flowguides.pyro.density import DensityFit, fit_density
from flowguides.pyro.guide import AutoFlowGuide
from flowguides.pyro.infer import InferResult, infer
from flowguides.pyro.io import export_state, import_state
from flowguides.pyro.neutra import NeuTraResult
from flowguides.pyro.ode import NeuralODE, flow_matching_loss, training_solves
from flowguides.pyro.planar import Planar
from flowguides.pyro.posterior import PosteriorFit, fit_posterior

__all__ = [
    "FLOAT32_MIN_TOLERANCE",
    "Affine",
    "AutoFlowGuide",
    "DensityFit",
    "DiscreteLatentError",
    "FitBelowStartWarning",
    "InferResult",
    "Flow",
    "FlowDistribution",
    "LaplaceFallbackWarning",
    "MaskedLatentWarning",
    "SubsampledSiteWarning",
    "MaxStepsExceededError",
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
    "VectorizationWarning",
    "build_flow",
    "export_state",
    "fit_density",
    "fit_posterior",
    "flow_matching_loss",
    "get_weights",
    "import_state",
    "infer",
    "set_weights",
    "training_solves",
]
