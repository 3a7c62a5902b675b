"""Backend selection: the interpreter-compatibility warning for old Triton + new numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

triton = pytest.importorskip("triton")

from cobkern.ops import backend  # noqa: E402


@pytest.mark.parametrize("triton_v,numpy_v,warns", [
    ("3.6.0", "2.4.6", True),    # the combination seen failing
    ("3.6.0", "2.3.5", False),   # seen working
    ("3.8.0", "2.4.6", False),   # seen working (this project's CI)
    ("3.10.1", "3.0.0", False),  # later Triton: no warning (minor 10 > 8, not "1")
])
def test_interpreter_compatibility_warning(monkeypatch, triton_v, numpy_v, warns):
    monkeypatch.setattr(triton, "__version__", triton_v)
    monkeypatch.setattr(np, "__version__", numpy_v)
    backend.check_interpreter_compatible.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend.check_interpreter_compatible()
    finally:
        backend.check_interpreter_compatible.cache_clear()
    hits = [w for w in caught if "TRITON_INTERPRET" in str(w.message)]
    assert bool(hits) == warns
    if warns:
        assert "numpy < 2.4" in str(hits[0].message)
