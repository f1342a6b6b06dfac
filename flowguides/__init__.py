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
    "save",
    "load",
    "to_arviz",
    "diagnose",
    "Diagnosis",
]

# name -> (module, attribute or None for the module itself); loaded on first use.
_LAZY = {
    "pyro": ("flowguides.pyro", None),
    "numpyro": ("flowguides.numpyro", None),
    "save": ("flowguides.io", "save"),
    "load": ("flowguides.io", "load"),
    "to_arviz": ("flowguides.inference_data", "to_arviz"),
    "diagnose": ("flowguides.diagnostics", "diagnose"),
    "Diagnosis": ("flowguides.diagnostics", "Diagnosis"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowguides' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
