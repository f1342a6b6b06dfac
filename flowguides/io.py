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
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flowguides.spec import SCHEMA_VERSION, FlowSpec, SpecError

__all__ = [
    "FORMAT_VERSION",
    "MODEL_PARAM_PREFIX",
    "SaveError",
    "LoadError",
    "save",
    "load",
    "read_folder",
]

FORMAT_VERSION = 1
BACKENDS = ("pyro", "numpyro")
_FILES = ("spec.json", "weights.safetensors", "meta.json")
MODEL_PARAM_PREFIX = "model_param."
"""Weights-file key prefix of the model's own parameter sites (constrained values)."""


class SaveError(ValueError):
    """The object cannot be saved, or the target exists and `overwrite` is off."""


class LoadError(ValueError):
    """A saved folder is missing a file, corrupt, or does not match what it is loaded onto."""


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


def write_folder(
    path: str | os.PathLike[str],
    spec: FlowSpec,
    weights: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    model_params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the three files atomically (temporary sibling folder, then rename).

    `model_params` (the model's own parameter sites, constrained) go into the weights file
    under `MODEL_PARAM_PREFIX`.
    """
    from safetensors.numpy import save_file

    target = Path(path)
    if target.exists() and not overwrite:
        raise SaveError(f"save: {str(target)!r} exists; pass overwrite=True to replace it")
    if not target.parent.is_dir():
        raise SaveError(f"save: the parent folder {str(target.parent)!r} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / "spec.json").write_text(spec.to_json())
        arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in weights.items()}
        for name, value in (model_params or {}).items():
            arrays[MODEL_PARAM_PREFIX + name] = np.array(value, order="C")  # 0-d stays 0-d
        save_file(arrays, str(tmp / "weights.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=2, default=_json_default))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_folder(path: str | os.PathLike[str]) -> tuple[FlowSpec, dict[str, np.ndarray], dict]:
    """Read and check a saved folder: ``(spec, weights, meta)``.

    The model's parameters saved with a posterior come back as ``meta["model_params"]``
    (``{site: constrained array}``); the key is absent when the folder holds none.

    Raises:
        LoadError: a file is missing or corrupt, the format is newer than this flowguides
            reads, or the weights do not match the spec's names and shapes.
    """
    from safetensors.numpy import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"load: no such folder {str(folder)!r}")
    missing = [name for name in _FILES if not (folder / name).is_file()]
    if missing:
        raise LoadError(f"load: {str(folder)!r} is missing {', '.join(missing)}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise LoadError(f"load: meta.json is not valid JSON ({exc})") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LoadError(
            f"load: meta.json format_version {version!r} is newer than this flowguides reads "
            f"({FORMAT_VERSION}); upgrade flowguides"
        )
    try:
        spec = FlowSpec.from_json((folder / "spec.json").read_text())
    except SpecError as exc:
        if "schema_version" in str(exc):
            raise LoadError(f"load: spec.json: {exc} (reads schema {SCHEMA_VERSION})") from None
        raise LoadError(f"load: spec.json: {exc}") from None
    try:
        weights = load_file(str(folder / "weights.safetensors"))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise LoadError(f"load: weights.safetensors is corrupt ({exc})") from None
    dim = meta.get("dim")
    if not isinstance(dim, int) or dim < 1:
        raise LoadError(f"load: meta.json dim: expected a positive integer, got {dim!r}")
    model_params = {
        key[len(MODEL_PARAM_PREFIX) :]: weights.pop(key)
        for key in [k for k in weights if k.startswith(MODEL_PARAM_PREFIX)]
    }
    check_weights(spec, dim, weights, error=LoadError)
    if model_params:
        meta["model_params"] = model_params
    return spec, {name: weights[name] for name in spec.parameter_shapes(dim)}, meta


def check_weights(
    spec: FlowSpec,
    dim: int,
    weights: Mapping[str, Any],
    *,
    error: type[Exception] = ValueError,
) -> None:
    """Raise `error` unless `weights` has exactly the spec's names with the spec's shapes."""
    shapes = spec.parameter_shapes(dim)
    missing = [k for k in shapes if k not in weights]
    extra = [k for k in weights if k not in shapes]
    if missing:
        raise error(f"weights: missing {missing} for this spec in {dim} dimensions")
    if extra:
        raise error(f"weights: unexpected {extra} for this spec in {dim} dimensions")
    for name, shape in shapes.items():
        actual = tuple(np.shape(weights[name]))
        if actual != tuple(shape):
            raise error(f"weights: {name!r} expected shape {tuple(shape)}, got {actual}")


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


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"meta.json: cannot write {type(value).__name__}")


def site_meta(guide_sites: Mapping[str, tuple[tuple[int, ...], str]]) -> list[dict[str, Any]]:
    """Latent sites in packing order for ``meta.json``: name, constrained shape, support."""
    return [
        {"name": name, "shape": list(shape), "support": support}
        for name, (shape, support) in guide_sites.items()
    ]


def check_sites(
    meta: Mapping[str, Any], guide_sites: Mapping[str, tuple[tuple[int, ...], str]]
) -> None:
    """Raise `LoadError` unless the model's latent sites are the saved ones (names, shapes)."""
    saved = {s["name"]: tuple(s["shape"]) for s in meta.get("sites", [])}
    found = {name: tuple(shape) for name, (shape, _) in guide_sites.items()}
    if list(saved) != list(found):
        raise LoadError(
            f"load: the model's latent sites {list(found)} differ from the saved ones {list(saved)}"
        )
    for name, shape in saved.items():
        if found[name] != shape:
            raise LoadError(
                f"load: site {name!r} has shape {found[name]} in the model, {shape} when saved"
            )


def density_meta(dim: int, mean: Any, std: Any, losses: Mapping[str, Any]) -> dict[str, Any]:
    """``meta.json`` fields of a density fit."""
    return {
        "kind": "density",
        "dim": dim,
        "mean": None if mean is None else np.asarray(mean).tolist(),
        "std": None if std is None else np.asarray(std).tolist(),
        "losses": {k: np.asarray(v).tolist() for k, v in losses.items()},
    }


def kind_of(meta: Mapping[str, Any]) -> str:
    """The saved object's kind, checked."""
    kind = meta.get("kind")
    if kind not in ("flow", "density", "posterior"):
        raise LoadError(f"load: meta.json kind: expected flow, density or posterior, got {kind!r}")
    return kind
