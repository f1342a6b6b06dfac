"""flowguides: normalizing flows as guides and densities for Pyro and NumPyro.

One shared, validated [`FlowSpec`][flowguides.spec.FlowSpec] builds the same flow in torch
(`flowguides.pyro`) and in JAX (`flowguides.numpyro`). Importing `flowguides` imports neither
torch nor jax: the backends load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from flowguides.spec import (
    FlowSpec,
    NeuralODESpec,
    PlanarSpec,
    RealNVPSpec,
    SpecError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "FlowSpec",
    "PlanarSpec",
    "RealNVPSpec",
    "NeuralODESpec",
    "SpecError",
    "pyro",
    "numpyro",
]

_LAZY = {"pyro": "flowguides.pyro", "numpyro": "flowguides.numpyro"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'flowguides' has no attribute {name!r}")
