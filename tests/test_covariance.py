"""Streaming covariance: Triton kernel (interpreter on CPU) vs the plain-PyTorch reference.

Tolerances: the reference is evaluated in float64 on the *same* (possibly bf16/fp16)
values, so products are exact in both and only the kernel's float32 summation differs:
with Kahan-compensated tiles that is a few float32 ulps of the largest entry — we allow
2e-6 relative to the largest magnitude of each output (≈ 30 ulps).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from cobkern.ops import use_backend
from cobkern.ops._checks import channel_geometry
from cobkern.ops.covariance import (
    CovarianceAccumulator,
    num_samples,
    subspace_moments,
    subspace_moments_reference,
)

RTOL = 2e-6


def _close(got, ref, rtol=RTOL):
    for name, g, r in zip(("gram_u", "gram_v", "sum_abs", "sum_sq"), got, ref, strict=True):
        assert g.shape == r.shape, name
        scale = r.abs().max().clamp_min(1e-30)
        err = (g.double().cpu() - r.cpu()).abs().max() / scale
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"


def _make(shape, dtype, channels_last, device):
    x = torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


CASES = [
    # shape, split, channels_last
    ((3, 10, 5, 7), 4, False),    # NCHW, odd spatial sizes, B > 1 (position = (n, h, w))
    ((3, 10, 5, 7), 3, True),     # channels_last
    ((37, 9), 5, False),          # (N, C) rows
    ((2, 67, 3, 3), 30, False),   # odd C, several 64-wide tiles in V
    ((2, 67, 3, 3), 1, True),     # split at the edge: |U| = 1
    ((2, 67, 3, 3), 66, False),   # |V| = 1
    # multiples of 16 on the unit-stride axis (vectorised, two-stage launches on a GPU) and,
    # for subspaces of at most 32 channels, 32×32 tiles
    ((3, 64, 8, 8), 32, False),   # NCHW
    ((2, 64, 4, 4), 32, True),    # NHWC
    ((40, 160), 96, False),       # (N, C): 64-wide tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,split,channels_last", CASES)
def test_kernel_matches_reference(device, dtype, shape, split, channels_last):
    x = _make(shape, dtype, channels_last, device)
    with use_backend("triton"):
        got = subspace_moments(x, split)
    ref = subspace_moments_reference(x, split, accum_dtype=torch.float64)
    _close(got, ref)


def test_kernel_several_chunks_and_big_subspace(device):
    """Many sample chunks (atomic adds of partial tiles) and a 160-wide subspace (3 tiles)."""
    from cobkern.kernels import covariance as k

    x = _make((4, 300, 2, 3), torch.float32, True, device)
    split = 140
    geo = channel_geometry(x, 1)
    su, sv = split, 300 - split
    packed = torch.zeros(su * su + sv * sv, device=device)
    sa = torch.zeros(300, device=device)
    sq = torch.zeros(300, device=device)
    k.subspace_moments(x, geo, split, packed, sa, sq, target_programs=64)
    ref = subspace_moments_reference(x, split, accum_dtype=torch.float64)
    got = (packed[: su * su].view(su, su), packed[su * su:].view(sv, sv), sa, sq)
    _close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,split,channels_last", [((3, 10, 5, 7), 4, False),
                                                       ((1, 10, 5, 7), 4, False),
                                                       ((3, 10, 5, 7), 3, True),
                                                       ((37, 9), 5, False)],
                         ids=["nchw", "nchw-b1", "nhwc", "rows"])
def test_64_bit_offsets_compute_the_same_moments(monkeypatch, device, dtype, shape, split,
                                                 channels_last):
    """``INDEX64`` (64-bit sample offsets) is compiled only for batches of 2^31 elements or
    more, which no test can allocate, so its branch of the kernel went unchecked (a wrong
    stride in it survived mutation testing). Forced on for small batches — NCHW with B > 1
    and B = 1, channels-last, (N, C) rows: both of its offset formulas — it must add the
    same moments: the suite's 2e-6 against float64."""
    from cobkern.kernels import covariance as kcov

    original = kcov.specialization

    def index64(*args, **kwargs):
        constexprs, num_warps, num_stages = original(*args, **kwargs)
        return dict(constexprs, INDEX64=True), num_warps, num_stages

    monkeypatch.setattr(kcov, "specialization", index64)
    x = _make(shape, dtype, channels_last, device)
    with use_backend("triton"):
        got = subspace_moments(x, split)
    _close(got, subspace_moments_reference(x, split, accum_dtype=torch.float64))


def test_gram_is_symmetric_and_psd(device):
    x = _make((2, 40, 4, 4), torch.float32, False, device)
    with use_backend("triton"):
        m = subspace_moments(x, 17)
    for g in (m.gram_u, m.gram_v):
        assert torch.equal(g, g.T)  # mirrored exactly, not recomputed
        assert torch.linalg.eigvalsh(g.double()).min() > -1e-4 * g.abs().max()


def test_permuted_layout_and_float64_fallback(device):
    x = torch.randn(3, 5, 4, 12, device=device).permute(0, 3, 1, 2)  # neither NCHW nor NHWC
    with use_backend("triton"):
        got = subspace_moments(x, 5)
    _close(got, subspace_moments_reference(x, 5, accum_dtype=torch.float64))
    xd = torch.randn(4, 6, 3, dtype=torch.float64, device=device)
    m = subspace_moments(xd, 2)  # float64 runs the reference, in float64
    assert m.gram_u.dtype == torch.float64
    _close(m, subspace_moments_reference(xd, 2), rtol=1e-12)


def test_accumulator_equals_reference_of_concatenation(device):
    """Running sums over batches == the moments of all batches at once; count is N·H·W."""
    batches = [_make((n, 12, 3, 2), torch.float32, False, device) for n in (2, 5, 1)]
    acc = CovarianceAccumulator(12, 5, device=device)
    for b in batches:
        acc.update(b)
    ref = subspace_moments_reference(torch.cat(batches), 5, accum_dtype=torch.float64)
    _close((acc.gram_u, acc.gram_v, acc.sum_abs, acc.sum_sq), ref)
    assert acc.count == sum(num_samples(b) for b in batches) == 8 * 3 * 2
    assert acc.gram_u.dtype == torch.float64


def test_errors():
    with pytest.raises(ValueError, match="split"):
        subspace_moments(torch.randn(4, 6), 6)
    with pytest.raises(TypeError, match="floating"):
        subspace_moments(torch.ones(4, 6, dtype=torch.int32), 3)
    acc = CovarianceAccumulator(6, 3)
    with pytest.raises(ValueError, match="expected 6 channels"):
        acc.update(torch.randn(4, 7))
    with pytest.raises(ValueError, match="split"):
        CovarianceAccumulator(6, 0)


def test_accumulator_sizes_are_checked_ints():
    """A float split failed inside torch.zeros with no word of split; a bool or numpy one
    was accepted and failed at the first update ("split must be an int")."""
    with pytest.raises(TypeError, match="CovarianceAccumulator: split must be an int"):
        CovarianceAccumulator(6, 2.0)
    with pytest.raises(TypeError, match="CovarianceAccumulator: split must be an int"):
        CovarianceAccumulator(6, True)
    with pytest.raises(TypeError, match="CovarianceAccumulator: num_channels must be an int"):
        CovarianceAccumulator(6.0, 2)
    acc = CovarianceAccumulator(np.int64(6), np.int32(2), dtype=torch.float32)
    assert (type(acc.num_channels), type(acc.split)) == (int, int)
    acc.update(torch.randn(4, 6))
    assert acc.count == 4


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_reference_moments_ignore_autocast(autocast_dtype):
    """Under ``torch.autocast`` the reference path's products ran in bfloat16/float16: Grams
    2.7e-3 off, returned in that dtype by subspace_moments (float32 when compiled, as its
    fake says), and a float32 accumulator silently lost the precision. With autocast off
    inside, the same RTOL as without autocast holds and the dtypes are float32."""
    x = torch.randn(64, 8, 4, 4) * 3 + 1
    ref = subspace_moments_reference(x, 4, accum_dtype=torch.float64)
    with use_backend("reference"), torch.autocast("cpu", dtype=autocast_dtype):
        m = subspace_moments(x, 4)
        acc = CovarianceAccumulator(8, 4, dtype=torch.float32)
        acc.update(x)
    assert {t.dtype for t in m} == {torch.float32}
    _close(m, ref)
    _close((acc.gram_u, acc.gram_v, acc.sum_abs, acc.sum_sq), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_kahan_accuracy_at_scale_cuda(channels_last):
    """On hardware, at calibration scale: 4M samples (4096×64×32×32, the first VGG block at
    batch 4096) with a positive mean, so every product in the first rows adds with one
    sign and plain float32 summation would drift by ~(samples per program)·ulp. Each
    program sums thousands of samples; the compensated sums must still be within the
    same 2e-6 of the float64 reference as on small inputs (float32 IEEE products, no TF32)."""
    x = _make((4096, 64, 32, 32), torch.float32, channels_last, "cuda").add_(1.5)
    with use_backend("triton"):
        got = subspace_moments(x, 24)
    ref = subspace_moments_reference(x.double(), 24, accum_dtype=torch.float64)
    _close(got, ref)


def test_per_channel_sums_are_compensated_like_the_gram(device):
    """Σ|a| and Σa² feed the l1/l2 importance directly. They were plain float32 sums over a
    program's whole chunk of samples, while the Gram tiles beside them were Kahan-summed:
    on 32,768 samples of mean 1000 (every term of one sign, ~8,000 per program under the
    interpreter) they were off by 2.9e-7 / 4e-7 relative where the Gram was 2.5e-8.

    Compensation removes the error that grows with the number of steps; what is left is
    one step's own sum. Under the interpreter a step's ``tl.dot`` is numpy's float32
    matmul (BLAS spreads the products over SIMD lanes, short chains), and all four stay
    within 1e-7 (a few float32 ulps; float64 reference). A GPU's ``tl.dot`` may add a
    step's ``BLOCK_K`` products in one float32 chain, whose worst-case error for terms of
    one sign is ``(BLOCK_K - 1)·u`` relative (u = 2^-24; 1.8e-6 at ``BLOCK_K`` = 32, 3.8e-6
    at 64, this channel-contiguous input's step since 2026-11-28): an H200 (2026-11-27, 32
    samples a step) measured 3.9e-7 on the Gram, within it, where the interpreter's
    1e-7 failed. Dropping the compensation is caught under the interpreter (CI)."""
    from cobkern.kernels.covariance import specialization

    x = (torch.randn(32768, 4) + 1000.0).to(device)
    with use_backend("triton"):
        got = subspace_moments(x, 2)
    ref = subspace_moments_reference(x.double(), 2, accum_dtype=torch.float64)
    block_k = specialization(channel_geometry(x, 1), 2, x.dtype, x.numel(),
                             x.device.type == "cuda")[0]["BLOCK_K"]
    _close(got, ref, rtol=1e-7 if device.type == "cpu" else (block_k - 1) * 2.0**-24)


def test_accumulator_mixes_kernel_and_reference_updates(device):
    """Kernel updates add only upper triangles (mirrored when read); a reference update in
    between must see symmetric sums, and the result must equal the one-shot reference."""
    batches = [_make((n, 70, 2, 3), torch.float32, cl, device)
               for n, cl in ((3, False), (2, True), (4, False))]
    acc = CovarianceAccumulator(70, 33, device=device)
    for i, b in enumerate(batches):
        with use_backend("reference" if i == 1 else "triton"):
            acc.update(b)
    assert acc.accumulation == "float32"
    ref = subspace_moments_reference(torch.cat([b.contiguous() for b in batches]), 33,
                                     accum_dtype=torch.float64)
    _close((acc.gram_u, acc.gram_v, acc.sum_abs, acc.sum_sq), ref)
    assert torch.equal(acc.gram_u, acc.gram_u.T) and torch.equal(acc.gram_v, acc.gram_v.T)
    assert acc.count == sum(num_samples(b) for b in batches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block,f32_dot", [(32, "ieee"), (64, "tf32x3"), (64, "bf16x6"),
                                           (32, "bf16x6"), (64, "fp64"), (32, "fp64")])
def test_launcher_tuning_options_compute_the_same_moments(device, dtype, block, f32_dot):
    """The sweep options (32-wide Gram tiles, tf32x3 / bf16x6 float32 products) add the same
    moments into float64 sums, within the suite's 2e-6. tf32x3 (three TF32 products per
    float32 product) is not exact, but on an H200 its Grams were within 1.7e-7 of float64 on
    VGG-16 activations (BENCHMARKS.md), well inside that bound; bf16x6 (six bf16 products of
    a three-way split) drops only terms of relative size 2^-24. The interpreter computes
    every float32 dot exactly, so on a CPU this checks the plumbing; on a GPU, the
    products."""
    from cobkern.kernels import covariance as k

    x = _make((3, 70, 3, 5), dtype, False, device)
    split, c = 30, 70
    packed = torch.zeros(split**2 + (c - split) ** 2, device=device, dtype=torch.float64)
    sa = torch.zeros(c, device=device, dtype=torch.float64)
    sq = torch.zeros(c, device=device, dtype=torch.float64)
    k.subspace_moments(x, channel_geometry(x, 1), split, packed, sa, sq, block=block,
                       f32_dot=f32_dot)
    got = (packed[: split**2].view(split, split), packed[split**2:].view(c - split, c - split),
           sa, sq)
    _close(got, subspace_moments_reference(x, split, accum_dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("over", [{"block_k": 16}, {"block_k": 128}, {"num_warps": 2},
                                  {"num_warps": 1, "block": 32}, {"block_k": 64, "block": 64}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_step_and_warp_overrides_compute_the_same_moments(device, dtype, over):
    """The sweep's samples-per-step (``block_k``) and warps-per-program overrides change
    the work split, not the sums: the suite's 2e-6 against float64. A step wider than a
    sample chunk and a 1-warp program are among them."""
    from cobkern.kernels import covariance as k

    x = _make((3, 70, 3, 5), dtype, False, device)
    split, c = 30, 70
    packed = torch.zeros(split**2 + (c - split) ** 2, device=device, dtype=torch.float64)
    sa = torch.zeros(c, device=device, dtype=torch.float64)
    sq = torch.zeros(c, device=device, dtype=torch.float64)
    k.subspace_moments(x, channel_geometry(x, 1), split, packed, sa, sq, **over)
    got = (packed[: split**2].view(split, split), packed[split**2:].view(c - split, c - split),
           sa, sq)
    _close(got, subspace_moments_reference(x, split, accum_dtype=torch.float64))
    cx, warps, _ = k.specialization(channel_geometry(x, 1), split, dtype, x.numel(),
                                    x.device.type == "cuda", None, over.get("block"), None,
                                    over.get("block_k"), over.get("num_warps"))
    for key, want in (("block_k", cx["BLOCK_K"]), ("num_warps", warps),
                      ("block", cx["BLOCK"])):
        if key in over:
            assert want == over[key], f"{key} override not applied"


@pytest.mark.parametrize("channels_last", [False, True])
def test_tf32_products_truncate_within_their_bound(device, channels_last):
    """``f32_dot="tf32"``: one TF32 tensor-core product per float32 product. The tensor
    cores ignore each operand's 13 low mantissa bits (no conversion is emitted), so each
    operand loses up to 2^-10 of itself, toward zero, and a product up to 2·2^-10 ≈ 2e-3:
    on a GPU every output is within 2.5e-3 of the float64 reference (the bound plus the
    float32 sums' error), and ``Σa²`` — the Gram diagonal, a sum of truncated squares —
    is never above it (1e-6 of slack for the float32 sums). ``Σ|a|`` reads the operands
    themselves, not the products: the suite's 2e-6. The interpreter computes every float32
    dot exactly: there the whole result meets 2e-6."""
    from cobkern.kernels import covariance as k

    x = _make((4, 70, 6, 5), torch.float32, channels_last, device)
    split, c = 30, 70
    packed = torch.zeros(split**2 + (c - split) ** 2, device=device, dtype=torch.float64)
    sa = torch.zeros(c, device=device, dtype=torch.float64)
    sq = torch.zeros(c, device=device, dtype=torch.float64)
    k.subspace_moments(x, channel_geometry(x, 1), split, packed, sa, sq, f32_dot="tf32")
    got = (packed[: split**2].view(split, split), packed[split**2:].view(c - split, c - split),
           sa, sq)
    ref = subspace_moments_reference(x, split, accum_dtype=torch.float64)
    if device.type != "cuda":
        _close(got, ref)
        return
    _close(got, ref, rtol=2.5e-3)
    err = ((sa.cpu() - ref.sum_abs.cpu()).abs().max() / ref.sum_abs.abs().max()).item()
    assert err <= RTOL, f"sum_abs: relative error {err:.3g} > {RTOL}"
    assert (sq.cpu() <= ref.sum_sq.cpu() * (1 + 1e-6)).all(), "a TF32 square above the exact"


@pytest.mark.parametrize("shape,split,channels_last", [((4, 70, 6, 5), 30, False),
                                                       ((4, 70, 6, 5), 40, True),
                                                       ((300, 96), 33, False)])
def test_fp64_products_sum_in_float64(device, shape, split, channels_last):
    """``f32_dot="fp64"``: float32 slabs widened to float64 (each product exact: 24 + 24
    mantissa bits fit in 53) and summed in float64, Σ|a| too. Against the float64 reference
    the error is a few float64 roundings per sum — n·2⁻⁵³ ≈ 1e-13 relative at worst for
    these ≤ 300 samples a program sums; we allow 1e-12. The data span six decades per
    channel, where IEEE float32 sums are only ~1e-7 accurate (checked too, so the test
    tells the two modes apart)."""
    g = torch.Generator().manual_seed(7)
    c = shape[1]
    scale = torch.logspace(-3, 3, c, dtype=torch.float64).view(
        [c if i == 1 else 1 for i in range(len(shape))])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.5).float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x = x.to(device)
    ref = subspace_moments_reference(x, split, accum_dtype=torch.float64)
    errs = {}
    for mode in ("fp64", "ieee"):
        acc = CovarianceAccumulator(c, split, device=device, f32_dot=mode)
        with use_backend("triton"):
            acc.update(x)
        got = (acc.gram_u, acc.gram_v, acc.sum_abs, acc.sum_sq)
        errs[mode] = max(((a.double().cpu() - r.cpu()).abs().max() / r.abs().max()).item()
                         for a, r in zip(got, ref, strict=True))
    assert errs["fp64"] <= 1e-12, errs
    assert errs["ieee"] > 1e-11, f"the data do not separate the modes: {errs}"


def test_fp64_products_keep_float64_accumulation(device):
    """The lossless rule's default tolerance follows the statistics' precision
    (``accumulation``): float32 batches summed with ``f32_dot="fp64"`` are as precise as the
    reference path ("float64", tolerance 1e-10); IEEE float32 products or a bf16 batch
    (float32 Kahan sums) make the whole accumulator "float32" (1e-7)."""
    x = torch.randn(40, 96, device=device)
    with use_backend("triton"):
        acc = CovarianceAccumulator(96, 40, device=device, f32_dot="fp64")
        acc.update(x)
        assert acc.accumulation == "float64"
        acc.update(x.bfloat16())
        assert acc.accumulation == "float32"  # the weakest batch decides
        ieee = CovarianceAccumulator(96, 40, device=device)
        ieee.update(x)
        assert ieee.accumulation == "float32"
        narrow = CovarianceAccumulator(96, 40, device=device, dtype=torch.float32,
                                       f32_dot="fp64")
        narrow.update(x)
        assert narrow.accumulation == "float32"  # float32 running sums
        empty = CovarianceAccumulator(96, 40, device=device, f32_dot="fp64")
        empty.update(x[:0])  # no samples: no sums in any precision
        empty.update(x)
        assert empty.accumulation == "float64" and empty.count == 40


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
def test_deterministic_mode_sums_chunks_in_slices(device, monkeypatch, out_dtype):
    """Under ``torch.use_deterministic_algorithms(True)`` the sample chunks of one launch
    add into slices of their own (``SLICED``) which are then summed in a fixed order —
    no two programs add into one element — and the moments are the same as without it
    (the suite's 2e-6 against float64)."""
    from cobkern.kernels import covariance as kcov

    seen = []
    original = kcov.launch

    def spy(kernel, grid, tensors, ints, floats, constexprs, *rest):
        seen.append((grid[0], constexprs["SLICED"], tensors[2].shape))
        return original(kernel, grid, tensors, ints, floats, constexprs, *rest)

    monkeypatch.setattr(kcov, "launch", spy)
    x = _make((3, 70, 3, 5), torch.float32, False, device)
    split, c = 30, 70
    ref = subspace_moments_reference(x, split, accum_dtype=torch.float64)
    outs = {}
    for deterministic in (False, True):
        packed = torch.zeros(split**2 + (c - split) ** 2, device=device, dtype=out_dtype)
        sa = torch.zeros(c, device=device, dtype=out_dtype)
        sq = torch.zeros(c, device=device, dtype=out_dtype)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            kcov.subspace_moments(x, channel_geometry(x, 1), split, packed, sa, sq,
                                  target_programs=64)
        finally:
            torch.use_deterministic_algorithms(previous)
        outs[deterministic] = (packed[: split**2].view(split, split),
                               packed[split**2:].view(c - split, c - split), sa, sq)
        _close(outs[deterministic], ref)
    (grid0, sliced0, _), (grid1, sliced1, shape1) = seen
    assert grid0 == grid1 > 4, "the same grid, several sample chunks per tile"
    assert not sliced0 and sliced1
    assert shape1[0] > 1 and shape1[1] == split**2 + (c - split) ** 2  # (chunks, packed)


def test_gpu_grid_targets_follow_dtype_and_tile():
    """One program per SM for 16-bit inputs on 64×64 tiles (their atomic epilogue dominates:
    132 programs were 1.3–1.7× faster than 528 on an H200), four per SM otherwise —
    float32 (every product mode) and 16-bit inputs on 32×32 tiles — and a handful under
    the interpreter."""
    from cobkern.kernels import covariance as k

    def target(dtype, shape, f32_dot=None, on_gpu=True):
        geo = channel_geometry(torch.empty(shape, device="meta"), 1)
        cx = k.specialization(geo, geo.C // 2, dtype, 10**6, True, f32_dot)[0]
        return k.default_target_programs(on_gpu, cx)

    wide, few = k.TARGET_PROGRAMS_GPU_16BIT_WIDE, k.TARGET_PROGRAMS_GPU
    assert wide < few
    assert target(torch.bfloat16, (500, 256, 8, 8)) == wide
    assert target(torch.float16, (500, 4096)) == wide
    assert target(torch.bfloat16, (500, 64, 32, 32)) == few  # 32×32 tiles
    for dot in (None, "tf32", "tf32x3", "bf16x6", "fp64"):
        assert target(torch.float32, (500, 256, 8, 8), dot) == few
    assert target(torch.bfloat16, (500, 256, 8, 8), on_gpu=False) == \
        k.TARGET_PROGRAMS_INTERPRETER


def test_update_rejects_out_of_range_dim():
    """update(x, dim=3) on a 2-D x raised a bare IndexError from x.shape[dim]."""
    acc = CovarianceAccumulator(6, 3)
    with pytest.raises(IndexError, match=r"dim=3 is out of range for a 2-D input"):
        acc.update(torch.randn(4, 6), dim=3)
    acc.update(torch.randn(4, 6, 2), dim=-2)  # a negative dim is normalised
    assert acc.count == 8


def test_all_reduce_keeps_counts_above_2_pow_24(tmp_path):
    """The sample count travels as int64, not inside the float32 buffer (exact to 2**24
    only: 2**24 + 3 came back as 2**24 + 4). gloo, world size 1: all_reduce must leave
    every sum and the count exactly as they were."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        for dtype in (torch.float32, torch.float64):
            acc = CovarianceAccumulator(4, 2, dtype=dtype)
            with use_backend("reference"):
                acc.update(torch.randn(3, 4))
            acc._count = 2**24 + 3  # e.g. 20,000 images × 32×32 positions is 2**24 + 3.7 M
            before = [t.clone() for t in acc.tensors()]
            acc.all_reduce()
            assert acc.count == 2**24 + 3
            for a, b in zip(acc.tensors(), before, strict=True):
                assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()


def test_accumulator_f32_dot_names_match_the_kernel_and_are_checked():
    """The ops layer keeps its own copy of the kernel's float32 product names (checking an
    argument must not import Triton); the two must not drift apart."""
    from cobkern.kernels.covariance import F32_DOTS as kernel_dots
    from cobkern.ops.covariance import F32_DOTS

    assert F32_DOTS == kernel_dots
    assert CovarianceAccumulator(4, 2, f32_dot="bf16x6").f32_dot == "bf16x6"
    with pytest.raises(ValueError, match="f32_dot must be one of"):
        CovarianceAccumulator(4, 2, f32_dot="fp32")


def test_module_default_precision_reaches_every_launch(monkeypatch, device, f32_dot_launches):
    """A change of the module default ``F32_DOT_DEFAULT`` must reach the next launch: the
    cached ``specialization`` read it inside, keyed on ``f32_dot=None``, so after the first
    launch gpu_diag's later "tf32x3" / "bf16x6" rows ran (and were labelled over) the IEEE
    kernel."""
    from cobkern.kernels import covariance as kcov

    x = torch.randn(64, 8, device=device)  # a CPU tensor runs the kernel only interpreted
    with use_backend("triton"):
        subspace_moments(x, 4)
        monkeypatch.setattr(kcov, "F32_DOT_DEFAULT", "tf32x3")
        subspace_moments(x, 4)
    assert f32_dot_launches == ["ieee", "tf32x3"]


def test_accumulator_counts_samples_with_channels_on_another_axis(device):
    """Channels on the last axis of a ``(N, L, C)`` batch: every ``(n, l)`` is a sample, so
    the count is N·L (here 4·3 = 12, where dividing by ``x.shape[1]`` would give 24), and
    the sums are those of the channels-on-dim-1 layout (same values: the suite's 2e-6)."""
    x = _make((4, 3, 10), torch.float32, False, device)
    acc = CovarianceAccumulator(10, 4, device=device)
    acc.update(x, dim=-1)
    assert acc.count == 12
    ref = subspace_moments_reference(x.movedim(-1, 1), 4, accum_dtype=torch.float64)
    _close((acc.gram_u, acc.gram_v, acc.sum_abs, acc.sum_sq), ref)


def test_gpu_diag_covariance_sweep_rows_run(monkeypatch, device):
    """``bench/gpu_diag.py``'s covariance part (run only on a rare GPU lease) on tiny shapes
    here: every row — the tile, stage, program-count, samples-a-step, warps-a-program and
    float32 product variants, NCHW and channels-last — launches and is timed, none fails,
    and the sweep still has the rows the next lease is to time. Not on a GPU: there the
    diag step runs these rows for real, and compiling ~40 variants here would cost the
    lease's test step most of a minute."""
    if device.type == "cuda":
        pytest.skip("on a GPU lease the diag step runs the sweep itself")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel runs on CPU tensors only under TRITON_INTERPRET=1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import gpu_diag

    monkeypatch.setattr(gpu_diag, "DEVICE", device.type)
    monkeypatch.setattr(gpu_diag, "COV_SHAPES", [(64, 4, 4), (96,)])
    monkeypatch.setattr(gpu_diag, "COV_BATCH", 2)
    monkeypatch.setattr(gpu_diag, "precompile", lambda run_job, jobs: [run_job(j) for j in jobs])
    monkeypatch.setattr(gpu_diag, "_graph_ms", gpu_diag._wall_ms)
    rec: dict = {}
    gpu_diag.part_covariance(rec)
    rows = rec["covariance"]
    assert [r for r in rows if "error" in r] == []
    assert all(r["ms"] > 0 for r in rows)
    labels = {(r["dtype"], r["variant"]) for r in rows}
    for want in [("fp32", "tf32"), ("fp32", "NHWC tf32"), ("fp32", "64 samples a step"),
                 ("fp32", "NHWC 32 samples a step"), ("fp32", "NHWC 128 samples a step"),
                 ("fp32", "NHWC 2 warps, 1056 programs"), ("bf16", "64 samples a step"),
                 ("bf16", "NHWC 256 samples a step")]:
        assert want in labels, want
