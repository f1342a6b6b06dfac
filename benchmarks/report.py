"""Turn ``benchmarks/results/*.json`` into ``docs/benchmarks.md``, plots and the README's block.

Every row is keyed by the settings that change its value (:data:`KEY_FIELDS`) and carries the
commit and UTC time it ran at; a rerun with the same key replaces a row, any other adds one
(:func:`merge_rows`). The tables print the latest row per key, its numbers or the error its
method raised, with the command that reruns it. The speed suite adds ratios of flowguides
against the anchors measured in the same run.

Usage: ``python -m benchmarks.report [--readme]`` rewrites ``docs/benchmarks.md`` (and, with
``--readme``, the block of README.md between :data:`BEGIN` and :data:`END`) from the results
without running anything. Imports neither torch nor JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BEGIN", "END", "KEPT", "KEY_FIELDS", "RATIOS", "TIMING_KEYS", "git_commit", "latest", "library_versions", "machine",
    "main", "merge_rows", "readme_block", "rerun_command", "row_key", "row_versions", "utc_now",
    "write_docs", "write_readme",
]  # fmt: skip

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
_PACKAGES = ("flowguides", "torch", "pyro-ppl", "jax", "numpyro", "flowjax", "zuko", "normflows",
             "arviz")  # fmt: skip
_LIBRARIES = {
    "flowguides-pyro": ("flowguides", "torch", "pyro-ppl"),
    "flowguides-numpyro": ("flowguides", "jax", "numpyro"),
    "pyro": ("torch", "pyro-ppl"), "numpyro": ("jax", "numpyro"), "bare": ("jax", "numpyro"),
    "flowjax": ("jax", "numpyro", "flowjax"), "zuko": ("torch", "zuko"),
    "normflows": ("torch", "normflows"),
}  # fmt: skip
"""The libraries a method's row depends on, by the first word of its name."""

KEY_FIELDS = ("suite", "problem", "method", "num_steps", "num_particles", "num_draws", "seed",
              "versions")  # fmt: skip
"""Row fields that change its value: a rerun with all of them equal replaces the row."""

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
ROOT = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str | None]:
    """Installed versions of the benchmarked packages (None where one is missing)."""
    out: dict[str, str | None] = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def row_versions(method: str, versions: dict[str, str | None]) -> dict[str, str | None]:
    """The versions of the libraries ``method``'s row used (every package for an unknown one)."""
    pkgs = _LIBRARIES.get(method.split(" ")[0], tuple(versions))
    return {p: versions.get(p) for p in pkgs}


def row_key(row: dict) -> tuple:
    """The row's :data:`KEY_FIELDS`, hashable (missing fields count as None)."""
    vers = row.get("versions") or {}
    return tuple(row.get(k) for k in KEY_FIELDS[:-1]) + (tuple(sorted(vers.items())),)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each row of ``new`` in place of the row with its key, or appended."""
    fresh = {row_key(r): r for r in new}
    merged = [fresh.pop(row_key(r), r) for r in old]
    return merged + list(fresh.values())


def latest(rows: list[dict]) -> list[dict]:
    """The latest row per key (by ``timestamp``; a row without one counts as oldest), in order
    of each key's first row."""
    out: dict[tuple, dict] = {}
    for r in rows:
        k = row_key(r)
        if k not in out or (r.get("timestamp") or "") >= (out[k].get("timestamp") or ""):
            out[k] = r
    return list(out.values())


def utc_now() -> str:
    """The time now in UTC, ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def git_commit() -> str:
    """The checkout's short commit hash (``-dirty`` appended when tracked files differ from
    it), or ``"unknown"`` outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT,
                               capture_output=True).returncode  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine(*, quick: bool, seconds: float, config: dict) -> dict[str, Any]:
    """Machine, versions, thread settings and the suite's configuration."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "quick": quick,
        "suite_seconds": round(seconds, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": library_versions(),
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


def _ran(row: dict) -> str:
    """When and on which commit a row ran (a migrated row: the commit that first recorded it)."""
    when = (row.get("timestamp") or "").replace("T", " ").replace(":00Z", "").rstrip("Z")
    where = row.get("commit") or (f"recorded in {row['recorded_in']}" if row.get("recorded_in")
                                  else None)  # fmt: skip
    return " / ".join(x for x in (when or "–", where or "–"))


def rerun_command(suite: str, rows: list[dict], only: str | None = None) -> str:
    """The one ``python -m benchmarks.run`` command that reruns ``rows`` (which share their
    steps, particles, draws and seed) at their settings; ``only`` overrides the row list."""
    r = rows[0]
    flags = [f"--suite {suite}"]
    for flag, field in (("--steps", "num_steps"), ("--particles", "num_particles"),
                        ("--draws", "num_draws"), ("--seed", "seed")):  # fmt: skip
        if r.get(field) is not None:
            flags.append(f"{flag} {r[field]}")
    return f"python -m benchmarks.run {' '.join(flags)} --only '{only or _only(suite, rows)}'"


def _only(suite: str, rows: list[dict]) -> str:
    """An ``--only`` pattern selecting exactly ``rows``: ``suite:{problems}:{methods}`` per set
    of methods that ran on the same problems."""
    probs: dict[str, list[str]] = {}
    for r in rows:
        probs.setdefault(r["method"], []).append(r["problem"])
    by_set: dict[tuple, list[str]] = {}
    for method, ps in probs.items():
        by_set.setdefault(tuple(dict.fromkeys(ps)), []).append(method)

    def alt(xs: list | tuple) -> str:
        return xs[0] if len(xs) == 1 else "{" + ",".join(xs) + "}"

    return "|".join(f"{suite}:{alt(ps)}:{alt(ms)}" for ps, ms in by_set.items())


def _settings(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("num_steps", "num_particles", "num_draws", "seed"))


def _commands(suite: str, rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_settings(r), []).append(r)
    return "Rerun:\n\n" + "\n".join(f"    {rerun_command(suite, g)}" for g in groups.values())


def _same_run(a: dict, b: dict) -> bool:
    return a.get("run") is not None and a.get("run") == b.get("run")


def _speed_ratios(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(flowguides row, anchor row) pairs of :data:`RATIOS` measured in one run."""
    pairs = []
    for fg, anchor in RATIOS:
        for a in (r for r in rows if r["method"] == fg and r.get("steps_per_s")):
            pairs += [(a, b) for b in rows if b["method"] == anchor and b.get("steps_per_s")
                      and _same_run(a, b) and _settings(a) == _settings(b)]  # fmt: skip
    return pairs


def _speed(rows: list[dict]) -> str:
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == prob]
        body = [[r["method"], _fmt(r.get("num_steps")), _fmt(r.get("steps_per_s")),
                 _fmt(r.get("setup_s")), _fmt(r.get("compile_s")), _fmt(r.get("wall_s")),
                 _fmt(r.get("elbo")), _fmt(r.get("khat")), _ran(r), _err(r)]
                for r in sub]  # fmt: skip
        out.append(f"### {prob}\n\n" + _table(
            ["method", "steps", "steps/s", "setup s", "compile s", "wall s", "ELBO", "k-hat",
             "ran (UTC) / commit", "error"], body) + "\n\n" + _commands("speed", sub))  # fmt: skip
        ratio_rows = []
        for a, b in _speed_ratios(sub):
            fa, fb = _first_step(a), _first_step(b)
            ca, cb = a.get("compile_s"), b.get("compile_s")
            ratio_rows.append([a["method"], b["method"], _fmt(a["steps_per_s"] / b["steps_per_s"]),
                               _fmt(ca / cb if ca and cb else None),
                               _fmt(fa / fb if fa and fb else None),
                               _fmt(a["elbo"] - b["elbo"] if a.get("elbo") is not None
                                    and b.get("elbo") is not None else None)])  # fmt: skip
        out.append(f"Ratios on {prob}, only between rows of one run (steps/s ratio > 1: "
                   "flowguides faster; compile and set-up + compile ratios < 1: flowguides ready "
                   "sooner; ELBO difference > 0: flowguides better):\n\n"
                   + (_table(["flowguides", "anchor", "steps/s ratio", "compile ratio",
                              "set-up + compile ratio", "ELBO difference"], ratio_rows)
                      if ratio_rows else "no flowguides and anchor rows from one run."))  # fmt: skip
    return "\n\n".join(out)


def _posteriors(rows: list[dict]) -> str:
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == prob]
        body = []
        for r in sub:
            sd = (f"{_fmt(r.get('sd_ratio_min'))} – {_fmt(r.get('sd_ratio_max'))}"
                  if r.get("sd_ratio_min") is not None else "–")  # fmt: skip
            body.append([r["method"], _fmt(r.get("num_steps")), _fmt(r.get("num_draws")),
                         _fmt(r.get("mean_err")), sd, _fmt(r.get("khat")), _fmt(r.get("elbo")),
                         _fmt(r.get("elbo_gap")), _fmt(r.get("wall_s")), _ran(r), _err(r)])  # fmt: skip
        out.append(f"### {prob}\n\n" + _table(
            ["method", "steps", "draws", "mean err (sd)", "sd ratio", "k-hat", "ELBO",
             "log Z − ELBO", "wall s", "ran (UTC) / commit", "error"], body)
            + "\n\n" + _commands("posteriors", sub))  # fmt: skip
    return "\n\n".join(out)


def _density_cell(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r.get("error"):
        return f"error: `{r['error'][:80]}`"
    return f"{_fmt(r.get('test_nll'))} / {_fmt(r.get('test_nll_median'))} ({_fmt(r.get('wall_s'), 2)} s)"


def _densities(rows: list[dict]) -> str:
    out = []
    for steps in dict.fromkeys(r.get("num_steps") for r in rows):
        sub = [r for r in rows if r.get("num_steps") == steps]
        sets = list(dict.fromkeys(r["problem"] for r in sub))
        cell = {(r["problem"], r["method"]): r for r in sub}
        body = [[m, *[_density_cell(cell.get((s, m))) for s in sets]]
                for m in dict.fromkeys(r["method"] for r in sub)]  # fmt: skip
        dims = {r["problem"]: r.get("dim") for r in sub}
        runs = ", ".join(sorted({_ran(r) for r in sub}))
        out.append(f"### {steps} steps (ran: {runs})\n\n"
                   + _table(["method", *[f"{s} ({dims[s]}-D)" for s in sets]], body)
                   + "\n\n" + _commands("densities", sub))  # fmt: skip
    return "\n\n".join(out)


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
        meta, rows = suites[name]["meta"], latest(suites[name]["rows"])
        cfg = meta["config"]
        parts.append(f"## {titles[name]}\n")
        parts.append(
            f"Latest run {meta['date']} ({'quick' if meta['quick'] else 'full'}, "
            f"{meta['suite_seconds']} s)"
            f" on {meta['cpu']} ({meta['cpu_count']} cores, load average {meta['load_average']}); "
            f"steps {cfg.get('steps')}, particles {cfg.get('particles', '–')}, evaluation draws "
            f"{cfg.get('draws', '–')}; versions {meta['versions']}. Each row's settings, versions "
            "and commit are in the results file; the tables show the latest row per key."
            + (f" {meta['rows_from_earlier_runs']} row(s) come from earlier runs (see 'ran')."
               if meta.get("rows_from_earlier_runs") else "")
            + "\n"
        )  # fmt: skip
        parts.append(writers[name](rows) + "\n")
    pngs = sorted(p.name for p in img.glob("bench-*.png"))
    if pngs:
        parts.append("## Plots: draws against the reference (first two coordinates)\n")
        parts += [f"![{p}](img/{p})\n" for p in pngs]
    (docs / "benchmarks.md").write_text("\n".join(parts))


def _rows(results: Path, suite: str) -> list[dict]:
    path = results / f"{suite}.json"
    return latest(json.loads(path.read_text())["rows"]) if path.exists() else []


def _groups(rows: list[dict], *fields: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(f) for f in fields) + _settings(r), []).append(r)
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "error"
    return f"{x:.2g}" if x < 100 else f"{x:,.0f}" if x < 1e6 else f"{x:.1e}"


def _readme_posteriordb(rows: list[dict]) -> list[str]:
    from benchmarks.models.posteriordb import NAMES

    body, cmds = [], []
    pdb = [r for r in rows if r["problem"] in NAMES]
    for _, sub in sorted(_groups(pdb, "method").items(), key=lambda kv: (kv[0][1], kv[0][0])):
        good = [r for r in sub if not r.get("error") and (r.get("mean_err") or 1e9) <= 0.1]
        scored = [r for r in sub if r.get("khat") is not None]
        khat = str(sum(r["khat"] < 0.7 for r in scored)) if scored else "–"
        others = ", ".join(f"{r['problem'].split('-')[-1]} ({_num(r.get('mean_err'))})"
                           for r in sub if r not in good)  # fmt: skip
        body.append([f"`{sub[0]['method']}`", _fmt(sub[0].get("num_steps")),
                     f"{len(sub)} of {len(NAMES)}", str(len(good)), khat, others or "–"])  # fmt: skip
    for sub in _groups(pdb).values():
        cmds.append(rerun_command("posteriors", sub))
    head = ["method", "steps", "posteriors with a row", "every mean within 0.1 ref sd",
            "PSIS k-hat < 0.7", "the others: max mean error (ref sd)"]  # fmt: skip
    return [
        "**posteriordb** (`benchmarks/results/posteriors.json`, latest row per key; a method counts "
        "only the nine posteriors it has a row for at that step budget; k-hat: PSIS Pareto k):", "",
        _table(head, body), "", "Rerun (one command per step budget):", "", *[f"    {c}" for c in cmds], "",
    ]  # fmt: skip


def _readme_speed(rows: list[dict]) -> list[str]:
    body, cmds, done = [], {}, set()
    for prob in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == prob]
        for a, b in _speed_ratios(sub):
            done.add(a["method"])
            body.append([prob, f"`{a['method']}`", f"`{b['method']}`",
                         _fmt(a["steps_per_s"] / b["steps_per_s"], 2),
                         _fmt(a.get("num_steps")), _ran(a)])  # fmt: skip
            cmds.setdefault((a["run"], prob), []).extend([a, b])
    missing = sorted({fg for fg, _ in RATIOS if any(r["method"] == fg for r in rows)} - done)
    return [
        "**Speed** (`benchmarks/results/speed.json`): flowguides' steps/s over an anchor's, only "
        "for rows measured in one run (`(SVI loop)`: our guide in the same plain SVI loop as the "
        "anchor; `(fit_posterior)`: our compiled, chunked training loop):", "",
        _table(["problem", "flowguides row", "anchor row", "steps/s ratio", "steps", "ran (UTC)"],
               body) if body else "No flowguides and anchor rows from one run.", "",
        *([f"No anchor row from the same run for: {', '.join(f'`{m}`' for m in missing)}.", ""]
          if missing else []),
        "Rerun:", "", *[f"    {rerun_command('speed', list({id(r): r for r in g}.values()))}"
                        for g in cmds.values()], "",
    ]  # fmt: skip


def _readme_densities(rows: list[dict]) -> list[str]:
    out = ["**Densities** (`benchmarks/results/densities.json`): test NLL, nats per point, mean / "
           "median over the test points:", ""]  # fmt: skip
    for (steps, *_), sub in _groups(rows, "num_steps").items():
        sets = list(dict.fromkeys(r["problem"] for r in sub))
        cell = {(r["problem"], r["method"]): r for r in sub}
        body = [[f"`{m}`", *[_density_cell(cell.get((s, m))).split(" (")[0] for s in sets]]
                for m in dict.fromkeys(r["method"] for r in sub)]  # fmt: skip
        out += [f"At {steps} steps:", "", _table(["method", *sets], body), "", "Rerun:", "",
                f"    {rerun_command('densities', sub)}", ""]  # fmt: skip
    return out


def readme_block(results: Path) -> str:
    """The README's standing block, markers included, computed from ``results/*.json``."""
    lines = [BEGIN, ""]
    lines += _readme_posteriordb(_rows(results, "posteriors"))
    lines += _readme_speed(_rows(results, "speed"))
    lines += _readme_densities(_rows(results, "densities"))
    return "\n".join([*lines, END])


def write_readme(results: Path, readme: Path) -> bool:
    """Replace the block between :data:`BEGIN` and :data:`END` in ``readme``; True if it changed.

    Raises:
        ValueError: ``readme`` lacks the markers.
    """
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: expected the markers {BEGIN!r} and {END!r}")
    new = text[:start] + readme_block(results) + text[end + len(END) :]
    readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: rewrite ``docs/benchmarks.md`` (and the README's block)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--readme", action="store_true", help="also rewrite README.md's block")
    args = parser.parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    write_docs(results, ROOT / "docs")
    if args.readme:
        write_readme(results, ROOT / "README.md")


if __name__ == "__main__":
    main()
