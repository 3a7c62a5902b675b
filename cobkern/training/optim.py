"""Optimizer and learning-rate schedule of the trainer (``method.md`` §3).

* :func:`build_optimizer` — AdamW or SGD with Nesterov momentum, with the step's
  implementation (:func:`implementation_flags`) from ``optimizer_impl``;
* :func:`load_optimizer_state` — a checkpoint's optimizer state, run with this run's
  implementation;
* :func:`lr_factor` / :func:`build_scheduler` — linear warm-up, then cosine (or constant).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError, TrainConfig

__all__ = ["lr_factor", "build_optimizer", "build_scheduler", "implementation_flags",
           "load_optimizer_state"]

#: Device types with PyTorch's fused AdamW / SGD kernels that ``optimizer_impl="auto"`` uses
#: (others exist, e.g. MPS, but are not tried here).
FUSED_DEVICE_TYPES = ("cuda", "cpu")


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


def implementation_flags(params: list[torch.Tensor], impl: str) -> dict[str, bool | None]:
    """The ``fused`` / ``foreach`` arguments of ``torch.optim.AdamW`` / ``SGD`` for
    ``impl``: ``"fused"`` (one kernel over all parameters), ``"foreach"`` (multi-tensor
    kernels), ``"for-loop"`` (one parameter at a time) or ``"auto"`` — fused when every
    parameter is a float tensor on a device in :data:`FUSED_DEVICE_TYPES`, else PyTorch's
    default (both ``None``). On our 2-core CPU a full-width VGG-16 TSRA AdamW step took
    13.5–13.7 ms fused against 69–95 ms foreach or for-loop (SGD 6.0–9.2 against 34–58 ms;
    ``bench/bench_optimizer.py``, two runs)."""
    if impl == "auto":
        fusable = bool(params) and all(p.is_floating_point() and
                                       p.device.type in FUSED_DEVICE_TYPES for p in params)
        return {"fused": True, "foreach": None} if fusable else {"fused": None, "foreach": None}
    return {"fused": {"fused": True, "foreach": None},
            "foreach": {"fused": None, "foreach": True},
            "for-loop": {"fused": None, "foreach": False}}[impl]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over all parameters, with ``config.weight_decay``,
    stepping as ``config.optimizer_impl`` says (:func:`implementation_flags`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flags = implementation_flags(params, config.optimizer_impl)
    try:
        if config.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2),
                                     weight_decay=config.weight_decay, **flags)
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay, **flags)
    except RuntimeError as e:  # e.g. fused on a device without the kernel
        raise ConfigError(f"optimizer_impl={config.optimizer_impl} cannot run here: {e}") \
            from None


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer ``state`` into ``opt`` (built for this run), keeping
    ``opt``'s step implementation: a resumed run may choose another ``optimizer_impl``
    (the fused kernels keep their step counters on the parameters' device, which
    ``load_state_dict`` arranges from the flags it loads, so they are set first)."""
    mine = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if isinstance(groups, list) and len(groups) == len(mine):
        state = dict(state, param_groups=[dict(g, **m) if isinstance(g, dict) else g
                                          for g, m in zip(groups, mine, strict=True)])
    opt.load_state_dict(state)


def build_scheduler(opt: torch.optim.Optimizer, config: TrainConfig):
    """``LambdaLR`` with :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
