"""The README's "Where flowguides stands" block, generated from ``benchmarks/results/``.

:func:`readme_block` computes the block (between :data:`BEGIN` and :data:`END`) from the
latest rows of each suite; :func:`write_readme` puts it into README.md, and
``tests/test_benchmark_report.py`` fails when the two differ. Accuracy figures are medians and
ranges over seeds; a lead is worded only where :func:`benchmarks.rows.leads` finds the ranges
apart. Imports neither torch nor JAX.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.rows import MIN_SEEDS, latest, leads, rerun_command, seed_groups, settings, spread
from benchmarks.tables import (
    RATIOS,
    density_cell,
    density_cells,
    fmt,
    ran,
    speed_ratios,
    spread_cell,
    table,
)

__all__ = ["BEGIN", "END", "readme_block", "write_readme"]

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"


def _rows(results: Path, suite: str) -> list[dict]:
    path = results / f"{suite}.json"
    return latest(json.loads(path.read_text())["rows"]) if path.exists() else []


def _num(x: float | None) -> str:
    if x is None:
        return "error"
    return f"{x:.2g}" if x < 100 else f"{x:,.0f}" if x < 1e6 else f"{x:.1e}"


def _spread_num(group: list[dict], field: str) -> str:
    s = spread(group, field)
    if s is None:
        return "error"
    return _num(s[0]) if s[1] == s[2] else f"{_num(s[0])} [{_num(s[1])} – {_num(s[2])}]"


def _method_key(row: dict) -> tuple:
    return (row["method"], *settings(row), json.dumps(row.get("method_settings"), sort_keys=True))


def _by_method(rows: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """``method key -> problem -> seed group`` (the latest group where versions differ)."""
    out: dict[tuple, dict[str, list[dict]]] = {}
    for g in seed_groups(rows):
        per = out.setdefault(_method_key(g[0]), {})
        newest = max(r.get("timestamp") or "" for r in g)
        if g[0]["problem"] not in per or newest >= max(
            r.get("timestamp") or "" for r in per[g[0]["problem"]]
        ):
            per[g[0]["problem"]] = g
    return out


def _posteriordb(rows: list[dict]) -> list[str]:
    from benchmarks.models.posteriordb import NAMES

    pdb = [r for r in rows if r["problem"] in NAMES]
    body, cmds = [], {}
    for key, per in sorted(_by_method(pdb).items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        groups = list(per.values())
        med = {p: spread(g, "mean_err") for p, g in per.items()}
        good = [p for p, m in med.items() if m is not None and m[0] <= 0.1]
        khats = [spread(g, "khat") for g in groups]
        khat = str(sum(k[0] < 0.7 for k in khats if k)) if any(khats) else "–"
        others = ", ".join(f"{p.split('-')[-1]} ({_spread_num(g, 'mean_err')})"
                           for p, g in per.items() if p not in good)  # fmt: skip
        seeds = sorted({r.get("seed") for g in groups for r in g}, key=lambda s: s or 0)
        body.append([f"`{key[0]}`", fmt(key[1]), ", ".join(str(s) for s in seeds),
                     f"{len(per)} of {len(NAMES)}", str(len(good)), khat, others or "–"])  # fmt: skip
        for g in groups:
            cmds.setdefault(settings(g[0]), []).extend(g)
    head = ["method", "steps", "seeds", "posteriors with a row",
            "every mean within 0.1 ref sd (median over seeds)", "PSIS k-hat < 0.7 (median)",
            "the others: max mean error (ref sd), median [min – max] over seeds"]  # fmt: skip
    return [
        "**posteriordb** (`benchmarks/results/posteriors.json`, latest row per key; a method counts "
        "only the nine posteriors it has a row for at that step budget; k-hat: PSIS Pareto k; "
        "SVI anchors at the best learning rate of their grid, NUTS with 4 chains where its "
        "row's `method_settings` say so):", "",
        table(head, body), "", "Rerun (one command per step budget):", "",
        *[f"    {rerun_command('posteriors', g)}" for g in cmds.values()], "",
    ]  # fmt: skip


def _leads(rows: list[dict]) -> list[str]:
    """Where a flowguides row and an anchor row at the same settings have seed ranges of the
    max mean error that do not overlap."""
    body, overlap = [], 0
    for prob in dict.fromkeys(r["problem"] for r in rows):
        groups = seed_groups(r for r in rows if r["problem"] == prob)
        ours = [g for g in groups if g[0]["method"].startswith("flowguides")]
        theirs = [g for g in groups if not g[0]["method"].startswith("flowguides")]
        for a in ours:
            for b in (b for b in theirs if settings(b[0]) == settings(a[0])):
                if min(len(a), len(b)) < MIN_SEEDS:
                    continue
                ahead = (
                    (a, b)
                    if leads(a, b, "mean_err")
                    else (b, a)
                    if leads(b, a, "mean_err")
                    else None
                )
                if ahead is None:
                    overlap += 1
                    continue
                body.append([prob.split("-")[-1], fmt(a[0].get("num_steps")),
                             f"`{ahead[0][0]['method']}`", spread_cell(ahead[0], "mean_err", 2),
                             f"`{ahead[1][0]['method']}`", spread_cell(ahead[1], "mean_err", 2)])  # fmt: skip
    intro = (f"**Leads** (`benchmarks/results/posteriors.json`: max mean error in reference sd, "
             f"median [min – max] over seeds; a lead is claimed only where both rows have "
             f"{MIN_SEEDS} or more seeds at the same settings and their ranges do not overlap):")  # fmt: skip
    if not body and not overlap:
        return [intro, "", f"No lead claimed: no flowguides and anchor rows with {MIN_SEEDS} or "
                "more seeds each at the same settings yet.", ""]  # fmt: skip
    out = [intro, ""]
    if body:
        out += [table(["posterior", "steps", "ahead", "mean err", "behind", "mean err"], body), ""]
    out += [f"Ranges overlap, no lead claimed: {overlap} flowguides-anchor pair(s).", ""]
    return out


def _speed(rows: list[dict]) -> list[str]:
    body, cmds, done = [], {}, set()
    for prob in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == prob]
        for a, b in speed_ratios(sub):
            done.add(a["method"])
            body.append([prob, f"`{a['method']}`", f"`{b['method']}`",
                         fmt(a["steps_per_s"] / b["steps_per_s"], 2),
                         fmt(a.get("num_steps")), ran(a)])  # fmt: skip
            cmds.setdefault((a["run"], prob), []).extend([a, b])
    missing = sorted({fg for fg, _ in RATIOS if any(r["method"] == fg for r in rows)} - done)
    return [
        "**Speed** (`benchmarks/results/speed.json`): flowguides' steps/s over an anchor's, only "
        "for rows measured in one run (`(SVI loop)`: our guide in the same plain SVI loop as the "
        "anchor; `(fit_posterior)`: our compiled, chunked training loop):", "",
        table(["problem", "flowguides row", "anchor row", "steps/s ratio", "steps", "ran (UTC)"],
              body) if body else "No flowguides and anchor rows from one run.", "",
        *([f"No anchor row from the same run for: {', '.join(f'`{m}`' for m in missing)}.", ""]
          if missing else []),
        "Rerun:", "", *[f"    {rerun_command('speed', list({id(r): r for r in g}.values()))}"
                        for g in cmds.values()], "",
    ]  # fmt: skip


def _densities(rows: list[dict]) -> list[str]:
    out = ["**Densities** (`benchmarks/results/densities.json`): test NLL, nats per point, mean / "
           "median over the test points:", ""]  # fmt: skip
    for steps in dict.fromkeys(r.get("num_steps") for r in rows):
        sub = [r for r in rows if r.get("num_steps") == steps]
        sets = list(dict.fromkeys(r["problem"] for r in sub))
        cell = density_cells(sub)
        body = [[f"`{m}`", *[density_cell(cell.get((s, m))).split(" (")[0] for s in sets]]
                for m in dict.fromkeys(r["method"] for r in sub)]  # fmt: skip
        out += [f"At {steps} steps:", "", table(["method", *sets], body), "", "Rerun:", "",
                f"    {rerun_command('densities', sub)}", ""]  # fmt: skip
    return out


def readme_block(results: Path) -> str:
    """The README's standing block, markers included, computed from ``results/*.json``."""
    posteriors = _rows(results, "posteriors")
    lines = [BEGIN, "", *_posteriordb(posteriors), *_leads(posteriors)]
    lines += _speed(_rows(results, "speed"))
    lines += _densities(_rows(results, "densities"))
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
