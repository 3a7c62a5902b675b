"""A tiny CoB network for calibration tests: two CoB layers, a conv activation (4-D,
RMSNorm→TSRA) and a linear one (2-D, TSRA), on 8×8 images."""

from __future__ import annotations

import torch
from torch import nn

from cobkern.nn import TSRA, RMSNormTSRA


def tiny_net() -> nn.Sequential:
    """conv→RMSNormTSRA→pool→flatten→linear→TSRA→linear, seeded, in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), RMSNormTSRA(6, split=2), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10), TSRA(10, split=4), nn.Linear(10, 3),
    ).eval()
