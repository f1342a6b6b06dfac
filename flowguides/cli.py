"""The `flowguides` command line.

Run ``flowguides --help`` for the commands; each has its own ``--help``. Commands that run the
NumPyro backend turn on JAX's persistent compilation cache
(`flowguides.numpyro.use_compilation_cache`, see the conventions page), so that a later run
loads the programs a first run compiled; ``--no-cache`` leaves it off.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flowguides.core.checks import OBJECTIVES
from flowguides.core.coupling import COUPLINGS
from flowguides.core.training import DENSITY_LEARNING_RATE
from flowguides.spec import FlowSpec, SpecError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["main", "parse_spec", "read_data"]

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


def read_data(path: str) -> np.ndarray:
    """Rows of a ``.npy`` or ``.csv`` file (a header line is skipped when it is not numeric)."""
    import numpy as np

    from flowguides.core import check_data

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"DATA: no such file {path!r}")
    if file.suffix.lower() == ".npy":
        data = np.load(file, allow_pickle=False)
    elif file.suffix.lower() == ".csv":
        lines = file.read_text().splitlines()
        first = lines[0].split(",") if lines else []
        has_header = bool(first) and not all(_is_number(v) for v in first)
        try:
            data = np.loadtxt(file, delimiter=",", skiprows=int(has_header), ndmin=2)
        except ValueError as exc:
            raise ValueError(f"DATA: {path!r} is not a numeric CSV ({exc})") from None
    else:
        raise ValueError(f"DATA: expected a .csv or .npy file, got {file.name!r}")
    return check_data(data, name=f"DATA ({file.name})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_out_file(path: str) -> None:
    """Refuse an ``--out`` that cannot take the array, before the work."""
    if Path(path).is_dir():
        raise ValueError(f"--out: {path!r} is a folder; give a file name ending .csv or .npy")
    if not Path(path).parent.is_dir():
        raise ValueError(f"--out: the folder of {path!r} does not exist")


def _write_array(path: str, array: np.ndarray) -> None:
    import numpy as np

    if path.lower().endswith(".npy"):
        np.save(path, array)
    else:
        np.savetxt(path, array, delimiter=",")


def _cmd_fit_density(args: argparse.Namespace) -> int:
    from flowguides import io

    if Path(args.out).exists() and not args.overwrite:  # before the fit, not after it
        raise ValueError(f"--out: {args.out!r} exists; pass --overwrite to replace it")
    spec = parse_spec(args.spec)
    data = read_data(args.data)
    backend = io.backend_module(args.backend)
    fit = backend.fit_density(
        data,
        spec,
        num_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        objective=args.objective,
        coupling=args.coupling,
        seed=args.seed,
        progress=not args.quiet,
    )
    out = io.save(fit, args.out, overwrite=args.overwrite)
    from flowguides.plots import plot_density_2d, plot_losses

    plot_losses(fit.losses, path=out / "loss.png")
    if data.shape[1] == 2:
        plot_density_2d(fit, data, path=out / "density.png")
    print(f"saved to {out}", file=sys.stderr)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from flowguides import io

    _check_out_file(args.out)
    fit = io.load(args.dir, backend=args.backend)
    _write_array(args.out, fit.sample(args.n, seed=args.seed))
    return 0


def _cmd_log_prob(args: argparse.Namespace) -> int:
    from flowguides import io

    _check_out_file(args.out)
    fit = io.load(args.dir, backend=args.backend)
    _write_array(args.out, fit.log_prob(read_data(args.data))[:, None])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from flowguides.demo import run_demo

    return run_demo(out=args.out, quick=args.quick, cache=not args.no_cache)


def _compilation_cache(args: argparse.Namespace) -> None:
    """Turn on the persistent compilation cache for a command that runs the NumPyro backend,
    unless ``--no-cache`` says not to (the demo turns it on itself)."""
    if getattr(args, "backend", None) == "numpyro" and not args.no_cache:
        from flowguides.numpyro import use_compilation_cache

        use_compilation_cache()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowguides",
        description="Normalizing flows as guides and densities for Pyro and NumPyro.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument(
        "--no-cache",
        action="store_true",
        help="leave JAX's persistent compilation cache off (NumPyro; on by default, in "
        "$XDG_CACHE_HOME/flowguides/jax)",
    )

    p = sub.add_parser("spec-schema", help="print the JSON Schema of the flow spec")
    p.set_defaults(func=_cmd_spec_schema)

    p = sub.add_parser("show-spec", help="validate a spec and print its parameter table")
    p.add_argument("spec", help="a .json/.yaml spec file or a shorthand (realnvp:4, planar:16)")
    p.add_argument("--dim", type=int, default=2, help="dimension for the parameter table")
    p.set_defaults(func=_cmd_show_spec)

    p = sub.add_parser("fit-density", help="fit a flow density to a data file", parents=[cache])
    p.add_argument("data", help="a .csv (header optional) or .npy file of shape (n, dim)")
    p.add_argument(
        "--spec", required=True, help="a .json/.yaml spec or realnvp:N, planar:N, neural_ode"
    )
    p.add_argument("--backend", choices=["pyro", "numpyro"], default="numpyro")
    p.add_argument("--out", required=True, help="folder to write the fit, loss.png, density.png")
    p.add_argument("--steps", type=int, default=None, help="default: 2000; flow matching 20000")
    p.add_argument(
        "--batch-size", type=int, default=None,
        help="default: 256; flow matching 1024 (256 with --coupling ot)",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=DENSITY_LEARNING_RATE)
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="maximum_likelihood",
        help="maximum_likelihood, or flow_matching (a spec of one neural-ODE layer)",
    )
    p.add_argument(
        "--coupling",
        choices=COUPLINGS,
        default="independent",
        help="flow matching's pairing of noise and data: independent, or ot (minibatch "
        "optimal transport)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fit_density)

    p = sub.add_parser("sample", help="draw from a saved density fit", parents=[cache])
    p.add_argument("dir", help="a folder written by fit-density")
    p.add_argument("-n", type=int, required=True, help="number of draws")
    p.add_argument("--out", required=True, help=".csv or .npy file")
    p.add_argument("--backend", choices=["pyro", "numpyro"], default="numpyro")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "log-prob", help="log-density of a saved fit at the rows of a data file", parents=[cache]
    )
    p.add_argument("dir", help="a folder written by fit-density")
    p.add_argument("data", help="a .csv or .npy file of shape (n, dim)")
    p.add_argument("--out", required=True, help=".csv or .npy file")
    p.add_argument("--backend", choices=["pyro", "numpyro"], default="numpyro")
    p.set_defaults(func=_cmd_log_prob)

    p = sub.add_parser("demo", help="run the demo and write its plots", parents=[cache])
    p.add_argument("--out", default="demo-output", help="folder for the demo's plots")
    p.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowguides`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _compilation_cache(args)
        return args.func(args)
    except (SpecError, ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"flowguides {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
