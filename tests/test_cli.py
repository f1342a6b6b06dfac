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


def test_fit_density_help_names_the_objective_and_coupling(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit-density", "--help"])
    out = capsys.readouterr().out
    assert "{maximum_likelihood,flow_matching}" in out and "{independent,ot}" in out
