"""The README's examples run as written (with fewer training steps, to keep the suite fast)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
CODE_BLOCKS = [b for b in BLOCKS if not b.lstrip().startswith(">>>")]


def _marks(code: str) -> list[pytest.MarkDecorator]:
    marks = []
    if "import pyro" in code or "flowguides.pyro" in code:
        marks.append(pytest.mark.torch)
    if "numpyro" in code:
        marks.append(pytest.mark.jax)
    return marks


@pytest.mark.parametrize(
    "code",
    [pytest.param(c, marks=_marks(c), id=f"block{i}") for i, c in enumerate(CODE_BLOCKS)],
)
def test_readme_block_runs(code: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "num_steps=" in code
    quick = re.sub(r"num_steps=\d+", "num_steps=40", code)
    namespace: dict = {"__name__": "readme"}
    exec(compile(quick, "README.md", "exec"), namespace)
    if "fit" in namespace:
        fit = namespace["fit"]
        assert len(fit.losses["train"] if isinstance(fit.losses, dict) else fit.losses) > 0


@pytest.mark.jax
def test_readme_cli_block(tmp_path: Path) -> None:
    block = re.search(r"```bash\n(flowguides fit-density.*?)```", README, flags=re.S).group(1)
    data = np.random.default_rng(0).standard_normal((200, 2))
    np.savetxt(tmp_path / "data.csv", data, delimiter=",", header="a,b", comments="")
    cli = [sys.executable, "-m", "flowguides.cli"]
    for line in block.strip().splitlines():
        args = line.split()[1:]
        if args[0] == "fit-density":
            args += ["--steps", "20", "--quiet"]
        out = subprocess.run(cli + args, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert (tmp_path / "fit" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "fit" / "density.png").stat().st_size > 1000
    assert np.loadtxt(tmp_path / "draws.csv", delimiter=",").shape == (1000, 2)
    assert np.isfinite(np.loadtxt(tmp_path / "logp.csv", delimiter=",")).all()
