"""The on-disk format of a saved flow, written once for `flowguides.io` and both backends.

A saved folder holds ``spec.json``, ``weights.safetensors`` and ``meta.json`` (see
`flowguides.io`). The backends' ``io.py`` build and read the pieces with these helpers, so that
neither imports `flowguides.io` (which imports them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flowguides.core.checks import check_weights
from flowguides.core.errors import LoadError, SaveError
from flowguides.spec import SCHEMA_VERSION, FlowSpec, SpecError

__all__ = [
    "BACKENDS",
    "FILES",
    "FORMAT_VERSION",
    "MODEL_PARAM_PREFIX",
    "check_sites",
    "density_meta",
    "density_fields",
    "kind_of",
    "posterior_meta",
    "read_folder",
    "site_meta",
    "write_folder",
]

FORMAT_VERSION = 1
BACKENDS = ("pyro", "numpyro")
FILES = ("spec.json", "weights.safetensors", "meta.json")
MODEL_PARAM_PREFIX = "model_param."
"""Weights-file key prefix of the model's own parameter sites (constrained values)."""


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
    missing = [name for name in FILES if not (folder / name).is_file()]
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


def density_meta(dim: int, mean: Any, std: Any, losses: Mapping[str, Any], **fit: Any) -> dict:
    """``meta.json`` fields of a density fit (`fit`: its ``objective``, ``coupling`` and
    ``history``)."""
    history = fit.pop("history", None) or {}
    return {
        "kind": "density",
        "dim": dim,
        "mean": None if mean is None else np.asarray(mean).tolist(),
        "std": None if std is None else np.asarray(std).tolist(),
        "losses": {k: np.asarray(v).tolist() for k, v in losses.items()},
        "history": {k: np.asarray(v).tolist() for k, v in history.items()},
        **fit,
    }


def kind_of(meta: Mapping[str, Any]) -> str:
    """The saved object's kind, checked."""
    kind = meta.get("kind")
    if kind not in ("flow", "density", "posterior"):
        raise LoadError(f"load: meta.json kind: expected flow, density or posterior, got {kind!r}")
    return kind


def posterior_meta(
    dim: int,
    sites: Mapping[str, tuple[tuple[int, ...], str]],
    losses: Any,
    model_params: Mapping[str, np.ndarray],
    precondition: Mapping[str, np.ndarray] | None,
) -> dict[str, Any]:
    """``meta.json`` fields of a posterior fit: its latent `sites` (name -> (shape, support)),
    the `losses`, the model's own parameters (which `flowguides.io.save` moves into the
    weights file) and the guide's fixed whitening, all as numpy arrays or lists."""
    meta: dict[str, Any] = {
        "kind": "posterior",
        "dim": dim,
        "sites": site_meta(sites),
        "losses": np.asarray(losses).tolist(),
    }
    if model_params:
        meta["model_params"] = dict(model_params)
    if precondition is not None:
        meta["precondition"] = {k: np.asarray(v).tolist() for k, v in precondition.items()}
    return meta


def density_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The `DensityFit` fields saved in a density's `meta`: ``losses``, ``mean``, ``std``,
    ``history``, ``objective`` and ``coupling`` (an older folder: the defaults)."""
    mean, std = meta.get("mean"), meta.get("std")
    return {
        "losses": {k: np.asarray(v, dtype=float) for k, v in meta.get("losses", {}).items()},
        "mean": None if mean is None else np.asarray(mean, dtype=float),
        "std": None if std is None else np.asarray(std, dtype=float),
        "history": {k: np.asarray(v) for k, v in meta.get("history", {}).items()},
        "objective": meta.get("objective", "maximum_likelihood"),
        "coupling": meta.get("coupling", "independent"),
    }
