"""Backend-free checks both zoo tests share: moments against a closed form, ArviZ groups,
and the warnings a fit may give.

Moment tolerances, for ``S = 2000`` draws of a fitted guide against the exact posterior (mean
``m``, sd ``s``, coordinatewise): ``|mean - m| <= MEAN_TOL * s`` and ``|sd / s - 1| <= SD_TOL``.
The Monte Carlo error alone is ``s / sqrt(S)`` on the mean (0.022 s) and about ``1 / sqrt(2 S)``
on the sd ratio (0.016); the rest is the guide's own error after a short fit (the noise of a
few hundred Adam steps). The tolerances sit above the largest errors measured over seeds 0-4
of every closed-form model in both backends (reported with the zoo, not here: figures go
stale). A wrong posterior lands far outside them:
an ignored mask or obs mask moves a mean by five to fifteen sds, a model parameter left at its
initial value moves the type-II model's means by more than one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

NUM_DRAWS = 2000
MEAN_TOL = 0.3
SD_TOL = 0.2


def check_moments(draws: Mapping[str, np.ndarray], exact: Mapping[str, tuple]) -> None:
    """Assert every checked coordinate's mean and sd against the closed form (NaN: skip)."""
    for name, (mean, sd) in exact.items():
        values = np.asarray(draws[name], dtype=np.float64)
        mean, sd = np.broadcast_to(mean, values.shape[1:]), np.broadcast_to(sd, values.shape[1:])
        checked = np.isfinite(mean)
        z = np.abs(values.mean(0) - mean)[checked] / sd[checked]
        ratio = values.std(0)[checked] / sd[checked]
        assert z.max() <= MEAN_TOL, (
            f"site {name!r}: mean off by {z.max():.3f} posterior sd (at most {MEAN_TOL})"
        )
        assert np.abs(ratio - 1).max() <= SD_TOL, (
            f"site {name!r}: sd ratio {ratio.min():.3f}..{ratio.max():.3f} (within {SD_TOL} of 1)"
        )


def check_posterior_group(idata: Any, shapes: Mapping[str, tuple], num_samples: int) -> None:
    """The ``posterior`` group (ArviZ 0.x or 1.x) holds every site of `shapes` (the latent and
    deterministic ones), ``(1, S, *shape)``."""
    posterior = idata["posterior"]
    assert set(posterior.data_vars) == set(shapes), (
        f"posterior group: {sorted(posterior.data_vars)}, latent sites {sorted(shapes)}"
    )
    for name, shape in shapes.items():
        assert tuple(posterior[name].shape) == (1, num_samples, *shape), name


def moment_summary(draws: Mapping[str, np.ndarray], exact: Mapping[str, tuple]) -> str:
    """Largest mean error (in sds) and sd-ratio error, for the failure messages and reports."""
    rows = []
    for name, (mean, sd) in exact.items():
        values = np.asarray(draws[name], dtype=np.float64)
        mean, sd = np.broadcast_to(mean, values.shape[1:]), np.broadcast_to(sd, values.shape[1:])
        ok = np.isfinite(mean)
        z = np.abs(values.mean(0) - mean)[ok] / sd[ok]
        ratio = values.std(0)[ok] / sd[ok]
        rows.append(f"{name}: mean {z.max():.3f} sd, sd ratio {np.abs(ratio - 1).max():.3f}")
    return "; ".join(rows)


class Warnings:
    """Record every warning in a block, then check them against the one kind expected.

    A fit may warn only where the model needs it (a model that does not broadcast over
    particles, a model that reads a data value in Python): then at least one warning of the
    expected category must come, and no warning of any other kind.
    """

    def __init__(self) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self.caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> Warnings:
        self.caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)

    def check(self, expect: type[Warning] | None, allowed: tuple[type[Warning], ...] = ()) -> None:
        """`expect` must come (unless None); `allowed` may come; nothing else may."""
        expected = [w for w in self.caught if expect is not None and issubclass(w.category, expect)]
        others = [f"{w.category.__name__}: {w.message}" for w in self.caught
                  if w not in expected and not issubclass(w.category, allowed)]  # fmt: skip
        assert not others, f"unexpected warnings: {others}"
        if expect is not None:
            assert expected, f"expected a {expect.__name__}, got none"
