"""Benchmark TSRA and RMSNorm→TSRA: cobkern's fused kernels vs eager PyTorch vs torch.compile.

Run: ``python bench/bench_tsra.py [--out bench-results] [--dtypes bf16,fp32]
[--layouts nchw,channels_last] [--ops tsra,rmsnorm_tsra] [--passes fwd,fwd+bwd]
[--batch N]``.

On a GPU it times, at the VGG-16 shapes at batch 1024 (the conv activations and the
4096-wide classifier), forward and forward+backward of

* ``eager``    — the method written as its authors write it in plain PyTorch (norms,
                 sigmoid, multiply, concatenate; autograd for the backward),
* ``compile``  — ``torch.compile`` of that same function,
* ``cobkern``  — the fused Triton kernels (``cobkern.tsra`` / ``cobkern.rmsnorm_tsra``),

next to the bandwidth ceiling measured in the same run: the faster of ``torch``'s device
copy and a simple Triton copy kernel moving the same bytes. Bytes are the minimum traffic:
forward reads x and writes y; forward+backward additionally reads x and dy and writes dx.

Timing: ``triton.testing.do_bench`` (median, after warm-up). Each row first checks the fused
result against the eager function evaluated in float64 on the same input
(``‖out − ref‖ / ‖ref‖``, forward output and, for forward+backward, the input gradient; the
reference is computed once from the NCHW tensors, x and dy, and the channels-last rows are
checked against that same reference), so a timing is never reported for a wrong kernel: a
row whose error is not finite or above its dtype's tolerance (:data:`REL_TOL`) is not timed
— it is printed to stderr and kept as ``failed`` (the reason) with no timing fields and
``rel_err`` the error (``null`` when not finite), the other rows still run, and the script
exits with status 1. On CUDA every variant is also replayed from a CUDA graph ("graph ms",
``triton.testing.do_bench_cudagraph``): the same work without host overhead, which dominates
rows of a few tens of microseconds. Every ``torch.compile`` row starts from a reset Dynamo
cache, so a recompile limit can never silently turn the ``compile`` column into eager.

``--layouts`` (comma list of ``nchw``, ``channels_last``; default both on a GPU, ``nchw`` on
a CPU) picks the memory layouts of the conv activations. ``nchw`` is the contiguous tensor;
``channels_last`` is the same values made ``.contiguous(memory_format=torch.channels_last)``
— x, and dy for forward+backward — for every contender alike (eager, compile, cobkern), the
layout training with channels-last runs. The 2-D classifier rows (N × C) have no
channels-last form: they run once, labelled ``nchw``, and are skipped for ``channels_last``
(with ``--layouts channels_last`` alone they are not run). A layout does not change the
minimum bytes, so the ceiling is measured once per shape, dtype and pass and shared by both
ops and both layouts. Each row names its ``layout``; the two layouts of a shape, op and pass
are adjacent rows. On a GPU the default thus has 44 rows per dtype where ``nchw`` alone has 24
(2 ops × 2 passes × (5 conv shapes × 2 layouts + the classifier)).

Results go to ``OUT/bench_tsra.json`` (strict JSON: a missing value is ``null``, never ``NaN``)
and ``OUT/bench_tsra.md``, rewritten after every row so an interrupted run keeps what it
measured. "% spec" is against the vendor's bandwidth of the device (:data:`SPEC_BANDWIDTH`,
looked up by its full name); ``n/a`` for a device not in that table.

On a CPU the script still runs (small shapes, batch 8, fp32, ``nchw`` only unless
``--layouts`` says otherwise: each row compiles its own ``torch.compile`` graph, seconds each
on a CPU, and the second layout would double that; wall-clock timing; the cobkern column then
is the reference path, or the Triton interpreter under ``TRITON_INTERPRET=1``), which checks
the harness, not the kernels' speed. ``--ops tsra`` or ``--passes fwd+bwd`` (the pass that
runs both kernels) halves it again, on a GPU as on a CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

import cobkern

# VGG-16 activation shapes (C, H, W) — one per distinct width/resolution — and the classifier.
VGG_SHAPES = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2), (4096,)]
CPU_SHAPES = [(64, 8, 8), (512, 2, 2), (1024,)]
#: Vendor memory bandwidth (bytes/s) by the full name ``torch.cuda.get_device_name`` reports.
#: Whole names, not substrings: the H100's variants differ (SXM 3.35, PCIe 2.0, NVL 3.9 TB/s)
#: and all three names contain "H100".
SPEC_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H200": 4.8e12,  # H200 SXM
}
#: Largest ``rel_err`` (norm-wise, against float64) a row may have and still be timed, per
#: dtype: the element-wise ``rtol`` of the kernel tests (``tests/test_tsra_kernels.py``).
#: The H200 runs in ``bench/results/`` recorded at most 1.7e-3 (bf16) and 1.5e-7 (fp32);
#: a wrong kernel (a layout or indexing mistake) errs by O(1).
REL_TOL = {"bf16": 2**-7, "fp32": 1e-5, "fp16": 2**-9}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
#: ``--layouts``: the memory format each 4-D input (x, and dy for forward+backward) is made in
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
#: ``--passes``: forward alone, and forward+backward (the input gradient for an upstream dy)
PASSES = ("fwd", "fwd+bwd")


def eager_tsra(x: torch.Tensor, split: int, a_u=5.0, b_u=0.5, a_v=5.0, b_v=0.7, eps=1e-12):
    """The method as plain eager PyTorch: norms, ratio, sigmoid gains, multiply, concatenate."""
    xu, xv = x[:, :split], x[:, split:]
    su = torch.linalg.vector_norm(xu, dim=1, keepdim=True)
    sv = torch.linalg.vector_norm(xv, dim=1, keepdim=True)
    r = su / (torch.sqrt(su**2 + sv**2) + eps)
    return torch.cat([torch.sigmoid(a_u * (r - b_u)) * xu, torch.sigmoid(a_v * (r - b_v)) * xv],
                     dim=1)


def eager_rmsnorm_tsra(x: torch.Tensor, split: int, eps: float = 1e-6):
    """Unlearned RMSNorm over channels, then :func:`eager_tsra`."""
    x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)
    return eager_tsra(x, split)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Return a function timing a callable in milliseconds (median)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100,
                                                        return_mode="median"))

    def cpu_time(fn):
        for _ in range(3):  # warm-up (torch.compile traces on the first calls)
            fn()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    return cpu_time


def _graph_timer(device: torch.device) -> Callable[[Callable[[], object]], float | None] | None:
    """On CUDA: median ms of a callable replayed from a CUDA graph (no host overhead), or
    ``None`` where it cannot be captured. ``None`` on a CPU."""
    if device.type != "cuda":
        return None
    from bench._timing import cudagraph_ms

    def graph_ms(fn):
        try:
            return cudagraph_ms(fn)
        except Exception:  # e.g. an op that cannot be captured
            torch.cuda.synchronize()
            return None

    return graph_ms


def _copy_ceiling(numel: int, dtype: torch.dtype, device: torch.device, timer, passes: int):
    """Best time to move ``passes`` × (read + write) of ``numel`` elements: torch copy vs a
    Triton copy kernel; returns (ms, which)."""
    src = torch.empty(numel * passes, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    best = (timer(lambda: dst.copy_(src)), "torch.copy_")
    if device.type == "cuda":
        from bench._triton_copy import triton_copy

        t = timer(lambda: triton_copy(src, dst))
        if t < best[0]:
            best = (t, "triton copy")
    return best


def _variants(op: str, split: int):
    if op == "tsra":
        eager = lambda x: eager_tsra(x, split)  # noqa: E731
        ours = lambda x: cobkern.tsra(x, split)  # noqa: E731
    else:
        eager = lambda x: eager_rmsnorm_tsra(x, split)  # noqa: E731
        ours = lambda x: cobkern.rmsnorm_tsra(x, split)  # noqa: E731
    compiled = torch.compile(eager, dynamic=False)
    return {"eager": eager, "compile": compiled, "cobkern": ours}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _reference(op: str, mode: str, x: torch.Tensor, dy: torch.Tensor,
               split: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The eager formula evaluated in float64 on ``x``: its output and, for fwd+bwd, the
    input gradient for the upstream gradient ``dy`` (else ``None``). Computed once from the
    NCHW tensors and shared by every layout's row (the values do not depend on the layout)."""
    eager = eager_tsra if op == "tsra" else eager_rmsnorm_tsra
    x64 = x.detach().double().requires_grad_(mode != "fwd")
    ref = eager(x64, split)
    if mode == "fwd":
        return ref.detach(), None
    (g64,) = torch.autograd.grad(ref, x64, dy.double())
    return ref.detach(), g64


def _accuracy(op: str, mode: str, x: torch.Tensor, dy: torch.Tensor, split: int,
              ref: tuple[torch.Tensor, torch.Tensor | None]) -> float:
    """Largest relative error of the fused op on ``x`` (output, and input gradient for
    ``dy`` for fwd+bwd) against ``ref`` (:func:`_reference` of the same values)."""
    ours = cobkern.tsra if op == "tsra" else cobkern.rmsnorm_tsra
    xg = x.detach().requires_grad_(mode != "fwd")
    out = ours(xg, split)
    err = _rel_err(out, ref[0])
    if mode != "fwd":
        (g,) = torch.autograd.grad(out, xg, dy)
        err = max(err, _rel_err(g, ref[1]))
    return err


def spec_bandwidth(name: str | None) -> float | None:
    """The vendor bandwidth (bytes/s) of the device called ``name`` (whitespace-normalised,
    matched whole in :data:`SPEC_BANDWIDTH`); ``None`` for an unknown name or none."""
    return SPEC_BANDWIDTH.get(" ".join(name.split())) if name else None


def _accuracy_failure(row: dict, err: float) -> str | None:
    """Why a row whose fused op erred by ``err`` must not be timed (a NaN/inf error, or one
    above :data:`REL_TOL` of its dtype), naming op, pass, dtype, shape and layout; else
    ``None``."""
    tol = REL_TOL[row["dtype"]]
    if math.isfinite(err) and err <= tol:
        return None
    what = "is not finite" if not math.isfinite(err) else f"exceeds the tolerance {tol:.1e}"
    return (f"{row['op']} {row['mode']} {row['dtype']} {'×'.join(map(str, row['shape']))} "
            f"{row['layout']}: relative error {err:.3g} {what}; not timed")


def _write(out_dir: str | None, env: dict, rows: list[dict]) -> None:
    """(Re)write the JSON (strict: ``allow_nan=False``) and Markdown results; called after
    every row."""
    if out_dir is None:
        return
    from cobkern._atomic import atomic_path

    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "bench_tsra.json")) as tmp, open(tmp, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1, allow_nan=False)
    with atomic_path(os.path.join(out_dir, "bench_tsra.md")) as tmp, open(tmp, "w") as f:
        f.write(f"Environment: `{json.dumps(env)}`\n\n{HEADER}\n")
        f.write("\n".join(_fmt_row(r) for r in rows) + "\n")


def run(shapes, batch, dtypes, device, ops=("tsra", "rmsnorm_tsra"), out_dir=None,
        env=None, layouts=("nchw",), passes=PASSES) -> list[dict]:
    """Time every (dtype, shape, op, pass, layout) row; ``layouts`` and ``passes`` as
    ``--layouts`` (2-D shapes run under ``nchw`` only) and ``--passes``. A row failing its
    accuracy check is not timed: it holds ``failed`` (see :func:`_accuracy_failure`)."""
    import torch._dynamo

    # each row compiles its own graph; never let Dynamo's recompile limit fall back to eager
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    timer = _timer(device)
    graph = _graph_timer(device)
    rows = []
    spec = spec_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    for dname in dtypes:
        dtype = DTYPES[dname]
        for shape in shapes:
            # 2-D (N × C) rows have no channels-last form: they run once, as nchw
            shape_layouts = [lay for lay in layouts if len(shape) == 3 or lay == "nchw"]
            if not shape_layouts:
                print(f"# {'×'.join(map(str, (batch, *shape)))}: no channels-last form, "
                      "skipped (add nchw to --layouts to time it)", flush=True)
                continue
            x = torch.randn((batch, *shape), device=device, dtype=dtype)
            dy = torch.randn_like(x)  # the upstream gradient of the fwd+bwd rows
            # the same values in each layout, x and dy alike, for every contender
            inputs = {lay: (x.contiguous(memory_format=LAYOUTS[lay]),
                            dy.contiguous(memory_format=LAYOUTS[lay])) for lay in shape_layouts}
            split = shape[0] // 2
            elem = x.element_size()
            ceilings: dict[str, tuple[float, str]] = {}  # per pass: the layout moves no bytes
            for op in ops:
                for mode in passes:
                    # minimum bytes: fwd = read x + write y; bwd = read x, dy + write dx
                    nbytes = x.numel() * elem * (2 if mode == "fwd" else 5)
                    if mode not in ceilings:
                        ceil_ms, ceil_how = _copy_ceiling(x.numel(), dtype, device, timer,
                                                          1 if mode == "fwd" else 3)
                        if mode == "fwd+bwd":  # copy moved 3 × (r + w) = 6 units; we need 5
                            ceil_ms *= 5 / 6
                        ceilings[mode] = (ceil_ms, ceil_how)
                    ceil_ms, ceil_how = ceilings[mode]
                    # every layout against one float64 reference, from the NCHW tensors
                    ref = _reference(op, mode, x, dy, split)
                    errs = {lay: _accuracy(op, mode, xl, dyl, split, ref)
                            for lay, (xl, dyl) in inputs.items()}
                    del ref  # not held while timing
                    for layout, (xl, dyl) in inputs.items():
                        err = errs[layout]
                        row = dict(op=op, mode=mode, dtype=dname, shape=[batch, *shape],
                                   layout=layout, bytes=nbytes, ceiling_ms=ceil_ms,
                                   ceiling_kind=ceil_how,
                                   rel_err=err if math.isfinite(err) else None)
                        failure = _accuracy_failure(row, err)
                        if failure is None:
                            _time_row(row, op, mode, xl, dyl, split, timer, graph, spec)
                        else:  # a wrong kernel: no timing, and loudly
                            row["failed"] = failure
                            print(f"FAILED {failure}", file=sys.stderr, flush=True)
                        rows.append(row)
                        print(_fmt_row(row), flush=True)
                        _write(out_dir, env or {}, rows)
            del x, dy, inputs
    return rows


def _time_row(row: dict, op: str, mode: str, x: torch.Tensor, dy: torch.Tensor, split: int,
              timer, graph, spec: float | None) -> None:
    """Time eager, compile and cobkern on ``x`` (and ``dy`` for fwd+bwd), both already in the
    row's layout; fill in ``row``'s timing, bandwidth and speed-up fields."""
    import torch._dynamo

    nbytes, ceil_ms = row["bytes"], row["ceiling_ms"]
    torch._dynamo.reset()
    for name, fn in _variants(op, split).items():
        if mode == "fwd":
            def call(fn=fn, x=x):
                with torch.no_grad():
                    return fn(x)
        else:
            xg = x.detach().requires_grad_(True)

            def call(fn=fn, xg=xg, dy=dy):
                return torch.autograd.grad(fn(xg), xg, dy)
        ms = timer(call)
        row[f"{name}_ms"] = ms
        row[f"{name}_GBps"] = nbytes / ms / 1e6
        if graph is not None:  # the same work without host overhead
            row[f"{name}_graph_ms"] = graph(call)
    row["pct_of_ceiling"] = 100 * ceil_ms / row["cobkern_ms"]
    row["pct_of_spec"] = (100 * nbytes / (row["cobkern_ms"] * 1e-3) / spec
                          if spec else None)
    row["speedup_vs_eager"] = row["eager_ms"] / row["cobkern_ms"]
    row["speedup_vs_compile"] = row["compile_ms"] / row["cobkern_ms"]
    g_ours, g_comp = row.get("cobkern_graph_ms"), row.get("compile_graph_ms")
    row["graph_speedup_vs_compile"] = g_comp / g_ours if g_ours and g_comp else None


def _fmt_row(r: dict) -> str:
    """The row's Markdown table line (:data:`HEADER`'s columns)."""
    if "failed" in r:  # not timed: the copy ceiling only
        err = (f"{r['rel_err']:.1e} > {REL_TOL[r['dtype']]:.1e}" if r["rel_err"] is not None
               else "not finite")
        return (f"| {r['op']} | {r['mode']} | {r['dtype']} | {'×'.join(map(str, r['shape']))} "
                f"| {r['layout']} | — | — | — | {r['ceiling_ms']:.3f} | — | — | — | — | — "
                f"| — | — | **failed**: {err} |")
    spec = f"{r['pct_of_spec']:.0f}%" if r["pct_of_spec"] is not None else "n/a"
    g = r.get("cobkern_graph_ms")
    gs = r.get("graph_speedup_vs_compile")
    graph = (f"{g:.4f}" if g else "n/a") + " | " + (f"{gs:.2f}×" if gs else "n/a")
    return (f"| {r['op']} | {r['mode']} | {r['dtype']} | {'×'.join(map(str, r['shape']))} | "
            f"{r['layout']} | {r['eager_ms']:.3f} | {r['compile_ms']:.3f} | "
            f"{r['cobkern_ms']:.3f} | {r['ceiling_ms']:.3f} | {r['cobkern_GBps']:.0f} | "
            f"{r['pct_of_ceiling']:.0f}% | {spec} | {r['speedup_vs_eager']:.2f}× | "
            f"{r['speedup_vs_compile']:.2f}× | {graph} | {r['rel_err']:.1e} |")


HEADER = ("| op | pass | dtype | shape | layout | eager ms | compile ms | cobkern ms | "
          "ceiling ms | cobkern GB/s | % ceiling | % spec | vs eager | vs compile | "
          "cobkern graph ms | vs compile (graphs) | rel. error |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def environment(device: torch.device) -> dict:
    env = {"date": _dt.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "device": str(device), "cobkern": cobkern.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def main(argv: list[str] | None = None) -> int:
    from bench import _args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-results", help="output folder (JSON + Markdown)")
    p.add_argument("--dtypes", default=None, help="comma list of bf16,fp32,fp16 "
                   "(default: bf16,fp32 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=_args.positive_int, default=None,
                   help="default 1024 on GPU, 8 on CPU")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--ops", default="tsra,rmsnorm_tsra", help="comma list of tsra,rmsnorm_tsra")
    p.add_argument("--layouts", default=None,
                   help="comma list of nchw,channels_last: the memory layout of the 4-D inputs "
                        "(x and dy) for every contender; 2-D shapes run under nchw only "
                        "(default: nchw,channels_last on GPU, nchw on CPU)")
    p.add_argument("--passes", default=",".join(PASSES),
                   help="comma list of fwd,fwd+bwd (fwd+bwd alone: the training pass, both "
                        "kernels, half the rows)")
    p.add_argument("--tuning", default=None, metavar="TABLE_JSON",
                   help="launch through this TSRA tuning table (bench/gpu_diag.py's "
                        "tsra_tuning.json) instead of the device's shipped one or the "
                        "heuristic; the same as COBKERN_TSRA_TUNING=TABLE_JSON")
    args = p.parse_args(argv)
    device = _args.device(p, args.device)
    _args.out_dir(p, args.out)
    gpu = device.type == "cuda"
    dtypes = (args.dtypes or ("bf16,fp32" if gpu else "fp32")).split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    if args.layouts is None:
        args.layouts = "nchw,channels_last" if gpu else "nchw"
    layouts = list(dict.fromkeys(args.layouts.split(",")))  # in the order given, once each
    bad = [lay for lay in layouts if lay not in LAYOUTS]
    if bad:
        p.error(f"--layouts: unknown layout(s) {bad}; choose from {list(LAYOUTS)}")
    passes = list(dict.fromkeys(args.passes.split(",")))
    bad = [m for m in passes if m not in PASSES]
    if bad:
        p.error(f"--passes: unknown pass(es) {bad}; choose from {list(PASSES)}")
    batch = args.batch if args.batch is not None else (1024 if gpu else 8)
    shapes = VGG_SHAPES if gpu else CPU_SHAPES
    env = environment(device)
    env["layouts"], env["passes"] = layouts, passes
    if args.tuning:
        from cobkern.ops.tuning import ENV_VAR, load_table

        try:
            table = load_table(args.tuning)
        except (OSError, ValueError) as e:
            p.error(f"--tuning: {e}")
        os.environ[ENV_VAR] = args.tuning  # every launch in this process uses the table
        env["tuning"] = {"from": args.tuning, "device": table.device, "launches": {
            "{} C={} split={} P={} {} {}B".format(e.direction, e.C, e.split, e.P,
                                                  "NHWC" if e.channels_last else "NCHW",
                                                  e.itemsize):
            "{tile_elems}/{elems_per_thread}/{num_warps}w VEC_P={vec_p}".format(**e.tuning)
            for e in table.entries}}
    print(json.dumps(env))
    print(HEADER)
    ops = args.ops.split(",")
    if set(ops) - {"tsra", "rmsnorm_tsra"}:
        p.error(f"unknown op(s) {sorted(set(ops) - {'tsra', 'rmsnorm_tsra'})}")
    rows = run(shapes, batch, dtypes, device, ops=ops, out_dir=args.out, env=env,
               layouts=layouts, passes=passes)
    failed = [r["failed"] for r in rows if "failed" in r]
    if failed:
        print(f"{len(failed)} row(s) failed the accuracy check and were not timed:\n  "
              + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
