"""Repository-wide pytest set-up: one thread everywhere, float64 in JAX, backend markers.

Tests under ``tests/pyro`` are marked ``torch``, under ``tests/numpyro`` ``jax``; a test elsewhere
that needs a backend marks itself. CI's torch-free job deselects with ``-m "not torch"``.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None

collect_ignore_glob = [".venv*/*", "benchmarks/*", "examples/*", "site/*", "docs/*.py"]
collect_ignore: list[str] = []  # whole folders (their conftest.py files import the backend)
if not HAS_TORCH:  # these need torch throughout; they are all marked `torch`
    collect_ignore += ["flowguides/pyro", "tests/pyro", "tests/conformance/test_portable.py"]
if not HAS_JAX:
    collect_ignore += ["flowguides/numpyro", "tests/numpyro", "tests/conformance"]

if HAS_TORCH:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


SLOW_FILES_FIRST = (
    "tests/zoo/test_zoo_numpyro.py",
    "tests/zoo/test_zoo_numpyro_rest.py",
    "tests/zoo/test_zoo_pyro.py",
    "tests/numpyro/test_fit.py",
    "tests/test_examples.py",
    "tests/conformance/test_power.py",
    "tests/conformance/test_layers.py",
    "tests/conformance/test_infer.py",
)
"""Files that take the longest, run first: with two workers taking one file at a time (`make
test` runs ``--dist loadfile --no-loadscope-reorder``), the short files then fill the gaps at the
end instead of one worker idling while the other runs a long file last."""


def _run_order(item: pytest.Item) -> int:
    path = item.path.as_posix()
    for rank, name in enumerate(SLOW_FILES_FIRST):
        if path.endswith(name):
            return rank
    return len(SLOW_FILES_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_run_order)  # stable: every file keeps its own order
    for item in items:
        path = str(item.path)
        if f"{os.sep}pyro{os.sep}" in path:
            item.add_marker(pytest.mark.torch)
        if f"{os.sep}numpyro{os.sep}" in path:
            item.add_marker(pytest.mark.jax)
