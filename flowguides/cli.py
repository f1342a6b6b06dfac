"""The `flowguides` command line.

Run ``flowguides --help`` for the commands; each has its own ``--help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from flowguides.spec import FlowSpec, SpecError

__all__ = ["main", "parse_spec"]

_SHORTHANDS = {"realnvp": FlowSpec.realnvp, "planar": FlowSpec.planar}


def parse_spec(text: str) -> FlowSpec:
    """A spec from a ``.json``/``.yaml`` path or a shorthand: ``realnvp:4``, ``planar:16``,
    ``neural_ode``.

    Raises:
        SpecError: the text is neither a readable spec file nor a known shorthand.
    """
    if text.lower().endswith((".json", ".yaml", ".yml")):
        return FlowSpec.load(text)
    name, _, count = text.partition(":")
    if name == "neural_ode" and not count:
        return FlowSpec.neural_ode()
    if name in _SHORTHANDS:
        if not count:
            return _SHORTHANDS[name]()
        if count.isdigit() and int(count) > 0:
            return _SHORTHANDS[name](num_layers=int(count))
        raise SpecError(f"--spec: expected {name}:<positive layer count>, got {text!r}")
    raise SpecError(
        f"--spec: expected a .json/.yaml file or one of 'realnvp:N', 'planar:N', "
        f"'neural_ode', got {text!r}"
    )


def _cmd_spec_schema(args: argparse.Namespace) -> int:
    print(json.dumps(FlowSpec.json_schema(), indent=2))
    return 0


def _cmd_show_spec(args: argparse.Namespace) -> int:
    spec = parse_spec(args.spec)
    print(spec.to_json())
    _print_parameter_table(spec, args.dim)
    return 0


def _print_parameter_table(spec: FlowSpec, dim: int) -> None:
    shapes = spec.parameter_shapes(dim)
    width = max(len(name) for name in shapes)
    total = 0
    print(f"\n{'parameter':<{width}}  shape")
    for name, shape in shapes.items():
        size = 1
        for n in shape:
            size *= n
        total += size
        print(f"{name:<{width}}  {shape}")
    print(f"{len(shapes)} arrays, {total} numbers in {dim} dimensions")


def _cmd_demo(args: argparse.Namespace) -> int:
    from flowguides.demo import run_demo

    return run_demo(out=args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowguides",
        description="Normalizing flows as guides and densities for Pyro and NumPyro.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("spec-schema", help="print the JSON Schema of the flow spec")
    p.set_defaults(func=_cmd_spec_schema)

    p = sub.add_parser("show-spec", help="validate a spec and print its parameter table")
    p.add_argument("spec", help="a .json/.yaml spec file or a shorthand (realnvp:4, planar:16)")
    p.add_argument("--dim", type=int, default=2, help="dimension for the parameter table")
    p.set_defaults(func=_cmd_show_spec)

    p = sub.add_parser("demo", help="run the demo and write its plots")
    p.add_argument("--out", default="demo-output", help="folder for the demo's plots")
    p.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowguides`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"flowguides {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
