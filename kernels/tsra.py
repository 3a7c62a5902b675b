"""Triton kernels for TSRA and fused RMSNorm→TSRA, forward and backward.

Each program owns a ``[BLOCK_C, BLOCK_P]`` tile: *all* channels of ``BLOCK_P`` positions,
so the per-position reductions (the two subspace norms, and in backward the two dot
products ``<dy_U, x_U>``, ``<dy_V, x_V>``) happen in registers and every element of ``x``
(and ``dy``) is read exactly once and every output element written once. Nothing but ``x``
is saved for backward: the norms are recomputed from the ``x`` tile the backward loads
anyway. Accumulation is in float32 whatever the storage dtype.

Layouts (see :class:`cobkern.ops._checks.ChannelGeometry`): ``CHANNELS_CONTIG=False`` is
channel-major (NCHW: positions contiguous), ``True`` is channels-last (NHWC or ``(N, C)``:
channels contiguous). Both are read in place; the compiler vectorises along whichever
axis has unit stride.

``RMSNORM=True`` prepends an unlearned RMSNorm with normaliser ``norm_size``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["tsra_forward", "tsra_backward", "launch_config", "KERNELS"]


@triton.jit
def _tile_offsets(pid, n_pblocks, P, C, stride_b, stride_c, stride_p,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr):
    pid_b = pid // n_pblocks
    pid_p = pid % n_pblocks
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    base = pid_b.to(tl.int64) * stride_b
    if CHANNELS_CONTIG:
        offs = base + offs_p.to(tl.int64)[None, :] * stride_p + offs_c[:, None]
    else:
        offs = base + offs_c.to(tl.int64)[:, None] * stride_c + offs_p[None, :]
    mask = (offs_c[:, None] < C) & (offs_p[None, :] < P)
    return offs, mask, offs_c


@triton.jit
def _tsra_fwd_kernel(
    X, Y, C, P, split, n_pblocks, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
    RMSNORM: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, mask, offs_c = _tile_offsets(pid, n_pblocks, P, C, stride_b, stride_c, stride_p,
                                       BLOCK_C, BLOCK_P, CHANNELS_CONTIG)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    is_u = (offs_c < split)[:, None]
    sq = x * x
    s2u = tl.sum(tl.where(is_u, sq, 0.0), axis=0)
    s2v = tl.sum(tl.where(is_u, 0.0, sq), axis=0)
    s2 = s2u + s2v
    if RMSNORM:
        q = 1.0 / tl.sqrt(s2 * inv_norm_size + rms_eps)
    else:
        q = tl.full(s2.shape, 1.0, tl.float32)
    su = tl.sqrt(s2u) * q
    s = tl.sqrt(s2) * q
    r = su / (s + eps)
    gu = tl.sigmoid(a_u * (r - b_u)) * q
    gv = tl.sigmoid(a_v * (r - b_v)) * q
    y = x * tl.where(is_u, gu[None, :], gv[None, :])
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _tsra_bwd_kernel(
    DY, X, DX, C, P, split, n_pblocks, stride_b, stride_c, stride_p,
    a_u, b_u, a_v, b_v, eps, inv_norm_size, rms_eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_CONTIG: tl.constexpr,
    RMSNORM: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, mask, offs_c = _tile_offsets(pid, n_pblocks, P, C, stride_b, stride_c, stride_p,
                                       BLOCK_C, BLOCK_P, CHANNELS_CONTIG)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    is_u = (offs_c < split)[:, None]
    sq = x * x
    pr = dy * x
    s2u = tl.sum(tl.where(is_u, sq, 0.0), axis=0)
    s2v = tl.sum(tl.where(is_u, 0.0, sq), axis=0)
    du = tl.sum(tl.where(is_u, pr, 0.0), axis=0)
    dv = tl.sum(tl.where(is_u, 0.0, pr), axis=0)
    s2 = s2u + s2v
    if RMSNORM:
        q = 1.0 / tl.sqrt(s2 * inv_norm_size + rms_eps)
    else:
        q = tl.full(s2.shape, 1.0, tl.float32)
    su = tl.sqrt(s2u) * q
    s = tl.sqrt(s2) * q
    den = s + eps
    r = su / den
    gu = tl.sigmoid(a_u * (r - b_u))
    gv = tl.sigmoid(a_v * (r - b_v))
    c = q * (a_u * gu * (1.0 - gu) * du + a_v * gv * (1.0 - gv) * dv)
    t = c / den
    # 1/0 := 0 (x_U = 0 or x = 0): the subgradient that keeps dx finite at the origin.
    inv_su = tl.where(su > 0.0, 1.0 / tl.where(su > 0.0, su, 1.0), 0.0)
    inv_s = tl.where(s > 0.0, 1.0 / tl.where(s > 0.0, s, 1.0), 0.0)
    kv = -t * r * inv_s
    ku = t * inv_su + kv
    if RMSNORM:
        w = gu * du + gv * dv + q * (ku * s2u + kv * s2v)
        q2 = q * q
        corr = q2 * q * w * inv_norm_size
        ku = q2 * ku - corr
        kv = q2 * kv - corr
        gu = gu * q
        gv = gv * q
    gain = tl.where(is_u, gu[None, :], gv[None, :])
    coef = tl.where(is_u, ku[None, :], kv[None, :])
    dx = gain * dy + coef * x
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


KERNELS = {"forward": _tsra_fwd_kernel, "backward": _tsra_bwd_kernel}

#: Elements per program tile: 4096 fp32 values keep x (and dy) in registers with no spills.
TILE_ELEMS = 4096


def launch_config(C: int, P: int) -> tuple[int, int, int]:
    """Block sizes and warps for a ``(C, P)`` problem: ``(BLOCK_C, BLOCK_P, num_warps)``.

    The tile always spans every channel (``BLOCK_C = next_pow2(C)``) and as many positions
    as fit in :data:`TILE_ELEMS`; warps grow with the tile so each thread holds ~16-32 values.
    """
    block_c = triton.next_power_of_2(C)
    block_p = max(1, min(triton.next_power_of_2(P), TILE_ELEMS // block_c))
    tile = block_c * block_p
    num_warps = min(16, max(4, tile // 512))
    return block_c, block_p, num_warps


def _launch(kernel, tensors, geo, split, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps):
    block_c, block_p, num_warps = launch_config(geo.C, geo.P)
    n_pblocks = triton.cdiv(geo.P, block_p)
    grid = (n_pblocks * geo.B,)
    inv_n = 1.0 / norm_size if norm_size > 0 else 0.0
    kernel[grid](
        *tensors, geo.C, geo.P, split, n_pblocks, geo.stride_b, geo.stride_c, geo.stride_p,
        a_u, b_u, a_v, b_v, eps, inv_n, rms_eps,
        BLOCK_C=block_c, BLOCK_P=block_p, CHANNELS_CONTIG=geo.channels_contig,
        RMSNORM=norm_size > 0, num_warps=num_warps,
    )


def tsra_forward(x: torch.Tensor, y: torch.Tensor, geo, split: int, a_u: float, b_u: float,
                 a_v: float, b_v: float, eps: float, norm_size: int, rms_eps: float) -> None:
    """Write TSRA(x) (RMSNorm→TSRA when ``norm_size > 0``) into ``y``; same geometry."""
    _launch(_tsra_fwd_kernel, (x, y), geo, split, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps)


def tsra_backward(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, geo, split: int,
                  a_u: float, b_u: float, a_v: float, b_v: float, eps: float, norm_size: int,
                  rms_eps: float) -> None:
    """Write the input gradient into ``dx`` given ``dy``; all three share ``geo``."""
    _launch(_tsra_bwd_kernel, (dy, x, dx), geo, split, a_u, b_u, a_v, b_v, eps, norm_size,
            rms_eps)
