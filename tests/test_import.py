"""`import flowguides` stays light: neither torch nor jax is loaded until a backend is used."""

from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_framework() -> None:
    code = (
        "import sys, flowguides, flowguides.spec, flowguides.cli, flowguides.core;"
        "flowguides.FlowSpec.realnvp().parameter_shapes(3);"
        "heavy = sorted(m for m in ('torch', 'jax', 'pyro', 'numpyro', 'arviz') if m in sys.modules);"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_attribute_is_an_attribute_error() -> None:
    import flowguides

    try:
        flowguides.not_a_thing  # noqa: B018
    except AttributeError as exc:
        assert "not_a_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
