"""Launching a ``@triton.jit`` kernel with less host work per call.

``kernel[grid](*args, **constexprs)`` goes through ``JITFunction.run``, which on every call
binds and specialises each argument, hashes the specialisation into a cache key, checks the
kernel's global variables and only then calls the compiled kernel's C launcher. On this
project's 2-core CPU (triton 3.8, the C launch itself replaced by a no-op) that is ~9 µs
per launch against ~0.6 µs for the launcher call alone, and TSRA makes two launches per
forward+backward: at the small VGG-16 layers, whose kernels take microseconds, host time
is what an eager call costs (``BENCHMARKS.md``).

:func:`launch` keeps its own cache of compiled kernels, keyed on exactly what the JIT
specialises on for cobkern's kernels — the device, each tensor's dtype and whether its data
pointer is 16-byte aligned, the integer arguments (Triton specialises on ``== 1``, on
divisibility by 16 and on their range, so the values themselves are keyed), the
constexprs, ``num_warps`` / ``num_stages`` and the debug / instrumentation knobs — and calls
the compiled kernel's launcher directly with the argument tuple ``JITFunction.run`` would
pass (``tests/test_launch.py`` records both paths' launcher arguments through a fake driver
and requires them to be identical, for triton 3.6 and 3.8 alike). The first call of each
key goes through ``JITFunction.run`` (which compiles, or loads from Triton's disk cache)
and its compiled kernel is kept.

Floats are keyed by type, not value: Triton passes Python floats as ``fp32`` arguments
whatever their value (an int among them is refused). Launch hooks
(``knobs.runtime.launch_enter_hook``, used by profilers) are honoured. At most
:data:`MAX_ENTRIES` compiled kernels are kept.

Device: Triton launches on the *current* CUDA device. When the tensors live on another one
(a model moved to ``cuda:1`` while ``cuda:0`` is current), :func:`launch` makes their device
current for the launch and restores the previous one, on every path.

Falls back to the plain ``kernel[grid](...)`` under the Triton interpreter, when
``COBKERN_FAST_LAUNCH=0`` is set in the environment (read at import), and with a Triton
whose compiled kernels do not have the launch interface used here. Not seen by the fast
path: a kernel's ``pre_run_hooks`` and Triton's compilation-inspection hooks
(``knobs.runtime.add_stages_inspection_hook``) set after a key's first launch — debugging
tools; run them with ``COBKERN_FAST_LAUNCH=0``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

__all__ = ["launch", "FAST_LAUNCH", "MAX_ENTRIES", "cache_size", "clear_cache"]

#: Whether :func:`launch` may bypass ``JITFunction.run`` (``COBKERN_FAST_LAUNCH=0``: never).
FAST_LAUNCH = os.environ.get("COBKERN_FAST_LAUNCH", "1") != "0"

_cache: dict[tuple, Any] = {}
#: Entries kept at most (int arguments are keyed, so every new batch size of a layer is a
#: new key); past it, new keys launch through ``JITFunction.run`` every time.
MAX_ENTRIES = 4096
_runtime: tuple | None = None  # (driver config, knobs, JITFunction), resolved on first use


def _triton_runtime() -> tuple | None:
    """``(triton.runtime.driver, triton.knobs, JITFunction)``, or ``None`` where the fast
    path cannot run."""
    global _runtime
    if _runtime is None:
        try:
            from triton import knobs
            from triton.runtime import driver
            from triton.runtime.jit import JITFunction
        except ImportError:  # a Triton without knobs / the driver config (< 3.4)
            _runtime = ()
        else:
            _runtime = (driver, knobs, JITFunction)
    return _runtime or None


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, t.data_ptr() % 16 == 0)


def launch(kernel: Any, grid: tuple[int, ...], tensors: tuple[torch.Tensor, ...],
           ints: tuple[int, ...], floats: tuple[float, ...], constexprs: dict[str, Any],
           num_warps: int, num_stages: int | None = None) -> None:
    """Launch ``kernel[grid](*tensors, *ints, *floats, num_warps=..., **constexprs)``.

    Args:
        kernel: the ``@triton.jit`` function; its parameters must be the tensors, the ints,
            the floats and then the constexprs, in that order.
        grid: up to three program counts.
        tensors: the pointer arguments.
        ints: the integer arguments (keyed by value: Triton specialises on them).
        floats: the float arguments (not keyed: always passed as ``fp32``).
        constexprs: every ``tl.constexpr`` parameter by name.
        num_warps, num_stages: launch options (``num_stages=None``: Triton's default).
    """
    rt = _triton_runtime()
    if rt is None or not isinstance(kernel, rt[2]):  # interpreter (CPU tensors), old Triton
        index = tensors[0].get_device()
        with torch.cuda.device(index) if index >= 0 else contextlib.nullcontext():
            _jit_launch(kernel, grid, tensors, ints + floats, constexprs, num_warps,
                        num_stages)
        return
    driver = rt[0]
    device = driver.active.get_current_device()
    index = tensors[0].get_device()
    if index != device and index >= 0:
        # Triton launches on the current device: switch to the tensors' one (a model on
        # cuda:1 while cuda:0 is current) and back, as a device guard would
        driver.active.set_current_device(index)
        try:
            launch(kernel, grid, tensors, ints, floats, constexprs, num_warps, num_stages)
        finally:
            driver.active.set_current_device(device)
        return
    if not FAST_LAUNCH:
        _jit_launch(kernel, grid, tensors, ints + floats, constexprs, num_warps, num_stages)
        return
    knobs = rt[1]
    # id(kernel): hashing a JITFunction computes its source cache key (microseconds); the
    # entry keeps the kernel itself, so a reused id (a kernel garbage-collected and another
    # allocated at its address) is a miss, not a launch of the wrong kernel
    # the floats' types, not their values: an int among them would be another signature
    key = (id(kernel), device, num_warps, num_stages, knobs.runtime.debug,
           knobs.compilation.instrumentation_mode, tuple(constexprs.values()), ints,
           tuple(map(_tensor_key, tensors)), tuple(map(type, floats)))
    entry = _cache.get(key)
    if entry is None or entry[2] is not kernel:
        if any(type(v) is not float for v in floats):
            raise TypeError(f"{kernel.__name__}: launch() floats must be Python floats (they "
                            f"are not keyed), got {[type(v).__name__ for v in floats]}")
        compiled = _jit_launch(kernel, grid, tensors, ints + floats, constexprs, num_warps,
                               num_stages)
        if hasattr(compiled, "result"):  # triton 3.6: a future under async compilation
            compiled = compiled.result()
        if len(_cache) < MAX_ENTRIES and all(hasattr(compiled, a) for a in (
                "run", "function", "packed_metadata", "launch_metadata")):
            _cache[key] = (compiled, _constexpr_values(
                kernel, len(tensors) + len(ints) + len(floats), constexprs), kernel)
        return
    compiled, cvals, _ = entry
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    args = (*tensors, *ints, *floats, *cvals)
    stream = driver.active.get_current_stream(device)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *args),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)


def _constexpr_values(kernel: Any, n_runtime: int, constexprs: dict[str, Any]) -> tuple:
    """The constexprs in the kernel's parameter order, after checking that its first
    ``n_runtime`` parameters are the runtime ones and the rest exactly ``constexprs``."""
    params = list(kernel.params)
    runtime = [p.name for p in params[:n_runtime] if not p.is_constexpr]
    names = [p.name for p in params[n_runtime:] if p.is_constexpr]
    if len(runtime) != n_runtime or len(names) != len(params) - n_runtime or \
            set(names) != set(constexprs):
        raise TypeError(f"{kernel.__name__}: launch() needs the tensors, ints and floats, "
                        f"then the constexprs {sorted(constexprs)} as its parameters, got "
                        f"{[p.name for p in params]}")
    return tuple(constexprs[n] for n in names)


def _jit_launch(kernel, grid, tensors, scalars, constexprs, num_warps, num_stages):
    """The plain ``kernel[grid](...)``; returns what ``JITFunction.run`` returns (the
    compiled kernel) or ``None`` under the interpreter."""
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return kernel[grid](*tensors, *scalars, **options, **constexprs)


def cache_size() -> int:
    """Compiled kernels held by the fast path."""
    return len(_cache)


def clear_cache() -> None:
    """Forget the fast path's compiled kernels (the next launch of each goes through the JIT)."""
    _cache.clear()
