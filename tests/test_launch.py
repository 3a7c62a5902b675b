"""The fast kernel launch (``cobkern.kernels._launch``) against ``JITFunction.run``.

Without a GPU, a fake Triton driver (``fake_triton_driver.py``, run in a subprocess with the
interpreter off) compiles the kernels for sm_90 and records what each launch would pass to
the compiled kernel's C launcher. For every kernel family and variant, the fast path must
launch the same compiled kernel with the same arguments as Triton's own path — grid,
stream, function handle, packed metadata, launch metadata, hooks and every argument — on
its first call (which goes through the JIT) and on cache hits; a tensor 4 bytes off
16-byte alignment must get its own compiled kernel, as the JIT specialises on alignment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

from aot_tools import run_uninterpreted  # noqa: E402

from cobkern.kernels import _launch  # noqa: E402


@pytest.fixture(scope="module")
def comparison() -> dict:
    return run_uninterpreted("fake_triton_driver.py")


def test_fast_launch_passes_what_the_jit_passes(comparison):
    cases = comparison["cases"]
    assert len(cases) >= 14
    for name, c in cases.items():
        assert c["launches"] == 1, name
        assert c["same"], f"{name}: fast path launched {c['first_diff'][0]}, " \
                          f"the JIT {c['first_diff'][1]}"
        assert c["new_cache_entries"] == 1, f"{name}: one compiled kernel per launch key"


def test_alignment_gets_its_own_compiled_kernel(comparison):
    cases = comparison["cases"]
    aligned = cases["tsra-split-fp32-forward"]["kernels"]
    misaligned = cases["tsra-misaligned-forward"]["kernels"]
    assert aligned != misaligned, "a misaligned tensor reused the aligned specialisation"


def test_tensors_on_another_device_launch_there(comparison):
    """Triton launches on the current device; tensors on cuda:1 with cuda:0 current must
    still be launched on cuda:1, and cuda:0 stay current afterwards (both paths)."""
    for path, r in comparison["other_device"].items():
        assert r["launched_on"] == [1, 1], (path, r)
        assert r["current_after"] == 0, (path, r)


def test_a_full_cache_still_launches_but_keeps_nothing(comparison):
    assert comparison["capped"] == {"launches": 2, "cache_size": 0}


def test_an_int_passed_as_a_float_is_refused(comparison):
    msg = comparison["int_among_floats"]
    assert msg is not None and "floats must be Python floats" in msg, msg


def test_interpreter_falls_back_to_the_jit(device):
    """Under ``TRITON_INTERPRET=1`` (how the suite runs kernels on a CPU) the kernels are
    not ``JITFunction``s: launch() takes ``kernel[grid](...)`` and caches nothing."""
    if device.type != "cpu":
        pytest.skip("the interpreter runs CPU tensors")
    import cobkern
    from cobkern.ops import use_backend

    before = _launch.cache_size()
    with use_backend("triton"):
        y = cobkern.tsra(torch.randn(3, 10, 2, 2), 4)
    assert y.shape == (3, 10, 2, 2)
    assert _launch.cache_size() == before


def test_parameter_order_is_checked():
    """launch() passes the constexprs positionally after the tensors and scalars, so a
    kernel declared in another order is refused with the names, not launched wrongly."""
    def param(name, const):
        return types.SimpleNamespace(name=name, is_constexpr=const)

    good = types.SimpleNamespace(__name__="k", params=[
        param("X", False), param("n", False), param("B", True), param("A", True)])
    assert _launch._constexpr_values(good, 2, {"A": 1, "B": 2}) == (2, 1)
    bad = types.SimpleNamespace(__name__="k", params=[
        param("X", False), param("B", True), param("n", False), param("A", True)])
    with pytest.raises(TypeError, match=r"k: launch\(\) needs the tensors"):
        _launch._constexpr_values(bad, 2, {"A": 1, "B": 2})
    with pytest.raises(TypeError, match="constexprs"):
        _launch._constexpr_values(good, 2, {"A": 1})


def test_environment_switch_turns_the_fast_path_off():
    code = "from cobkern.kernels import _launch; print(_launch.FAST_LAUNCH)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = dict(os.environ, COBKERN_FAST_LAUNCH=value)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True).stdout.strip()
        assert out == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cached_launches_compute_what_jit_launches_compute_on_cuda(channels_last):
    """Natively: forward and backward through the launch cache (first call compiles
    through the JIT, the second is a cache hit) are bit-identical to launching through
    ``JITFunction.run`` every time, and the cache was used."""
    import cobkern

    x = torch.randn(16, 96, 6, 6, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)

    def run():
        xg = x.detach().requires_grad_(True)
        y = cobkern.rmsnorm_tsra(xg, 40)
        (dx,) = torch.autograd.grad(y, xg, dy)
        return y, dx

    default = _launch.FAST_LAUNCH
    try:
        _launch.FAST_LAUNCH = False
        y_jit, dx_jit = run()
        _launch.FAST_LAUNCH = True
        before = _launch.cache_size()
        run()
        y_fast, dx_fast = run()
        assert _launch.cache_size() > before or before > 0
    finally:
        _launch.FAST_LAUNCH = default
    assert torch.equal(y_fast, y_jit) and torch.equal(dx_fast, dx_jit)
