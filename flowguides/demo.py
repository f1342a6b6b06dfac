"""`flowguides demo`: what the library does, on a small scale, in about a minute.

Until both backends are wired in, the demo builds a spec for each flow family and prints it
with its parameter table, which is what both backends will build.
"""

from __future__ import annotations

from flowguides.spec import FlowSpec

__all__ = ["run_demo"]


def run_demo(out: str = "demo-output", quick: bool = False) -> int:
    """Run the demo; returns the exit status."""
    from flowguides.cli import _print_parameter_table

    specs = {
        "planar": FlowSpec.planar(num_layers=4),
        "realnvp": FlowSpec.realnvp(num_layers=4, hidden=[32, 32]),
        "neural_ode": FlowSpec.neural_ode(hidden=[32, 32]),
    }
    for name, spec in specs.items():
        print(f"== {name} ==")
        print(spec.to_json(indent=None))
        _print_parameter_table(spec, dim=10)
        print()
    return 0
