"""Portable folders: atomic writes and clear errors for corrupt or mismatched folders.

These tests need no backend: they write spec + weights + meta directly. The backend round
trips (Pyro <-> NumPyro) live in tests/conformance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from flowguides import FlowSpec
from flowguides.io import LoadError, SaveError, check_weights, load, read_folder, write_folder

SPEC = FlowSpec.realnvp(num_layers=2, hidden=[4], dtype="float64")
DIM = 3


def weights(spec: FlowSpec = SPEC, dim: int = DIM) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s) for k, s in spec.parameter_shapes(dim).items()}


META = {"format_version": 1, "kind": "flow", "backend": "pyro", "dim": DIM}


def test_round_trip(tmp_path) -> None:
    w = weights()
    write_folder(tmp_path / "fit", SPEC, w, META)
    spec, back, meta = read_folder(tmp_path / "fit")
    assert spec == SPEC and meta == META
    assert list(back) == list(w)
    for k in w:
        np.testing.assert_array_equal(back[k], w[k])


def test_existing_folder_needs_overwrite(tmp_path) -> None:
    write_folder(tmp_path / "fit", SPEC, weights(), META)
    with pytest.raises(SaveError, match="exists; pass overwrite=True"):
        write_folder(tmp_path / "fit", SPEC, weights(), META)
    write_folder(tmp_path / "fit", SPEC, weights(), {**META, "kind": "x"}, overwrite=True)
    assert read_folder(tmp_path / "fit")[2]["kind"] == "x"


def test_failed_write_leaves_nothing_behind(tmp_path) -> None:
    bad_meta = {**META, "oops": object()}
    with pytest.raises(TypeError, match="meta.json: cannot write object"):
        write_folder(tmp_path / "fit", SPEC, weights(), bad_meta)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["spec.json", "weights.safetensors", "meta.json"])
def test_missing_file(tmp_path, missing: str) -> None:
    write_folder(tmp_path / "fit", SPEC, weights(), META)
    (tmp_path / "fit" / missing).unlink()
    with pytest.raises(LoadError, match=f"is missing {missing}"):
        read_folder(tmp_path / "fit")


def test_corrupt_files(tmp_path) -> None:
    folder = write_folder(tmp_path / "fit", SPEC, weights(), META)
    (folder / "weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LoadError, match="weights.safetensors is corrupt"):
        read_folder(folder)
    folder = write_folder(tmp_path / "fit2", SPEC, weights(), META)
    (folder / "meta.json").write_text("{")
    with pytest.raises(LoadError, match="meta.json is not valid JSON"):
        read_folder(folder)


def test_newer_versions_are_refused(tmp_path) -> None:
    folder = write_folder(tmp_path / "fit", SPEC, weights(), {**META, "format_version": 2})
    with pytest.raises(LoadError, match="format_version 2 is newer"):
        read_folder(folder)
    folder = write_folder(tmp_path / "fit2", SPEC, weights(), META)
    spec = json.loads((folder / "spec.json").read_text())
    (folder / "spec.json").write_text(json.dumps({**spec, "schema_version": 7}))
    with pytest.raises(LoadError, match="schema_version: this flowguides reads version 3, got 7"):
        read_folder(folder)


def test_weights_must_match_the_spec(tmp_path) -> None:
    w = weights()
    w["layers.0.net.0.weight"] = np.zeros((2, 4, 2))
    folder = write_folder(tmp_path / "fit", SPEC, w, META)
    with pytest.raises(
        LoadError,
        match=r"parameter 'layers.0.net.0.weight': expected shape \(2, 4, 1\), got \(2, 4, 2\)",
    ):
        read_folder(folder)
    w = weights()
    del w["affine.loc"]
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['affine.loc'\]"):
        check_weights(SPEC, DIM, w)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['extra'\]"):
        check_weights(SPEC, DIM, {**weights(), "extra": np.zeros(1)})


def test_load_errors(tmp_path) -> None:
    with pytest.raises(LoadError, match="no such folder"):
        load(tmp_path / "nothing")
    folder = write_folder(tmp_path / "fit", SPEC, weights(), META)
    with pytest.raises(ValueError, match="backend: expected one of"):
        load(folder, backend="tensorflow")


@pytest.mark.parametrize(
    ("fixed", "message"),
    [
        ({"precondition.shift": [0.0, 0.0]}, r"expected the keys"),
        ({"precondition.shift": [0.0], "precondition.scale_tril": np.eye(2)}, r"shapes \(2,\)"),
        ({"precondition.shift": [0.0, 0.0], "precondition.scale_tril": [[1.0, 2.0], [0.0, 1.0]]},
         "lower triangular"),
        ({"precondition.shift": [0.0, 0.0], "precondition.scale_tril": [[1.0, 0.0], [0.5, -1.0]]},
         "positive diagonal"),
    ],
)  # fmt: skip
def test_a_bad_preconditioner_is_named(fixed, message):
    from flowguides.core import check_preconditioner

    with pytest.raises(ValueError, match=message):
        check_preconditioner(fixed, 2)
    good = {"precondition.shift": [1.0, 2.0], "precondition.scale_tril": [[1.0, 0.0], [0.5, 2.0]]}
    assert check_preconditioner(good, 2)["precondition.scale_tril"].shape == (2, 2)


def test_model_params_ride_in_the_weights_file_and_come_back_in_meta(tmp_path) -> None:
    tau, scales = np.array(1.7), np.array([0.5, 2.0])
    params = {"tau": tau, "net.scales": scales}
    folder = write_folder(tmp_path / "fit", SPEC, weights(), META, model_params=params)
    spec, back, meta = read_folder(folder)
    assert list(back) == list(weights())  # the spec's weights only
    assert sorted(meta["model_params"]) == ["net.scales", "tau"]
    assert meta["model_params"]["tau"].shape == ()  # a scalar stays a scalar
    np.testing.assert_array_equal(meta["model_params"]["net.scales"], scales)
    assert "model_params" not in json.loads((folder / "meta.json").read_text())
