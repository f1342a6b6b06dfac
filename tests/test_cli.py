"""The command line: exit codes, output and errors (spec commands; fitting lives with io)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.cli import main, parse_spec


def test_spec_schema_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spec-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == FlowSpec.json_schema()


def test_show_spec_prints_the_parameter_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show-spec", "planar:3", "--dim", "4"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.u        (3, 4)" in out
    assert "5 arrays, 35 numbers in 4 dimensions" in out


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("realnvp:4", FlowSpec.realnvp(num_layers=4)),
        ("planar:16", FlowSpec.planar(num_layers=16)),
        ("planar", FlowSpec.planar()),
        ("neural_ode", FlowSpec.neural_ode()),
    ],
)
def test_shorthands(text: str, spec: FlowSpec) -> None:
    assert parse_spec(text) == spec


def test_spec_file(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    FlowSpec.planar(num_layers=2).save(path)
    assert parse_spec(str(path)) == FlowSpec.planar(num_layers=2)


@pytest.mark.parametrize("text", ["realnvp:0", "realnvp:x", "spline:3", "neural_ode:2"])
def test_bad_shorthand_exits_2_with_message(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show-spec", text]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and repr(text) in err


def test_console_script_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flowguides.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("spec-schema", "show-spec", "demo"):
        assert command in out.stdout


def _ring_csv(tmp_path) -> str:
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 200)
    path = tmp_path / "ring.csv"
    rows = np.c_[np.cos(angle), np.sin(angle)] + rng.normal(scale=0.1, size=(200, 2))
    np.savetxt(path, rows, delimiter=",")
    return str(path)


@pytest.mark.torch
def test_fit_density_by_flow_matching_with_ot_coupling(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    from flowguides import io

    spec = tmp_path / "ode.json"
    FlowSpec.neural_ode(hidden=[8], solver="rk4", num_steps=2).save(spec)
    out = tmp_path / "fit"
    args = ["fit-density", _ring_csv(tmp_path), "--spec", str(spec), "--backend", "pyro"]
    args += ["--out", str(out), "--steps", "30", "--objective", "flow_matching"]
    assert main([*args, "--coupling", "ot", "--quiet"]) == 0
    fit = io.load(out, backend="pyro")
    assert set(fit.losses) == {"flow_matching", "val_nll"}
    assert len(fit.losses["flow_matching"]) == 30 and len(fit.losses["val_nll"]) == 2


@pytest.mark.torch
def test_fit_density_refuses_ot_coupling_without_flow_matching(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    args = ["fit-density", _ring_csv(tmp_path), "--spec", "neural_ode", "--backend", "pyro"]
    assert main([*args, "--out", str(tmp_path / "fit"), "--coupling", "ot", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "coupling: 'ot'" in err and "objective='maximum_likelihood'" in err
    assert not (tmp_path / "fit").exists()


def test_fit_density_onto_an_existing_out_names_the_flag_before_fitting(tmp_path, capsys):
    (tmp_path / "fit").mkdir()
    args = ["fit-density", str(tmp_path / "absent.csv"), "--spec", "planar:1"]
    assert main([*args, "--out", str(tmp_path / "fit"), "--quiet"]) == 2  # not read: refused first
    assert "--out: " in (err := capsys.readouterr().err) and "pass --overwrite" in err


@pytest.mark.parametrize("command", ["sample", "log-prob"])
def test_an_out_file_that_cannot_be_written_is_refused_before_the_fit_is_read(
    command, tmp_path, capsys
):
    extra = ["-n", "5"] if command == "sample" else [str(tmp_path / "absent.csv")]
    absent_fit = str(tmp_path / "no-fit")  # never read: the --out check comes first
    for out, says in (
        (tmp_path, "is a folder"),
        (tmp_path / "nowhere" / "x.csv", "does not exist"),
    ):
        assert main([command, absent_fit, *extra, "--out", str(out)]) == 2
        assert "--out: " in (err := capsys.readouterr().err) and says in err, err


def test_fit_density_help_names_the_objective_and_coupling(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit-density", "--help"])
    out = capsys.readouterr().out
    assert "{maximum_likelihood,flow_matching}" in out and "{independent,ot}" in out


@pytest.mark.parametrize(
    "command",
    [["fit-density", "d.csv", "--spec", "planar"], ["sample", "fit", "-n", "1"],
     ["log-prob", "fit", "d.csv"]],
)  # fmt: skip
def test_numpyro_commands_turn_the_compilation_cache_on_unless_told_not_to(command, monkeypatch):
    pytest.importorskip("numpyro")
    import flowguides.numpyro
    from flowguides import cli

    calls = []
    monkeypatch.setattr(flowguides.numpyro, "use_compilation_cache", lambda: calls.append(1))
    for extra, expected in (([], 1), (["--no-cache"], 1), (["--backend", "pyro"], 1)):
        cli._compilation_cache(cli.build_parser().parse_args([*command, "--out", "o", *extra]))
        assert len(calls) == expected  # on by default (numpyro), then left off


def test_the_demo_runs_with_the_cache_unless_told_not_to(monkeypatch) -> None:
    import flowguides.demo

    seen = []
    monkeypatch.setattr(flowguides.demo, "run_demo", lambda **kw: seen.append(kw["cache"]) or 0)
    assert main(["demo", "--quick"]) == 0 and main(["demo", "--quick", "--no-cache"]) == 0
    assert seen == [True, False]


def test_fit_density_with_numpyro_fills_the_cache_in_a_new_process(tmp_path) -> None:
    pytest.importorskip("numpyro")
    import os

    csv = _ring_csv(tmp_path)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flowguides.cli", "fit-density", csv, "--spec", "realnvp:1"]
    command += ["--steps", "3", "--quiet", "--out"]
    done = subprocess.run([*command, str(tmp_path / "a"), "--no-cache"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cache = tmp_path / "home" / "flowguides" / "jax"
    assert not cache.exists()  # --no-cache: nothing written
    done = subprocess.run([*command, str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p for p in cache.rglob("*") if p.is_file()]  # programs for the next process
