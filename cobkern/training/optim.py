"""Optimizer and learning-rate schedule of the trainer (``method.md`` §3).

* :func:`build_optimizer` — AdamW or SGD with Nesterov momentum;
* :func:`lr_factor` / :func:`build_scheduler` — linear warm-up, then cosine (or constant).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["lr_factor", "build_optimizer", "build_scheduler"]


def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then cosine to min_lr.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``. Cosine:
    ``m + (1 - m) * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of post-warm-up steps
    done and ``m = min_lr / lr``; ``constant`` stays at 1.
    """
    w, total = config.warmup_steps, config.steps
    if step < w:
        return (step + 1) / w
    if config.schedule == "constant":
        return 1.0
    t = min(1.0, (step - w) / max(1, total - w))
    m = config.min_lr / config.lr
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over all parameters, with ``config.weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2),
                                 weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0,
                           weight_decay=config.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, config: TrainConfig):
    """``LambdaLR`` with :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
