"""Streaming density fits: a memory-mapped data set larger than the memory the process may use.

A seeded data set (``--rows`` x ``--dim`` float32: a mixture of Gaussians with random means
and scales, so no flow fits it at its start) is written to ``--dir`` as ``.npy`` in blocks
(never whole in memory). Each measurement runs in its own child process (one thread):

* ``in memory``: ``fit_density`` on the file's first ``1 / --ratio`` of the rows, read into
  memory: the data set that fits the allowed memory;
* ``memory-mapped``: ``fit_density(np.load(path, mmap_mode="r"), ...)`` on all the rows, in a
  process whose private memory is capped at ``--ratio`` times less than the file
  (``RLIMIT_DATA``, which the kernel enforces on a process's private mappings, not on the
  read-only file mapping), with the file in the page cache (``warm``) or evicted from it first
  (``cold``, ``posix_fadvise(DONTNEED)``; no root needed).

Throughput is that of training alone: each child fits ``--steps`` and ``--steps + --extra``
steps with the same settings (learning rate, batch, seed), each twice (the second is timed: it
reuses the first's compiled programs), and the row reports ``extra * batch / (wall_long -
wall_short)`` points per second, so set-up (the split, the standardising pass over the file)
cancels out. Rows (JSON lines, ``--out``,
default ``benchmarks/results/streaming.jsonl``) record the settings, the limit, the peak
private memory (``VmData`` high-water is not kept by Linux, so the child samples it after each
fit), versions and the commit; the ratio to the in-memory row of the same run is
``throughput_ratio``.

Usage::

    python -m benchmarks.streaming --dir /tmp/stream --backends numpyro pyro
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.rows import git_commit, library_versions, utc_now  # noqa: E402

__all__ = ["main", "write_data"]

ROOT = Path(__file__).resolve().parent.parent
BLOCK_ROWS = 1 << 18


def write_data(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    """Write a seeded ``(rows, dim)`` float32 mixture of eight Gaussians to `path` (``.npy``),
    a block of rows at a time."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(8, dim))
    scales = rng.uniform(0.3, 1.5, size=(8, dim))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, BLOCK_ROWS):
        n = min(BLOCK_ROWS, rows - start)
        k = rng.integers(8, size=n)
        out[start : start + n] = means[k] + scales[k] * rng.normal(size=(n, dim))
    out.flush()
    del out


def _private_bytes() -> int:
    """This process's private memory (``VmData``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return -1


def _child(args: argparse.Namespace) -> None:
    """One measurement (run in a child process): two fits, a JSON line on stdout."""
    import resource

    if args.limit:
        resource.setrlimit(resource.RLIMIT_DATA, (args.limit, args.limit))
    path = Path(args.dir) / "data.npy"
    if args.mode == "cold":
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if args.backend == "pyro":
        import torch

        torch.set_num_threads(1)
        from flowguides.pyro import fit_density
    else:
        from flowguides.numpyro import fit_density
    from flowguides import FlowSpec

    mapped = np.load(path, mmap_mode="r")
    data = np.array(mapped[: len(mapped) // args.ratio]) if args.mode == "memory" else mapped
    spec = FlowSpec.realnvp(num_layers=4, hidden=[64, 64])
    walls, peak = [], 0
    for steps in (args.steps, args.steps + args.extra):
        for _ in range(2):  # the first compiles (and warms the process), the second is timed
            if args.mode == "cold":
                with open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            fit_density(
                data, spec, num_steps=steps, batch_size=args.batch, patience=steps,
                validation_fraction=args.validation_fraction, seed=0, progress=False,
            )  # fmt: skip
            wall = time.perf_counter() - t
            peak = max(peak, _private_bytes())
        walls.append(wall)
    per_s = args.extra * args.batch / (walls[1] - walls[0])
    print(json.dumps({"walls_s": walls, "points_per_s": per_s, "private_bytes_peak": peak,
                      "rows_fitted": int(data.shape[0])}))  # fmt: skip


def _measure(args: argparse.Namespace, backend: str, mode: str, limit: int) -> dict:
    """Run one child and return its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.streaming", "--child", "--backend", backend,
           "--mode", mode, "--limit", str(limit), "--dir", str(args.dir), "--ratio", str(args.ratio),
           "--steps", str(args.steps), "--extra", str(args.extra), "--batch", str(args.batch),
           "--validation-fraction", str(args.validation_fraction)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"{backend} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Write the data set (unless there), measure each backend in each mode, append rows."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=16_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ratio", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--extra", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--validation-fraction", type=float, default=0.001)
    parser.add_argument("--backends", nargs="+", default=["numpyro", "pyro"])
    parser.add_argument("--modes", nargs="+", default=["warm", "cold"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/streaming.jsonl")
    parser.add_argument("--limit-bytes", type=int, default=None,
                        help="the private-memory cap (default: the file's size / --ratio)")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "data.npy"
    if not path.exists() or np.load(path, mmap_mode="r").shape != (args.rows, args.dim):
        write_data(path, args.rows, args.dim)
    file_bytes = path.stat().st_size
    limit = args.limit_bytes or file_bytes // args.ratio
    settings = {"rows": args.rows, "dim": args.dim, "file_bytes": file_bytes, "ratio": args.ratio,
                "steps": args.steps, "extra_steps": args.extra, "batch_size": args.batch,
                "validation_fraction": args.validation_fraction, "dtype": "float32",
                "spec": "FlowSpec.realnvp(num_layers=4, hidden=[64, 64])", "threads": 1}  # fmt: skip
    for backend in args.backends:
        base = _measure(args, backend, "memory", 0)
        rows = [{"mode": "in memory", "limit_bytes": None, **base}]
        for mode in args.modes:
            got = _measure(args, backend, mode, limit)
            ratio = got["points_per_s"] / base["points_per_s"]
            rows.append({"mode": f"memory-mapped ({mode} page cache)", "limit_bytes": limit,
                         **got, "throughput_ratio": ratio})  # fmt: skip
        for row in rows:
            row = {"suite": "streaming", "method": f"flowguides-{backend} fit_density", **row,
                   "settings": settings, "commit": git_commit(), "time": utc_now(),
                   "versions": library_versions()}  # fmt: skip
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
