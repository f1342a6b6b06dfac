"""Result rows: their keys, merging, the latest row per key, seeds, and where a row ran.

Every row is keyed by the settings that change its value (:data:`KEY_FIELDS`) and carries the
commit and UTC time it ran at; a rerun with the same key replaces a row, any other adds one
(:func:`merge_rows`). Rows that differ only in their seed form a :func:`seed_groups` group,
summarised by :func:`spread` (median and range), and one method leads another only where the
ranges do not overlap (:func:`leads`). Imports neither torch nor JAX.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "KEY_FIELDS",
    "MIN_SEEDS",
    "TIMING_KEYS",
    "git_commit",
    "latest",
    "leads",
    "library_versions",
    "machine",
    "merge_rows",
    "rerun_command",
    "row_key",
    "row_versions",
    "seed_groups",
    "settings",
    "spread",
    "utc_now",
]

TIMING_KEYS = ("wall_s", "setup_s", "compile_s", "steps_per_s", "again_setup_s", "again_compile_s")
"""Timing fields a row keeps from its method."""

KEY_FIELDS = ("suite", "problem", "method", "num_steps", "num_particles", "num_draws", "seed",
              "method_settings", "versions")  # fmt: skip
"""Row fields that change its value: a rerun with all of them equal replaces the row.
``method_settings`` holds a method's own settings beyond the budget (the learning-rate grid of
an SVI anchor, NUTS's chains), absent for the rest."""

MIN_SEEDS = 3
"""Seeds each side needs before a lead is claimed (:func:`leads`)."""

ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("flowguides", "torch", "pyro-ppl", "jax", "numpyro", "flowjax", "zuko", "normflows",
             "arviz", "blackjax", "flowMC")  # fmt: skip
_LIBRARIES = {
    "flowguides-pyro": ("flowguides", "torch", "pyro-ppl"),
    "flowguides-numpyro": ("flowguides", "jax", "numpyro"),
    "pyro": ("torch", "pyro-ppl"), "numpyro": ("jax", "numpyro"), "bare": ("jax", "numpyro"),
    "flowjax": ("jax", "numpyro", "flowjax"), "zuko": ("torch", "zuko"),
    "normflows": ("torch", "normflows"), "blackjax": ("jax", "numpyro", "blackjax"),
    "flowMC": ("jax", "flowMC"),
}  # fmt: skip
"""The libraries a method's row depends on, by the first word of its name."""


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


def row_key(row: dict, *, seed: bool = True) -> tuple:
    """The row's :data:`KEY_FIELDS`, hashable (missing fields count as None); without ``seed``
    the key its seed group shares."""
    vers = row.get("versions") or {}
    head = tuple(
        json.dumps(row.get(k), sort_keys=True) if k == "method_settings" else row.get(k)
        for k in KEY_FIELDS[:-1]
        if seed or k != "seed"
    )
    return head + (tuple(sorted(vers.items())),)


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


def settings(row: dict) -> tuple:
    """Steps, particles and evaluation draws: the settings a rerun command sets."""
    return tuple(row.get(k) for k in ("num_steps", "num_particles", "num_draws"))


def seed_groups(rows: Iterable[dict]) -> list[list[dict]]:
    """Rows whose keys differ only in the seed, grouped (in order of each group's first row,
    each group sorted by seed)."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(row_key(r, seed=False), []).append(r)
    return [sorted(g, key=lambda r: r.get("seed") or 0) for g in out.values()]


def spread(rows: list[dict], field: str) -> tuple[float, float, float] | None:
    """(median, min, max) of ``field`` over the rows that have a number for it, or None."""
    vals = [r[field] for r in rows if isinstance(r.get(field), int | float) and not r.get("error")]
    if not vals:
        return None
    return float(np.median(vals)), float(min(vals)), float(max(vals))


def leads(first: list[dict], second: list[dict], field: str) -> bool:
    """Whether ``first`` beats ``second`` on ``field`` (lower is better) across seeds: both
    have :data:`MIN_SEEDS` or more rows, every row a number, and the ranges do not overlap."""
    a, b = ([r.get(field) for r in g] for g in (first, second))
    if min(len(a), len(b)) < MIN_SEEDS or not all(isinstance(x, int | float) for x in a + b):
        return False
    return max(a) < min(b)


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


def rerun_command(suite: str, rows: list[dict], only: str | None = None) -> str:
    """The one ``python -m benchmarks.run`` command that reruns ``rows`` (which share their
    steps, particles and draws) at their settings and every seed among them; ``only``
    overrides the row list."""
    r = rows[0]
    flags = [f"--suite {suite}"]
    for flag, field in (("--steps", "num_steps"), ("--particles", "num_particles"),
                        ("--draws", "num_draws")):  # fmt: skip
        if r.get(field) is not None:
            flags.append(f"{flag} {r[field]}")
    seeds = sorted({x.get("seed") for x in rows if x.get("seed") is not None})
    if seeds:
        flags.append("--seeds " + " ".join(str(s) for s in seeds))
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
