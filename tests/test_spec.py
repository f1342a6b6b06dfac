"""The shared flow spec: round trips, fuzzing, errors that name the field, parameter shapes."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowguides import FlowSpec, NeuralODESpec, PlanarSpec, RealNVPSpec, SpecError
from flowguides.spec import ACTIVATION_NAMES, SMOOTH_ACTIVATION_NAMES

widths = st.lists(st.integers(1, 128), min_size=0, max_size=3)
planar = st.builds(PlanarSpec, repeat=st.integers(1, 32))
realnvp = st.builds(
    RealNVPSpec,
    repeat=st.integers(1, 8),
    hidden=widths,
    activation=st.sampled_from(ACTIVATION_NAMES),
    scale_clamp=st.floats(0.1, 10.0),
    permutation=st.sampled_from(["shuffle", "reverse", "random"]),
    orientation=st.sampled_from(["auto", "sampling", "density"]),
    seed=st.integers(0, 2**31),
)
neural_ode = st.one_of(
    st.builds(
        NeuralODESpec,
        hidden=widths,
        activation=st.sampled_from(SMOOTH_ACTIVATION_NAMES),
        trace=st.sampled_from(["auto", "exact", "hutchinson"]),
        noise=st.sampled_from(["rademacher", "gaussian"]),
        solver=st.sampled_from(["dopri5", "tsit5"]),
        rtol=st.floats(1e-12, 1e-1),
        atol=st.floats(1e-12, 1e-1),
        max_steps=st.integers(1, 10_000),
        t1=st.floats(0.01, 10.0),
        adjoint=st.booleans(),
        kinetic_weight=st.floats(0.0, 1.0),
        jacobian_weight=st.floats(0.0, 1.0),
    ),
    st.builds(
        NeuralODESpec, solver=st.sampled_from(["rk4", "euler"]), num_steps=st.integers(1, 100)
    ),
)
flow_specs = st.builds(
    FlowSpec,
    layers=st.lists(st.one_of(planar, realnvp, neural_ode), min_size=1, max_size=4),
    base=st.sampled_from(["affine", "normal"]),
    dtype=st.sampled_from(["float32", "float64"]),
)


@given(flow_specs)
@settings(max_examples=60, deadline=None)
def test_dict_json_yaml_round_trips(spec: FlowSpec) -> None:
    assert FlowSpec.from_dict(spec.to_dict()) == spec
    assert FlowSpec.from_json(spec.to_json()) == spec
    assert FlowSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict()))) == spec
    assert json.loads(spec.to_json())["schema_version"] == 3


@given(flow_specs)
@settings(max_examples=30, deadline=None)
def test_parameter_shapes_are_consistent(spec: FlowSpec) -> None:
    shapes = spec.parameter_shapes(4)
    assert len(shapes) == len(set(shapes))
    assert all(all(n > 0 for n in shape) for shape in shapes.values())
    assert ("affine.loc" in shapes) == (spec.base == "affine")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 200)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
layer_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["planar", "realnvp", "neural_ode", "nope"])},
    optional={
        "repeat": json_values,
        "hidden": json_values,
        "activation": st.sampled_from([*ACTIVATION_NAMES, "softplus", "swish"]),
        "solver": st.sampled_from(["dopri5", "rk4", "euler", "midpoint"]),
        "num_steps": json_values,
        "rtol": json_values,
        "extra": json_values,
    },
)


@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"layers": st.lists(layer_like, max_size=3)},
            optional={"base": json_values, "dtype": json_values, "schema_version": json_values},
        ),
    )
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_loads_or_raises_spec_error(data: object) -> None:
    try:
        spec = FlowSpec.from_dict(data)  # type: ignore[arg-type]
    except SpecError as exc:
        assert str(exc)
    else:
        assert isinstance(spec, FlowSpec)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {
                "layers": [
                    {"type": "planar"},
                    {"type": "planar"},
                    {"type": "realnvp", "hidden": [-3]},
                ]
            },
            "layers[2].hidden[0]: expected a positive integer, got -3",
        ),
        (
            {"layers": [{"type": "realnvp", "hidden": [0]}]},
            "layers[0].hidden[0]: expected a positive integer, got 0",
        ),
        ({"layers": [{"type": "spline"}]}, "layers[0].type: expected one of"),
        (
            {"layers": [{"type": "realnvp", "activation": "swish"}]},
            "layers[0].activation: expected one of",
        ),
        (
            {"layers": [{"type": "neural_ode", "activation": "relu"}]},
            "layers[0].activation: expected one of",
        ),
        (
            {"layers": [{"type": "neural_ode", "solver": "midpoint"}]},
            "layers[0].solver: expected one of",
        ),
        (
            {"layers": [{"type": "neural_ode", "rtol": 0}]},
            "layers[0].rtol: expected a positive number, got 0",
        ),
        (
            {"layers": [{"type": "neural_ode", "atol": -1e-3}]},
            "layers[0].atol: expected a positive number",
        ),
        (
            {"layers": [{"type": "neural_ode", "solver": "rk4"}]},
            "layers[0].num_steps: the fixed-step solver 'rk4' needs num_steps, got None",
        ),
        ({"layers": [{"type": "planar", "bogus": 1}]}, "layers[0].bogus: unknown field"),
        ({"layers": [{"type": "planar"}], "colour": "red"}, "colour: unknown field"),
        (
            {"layers": [{"type": "planar", "repeat": 0}]},
            "layers[0].repeat: expected a positive integer, got 0",
        ),
        ({"layers": []}, "layers: expected at least one layer spec"),
        ({"layers": [{"type": "planar"}], "base": "student"}, "base: expected one of"),
        ({"layers": [{"type": "planar"}], "dtype": "float16"}, "dtype: expected one of"),
        (
            {"layers": [{"type": "planar"}], "schema_version": 4},
            "schema_version: this flowguides reads version 3, got 4",
        ),
        ({}, "layers: required field is missing"),
        ([1, 2], "spec: expected a mapping, got list"),
    ],
)
def test_bad_input_names_the_field(data: object, message: str) -> None:
    with pytest.raises(SpecError) as info:
        FlowSpec.from_dict(data)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_spec_is_immutable_and_hashable() -> None:
    spec = FlowSpec.realnvp()
    with pytest.raises(Exception, match="frozen"):
        spec.base = "normal"  # type: ignore[misc]
    assert hash(spec) == hash(FlowSpec.realnvp())


def test_convenience_constructors() -> None:
    spec = FlowSpec.realnvp(num_layers=3, hidden=[16], activation="tanh", dtype="float64")
    assert spec.to_dict() == {
        "schema_version": 3,
        "layers": [
            {
                "type": "realnvp",
                "repeat": 3,
                "hidden": [16],
                "activation": "tanh",
                "scale_clamp": 3.0,
                "permutation": "shuffle",
                "orientation": "auto",
                "seed": 0,
            }
        ],
        "base": "affine",
        "dtype": "float64",
    }
    assert FlowSpec.planar().layers == (PlanarSpec(repeat=16),)
    ode = FlowSpec.neural_ode(hidden=[8], solver="rk4", num_steps=10, base="normal")
    assert ode.layers[0].num_steps == 10 and ode.base == "normal"
    with pytest.raises(SpecError, match=r"layers\[0\]\.num_layers|unknown field"):
        FlowSpec.planar(num_layer=3)


def test_canonical_dict_form_loads() -> None:
    data = {
        "schema_version": 3,
        "layers": [{"type": "realnvp", "repeat": 4, "hidden": [64, 64]}],
        "base": "affine",
    }
    assert FlowSpec.from_dict(data) == FlowSpec.realnvp(num_layers=4, hidden=[64, 64])


def test_version_1_reads_with_its_own_defaults() -> None:
    """A version-1 file without ``permutation`` builds version 1's flow (the reversal), and
    round-trips as version 2 with the field explicit."""
    old = {"schema_version": 1, "layers": [{"type": "realnvp", "repeat": 3}, {"type": "planar"}]}
    spec = FlowSpec.from_dict(old)
    assert spec.layers[0].permutation == "reverse"
    assert spec.layers[0].permutations(4) == [[3, 2, 1, 0]] * 2
    assert spec.schema_version == 3 and FlowSpec.from_dict(spec.to_dict()) == spec
    explicit = {"schema_version": 1, "layers": [{"type": "realnvp", "permutation": "random"}]}
    assert FlowSpec.from_dict(explicit).layers[0].permutation == "random"
    assert FlowSpec.from_dict({**old, "schema_version": 2}).layers[0].permutation == "shuffle"


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_read_orientation_as_sampling(version: int) -> None:
    """Versions 1 and 2 had ``orientation="sampling"`` as the default: a file of theirs that
    leaves it out builds that flow, and one that names it keeps its choice; version 3 (and a
    mapping without a version) leaves it ``"auto"``."""
    layers = [{"type": "realnvp"}, {"type": "realnvp", "orientation": "density"}]
    spec = FlowSpec.from_dict({"schema_version": version, "layers": layers})
    assert [layer.orientation for layer in spec.layers] == ["sampling", "density"]
    assert spec.schema_version == 3 and FlowSpec.from_dict(spec.to_dict()) == spec
    for data in ({"schema_version": 3, "layers": layers}, {"layers": layers}):
        assert FlowSpec.from_dict(data).layers[0].orientation == "auto"


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_load_and_save_files(tmp_path, suffix: str) -> None:
    spec = FlowSpec(layers=[PlanarSpec(repeat=2), NeuralODESpec(hidden=(4,))], dtype="float64")
    path = tmp_path / f"spec{suffix}"
    spec.save(path)
    assert FlowSpec.load(path) == spec


def test_load_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        FlowSpec.load(tmp_path / "missing.json")
    bad = tmp_path / "spec.txt"
    bad.write_text("{}")
    with pytest.raises(SpecError, match="expected a .json, .yaml or .yml file"):
        FlowSpec.load(bad)
    broken = tmp_path / "spec.json"
    broken.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        FlowSpec.load(broken)


def test_json_schema_validates_the_canonical_form() -> None:
    schema = FlowSpec.json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    layer_types = {d["properties"]["type"]["const"] for d in schema["$defs"].values()}
    assert layer_types == {"planar", "realnvp", "neural_ode"}
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("dim", [2, 3, 10])
def test_parameter_shapes_planar(dim: int) -> None:
    shapes = FlowSpec.planar(num_layers=5).parameter_shapes(dim)
    assert list(shapes.items()) == [
        ("layers.0.u", (5, dim)),
        ("layers.0.w", (5, dim)),
        ("layers.0.b", (5,)),
        ("affine.loc", (dim,)),
        ("affine.log_scale", (dim,)),
    ]


@pytest.mark.parametrize("dim", [2, 3, 10])
def test_parameter_shapes_realnvp(dim: int) -> None:
    shapes = FlowSpec.realnvp(num_layers=3, hidden=[7, 5], base="normal").parameter_shapes(dim)
    d1, d2 = dim // 2, dim - dim // 2
    assert list(shapes.items()) == [
        ("layers.0.net.0.weight", (3, 7, d1)),
        ("layers.0.net.0.bias", (3, 7)),
        ("layers.0.net.1.weight", (3, 5, 7)),
        ("layers.0.net.1.bias", (3, 5)),
        ("layers.0.net.2.weight", (3, 2 * d2, 5)),
        ("layers.0.net.2.bias", (3, 2 * d2)),
    ]


@pytest.mark.parametrize("dim", [2, 3, 10])
def test_parameter_shapes_neural_ode(dim: int) -> None:
    shapes = FlowSpec.neural_ode(hidden=[6], base="normal").parameter_shapes(dim)
    expected = []
    for j, (n_in, n_out) in enumerate([(dim, 6), (6, dim)]):
        expected += [
            (f"layers.0.net.{j}.weight", (n_out, n_in)),
            (f"layers.0.net.{j}.bias", (n_out,)),
        ]
        expected += [
            (f"layers.0.net.{j}.{k}", (n_out,)) for k in ("gate_weight", "gate_bias", "time_bias")
        ]
    assert list(shapes.items()) == expected


def test_parameter_shapes_mixed_stack_prefixes() -> None:
    spec = FlowSpec(layers=[PlanarSpec(), RealNVPSpec(repeat=2, hidden=(3,)), PlanarSpec(repeat=2)])
    names = list(spec.parameter_shapes(4))
    assert names[:3] == ["layers.0.u", "layers.0.w", "layers.0.b"]
    assert names[3] == "layers.1.net.0.weight"
    assert names[-5:] == [
        "layers.2.u",
        "layers.2.w",
        "layers.2.b",
        "affine.loc",
        "affine.log_scale",
    ]


def test_dim_errors() -> None:
    with pytest.raises(
        SpecError,
        match=r"layers\[1\]: a realnvp layer needs dim >= 2, got dim=1 \(planar and neural_ode layers work in 1 dimension\)",
    ):
        FlowSpec(layers=[PlanarSpec(), RealNVPSpec()]).parameter_shapes(1)
    assert list(FlowSpec.planar(num_layers=1).parameter_shapes(1))  # planar works in 1-D
    for bad in (0, -1, 2.5, True):
        with pytest.raises(SpecError, match="dim: expected a positive integer"):
            FlowSpec.planar().parameter_shapes(bad)  # type: ignore[arg-type]


def test_permutations() -> None:
    reverse = RealNVPSpec(repeat=3, permutation="reverse").permutations(5)
    assert reverse == [[4, 3, 2, 1, 0]] * 2
    rand = RealNVPSpec(repeat=4, permutation="random", seed=3)
    perms = rand.permutations(6)
    assert len(perms) == 3 and all(sorted(p) == list(range(6)) for p in perms)
    assert perms == RealNVPSpec(repeat=4, permutation="random", seed=3).permutations(6)
    assert perms != RealNVPSpec(repeat=4, permutation="random", seed=4).permutations(6)


def test_resolved_trace() -> None:
    assert NeuralODESpec().resolved_trace(10) == "exact"
    assert NeuralODESpec().resolved_trace(11) == "hutchinson"
    assert NeuralODESpec(trace="exact").resolved_trace(50) == "exact"
    assert math.isclose(NeuralODESpec().t1, 1.0)


def test_docs_schema_is_current() -> None:
    from pathlib import Path

    committed = Path(__file__).parents[1] / "docs" / "spec-schema.json"
    assert json.loads(committed.read_text()) == FlowSpec.json_schema(), (
        "docs/spec-schema.json is stale: run `flowguides spec-schema > docs/spec-schema.json`"
    )


@pytest.mark.parametrize("dim", [2, 3, 4, 7, 64])
def test_shuffle_changes_the_split_between_couplings(dim: int) -> None:
    """The default permutations are seeded, and each one brings at least one coordinate that
    the coupling before transformed into the next coupling's conditioning half."""
    spec = RealNVPSpec(repeat=12, seed=5)
    assert spec.permutation == "shuffle"
    perms = spec.permutations(dim)
    assert len(perms) == 11 and all(sorted(p) == list(range(dim)) for p in perms)
    assert all(set(p[: dim // 2]) != set(range(dim // 2)) for p in perms)
    assert perms == RealNVPSpec(repeat=12, seed=5).permutations(dim)
    if dim == 2:
        assert perms == [[1, 0]] * 11
    else:
        assert len({tuple(p) for p in perms}) > 1  # not one permutation repeated
