"""Collection rules for the zoo: each backend's files load only where that backend is installed.

`--doctest-modules` imports every module under ``tests/``, so the model modules are ignored as
well as the test files where their framework is missing (CI's torch-free job). The test files
mark themselves ``torch`` / ``jax``.
"""

from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("pyro") is None:
    collect_ignore += ["models_pyro.py", "test_zoo_pyro.py"]
if importlib.util.find_spec("jax") is None or importlib.util.find_spec("numpyro") is None:
    collect_ignore += ["models_numpyro.py", "test_zoo_numpyro.py", "test_zoo_numpyro_rest.py"]
