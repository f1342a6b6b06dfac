"""The shared flow spec: one pure-Python, versioned, validated schema read by both backends.

A [`FlowSpec`][flowguides.spec.FlowSpec] is an ordered list of layer specs plus a base. It
imports neither torch nor jax; the Pyro and NumPyro backends build the same flow from it, with
the parameter names and shapes that [`FlowSpec.parameter_shapes`][flowguides.spec.FlowSpec.parameter_shapes]
lists, so one weight file serves both.

Conventions shared by both backends (the spec is their single source of truth):

* Generative direction (sampling, guides): ``eps ~ N(0, I)`` -> ``layers[0]`` -> ... ->
  ``layers[-1]`` -> affine ``x = loc + exp(log_scale) * y`` (when ``base == "affine"``).
  Density fitting runs the inverse: standardise by the affine, then invert the layers.
* Parameters of a layer spec with ``repeat = R`` are stacked along a leading axis of size ``R``.
* Dense weights are stored ``(out, in)`` (torch's ``nn.Linear`` layout); ``y = x @ W.T + b``.
* RealNVP: each coupling keeps the first ``dim // 2`` coordinates and maps the rest by
  ``x2 * exp(s) + t``, ``s = clamp * tanh(raw / clamp)`` (in the direction its ``orientation``
  names); [`RealNVPSpec.permutations`][flowguides.spec.RealNVPSpec.permutations] sit between.
* Schema versions: 2 made ``"shuffle"`` the default RealNVP permutation, 3 ``"auto"`` its
  orientation; an older spec that leaves either out gets its version's default (``"reverse"``,
  ``"sampling"``), so old files build the flow they were saved with.
* Neural ODE: concatsquash layers ``h' = (W h + b) * sigmoid(g_w t + g_b) + c t``; base at
  ``t = 0``, data at ``t = t1``.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from flowguides._spec_errors import describe_errors

__all__ = [
    "SCHEMA_VERSION",
    "ACTIVATION_NAMES",
    "SMOOTH_ACTIVATION_NAMES",
    "SOLVERS",
    "FIXED_STEP_SOLVERS",
    "SpecError",
    "PlanarSpec",
    "RealNVPSpec",
    "NeuralODESpec",
    "LayerSpec",
    "FlowSpec",
]

SCHEMA_VERSION = 3
ACTIVATION_NAMES = ("relu", "tanh", "elu", "leaky_relu", "gelu")
SMOOTH_ACTIVATION_NAMES = ("tanh", "softplus", "elu")
SOLVERS = ("dopri5", "tsit5", "rk4", "euler")
FIXED_STEP_SOLVERS = ("rk4", "euler")

Shape = tuple[int, ...]


class SpecError(ValueError):
    """A flow spec, or its use with a given `dim`, is invalid; the message names the field."""


def _spec_error(exc: ValidationError) -> SpecError:
    lines = describe_errors(_LAYER_TYPES, exc)
    return SpecError(lines[0] if len(lines) == 1 else "invalid flow spec:\n  " + "\n  ".join(lines))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


def _mlp_shapes(prefix: str, sizes: list[int], lead: Shape) -> list[tuple[str, Shape]]:
    out = []
    for j, (n_in, n_out) in enumerate(pairwise(sizes)):
        p = f"{prefix}.{j}"
        out += [(f"{p}.weight", (*lead, n_out, n_in)), (f"{p}.bias", (*lead, n_out))]
    return out


class PlanarSpec(_Frozen):
    """`repeat` planar layers ``f(z) = z + u_hat tanh(w.z + b)`` (Rezende & Mohamed, 2015).

    ``u_hat = u + (softplus(w.u) - 1 - w.u) w / |w|^2`` keeps each layer invertible; both
    backends invert it exactly by a safeguarded 1-D Newton solve along ``w``.

    Parameters (``R = repeat``): ``u (R, dim)``, ``w (R, dim)``, ``b (R,)``.
    """

    type: Literal["planar"] = "planar"
    repeat: PositiveInt = 1

    min_dim: ClassVar[int] = 1

    def parameter_shapes(self, dim: int, prefix: str) -> list[tuple[str, Shape]]:
        r = self.repeat
        return [(f"{prefix}.u", (r, dim)), (f"{prefix}.w", (r, dim)), (f"{prefix}.b", (r,))]


class RealNVPSpec(_Frozen):
    """`repeat` affine coupling layers (Dinh et al., 2016) with permutations between them.

    Each coupling conditions on ``x[:dim // 2]`` and maps ``x[dim // 2:]`` by ``x * exp(s) + t``,
    ``s = scale_clamp * tanh(raw / scale_clamp)``, from base to target (``orientation=
    "sampling"``) or from target to base (``"density"``, Dinh et al.'s form: sampling is then
    ``(x - t) * exp(-s)``); ``"auto"`` is ``"density"`` in ``fit_density`` and ``"sampling"``
    everywhere else (each fit records the one it used); the conditioner, an MLP ``dim // 2 -> hidden... -> 2 * (dim - dim
    // 2)``, outputs ``(t, raw)``; its last layer starts at zero (a new layer is the identity).

    Parameters (``R = repeat``): ``net.{j}.weight (R, out, in)``, ``net.{j}.bias (R, out)``.
    """

    type: Literal["realnvp"] = "realnvp"
    repeat: PositiveInt = 1
    hidden: tuple[PositiveInt, ...] = (64, 64)
    activation: Literal["relu", "tanh", "elu", "leaky_relu", "gelu"] = "relu"
    scale_clamp: PositiveFloat = 3.0
    permutation: Literal["shuffle", "reverse", "random"] = "shuffle"
    orientation: Literal["auto", "sampling", "density"] = "auto"
    seed: int = 0

    min_dim: ClassVar[int] = 2

    def mlp_sizes(self, dim: int) -> list[int]:
        """Widths of the conditioner, input first."""
        d1 = dim // 2
        return [d1, *self.hidden, 2 * (dim - d1)]

    def parameter_shapes(self, dim: int, prefix: str) -> list[tuple[str, Shape]]:
        return _mlp_shapes(f"{prefix}.net", self.mlp_sizes(dim), (self.repeat,))

    def permutations(self, dim: int) -> list[list[int]]:
        """The `repeat - 1` permutations applied between couplings (``y = x[..., perm]``).

        ``"shuffle"`` (the default): seeded random permutations, each redrawn until it moves at
        least one coordinate that the coupling before transformed into the half that conditions
        the next one (so consecutive couplings never split the coordinates alike; in 2-D this
        is the swap). ``"reverse"``: the reversal every time, so the couplings alternate between
        the same two halves. ``"random"``: seeded random permutations, unconstrained.

        Example:
            >>> RealNVPSpec(repeat=3).permutations(2)
            [[1, 0], [1, 0]]
            >>> RealNVPSpec(repeat=2, permutation="reverse").permutations(3)
            [[2, 1, 0]]
        """
        if self.permutation == "reverse":
            return [list(range(dim - 1, -1, -1)) for _ in range(self.repeat - 1)]
        rng = random.Random(self.seed)
        kept, perms = set(range(dim // 2)), []
        for _ in range(self.repeat - 1):
            perm = list(range(dim))
            rng.shuffle(perm)
            while self.permutation == "shuffle" and set(perm[: dim // 2]) == kept:
                rng.shuffle(perm)
            perms.append(perm)
        return perms


class NeuralODESpec(_Frozen):
    """A continuous normalising flow (Chen et al., 2018; Grathwohl et al., 2019).

    ``dz/dt = f(z, t)`` with `f` an MLP of concatsquash layers
    ``h' = (W h + b) * sigmoid(gate_weight t + gate_bias) + time_bias t``; the last layer starts
    at zero (a new flow is the identity). ``trace="auto"``: exact for ``dim <= 10``, else
    Hutchinson. ``kinetic_weight`` and ``jacobian_weight`` weight the RNODE regularisers (Finlay
    et al., 2020) ``∫ |f|² dt`` and ``∫ |∂f/∂z|_F² dt``; ``steer > 0`` draws the end time of each
    training solve uniformly from ``[t1 (1 - steer), t1 (1 + steer)]`` (STEER, Ghosh et al., 2020).

    Parameters: ``net.{j}.weight (out, in)``, ``net.{j}.bias``, ``net.{j}.gate_weight``,
    ``net.{j}.gate_bias``, ``net.{j}.time_bias`` (each ``(out,)``).
    """

    type: Literal["neural_ode"] = "neural_ode"
    hidden: tuple[PositiveInt, ...] = (64, 64)
    activation: Literal["tanh", "softplus", "elu"] = "tanh"
    time_conditioning: Literal["concatsquash"] = "concatsquash"
    trace: Literal["auto", "exact", "hutchinson"] = "auto"
    noise: Literal["rademacher", "gaussian"] = "rademacher"
    solver: Literal["dopri5", "tsit5", "rk4", "euler"] = "dopri5"
    rtol: PositiveFloat = 1e-5
    atol: PositiveFloat = 1e-5
    num_steps: PositiveInt | None = None
    max_steps: PositiveInt = 1000
    t1: PositiveFloat = 1.0
    adjoint: bool = False
    kinetic_weight: Annotated[float, Field(ge=0.0)] = 0.0
    jacobian_weight: Annotated[float, Field(ge=0.0)] = 0.0
    steer: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    min_dim: ClassVar[int] = 1

    @model_validator(mode="after")
    def _check_steps(self) -> NeuralODESpec:
        if self.solver in FIXED_STEP_SOLVERS and self.num_steps is None:
            raise ValueError(
                f"num_steps: the fixed-step solver {self.solver!r} needs num_steps, got None"
            )
        return self

    def mlp_sizes(self, dim: int) -> list[int]:
        """Widths of the vector field, input first."""
        return [dim, *self.hidden, dim]

    def resolved_trace(self, dim: int) -> str:
        """``"exact"`` or ``"hutchinson"`` after resolving ``"auto"`` for this `dim`."""
        if self.trace == "auto":
            return "exact" if dim <= 10 else "hutchinson"
        return self.trace

    def parameter_shapes(self, dim: int, prefix: str) -> list[tuple[str, Shape]]:
        out: list[tuple[str, Shape]] = []
        sizes = self.mlp_sizes(dim)
        for j, (n_in, n_out) in enumerate(pairwise(sizes)):
            p = f"{prefix}.net.{j}"
            out += [(f"{p}.weight", (n_out, n_in)), (f"{p}.bias", (n_out,))]
            out += [(f"{p}.{k}", (n_out,)) for k in ("gate_weight", "gate_bias", "time_bias")]
        return out


LayerSpec = Annotated[PlanarSpec | RealNVPSpec | NeuralODESpec, Field(discriminator="type")]
_LAYER_TYPES = {"planar": PlanarSpec, "realnvp": RealNVPSpec, "neural_ode": NeuralODESpec}
_FLOW_FIELDS = ("base", "dtype", "schema_version")


class FlowSpec(_Frozen):
    """An ordered list of layer specs on a standard-normal base, optionally with an affine.

    Attributes:
        layers: the layer specs, applied in order in the generative direction.
        base: ``"affine"`` adds a learnable diagonal affine ``loc + exp(log_scale) * y`` after
            the layers (guides centre it on their initial location); ``"normal"`` omits it.
        dtype: ``"float32"`` (default) or ``"float64"``.

    Example:
        >>> spec = FlowSpec.realnvp(num_layers=2, hidden=[8])
        >>> for name, shape in list(spec.parameter_shapes(3).items())[:2]:
        ...     print(name, shape)
        layers.0.net.0.weight (2, 8, 1)
        layers.0.net.0.bias (2, 8)
    """

    schema_version: Literal[1, 2, 3] = SCHEMA_VERSION
    layers: tuple[LayerSpec, ...]
    base: Literal["affine", "normal"] = "affine"
    dtype: Literal["float32", "float64"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Read a version-1 or 2 mapping as version 3 (its RealNVP defaults made explicit)."""
        version = data.get("schema_version") if isinstance(data, dict) else None
        if type(version) is not int or version not in (1, 2):
            return data
        old = {"permutation": "reverse"} if version == 1 else {}

        def upgrade(layer: Any) -> Any:
            realnvp = isinstance(layer, dict) and layer.get("type") == "realnvp"
            return {"orientation": "sampling", **old, **layer} if realnvp else layer

        layers = data.get("layers")
        layers = [upgrade(x) for x in layers] if isinstance(layers, list | tuple) else layers
        return {**data, "schema_version": SCHEMA_VERSION, "layers": layers}

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _spec_error(exc) from None

    @model_validator(mode="after")
    def _check_layers(self) -> FlowSpec:
        if not self.layers:
            raise ValueError("layers: expected at least one layer spec, got an empty list")
        return self

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def _one(
        cls, layer_type: str, layer_fields: dict[str, Any], fields: dict[str, Any]
    ) -> FlowSpec:
        flow = {k: fields.pop(k) for k in _FLOW_FIELDS if k in fields}
        return cls(layers=[{"type": layer_type, **layer_fields, **fields}], **flow)

    @classmethod
    def realnvp(
        cls, num_layers: int = 4, hidden: Sequence[int] = (64, 64), **fields: Any
    ) -> FlowSpec:
        """`num_layers` RealNVP couplings; extra `fields` go to the layer or the flow."""
        return cls._one("realnvp", {"repeat": num_layers, "hidden": hidden}, dict(fields))

    @classmethod
    def planar(cls, num_layers: int = 16, **fields: Any) -> FlowSpec:
        """`num_layers` planar layers; extra `fields` go to the layer or the flow."""
        return cls._one("planar", {"repeat": num_layers}, dict(fields))

    @classmethod
    def neural_ode(cls, hidden: Sequence[int] = (64, 64), **fields: Any) -> FlowSpec:
        """One neural-ODE block; extra `fields` go to the layer or the flow."""
        return cls._one("neural_ode", {"hidden": hidden}, dict(fields))

    # -- I/O -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowSpec:
        """Validate a dict (the canonical form) into a spec; raises `SpecError`."""
        if not isinstance(data, dict):
            raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise SpecError(
                f"schema_version: this flowguides reads version {SCHEMA_VERSION}, got {version}; "
                "upgrade flowguides"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The canonical dict form (JSON-ready, every field explicit)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, text: str) -> FlowSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def load(cls, path: str | Path) -> FlowSpec:
        """Read a spec from a ``.json``, ``.yaml`` or ``.yml`` file."""
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"spec: no such file {str(path)!r}")
        text = path.read_text()
        suffix = path.suffix.lower()
        if suffix == ".json":
            return cls.from_json(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise SpecError(f"spec: not valid YAML ({exc})") from None
            return cls.from_dict(data)
        raise SpecError(f"spec: expected a .json, .yaml or .yml file, got {path.name!r}")

    def save(self, path: str | Path) -> None:
        """Write the spec as JSON or YAML, chosen by the file's suffix."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(self.to_json())

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema (draft 2020-12) of the canonical dict form."""
        schema = cls.model_json_schema()
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}

    # -- shapes ----------------------------------------------------------------------------
    def check_dim(self, dim: int) -> None:
        """Raise `SpecError` unless every layer works in `dim` dimensions."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise SpecError(f"dim: expected a positive integer, got {dim!r}")
        for i, layer in enumerate(self.layers):
            if dim < layer.min_dim:
                fits = " and ".join(t for t, k in _LAYER_TYPES.items() if k.min_dim <= dim)
                need = f"a {layer.type} layer needs dim >= {layer.min_dim}, got dim={dim}"
                fits += f" layers work in {dim} dimension{'s' * (dim > 1)}"
                raise SpecError(f"layers[{i}]: {need} ({fits})")

    def parameter_shapes(self, dim: int) -> OrderedDict[str, Shape]:
        """Every trainable array of the flow in `dim` dimensions, ``name -> shape``, in order.

        The one source of truth for names and shapes: both backends build exactly these.
        """
        self.check_dim(dim)
        shapes: OrderedDict[str, Shape] = OrderedDict()
        for i, layer in enumerate(self.layers):
            shapes.update(layer.parameter_shapes(dim, f"layers.{i}"))
        if self.base == "affine":
            shapes.update({"affine.loc": (dim,), "affine.log_scale": (dim,)})
        return shapes
