"""Training throughput of VGG-16 TSRA variants vs the ReLU control, side by side.

Variants (same width and batch, random data on the device, full training steps:
forward, cross-entropy, backward, AdamW/SGD step):

* ``tsra-fused``          — cobkern's fused RMSNorm+TSRA / TSRA custom ops (Triton on CUDA);
* ``tsra-reference-op``   — the same custom ops forced onto the plain-PyTorch reference
  (``cobkern.ops.use_backend("reference")``);
* ``tsra-eager``          — RMSNorm and TSRA written as ordinary autograd-traced PyTorch ops
  (what the authors' eager code does);
* ``tsra-eager-compiled`` — ``torch.compile`` of that eager model (Inductor may fuse it);
* ``tsra-fused-compiled`` — ``torch.compile`` of the fused model;
* ``relu`` / ``relu-compiled`` — the BatchNorm/ReLU control;
* ``tsra-fused-compiled-cg`` / ``relu-compiled-cg`` — ``torch.compile(mode=
  "reduce-overhead")``: the compiled forward and backward replayed as CUDA graphs, so a
  step costs its kernels, not the host's dispatch of them (cobkern's custom ops cost
  ~16 µs of host each through the dispatcher on our CPU, against ~7 µs for the launch
  itself; 30 of them per step);
* ``tsra-fused-compiled-inline`` / ``tsra-fused-compiled-inline-cg`` — the compiled fused
  model with ``cobkern.ops.set_compile_kernels("inline")``: inductor traces into the ops
  and launches the Triton kernels from its own generated code (no dispatcher round trip,
  outputs in its memory plan), without and with CUDA graphs.
* ``...-fusedbias`` (``tsra-fused``, ``tsra-fused-compiled``, ``tsra-fused-compiled-inline``,
  and ``tsra-fused-compiled-inline-fusedbias-cg``: the ``fast`` preset's setting as CUDA
  graphs) — the same with ``VGG.fuse_conv_bias``: every convolution runs without its bias, which
  the RMSNorm→TSRA kernel adds as it loads the convolution's output (PyTorch and inductor
  otherwise add it in a pass of its own; in the ReLU model inductor fuses that add into
  BatchNorm).

Optimizer steps run as the trainer's ``optimizer_impl`` says (``--optimizer-impl``, default
``auto``: PyTorch's fused AdamW / SGD kernels; the runs of 2026-11-26 and -27 in
``BENCHMARKS.md`` used PyTorch's default, ``foreach``, on CUDA).

Defaults: batch 1024, width 1.0, bf16 autocast on CUDA; on a CPU it falls back to small
shapes (width 0.125, batch 64, fewer steps) so it still runs. Writes JSON and a Markdown
table. Not part of the test suite.

Usage::

    python bench/bench_training.py --out bench/results/training
    python bench/bench_training.py --variants tsra-fused,relu --batch 512 --steps 30
    python bench/bench_training.py --profile tsra-fused-compiled,relu-compiled  # + top kernels
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cobkern
from cobkern.models import vgg16_relu, vgg16_tsra
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA
from cobkern.ops import reference, use_compile_kernels
from cobkern.ops.tuning import ENV_VAR as TUNING_ENV
from cobkern.ops.tuning import table_for_device
from cobkern.training.config import OPTIMIZER_IMPLS
from cobkern.training.optim import implementation_flags

VARIANTS = ("tsra-fused", "tsra-reference-op", "tsra-eager", "tsra-eager-compiled",
            "tsra-fused-compiled", "relu", "relu-compiled", "relu-adamw",
            "tsra-fused-heuristic", "tsra-fused-compiled-cg", "relu-compiled-cg",
            "tsra-fused-compiled-inline", "tsra-fused-compiled-inline-cg",
            "tsra-fused-fusedbias", "tsra-fused-compiled-fusedbias",
            "tsra-fused-compiled-inline-fusedbias", "tsra-fused-compiled-inline-fusedbias-cg")
#: ``tsra-fused-heuristic``: ``tsra-fused`` with the TSRA tuning table switched off
#: (``COBKERN_TSRA_TUNING=off`` during its steps), so a table's effect on a training step —
#: the shipped one, or one named by ``COBKERN_TSRA_TUNING`` for the whole run — is measured
#: side by side with the launch heuristic.
#: Each model's own (paper) optimizer: SGD for the ReLU control, AdamW for TSRA;
#: ``relu-adamw`` gives the control TSRA's optimizer, so the two activations are compared
#: with the same optimizer step as well.


class EagerTSRA(nn.Module):
    """TSRA / RMSNorm→TSRA as plain differentiable PyTorch ops (no custom op)."""

    def __init__(self, m: TSRA | RMSNormTSRA) -> None:
        super().__init__()
        self.split, self.dim = m.split, m.dim
        self.consts = (m.a_u, m.b_u, m.a_v, m.b_v, m.tsra_eps)
        self.norm = isinstance(m, RMSNormTSRA)
        self.norm_size = (m.norm_size or m.num_channels) if self.norm else 0
        self.rms_eps = m.eps if self.norm else 0.0

    def forward(self, x: Tensor) -> Tensor:
        if self.norm:
            x = reference.rmsnorm(x, self.dim, self.norm_size, self.rms_eps)
        a_u, b_u, a_v, b_v, eps = self.consts
        xf = x.float()
        xu, xv = xf.narrow(self.dim, 0, self.split), xf.narrow(self.dim, self.split,
                                                               x.shape[self.dim] - self.split)
        su = xu.square().sum(self.dim, keepdim=True).sqrt()
        s = (su.square() + xv.square().sum(self.dim, keepdim=True)).sqrt()
        r = su / (s + eps)
        gu = torch.sigmoid(a_u * (r - b_u))
        gv = torch.sigmoid(a_v * (r - b_v))
        return torch.cat([gu * xu, gv * xv], self.dim).to(x.dtype)


class EagerRMSNorm(nn.Module):
    def __init__(self, m: RMSNorm) -> None:
        super().__init__()
        self.dim, self.n, self.eps = m.dim, m.norm_size or m.num_channels, m.eps

    def forward(self, x: Tensor) -> Tensor:
        return reference.rmsnorm(x, self.dim, self.n, self.eps)


def eager_copy(model: nn.Module) -> nn.Module:
    """Replace every cobkern activation/norm module by its plain-PyTorch equivalent."""
    for name, child in model.named_children():
        if isinstance(child, (TSRA, RMSNormTSRA)):
            setattr(model, name, EagerTSRA(child))
        elif isinstance(child, RMSNorm):
            setattr(model, name, EagerRMSNorm(child))
        else:
            eager_copy(child)
    return model


def build(variant: str, width: float) -> tuple[nn.Module, str]:
    if variant.startswith("relu"):
        return vgg16_relu(width=width), "auto"
    model = vgg16_tsra(width=width)
    if variant.startswith("tsra-eager"):
        return eager_copy(model), "auto"
    model.fuse_conv_bias = "-fusedbias" in variant
    return model, "reference" if variant == "tsra-reference-op" else "auto"


def bench_one(variant: str, *, width: float, batch: int, steps: int, warmup: int,
              device: torch.device, bf16: bool, channels_last: bool,
              profile: bool = False, optimizer_impl: str = "auto") -> dict:
    torch.manual_seed(0)
    model, backend = build(variant, width)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt).train()
    sgd = variant.startswith("relu") and variant != "relu-adamw"
    flags = implementation_flags(list(model.parameters()), optimizer_impl)
    opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, **flags)
           if sgd else torch.optim.AdamW(model.parameters(), lr=1e-3, **flags))
    graphs = variant.endswith("-cg")
    if graphs:
        net = torch.compile(model, mode="reduce-overhead")
    else:
        net = torch.compile(model) if "-compiled" in variant else model
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        if graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with amp:
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    saved = os.environ.get(TUNING_ENV)
    if variant.endswith("heuristic"):
        os.environ[TUNING_ENV] = "off"
    kernels = "inline" if "-inline" in variant else "opaque"
    try:
        with use_compile_kernels(kernels):  # read when torch.compile traces (first steps)
            res = _timed(variant, sgd, backend, step, sync, steps, warmup, batch, device)
            if profile:
                with cobkern.use_backend(backend):
                    res["profile"] = profile_steps(step, sync, device)
        return res
    finally:
        if saved is None:
            os.environ.pop(TUNING_ENV, None)
        else:
            os.environ[TUNING_ENV] = saved


def _timed(variant, sgd, backend, step, sync, steps, warmup, batch, device) -> dict:
    """Warm-up (compilation included), then ``steps`` timed steps: the variant's row."""
    with cobkern.use_backend(backend):
        t0 = time.perf_counter()
        for _ in range(warmup):  # includes compilation / autotuning
            step()
        sync()
        warm_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        dt = time.perf_counter() - t0
    res = {"variant": variant, "optimizer": "SGD" if sgd else "AdamW",
           "images_per_s": batch * steps / dt,
           "ms_per_step": 1000 * dt / steps, "warmup_s": warm_s}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


#: kernels listed per profiled variant
PROFILE_TOP = 12
#: kernel-name patterns of the profile's categories, first match wins (lower-case
#: substrings). ``conv bias (inductor)``: on CUDA inductor peels a convolution's bias off
#: into a pointwise add (``torch/_inductor/kernel/conv.py``: "cudnn is slower with it"),
#: named after the convolution when it fuses with nothing else — in the ReLU model it can
#: fuse into BatchNorm, in front of a cobkern op it cannot.
PROFILE_CATEGORIES = (
    ("cobkern TSRA kernels", ("_tsra_",)),
    ("conv bias (inductor, unfused)", ("triton_poi_fused_convolution",)),
    ("inductor-generated", ("triton_",)),
    ("optimizer", ("adam", "sgd", "multi_tensor", "foreach")),
    ("convolution / GEMM", ("conv", "cudnn", "gemm", "xmma", "cutlass", "nvjet", "wgrad",
                            "dgrad", "sm90_", "sm80_", "ampere_", "hopper")),
)


def categorise(kernel: str) -> str:
    """The :data:`PROFILE_CATEGORIES` name of a kernel (``other`` if none matches)."""
    k = kernel.lower()
    for name, patterns in PROFILE_CATEGORIES:
        if any(p in k for p in patterns):
            return name
    return "other"


def profile_steps(step, sync, device: torch.device, n: int = 3) -> dict:
    """Where ``n`` training steps spend their device time: the ``PROFILE_TOP`` kernels by
    total time (name, ms per step, calls per step) and the device total per step, from
    ``torch.profiler`` (CPU time on a CPU). After the timed steps, so compilation and
    autotuning are done."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sync()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync()
    rows = []
    for e in prof.key_averages():
        t = e.device_time_total if cuda else e.self_cpu_time_total  # µs
        if t > 0 and (not cuda or e.device_type.name == "CUDA"):
            rows.append((t, e.key, e.count))
    rows.sort(reverse=True)
    cats: dict[str, list[float]] = {}
    for t, k, c in rows:
        cat = cats.setdefault(categorise(k), [0.0, 0.0])
        cat[0] += t / n / 1000
        cat[1] += c / n
    return {"steps": n, "time": "CUDA kernel time" if cuda else "CPU self time",
            "device_ms_per_step": sum(t for t, _, _ in rows) / n / 1000,
            "by_category": {k: {"ms_per_step": v[0], "calls_per_step": v[1]}
                            for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])},
            "top": [{"kernel": k[:120], "ms_per_step": t / n / 1000, "calls_per_step": c / n}
                    for t, k, c in rows[:PROFILE_TOP]]}


def main(argv: list[str] | None = None) -> int:
    from bench import _args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--width", type=_args.positive_float, default=None,
                   help="default 1.0 GPU, 0.125 CPU")
    p.add_argument("--batch", type=_args.positive_int, default=None,
                   help="default 1024 GPU, 64 CPU")
    p.add_argument("--steps", type=_args.positive_int, default=None,
                   help="timed steps (default 50 / 5)")
    p.add_argument("--warmup", type=_args.non_negative_int, default=None,
                   help="untimed steps (default 10 / 2)")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--out", default="bench/results/training", help="output path stem")
    p.add_argument("--optimizer-impl", default="auto", choices=OPTIMIZER_IMPLS,
                   help="how the optimizer steps (the trainer's optimizer_impl)")
    p.add_argument("--profile", default="", metavar="VARIANTS",
                   help="comma-separated variants to profile for 3 more steps after their "
                        "timing (top kernels by device time, in the JSON and Markdown), "
                        "e.g. tsra-fused-compiled,relu-compiled")
    args = p.parse_args(argv)
    device = _args.device(p, args.device)
    _args.out_dir(p, os.path.dirname(args.out) or ".")  # a stem: its folder
    gpu = device.type == "cuda"
    width = args.width if args.width is not None else (1.0 if gpu else 0.125)
    batch = args.batch if args.batch is not None else (1024 if gpu else 64)
    steps = args.steps if args.steps is not None else (50 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    bf16 = gpu and not args.no_bf16
    channels_last = not args.no_channels_last
    variants = [v for v in args.variants.split(",") if v]
    profiled = {v for v in args.profile.split(",") if v}
    unknown = (set(variants) | profiled) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    meta = {"device": torch.cuda.get_device_name(device) if gpu else platform.processor()
            or "cpu", "torch": torch.__version__, "width": width, "batch": batch,
            "steps": steps, "warmup": warmup, "bf16": bf16, "channels_last": channels_last,
            "optimizer_impl": args.optimizer_impl}
    table = table_for_device(device)  # what every variant but *-heuristic launches with
    meta["tuning"] = None if table is None else {"from": str(table.source),
                                                 "entries": len(table.entries)}
    rows: list[dict] = []
    table = ""
    for v in variants:
        # each compiled variant compiles VGG.forward anew: without a reset they would pile
        # up in one code object's cache, and past its recompile limit run uncompiled
        torch._dynamo.reset()
        try:
            r = bench_one(v, width=width, batch=batch, steps=steps, warmup=warmup,
                          device=device, bf16=bf16, channels_last=channels_last,
                          profile=v in profiled, optimizer_impl=args.optimizer_impl)
        except Exception as e:  # e.g. no C++ compiler for Inductor on this machine
            r = {"variant": v, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        rows.append(r)
        print(json.dumps(r), flush=True)
        table = write_results(Path(args.out), meta, rows)  # after every variant: kept if killed
    print(table)
    return 0


def write_results(out: Path, meta: dict, rows: list[dict]) -> str:
    """Write ``out.json`` and ``out.md`` (atomically) and return the Markdown table."""
    from cobkern._atomic import atomic_path

    base = next((r["images_per_s"] for r in rows if r["variant"] == "tsra-eager"
                 and "images_per_s" in r), None)
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    lines = [f"Training throughput — {meta['device']}, torch {meta['torch']}, "
             f"width {meta['width']}, batch {meta['batch']}, bf16 {meta['bf16']}, "
             f"channels_last {meta['channels_last']}, optimizer "
             f"{meta.get('optimizer_impl', 'foreach')}", "",
             "| variant | optimizer | images/s | ms/step | vs tsra-eager | warm-up s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | — | — | — | — | {r['error']} |")
            continue
        rel = f"{r['images_per_s'] / base:.2f}×" if base else "—"
        lines.append(f"| {r['variant']} | {r['optimizer']} | {r['images_per_s']:.0f} | "
                     f"{r['ms_per_step']:.1f} | {rel} | {r['warmup_s']:.1f} |")
    for r in rows:
        if "profile" in r:
            pr = r["profile"]
            lines += ["", f"**{r['variant']}**: {pr['device_ms_per_step']:.2f} ms of "
                      f"{pr['time']} per step (profiled over {pr['steps']} steps); the top "
                      "entries:", "", "| kernel / op | ms / step | calls / step |",
                      "|---|---:|---:|"]
            lines += [f"| `{k['kernel']}` | {k['ms_per_step']:.3f} | {k['calls_per_step']:g} |"
                      for k in pr["top"]]
            if pr.get("by_category"):
                lines += ["", "By kind of kernel (name patterns: `PROFILE_CATEGORIES`):", "",
                          "| kind | ms / step | calls / step |", "|---|---:|---:|"]
                lines += [f"| {k} | {v['ms_per_step']:.3f} | {v['calls_per_step']:g} |"
                          for k, v in pr["by_category"].items()]
    table = "\n".join(lines) + "\n"
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(table)
    return table


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
