"""A fake Triton driver: the host side of a kernel launch, on a machine without a GPU.

With :func:`install`, Triton believes the current device is an sm_90 GPU: ``@triton.jit``
kernels compile for it (as in the ahead-of-time tests) and "load" without a driver, and the
compiled kernel's C launcher is replaced by a recorder that keeps the arguments of each
launch, tagged with the compiled kernel's hash. That is enough to compare two ways of
launching (``JITFunction.run`` and :func:`cobkern.kernels._launch.launch`) argument by
argument, and to time the host path of a launch on a CPU.

Run as a script (interpreter off; ``test_launch.py`` does this), it launches every kernel
family both ways and prints one JSON line with the comparison.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)

#: the arguments of every recorded launch, in order
calls: list[tuple] = []
#: record launches (timings turn it off: a growing list of tensors and launch metadata
#: makes Python's garbage collector, and so every call, slower)
RECORD = True
#: the current device at each recorded launch
devices: list[int] = []


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 2, 0, 0, 1024  # module, function, n_regs, n_spills, n_max_threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}


class _Launcher:
    """Stands in for a compiled kernel's C launcher; records (kernel hash, arguments)."""

    def __init__(self, src, metadata):
        self.kernel = getattr(metadata, "hash", None) or str(id(self))

    def __call__(self, *args):
        if RECORD:
            calls.append((self.kernel, *args))
            devices.append(FakeDriver.device)


class FakeDriver:
    """What ``JITFunction.run`` and ``CompiledKernel`` ask of the active driver."""

    utils = _Utils()
    launcher_cls = _Launcher
    device = 0  # the current device

    def get_current_device(self) -> int:
        return FakeDriver.device

    def set_current_device(self, device: int) -> None:
        FakeDriver.device = device

    def get_current_stream(self, device=None) -> int:
        return 1234

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def install() -> None:
    """Make :class:`FakeDriver` Triton's active driver (for this process)."""
    from triton.runtime import driver

    driver.set_active(FakeDriver())


def _norm(call: tuple) -> list:
    """A launch's arguments in comparable form: tensors by identity, the launch metadata
    by its contents, hooks by identity, everything else by value."""
    import torch

    out = []
    for a in call:
        if isinstance(a, torch.Tensor):
            out.append(("tensor", id(a), a.data_ptr()))
        elif type(a).__name__ == "LazyDict":
            out.append(("lazydict", sorted(a.get().items())))
        elif type(a).__name__ == "HookChain":
            out.append(("hook", id(a)))
        elif isinstance(a, tuple | int | float | bool | str) or a is None:
            out.append(a)
        else:
            out.append(("object", type(a).__name__, id(a)))
    return out


def _cases() -> list[tuple[str, Any]]:
    """``(name, fn)``: one launch of each kernel family and variant."""
    import torch

    from cobkern.kernels import covariance as kcov
    from cobkern.kernels import tsra as ktsra
    from cobkern.ops._checks import channel_geometry

    consts = (5.0, 0.5, 5.0, 0.7, 1e-12)
    cases = []
    for name, shape, cl, dtype, norm in (
            ("tsra-split-fp32", (8, 64, 4, 4), False, torch.float32, 0),
            ("rmsnorm-split-bf16", (8, 96, 3, 5), False, torch.bfloat16, 96),
            ("tsra-tile-nhwc-fp16", (8, 64, 4, 4), True, torch.float16, 0),
            ("rmsnorm-rows-fp32", (16, 4096), False, torch.float32, 5000),
            ("tsra-chunked-bf16", (4, 5000), False, torch.bfloat16, 0)):
        x = torch.randn(shape).to(dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        y, dy, dx = torch.empty_like(x), torch.randn_like(x), torch.empty_like(x)
        geo = channel_geometry(x, 1)
        split = geo.C // 2 - 1
        cases.append((f"{name}-forward", lambda x=x, y=y, geo=geo, split=split, n=norm:
                      ktsra.tsra_forward(x, y, geo, split, *consts, n, 1e-6)))
        cases.append((f"{name}-backward", lambda x=x, dy=dy, dx=dx, geo=geo, split=split,
                      n=norm: ktsra.tsra_backward(dy, x, dx, geo, split, *consts, n, 1e-6)))
    # with a bias (HAS_BIAS: one more pointer, float32 beside bf16 data)
    x = torch.randn(8, 64, 4, 4).to(torch.bfloat16)
    y, dy, dx = torch.empty_like(x), torch.randn_like(x), torch.empty_like(x)
    b = torch.randn(64)
    geo = channel_geometry(x, 1)
    cases.append(("rmsnorm-split-bias-forward", lambda x=x, y=y, geo=geo, b=b:
                  ktsra.tsra_forward(x, y, geo, 31, *consts, 64, 1e-6, bias=b)))
    cases.append(("rmsnorm-split-bias-backward", lambda x=x, dy=dy, dx=dx, geo=geo, b=b:
                  ktsra.tsra_backward(dy, x, dx, geo, 31, *consts, 64, 1e-6, bias=b)))
    # and the bias gradient's partial sums (BIAS_GRAD: one more float32 buffer), NCHW and
    # channels-last; the buffer made once, as tensors are compared by identity
    xc = x.to(memory_format=torch.channels_last)
    dyc, dxc = dy.to(memory_format=torch.channels_last), torch.empty_like(xc)
    for name, tensors, norm in (("rmsnorm-split-bias-grad", (dy, x, dx), 64),
                                ("tsra-tile-bias-grad", (dyc, xc, dxc), 0)):
        p = ktsra.plan("backward", channel_geometry(tensors[1], 1), 31, norm > 0, 2,
                       has_bias=True, bias_grad=True)
        assert p.constexprs["BIAS_GRAD"], name
        buf = ktsra.bias_grad_buffer(p, "cpu")
        cases.append((f"{name}-backward", lambda p=p, t=tensors, n=norm, buf=buf, b=b:
                      ktsra.run(p, t, *consts, n, 1e-6, b, buf)))
    # a tensor whose data pointer is 4 bytes past 16-byte alignment: another specialisation
    base = torch.randn(8 * 64 * 16 + 1)
    x = base[1:].view(8, 64, 4, 4)
    y = torch.empty(8 * 64 * 16 + 1)[1:].view(8, 64, 4, 4)
    geo = channel_geometry(x, 1)
    cases.append(("tsra-misaligned-forward", lambda x=x, y=y, geo=geo:
                  ktsra.tsra_forward(x, y, geo, 31, *consts, 0, 0.0)))
    for name, shape, dtype, f32_dot in (("cov-fp32", (4, 64, 4, 4), torch.float32, None),
                                        ("cov-fp64-products", (4, 64, 4, 4), torch.float32,
                                         "fp64"),
                                        ("cov-bf16-rows", (40, 96), torch.bfloat16, None)):
        x = torch.randn(shape).to(dtype)
        geo = channel_geometry(x, 1)
        split = geo.C // 2
        packed = torch.zeros(split**2 + (geo.C - split) ** 2, dtype=torch.float64)
        sa = torch.zeros(geo.C, dtype=torch.float64)
        sq = torch.zeros(geo.C, dtype=torch.float64)
        cases.append((name, lambda x=x, geo=geo, split=split, packed=packed, sa=sa, sq=sq,
                      d=f32_dot: kcov.subspace_moments(x, geo, split, packed, sa, sq,
                                                       mirror=False, f32_dot=d)))
    return cases


def compare() -> dict:
    """Launch every case through ``JITFunction.run`` and then through the fast path (its
    first call compiles through the JIT, the next two are cache hits); report whether
    the recorded launcher arguments are identical."""
    from cobkern.kernels import _launch

    out = {"cases": {}, "cache_size": 0}
    for name, fn in _cases():
        _launch.FAST_LAUNCH = False
        calls.clear()
        fn()
        jit = [_norm(c) for c in calls]
        _launch.FAST_LAUNCH = True
        before = _launch.cache_size()
        calls.clear()
        fn()
        fn()
        fn()
        fast = [_norm(c) for c in calls]
        out["cases"][name] = {
            "launches": len(jit),
            "kernels": [c[0] for c in jit],
            "same": len(fast) == 3 * len(jit) and all(f == j for f, j in zip(
                fast, jit * 3, strict=True)),
            "new_cache_entries": _launch.cache_size() - before,
            "first_diff": next(([str(f), str(j)] for f, j in zip(fast, jit * 3, strict=False)
                                if f != j), None),
        }
    out["cache_size"] = _launch.cache_size()
    out["int_among_floats"] = _int_among_floats()
    out["other_device"] = _other_device()
    out["capped"] = _capped()
    return out


def _other_device() -> dict:
    """Tensors on device 1 while device 0 is current (``Tensor.get_device`` patched: the
    tensors here are CPU tensors): each launch must run with device 1 current, on both
    paths, and leave device 0 current."""
    import torch

    from cobkern.kernels import _launch

    fn = _cases()[0][1]
    original = torch.Tensor.get_device
    out = {}
    try:
        torch.Tensor.get_device = lambda self: 1
        for label, fast in (("jit", False), ("fast", True)):
            _launch.FAST_LAUNCH = fast
            devices.clear()
            fn()
            fn()
            out[label] = {"launched_on": list(devices), "current_after": FakeDriver.device}
    finally:
        torch.Tensor.get_device = original
        _launch.FAST_LAUNCH = True
    return out


def _int_among_floats() -> str | None:
    """Floats are not part of the fast path's key, so an int passed as one (which the JIT
    would specialise as ``i32``) must be refused; returns the error message."""
    import torch

    from cobkern.kernels import _launch
    from cobkern.kernels import tsra as ktsra
    from cobkern.ops._checks import channel_geometry

    x = torch.randn(2, 8)
    geo = channel_geometry(x, 1)
    kernel, cx, warps, nblocks = ktsra.specialization(geo.C, geo.P, 3, True, "forward", False)
    args = ((geo.C, geo.P, 3, nblocks, geo.stride_b, geo.stride_c, geo.stride_p),)
    # first with floats (a cached entry for this launch), then an int among them: refused
    # on a key that is otherwise already cached, not launched with the float signature
    ptrs = (x, torch.empty_like(x), x)  # x, y and the (unused) bias pointer
    _launch.launch(kernel, (nblocks * geo.B,), ptrs, *args,
                   (5.0, 0.5, 5.0, 0.7, 1e-12, 0.0, 0.0), cx, warps)
    try:
        _launch.launch(kernel, (nblocks * geo.B,), ptrs, *args,
                       (5, 0.5, 5.0, 0.7, 1e-12, 0.0, 0.0), cx, warps)
    except TypeError as e:
        return str(e)
    return None


def _capped() -> dict:
    """With the cache full, a new key still launches (through the JIT) but is not kept."""
    from cobkern.kernels import _launch

    fn = _cases()[0][1]
    full, n = _launch.MAX_ENTRIES, _launch.cache_size()
    calls.clear()
    try:
        _launch.MAX_ENTRIES = n
        _launch.clear_cache()
        _launch.MAX_ENTRIES = 0
        fn()
        fn()
    finally:
        _launch.MAX_ENTRIES = full
    return {"launches": len(calls), "cache_size": _launch.cache_size()}


def timing(n: int = 3000) -> dict:
    """Host µs per launch of the smallest TSRA case, through the JIT and the fast path."""
    from cobkern.kernels import _launch

    global RECORD
    fn = _cases()[0][1]
    res = {}
    RECORD = False
    for label, fast in (("jit_us", False), ("fast_us", True)):
        _launch.FAST_LAUNCH = fast
        for _ in range(100):
            fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        res[label] = (time.perf_counter() - t) / n * 1e6
    RECORD = True
    return res


if __name__ == "__main__":
    install()
    result = compare()
    if "--timing" in sys.argv:
        result["timing"] = timing()
    print(json.dumps(result))
