"""Turn ``benchmarks/results/*.json`` into ``docs/benchmarks.md`` and posterior plots.

The tables print every row: its numbers, or the error its method raised. The speed suite adds
ratios of flowguides against the anchors measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KEPT", "RATIOS", "TIMING_KEYS", "machine", "write_docs"]

TIMING_KEYS = ("wall_s", "setup_s", "compile_s", "steps_per_s", "again_setup_s", "again_compile_s")
"""Timing fields a row keeps from its method."""

KEPT: dict[tuple[str, str], dict[str, np.ndarray]] = {}
"""Draws kept by the runner for plots: ``(problem, method) -> {site: draws}``."""

RATIOS = (
    ("flowguides-pyro RealNVP (SVI loop)", "pyro AutoNormalizingFlow(coupling)"),
    ("flowguides-pyro planar (SVI loop)", "pyro AutoNormalizingFlow(planar)"),
    ("flowguides-pyro RealNVP (SVI loop)", "pyro AutoIAFNormal"),
    ("flowguides-numpyro RealNVP (SVI loop)", "numpyro AutoIAFNormal"),
    ("flowguides-numpyro RealNVP (SVI loop)", "numpyro AutoBNAFNormal"),
    ("flowguides-numpyro RealNVP (SVI loop)", "flowjax coupling (ElboLoss)"),
    ("flowguides-numpyro RealNVP (SVI loop)", "bare JAX RealNVP (floor)"),
    ("flowguides-pyro RealNVP (fit_posterior)", "pyro AutoNormalizingFlow(coupling)"),
    ("flowguides-pyro RealNVP (fit_posterior)", "pyro AutoIAFNormal"),
    ("flowguides-numpyro RealNVP (fit_posterior)", "numpyro AutoIAFNormal"),
    ("flowguides-numpyro RealNVP (fit_posterior)", "bare JAX RealNVP (floor)"),
)
"""(flowguides row, anchor row) pairs compared in the speed suite."""

_PLOT_METHODS = ("flowguides-numpyro RealNVP", "flowguides-pyro RealNVP", "numpyro AutoIAFNormal",
                 "numpyro NUTS")  # fmt: skip
_PACKAGES = ("torch", "pyro-ppl", "jax", "numpyro", "flowjax", "zuko", "normflows", "arviz")


def machine(*, quick: bool, seconds: float, config: dict) -> dict[str, Any]:
    """Machine, versions, thread settings and the suite's configuration."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": quick,
        "suite_seconds": round(seconds, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": versions,
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "XLA_FLAGS")}
        | {"torch.set_num_threads": 1, "dtype": "float64"},
        "config": {k: v for k, v in config.items() if k != "plan"}
        | {"plan": {p: list(m) for p, m in config["plan"].items()}},
    }


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        if not np.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.2e}"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _err(row: dict) -> str:
    return f"**error**: `{row['error'][:160]}`" if row.get("error") else ""


def _first_step(row: dict) -> float | None:
    """Set-up plus compile: the wait before training runs at speed."""
    parts = [row.get("setup_s"), row.get("compile_s")]
    return sum(parts) if all(isinstance(p, float) for p in parts) else None


def _speed(rows: list[dict]) -> str:
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == prob]
        body = [[r["method"], _fmt(r.get("num_steps")), _fmt(r.get("steps_per_s")),
                 _fmt(r.get("setup_s")), _fmt(r.get("compile_s")), _fmt(r.get("wall_s")),
                 _fmt(r.get("elbo")), _fmt(r.get("khat")), _err(r)]
                for r in sub]  # fmt: skip
        out.append(f"### {prob}\n\n" + _table(
            ["method", "steps", "steps/s", "setup s", "compile s", "wall s", "ELBO", "k-hat",
             "error"], body))  # fmt: skip
        by = {r["method"]: r for r in sub}
        ratio_rows = []
        for fg, anchor in RATIOS:
            a, b = by.get(fg, {}), by.get(anchor, {})
            sa, sb = a.get("steps_per_s"), b.get("steps_per_s")
            ca, cb = a.get("compile_s"), b.get("compile_s")
            fa, fb = _first_step(a), _first_step(b)
            ratio_rows.append([fg, anchor, _fmt(sa / sb if sa and sb else None),
                               _fmt(ca / cb if ca and cb else None),
                               _fmt(fa / fb if fa and fb else None),
                               _fmt(a["elbo"] - b["elbo"] if a.get("elbo") is not None
                                    and b.get("elbo") is not None else None)])  # fmt: skip
        out.append(f"Ratios on {prob} (steps/s ratio > 1: flowguides faster; compile and "
                   "set-up + compile ratios < 1: flowguides ready sooner; ELBO difference > 0: "
                   "flowguides better):\n\n"
                   + _table(["flowguides", "anchor", "steps/s ratio", "compile ratio",
                             "set-up + compile ratio", "ELBO difference"], ratio_rows))  # fmt: skip
    return "\n\n".join(out)


def _posteriors(rows: list[dict]) -> str:
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == prob]
        body = []
        for r in sub:
            sd = (f"{_fmt(r.get('sd_ratio_min'))} – {_fmt(r.get('sd_ratio_max'))}"
                  if r.get("sd_ratio_min") is not None else "–")  # fmt: skip
            body.append([r["method"], _fmt(r.get("num_steps")), _fmt(r.get("mean_err")), sd,
                         _fmt(r.get("khat")), _fmt(r.get("elbo")), _fmt(r.get("elbo_gap")),
                         _fmt(r.get("wall_s")), _err(r)])  # fmt: skip
        out.append(f"### {prob}\n\n" + _table(
            ["method", "steps", "mean err (sd)", "sd ratio", "k-hat", "ELBO", "log Z − ELBO",
             "wall s", "error"], body))  # fmt: skip
    return "\n\n".join(out)


def _densities(rows: list[dict]) -> str:
    sets = list(dict.fromkeys(r["problem"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["problem"], r["method"]): r for r in rows}
    body = []
    for m in methods:
        line = [m]
        for s in sets:
            r = cell.get((s, m))
            if r is None:
                line.append("not run")
            elif r.get("error"):
                line.append(f"error: `{r['error'][:80]}`")
            else:
                line.append(
                    f"{_fmt(r.get('test_nll'))} / {_fmt(r.get('test_nll_median'))} "
                    f"({_fmt(r.get('wall_s'), 2)} s)"
                )
        body.append(line)
    dims = {r["problem"]: r.get("dim") for r in rows}
    return _table(["method", *[f"{s} ({dims[s]}-D)" for s in sets]], body)


def _plots(img: Path) -> list[str]:
    """One PNG per problem with kept draws: reference vs methods, first two coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks import targets

    made = []
    for prob in dict.fromkeys(p for p, _ in KEPT):
        panels = [(m, KEPT[(prob, m)]) for m in _PLOT_METHODS if (prob, m) in KEPT]
        if not panels:
            continue
        from benchmarks.models import posteriordb

        if prob in targets.TARGET_NAMES:
            ref = {"z": targets.TARGETS[prob].sampler(2000, np.random.default_rng(0))}
        elif prob in posteriordb.NAMES:
            post = posteriordb.load(prob)
            ref = {k: v[::5] for k, v in post.reference.items()}
        else:  # a speed-suite problem without reference draws
            continue
        flat = {k: np.asarray(v).reshape(len(v), -1) for k, v in ref.items()}
        coords = [(k, i) for k, v in flat.items() for i in range(v.shape[1])][:2]
        if len(coords) < 2:
            continue
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.2),
                                 sharex=True, sharey=True)  # fmt: skip
        for ax, (title, draws) in zip(axes, [("reference", ref), *panels], strict=True):
            try:
                xy = [np.asarray(draws[k]).reshape(len(draws[k]), -1)[:, i] for k, i in coords]
                ax.scatter(*xy, s=2, alpha=0.3)
            except KeyError:
                pass
            ax.set_title(title, fontsize=8)
            ax.set_xlabel(f"{coords[0][0]}[{coords[0][1]}]", fontsize=8)
        axes[0].set_ylabel(f"{coords[1][0]}[{coords[1][1]}]", fontsize=8)
        fig.tight_layout()
        name = f"bench-{prob}.png"
        fig.savefig(img / name, dpi=80)
        plt.close(fig)
        made.append(name)
    return made


def write_docs(results: Path, docs: Path) -> None:
    """Write ``docs/benchmarks.md`` from every suite's JSON (and plots of the kept draws)."""
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    _plots(img)
    suites = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    parts = ["# Benchmarks\n",
             "Written by `python -m benchmarks.run` (`make bench` runs `--quick`, `make bench-full` "
             "everything); the raw numbers are in `benchmarks/results/<suite>.json`. Every row has "
             "numbers or the error its method raised. All methods run on one CPU thread "
             "(`OMP_NUM_THREADS=1`, `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false "
             "intra_op_parallelism_threads=1`, `torch.set_num_threads(1)`) in float64, at an equal "
             "step budget, particles, Adam learning rate and learning-rate schedule.\n",
             "Columns: *steps/s* steady optimisation steps per second; *setup s* guide "
             "construction and initialisation before the first step (`svi.init`; for flowguides' "
             "`fit_posterior` also the `init_scale` search); *compile s* the first step (or, "
             "for `fit_posterior`, the first 100-step chunk) minus a steady one; *ELBO* the mean log weight over the evaluation draws; *k-hat* "
             "PSIS Pareto k (< 0.7 reliable); *mean err* `max_i |E_q - E_ref| / sd_ref` over every "
             "scalar; *sd ratio* range of `sd_q / sd_ref`; *test NLL* mean / median over the test points (on a "
             "set as small as iris, 38 test points, the mean is decided by one or two points far "
             "outside the training data: a flow that overfits gives them thousands of nats).\n"]  # fmt: skip
    titles = {"speed": "Speed (ELBO steps/s, compile time)", "posteriors": "Posteriors (reverse KL)",
              "densities": "Densities (forward KL: mean / median test NLL in nats per point; wall time)"}  # fmt: skip
    writers = {"speed": _speed, "posteriors": _posteriors, "densities": _densities}
    for name in ("speed", "posteriors", "densities"):
        if name not in suites:
            continue
        meta, rows = suites[name]["meta"], suites[name]["rows"]
        cfg = meta["config"]
        parts.append(f"## {titles[name]}\n")
        parts.append(
            f"Latest run {meta['date']} ({'quick' if meta['quick'] else 'full'}, "
            f"{meta['suite_seconds']} s)"
            f" on {meta['cpu']} ({meta['cpu_count']} cores, load average {meta['load_average']}); "
            f"steps {cfg.get('steps')}, particles {cfg.get('particles', '–')}, evaluation draws "
            f"{cfg.get('draws', '–')}; versions {meta['versions']}."
            + (f" {meta['rows_from_earlier_runs']} row(s) come from earlier runs (see their steps)."
               if meta.get("rows_from_earlier_runs") else "")
            + "\n"
        )  # fmt: skip
        parts.append(writers[name](rows) + "\n")
    pngs = sorted(p.name for p in img.glob("bench-*.png"))
    if pngs:
        parts.append("## Plots: draws against the reference (first two coordinates)\n")
        parts += [f"![{p}](img/{p})\n" for p in pngs]
    (docs / "benchmarks.md").write_text("\n".join(parts))
