"""The small CoB network and data the pruning tests share."""

from __future__ import annotations

import torch
from torch import nn

from cobkern.cob import calibrate
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA
from cobkern.ops import use_backend


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


def saturated_net(kernel_size: int) -> tuple:
    """A conv from 3 channels (``kernel_size``², + bias) to 64, RMSNorm→TSRA, pooling and a
    10-logit layer, on 8×8 images: the 64 channels are fed by ``3·k²`` inputs, so at most
    ``3·k² + 1`` directions per subspace carry energy (method.md §5) — lossless pruning has
    something to cut. Seeded; calibrated on the reference path.

    Returns ``(model, stats, x, y0)``: the eval-mode model, its calibration statistics, 16
    test images and the model's logits on them.
    """
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 64, kernel_size), RMSNormTSRA(64), nn.AvgPool2d(2),
                      nn.Flatten(), nn.Linear(64 * 9, 10)).eval()
    xs = [torch.randn(64, 3, 8, 8) for _ in range(2)]
    x = torch.randn(16, 3, 8, 8)
    with use_backend("reference"):
        st = calibrate(m, xs, progress=False)
        y0 = m(x)
    return m, st, x, y0


def rel_err(a, b):
    """Largest absolute difference relative to the largest entry of ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()
