"""The benchmark runner's plans, its time estimate and its lanes (no method is fitted here)."""

from __future__ import annotations

import threading
import time

import pytest

from benchmarks import run


def test_every_plan_names_known_problems_and_methods_and_slow_rows_left_full():
    from benchmarks import anchors, densities

    for plan in run.PLANS.values():
        for suite, cfg in plan.items():
            methods = {"speed": anchors.SPEED_METHODS, "posteriors": anchors.METHODS}.get(suite)
            for pname, names in cfg["plan"].items():
                if suite == "densities":
                    assert pname in densities.DATASETS
                    assert set(names) <= set(densities.DENSITY_METHODS), set(names) - set(
                        densities.DENSITY_METHODS
                    )
                else:
                    assert set(names) <= set(methods), set(names) - set(methods)
    for suite, cfg in run.SLOW.items():
        for pname, names in cfg["plan"].items():
            assert not set(names) & set(run.FULL[suite]["plan"].get(pname, ()))


def test_the_rerun_command_of_a_slow_row_reaches_it():
    from benchmarks.rows import rerun_command

    row = {"suite": "posteriors", "problem": "funnel", "method": "flowguides-pyro infer (RealNVP)",
           "num_steps": 2000, "num_particles": 8, "num_draws": 10_000, "seed": 0}  # fmt: skip
    only = rerun_command("posteriors", [row]).split("--only ")[1].strip("'")
    assert run.units("posteriors", run.FULL["posteriors"], only) == []  # not in the full plan
    cfg = run.plan_for("full", only)["posteriors"]
    assert run.units("posteriors", cfg, only) == [("funnel", [row["method"]])]
    assert row["method"] in cfg["once"]  # one seed, as in the slow plan
    assert run.plan_for("full", None) is run.FULL


def test_expected_seconds_sums_the_latest_rows_and_counts_missing_ones():
    cfg = {"steps": 100, "seeds": (0, 1), "once": ("b",), "rounds": 3, "rounded": ("b",)}
    rows = [
        {"problem": "p", "method": "a", "num_steps": 100, "seed": 0, "wall_s": 5.0,
         "timestamp": "2026-01-01"},
        {"problem": "p", "method": "a", "num_steps": 100, "seed": 0, "wall_s": 7.0,
         "timestamp": "2026-01-02"},  # the latest of its key counts
        {"problem": "p", "method": "a", "num_steps": 50, "seed": 1, "wall_s": 1.0},  # other steps
        {"problem": "p", "method": "b", "num_steps": 100, "seed": 0, "wall_s": 2.0},
        {"problem": "p", "method": "c", "num_steps": 100, "seed": 0, "error": "ValueError: x"},
        {"problem": "p", "method": "c", "num_steps": 100, "seed": 1, "error": "RowTimeout: y"},
    ]  # fmt: skip
    got = run.expected_seconds("posteriors", cfg, "p", ["a", "b", "c"], rows)
    # a: 7 + fallback (seed 1 never ran); b: once, three rounds; c: raised (0) + timed out
    assert got == pytest.approx(7.0 + run.FALLBACK_ROW_S + 3 * 2.0 + 0.0 + run.FALLBACK_ROW_S)


def test_lanes_run_units_at_once_longest_first_and_save_each_suite(monkeypatch):
    started, threads = [], set()

    def fake_unit(suite, cfg, pname, methods, stamp):
        started.append(pname)
        threads.add(threading.get_ident())
        time.sleep(0.2)
        return [{"suite": suite, "problem": pname, "method": m} for m in methods]

    monkeypatch.setattr(run, "run_unit", fake_unit)
    monkeypatch.setattr(run, "_run_stamp", lambda: {})
    work = [("densities", {}, "short", ["m"]), ("densities", {}, "long", ["m", "n"]),
            ("posteriors", {}, "mid", ["m"])]  # fmt: skip
    expected = {("densities", "short"): 1.0, ("densities", "long"): 9.0, ("posteriors", "mid"): 5.0}
    saved: dict[str, list] = {}
    t0 = time.perf_counter()
    rows = run.run_lanes(work, 2, lambda suite, r: saved.__setitem__(suite, list(r)), expected)
    assert time.perf_counter() - t0 < 0.55  # three 0.2 s units on two lanes: two rounds
    assert started[:2] == ["long", "mid"] and len(threads) == 2
    assert sorted(r["problem"] for r in rows["densities"]) == ["long", "long", "short"]
    assert saved == rows
