"""The second half of the NumPyro model zoo (see `test_zoo_numpyro`), in its own file so that
pytest-xdist's ``--dist loadfile`` can run the two halves on two workers."""

from __future__ import annotations

import pytest

from tests.zoo.test_zoo_numpyro import CASES, FIRST_HALF, run_case

pytestmark = pytest.mark.jax


@pytest.mark.parametrize("name", [name for name in CASES if name not in FIRST_HALF])
def test_zoo_model(name, tmp_path):
    run_case(name, tmp_path)
