"""Benchmark what pruning buys: latency, throughput, parameters and FLOPs of CoB-pruned
VGG-16 TSRA models vs the unpruned one.

Run: ``python bench/bench_pruned_speed.py [--out bench-results] [--width 1.0]
[--fractions 0.5,0.7,0.9,0.95] [--batches 1,1024] [--repeats 50] [--round-to 1] [--bf16]
[--channels-last] [--compile]``. Not part of the test suite.

The models are ``vgg16_tsra(width)`` with random weights, calibrated on random images and
pruned with CoB (L2 importance, fixed ratio ``p = 1 − sqrt(1 − P)`` per subspace) —
timing depends only on the layer shapes, which are exactly those of a trained model pruned
at the same ratio. ``--round-to N`` keeps every pruned subspace's channel count a multiple
of ``N`` (rounded up, capped at the subspace's size; ``cobkern.pruning``'s ``round_to``):
tensor cores handle arbitrary channel counts badly, so time ``--round-to 8`` beside the
default 1. Each model runs on random ``(B, 3, 32, 32)`` inputs: median latency at
batch 1 and throughput at the large batch (CUDA-synchronised), after warm-up.

What the numbers show: CoB pruning removes whole channels and rebuilds every Conv2d /
Linear as a smaller dense layer, so the speed-up needs no sparse kernel. It approaches the
FLOPs reduction at large batch; at batch 1 fixed per-layer costs (kernel launches on a GPU)
bound it. Results: ``OUT/bench_pruned_speed.json`` and ``OUT/bench_pruned_speed.md``.

On a CPU the defaults shrink (width 1/8, batch 1 and 256, 10 repeats).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import torch


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument("--width", type=float, default=1.0 if cuda else 0.125,
                   help="VGG width multiplier (1.0 = the paper's 33.6 M model)")
    p.add_argument("--fractions", type=_floats, default=[0.5, 0.7, 0.9, 0.95],
                   help="parameter fractions P to prune")
    p.add_argument("--batches", type=_ints, default=[1, 1024] if cuda else [1, 256],
                   help="batch sizes (latency at the first, throughput at each)")
    p.add_argument("--repeats", type=int, default=50 if cuda else 10, help="timed runs")
    p.add_argument("--round-to", type=int, default=1,
                   help="keep each pruned subspace's channel count a multiple of N (1: off)")
    p.add_argument("--calib-images", type=int, default=512, help="random calibration images")
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    args = p.parse_args(argv)

    from cobkern.cob import calibrate, find_cob_layers
    from cobkern.experiments import count_flops, count_params, measure_speed
    from cobkern.models import vgg16_tsra
    from cobkern.pruning import ParameterTarget, prune

    # built first, so that a bad --round-to fails before the calibration
    strategies = [ParameterTarget((P, P), round_to=args.round_to) for P in args.fractions]
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    base = vgg16_tsra(width=args.width).to(device).eval()
    if args.channels_last:
        base = base.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.calib_images, 3, 32, 32, generator=g)
    loader = [images[i:i + 128].to(device) for i in range(0, len(images), 128)]
    stats = calibrate(base, loader, max_samples=None, progress=False)

    import copy

    rows = []
    models = [("unpruned", 0.0, base)]
    for P, strategy in zip(args.fractions, strategies, strict=True):
        m, _ = prune(copy.deepcopy(base), stats, strategy, importance="l2", cob=True)
        models.append(("cob", P, m.eval()))
    for method, P, m in models:
        params, flops, layers = count_params(m), count_flops(m), find_cob_layers(m)
        row = {"method": method, "target": P, "params": params, "flops": flops,
               "widths": [lay.num_channels for lay in layers],
               "splits": [lay.split for lay in layers]}
        for b in args.batches:
            # every model shares VGG.forward: without a reset, the (model, batch) compiles
            # passed dynamo's recompile limit (8) and the last models ran uncompiled, and
            # from the second batch on automatic dynamic shapes gave a symbolic batch
            if args.compile:
                torch._dynamo.reset()
            run = torch.compile(m, dynamic=False) if args.compile else m
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else \
                torch.autocast(device.type, enabled=False)
            with ctx:
                s = measure_speed(run, b, device, repeats=args.repeats,
                                  channels_last=args.channels_last)
            row[f"latency_ms_b{b}"] = s["latency_ms"]
            row[f"throughput_b{b}"] = s["throughput"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    u = rows[0]
    for r in rows:
        r["params_ratio"] = u["params"] / r["params"]
        r["flops_ratio"] = u["flops"] / r["flops"]
        for b in args.batches:
            r[f"speedup_b{b}"] = r[f"throughput_b{b}"] / u[f"throughput_b{b}"]
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "python": sys.version.split()[0],
            # measure_speed lets cuDNN time its algorithms (since 2026-11-27; the H200 run of
            # that day used its heuristics)
            "cudnn_benchmark": cuda, **vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_pruned_speed.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=1) + "\n")
    head = ["model", "params", "GFLOPs/img", "FLOPs ×"]
    for b in args.batches:
        head += [f"ms b{b}", f"img/s b{b}", f"× b{b}"]
    lines = [f"# Pruned-model speed ({meta['device']}, width {args.width:g}, "
             f"round-to {args.round_to})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ["unpruned" if r["method"] == "unpruned" else f"CoB {100 * r['target']:g}%",
                 f"{r['params']:,}", f"{r['flops'] / 1e9:.3f}", f"{r['flops_ratio']:.2f}"]
        for b in args.batches:
            cells += [f"{r[f'latency_ms_b{b}']:.2f}", f"{r[f'throughput_b{b}']:.0f}",
                      f"{r[f'speedup_b{b}']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "bench_pruned_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
