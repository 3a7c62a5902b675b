"""Triton kernels for TSRA and fused RMSNorm→TSRA, forward and backward.

Tile kernels (``C <= MAX_TILE_CHANNELS``): each program owns *all* channels of ``BLOCK_P``
positions, so the per-position reductions (the two subspace norms, and in backward the two
dots ``<dy_U, x_U>``, ``<dy_V, x_V>``) happen in registers and every element of ``x`` (and
``dy``) is read exactly once and every output element written once. The *split* kernels
hold U and V as blocks of their own (``BLOCK_U = next_pow2(split)``, ``BLOCK_V =
next_pow2(C - split)``), so no element needs a subspace select — fewer instructions per
element, and fewer registers (offline sm_90 SASS, bf16 RMSNorm→TSRA at 1024×64×32×32 NCHW:
backward 94.5 instead of 104, forward 25.8 instead of 30.2; fp32 backward 49 instead of
60.5 with 77 registers instead of 117; channels-last, with a bias: backward 23.5 instead of
32.5, forward 13.0 instead of 17.2, fp32 backward 30 instead of 50). Channel-major (NCHW)
inputs always take them; channels-last ones when ``split`` is a multiple of
:data:`SPLIT_ALIGN`, so that V's channel vectors start aligned — otherwise (after pruning)
one ``[BLOCK_C, BLOCK_P]`` tile that tells U from V per element. Nothing but ``x`` is saved
for backward: the norms are recomputed from the ``x`` tile that the backward loads
anyway.

Streaming backward (``programs_per_sm`` in the launch's tuning; split layouts only): a
fixed grid of that many programs per multiprocessor, each looping over the tiles ``pid,
pid + programs, ...`` and issuing the loads of its next tile before it computes the current
one, so a program has ``x`` and ``dy`` in flight during the per-position gain chain, where a
one-tile program has none. A tuning-sweep candidate (``bench/gpu_diag.py``), not yet timed;
the heuristic never takes it.

Chunked kernels (wider ``C``, e.g. a 16,384-wide linear layer): a register tile cannot hold
a whole row of ``x`` and ``dy`` without spilling, so the program loops over channel chunks
twice — once to reduce, once to write. The second read of the row hits L2 on the GPU.

Accumulation is float32 whatever the storage dtype.

Layouts (see :class:`cobkern.ops._checks.ChannelGeometry`): ``CHANNELS_CONTIG=False`` is
channel-major (NCHW: positions contiguous), ``True`` is channels-last (NHWC or ``(N, C)``:
channels contiguous, all positions on one axis). Both are read in place; the compiler
vectorises along whichever axis has unit stride. ``EVEN_C=True`` (``C`` a power of two)
drops the channel mask, which the compiler needs to vectorise a unit-stride channel axis.
``SMALL_P`` (NCHW with 2, 4 or 8 positions per channel row, e.g. a 2×2 feature map) makes the
row length a compile-time constant so that those short rows still vectorise.
``RMSNORM=True`` prepends an unlearned RMSNorm with normaliser ``1 / inv_norm_size``.
``HAS_BIAS=True`` adds a per-channel bias (``BIAS``, ``C`` values of any float dtype) to
``x`` as it is loaded, in both directions — the bias of the convolution in front, which
then need not be added in a pass of its own; the kernels compute the function of ``x + b``
and the backward its input gradient (the bias gradient is that gradient summed over the
positions). ``BIAS_GRAD=True`` (backward) also stores each program's sums of ``dx`` over its
positions, one float32 per channel, in row ``program_id`` of ``DB``: the bias gradient is
then a sum over programs (a ``(programs, C)`` buffer, a few percent of ``dx``'s bytes at the
convolutions' shapes) instead of a second read of ``dx``. Without a bias the launchers pass
``BIAS=None`` (and without partial sums ``DB=None``), which the JIT specialises as a
constexpr: no pointer argument at all.

``VEC_P > 0`` (tuning sweeps; 0 in the shipped launches) caps the vector width along
positions. The compiler gives each thread as many consecutive positions as one 16-byte
access holds (8 in bf16), so few lanes span the positions and many span the channels, and
every lane holding a position repeats that position's gain arithmetic (square roots,
reciprocals, two sigmoids). Narrower vectors put more lanes on positions and fewer on the
channels. Offline sm_90 SASS of the bf16 RMSNorm→TSRA backward at 1024×64×32×32 (split
kernels, triton 3.8): the heuristic's 4-warp 4096-element tile issues 42.5 instructions and
2.0 special-function ops per element with ``VEC_P=0``, 26.3 and 0.53 with ``VEC_P=2``
(``python bench/kernel_proxies.py --vec``). The H200 tuning table takes ``VEC_P`` 2 or 4
for most channel-major backward launches (timed sweeps, ``BENCHMARKS.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from ._launch import launch

__all__ = ["tsra_forward", "tsra_backward", "launch_config", "specialization", "plan", "run",
           "run_traced", "grid_size", "bias_grad_buffer", "LaunchPlan", "KERNELS",
           "MAX_TILE_CHANNELS", "BIAS_GRAD_MIN_ROW_BYTES"]


# ----------------------------------------------------------------------------- helpers
#: Smallest normal float32 (see :func:`_root_and_inverse`).
FLT_MIN = tl.constexpr(1.1754943508222875e-38)

@triton.jit
def _offsets(pid_b, offs_c, offs_p, P, C, stride_b, stride_c, stride_p,
             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
             EVEN_C: tl.constexpr, SMALL_P: tl.constexpr):
    """Element offsets and mask of a ``[BLOCK_C, BLOCK_P]`` tile."""
    if CHANNELS_CONTIG:  # one position axis (B == 1): no batch term
        offs = offs_p.to(tl.int64)[None, :] * stride_p + offs_c[:, None]
    elif SMALL_P > 0:  # NCHW with P = SMALL_P = BLOCK_P: rows of a known, small length
        offs = (pid_b.to(tl.int64) * stride_b + offs_c.to(tl.int64)[:, None] * SMALL_P
                + offs_p[None, :])
    else:
        offs = (pid_b.to(tl.int64) * stride_b + offs_c.to(tl.int64)[:, None] * stride_c
                + offs_p[None, :])
    if SMALL_P > 0:  # every position is in the tile: only channels can be out of range
        mask = tl.broadcast_to((offs_c < C)[:, None], [BLOCK_C, BLOCK_P])
    elif EVEN_C:  # no channel mask: keeps loads along a unit-stride channel axis vectorised
        mask = tl.broadcast_to((offs_p < P)[None, :], [BLOCK_C, BLOCK_P])
    else:
        mask = (offs_c[:, None] < C) & (offs_p[None, :] < P)
    return offs, mask


@triton.jit
def _chunk(c0, pid_b, offs_p, P, C, split, stride_b, stride_c, stride_p,
           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
           EVEN_C: tl.constexpr, SMALL_P: tl.constexpr):
    """Offsets, mask and U-membership of the ``BLOCK_C`` channels starting at ``c0``."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs, mask = _offsets(pid_b, offs_c, offs_p, P, C, stride_b, stride_c, stride_p,
                          BLOCK_C, BLOCK_P, CHANNELS_CONTIG, EVEN_C, SMALL_P)
    return offs, mask, (offs_c < split)[:, None]


@triton.jit
def _rows(pid_b, c0, hi, offs_p, P, stride_b, stride_c, stride_p, BLOCK: tl.constexpr,
          BLOCK_P: tl.constexpr, EVEN: tl.constexpr, SMALL_P: tl.constexpr,
          CHANNELS_CONTIG: tl.constexpr):
    """Offsets and mask of the ``[BLOCK, BLOCK_P]`` tile of channels ``c0 ≤ c < hi`` (one
    subspace), channel-major (NCHW) or channels-last; ``EVEN``: ``hi - c0 == BLOCK``, no
    channel mask."""
    offs_c = c0 + tl.arange(0, BLOCK)
    if CHANNELS_CONTIG:  # one position axis (B == 1); c0 a multiple of 16 (the launcher)
        offs = offs_p.to(tl.int64)[None, :] * stride_p + offs_c[:, None]
    else:
        row_len = SMALL_P if SMALL_P > 0 else stride_c
        offs = (pid_b.to(tl.int64) * stride_b + offs_c.to(tl.int64)[:, None] * row_len
                + offs_p[None, :])
    if SMALL_P > 0:  # every position is in the tile: only channels can be out of range
        mask = tl.broadcast_to((offs_c < hi)[:, None], [BLOCK, BLOCK_P])
    elif EVEN:
        mask = tl.broadcast_to((offs_p < P)[None, :], [BLOCK, BLOCK_P])
    else:
        mask = (offs_c[:, None] < hi) & (offs_p[None, :] < P)
    return offs, mask


@triton.jit
def _tile_coords(t, n_pblocks, BLOCK_P: tl.constexpr, VEC_P: tl.constexpr):
    """Row (image) index and positions of tile ``t``: ``n_pblocks`` tiles per row."""
    pid_b = t // n_pblocks
    offs_p = (t % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    if VEC_P > 0:  # cap the vector width along positions (see the module docstring)
        offs_p = tl.max_contiguous(offs_p, VEC_P)
    return pid_b, offs_p


@triton.jit
def _program_coords(n_pblocks, BLOCK_P: tl.constexpr, VEC_P: tl.constexpr):
    return _tile_coords(tl.program_id(0), n_pblocks, BLOCK_P, VEC_P)


@triton.jit
def _subspace_sums(v, is_u):
    """Per-position sums of a ``[BLOCK_C, BLOCK_P]`` tile over U's and over V's channels."""
    return tl.sum(tl.where(is_u, v, 0.0), axis=0), tl.sum(tl.where(is_u, 0.0, v), axis=0)


@triton.jit
def _per_channel(is_u, u, v):
    """Broadcast per-position values of U and of V back onto the tile's channels."""
    return tl.where(is_u, u[None, :], v[None, :])


@triton.jit
def _channel_bias(BIAS, c0, hi, BLOCK: tl.constexpr):
    """The float32 bias of channels ``c0 .. c0 + BLOCK`` (0 from ``hi`` on), as a column to
    add to a ``[BLOCK, BLOCK_P]`` tile. Positions past the end of a row get it too; their
    sums are per position and never stored."""
    offs_c = c0 + tl.arange(0, BLOCK)
    return tl.load(BIAS + offs_c, mask=offs_c < hi, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _store_partials(DB, part, c0, hi, C, BLOCK: tl.constexpr):
    """Store per-channel sums ``part`` (``BLOCK`` float32 values of channels ``c0 .. c0 +
    BLOCK``, those below ``hi`` kept) in row ``program_id`` of the ``(programs, C)`` float32
    buffer ``DB``: this program's partial sums of the bias gradient."""
    offs_c = c0 + tl.arange(0, BLOCK)
    tl.store(DB + tl.program_id(0).to(tl.int64) * C + offs_c, part, mask=offs_c < hi)


@triton.jit
def _bias_partials(DB, dx, mask, c0, hi, C, BLOCK: tl.constexpr):
    """:func:`_store_partials` of the sums of ``dx`` (a float32 ``[BLOCK, BLOCK_P]`` tile)
    over its positions. Positions outside ``mask`` (past the end of a row, where ``x`` is
    the bias alone) add nothing."""
    _store_partials(DB, tl.sum(tl.where(mask, dx, 0.0), axis=1), c0, hi, C, BLOCK)


@triton.jit
def _as_f32(a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps):
    """The float constants as float32, whatever the launch passed: Triton's JIT passes Python
    floats as fp32 (a no-op here), inductor's generated launches (the inline ops under
    ``torch.compile``) as fp64, which would promote the gain arithmetic to float64."""
    f32 = tl.float32
    return (tl.cast(a_u, f32), tl.cast(b_u, f32), tl.cast(a_v, f32), tl.cast(b_v, f32),
            tl.cast(eps, f32), tl.cast(inv_norm_size, f32), tl.cast(rms_eps, f32))


@triton.jit
def _forward_gains(s2u, s2v, a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
                   RMSNORM: tl.constexpr):
    """Per-position output gains ``(q g_U, q g_V)`` from the raw squared subspace norms."""
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps = _as_f32(
        a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps)
    s2 = s2u + s2v
    if RMSNORM:
        q = tl.rsqrt(s2 * inv_norm_size + rms_eps)
    else:
        q = tl.full(s2.shape, 1.0, tl.float32)
    su = tl.sqrt(s2u) * q
    s = tl.sqrt(s2) * q
    # a reciprocal and a multiply rather than a division: with the division, ptxas spilled
    # 4 bytes in one shipped launch (bf16 NHWC 512 channels, 8192-element tiles, RMSNorm)
    r = su * (1.0 / (s + eps))
    gu = tl.sigmoid(a_u * (r - b_u)) * q
    gv = tl.sigmoid(a_v * (r - b_v)) * q
    return gu, gv


@triton.jit
def _root_and_inverse(s2):
    """``(sqrt(s2), 1 / sqrt(s2))`` of a float32 ``s2 >= 0`` from one ``rsqrt``, with
    ``1 / 0 := 0``.

    Subnormal ``s2`` (entries below ~1e-19) is scaled by 2^64 first: the GPU's ``rsqrt``
    (``rsqrt.approx.ftz``) flushes subnormal inputs to zero, which would drop the gradient
    of the norm (a unit vector, whatever the norm's size) at such inputs.
    """
    nonzero = s2 > 0.0
    v = tl.where(nonzero, s2, 1.0)
    tiny = v < FLT_MIN
    inv = tl.rsqrt(tl.where(tiny, v * 18446744073709551616.0, v))
    inv = tl.where(nonzero, tl.where(tiny, inv * 4294967296.0, inv), 0.0)
    return s2 * inv, inv


@triton.jit
def _backward_coefs(s2u, s2v, du, dv, a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
                    RMSNORM: tl.constexpr):
    """Per-position ``(gain_U, gain_V, coef_U, coef_V)`` with ``dx = gain dy + coef x``.

    Inputs are the raw squared norms ``s2u``, ``s2v`` and dots ``du = <dy_U, x_U>``,
    ``dv = <dy_V, x_V>``; see :mod:`cobkern.ops.reference` for the derivation. Each norm
    and its inverse come from one ``rsqrt``, the RMS scale ``q`` from another and its
    inverse as ``m q`` (``q = m^-1/2``), and one reciprocal of ``||x|| + eps`` serves ``r``
    and ``t``: 7 special-function ops a position (8 with RMSNorm) where square roots and
    divisions took 10 (12). The chain runs once for every lane that holds the position.
    """
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps = _as_f32(
        a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps)
    s2 = s2u + s2v
    # 1/0 := 0 (x_U = 0 or x = 0): the subgradient that keeps dx finite at the origin.
    su, inv_su = _root_and_inverse(s2u)
    s, inv_s = _root_and_inverse(s2)
    if RMSNORM:
        m = s2 * inv_norm_size + rms_eps
        q = tl.rsqrt(m)
        inv_q = m * q
        su = su * q
        s = s * q
        inv_su = inv_su * inv_q
        inv_s = inv_s * inv_q
    else:
        q = tl.full(s2.shape, 1.0, tl.float32)
    inv_den = 1.0 / (s + eps)
    r = su * inv_den
    gu = tl.sigmoid(a_u * (r - b_u))
    gv = tl.sigmoid(a_v * (r - b_v))
    t = q * (a_u * gu * (1.0 - gu) * du + a_v * gv * (1.0 - gv) * dv) * inv_den
    kv = -t * r * inv_s
    ku = t * inv_su + kv
    if RMSNORM:
        w = gu * du + gv * dv + q * (ku * s2u + kv * s2v)
        # q³·w/n one factor of q at a time: q³ alone leaves float32 (0 for an RMS beyond
        # ~1e13, inf below ~1e-13 with rms_eps = 0) where the product does not
        corr = q * (q * (q * w) * inv_norm_size)
        ku = q * (q * ku) - corr
        kv = q * (q * kv) - corr
        gu = gu * q
        gv = gv * q
    return gu, gv, ku, kv


# ----------------------------------------------------------------------------- single tile
@triton.jit
def _tsra_fwd_kernel(
    X, Y, BIAS, C, P, split, n_pblocks, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
    RMSNORM: tl.constexpr, EVEN_C: tl.constexpr, SMALL_P: tl.constexpr, VEC_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_b, offs_p = _program_coords(n_pblocks, BLOCK_P, VEC_P)
    offs, mask, is_u = _chunk(0, pid_b, offs_p, P, C, split, stride_b, stride_c, stride_p,
                              BLOCK_C, BLOCK_P, CHANNELS_CONTIG, EVEN_C, SMALL_P)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += _channel_bias(BIAS, 0, C, BLOCK_C)
    sq = x * x
    s2u, s2v = _subspace_sums(sq, is_u)
    gu, gv = _forward_gains(s2u, s2v, a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps, RMSNORM)
    y = x * _per_channel(is_u, gu, gv)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _tsra_bwd_kernel(
    DY, X, DX, BIAS, DB, C, P, split, n_pblocks, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
    RMSNORM: tl.constexpr, EVEN_C: tl.constexpr, SMALL_P: tl.constexpr, VEC_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
):
    pid_b, offs_p = _program_coords(n_pblocks, BLOCK_P, VEC_P)
    offs, mask, is_u = _chunk(0, pid_b, offs_p, P, C, split, stride_b, stride_c, stride_p,
                              BLOCK_C, BLOCK_P, CHANNELS_CONTIG, EVEN_C, SMALL_P)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += _channel_bias(BIAS, 0, C, BLOCK_C)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    sq = x * x
    pr = dy * x
    s2u, s2v = _subspace_sums(sq, is_u)
    du, dv = _subspace_sums(pr, is_u)
    gu, gv, ku, kv = _backward_coefs(s2u, s2v, du, dv, a_u, b_u, a_v, b_v, eps, inv_norm_size,
                                     rms_eps, RMSNORM)
    dx = _per_channel(is_u, gu, gv) * dy + _per_channel(is_u, ku, kv) * x
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if BIAS_GRAD:
        _bias_partials(DB, dx, mask, 0, C, C, BLOCK_C)


# ----------------------------------------------------------------------------- split tile
# Channel-major (NCHW) inputs: U and V are two row blocks of their own, so the norms, dots
# and gains need no per-element subspace select (``tl.where``) and each block is exactly
# one subspace wide when the split is a power of two (VGG-16: every layer).
@triton.jit
def _split_blocks(n_pblocks, C, P, split, stride_b, stride_c, stride_p, BLOCK_U: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, EVEN_U: tl.constexpr,
                  EVEN_V: tl.constexpr, SMALL_P: tl.constexpr, VEC_P: tl.constexpr,
                  CHANNELS_CONTIG: tl.constexpr):
    """This program's U block (channels ``[0, split)``) and V block (``[split, C)``):
    ``(offs_u, mask_u, offs_v, mask_v)``."""
    return _split_tile(tl.program_id(0), n_pblocks, C, P, split, stride_b, stride_c,
                       stride_p, BLOCK_U, BLOCK_V, BLOCK_P, EVEN_U, EVEN_V, SMALL_P, VEC_P,
                       CHANNELS_CONTIG)


@triton.jit
def _split_tile(t, n_pblocks, C, P, split, stride_b, stride_c, stride_p, BLOCK_U: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, EVEN_U: tl.constexpr,
                EVEN_V: tl.constexpr, SMALL_P: tl.constexpr, VEC_P: tl.constexpr,
                CHANNELS_CONTIG: tl.constexpr):
    """:func:`_split_blocks` of tile ``t``."""
    pid_b, offs_p = _tile_coords(t, n_pblocks, BLOCK_P, VEC_P)
    offs_u, mask_u = _rows(pid_b, 0, split, offs_p, P, stride_b, stride_c, stride_p, BLOCK_U,
                           BLOCK_P, EVEN_U, SMALL_P, CHANNELS_CONTIG)
    offs_v, mask_v = _rows(pid_b, split, C, offs_p, P, stride_b, stride_c, stride_p, BLOCK_V,
                           BLOCK_P, EVEN_V, SMALL_P, CHANNELS_CONTIG)
    return offs_u, mask_u, offs_v, mask_v


@triton.jit
def _tsra_fwd_split_kernel(
    X, Y, BIAS, C, P, split, n_pblocks, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr,
    RMSNORM: tl.constexpr, EVEN_U: tl.constexpr, EVEN_V: tl.constexpr, SMALL_P: tl.constexpr,
    VEC_P: tl.constexpr, HAS_BIAS: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
):
    offs_u, mask_u, offs_v, mask_v = _split_blocks(
        n_pblocks, C, P, split, stride_b, stride_c, stride_p, BLOCK_U, BLOCK_V, BLOCK_P,
        EVEN_U, EVEN_V, SMALL_P, VEC_P, CHANNELS_CONTIG)
    xu = tl.load(X + offs_u, mask=mask_u, other=0.0).to(tl.float32)
    xv = tl.load(X + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    if HAS_BIAS:
        xu += _channel_bias(BIAS, 0, split, BLOCK_U)
        xv += _channel_bias(BIAS, split, C, BLOCK_V)
    gu, gv = _forward_gains(tl.sum(xu * xu, axis=0), tl.sum(xv * xv, axis=0),
                            a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps, RMSNORM)
    tl.store(Y + offs_u, (xu * gu[None, :]).to(Y.dtype.element_ty), mask=mask_u)
    tl.store(Y + offs_v, (xv * gv[None, :]).to(Y.dtype.element_ty), mask=mask_v)


@triton.jit
def _split_grads(xu, xv, dyu, dyv, a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
                 RMSNORM: tl.constexpr):
    """``(dx_U, dx_V)`` of float32 ``[BLOCK_U, BLOCK_P]`` / ``[BLOCK_V, BLOCK_P]`` blocks of
    ``x`` (bias added) and ``dy``: the split kernels' gradient of one tile."""
    gu, gv, ku, kv = _backward_coefs(
        tl.sum(xu * xu, axis=0), tl.sum(xv * xv, axis=0), tl.sum(dyu * xu, axis=0),
        tl.sum(dyv * xv, axis=0), a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps, RMSNORM)
    return gu[None, :] * dyu + ku[None, :] * xu, gv[None, :] * dyv + kv[None, :] * xv


@triton.jit
def _tsra_bwd_split_kernel(
    DY, X, DX, BIAS, DB, C, P, split, n_pblocks, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr,
    RMSNORM: tl.constexpr, EVEN_U: tl.constexpr, EVEN_V: tl.constexpr, SMALL_P: tl.constexpr,
    VEC_P: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
):
    offs_u, mask_u, offs_v, mask_v = _split_blocks(
        n_pblocks, C, P, split, stride_b, stride_c, stride_p, BLOCK_U, BLOCK_V, BLOCK_P,
        EVEN_U, EVEN_V, SMALL_P, VEC_P, CHANNELS_CONTIG)
    xu = tl.load(X + offs_u, mask=mask_u, other=0.0).to(tl.float32)
    xv = tl.load(X + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    if HAS_BIAS:
        xu += _channel_bias(BIAS, 0, split, BLOCK_U)
        xv += _channel_bias(BIAS, split, C, BLOCK_V)
    dyu = tl.load(DY + offs_u, mask=mask_u, other=0.0).to(tl.float32)
    dyv = tl.load(DY + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    dxu, dxv = _split_grads(xu, xv, dyu, dyv, a_u, b_u, a_v, b_v, eps, inv_norm_size,
                            rms_eps, RMSNORM)
    tl.store(DX + offs_u, dxu.to(DX.dtype.element_ty), mask=mask_u)
    tl.store(DX + offs_v, dxv.to(DX.dtype.element_ty), mask=mask_v)
    if BIAS_GRAD:
        _bias_partials(DB, dxu, mask_u, 0, split, C, BLOCK_U)
        _bias_partials(DB, dxv, mask_v, split, C, C, BLOCK_V)


@triton.jit
def _tsra_bwd_stream_kernel(
    DY, X, DX, BIAS, DB, C, P, split, n_pblocks, n_tiles, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr,
    RMSNORM: tl.constexpr, EVEN_U: tl.constexpr, EVEN_V: tl.constexpr, SMALL_P: tl.constexpr,
    VEC_P: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
):
    """The split backward as a fixed grid of programs, each looping over tiles ``pid,
    pid + programs, ...`` of the ``n_tiles`` (``B · n_pblocks``): it issues the loads of
    its next tile before it computes the current one, so the next tile's ``x`` and ``dy``
    are in flight during the per-position gain chain (square roots, reciprocals, two
    sigmoids and RMSNorm's terms), where a one-tile program has no load outstanding. The
    prefetched tile stays in the storage dtype until its turn. With ``BIAS_GRAD`` each
    program sums ``dx`` over all its tiles and stores one row of partials at the end."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    ou, mu, ov, mv = _split_tile(pid, n_pblocks, C, P, split, stride_b, stride_c, stride_p,
                                 BLOCK_U, BLOCK_V, BLOCK_P, EVEN_U, EVEN_V, SMALL_P, VEC_P,
                                 CHANNELS_CONTIG)
    xu = tl.load(X + ou, mask=mu, other=0.0)
    xv = tl.load(X + ov, mask=mv, other=0.0)
    dyu = tl.load(DY + ou, mask=mu, other=0.0)
    dyv = tl.load(DY + ov, mask=mv, other=0.0)
    if HAS_BIAS:
        bu = _channel_bias(BIAS, 0, split, BLOCK_U)
        bv = _channel_bias(BIAS, split, C, BLOCK_V)
    if BIAS_GRAD:
        part_u = tl.zeros([BLOCK_U], tl.float32)
        part_v = tl.zeros([BLOCK_V], tl.float32)
    for t in range(pid, n_tiles, step):
        # the next tile's loads first (masked off past the last tile)
        nu, nmu, nv, nmv = _split_tile(t + step, n_pblocks, C, P, split, stride_b, stride_c,
                                       stride_p, BLOCK_U, BLOCK_V, BLOCK_P, EVEN_U, EVEN_V,
                                       SMALL_P, VEC_P, CHANNELS_CONTIG)
        more = t + step < n_tiles
        nxu = tl.load(X + nu, mask=nmu & more, other=0.0)
        nxv = tl.load(X + nv, mask=nmv & more, other=0.0)
        ndyu = tl.load(DY + nu, mask=nmu & more, other=0.0)
        ndyv = tl.load(DY + nv, mask=nmv & more, other=0.0)
        fxu = xu.to(tl.float32)
        fxv = xv.to(tl.float32)
        if HAS_BIAS:
            fxu += bu
            fxv += bv
        dxu, dxv = _split_grads(fxu, fxv, dyu.to(tl.float32), dyv.to(tl.float32), a_u, b_u,
                                a_v, b_v, eps, inv_norm_size, rms_eps, RMSNORM)
        # this tile's offsets again (cheaper to recompute than to hold across the loop)
        # (new names: reassigning the first tile's would carry them through the loop)
        cu, cmu, cv, cmv = _split_tile(t, n_pblocks, C, P, split, stride_b, stride_c,
                                       stride_p, BLOCK_U, BLOCK_V, BLOCK_P, EVEN_U, EVEN_V,
                                       SMALL_P, VEC_P, CHANNELS_CONTIG)
        tl.store(DX + cu, dxu.to(DX.dtype.element_ty), mask=cmu)
        tl.store(DX + cv, dxv.to(DX.dtype.element_ty), mask=cmv)
        if BIAS_GRAD:
            part_u += tl.sum(tl.where(cmu, dxu, 0.0), axis=1)
            part_v += tl.sum(tl.where(cmv, dxv, 0.0), axis=1)
        xu = nxu
        xv = nxv
        dyu = ndyu
        dyv = ndyv
    if BIAS_GRAD:
        _store_partials(DB, part_u, 0, split, C, BLOCK_U)
        _store_partials(DB, part_v, split, C, C, BLOCK_V)


# ----------------------------------------------------------------------------- chunked
@triton.jit
def _tsra_fwd_chunked_kernel(
    X, Y, BIAS, C, P, split, n_pblocks, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
    RMSNORM: tl.constexpr, EVEN_C: tl.constexpr, SMALL_P: tl.constexpr, VEC_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_b, offs_p = _program_coords(n_pblocks, BLOCK_P, VEC_P)
    s2u = tl.zeros([BLOCK_P], tl.float32)
    s2v = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask, is_u = _chunk(c0, pid_b, offs_p, P, C, split, stride_b, stride_c,
                                  stride_p, BLOCK_C, BLOCK_P, CHANNELS_CONTIG, EVEN_C, SMALL_P)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += _channel_bias(BIAS, c0, C, BLOCK_C)
        sq = x * x
        cu, cv = _subspace_sums(sq, is_u)
        s2u += cu
        s2v += cv
    gu, gv = _forward_gains(s2u, s2v, a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps, RMSNORM)
    for c0 in range(0, C, BLOCK_C):
        offs, mask, is_u = _chunk(c0, pid_b, offs_p, P, C, split, stride_b, stride_c,
                                  stride_p, BLOCK_C, BLOCK_P, CHANNELS_CONTIG, EVEN_C, SMALL_P)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += _channel_bias(BIAS, c0, C, BLOCK_C)
        y = x * _per_channel(is_u, gu, gv)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _tsra_bwd_chunked_kernel(
    DY, X, DX, BIAS, DB, C, P, split, n_pblocks, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
    RMSNORM: tl.constexpr, EVEN_C: tl.constexpr, SMALL_P: tl.constexpr, VEC_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
):
    pid_b, offs_p = _program_coords(n_pblocks, BLOCK_P, VEC_P)
    s2u = tl.zeros([BLOCK_P], tl.float32)
    s2v = tl.zeros([BLOCK_P], tl.float32)
    du = tl.zeros([BLOCK_P], tl.float32)
    dv = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask, is_u = _chunk(c0, pid_b, offs_p, P, C, split, stride_b, stride_c,
                                  stride_p, BLOCK_C, BLOCK_P, CHANNELS_CONTIG, EVEN_C, SMALL_P)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += _channel_bias(BIAS, c0, C, BLOCK_C)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        sq = x * x
        pr = dy * x
        cu, cv = _subspace_sums(sq, is_u)
        s2u += cu
        s2v += cv
        cu, cv = _subspace_sums(pr, is_u)
        du += cu
        dv += cv
    gu, gv, ku, kv = _backward_coefs(s2u, s2v, du, dv, a_u, b_u, a_v, b_v, eps, inv_norm_size,
                                     rms_eps, RMSNORM)
    for c0 in range(0, C, BLOCK_C):
        offs, mask, is_u = _chunk(c0, pid_b, offs_p, P, C, split, stride_b, stride_c,
                                  stride_p, BLOCK_C, BLOCK_P, CHANNELS_CONTIG, EVEN_C, SMALL_P)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += _channel_bias(BIAS, c0, C, BLOCK_C)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx = _per_channel(is_u, gu, gv) * dy + _per_channel(is_u, ku, kv) * x
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            _bias_partials(DB, dx, mask, c0, C, C, BLOCK_C)


#: ``(direction, kind)`` → kernel; kind ``"split"`` (U and V blocks: channel-major, and
#: channels-last with ``split`` a multiple of :data:`SPLIT_ALIGN`), ``"tile"`` (channels-last
#: with another split: all channels in one tile) or ``"chunked"`` (``C`` above
#: :data:`MAX_TILE_CHANNELS`, any layout).
KERNELS = {
    ("forward", "tile"): _tsra_fwd_kernel,
    ("backward", "tile"): _tsra_bwd_kernel,
    ("forward", "split"): _tsra_fwd_split_kernel,
    ("backward", "split"): _tsra_bwd_split_kernel,
    ("backward", "stream"): _tsra_bwd_stream_kernel,
    ("forward", "chunked"): _tsra_fwd_chunked_kernel,
    ("backward", "chunked"): _tsra_bwd_chunked_kernel,
}

#: Channels-last inputs take the split kernels when ``split`` is a multiple of this (the
#: JIT's divisibility specialisation: V's channel vectors then start 16-element aligned and
#: load as vectors), else the single tile with a per-element subspace select.
SPLIT_ALIGN = 16
#: NCHW row lengths compiled as constants (shorter than the 16 the JIT's alignment needs).
SMALL_P_VALUES = (2, 4, 8)
#: Widest channel count held in one register tile; wider inputs use the chunked kernels.
MAX_TILE_CHANNELS = 4096
#: Bytes of each loaded tensor per program tile (and per channel chunk of the chunked
#: kernels), and per thread, by direction. Measured on an H200 (bench/gpu_diag.py, CUDA-graph
#: replay of the kernels alone at the VGG-16 shapes, batch 1024; BENCHMARKS.md): forward is
#: best at 16 KiB tiles with 64 bytes per thread in both fp32 (4096 elements, 16 per thread)
#: and bf16 (8192, 32): a bf16 tile of 4096 elements left the 512×4×4 layer at 0.017 ms
#: against 0.011. Backward holds x and dy: 4096-element tiles. With 16 per thread (8 warps)
#: they beat 2048/8 on 2026-11-26 (1024×128×16×16 bf16: 0.156 ms against 0.261); the sweep
#: of 2026-11-27 (``bench/results/h200-2026-11-27``, NCHW and the linear rows) timed 32 per
#: thread (4 warps), never slower and faster at every conv shape: bf16 0.224 / 0.109 /
#: 0.056 / 0.032 ms against 0.388 / 0.153 / 0.079 / 0.034 at 64×32×32 … 512×4×4, fp32
#: 0.189 / 0.098 / 0.056 / 0.031 against 0.333 / 0.115 / 0.058 / 0.032 — and offline SASS
#: agrees for the channels-last launches (bf16 backward 23.5 → 21.2 instructions per element
#: at 64×32×32, with the bias gradient's partial sums 40.0 → 29.5: fewer warps for the sum
#: over positions to cross). So the backward holds 32 per thread (128 / 64 bytes).
TILE_BYTES = {"forward": 16384, "backward": {4: 16384, 2: 8192}}
BYTES_PER_THREAD = {"forward": 64, "backward": {4: 128, 2: 64}}
#: The backward kernels write the bias gradient's partial sums (``BIAS_GRAD``: one float32
#: per channel and program) only where a program's rows are at least this many bytes of
#: ``dx`` (``BLOCK_P`` × itemsize), keyed by whether channels are the contiguous axis: the
#: partials are then at most a quarter of ``dx``'s bytes, written once and read once by
#: their sum — at most half the read of ``dx`` they replace. Narrower tiles (the linear
#: layers: one position per program) sum ``dx`` instead. Channel-major (NCHW) rows sum along
#: the axis each thread holds; channels-last rows sum across threads. Timed on an H200
#: (2026-11-27, CUDA-graph replay, batch 1024, ``bench/results/h200-2026-11-27b``):
#: channel-major, the partials beat a separate sum of ``dx`` at every VGG conv shape down to
#: 16-byte rows (1.16× for bf16 512×4×4, 1.87× for fp32 512×2×2); channels-last, they lost
#: at 16-byte rows (bf16 512×4×4 and 512×2×2: 0.060 / 0.024 ms against 0.038 / 0.015) and
#: won from 32 (bf16 256×8×8 1.48×, fp32 512×4×4 1.31×; fp32 512×2×2 0.96×, even).
BIAS_GRAD_MIN_ROW_BYTES = {"channel_major": 16, "channels_last": 32}
#: Chunked kernels (``C > MAX_TILE_CHANNELS``; not in the sweep) keep ``(elements per
#: chunk, per thread)`` of 4096/16 forward and 2048/8 backward: the fp32 backward at
#: 4096/16 spills (AOT test), and these were the spill-free shipped configuration.
CHUNKED_TILE = {"forward": (4096, 16), "backward": (2048, 8)}


def _per_dtype(table: dict, direction: str, itemsize: int) -> int:
    v = table[direction]
    return v if isinstance(v, int) else v[min(itemsize, 4)]


def launch_config(C: int, P: int, direction: str = "forward", itemsize: int = 4,
                  tile_elems: int | None = None, elems_per_thread: int | None = None,
                  num_warps: int | None = None,
                  rows: int | None = None) -> tuple[int, int, int, bool]:
    """``(BLOCK_C, BLOCK_P, num_warps, chunked)`` for a ``(C, P)`` problem.

    Up to :data:`MAX_TILE_CHANNELS` the tile spans every channel (``BLOCK_C =
    next_pow2(C)``, or ``rows`` when given: the split kernels' U and V blocks together)
    and as many positions as fit in the tile (:data:`TILE_BYTES` of
    ``itemsize``-byte elements); wider inputs loop over channel chunks of that size. Warps
    grow with the tile so that each thread holds :data:`BYTES_PER_THREAD` of each tensor
    (verified spill-free by the AOT tests), at least 4. ``tile_elems`` /
    ``elems_per_thread`` / ``num_warps`` override the defaults (tuning sweeps only; an
    explicit ``num_warps`` may be below 4: with 1 every channel reduction is warp shuffles,
    no shared memory or barrier — offline sm_90 SASS).
    """
    itemsize = min(max(itemsize, 2), 4)  # fp16/bf16: 2, fp32: 4 (float64 never launches)
    chunked = C > MAX_TILE_CHANNELS
    if chunked:
        default_tile, default_ept = CHUNKED_TILE[direction]
    else:
        default_tile = _per_dtype(TILE_BYTES, direction, itemsize) // itemsize
        default_ept = _per_dtype(BYTES_PER_THREAD, direction, itemsize) // itemsize
    tile_elems = tile_elems or default_tile
    elems_per_thread = elems_per_thread or default_ept
    block_c = tile_elems if chunked else (rows or next_pow2(C))
    fit = tile_elems // block_c  # positions that fit, rounded down to a power of two
    block_p = max(1, min(next_pow2(P), 1 << (fit.bit_length() - 1) if fit else 1))
    tile = block_c * block_p
    # rounded down to a power of two: a tile of U + V rows need not be one
    warps = max(4, tile // (32 * elems_per_thread))
    num_warps = num_warps or min(32, 1 << (warps.bit_length() - 1))
    return block_c, block_p, num_warps, chunked


@functools.lru_cache(maxsize=1024)
def specialization(C: int, P: int, split: int, channels_contig: bool, direction: str,
                   rmsnorm: bool, itemsize: int = 4, vec_p: int | None = None,
                   has_bias: bool = False, bias_grad: bool = False,
                   programs_per_sm: int | None = None,
                   **tuning: int | None) -> tuple[object, dict, int, int]:
    """What one launch compiles: ``(kernel, constexprs, num_warps, n_pblocks)``.

    The single source of the launch decisions, shared by the launcher and by the
    ahead-of-time compilation tests (which compile exactly these variants). Inputs up to
    :data:`MAX_TILE_CHANNELS` take the split kernels (U and V in blocks of
    ``next_pow2(split)`` and ``next_pow2(C - split)`` channels; see the module docstring) —
    channels-last ones only with ``split`` a multiple of :data:`SPLIT_ALIGN`, else the single
    tile —, wider ones the chunked kernels. ``tuning``
    (``tile_elems``, ``elems_per_thread``, ``num_warps``) is passed to
    :func:`launch_config`; ``vec_p`` caps the vector width along NCHW positions (``VEC_P``,
    module docstring; tuning sweeps); ``has_bias`` compiles the bias add in
    (``HAS_BIAS``); ``bias_grad`` (backward only) the partial sums of the bias gradient
    (``BIAS_GRAD``; :func:`plan` decides where they pay). ``programs_per_sm`` (a positive
    int; backward split launches only, else a ``ValueError``) takes the streaming kernel
    (``_tsra_bwd_stream_kernel``: that many programs per multiprocessor, each looping over
    tiles and loading the next while it computes the current; :func:`plan` sizes the grid).
    Cached: it runs on every launch, and host time is what limits the small layers. The
    returned ``constexprs`` dict is shared between calls; do not mutate it.
    """
    if bias_grad and direction != "backward":
        raise ValueError("tsra launch: bias_grad is a backward option")
    kind = ("chunked" if C > MAX_TILE_CHANNELS
            else "split" if not channels_contig or split % SPLIT_ALIGN == 0 else "tile")
    if programs_per_sm:
        if isinstance(programs_per_sm, bool) or not isinstance(programs_per_sm, int) \
                or programs_per_sm < 0:
            raise ValueError(f"tsra launch: programs_per_sm must be a positive int, got "
                             f"{programs_per_sm!r}")
        if direction != "backward" or kind != "split":
            raise ValueError(f"tsra launch: programs_per_sm (the streaming kernel) applies to "
                             f"backward launches of the split kernels only, not to this "
                             f"{direction} {kind} launch")
    block_u, block_v = next_pow2(split), next_pow2(C - split)
    rows = block_u + block_v if kind == "split" else None
    block_c, block_p, num_warps, _ = launch_config(C, P, direction, itemsize, rows=rows,
                                                   **tuning)
    small_p = P if (not channels_contig and P in SMALL_P_VALUES and block_p == P) else 0
    vec = 0 if channels_contig else min(vec_p or 0, block_p)
    if kind == "split":
        constexprs = {"BLOCK_U": block_u, "BLOCK_V": block_v, "BLOCK_P": block_p,
                      "RMSNORM": rmsnorm, "EVEN_U": split == block_u,
                      "EVEN_V": C - split == block_v, "SMALL_P": small_p, "VEC_P": vec,
                      "HAS_BIAS": has_bias, "CHANNELS_CONTIG": channels_contig}
    else:
        constexprs = {"BLOCK_C": block_c, "BLOCK_P": block_p,
                      "CHANNELS_CONTIG": channels_contig, "RMSNORM": rmsnorm,
                      "EVEN_C": C % block_c == 0, "SMALL_P": small_p, "VEC_P": vec,
                      "HAS_BIAS": has_bias}
    if direction == "backward":
        constexprs["BIAS_GRAD"] = bias_grad
    if programs_per_sm:
        kind = "stream"
    return KERNELS[(direction, kind)], constexprs, num_warps, cdiv(P, block_p)


@functools.lru_cache(maxsize=64)
def _multiprocessors(device_type: str, index: int | None) -> int:
    """Multiprocessors of a CUDA device; 1 elsewhere (the interpreter's CPU launches)."""
    if device_type != "cuda":
        return 1
    return torch.cuda.get_device_properties(
        index if index is not None else torch.cuda.current_device()).multi_processor_count


def grid_size(n_tiles: int, programs_per_sm: int, device: torch.device | str) -> int:
    """Programs of a streaming launch: ``programs_per_sm`` per multiprocessor of ``device``
    (1 multiprocessor off CUDA), at most one per tile."""
    device = torch.device(device)
    return max(1, min(n_tiles, programs_per_sm * _multiprocessors(device.type, device.index)))


class LaunchPlan(NamedTuple):
    """Everything a launch needs but the tensors and the float constants: what
    :func:`plan` decides for one geometry, split, direction, dtype and tuning (cacheable)."""

    kernel: object
    grid: tuple[int]
    ints: tuple[int, ...]
    constexprs: dict
    num_warps: int


def plan(direction: str, geo, split: int, rmsnorm: bool, itemsize: int,
         tuning: Mapping[str, int] | None = None, has_bias: bool = False,
         bias_grad: bool = False, device: torch.device | str | None = None) -> LaunchPlan:
    """The launch of ``direction`` on a ``geo``-shaped activation (see :func:`specialization`;
    ``tuning`` as in :func:`tsra_forward`; ``has_bias``: a bias is added to ``x``).

    ``bias_grad`` (backward): the bias gradient is wanted too. The plan then has the kernel
    write its partial sums (``constexprs["BIAS_GRAD"]``; :func:`bias_grad_buffer`) where a
    program's rows hold at least :data:`BIAS_GRAD_MIN_ROW_BYTES` of ``dx`` (by layout);
    elsewhere ``BIAS_GRAD`` stays off and the caller sums ``dx`` itself. ``device``: where
    the launch runs; needed (for its multiprocessor count, :func:`grid_size`) when
    ``tuning`` has ``programs_per_sm``."""
    if bias_grad and direction != "backward":
        raise ValueError("tsra launch: bias_grad is a backward option")
    spec = dict(has_bias=has_bias, **(tuning or {}))
    kernel, constexprs, num_warps, n_pblocks = specialization(
        geo.C, geo.P, split, geo.channels_contig, direction, rmsnorm, itemsize, **spec)
    layout = "channels_last" if geo.channels_contig else "channel_major"
    if bias_grad and constexprs["BLOCK_P"] * itemsize >= BIAS_GRAD_MIN_ROW_BYTES[layout]:
        kernel, constexprs, num_warps, n_pblocks = specialization(
            geo.C, geo.P, split, geo.channels_contig, direction, rmsnorm, itemsize,
            bias_grad=True, **spec)
    n_tiles = n_pblocks * geo.B
    if kernel is not KERNELS[("backward", "stream")]:
        return LaunchPlan(kernel, (n_tiles,),
                          (geo.C, geo.P, split, n_pblocks, geo.stride_b, geo.stride_c,
                           geo.stride_p), constexprs, num_warps)
    if device is None:
        raise ValueError("tsra launch: a programs_per_sm launch needs the device (its "
                         "multiprocessor count sizes the grid)")
    return LaunchPlan(kernel, (grid_size(n_tiles, spec["programs_per_sm"], device),),
                      (geo.C, geo.P, split, n_pblocks, n_tiles, geo.stride_b, geo.stride_c,
                       geo.stride_p), constexprs, num_warps)


def bias_grad_buffer(p: LaunchPlan, device: torch.device | str) -> torch.Tensor:
    """The ``(programs, C)`` float32 buffer a ``BIAS_GRAD`` backward launch of ``p`` writes
    its partial sums to; the bias gradient is its sum over the programs (dim 0)."""
    return torch.empty((p.grid[0], p.ints[0]), dtype=torch.float32, device=device)


def _with_bias(p: LaunchPlan, tensors: tuple, bias: torch.Tensor | None,
               partials: torch.Tensor | None = None) -> tuple:
    """The kernel's pointer arguments: ``tensors`` and the bias, ``None`` without one (the
    JIT makes a ``None`` argument a constexpr: the compiled kernel has no such parameter and
    its launcher extracts one pointer fewer — ~0.5 µs of host time per forward+backward
    against a stand-in pointer, ``BENCHMARKS.md``). A plan compiled for the other case is
    refused: a bias would be ignored, or a missing one read. Backward launches take the
    bias gradient's partial-sums buffer (``None`` unless the plan has ``BIAS_GRAD``) last."""
    if p.constexprs["HAS_BIAS"] != (bias is not None):
        raise ValueError("tsra launch: the plan was made "
                         f"{'with' if p.constexprs['HAS_BIAS'] else 'without'} a bias, "
                         f"the call {'passes' if bias is not None else 'has'} "
                         f"{'one' if bias is not None else 'none'}")
    if "BIAS_GRAD" not in p.constexprs:  # a forward launch
        if partials is not None:
            raise ValueError("tsra launch: a forward launch has no bias-gradient partials")
        return (*tensors, bias)
    if p.constexprs["BIAS_GRAD"] != (partials is not None):
        raise ValueError("tsra launch: the plan was made "
                         f"{'with' if p.constexprs['BIAS_GRAD'] else 'without'} the bias "
                         "gradient's partial sums, the call "
                         f"{'passes' if partials is not None else 'has'} "
                         f"{'a buffer' if partials is not None else 'none'}")
    if partials is not None and (partials.shape != (p.grid[0], p.ints[0])
                                 or partials.dtype != torch.float32
                                 or not partials.is_contiguous()):
        raise ValueError(f"tsra launch: the partial sums need a contiguous float32 "
                         f"({p.grid[0]}, {p.ints[0]}) buffer, got {partials.dtype} "
                         f"{tuple(partials.shape)}")
    return (*tensors, bias, partials)


def run(p: LaunchPlan, tensors: tuple[torch.Tensor, ...], a_u: float, b_u: float, a_v: float,
        b_v: float, eps: float, norm_size: int, rms_eps: float,
        bias: torch.Tensor | None = None, partials: torch.Tensor | None = None) -> None:
    """Launch a :func:`plan` on ``(x, y)`` (forward) or ``(dy, x, dx)`` (backward), with
    ``bias`` (contiguous ``(C,)``) added to ``x`` when the plan has ``has_bias``, and the
    bias gradient's partial sums written to ``partials`` (:func:`bias_grad_buffer`) when it
    has ``BIAS_GRAD``."""
    inv_n = 1.0 / norm_size if norm_size > 0 else 0.0
    launch(p.kernel, p.grid, _with_bias(p, tensors, bias, partials), p.ints,
           (a_u, b_u, a_v, b_v, eps, inv_n, rms_eps), p.constexprs, p.num_warps)


def run_traced(p: LaunchPlan, tensors: tuple[torch.Tensor, ...], a_u: float, b_u: float,
               a_v: float, b_v: float, eps: float, norm_size: int, rms_eps: float,
               bias: torch.Tensor | None = None, partials: torch.Tensor | None = None) -> None:
    """Launch a :func:`plan` through ``torch.library.wrap_triton``: the same kernel, grid,
    arguments and options as :func:`run`, in a form that ``torch.compile`` traces (inductor
    then launches the kernel from its own generated code). Eager callers use :func:`run`."""
    from torch.library import wrap_triton

    inv_n = 1.0 / norm_size if norm_size > 0 else 0.0
    wrap_triton(p.kernel)[p.grid](*_with_bias(p, tensors, bias, partials), *p.ints, a_u, b_u,
                                  a_v, b_v,
                                  eps, inv_n, rms_eps, num_warps=p.num_warps, **p.constexprs)


def _launch(direction, tensors, geo, split, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps,
            bias=None, bias_grad=False, **tuning):
    p = plan(direction, geo, split, norm_size > 0, tensors[0].element_size(), tuning,
             has_bias=bias is not None, bias_grad=bias_grad, device=tensors[0].device)
    partials = bias_grad_buffer(p, tensors[0].device) if p.constexprs.get("BIAS_GRAD") else None
    run(p, tensors, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps, bias, partials)
    return partials


def tsra_forward(x: torch.Tensor, y: torch.Tensor, geo, split: int, a_u: float, b_u: float,
                 a_v: float, b_v: float, eps: float, norm_size: int, rms_eps: float,
                 tuning: Mapping[str, int] | None = None,
                 bias: torch.Tensor | None = None) -> None:
    """Write TSRA(x) (RMSNorm→TSRA when ``norm_size > 0``) into ``y``; same geometry.

    ``tuning``: launch overrides (``tile_elems``, ``elems_per_thread``, ``num_warps``,
    ``vec_p``, and for the backward ``programs_per_sm``; ``cobkern.ops.tuning``), ``None``
    for the heuristic. ``bias``: a contiguous
    ``(C,)`` tensor added to ``x`` first (TSRA of ``x + bias``).
    """
    _launch("forward", (x, y), geo, split, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps, bias,
            **(tuning or {}))


def tsra_backward(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, geo, split: int,
                  a_u: float, b_u: float, a_v: float, b_v: float, eps: float, norm_size: int,
                  rms_eps: float, tuning: Mapping[str, int] | None = None,
                  bias: torch.Tensor | None = None,
                  bias_grad: bool = False) -> torch.Tensor | None:
    """Write the input gradient into ``dx`` given ``dy``; all three share ``geo``.
    ``tuning`` and ``bias`` as in :func:`tsra_forward` (``dx`` is then the gradient with
    respect to ``x + bias``, as to ``x``).

    ``bias_grad=True`` (with a bias): where it pays (:func:`plan`), the kernel also writes the
    bias gradient's partial sums, returned as a ``(programs, C)`` float32 tensor whose sum
    over dim 0 is the bias gradient; otherwise (and without ``bias_grad``) returns ``None``
    and the bias gradient is ``dx`` summed over the positions."""
    return _launch("backward", (dy, x, dx), geo, split, a_u, b_u, a_v, b_v, eps, norm_size,
                   rms_eps, bias, bias_grad, **(tuning or {}))
