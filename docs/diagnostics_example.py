"""Numbers and figures for docs/diagnostics.md: a good and a bad guide, diagnosed.

Run from the repository root (any of the two ArviZ lines):

    .venv/bin/python docs/diagnostics_example.py [OUTDIR]   # figures to docs/img by default

The guides are closed-form stand-ins implementing the fit protocol (``log_densities``,
``log_likelihood``, ``observed_data``, ``sample``, ``losses``), so the numbers are exact to
reproduce and need no backend; a `fit_posterior` result is diagnosed by the same calls.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from flowguides import diagnostics as dg
from flowguides import plots
from flowguides.psis import _import_arviz


def log_normal(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * math.log(2 * math.pi)


class GoodFit:
    """``mu ~ N(0, 10^2)``, ``y_i ~ N(mu, 1)`` (50 points); q a hair off the exact posterior."""

    def __init__(self) -> None:
        self.y = np.random.default_rng(0).normal(3.0, 1.0, size=50)
        precision = 1 / 100 + self.y.size
        self.post_mean, self.post_sd = self.y.sum() / precision, precision**-0.5
        self.q_loc, self.q_sd = self.post_mean + 0.05 * self.post_sd, 0.97 * self.post_sd
        self.losses = (
            80 * np.exp(-np.arange(1000) / 60) + 76 + np.random.default_rng(1).normal(0, 0.5, 1000)
        )

    def sample(self, num_samples, seed=None):
        z = np.random.default_rng(seed).normal(size=num_samples)
        return {"mu": self.q_loc + self.q_sd * z}

    def log_densities(self, num_samples, seed=None):
        draws = self.sample(num_samples, seed)
        mu = draws["mu"]
        log_p = log_normal(mu, 0.0, 10.0) + self.log_likelihood(draws)["y"].sum(-1)
        return draws, log_p, log_normal(mu, self.q_loc, self.q_sd)

    def log_likelihood(self, draws):
        return {"y": log_normal(self.y, draws["mu"][:, None], 1.0)}

    def observed_data(self):
        return {"y": self.y}


class FunnelFit:
    """Neal's 10-D funnel ``v ~ N(0, 3^2)``, ``x_i ~ N(0, e^v)``; q a Gaussian, too narrow in v."""

    scale = np.array([1.5] + [1.0] * 9)

    def sample(self, num_samples, seed=None):
        z = self.scale * np.random.default_rng(seed).normal(size=(num_samples, 10))
        return {"v": z[:, 0], "x": z[:, 1:]}

    def log_densities(self, num_samples, seed=None):
        draws = self.sample(num_samples, seed)
        v, x = draws["v"], draws["x"]
        log_p = log_normal(v, 0.0, 3.0) + log_normal(x, 0.0, np.exp(v / 2)[:, None]).sum(-1)
        z = np.concatenate([v[:, None], x], axis=1)
        return draws, log_p, log_normal(z, 0.0, self.scale).sum(-1)

    def log_likelihood(self, draws):
        return {}

    def observed_data(self):
        return {}


def funnel_reference(num_samples, seed):
    v = 3.0 * np.random.default_rng(seed).normal(size=num_samples)
    x = np.exp(v / 2)[:, None] * np.random.default_rng(seed + 1).normal(size=(num_samples, 9))
    return {"v": v, "x": x}


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    az = _import_arviz()
    good, funnel = GoodFit(), FunnelFit()

    print("## good fit\n")
    print(dg.diagnose(good, num_samples=4000, seed=0), "\n")
    data = dg.to_arviz(good, num_samples=4000, seed=0)
    print(az.summary(data, kind="stats"), "\n")
    loo = az.loo(data)
    elpd = loo.elpd_loo if dg.arviz_major_version() == 0 else loo.elpd
    print(f"elpd_loo = {elpd:.2f}")
    print(f"exact posterior: mean {good.post_mean:.4f}, sd {good.post_sd:.4f}\n")

    print("## bad fit (funnel)\n")
    print(dg.diagnose(funnel, num_samples=4000, seed=0), "\n")
    raw = funnel.sample(4000, seed=0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.UnreliableFitWarning)
            corrected = dg.resample_fit(funnel, 4000, seed=0)
    print(
        "sd of v: truth 3.00, raw q draws",
        f"{raw['v'].std():.2f},",
        f"PSIS-corrected {corrected.sd['v']:.2f}",
    )
    for draws_s in (1000, 4000, 16000):
        k = dg.diagnose(funnel, num_samples=draws_s, seed=1).khat
        print(f"k-hat with S = {draws_s}: {k:.2f} (threshold {dg.khat_threshold(draws_s):.2f})")

    plots.plot_losses(good, path=outdir / "losses.png")
    plots.plot_khat(good, seed=0, path=outdir / "khat-good.png")
    plots.plot_khat(funnel, seed=0, path=outdir / "khat-funnel.png")
    plots.plot_pair(funnel, funnel_reference(2000, 2), max_dims=3, path=outdir / "pair-funnel.png")
    print(f"\nfigures in {outdir}/")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/img"))
