"""Every example runs end to end in its fast mode (`--quick`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
BACKENDS = {
    "eight_schools_pyro.py": [pytest.mark.torch],
    "eight_schools_numpyro.py": [pytest.mark.jax],
    "logistic_subsample_pyro.py": [pytest.mark.torch],
    "logistic_subsample_numpyro.py": [pytest.mark.jax],
    "two_moons_density.py": [pytest.mark.jax],
    "banana_neural_ode.py": [pytest.mark.jax],
    "density_pyro_to_numpyro.py": [pytest.mark.torch, pytest.mark.jax],
}


def test_every_example_is_listed() -> None:
    found = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert found == set(BACKENDS)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=m, id=n.removesuffix(".py")) for n, m in BACKENDS.items()]
)
def test_example_runs(name: str, tmp_path: Path) -> None:
    cmd = [sys.executable, str(EXAMPLES / name), "--quick", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "an example prints what it found"
