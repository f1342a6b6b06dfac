"""Backend-free loader for the nine posteriordb reference posteriors in ``benchmarks/data``.

Each posterior folder holds the data and 10 chains x 1,000 reference draws (stan-dev/posteriordb,
BSD-3, see ``benchmarks/data/posteriordb/LICENCE.md``). :func:`load` returns a :class:`Posterior`
whose reference draws are reassembled from Stan's 1-based scalar names (``theta[1]`` ...
``theta[8]``) into arrays named as the models' sites (``theta`` of shape ``(10000, 8)``).

The Pyro and NumPyro translations live in ``pyro_models.py`` and ``numpyro_models.py`` (a
registry ``MODELS`` in each, keyed by the names in :data:`NAMES`). Some reference parameters are
``deterministic`` sites of those models (:data:`DETERMINISTIC`); :func:`latent_values` maps one
reference draw to the values of the models' latent sample sites.

Example:
    >>> post = load("eight_schools-eight_schools_noncentered")
    >>> post.reference["theta"].shape
    (10000, 8)
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATA_DIR",
    "DETERMINISTIC",
    "NAMES",
    "Posterior",
    "UnknownPosteriorError",
    "latent_values",
    "load",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "posteriordb"
"""Folder holding one sub-folder per posterior (``data.json.zip``, ``reference_draws.json.zip``)."""

NAMES: tuple[str, ...] = (
    "eight_schools-eight_schools_noncentered",
    "eight_schools-eight_schools_centered",
    "arK-arK",
    "garch-garch11",
    "gp_pois_regr-gp_pois_regr",
    "kidiq-kidscore_momiq",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "sblrc-blr",
    "diamonds-diamonds",
)
"""The nine posterior names, as posteriordb spells them."""

DETERMINISTIC: dict[str, tuple[str, ...]] = {
    "eight_schools-eight_schools_noncentered": ("theta",),
    "garch-garch11": ("beta1",),
    "gp_pois_regr-gp_pois_regr": ("f",),
}
"""Reference parameters that the models record as ``deterministic`` sites (not latent)."""

_SCALAR_NAME = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?P<index>[0-9, ]+)\])?$")


class UnknownPosteriorError(ValueError):
    """Raised for a posterior name that is not one of :data:`NAMES`."""


@dataclass(frozen=True)
class Posterior:
    """One reference posterior.

    Attributes:
        name: the posteriordb name, e.g. ``"arK-arK"``.
        data: the data set, each field a numpy array (scalars as 0-d arrays); pass it to a model
            as keyword arguments, ``model(**post.data)``.
        reference: ``site name -> (10000, *shape)`` array of reference draws (constrained space,
            chains concatenated in order).
        names: the site names in ``reference``, in the order the reference lists them.
        deterministic: the names in ``reference`` that the models record as ``deterministic``.
    """

    name: str
    data: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    names: list[str]
    deterministic: tuple[str, ...]

    @property
    def latent_names(self) -> list[str]:
        """Reference names that are latent sample sites of the models."""
        return [n for n in self.names if n not in self.deterministic]


def _read_zip_json(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(archive.namelist()[0]))


def _assemble(chains: list[dict[str, list[float]]]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Stack the chains and gather 1-based scalar names into arrays named by their base name."""
    columns = {
        k: np.concatenate([np.asarray(c[k], dtype=float) for c in chains]) for k in chains[0]
    }
    groups: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    for key, column in columns.items():
        match = _SCALAR_NAME.match(key)
        if match is None:
            raise ValueError(f"reference draws: cannot parse parameter name {key!r}")
        index = match["index"]
        idx = () if index is None else tuple(int(i) - 1 for i in index.split(","))
        groups.setdefault(match["base"], {})[idx] = column
    num_draws = len(next(iter(columns.values())))
    reference = {}
    for base, parts in groups.items():
        shape = () if () in parts else tuple(int(n) + 1 for n in np.max(list(parts), axis=0))
        array = np.full((num_draws, *shape), np.nan)
        for idx, column in parts.items():
            array[(slice(None), *idx)] = column
        if np.isnan(array).any():
            raise ValueError(f"reference draws: parameter {base!r} has missing elements")
        reference[base] = array
    return reference, list(groups)


def load(name: str) -> Posterior:
    """Load one posterior's data and reference draws from :data:`DATA_DIR`.

    Args:
        name: one of :data:`NAMES`.

    Returns:
        The :class:`Posterior`.

    Raises:
        UnknownPosteriorError: if ``name`` is not one of :data:`NAMES`.
    """
    if name not in NAMES:
        raise UnknownPosteriorError(f"posterior: expected one of {list(NAMES)}, got {name!r}")
    folder = DATA_DIR / name
    raw = _read_zip_json(folder / "data.json.zip")
    data = {k: np.asarray(v) for k, v in raw.items()}
    reference, names = _assemble(_read_zip_json(folder / "reference_draws.json.zip"))
    return Posterior(name, data, reference, names, DETERMINISTIC.get(name, ()))


def _exp_quad_cholesky(x: np.ndarray, alpha: float, rho: float) -> np.ndarray:
    """Cholesky factor of ``alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2)) + 1e-10 I``."""
    diff = x[:, None] - x[None, :]
    cov = alpha**2 * np.exp(-(diff**2) / (2 * rho**2)) + 1e-10 * np.eye(x.shape[0])
    return np.linalg.cholesky(cov)


def latent_values(posterior: Posterior, index: int) -> dict[str, np.ndarray]:
    """Values of the models' latent sample sites at one reference draw.

    Inverts the deterministic maps where a reference parameter is not latent:
    ``theta_trans = (theta - mu) / tau`` (non-centered eight schools),
    ``beta1_unit = beta1 / (1 - alpha1)`` (GARCH), ``f_tilde = L^{-1} f`` (GP Poisson).

    Args:
        posterior: from :func:`load`.
        index: which of the 10,000 draws.

    Returns:
        ``site name -> value`` (float64 numpy arrays) for every latent site of the model.
    """
    draw = {k: np.asarray(v[index], dtype=float) for k, v in posterior.reference.items()}
    if posterior.name == "eight_schools-eight_schools_noncentered":
        draw["theta_trans"] = (draw.pop("theta") - draw["mu"]) / draw["tau"]
    elif posterior.name == "garch-garch11":
        draw["beta1_unit"] = draw.pop("beta1") / (1.0 - draw["alpha1"])
    elif posterior.name == "gp_pois_regr-gp_pois_regr":
        chol = _exp_quad_cholesky(
            np.asarray(posterior.data["x"], dtype=float), draw["alpha"], draw["rho"]
        )
        draw["f_tilde"] = np.linalg.solve(chol, draw.pop("f"))
    return draw
