"""Prototype (not shipped): TSRA forward for channel-major tensors with one position per lane.

The shipped kernels hold a ``[BLOCK_C, BLOCK_P]`` tile whose positions are vectorised along
the contiguous axis, so Triton spreads the channels over warps and every per-position
reduction crosses warps: ~21 PTX instructions per element and 7 (fp32) / 15 (bf16)
barriers per program in the forward at 1024×64×32×32, which is why bf16 and fp32 took the
same time there on an H200 (BENCHMARKS.md). Here the position offsets are multiplied by a
runtime ``p_step`` (always 1) that the JIT may not specialise, so Triton cannot prove the
axis contiguous: it gives each lane one position and all its channels, the reductions stay
inside a thread (offline sm_90 PTX: no ``bar.sync``, no shuffles; C = 64: 254 registers,
no spill), and the loads are scalar but coalesced across lanes. Whether that is faster is
for a GPU to say: ``bench/gpu_diag.py --parts lanes``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["p_step"])
def tsra_fwd_lanes_p(X, Y, C, P, split, n_pblocks, stride_b, p_step, a_u, b_u, a_v, b_v, eps,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    pid_b = pid // n_pblocks
    offs_p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    X = X + pid_b.to(tl.int64) * stride_b
    Y = Y + pid_b.to(tl.int64) * stride_b
    offs = offs_c[:, None] * P + offs_p[None, :] * p_step
    mask = (offs_c[:, None] < C) & (offs_p[None, :] < P)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    is_u = (offs_c < split)[:, None]
    sq = x * x
    s2u = tl.sum(tl.where(is_u, sq, 0.0), axis=0)
    s2 = tl.sum(sq, axis=0)
    r = tl.sqrt(s2u) / (tl.sqrt(s2) + eps)
    gu = tl.sigmoid(a_u * (r - b_u))
    gv = tl.sigmoid(a_v * (r - b_v))
    y = x * tl.where(is_u, gu[None, :], gv[None, :])
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def tsra_forward(x: torch.Tensor, split: int, block_p: int = 128, num_warps: int = 4,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """TSRA forward of a contiguous NCHW ``x`` (C <= 64 keeps the tile in registers)."""
    assert x.is_contiguous() and x.dim() == 4, "prototype: contiguous NCHW only"
    n, c, h, w = x.shape
    p = h * w
    y = torch.empty_like(x) if out is None else out
    n_pblocks = triton.cdiv(p, block_p)
    tsra_fwd_lanes_p[(n * n_pblocks,)](x, y, c, p, split, n_pblocks, c * p, 1,
                                       5.0, 0.5, 5.0, 0.7, 1e-12,
                                       BLOCK_C=triton.next_power_of_2(c), BLOCK_P=block_p,
                                       num_warps=num_warps)
    return y
