"""Target for Nsight Compute: one forward and one backward TSRA launch per dtype at the
layer where bf16 falls short (1024×64×32×32, NCHW), for reading hardware counters.

Run on a GPU machine (``gpu_session.sh`` step ``ncu`` does this)::

    ncu --clock-control none --set full -k regex:_tsra_ -c 4 python3 bench/ncu_tsra.py

The kernels are compiled by an untimed first launch on a small tensor of the same
specialisation class, so the profiled launches are the real ones.
"""

from __future__ import annotations

import os

import torch

import cobkern

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (1024, 64, 32, 32) if DEVICE == "cuda" else (2, 64, 32, 32)


def main() -> None:
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(SHAPE, device=DEVICE, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        warm = x[:2].detach().requires_grad_(True)  # same specialisation, compiles the kernels
        torch.autograd.grad(cobkern.tsra(warm, 32), warm, dy[:2])
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        torch.autograd.grad(cobkern.tsra(x, 32), x, dy)  # the profiled fwd + bwd launches
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print("ncu target done:", os.environ.get("CUDA_VISIBLE_DEVICES", "all devices"))


if __name__ == "__main__":
    main()
