"""The Pyro (torch) backend: flows, guides and fitting built from a `FlowSpec`."""

from __future__ import annotations

from flowguides.pyro.build import (
    Affine,
    Flow,
    FlowDistribution,
    build_flow,
    get_weights,
    set_weights,
)
from flowguides.pyro.coupling import RealNVP
from flowguides.pyro.fit import (
    DensityFit,
    NonFiniteGradientError,
    NonFiniteValidationError,
    PosteriorFit,
    fit_density,
    fit_posterior,
)
from flowguides.pyro.guide import (
    AutoFlowGuide,
    DiscreteLatentError,
    LaplaceFallbackWarning,
    NoLatentSitesError,
    VectorizationWarning,
)
from flowguides.pyro.io import export_state, import_state
from flowguides.pyro.ode import (
    MaxStepsExceededError,
    NeuralODE,
    ToleranceWarning,
    flow_matching_loss,
    training_solves,
)
from flowguides.pyro.planar import Planar

__all__ = [
    "Affine",
    "AutoFlowGuide",
    "DensityFit",
    "DiscreteLatentError",
    "Flow",
    "FlowDistribution",
    "LaplaceFallbackWarning",
    "MaxStepsExceededError",
    "NeuralODE",
    "NoLatentSitesError",
    "NonFiniteGradientError",
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
    "set_weights",
    "training_solves",
]
