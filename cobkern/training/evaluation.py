"""Evaluation of a classifier on un-augmented data: :func:`evaluate`, :func:`check_num_classes`.

Used by the training loop (per-epoch and final evaluation, every rank scoring its test shard),
by fine-tuning and by the experiments; works with any ``(B, num_classes)`` classifier.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cobkern._modes import eval_mode
from cobkern.data import DeviceLoader, ImageSet
from cobkern.models import unwrap_model

from .config import ConfigError

__all__ = ["evaluate", "check_num_classes", "bf16_autocast"]


def bf16_autocast(device: torch.device, enabled: bool):
    """``torch.autocast`` to bfloat16 on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DeviceLoader | ImageSet,
    device: torch.device | str | None = None,
    *,
    batch_size: int = 1000,
    bf16: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on un-augmented data.

    Args:
        model: any classifier returning ``(B, num_classes)`` logits. Put in eval mode for the
            call; each submodule's mode is restored afterwards.
        data: an :class:`ImageSet` (wrapped in a plain :class:`DeviceLoader`) or a loader,
            whose images are scored the same way (:meth:`DeviceLoader.plain`: each once, in
            order, un-augmented — also from a training loader — and its position kept).
        device: where to run (default: the model's device).
        batch_size: batch size when ``data`` is an ImageSet.
        bf16: run under bf16 autocast.
        channels_last: feed the images channels-last (an ImageSet's loader; a loader passed
            in keeps its own layout).

    Returns:
        ``{"accuracy": float in [0, 1], "loss": float, "n": int}``. Under an active
        ``torch.distributed`` group with a rank-sliced loader the sums are all-reduced.

    Raises:
        ValueError: a rank-sliced loader (``world_size > 1``) without an initialised
            process group (it would score one rank's slice only).
    """
    if not isinstance(data, ImageSet) and data.world_size > 1 and \
            not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"evaluate: the loader is rank {data.rank}'s slice of "
                         f"{data.world_size}, but no torch.distributed process group is "
                         "initialised to sum the slices; call it from every rank of the group "
                         "or pass a loader with world_size=1")
    if device is None:
        device = next(unwrap_model(model).parameters()).device
    device = torch.device(device)
    if isinstance(data, ImageSet):
        data = DeviceLoader.from_imageset(data, batch_size, augment=False, shuffle=False,
                                          drop_last=False, device=device,
                                          channels_last=channels_last)
    else:
        # every image once, un-augmented, whatever the loader's settings (a training loader
        # would augment and drop its tail), and without moving the caller's loader
        data = data.plain()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    with eval_mode(model):
        for x, y in data:
            if y.numel() == 0:
                continue
            with bf16_autocast(device, bf16):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += y.numel()
    totals = [loss_sum.item(), float(correct.item()), float(n)]
    if data.world_size > 1 and dist.is_available() and dist.is_initialized():
        t = torch.tensor(totals, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        totals = t.tolist()
    loss_total, correct_total, n_total = totals
    n_total = max(n_total, 1.0)
    return {"accuracy": correct_total / n_total, "loss": loss_total / n_total, "n": int(n_total)}


def check_num_classes(model: nn.Module, num_classes: int, data: str = "data") -> None:
    """Raise :class:`ConfigError` if ``model`` has another number of outputs than the
    ``num_classes`` classes of the ``data`` it is to be trained or evaluated on (a model
    without a ``num_classes`` attribute is not checked)."""
    outputs = getattr(unwrap_model(model), "num_classes", None)
    if outputs is not None and outputs != num_classes:
        raise ConfigError(f"the model has {outputs} outputs but the {data} has {num_classes} "
                          "classes")
