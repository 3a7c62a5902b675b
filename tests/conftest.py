"""Test configuration shared by the whole suite.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors:
``TRITON_INTERPRET=1`` must be set before triton is first imported, hence here. With a
GPU the kernels run natively on CUDA tensors and the interpreter stays off.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

#: The device the kernel tests run on: CUDA when present, else CPU (interpreted kernels).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def f32_dot_launches(monkeypatch) -> list[str]:
    """The ``F32_DOT`` each covariance kernel launch compiles with, in launch order (a spy
    on :func:`cobkern.kernels.covariance.specialization`, the launcher's one source)."""
    from cobkern.kernels import covariance as kcov

    seen: list[str] = []
    original = kcov.specialization

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[0]["F32_DOT"])
        return out

    monkeypatch.setattr(kcov, "specialization", spy)
    return seen
