"""Markdown tables of the result rows, shared by ``docs/benchmarks.md`` and the README block.

:func:`speed_section`, :func:`posteriors_section`, :func:`densities_section` and
:func:`first_call_section` write one suite's part of the benchmarks page from its latest rows (:func:`benchmarks.rows.latest`);
the posteriors section shows each accuracy figure as the median and range over the seeds of a
:func:`benchmarks.rows.seed_groups` group. Imports neither torch nor JAX.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.rows import rerun_command, seed_groups, settings, spread

__all__ = [
    "RATIOS",
    "densities_section",
    "density_cell",
    "density_cells",
    "compile_profile_section",
    "first_call_section",
    "fmt",
    "infer_section",
    "objectives_section",
    "posteriors_section",
    "ran",
    "speed_ratios",
    "speed_section",
    "spread_cell",
    "table",
]

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


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` significant digits, ``–`` for None."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        if not np.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.2e}"
    return str(x)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def spread_cell(group: list[dict], field: str, digits: int = 3) -> str:
    """``median [min – max]`` of ``field`` over a seed group (the value alone for one seed)."""
    s = spread(group, field)
    if s is None:
        return "–"
    med, lo, hi = s
    n = sum(isinstance(r.get(field), int | float) for r in group)
    return (
        fmt(med, digits)
        if n == 1
        else f"{fmt(med, digits)} [{fmt(lo, digits)} – {fmt(hi, digits)}]"
    )


def _err(rows: list[dict]) -> str:
    errs = [r for r in rows if r.get("error")]
    if len(rows) == 1 and errs:
        return f"**error**: `{errs[0]['error'][:160]}`"
    return "; ".join(f"**seed {r.get('seed')} error**: `{r['error'][:120]}`" for r in errs)


def _first_step(row: dict) -> float | None:
    """Set-up plus compile: the wait before training runs at speed."""
    parts = [row.get("setup_s"), row.get("compile_s")]
    return sum(parts) if all(isinstance(p, float) for p in parts) else None


def ran(row: dict) -> str:
    """When and on which commit a row ran (a migrated row: the commit that first recorded it)."""
    when = (row.get("timestamp") or "").replace("T", " ").replace(":00Z", "").rstrip("Z")
    where = row.get("commit") or (f"recorded in {row['recorded_in']}" if row.get("recorded_in")
                                  else None)  # fmt: skip
    return " / ".join(x for x in (when or "–", where or "–"))


def ran_span(rows: list[dict]) -> str:
    """When a group of rows ran (first and last UTC timestamp) and on which commits."""
    stamps = sorted(
        r["timestamp"].replace("T", " ").rstrip("Z") for r in rows if r.get("timestamp")
    )
    commits = ", ".join(dict.fromkeys(ran(r).split(" / ")[1] for r in rows))
    when = (
        "" if not stamps else stamps[0] if len(set(stamps)) < 2 else f"{stamps[0]} – {stamps[-1]}"
    )
    return f"{when or '–'} UTC; commit {commits}"


def _commands(suite: str, rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(settings(r), []).append(r)
    return "Rerun:\n\n" + "\n".join(f"    {rerun_command(suite, g)}" for g in groups.values())


def speed_ratios(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(flowguides row, anchor row) pairs of :data:`RATIOS` measured in one run at the same
    settings and seed."""
    pairs = []
    for fg, anchor in RATIOS:
        for a in (r for r in rows if r["method"] == fg and r.get("steps_per_s")):
            pairs += [
                (a, b) for b in rows
                if b["method"] == anchor and b.get("steps_per_s") and a.get("run") is not None
                and a.get("run") == b.get("run") and settings(a) == settings(b)
                and a.get("seed") == b.get("seed")
            ]  # fmt: skip
    return pairs


def speed_section(rows: list[dict]) -> str:
    """The speed suite's tables: every row, then the ratios between rows of one run."""
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == prob]
        body = [[r["method"], fmt(r.get("num_steps")), fmt(r.get("steps_per_s")),
                 fmt(r.get("setup_s")), fmt(r.get("compile_s")), fmt(r.get("wall_s")),
                 fmt(r.get("elbo")), fmt(r.get("khat")), ran(r), _err([r])]
                for r in sub]  # fmt: skip
        out.append(f"### {prob}\n\n" + table(
            ["method", "steps", "steps/s", "setup s", "compile s", "wall s", "ELBO", "k-hat",
             "ran (UTC) / commit", "error"], body) + "\n\n" + _commands("speed", sub))  # fmt: skip
        ratio_rows = []
        for a, b in speed_ratios(sub):
            fa, fb = _first_step(a), _first_step(b)
            ca, cb = a.get("compile_s"), b.get("compile_s")
            ratio_rows.append([a["method"], b["method"], fmt(a["steps_per_s"] / b["steps_per_s"]),
                               fmt(ca / cb if ca and cb else None),
                               fmt(fa / fb if fa and fb else None),
                               fmt(a["elbo"] - b["elbo"] if a.get("elbo") is not None
                                   and b.get("elbo") is not None else None)])  # fmt: skip
        out.append(f"Ratios on {prob}, only between rows of one run (steps/s ratio > 1: "
                   "flowguides faster; compile and set-up + compile ratios < 1: flowguides ready "
                   "sooner; ELBO difference > 0: flowguides better):\n\n"
                   + (table(["flowguides", "anchor", "steps/s ratio", "compile ratio",
                             "set-up + compile ratio", "ELBO difference"], ratio_rows)
                      if ratio_rows else "no flowguides and anchor rows from one run."))  # fmt: skip
    return "\n\n".join(out)


def _notes(group: list[dict]) -> str:
    """The chosen learning rates of a searched anchor; NUTS's Monte Carlo standard error."""
    notes = []
    chains = (group[0].get("method_settings") or {}).get("chains")
    if chains:
        notes.append(f"{chains} chains")
    lrs = [r["learning_rate"] for r in group if r.get("learning_rate") is not None]
    if lrs:
        notes.append("lr " + ", ".join(fmt(x) for x in lrs))
    if spread(group, "mcse_max") is not None:
        notes.append(f"MCSE of means ≤ {spread_cell(group, 'mcse_max', 2)} sd")
    if spread(group, "divergences") is not None:
        notes.append(
            f"divergences {', '.join(str(r['divergences']) for r in group if 'divergences' in r)}"
        )
    return "; ".join(notes) or "–"


def posteriors_section(rows: list[dict]) -> str:
    """The posteriors suite's tables: per problem, one line per seed group."""
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == prob]
        body = []
        for g in seed_groups(sub):
            lo, hi = spread(g, "sd_ratio_min"), spread(g, "sd_ratio_max")
            sd = f"{fmt(lo[1])} – {fmt(hi[2])}" if lo and hi else "–"
            r = g[-1]
            body.append([r["method"], fmt(r.get("num_steps")), fmt(r.get("num_draws")),
                         ", ".join(str(x.get("seed")) for x in g),
                         spread_cell(g, "mean_err"), sd, spread_cell(g, "khat"),
                         spread_cell(g, "elbo"), spread_cell(g, "elbo_gap"),
                         spread_cell(g, "wall_s"), _notes(g), ran(max(g, key=lambda x: x.get("timestamp") or "")),
                         _err(g)])  # fmt: skip
        out.append(f"### {prob}\n\n" + table(
            ["method", "steps", "draws", "seeds", "mean err (sd)", "sd ratio", "k-hat", "ELBO",
             "log Z − ELBO", "wall s", "notes", "ran (UTC) / commit", "error"], body)
            + "\n\n" + _commands("posteriors", sub))  # fmt: skip
    return "\n\n".join(out)


OBJECTIVES = (
    ("ELBO, reparam (default)", "flowguides-numpyro RealNVP"),
    ("ELBO, earlier schedule", "flowguides-numpyro RealNVP (earlier schedule)"),
    ("ELBO, STL", "flowguides-numpyro RealNVP (STL)"),
    ("IW-ELBO K=8, DReG", "flowguides-numpyro RealNVP (IWELBO K=8, DReG)"),
)
"""(column title, posteriors-suite method) of the objectives table."""


def objectives_section(rows: list[dict]) -> str:
    """`fit_posterior`'s objectives side by side (NumPyro RealNVP, the posteriors suite's rows
    at its full settings): per problem and objective, ``ELBO / k-hat / steps per second``
    (medians over the seeds that ran, whose count follows in brackets)."""
    body = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        cells = []
        for _, method in OBJECTIVES:
            groups = [g for g in seed_groups(r for r in rows if r["problem"] == prob
                                             and r["method"] == method)]  # fmt: skip
            g = max(groups, key=lambda g: (len(g), settings(g[0])[0] or 0), default=None)
            if g is None:
                cells.append("not run")
                continue
            elbo, khat, rate = (spread(g, k) for k in ("elbo", "khat", "steps_per_s"))
            cells.append(f"{elbo[0]:.2f} / {khat[0]:.2f} / {rate[0]:,.0f} ({len(g)})"
                         if elbo and khat and rate else f"– ({len(g)})")  # fmt: skip
        if any(c != "not run" for c in cells):
            body.append([prob, *cells])
    return table(["problem", *(t for t, _ in OBJECTIVES)], body)


INFER_METHODS = ("flowguides-numpyro infer (RealNVP)", "flowguides-pyro infer (RealNVP)")
"""The `infer` rows of the posteriors suite, one line each per problem in :func:`infer_section`."""


def infer_section(rows: list[dict]) -> str:
    """`infer` per problem: the route each seed took (with NUTS's divergences), the draws'
    accuracy over the seeds, and the wall time against the ``numpyro NUTS`` row of the same
    run (a ratio only between rows of one run; "–" where none shares a run)."""
    body = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        nuts = [r for r in rows if r["problem"] == prob and r["method"] == "numpyro NUTS"
                and not r.get("error") and r.get("run")]  # fmt: skip
        for method in INFER_METHODS:
            groups = seed_groups(r for r in rows if r["problem"] == prob and r["method"] == method)
            if not groups:
                continue
            g = max(groups, key=len)
            routes = ", ".join(
                f"{r.get('route', 'error' if r.get('error') else '?')}"
                + (f" ({r['divergences']} div.)" if r.get("divergences") is not None else "")
                for r in g
            )
            lo, hi = spread(g, "sd_ratio_min"), spread(g, "sd_ratio_max")
            err = spread(g, "mean_err")
            pair = next(((r, n) for r in g for n in nuts if n["run"] == r.get("run")), None)
            ratio = "–"
            if pair and pair[0].get("wall_s") and pair[1].get("wall_s"):
                ratio = f"{fmt(pair[0]['wall_s'] / pair[1]['wall_s'], 3)} (seed {pair[0]['seed']})"
            body.append([
                prob, method, ", ".join(str(r.get("seed")) for r in g), routes,
                fmt(err[2]) if err else "–", f"{fmt(lo[1])} – {fmt(hi[2])}" if lo and hi else "–",
                spread_cell(g, "wall_s"), fmt(pair[1]["wall_s"]) if pair else "–",
                fmt(pair[1].get("mean_err")) if pair else "–", ratio,
            ])  # fmt: skip
    header = ["problem", "method", "seeds", "route (per seed)", "max mean err", "sd ratio",
              "wall s", "NUTS wall s (same run)", "NUTS mean err", "wall ÷ NUTS's"]  # fmt: skip
    return table(header, body)


def density_cell(r: dict | list[dict] | None) -> str:
    """``mean ± se / median (wall s)`` of a density row, with the gap to the true entropy and
    the field evaluations of one test solve where the row has them; its error, or ``not run``.
    Rows of several seeds (a list): ``median [min – max] / median (wall s; n seeds)`` of the
    seeds' mean and median test NLL, the errors counted."""
    if isinstance(r, list):
        if len(r) > 1:
            return _density_seeds(r)
        r = r[0] if r else None
    if r is None:
        return "not run"
    if r.get("error"):
        return f"error: `{r['error'][:80]}`"
    se = f" ± {fmt(r['test_nll_se'])}" if r.get("test_nll_se") is not None else ""
    extra = "".join(
        f"; {label} {fmt(r[key])}"
        for key, label in (("entropy_gap", "gap"), ("nfe_test", "NFE"))
        if r.get(key) is not None
    )
    return (
        f"{fmt(r.get('test_nll'))}{se} / {fmt(r.get('test_nll_median'))} "
        f"({fmt(r.get('wall_s'), 2)} s{extra})"
    )


def _density_seeds(rows: list[dict]) -> str:
    mean, median, wall = (spread(rows, k) for k in ("test_nll", "test_nll_median", "wall_s"))
    failed = sum(bool(r.get("error")) or r.get("test_nll") is None for r in rows)
    note = f"; {failed} failed" if failed else ""
    if mean is None:
        return f"error in all {len(rows)} seeds"
    return (
        f"{fmt(mean[0])} [{fmt(mean[1])} – {fmt(mean[2])}] / {fmt(median[0] if median else None)}"
        f" ({fmt(wall[0] if wall else None, 2)} s; {len(rows)} seeds{note})"
    )


def density_cells(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """``(problem, method) -> rows`` (one per seed, in seed order)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(rows, key=lambda r: r.get("seed") or 0):
        out.setdefault((r["problem"], r["method"]), []).append(r)
    return out


def densities_section(rows: list[dict]) -> str:
    """The densities suite's tables: one per step budget, data sets across."""
    out = []
    for steps in dict.fromkeys(r.get("num_steps") for r in rows):
        sub = [r for r in rows if r.get("num_steps") == steps]
        sets = list(dict.fromkeys(r["problem"] for r in sub))
        cell = density_cells(sub)
        body = [[m, *[density_cell(cell.get((s, m))) for s in sets]]
                for m in dict.fromkeys(r["method"] for r in sub)]  # fmt: skip
        dims: dict[str, Any] = {}
        for r in sub:  # a row that failed before it read its data has no dim
            if r.get("dim") is not None:
                dims.setdefault(r["problem"], r["dim"])
        runs = ran_span(sub)
        out.append(f"### {steps} steps (ran: {runs})\n\n"
                   + table(["method", *[f"{s} ({dims.get(s, '?')}-D)" for s in sets]], body)
                   + "\n\n" + _commands("densities", sub))  # fmt: skip
    return "\n\n".join(out)


def _options(row: dict) -> str:
    ms = row.get("method_settings") or {}
    given = ms if "compiler_options" in ms else (ms.get("alongside") or {})
    options = given.get("compiler_options")
    text = "XLA's defaults" if not options else ", ".join(f"`{k}={v}`" for k, v in options.items())
    extra = {k: v for k, v in (given.get("setup_compiler_options") or {}).items()
             if (options or {}).get(k, object()) != v}  # fmt: skip
    if extra:
        text += "; programs run once add " + ", ".join(f"`{k}={v}`" for k, v in extra.items())
        if given.get("chunk_setup_max_elements") is not None:
            text += (", and so does the training of a model on at most "
                     f"{given['chunk_setup_max_elements']} data elements")  # fmt: skip
    return text


def first_call_section(rows: list[dict]) -> str:
    """Time to first draw (`benchmarks/first_call.py`): per posterior and compiler options, the
    cold first `fit_posterior` plus draws against NUTS in the same process, and the rerun with
    the persistent cache warm."""
    rows = [r for r in rows if ("compiler_options" in (r.get("method_settings") or {})
            or "alongside" in (r.get("method_settings") or {}))
            and not (r.get("method_settings") or {}).get("log_compiles")]  # fmt: skip
    parts = []
    for options in dict.fromkeys(_options(r) for r in rows):
        group = [r for r in rows if _options(r) == options]
        out = []
        for prob in dict.fromkeys(r["problem"] for r in group):
            mine = [r for r in group if r["problem"] == prob]

            def pick(method: str, cache: str, mine: list = mine) -> dict:
                found = [r for r in mine if r["method"].startswith(method)
                         and r["method_settings"]["cache"] == cache]  # fmt: skip
                return found[-1] if found else {}

            cold, warm, nuts = (
                pick("flowguides", "cold"),
                pick("flowguides", "warm"),
                pick("numpyro NUTS", "cold"),
            )
            parts_s = [cold.get(k) for k in ("setup_s", "compile_s", "train_s", "draws_s")]
            ratio = (cold["wall_s"] / nuts["wall_s"]) if cold and nuts else None
            out.append([
                prob, fmt(cold.get("wall_s")), " / ".join(fmt(x, 2) for x in parts_s),
                fmt(nuts.get("wall_s")), fmt(ratio, 2), fmt(_first_step(warm), 2),
                fmt(warm.get("wall_s")),
                f"{fmt(cold.get('steps_per_s'), 3)} / {fmt(warm.get('steps_per_s'), 3)}",
                ran(cold) if cold else "–",
            ])  # fmt: skip
        header = ["posterior", "cold: flowguides s", "set-up / compile / train / draws s",
                  "NUTS s", "flowguides / NUTS", "warm: set-up + compile s", "warm: wall s",
                  "steps/s cold / warm", "ran"]  # fmt: skip
        parts.append(f"### Compiler options: {options}\n\n" + table(header, out))
    return "\n\n".join(parts)


def compile_profile_section(rows: list[dict]) -> str:
    """The ``--log-compiles`` rows of `benchmarks/first_call.py`: per posterior and run (cold,
    warm), each program with at least 0.05 s of trace, lowering and compile (or load), and the
    count and total of the rest (eager operations and small programs)."""
    parts = []
    for r in rows:
        programs = r.get("programs")
        if not programs or not (r.get("method_settings") or {}).get("log_compiles"):
            continue
        big = [p for p in programs if p["trace_s"] + p["lower_s"] + p["compile_s"] >= 0.05]
        small = [p for p in programs if p not in big]
        out = [[f"`{p['name']}`", fmt(p["trace_s"], 2), fmt(p["lower_s"], 2),
                fmt(p["compile_s"], 2), "yes" if p["cached"] else "no"] for p in big]  # fmt: skip
        rest = sum(p["trace_s"] + p["lower_s"] + p["compile_s"] for p in small)
        out.append([f"{len(small)} others", "", "", f"{fmt(rest, 2)} (all steps)", ""])
        head = f"#### {r['problem']}, {r['method_settings']['cache']} ({ran(r)})"
        parts.append(head + "\n\n" + table(["program", "trace s", "lower s",
                                               "compile / load s", "cached"], out))  # fmt: skip
    return "\n\n".join(parts)


def neutra_ess_section(rows: list[dict]) -> str:
    """NeuTra against NUTS on the funnel (`benchmarks/neutra_ess.py`): one row per method and
    seed, with ESS per second on ``v`` and the ratio to NUTS of the same seed."""
    nuts = {(r["seed"], _accept(r)): r for r in rows
            if r["method"] == "numpyro NUTS" and "ess_per_s" in r}  # fmt: skip
    body = []
    order = lambda r: (r["seed"], _accept(r), r["method"] != "numpyro NUTS", r["method"])  # noqa: E731
    for r in sorted(rows, key=order):
        if r.get("error"):
            body.append([r["method"], str(r["seed"]), f"error: `{r['error'][:120]}`",
                         *["–"] * 8, ran(r)])  # fmt: skip
            continue
        base = nuts.get((r["seed"], _accept(r)))
        ratio = r["ess_per_s"] / base["ess_per_s"] if base else None
        body.append([
            r["method"], str(r["seed"]), fmt(r.get("wall_s")), fmt(r.get("fit_s")),
            fmt(r.get("fit_kl"), 3), fmt(r.get("ess_v")), fmt(r.get("ess_per_s")), fmt(ratio, 3),
            f"{fmt(r.get('v_mean'), 2)} / {fmt(r.get('v_sd'), 3)}",
            fmt(r.get("divergences")), _settings(r), ran(r),
        ])  # fmt: skip
    header = [
        "method",
        "seed",
        "wall s",
        "of which fit s",
        "fit's KL",
        "ESS of v",
        "ESS/s",
        "ESS/s ÷ NUTS's",
        "v mean / sd (truth 0 / 3)",
        "divergences",
        "settings",
        "ran",
    ]
    return table(header, body)


def _accept(row: dict) -> float:
    """NUTS's target acceptance of a NeuTra-table row (0.8, the PPLs' default, where unset)."""
    return (row.get("method_settings") or {}).get("target_accept_prob", 0.8)


def _settings(row: dict) -> str:
    s = row.get("method_settings") or {}
    if "num_chains" in s:
        accept = f", target accept {_accept(row)}" if "target_accept_prob" in s else ""
        return f"{s['num_chains']} chains × ({s['num_warmup']} + {s['num_samples']}){accept}"
    keys = ("n_chains", "n_training_loops", "n_production_loops", "n_local_steps", "n_global_steps")
    return ", ".join(f"{k} {s[k]}" for k in keys if k in s)
