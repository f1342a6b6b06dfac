"""Portable save/load: a fitted flow is a folder of ``spec.json``, weights and ``meta.json``.

The weights file (safetensors) is keyed by the spec's parameter names
(`FlowSpec.parameter_shapes`), which both backends build identically, so a flow saved from
one backend loads into the other. Folders are written to a temporary sibling and renamed into
place, so a failed save never leaves half a folder behind.

```
fit/
  spec.json              the FlowSpec (canonical dict form)
  weights.safetensors    float arrays keyed by parameter name; the model's own learned
                         parameters (``pyro.param`` / ``numpyro.param`` sites, type-II ML),
                         constrained, keyed ``model_param.<site name>`` (posteriors)
  meta.json              flowguides version, kind, backend it was trained in, dim,
                         data standardisation (densities), latent sites (posteriors),
                         the guide's fixed Laplace whitening ("precondition": shift and
                         scale_tril, posteriors with a Laplace start)
```

The model's parameters ride in the weights file under `MODEL_PARAM_PREFIX`: a backend's
``export_state`` returns them as ``meta["model_params"] = {site: constrained array}``, `save`
moves them into the weights file, and `read_folder` hands them back the same way (the key is
absent for folders without any, older folders included). A backend's ``import_state`` sets
them where its model reads them (Pyro: the param store).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from flowguides.core.checks import check_weights
from flowguides.core.errors import LoadError, SaveError
from flowguides.core.state import (
    BACKENDS,
    FORMAT_VERSION,
    MODEL_PARAM_PREFIX,
    read_folder,
    write_folder,
)

__all__ = [
    "FORMAT_VERSION",
    "MODEL_PARAM_PREFIX",
    "LoadError",
    "SaveError",
    "backend_module",
    "check_weights",
    "load",
    "read_folder",
    "save",
    "write_folder",
]


def _backend_of(obj: Any) -> str:
    module = type(obj).__module__
    for name in BACKENDS:
        if module.startswith(f"flowguides.{name}"):
            return name
    raise SaveError(
        f"save: expected a DensityFit, PosteriorFit or flow from flowguides.pyro or "
        f"flowguides.numpyro, got {type(obj).__module__}.{type(obj).__name__}"
    )


def backend_module(backend: str) -> Any:
    """The backend package, with a clear error for an unknown name or a missing install."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    try:
        return importlib.import_module(f"flowguides.{backend}")
    except ImportError as exc:
        extra = "pyro" if backend == "pyro" else "numpyro"
        raise ImportError(
            f"backend {backend!r} needs `pip install flowguides[{extra}]` ({exc})"
        ) from exc


def save(obj: Any, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Save a `DensityFit`, a `PosteriorFit` or a bare flow of either backend to a folder.

    Args:
        obj: what to save.
        path: the folder to write (created; its parent must exist).
        overwrite: replace an existing folder at `path`.

    Returns:
        The folder's path.

    Raises:
        SaveError: `obj` is not a flowguides object, or `path` exists and `overwrite` is off.
    """
    backend = _backend_of(obj)
    mod = backend_module(backend)
    spec, weights, meta = mod.export_state(obj)
    meta = dict(meta)
    model_params = meta.pop("model_params", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "flowguides_version": _version(),
        "backend": backend,
        **meta,
    }
    return write_folder(path, spec, weights, meta, model_params=model_params, overwrite=overwrite)


def load(path: str | os.PathLike[str], backend: str = "pyro", **kwargs: Any) -> Any:
    """Load a saved folder into `backend` (``"pyro"`` or ``"numpyro"``).

    A density loads as that backend's `DensityFit`, a bare flow as its flow. A posterior loads
    as a `PosteriorFit` when the model is given (``model=...``, and ``model_args``/
    ``model_kwargs`` if it takes arguments); its latent sites must match the saved ones.

    Raises:
        LoadError: see `read_folder`; also a posterior's sites that differ from the model's.
    """
    spec, weights, meta = read_folder(path)
    return backend_module(backend).import_state(spec, weights, meta, **kwargs)


def _version() -> str:
    from flowguides import __version__

    return __version__
