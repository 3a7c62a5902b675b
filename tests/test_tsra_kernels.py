"""The TSRA / RMSNorm→TSRA ops against an independent float64 reference.

Runs the real Triton kernels (natively on a GPU, under ``TRITON_INTERPRET=1`` on a CPU)
and the plain-PyTorch reference path, forward and backward, over shapes that stress the
tiling: odd C, C not a power of two, large C, tiny and unbalanced splits, position counts
that are not a multiple of the tile, NCHW / channels_last / 2-D, and three dtypes.

Tolerances: the float64 reference is evaluated at the *same rounded input* the op sees,
so the error is float32 accumulation plus one rounding of the output to the storage dtype.
float32: rtol 1e-5 / atol 1e-5 (sums of up to a few thousand terms in fp32);
bfloat16: rtol 2^-7 (two bf16 ulps) / atol 1e-2; float16: rtol 2^-9 / atol 2e-3.
"""

from __future__ import annotations

import pytest
import torch
from reference64 import tsra64_grad

import cobkern
from cobkern.ops import rmsnorm_tsra, rmsnorm_tsra_backward, tsra, tsra_backward

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-2),
    torch.float16: dict(rtol=2**-9, atol=2e-3),
}

# (shape, split, dim, layout)
CASES = [
    ((3, 7, 5, 3), 3, 1, "nchw"),  # odd C, P=15 not a multiple of the tile
    ((3, 7, 5, 3), 3, 1, "channels_last"),
    ((2, 12, 4, 4), 1, 1, "nchw"),  # tiny U
    ((2, 12, 4, 4), 11, 1, "channels_last"),  # tiny V
    ((2, 300, 3, 3), 150, 1, "nchw"),  # C not a power of two, >256
    ((2, 64, 6, 6), 32, 1, "channels_last"),  # VGG-like power-of-two C (unmasked channels)
    ((3, 80, 5, 3), 32, 1, "channels_last"),  # 16-aligned split (split kernels), masked V
    ((3, 10, 2, 2), 4, 1, "nchw"),  # 2×2 map: short rows compiled as constants, masked C
    ((2, 16, 2, 4), 8, 1, "nchw"),  # 8-position rows, unmasked C
    ((5, 6, 2), 3, 1, "nchw"),  # 2-position rows
    ((37, 64), 32, 1, "2d"),  # linear layer, rows not a multiple of the tile
    ((7, 40), 16, 1, "2d"),  # rows with a 16-aligned split and a masked V block
    ((5, 1000), 600, 1, "2d"),  # unbalanced, large C
    ((6, 10), 4, 0, "2d"),  # channels on dim 0
    ((2, 3, 9), 5, 2, "nchw"),  # channels on the last dim of a 3-D tensor
]


def _make(shape, layout, dtype, device):
    x = torch.randn(shape, dtype=torch.float32) * 1.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x.to(device=device, dtype=dtype)


def _ids(case):
    shape, split, dim, layout = case
    return f"{layout}-{'x'.join(map(str, shape))}-s{split}-d{dim}"


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_forward_backward_match_float64(case, dtype, backend, fused, device):
    shape, split, dim, layout = case
    x = _make(shape, layout, dtype, device)
    dy = torch.randn(shape).to(device=device, dtype=dtype)
    kw = dict(norm_size=None, rms_eps=1e-6) if fused else {}
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), split, dim, **kw)
    with cobkern.use_backend(backend):
        if fused:
            y = rmsnorm_tsra(x, split, dim)
            dx = rmsnorm_tsra_backward(dy, x, split, dim)
        else:
            y = tsra(x, split, dim)
            dx = tsra_backward(dy, x, split, dim)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert dx.dtype == dtype and dx.stride() == x.stride()
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[dtype])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_normaliser_size_and_constants(backend, device):
    """A pruned model keeps its original width as RMS normaliser; custom gain constants."""
    x = torch.randn(4, 24, 3, 3, device=device)
    dy = torch.randn_like(x)
    consts = dict(a_u=3.0, b_u=0.4, a_v=7.0, b_v=0.8)
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), 10, 1, norm_size=64, rms_eps=1e-5,
                            eps=1e-9, **consts)
    with cobkern.use_backend(backend):
        y = rmsnorm_tsra(x, 10, eps=1e-5, norm_size=64, tsra_eps=1e-9, **consts)
        dx = rmsnorm_tsra_backward(dy, x, 10, eps=1e-5, norm_size=64, tsra_eps=1e-9, **consts)
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[torch.float32])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[torch.float32])


@pytest.mark.parametrize("fused", [False, True])
def test_autograd_through_op_matches_explicit_backward(fused, device):
    x = torch.randn(3, 20, 4, 4, device=device, requires_grad=True)
    fn = rmsnorm_tsra if fused else tsra
    bwd = rmsnorm_tsra_backward if fused else tsra_backward
    y = fn(x, 7)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, bwd(dy, x.detach(), 7), rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape, split, layout",
    [((2, 16384), 5000, "2d"),  # chunked, channel count a multiple of the chunk
     ((3, 5000), 4500, "2d"),  # chunked, ragged last chunk
     ((2, 4100, 3, 1), 7, "nchw"),  # chunked, channel-major
     ((2, 4096, 1, 2), 2048, "channels_last"),  # widest single tile
     # C = MAX_TILE_CHANNELS + 1, the narrowest chunked layer: the last channel chunk (4096
     # wide forward, 2048 backward) holds one channel, which a chunk loop stopping one short
     # (range(0, C - 1, BLOCK_C)) skips and the widths above cannot tell (found by mutation
     # testing); with split 4096 that one channel is all of V
     ((3, 4097), 4096, "2d"),
     ((2, 4097, 2, 1), 2048, "nchw")],
    ids=["2d-16384", "2d-5000", "nchw-4100", "nhwc-4096", "2d-4097-s4096", "nchw-4097"],
)
@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_wide_channels(shape, split, layout, fused, device):
    """Wide layers (up to a 16,384-wide linear) take the chunked kernels; same results.
    Tolerances: float64 reference, float32 sums of up to 16k terms."""
    x = _make(shape, layout, torch.float32, device)
    dy = torch.randn(shape).to(device)
    kw = dict(norm_size=None, rms_eps=1e-6) if fused else {}
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), split, 1, **kw)
    with cobkern.use_backend("triton"):
        fn, bwd = (rmsnorm_tsra, rmsnorm_tsra_backward) if fused else (tsra, tsra_backward)
        y = fn(x, split)
        dx = bwd(dy, x, split)
    torch.testing.assert_close(y.cpu().double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.cpu().double(), dx64, rtol=1e-5, atol=1e-6)


def test_wide_channel_cases_straddle_the_tile_limit():
    """test_wide_channels' 4096 and 4097 cases sit on either side of the tile kernels'
    limit only while it is 4096: move them with it."""
    from cobkern.kernels.tsra import MAX_TILE_CHANNELS

    assert MAX_TILE_CHANNELS == 4096


def test_float64_runs_reference_and_forced_triton_refuses(device):
    x = torch.randn(3, 6, dtype=torch.float64, device=device)
    y64, _ = tsra64_grad(x.cpu(), torch.ones_like(x).cpu(), 2, 1)
    torch.testing.assert_close(tsra(x, 2).cpu(), y64, rtol=1e-12, atol=1e-12)
    with cobkern.use_backend("triton"), pytest.raises(RuntimeError, match="does not support"):
        tsra(x, 2)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_non_contiguous_input_and_mixed_layout_grad(backend, device):
    x = torch.randn(4, 6, 3, 10, device=device).transpose(2, 3)  # (4, 6, 10, 3), H/W swapped
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 6, 10, 3, device=device).to(memory_format=torch.channels_last)
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), 2, 1)
    with cobkern.use_backend(backend):
        y = tsra(x, 2)
        dx = tsra_backward(dy, x.contiguous(), 2)  # grad channels_last, x NCHW
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[torch.float32])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[torch.float32])


def test_empty_input(device):
    x = torch.randn(0, 8, 3, 3, device=device)
    assert tsra(x, 4).shape == x.shape


#: the tile sweep's override kinds (``bench/gpu_diag.py``): (tile elements, elements per
#: thread, warps, VEC_P) — a 1-warp tile, capped position vectors, a 2-warp tile
TUNINGS = [(1024, 32, 1, 2), (2048, 64, 1, 4), (512, 16, 1, 2), (1024, 16, 2, 0)]


@pytest.mark.parametrize("tuning", TUNINGS, ids=lambda t: "-".join(map(str, t)))
@pytest.mark.parametrize("shape, split, layout", [((2, 64, 6, 6), 32, "nchw"),
                                                  ((2, 40, 5, 3), 13, "nchw"),
                                                  ((2, 64, 4, 4), 32, "channels_last")],
                         ids=["nchw-64", "nchw-odd", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sweep_overrides_compute_the_same_function(tuning, shape, split, layout, dtype,
                                                   device):
    """Tile, warp and vector-width overrides change how a program covers the tensor (and on
    a GPU the compiled layout), never the result: RMSNorm→TSRA forward and backward against
    float64, with the same tolerances as the shipped launch."""
    from cobkern.kernels import tsra as k
    from cobkern.ops._checks import channel_geometry

    x = _make(shape, layout, dtype, device)
    dy = torch.randn(shape).to(device=device, dtype=dtype)
    if layout == "channels_last":
        dy = dy.to(memory_format=torch.channels_last)
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), split, 1, norm_size=None, rms_eps=1e-6)
    tile, ept, warps, vec_p = tuning
    over = dict(tile_elems=tile, elems_per_thread=ept, num_warps=warps, vec_p=vec_p)
    geo = channel_geometry(x, 1)
    consts = (5.0, 0.5, 5.0, 0.7, 1e-12, shape[1], 1e-6)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    k._launch("forward", (x, y), geo, split, *consts, **over)
    k._launch("backward", (dy, x, dx), geo, split, *consts, **over)
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[dtype])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[dtype])


def _double_backward_case(fn, x0, split, as_parameter):
    """``d/dx [sum(y) + ||d(sum y²)/dx||²]``: a gradient penalty, i.e. second order."""
    x = torch.nn.Parameter(x0.clone()) if as_parameter else x0.clone().requires_grad_(True)
    y = fn(x, split)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(y.sum() + dx.square().sum(), x)
    return y, dx, g


@pytest.mark.parametrize("route", ["fast", "op"])
@pytest.mark.parametrize("shape, split", [((2, 6, 3, 3), 2), ((5, 9), 4)], ids=["nchw", "2d"])
@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_double_backward_on_kernel_path_matches_float64(fused, shape, split, route, device):
    """create_graph=True through the Triton path keeps every second-order term.

    route "fast" is the eager autograd.Function, "op" the registered custom op (an
    nn.Parameter input takes it). Before the fix the kernel's dx had no graph and the
    penalty's gradient was off by ~20 (the first-order part only). Tolerance rtol/atol 1e-4:
    float32 first-order kernel output and a float32 reference second-order formula against
    float64 autograd, a few float32 ulps of entries up to ~20, accumulated over C channels.
    """
    kw64 = dict(norm_size=None, rms_eps=1e-6) if fused else {}
    fn = rmsnorm_tsra if fused else tsra
    x0 = (torch.randn(shape) * 1.5).to(device)
    with cobkern.use_backend("triton"):
        y, dx, g = _double_backward_case(fn, x0, split, route == "op")
        # the first-order value is the kernel's, bit for bit, with or without create_graph
        x1 = x0.clone().requires_grad_(True)
        (dx1,) = torch.autograd.grad(fn(x1, split).square().sum(), x1)
    assert dx.grad_fn is not None and not dx1.requires_grad
    assert torch.equal(dx.detach(), dx1)
    from reference64 import tsra64

    x64 = x0.cpu().double().requires_grad_(True)
    y64 = tsra64(x64, split, **kw64)
    (dx64,) = torch.autograd.grad(y64.square().sum(), x64, create_graph=True)
    (g64,) = torch.autograd.grad(y64.sum() + dx64.square().sum(), x64)
    torch.testing.assert_close(dx.detach().cpu().double(), dx64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.cpu().double(), g64, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- layout and
# boundary cases that the tests above let through (found by mutation testing)
@pytest.mark.parametrize("shape, split", [((3, 7, 5, 3), 3), ((2, 12, 4, 4), 11),
                                          ((2, 64, 6, 6), 32), ((2, 4096, 1, 2), 2048)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"s{v}")
@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_channels_last_backward_with_channels_last_grad(shape, split, fused, device):
    """In test_forward_backward_match_float64 and test_wide_channels ``dy`` is NCHW, so a
    channels_last ``x`` sends the backward through the mixed-layout fallback (a contiguous
    copy, the channel-major kernels). Here ``dy`` shares ``x``'s layout and the channels-last
    tile backward runs in place — at C = 4096 too, the widest tile, whose backward must not
    take the chunked kernels' 2048-channel block. float32 tolerances of the module docstring
    (float64 reference at the same input)."""
    from cobkern.ops._checks import channel_geometry

    x = _make(shape, "channels_last", torch.float32, device)
    dy = _make(shape, "channels_last", torch.float32, device)
    geo = channel_geometry(x, 1)
    assert geo.channels_contig and channel_geometry(dy, 1) == geo  # no fallback copy
    kw = dict(norm_size=None, rms_eps=1e-6) if fused else {}
    _, dx64 = tsra64_grad(x.cpu(), dy.cpu(), split, 1, **kw)
    with cobkern.use_backend("triton"):
        dx = (rmsnorm_tsra_backward if fused else tsra_backward)(dy, x, split)
    assert dx.stride() == x.stride()
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_channels_last_tensor_with_channels_on_another_axis(dim, fused, backend, device):
    """A channels_last 4-D tensor whose TSRA axis is not dim 1 is neither channel-major nor
    channels-last for that axis: it must not be read with dim 1's NHWC geometry (8 channels
    at unit stride) but through a contiguous copy. Both axes are shorter than dim 1, so that
    geometry would stay in bounds and give wrong values rather than crash. float32
    tolerances of the module docstring against the float64 reference."""
    shape = (2, 8, 3, 5)
    split = shape[dim] // 2
    x = _make(shape, "channels_last", torch.float32, device)
    dy = torch.randn(shape).to(device=device).to(memory_format=torch.channels_last)
    kw = dict(norm_size=None, rms_eps=1e-6) if fused else {}
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), split, dim, **kw)
    with cobkern.use_backend(backend):
        fn, bwd = (rmsnorm_tsra, rmsnorm_tsra_backward) if fused else (tsra, tsra_backward)
        y = fn(x, split, dim)
        dx = bwd(dy, x, split, dim)
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[torch.float32])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("shape", [(3, 12, 3, 3), (20, 12)], ids=["nchw", "2d"])
def test_fused_backward_with_a_large_tsra_eps(shape, backend, device):
    """The fused backward's term ``q (k_U s_U'² + k_V s_V'²)`` in ``w`` equals, up to powers
    of q, ``t s_U eps / (s + eps)``: with the default tsra_eps = 1e-12 it vanishes (the gains
    are scale-invariant), so only a tsra_eps comparable to the normalised norm (s ≈ sqrt(12)
    here) shows whether it is right. float32 tolerances against the float64 reference."""
    x = torch.randn(shape, device=device) * 1.5
    dy = torch.randn_like(x)
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), 5, 1, norm_size=None, rms_eps=1e-6, eps=0.5)
    with cobkern.use_backend(backend):
        y = rmsnorm_tsra(x, 5, tsra_eps=0.5)
        dx = rmsnorm_tsra_backward(dy, x, 5, tsra_eps=0.5)
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[torch.float32])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("shape", [(4, 24, 3, 3), (30, 24)], ids=["nchw", "2d"])
def test_plain_tsra_custom_constants_and_eps_match_float64(shape, backend, device):
    """test_normaliser_size_and_constants covers the constants of the fused op only, and the
    plain-TSRA gradchecks compare the op with its own finite differences: here tsra and the
    explicit tsra_backward, with distinct a_U/a_V and b_U/b_V and an eps (0.5) that moves r
    (||x|| ≈ 7), against the float64 reference. float32 tolerances of the module docstring."""
    x = torch.randn(shape, device=device) * 1.5
    dy = torch.randn_like(x)
    consts = dict(a_u=3.0, b_u=0.4, a_v=7.0, b_v=0.8, eps=0.5)
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), 10, 1, **consts)
    with cobkern.use_backend(backend):
        y = tsra(x, 10, **consts)
        dx = tsra_backward(dy, x, 10, **consts)
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[torch.float32])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("tiny", ["u", "all"])
@pytest.mark.parametrize("shape, split, layout", [
    ((2, 12, 4, 4), 3, "nchw"),  # split kernels
    ((3, 7, 5, 3), 3, "channels_last"),  # single tile (unaligned split)
    ((37, 64), 32, "2d"),
    ((2, 4100), 3, "2d"),  # chunked (C > MAX_TILE_CHANNELS)
], ids=["nchw", "nhwc", "2d", "chunked"])
@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_subnormal_squared_norms_keep_the_norms_gradient(fused, shape, split, layout, tiny,
                                                         backend, device):
    """x_U (or all of x) with entries of 0.5e-20 to 1.5e-20: the float32 squared norm is
    subnormal, but the gradient of ||x_U|| is still the unit vector x_U / ||x_U|| — an O(1)
    term of dx_U. The kernels take each norm and its inverse from one ``rsqrt``, which on
    the GPU (``rsqrt.approx.ftz``) flushes a subnormal input to zero; they scale such an
    input first, so the term is kept (treating the norm as 0 fails here in the interpreter
    too: the last assertion). float32 tolerances of the module docstring: the subnormal
    sums of squares still hold 15 or more significant bits at this size."""
    x = _make(shape, layout, torch.float32, device)
    tiny_part = x if tiny == "all" else x.narrow(1, 0, split)
    tiny_part.copy_((torch.rand(tiny_part.shape) + 0.5) * torch.randn(tiny_part.shape).sign()
                    * 1e-20)
    s2u = x.narrow(1, 0, split).double().square().sum(1)
    assert (s2u > 0).all() and (s2u < 1.1754943508222875e-38).all()  # subnormal in float32
    dy = torch.randn(shape).to(device)
    kw = dict(norm_size=None, rms_eps=1e-6) if fused else {}
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), split, 1, **kw)
    with cobkern.use_backend(backend):
        if fused:
            y, dx = rmsnorm_tsra(x, split), rmsnorm_tsra_backward(dy, x, split)
        else:
            y, dx = tsra(x, split), tsra_backward(dy, x, split)
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[torch.float32])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[torch.float32])
    if tiny == "u":  # the kept term is far above the tolerance: x_U = 0 gives another dx
        x0 = x.cpu().clone()
        x0.narrow(1, 0, split).zero_()
        assert (tsra64_grad(x0, dy.cpu(), split, 1, **kw)[1] - dx64).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("scale, rms_eps", [(1e16, 1e-6), (1e-14, 0.0)], ids=["large", "tiny"])
@pytest.mark.parametrize("shape, split, layout", [
    ((2, 12, 4, 4), 5, "nchw"),  # split kernels
    ((3, 7, 5, 3), 3, "channels_last"),  # single tile (unaligned split)
    ((2, 4100), 3, "2d"),  # chunked (C > MAX_TILE_CHANNELS)
], ids=["nchw", "nhwc", "chunked"])
def test_fused_backward_across_the_float32_range(shape, split, layout, scale, rms_eps,
                                                 backend, device):
    """The RMSNorm term of the fused backward is ``q³ w / n`` with ``q = 1/RMS(x)``: formed
    as ``q²·q`` it underflowed to 0 in float32 for an RMS beyond ~1e13 (dx 19 % off at 1e16,
    inside the documented range ||x|| < 1.8e19) and overflowed to inf below ~1e-13 with
    rms_eps = 0 (dx inf, the true dx ~1e14). Compared relative to max|dx| (the values are
    1e-16 / 1e14, where the suite's absolute tolerance means nothing) at float32's 1e-5."""
    x = _make(shape, layout, torch.float32, device) * scale
    dy = torch.randn(shape).to(device)
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), split, 1, norm_size=None, rms_eps=rms_eps)
    with cobkern.use_backend(backend):
        y = rmsnorm_tsra(x, split, eps=rms_eps)
        dx = rmsnorm_tsra_backward(dy, x, split, eps=rms_eps)
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[torch.float32])
    err = (dx.cpu().double() - dx64).abs().max() / dx64.abs().max()
    assert err <= 1e-5, err


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_smallest_rms_normaliser_is_still_rmsnorm(backend, device):
    """norm_size = 1 (x / sqrt(sum(x²) + eps)) is the smallest valid normaliser and must
    still normalise: "RMSNorm on" is norm_size > 0 in the raw op, and a launcher testing
    ``> 1`` would run plain TSRA. float32 tolerances against the float64 reference."""
    x = torch.randn(3, 10, 2, 3, device=device) * 1.5
    dy = torch.randn_like(x)
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), 4, 1, norm_size=1, rms_eps=1e-6)
    with cobkern.use_backend(backend):
        y = rmsnorm_tsra(x, 4, norm_size=1)
        dx = rmsnorm_tsra_backward(dy, x, 4, norm_size=1)
    torch.testing.assert_close(y.cpu().double(), y64, **TOL[torch.float32])
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[torch.float32])


def test_launch_plans_are_made_once_per_layout_and_cached_within_bounds(monkeypatch, device):
    """The eager path plans a launch (geometry, tuning lookup, kernel choice) once per
    (direction, shape, strides, dtype, device, split, ...), then reuses it; another layout of
    the same shape gets plans of its own; past the cache's bound launches are planned each
    time — with the same results (float64 reference, the suite's float32 tolerance)."""
    import importlib

    from cobkern.kernels import tsra as k

    ops = importlib.import_module("cobkern.ops.tsra")
    made = []
    original = k.plan

    def spy(direction, *args, **kw):
        made.append(direction)
        return original(direction, *args, **kw)

    monkeypatch.setattr(k, "plan", spy)
    monkeypatch.setattr(ops, "_PLANS", {})
    x = torch.randn(3, 20, 4, 5, device=device)
    dy = torch.randn_like(x)
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), 7, 1)

    def check(xx, dd):
        xg = xx.detach().requires_grad_(True)
        y = tsra(xg, 7)
        (dx,) = torch.autograd.grad(y, xg, dd)
        torch.testing.assert_close(y.detach().cpu().double(), y64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx.cpu().double(), dx64, rtol=1e-5, atol=1e-5)

    with cobkern.use_backend("triton"):
        for _ in range(3):
            check(x, dy)
        assert made == ["forward", "backward"]
        cl = torch.channels_last
        check(x.to(memory_format=cl), dy.to(memory_format=cl))
        assert made == ["forward", "backward"] * 2
        monkeypatch.setattr(ops, "_MAX_PLANS", 0)
        monkeypatch.setattr(ops, "_PLANS", {})
        made.clear()
        check(x, dy)
        check(x, dy)
        assert made == ["forward", "backward"] * 2 and not ops._PLANS


@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_cached_plans_tell_channel_axes_of_one_shape_apart(fused, device):
    """A square ``(8, 8)`` tensor is channel-major for ``dim=0`` and ``(N, C)`` rows for
    ``dim=1``: the same shape, strides, dtype and split, but another geometry, so the plan
    cache must key on the channel axis too — a plan reused across them reads the tensor
    transposed (found by mutation testing). Both axes, both orders, forward and backward,
    against the float64 reference with the module's float32 tolerances."""
    import importlib

    ops = importlib.import_module("cobkern.ops.tsra")
    x = torch.randn(8, 8, device=device) * 1.5
    dy = torch.randn_like(x)
    kw = dict(norm_size=None, rms_eps=1e-6) if fused else {}
    fn, bwd = (rmsnorm_tsra, rmsnorm_tsra_backward) if fused else (tsra, tsra_backward)
    with cobkern.use_backend("triton"):
        for dims in ((0, 1), (1, 0)):
            ops._PLANS.clear()
            for dim in dims:
                y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), 3, dim, **kw)
                torch.testing.assert_close(fn(x, 3, dim).cpu().double(), y64,
                                           **TOL[torch.float32])
                torch.testing.assert_close(bwd(dy, x, 3, dim).cpu().double(), dx64,
                                           **TOL[torch.float32])
    ops._PLANS.clear()


def test_cached_plans_are_made_per_dtype(monkeypatch, device):
    """float32 and bfloat16 tensors of one shape and layout get launch plans of their own:
    tiles are sized in bytes (``TILE_BYTES``, ``BYTES_PER_THREAD``), so at 2×20×16×16 the
    forward tile holds 128 float32 positions but 256 bfloat16 ones, and a plan cached for
    one dtype must not launch the other (the values would not change — the spill-free tile
    sizes would; found by mutation testing). Each launch runs the plan ``plan`` makes for
    its own element size; the outputs are checked too (module tolerances)."""
    import importlib

    from cobkern.kernels import tsra as k
    from cobkern.ops._checks import channel_geometry

    ops = importlib.import_module("cobkern.ops.tsra")
    launched = []
    original = k.run

    def spy(p, tensors, *args, **kw):
        launched.append((tensors[0].dtype, p.constexprs))
        return original(p, tensors, *args, **kw)

    monkeypatch.setattr(k, "run", spy)
    monkeypatch.setattr(ops, "_PLANS", {})
    monkeypatch.setenv("COBKERN_TSRA_TUNING", "off")
    x32 = torch.randn(2, 20, 16, 16, device=device)
    geo = channel_geometry(x32, 1)
    want = {dt: k.plan("forward", geo, 7, False, torch.empty((), dtype=dt).element_size())
            .constexprs for dt in (torch.float32, torch.bfloat16)}
    assert want[torch.float32]["BLOCK_P"] != want[torch.bfloat16]["BLOCK_P"]
    with cobkern.use_backend("triton"):
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            x = x32.to(dtype)
            y64, _ = tsra64_grad(x.cpu(), torch.ones_like(x).cpu(), 7, 1)
            torch.testing.assert_close(tsra(x, 7).cpu().double(), y64, **TOL[dtype])
    assert [(dt, c) for dt, c in launched] == [(dt, want[dt]) for dt in
                                                (torch.float32, torch.bfloat16, torch.float32)]


def test_kernel_family_by_layout_and_split():
    """Channel-major inputs take the split kernels; channels-last ones too when the split is
    a multiple of ``SPLIT_ALIGN`` (V's channel vectors then start aligned), else the single
    tile with a per-element subspace select; wider than ``MAX_TILE_CHANNELS``, chunked."""
    from cobkern.kernels.tsra import MAX_TILE_CHANNELS, SPLIT_ALIGN, specialization

    def kernel(c, p, split, cl):
        return specialization(c, p, split, cl, "backward", True, 2)[0].__name__

    assert SPLIT_ALIGN == 16
    assert kernel(64, 1024, 32, False) == "_tsra_bwd_split_kernel"
    assert kernel(64, 1024, 27, False) == "_tsra_bwd_split_kernel"
    assert kernel(64, 4096, 32, True) == "_tsra_bwd_split_kernel"
    assert kernel(80, 4096, 48, True) == "_tsra_bwd_split_kernel"
    assert kernel(64, 4096, 40, True) == "_tsra_bwd_kernel"
    assert kernel(12, 4096, 11, True) == "_tsra_bwd_kernel"
    assert kernel(MAX_TILE_CHANNELS + 16, 64, 32, True) == "_tsra_bwd_chunked_kernel"


def test_gpu_diag_layout_and_bias_grad_parts_run(monkeypatch, device):
    """``bench/gpu_diag.py``'s ``nhwcsplit`` and ``biasgrad`` parts (run only on a rare GPU
    lease) on small shapes here: each row times both launches, the channels-last rows name
    the split kernel and the single tile it is compared with, and the bias gradient from
    the partial sums matches the sum of ``dx`` (float32: 1e-5 relative to the largest; bf16:
    the partials sum ``dx`` before its rounding to bf16, so 2^-7)."""
    if device.type == "cpu" and not cobkern.ops.backend.interpreter_enabled():
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1")
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import gpu_diag

    monkeypatch.setattr(gpu_diag, "DEVICE", device.type)
    monkeypatch.setattr(gpu_diag, "BATCH", 2)
    monkeypatch.setattr(gpu_diag, "SHAPES", [(64, 4, 4), (96, 2, 2), (4096,)])
    if device.type == "cuda":
        monkeypatch.setattr(gpu_diag, "_graph_ms", gpu_diag._wall_ms)
    rec: dict = {}
    gpu_diag.part_nhwcsplit(rec)
    gpu_diag.part_biasgrad(rec)
    assert len(rec["nhwcsplit"]) == 2 * 2 * 2  # conv shapes × dtypes × directions
    for r in rec["nhwcsplit"]:
        assert r["split_kernel"].endswith("_split_kernel"), r
        assert r["tile_kernel"] in ("_tsra_fwd_kernel", "_tsra_bwd_kernel"), r
        assert r["split_ms"] > 0 and r["tile_ms"] > 0
    assert len(rec["biasgrad"]) == 2 * 2 * 2  # conv shapes × dtypes × layouts
    for r in rec["biasgrad"]:
        assert {"backward_ms", "sum_dx_ms", "partials_ms"} <= set(r), r
        assert r["max_rel_diff"] <= (1e-5 if r["dtype"] == "fp32" else 2**-7), r
    assert "split kernels vs the single tile" in gpu_diag._markdown(rec)


# the streaming backward: (shape, split, layout, tile elements); small tiles so that a
# program loops over several tiles on a CPU (one "multiprocessor" there) and on a GPU
STREAM_CASES = [((3, 64, 6, 6), 32, "nchw", 256),  # 4 tiles an image, 12 in all
                ((3, 40, 5, 3), 13, "nchw", 128),  # P = 15: a masked tail in each image
                ((7, 10, 2, 2), 4, "nchw", 64),  # 2×2 rows compiled as constants: a tile an image
                ((2, 64, 5, 3), 32, "channels_last", 256),  # 30 positions, masked tail
                ((37, 48), 16, "2d", 128)]  # linear rows, a masked V block


@pytest.mark.parametrize("programs_per_sm", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rms", [False, True], ids=["tsra", "rmsnorm"])
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: f"{c[2]}-{'x'.join(map(str, c[0]))}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streaming_backward_matches_float64(case, rms, with_bias, programs_per_sm, dtype,
                                            device):
    """``programs_per_sm`` (the streaming backward: a fixed grid of programs that load the
    next tile while computing the current one) computes the same gradient as float64, and
    with a bias its per-program partial sums add up to the bias gradient, however many
    tiles each program walks (one program on a CPU: all of them) — with the tolerances of
    the one-tile launch (module docstring)."""
    from cobkern.kernels import tsra as k
    from cobkern.ops._checks import channel_geometry

    shape, split, layout, tile = case
    x = _make(shape, layout, dtype, device)
    dy = torch.randn(shape).to(device=device, dtype=dtype)
    if layout == "channels_last":
        dy = dy.to(memory_format=torch.channels_last)
    c = shape[1]
    bias = torch.randn(c, device=device) if with_bias else None
    view = [1, c] + [1] * (len(shape) - 2)
    x64 = x.cpu().double() + (0 if bias is None else bias.cpu().double().view(view))
    kw = dict(norm_size=c, rms_eps=1e-6) if rms else {}
    _, dx64 = tsra64_grad(x64, dy.cpu(), split, 1, **kw)
    geo = channel_geometry(x, 1)
    consts = (5.0, 0.5, 5.0, 0.7, 1e-12, c if rms else 0, 1e-6 if rms else 0.0)
    over = dict(tile_elems=tile, elems_per_thread=16, num_warps=2, vec_p=2,
                programs_per_sm=programs_per_sm)
    p = k.plan("backward", geo, split, rms, x.element_size(), over, has_bias=with_bias,
               bias_grad=with_bias, device=x.device)
    assert p.kernel is k.KERNELS[("backward", "stream")]
    n_tiles = p.ints[4]
    assert p.grid[0] == k.grid_size(n_tiles, programs_per_sm, x.device)
    if device.type == "cpu":  # one "multiprocessor": each program walks several tiles
        assert p.grid[0] < n_tiles
    dx = torch.empty_like(x)
    partials = k.tsra_backward(dy, x, dx, geo, split, *consts, tuning=over, bias=bias,
                               bias_grad=with_bias)
    torch.testing.assert_close(dx.cpu().double(), dx64, **TOL[dtype])
    assert (partials is not None) == p.constexprs["BIAS_GRAD"]  # rows of >= 16 / 32 bytes
    if partials is not None:
        assert partials.shape == (p.grid[0], c)
        dims = [d for d in range(len(shape)) if d != 1]
        # float32 sums of the float32 gradient (before its rounding to the storage dtype)
        # over at most 90 positions: float32 accumulation, whatever the dtype
        torch.testing.assert_close(partials.sum(0).cpu().double(), dx64.sum(dims),
                                   rtol=1e-4, atol=1e-4)


def test_streaming_launch_is_a_backward_split_option():
    """``programs_per_sm`` is refused where there is no streaming kernel (forward, the
    single tile of an unaligned channels-last split, the chunked kernels), with a value that
    is not a positive int, and in a plan without the device that sizes its grid."""
    from cobkern.kernels import tsra as k
    from cobkern.ops._checks import channel_geometry

    spec = k.specialization
    assert spec(64, 1024, 32, False, "backward", True, 2,
                programs_per_sm=4)[0] is k.KERNELS[("backward", "stream")]
    assert spec(64, 4096, 32, True, "backward", True, 2,
                programs_per_sm=4)[0] is k.KERNELS[("backward", "stream")]
    with pytest.raises(ValueError, match="backward launches of the split kernels only"):
        spec(64, 1024, 32, False, "forward", True, 2, programs_per_sm=4)
    with pytest.raises(ValueError, match="not to this backward tile launch"):
        spec(64, 4096, 40, True, "backward", True, 2, programs_per_sm=4)
    with pytest.raises(ValueError, match="backward chunked launch"):
        spec(k.MAX_TILE_CHANNELS + 16, 64, 32, True, "backward", True, 2, programs_per_sm=4)
    with pytest.raises(ValueError, match="positive int"):
        spec(64, 1024, 32, False, "backward", True, 2, programs_per_sm=-2)
    geo = channel_geometry(torch.empty(2, 64, 4, 4), 1)
    with pytest.raises(ValueError, match="needs the device"):
        k.plan("backward", geo, 32, True, 4, {"programs_per_sm": 2})
    assert k.grid_size(10, 3, "cpu") == 3  # one multiprocessor off CUDA
    assert k.grid_size(2, 3, "cpu") == 2  # never more programs than tiles
