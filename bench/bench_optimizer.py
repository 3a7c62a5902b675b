"""Optimizer step time of VGG-16 TSRA by implementation, side by side.

AdamW (the TSRA model's optimizer) and SGD with Nesterov momentum (the ReLU control's), each
with the trainer's ``optimizer_impl`` choices — PyTorch's ``fused`` kernels, ``foreach``
(multi-tensor) and ``for-loop`` — over the parameters of ``vgg16_tsra(width)`` with random
gradients: the median of ``--steps`` timed steps after warm-up, synchronised on CUDA. Writes
JSON and a Markdown table. Not part of the test suite.

Usage::

    python bench/bench_optimizer.py                       # width 1.0, this machine's device
    python bench/bench_optimizer.py --width 0.125 --device cpu --out bench/results/optimizer
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cobkern.models import vgg16_tsra
from cobkern.training.optim import implementation_flags

IMPLS = ("fused", "foreach", "for-loop")


def step_ms(name: str, impl: str, width: float, device: torch.device, steps: int,
            warmup: int) -> float:
    """Median milliseconds of one ``name`` step over the model's parameters."""
    torch.manual_seed(0)
    params = list(vgg16_tsra(width=width).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    flags = implementation_flags(params, impl)
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4, **flags)
    else:
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                              **flags)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench/results/optimizer", help="output path stem")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    n = sum(q.numel() for q in vgg16_tsra(width=args.width).parameters())
    rows = []
    for name in ("adamw", "sgd"):
        for impl in IMPLS:
            ms = step_ms(name, impl, args.width, device, args.steps, args.warmup)
            rows.append({"optimizer": name, "impl": impl, "ms_per_step": ms})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "width": args.width, "parameters": n,
            "steps": args.steps}
    lines = [f"Optimizer step — {meta['device']}, torch {meta['torch']}, VGG-16 TSRA width "
             f"{args.width} ({n:,} parameters), median of {args.steps} steps", "",
             "| optimizer | implementation | ms / step | vs fused |", "|---|---|---:|---:|"]
    for r in rows:
        fused = next(x["ms_per_step"] for x in rows
                     if x["optimizer"] == r["optimizer"] and x["impl"] == "fused")
        lines.append(f"| {r['optimizer']} | {r['impl']} | {r['ms_per_step']:.2f} | "
                     f"{r['ms_per_step'] / fused:.2f}× |")
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
