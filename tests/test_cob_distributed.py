"""Distributed calibration: 2 gloo processes on CPU give the single-process statistics.

Each rank sees its half of the batches (as a DistributedSampler would give it) and takes
half of ``max_samples``; the float64 sums are all-reduced. Tolerance 1e-10 relative: the
two runs add the same float64 batch sums in a different order.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cobkern.nn import TSRA, RMSNormTSRA


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), RMSNormTSRA(6), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 16, 10), TSRA(10, split=3),
                         nn.Linear(10, 2)).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(6)]


def _worker(rank: int, world: int, out_dir: str) -> None:
    # A FileStore, not the default TCPStore: with TCP, rank 0 hosts the store and, exiting
    # first, made rank 1 abort in teardown ("terminate called without an active exception",
    # about 1 run in 10).
    store = f"file://{os.path.join(out_dir, 'store')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        from cobkern.cob import calibrate
        from cobkern.ops import use_backend

        shard = _batches()[rank::world]
        with use_backend("reference"):
            st = calibrate(_net(), shard, max_samples=20, progress=False)
        st.save(os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    from cobkern.cob import CalibrationStats, calibrate
    from cobkern.ops import use_backend

    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    # single process: the first 20 images the two ranks took together (10 each: batches
    # 0, 2, 4[:2] on rank 0 and 1, 3, 5[:2] on rank 1)
    b = _batches()
    imgs = [b[0], b[2], b[4][:2], b[1], b[3], b[5][:2]]
    with use_backend("reference"):
        ref = calibrate(_net(), imgs, max_samples=None, progress=False)
    for r in range(2):
        st = CalibrationStats.load(tmp_path / f"rank{r}.pt")
        assert st.num_images == ref.num_images == 20
        for n, s in ref.layers.items():
            got = st[n]
            assert got.count == s.count
            for a, e in ((got.gram_u, s.gram_u), (got.gram_v, s.gram_v),
                         (got.sum_abs, s.sum_abs), (got.sum_sq, s.sum_sq)):
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * e.abs().max().item())
