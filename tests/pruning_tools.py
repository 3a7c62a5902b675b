"""The small CoB network and data the pruning tests share."""

from __future__ import annotations

import torch
from torch import nn

from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA


def net(fused: bool = True) -> nn.Sequential:
    """Three CoB layers: widths 10 (U 5), 8 (U 3), 12 (U 5) — no size a multiple of 4 —
    then a 4-logit linear layer. ``fused=False``: separate RMSNorm and TSRA modules."""
    def block(cin, cout, split=None):
        if fused:
            return [nn.Conv2d(cin, cout, 3, padding=1), RMSNormTSRA(cout, split=split)]
        return [nn.Conv2d(cin, cout, 3, padding=1), RMSNorm(cout), TSRA(cout, split=split)]

    return nn.Sequential(*block(3, 10), nn.AvgPool2d(2), *block(10, 8, split=3),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4, 12), TSRA(12, split=5),
                         nn.Dropout(0.5), nn.Linear(12, 4))


def data(n_batches=3, n=8, seed=1):
    """``n_batches`` seeded batches of ``n`` random ``3×8×8`` images."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=g) for _ in range(n_batches)]


def rel_err(a, b):
    """Largest absolute difference relative to the largest entry of ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()
