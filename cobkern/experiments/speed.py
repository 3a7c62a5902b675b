"""What pruning buys: parameters, FLOPs, latency and throughput of a model.

CoB pruning is *structured*: it removes whole channels and builds genuinely smaller dense
``Conv2d`` / ``Linear`` layers (no masks, no sparse formats). Every matrix multiply is
smaller, so the speed-up needs no special kernel — unlike unstructured (weight-level)
pruning, whose zeros a dense kernel multiplies anyway, which is why users of pruning
libraries often see no speed-up.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cobkern._modes import eval_mode

__all__ = ["count_flops", "measure_speed", "layer_flops", "cudnn_autotune"]


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32),
                device: torch.device | str | None = None) -> dict[str, int]:
    """Multiply-accumulates per image of every ``Conv2d`` / ``Linear`` (name → MACs).

    Counted from the output shapes of one forward pass (``MACs = outputs × in/groups ×
    kernel``); biases, activations and pooling are not counted (they are O(outputs)).
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            per_image = out[0].numel()
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                macs[name] = per_image * (m.in_channels // m.groups) * k
            else:
                macs[name] = per_image * m.in_features
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with eval_mode(model):
            model(torch.zeros(input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return macs


def count_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """FLOPs per image (2 × multiply-accumulates of the conv and linear layers)."""
    return 2 * sum(layer_flops(model, input_shape).values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def cudnn_autotune(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = enabled`` on CUDA for the block, then the old value.

    With it cuDNN times its algorithms for each new input shape (in the warm-up) instead of
    picking one by heuristics, as a deployment with fixed shapes would; the heuristics are
    weakest on unusual shapes, such as a pruned layer's arbitrary widths. CPU: unchanged.
    """
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


@torch.no_grad()
def measure_speed(model: nn.Module, batch_size: int, device: torch.device | str, *,
                  repeats: int = 20, warmup: int = 3, channels_last: bool = False,
                  autotune: bool = True) -> dict[str, float]:
    """Time ``model`` (in eval mode; its modes are put back after) on random
    ``(batch_size, 3, 32, 32)`` inputs; the model is moved to ``device``.

    ``autotune``: let cuDNN choose its algorithms by timing them in the warm-up
    (:func:`cudnn_autotune`; CUDA only), so that pruned and unpruned models each run the
    convolutions best for their shapes.

    Returns:
        ``{"latency_ms": median, "latency_ms_min", "latency_ms_p90", "throughput":
        images/s at the median, "batch": batch_size, "repeats"}``.
    """
    device = torch.device(device)
    with cudnn_autotune(device, autotune), eval_mode(model):
        return _measure(model, batch_size, device, repeats, warmup, channels_last)


def _measure(model: nn.Module, batch_size: int, device: torch.device, repeats: int,
             warmup: int, channels_last: bool) -> dict[str, float]:
    """:func:`measure_speed` without the cuDNN setting and the eval mode."""
    model = model.to(device)
    x = torch.randn(batch_size, 3, 32, 32, device=device,
                    generator=torch.Generator(device=device).manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(max(1, warmup)):
        model(x)
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    med = statistics.median(times)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return {"latency_ms": 1e3 * med, "latency_ms_min": 1e3 * times[0], "latency_ms_p90": 1e3 * p90,
            "throughput": batch_size / med, "batch": batch_size, "repeats": len(times)}
