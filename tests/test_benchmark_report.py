"""The README's standing block is generated from ``benchmarks/results/``; rows merge by key.

Imports neither torch nor JAX: CI's torch-free job runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks import readme_block
from benchmarks import rows as keyed

__all__: list[str] = []

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _row(**fields: object) -> dict:
    base = {"suite": "posteriors", "problem": "arK-arK", "method": "numpyro NUTS",
            "num_steps": 1000, "num_particles": 8, "num_draws": 2000, "seed": 0,
            "versions": {"jax": "0.10.2", "numpyro": "0.22.0"}, "mean_err": 0.05}  # fmt: skip
    return {**base, **fields}


def test_readme_block_matches_results() -> None:
    text = (ROOT / "README.md").read_text()
    start, end = text.find(readme_block.BEGIN), text.find(readme_block.END)
    assert 0 <= start < end, "README.md lacks the results markers"
    block = text[start : end + len(readme_block.END)]
    assert block == readme_block.readme_block(RESULTS), (
        "README.md's results block differs from benchmarks/results/: run "
        "`python -m benchmarks.report --readme`"
    )


def test_readme_block_follows_a_changed_row(tmp_path: Path) -> None:
    for p in RESULTS.glob("*.json"):
        shutil.copy(p, tmp_path / p.name)
    before = readme_block.readme_block(tmp_path)
    doc = json.loads((tmp_path / "densities.json").read_text())
    row = next(r for r in doc["rows"] if not r.get("error"))
    row["test_nll"] = 123.456
    (tmp_path / "densities.json").write_text(json.dumps(doc))
    after = readme_block.readme_block(tmp_path)
    assert after != before and "123" in after


def test_rerun_with_other_steps_adds_a_row_and_same_key_replaces() -> None:
    old = [_row(), _row(problem="garch-garch11")]
    added = keyed.merge_rows(old, [_row(num_steps=5000, mean_err=0.01)])
    assert len(added) == 3 and added[:2] == old and added[2]["num_steps"] == 5000
    replaced = keyed.merge_rows(added, [_row(mean_err=0.2)])
    assert len(replaced) == 3 and replaced[0]["mean_err"] == 0.2
    assert [r["num_steps"] for r in replaced] == [1000, 1000, 5000]


def test_every_key_field_separates_rows() -> None:
    changes = {"num_particles": 16, "num_draws": 10_000, "seed": 1,
               "method_settings": {"chains": 4},
               "versions": {"jax": "0.10.3", "numpyro": "0.22.0"}}  # fmt: skip
    for field, value in changes.items():
        merged = keyed.merge_rows([_row()], [_row(**{field: value})])
        assert len(merged) == 2, field


def test_latest_row_per_key_wins_by_timestamp() -> None:
    rows = [_row(timestamp="2026-01-02T00:00:00Z", mean_err=0.2),
            _row(timestamp="2026-01-01T00:00:00Z", mean_err=0.1), _row(mean_err=0.3)]  # fmt: skip
    assert [r["mean_err"] for r in keyed.latest(rows)] == [0.2]


def test_rerun_command_selects_exactly_the_rows() -> None:
    rows = [_row(), _row(problem="garch-garch11"), _row(method="numpyro AutoNormal")]
    cmd = keyed.rerun_command("posteriors", rows)
    assert "--steps 1000 --particles 8 --draws 2000 --seeds 0 --only" in cmd
    assert (
        "'posteriors:{arK-arK,garch-garch11}:numpyro NUTS|posteriors:arK-arK:numpyro AutoNormal'"
        in cmd
    )


def test_report_imports_neither_torch_nor_jax() -> None:
    code = ("import sys, benchmarks.report as r, benchmarks.readme_block as b;"
            " b.readme_block(r.ROOT / 'benchmarks' / 'results');"
            " print(sorted(m for m in ('torch', 'jax', 'pyro', 'numpyro') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    assert out == "[]"


def test_rerun_command_lists_every_seed() -> None:
    cmd = keyed.rerun_command("posteriors", [_row(seed=2), _row(seed=0), _row(seed=1)])
    assert "--seeds 0 1 2 --only 'posteriors:arK-arK:numpyro NUTS'" in cmd


def test_seed_groups_split_by_everything_but_the_seed() -> None:
    rows = [_row(seed=1), _row(seed=0), _row(seed=0, num_steps=5000), _row(seed=2)]
    groups = keyed.seed_groups(rows)
    assert [[r["seed"] for r in g] for g in groups] == [[0, 1, 2], [0]]
    assert keyed.spread(groups[0], "mean_err") == (0.05, 0.05, 0.05)


def test_lead_only_where_ranges_do_not_overlap() -> None:
    ours = [_row(seed=s, mean_err=e) for s, e in enumerate((0.02, 0.03, 0.04))]
    apart = [_row(seed=s, mean_err=e) for s, e in enumerate((0.05, 0.2, 0.3))]
    touching = [_row(seed=s, mean_err=e) for s, e in enumerate((0.035, 0.2, 0.3))]
    assert keyed.leads(ours, apart, "mean_err") and not keyed.leads(apart, ours, "mean_err")
    assert not keyed.leads(ours, touching, "mean_err") and not keyed.leads(
        touching, ours, "mean_err"
    )
    assert not keyed.leads(ours[:2], apart[:2], "mean_err"), "two seeds claim no lead"


def _write_posteriors(folder: Path, ours: tuple, anchor: tuple) -> None:
    rows = [
        _row(method="flowguides-numpyro RealNVP", seed=s, mean_err=e) for s, e in enumerate(ours)
    ]
    rows += [_row(seed=s, mean_err=e) for s, e in enumerate(anchor)]
    (folder / "posteriors.json").write_text(json.dumps({"meta": {}, "rows": rows}))


def test_readme_block_words_a_lead_only_for_ranges_apart(tmp_path: Path) -> None:
    _write_posteriors(tmp_path, (0.02, 0.03, 0.04), (0.05, 0.2, 0.3))
    block = readme_block.readme_block(tmp_path)
    assert (
        "| arK | 1000 | `flowguides-numpyro RealNVP` | 0.03 [0.02 – 0.04] | `numpyro NUTS`" in block
    )
    assert "--seeds 0 1 2" in block and "0, 1, 2" in block
    _write_posteriors(tmp_path, (0.02, 0.03, 0.06), (0.05, 0.2, 0.3))
    block = readme_block.readme_block(tmp_path)
    assert "| `flowguides-numpyro RealNVP` | 0.03" not in block
    assert "Ranges overlap, no lead claimed: 1 flowguides-anchor pair(s)." in block


def test_first_call_table_pairs_each_fit_with_the_nuts_of_its_process() -> None:
    """One table per set of compiler options; the ratio is the cold fit over the NUTS run
    beside it (not the other options' NUTS), the warm column set-up plus compile."""
    from benchmarks.tables import first_call_section

    def fit(cache: str, level: int, wall: float, **timing: float) -> dict:
        settings = {"cache": cache, "compiler_options": {"xla_backend_optimization_level": level}}
        return {"problem": "arK-arK", "method": "flowguides-numpyro RealNVP", "wall_s": wall,
                "method_settings": settings, **timing}  # fmt: skip

    def nuts(level: int, wall: float) -> dict:
        options = {"compiler_options": {"xla_backend_optimization_level": level}}
        return {"problem": "arK-arK", "method": "numpyro NUTS", "wall_s": wall,
                "method_settings": {"cache": "cold", "alongside": options}}  # fmt: skip

    parts = {"setup_s": 3.0, "compile_s": 2.0, "train_s": 0.5, "draws_s": 0.5}
    rows = [fit("cold", 2, 6.0, **parts), nuts(2, 4.0), fit("warm", 2, 2.5, setup_s=1.0,
            compile_s=0.75), fit("cold", 3, 9.0, **parts), nuts(3, 3.0)]  # fmt: skip
    text = first_call_section(rows)
    two, three = text.split("### Compiler options")[1:]
    assert "level=2" in two and "| 6 | 3 / 2 / 0.5 / 0.5 | 4 | 1.5 | 1.8 | 2.5 |" in two
    assert "level=3" in three and "| 9 |" in three and "| 3 | 3 |" in three
    legacy = [{**rows[0], "method_settings": {"cache": "cold"}}]  # before the options were kept
    assert first_call_section(legacy) == ""
    # programs run once with options of their own: a table of their own, beside their NUTS
    setup = {"setup_compiler_options": {"xla_backend_optimization_level": 2, "xla_x": False}}
    split = [{**r, "method_settings": {**r["method_settings"], **setup}} for r in rows[:1]]
    alongside = {"compiler_options": {"xla_backend_optimization_level": 2}, **setup}
    split.append({**rows[1], "wall_s": 8.0, "method_settings": {"cache": "cold",
                                                                 "alongside": alongside}})  # fmt: skip
    parts = first_call_section(rows + split).split("### Compiler options")[1:]
    assert len(parts) == 3 and "programs run once add `xla_x=False`" in parts[2]
    assert "| 6 | 3 / 2 / 0.5 / 0.5 | 8 | 0.75 |" in parts[2]


def test_compile_log_parses_each_programs_trace_lowering_and_compile() -> None:
    from benchmarks.compile_log import parse

    messages = [
        "Finished tracing + transforming chunk for pjit in 0.5 sec",
        "Compiling jit(chunk) with global shapes and types (...)",
        "Finished jaxpr to MLIR module conversion jit(chunk) in 0.25 sec",
        "Persistent compilation cache hit for 'jit_chunk' with key 'jit_chunk-ab12'",
        "Finished XLA compilation of jit(chunk) in 0.125 sec",
        "Finished tracing <lambda> for jit in 0.001 sec",
        "Finished jaxpr to MLIR module conversion jit(<lambda>) in 0.002 sec",
        "Finished XLA compilation of jit(<lambda>) in 0.75 sec",
        "Finished jaxpr to MLIR module conversion jit(chunk) in 0.0625 sec",  # traced earlier
        "Persistent compilation cache hit for 'jit__lambda' with key 'jit__lambda-cd34'",
        "Finished XLA compilation of jit(chunk) in 0.03125 sec",
    ]
    assert parse(messages) == [
        {"name": "chunk", "trace_s": 0.5, "lower_s": 0.25, "compile_s": 0.125, "cached": True},
        {"name": "<lambda>", "trace_s": 0.001, "lower_s": 0.002, "compile_s": 0.75,
         "cached": False},
        {"name": "chunk", "trace_s": 0.0, "lower_s": 0.0625, "compile_s": 0.03125,
         "cached": False},
    ]  # fmt: skip


def test_neutra_table_divides_by_nuts_of_the_same_seed() -> None:
    from benchmarks.tables import neutra_ess_section

    def row(method: str, seed: int, ess_per_s: float, **extra: object) -> dict:
        settings = {"num_chains": 4, "num_warmup": 1000, "num_samples": 1000}
        return {"method": method, "seed": seed, "ess_per_s": ess_per_s, "wall_s": 10.0,
                "ess_v": 10 * ess_per_s, "method_settings": settings, **extra}  # fmt: skip

    text = neutra_ess_section([
        row("numpyro NUTS", 0, 2.0), row("numpyro NUTS", 1, 4.0),
        row("flowguides-numpyro NeuTra (RealNVP)", 0, 10.0, divergences=0),
        row("flowguides-numpyro NeuTra (RealNVP)", 1, 10.0),
        {"method": "flowMC RQSpline MALA", "seed": 0, "error": "ImportError: no flowMC"},
    ])  # fmt: skip
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()}
    assert "| 5 |" in lines[("flowguides-numpyro NeuTra (RealNVP)", "0")]  # 10 / 2
    assert "| 2.5 |" in lines[("flowguides-numpyro NeuTra (RealNVP)", "1")]  # 10 / 4
    assert "| 1 |" in lines[("numpyro NUTS", "0")]
    assert "error: `ImportError: no flowMC`" in lines[("flowMC RQSpline MALA", "0")]
    assert "4 chains × (1000 + 1000)" in lines[("numpyro NUTS", "1")]


def test_neutra_ess_of_independent_draws_is_their_number() -> None:
    import numpy as np

    from benchmarks.neutra_ess import ess

    draws = np.random.default_rng(0).standard_normal((4, 1000))
    assert 3400 < ess(draws) < 4600  # independent: about 4,000
    sticky = np.repeat(draws[:, :100], 10, axis=1)  # each value held for 10 draws
    assert ess(sticky) < 700


def test_objectives_table_shows_each_objectives_median_over_seeds() -> None:
    from benchmarks.tables import objectives_section

    def row(method: str, seed: int, elbo: float, **extra: object) -> dict:
        return _row(method=method, seed=seed, elbo=elbo, khat=0.1 * (seed + 1),
                    steps_per_s=1000.0 * (seed + 1), **extra)  # fmt: skip

    plain = "flowguides-numpyro RealNVP"
    text = objectives_section([
        row(plain, 0, -3.0), row(plain, 1, -1.0), row(plain, 2, -2.0),
        row(f"{plain} (STL)", 0, -0.5),
        row(f"{plain} (earlier schedule)", 0, -2.5),
        row("numpyro NUTS", 0, -9.0),  # not an objective: not shown
        row(plain, 0, -7.0, problem="funnel"),
    ])  # fmt: skip
    lines = {line.split("|")[1].strip(): line.split("|")[2:6] for line in text.splitlines()[2:]}
    assert [c.strip() for c in lines["arK-arK"]] == [
        "-2.00 / 0.20 / 2,000 (3)",  # medians over seeds 0-2
        "-2.50 / 0.10 / 1,000 (1)",
        "-0.50 / 0.10 / 1,000 (1)",
        "not run",
    ]
    assert lines["funnel"][0].strip() == "-7.00 / 0.10 / 1,000 (1)"
    assert "-9.00" not in text


def test_density_table_summarises_seeds_and_keeps_one_seed_as_it_was() -> None:
    from benchmarks.tables import densities_section

    def row(seed: int, nll: float | None, method: str = "zuko RealNVP", **extra: object) -> dict:
        return {"suite": "densities", "problem": "digits", "method": method, "num_steps": 2000,
                "seed": seed, "dim": 64, "test_nll": nll, "test_nll_se": 1.0,
                "test_nll_median": None if nll is None else nll - 5, "wall_s": 10.0 + seed,
                **extra}  # fmt: skip

    text = densities_section([
        row(2, 70.0), row(0, 60.0), row(1, 90.0), row(3, None, error="ValueError: nan"),
        row(0, 61.5, method="flowjax coupling"),
    ])  # fmt: skip
    lines = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
             if line.startswith("| ") and "method" not in line}  # fmt: skip
    # the median of the seeds' means (60, 70, 90) with their range; medians of medians
    assert lines["zuko RealNVP"] == "70 [60 – 90] / 65 (11 s; 4 seeds; 1 failed)"
    assert lines["flowjax coupling"] == "61.5 ± 1 / 56.5 (10 s)"


def test_neutra_table_pairs_each_row_with_nuts_at_its_target_acceptance() -> None:
    from benchmarks.tables import neutra_ess_section

    def row(method: str, ess_per_s: float, **accept: float) -> dict:
        settings = {"num_chains": 4, "num_warmup": 1000, "num_samples": 1000, **accept}
        return {"method": method, "seed": 0, "ess_per_s": ess_per_s, "method_settings": settings}

    neutra = "flowguides-numpyro NeuTra (RealNVP)"
    text = neutra_ess_section([
        row("numpyro NUTS", 2.0), row("numpyro NUTS", 4.0, target_accept_prob=0.9),
        {**row(neutra, 10.0), "fit_kl": 0.1834}, row(neutra, 10.0, target_accept_prob=0.9),
    ])  # fmt: skip
    assert "| fit's KL |" in text.splitlines()[0]
    body = [line for line in text.splitlines() if neutra in line]
    assert "| 0.183 |" in body[0]  # the fitted guide's KL, beside its NeuTra row
    assert "| 5 |" in body[0] and "target accept" not in body[0]  # 10 / 2, the default
    assert "| 2.5 |" in body[1] and "target accept 0.9" in body[1]  # 10 / 4


def test_a_run_with_few_plotted_methods_leaves_the_earlier_plot(tmp_path: Path) -> None:
    """An ``--only`` run that kept one method's draws draws a missing plot, but does not
    redraw an existing one with fewer panels."""
    import numpy as np

    from benchmarks import report

    draws = {"z": np.random.default_rng(0).normal(size=(200, 10))}
    kept = dict(report.KEPT)
    report.KEPT.clear()
    report.KEPT[("funnel", "numpyro NUTS")] = draws
    try:
        assert report._plots(tmp_path) == ["bench-funnel.png"]  # none yet: drawn
        (tmp_path / "bench-funnel.png").write_bytes(b"earlier")
        assert report._plots(tmp_path) == []
        assert (tmp_path / "bench-funnel.png").read_bytes() == b"earlier"
        for method in report._PLOT_METHODS:  # every plotted method kept: redrawn
            report.KEPT[("funnel", method)] = draws
        assert report._plots(tmp_path) == ["bench-funnel.png"]
        assert (tmp_path / "bench-funnel.png").read_bytes() != b"earlier"
    finally:
        report.KEPT.clear()
        report.KEPT.update(kept)


def test_infer_table_lists_each_seeds_route_and_compares_wall_time_within_a_run() -> None:
    from benchmarks.tables import infer_section

    infer = "flowguides-numpyro infer (RealNVP)"
    rows = [
        _row(method="numpyro NUTS", run="A", wall_s=10.0, mean_err=0.2),
        _row(method=infer, run="A", wall_s=5.0, route="psis", mean_err=0.03,
             sd_ratio_min=0.95, sd_ratio_max=1.02),
        _row(method=infer, seed=1, run="B", wall_s=30.0, route="neutra", divergences=2,
             mean_err=0.08, sd_ratio_min=0.91, sd_ratio_max=1.05),
    ]  # fmt: skip
    line = next(x for x in infer_section(rows).splitlines() if infer in x)
    assert "| psis, neutra (2 div.) |" in line
    assert "| 0.08 | 0.91 – 1.05 |" in line  # the worst seed's error, the sds' whole range
    assert line.endswith("| 10 | 0.2 | 0.5 (seed 0) |")  # seed 0 shares NUTS's run, seed 1 not
    rows[1]["run"] = "C"  # no seed shares NUTS's run: no ratio
    line = next(x for x in infer_section(rows).splitlines() if infer in x)
    assert line.endswith("| – | – | – |")
