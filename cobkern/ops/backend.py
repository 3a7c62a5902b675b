"""Choosing between the Triton kernels and the plain-PyTorch reference.

``"auto"`` (the default) runs the Triton kernels on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1`` is set (the Triton interpreter, for testing); everything else runs
the reference. ``"reference"`` forces the reference everywhere (useful for comparisons);
``"triton"`` forces the kernels and raises where they cannot run.

Under ``torch.compile`` a second, independent choice applies: how compiled code reaches the
TSRA kernels (:func:`set_compile_kernels`). ``"opaque"`` calls the registered custom ops
``cobkern::tsra`` / ``cobkern::tsra_backward``, single nodes that compiled code calls
through the dispatcher; ``"inline"`` calls their ``torch.library.triton_op`` twins
``cobkern::tsra_inline`` / ``cobkern::tsra_inline_backward``, which inductor traces into:
on CUDA its generated code launches the Triton kernels itself (no dispatcher round trip,
output buffers in inductor's memory plan; the same kernels and launch plan), on a CPU it
compiles the reference formula like any other ops (under the Triton interpreter, which runs
the kernels on CPU tensors, it calls the opaque op). ``"auto"`` (the default) is inline:
on our 2-core CPU a compiled VGG-16 training step ran 1.6–1.9× faster that way, and on an
H200 (2026-11-27, bf16, batch 1024, ``BENCHMARKS.md``) 10.2 ms against 11.8 ms through the
opaque ops, with the same kernel time (6.09 / 6.12 ms) and the same step as CUDA graphs
(6.0 ms) — the inline step has less host work. :func:`compile_kernels_for` is where a
per-device choice would go. The environment variable ``COBKERN_COMPILE_KERNELS`` sets the
initial value.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
_backend = "auto"

COMPILE_KERNELS_ENV = "COBKERN_COMPILE_KERNELS"
#: The compile-kernels modes (:func:`set_compile_kernels`).
COMPILE_KERNELS = ("auto", "opaque", "inline")


def _initial_compile_kernels() -> str:
    value = os.environ.get(COMPILE_KERNELS_ENV, "auto")
    if value not in COMPILE_KERNELS:
        raise ValueError(f"{COMPILE_KERNELS_ENV}={value!r} is not a cobkern compile-kernels "
                         f"mode; expected one of {COMPILE_KERNELS}")
    return value


_compile_kernels = _initial_compile_kernels()


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works in this environment."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether the Triton interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def check_interpreter_compatible() -> None:
    """Warn once if this Triton's interpreter cannot run cobkern's kernels on CPU tensors.

    Triton 3.6's interpreter turns a kernel's integer arguments into one-element arrays and
    calls ``int()`` on them for ``range`` bounds, which numpy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"); the chunked TSRA kernels
    (C > 4096) and the covariance kernel loop over such bounds. Seen with triton 3.6.0 +
    numpy 2.4.6; triton 3.8 works with numpy 2.4, and triton 3.6 with numpy 2.3. GPU runs
    are unaffected.
    """
    import warnings

    import numpy as np
    import triton

    def _ver(v: str) -> tuple[int, int]:
        major, minor = (v.split(".") + ["0"])[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)

    if _ver(triton.__version__) < (3, 8) and _ver(np.__version__) >= (2, 4):
        warnings.warn(
            f"TRITON_INTERPRET=1 with triton {triton.__version__} and numpy {np.__version__}: "
            "this interpreter fails on kernel loops with runtime bounds under numpy >= 2.4 "
            "(cobkern's covariance kernel and TSRA kernels for C > 4096). Use numpy < 2.4, "
            "triton >= 3.8, or cobkern.ops.use_backend('reference') on CPU.",
            RuntimeWarning, stacklevel=3)


def get_backend() -> str:
    """The current backend name: ``"auto"``, ``"triton"`` or ``"reference"``."""
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for all cobkern ops (process-wide)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown cobkern backend {name!r}; expected one of {BACKENDS}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`.

    Example::

        with cobkern.ops.use_backend("reference"):
            y = cobkern.tsra(x, split=32)

    In eager mode the backend is read each time an op runs, its backward included: a
    ``y.backward()`` called after the block runs with the backend current then. A graph
    compiled inside the block keeps the backend it was traced with (``torch.compile``
    recompiles when it changes). Keep the backward inside the block to run both
    directions with one backend.
    """
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def get_compile_kernels() -> str:
    """How ``torch.compile`` reaches the TSRA kernels: ``"auto"``, ``"opaque"`` or
    ``"inline"`` (see :func:`~cobkern.ops.backend.compile_kernels_for` for what ``"auto"``
    picks)."""
    return _compile_kernels


def set_compile_kernels(mode: str) -> None:
    """Choose how compiled code reaches the TSRA kernels (process-wide; module docstring).

    ``"opaque"``: the custom ops, one dispatcher call each. ``"inline"``: the
    ``triton_op`` twins, whose kernel launches inductor generates itself. ``"auto"``: by
    device (:func:`~cobkern.ops.backend.compile_kernels_for`). Functions compiled before the
    change are recompiled on their next call (``torch.compile`` guards on it).
    """
    global _compile_kernels
    if mode not in COMPILE_KERNELS:
        raise ValueError(f"unknown compile-kernels mode {mode!r}; expected one of "
                         f"{COMPILE_KERNELS}")
    _compile_kernels = mode


def compile_kernels_for(x: torch.Tensor) -> str:
    """The ops compiled code takes for ``x``: the setting, with ``"auto"`` resolved to
    ``"inline"`` on every device (timed faster on a CPU and on an H200; module docstring).
    ``x`` is the op's input, for a choice by device should one measure better."""
    if _compile_kernels != "auto":
        return _compile_kernels
    return "inline"


@contextlib.contextmanager
def use_compile_kernels(mode: str) -> Iterator[None]:
    """Context manager form of :func:`set_compile_kernels`."""
    previous = get_compile_kernels()
    set_compile_kernels(mode)
    try:
        yield
    finally:
        set_compile_kernels(previous)


def use_triton(x: torch.Tensor, *, op: str, supported: bool = True,
               backend: str | None = None) -> bool:
    """Decide whether ``op`` on ``x`` runs the Triton kernel.

    Args:
        x: the op's main input.
        op: the op's name, for error messages.
        supported: ``False`` when the kernel does not handle this case (e.g. float64);
            the reference then runs under ``"auto"``.
        backend: the backend to apply; by default the current one (:func:`get_backend`).
    """
    backend = _backend if backend is None else backend
    if backend == "reference":
        return False
    if x.is_cuda:  # the common case first: no environment lookup, no device object
        interpreted = False
        runnable = triton_available()
    else:
        interpreted = x.device.type == "cpu" and interpreter_enabled()
        runnable = interpreted and triton_available()
    if runnable and interpreted:
        check_interpreter_compatible()
    if backend == "triton":
        if not runnable:
            raise RuntimeError(
                f"{op}: backend 'triton' was forced but Triton cannot run on {x.device} here "
                "(need a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors)"
            )
        if not supported:
            raise RuntimeError(f"{op}: backend 'triton' was forced but the kernel does not "
                               f"support this input (dtype {x.dtype}, shape {tuple(x.shape)})")
        return True
    return runnable and supported
