"""Benchmark CoB calibration: the streaming covariance kernel vs materializing activations.

Run: ``python bench/bench_calibration.py [--out bench-results] [--width 1.0] [--images 10000]
[--batch 500] [--dtype fp32]``. Not part of the test suite.

Both methods calibrate every CoB layer of ``vgg16_tsra(width)`` (13 conv blocks + 2 hidden
linears) on the same images, in one run, side by side:

* ``streaming``   — :func:`cobkern.cob.calibrate`: forward hooks feed each batch to the
  covariance accumulator (the Triton kernel on CUDA: one read of the activations, ``O(C²)``
  float64 state per layer);
* ``streaming, overlapped`` — the same with ``calibrate(..., overlap=True)``: the kernels
  on a side CUDA stream, under the forward pass (on a CPU the same as ``streaming``);
* ``streaming, f32_dot=fp64`` (float32 only) — the same with the covariance kernel's
  products on the float64 tensor cores (``calibrate(..., f32_dot="fp64")``);
* ``streaming, f32_dot=tf32`` (float32 only) — one TF32 tensor-core product per float32
  product (``f32_dot="tf32"``: operands truncated by up to 2^-10; the cheapest mode);
* ``..., channels_last`` — the forward pass and the streaming rows (overlapped, ``fp64``
  and ``tf32`` too) again with the images in channels-last format
  (``calibrate(..., channels_last=True)``): the convolutions then give NHWC activations,
  whose channel-contiguous slabs the float32 Gram products read as conflict-free vectors
  (``--layouts nchw`` leaves these rows out);
* ``..., cuda graphs`` (CUDA only) — ``calibrate(..., cuda_graphs=True)``: each batch's
  forward pass and covariance kernels replayed as one CUDA graph (IEEE NCHW, IEEE
  channels-last, and ``tf32`` channels-last), beside ``forward only, cuda graph`` (and its
  channels-last twin): the plain forward pass replayed the same way, with the same policy
  (first batch eager, second captured, the rest replayed; capture inside the timing);
* ``..., fused conv bias`` / ``..., conv bias unfused`` (CUDA only, both layouts) —
  ``calibrate()`` sets a VGG's ``fuse_conv_bias`` for its pass on CUDA by default (each
  convolution's bias added inside the TSRA kernel behind it; since 2026-11-28, so the
  ``streaming`` rows on CUDA have it, while ``forward only`` is the model's own, unfused
  forward): the forward pass that way — the yardstick without the fusion's gain — and the
  calibration without it (``fuse_conv_bias=False``), side by side with the default;
* ``materialize`` — what the authors' notebook does: keep every layer's activations of all
  images, then flatten each to ``(N·H·W, C)`` and form ``H_Uᵀ H_U``, ``H_Vᵀ H_V`` in float32.

A plain forward pass over the same images (no hooks) is timed first in the same run: the
issue's goal is calibration at ≤ 1.2× its cost. "× forward pass" divides by the forward
pass in the same layout; "× NCHW forward" by the NCHW one; "× graphed forward" (graph rows
only) by the graphed forward pass in the same layout.

Reported per method: wall time (CUDA-synchronised), peak memory — measured
(``torch.cuda.max_memory_allocated`` above the model) on CUDA; on CPU the bytes the method
holds beyond the model (activations kept + statistics, computed exactly from the shapes:
the streaming rows' float64 statistics; ``materialize``'s activations of every layer plus
the float32 Gram matrices it forms from them; the transient copies that flatten one layer
at a time — concatenation, NHWC reshape, float32 cast — are not counted) —
and the largest relative difference between the two methods' Gram matrices. Images are
random ``N(0, 1)`` tensors (timing does not depend on the pixels). Results:
``OUT/bench_calibration.json`` and ``OUT/bench_calibration.md``.

On a CPU the defaults shrink (width 1/8, 256 images) so that it still runs; the streaming
column then runs the plain-PyTorch reference, which checks the harness, not the kernel.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import sys
import time
import warnings

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the row of float32 runs whose Grams use the float64 tensor cores
FP64 = "streaming, f32_dot=fp64"
#: ... and the row whose Grams use one TF32 tensor-core product per float32 product
TF32 = "streaming, f32_dot=tf32"
#: the channels-last rows (calibrate(channels_last=True) and its yardstick)
CL = "streaming, channels_last"
FWD_CL = "forward only, channels_last"
#: calibrate()'s default on CUDA adds the VGG's conv biases inside the TSRA kernels: the
#: forward pass that way, and the calibration without it (CUDA only)
FWD_FUSED = "forward only, fused conv bias"
UNFUSED = "streaming, conv bias unfused"
FWD_FUSED_CL = FWD_FUSED + ", channels_last"
UNFUSED_CL = UNFUSED + ", channels_last"
#: the graph rows (calibrate(cuda_graphs=True)) and their yardsticks
GRAPHS = "streaming, cuda graphs"
FWD_GRAPH = "forward only, cuda graph"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loader(images: int, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    data = torch.randn(images, 3, 32, 32, generator=g)
    return [data[i:i + batch].to(device=device, dtype=dtype) for i in range(0, images, batch)]


def run_forward(model, loader, device, channels_last=False, fuse_conv_bias=False):
    """A plain forward pass over the same images: the yardstick for calibration's cost
    (channels_last: each batch converted as ``calibrate(channels_last=True)`` does;
    fuse_conv_bias: the VGG's biases added inside the TSRA kernels, as calibration does on
    CUDA by default)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.fuse_conv_bias = fuse_conv_bias
    try:
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            for x in loader:
                model(x.contiguous(memory_format=fmt))
        _sync(device)
    finally:
        del model.fuse_conv_bias  # back to the class default (off)
    return time.perf_counter() - t, None, 0


def run_forward_graphed(model, loader, device, channels_last=False):
    """The forward pass replayed as a CUDA graph, by the runner ``calibrate(cuda_graphs=True)``
    uses (no accumulators): the yardstick of the graph rows. The third value notes a
    failed capture (then the rows are eager)."""
    from cobkern.cob.graphs import ForwardReplay

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    run = ForwardReplay(model, [])
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for x in loader:
            run(x.contiguous(memory_format=fmt))
    _sync(device)
    elapsed = time.perf_counter() - t
    run.close()
    return elapsed, None, 0, _capture_note(caught)


def _capture_note(caught) -> dict:
    failed = [str(w.message) for w in caught if "capture" in str(w.message)]
    return {"graph_capture_failed": failed[0]} if failed else {}


def run_streaming(model, loader, device, overlap=False, f32_dot=None, channels_last=False,
                  cuda_graphs=False, fuse_conv_bias=None):
    from cobkern.cob import calibrate

    _sync(device)
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        stats = calibrate(model, loader, max_samples=None, progress=False, overlap=overlap,
                          f32_dot=f32_dot, channels_last=channels_last,
                          cuda_graphs=cuda_graphs, fuse_conv_bias=fuse_conv_bias)
    _sync(device)
    elapsed = time.perf_counter() - t
    held = sum((s.gram_u.numel() + s.gram_v.numel() + 2 * s.sum_sq.numel() + 1) * 8
               for s in stats)
    return elapsed, stats, held, _capture_note(caught)


def _nbytes(tensors) -> int:
    """Bytes of the elements of ``tensors`` (an iterable of tensors)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def run_materialize(model, loader, device):
    """The authors' method: keep every CoB layer's activations of all images, then form each
    layer's ``H_Uᵀ H_U``, ``H_Vᵀ H_V`` in float32. Returns (seconds, Grams by layer name,
    bytes held: the activations kept plus the Grams formed — the transient copies that
    flatten one layer at a time are not counted)."""
    from cobkern.cob import find_cob_layers

    layers = find_cob_layers(model)
    acts: dict[str, list[torch.Tensor]] = {lay.name: [] for lay in layers}
    hooks = [lay.activation.register_forward_hook(
        lambda m, i, o, n=lay.name: acts[n].append(o.detach())) for lay in layers]
    _sync(device)
    t = time.perf_counter()
    grams = {}
    held = 0
    try:
        with torch.no_grad():
            for x in loader:
                model(x)
        held = _nbytes(a for v in acts.values() for a in v)
        for lay in layers:
            a = torch.cat(acts.pop(lay.name))
            c = a.shape[1]
            h = a.movedim(1, -1).reshape(-1, c).float()
            del a
            hu, hv = h[:, :lay.split], h[:, lay.split:]
            grams[lay.name] = (hu.T @ hu, hv.T @ hv)
            del h, hu, hv
    finally:
        for hk in hooks:
            hk.remove()
    _sync(device)
    elapsed = time.perf_counter() - t
    return elapsed, grams, held + _nbytes(g for pair in grams.values() for g in pair)


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    from bench import _args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-results")
    p.add_argument("--width", type=_args.positive_float, default=1.0 if cuda else 0.125)
    p.add_argument("--images", type=_args.positive_int, default=10_000 if cuda else 256)
    p.add_argument("--batch", type=_args.positive_int, default=500 if cuda else 64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--layouts", default="nchw,nhwc",
                   help="comma list: nchw, nhwc (channels-last images: the forward pass and "
                        "streaming rows again)")
    p.add_argument("--repeats", type=_args.positive_int, default=3 if cuda else 1,
                   help="runs per method; the fastest counts (one ~0.1 s GPU pass is noisy)")
    args = p.parse_args(argv)
    _args.out_dir(p, args.out)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or set(layouts) - {"nchw", "nhwc"} or "nchw" not in layouts:
        p.error(f"--layouts must be nchw or nchw,nhwc, got {args.layouts!r}")
    nhwc = "nhwc" in layouts

    from cobkern.cob import find_cob_layers
    from cobkern.models import vgg16_tsra

    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    model = vgg16_tsra(width=args.width).to(device=device, dtype=dtype).eval()
    loader = _loader(args.images, args.batch, device, dtype)
    with torch.no_grad():  # warm-up: kernel compilation / autotuning outside the timings
        from cobkern.cob import calibrate

        for cl in (False, True) if nhwc else (False,):
            calibrate(model, loader[:1], max_samples=None, progress=False, channels_last=cl)
            if dtype == torch.float32:
                for dot in ("fp64", "tf32"):
                    calibrate(model, loader[:1], max_samples=None, progress=False,
                              f32_dot=dot, channels_last=cl)
            fmt = torch.channels_last if cl else torch.contiguous_format
            model(loader[0].contiguous(memory_format=fmt))

    results = {}
    methods = [("forward only", run_forward)]
    if nhwc:
        methods.append((FWD_CL, functools.partial(run_forward, channels_last=True)))
    methods += [("streaming", run_streaming),
                ("streaming, overlapped", functools.partial(run_streaming, overlap=True))]
    if cuda:  # calibrate() fuses the convolutions' biases there by default: both ways
        methods.append((FWD_FUSED, functools.partial(run_forward, fuse_conv_bias=True)))
        methods.append((UNFUSED, functools.partial(run_streaming, fuse_conv_bias=False)))
    if dtype == torch.float32:  # the float64 and the TF32 tensor-core products
        methods.append((FP64, functools.partial(run_streaming, f32_dot="fp64")))
        methods.append((TF32, functools.partial(run_streaming, f32_dot="tf32")))
    if nhwc:
        methods.append((CL, functools.partial(run_streaming, channels_last=True)))
        if cuda:  # calibrate() fuses the convolutions' biases there by default: both ways
            methods.append((FWD_FUSED_CL, functools.partial(
                run_forward, channels_last=True, fuse_conv_bias=True)))
            methods.append((UNFUSED_CL, functools.partial(
                run_streaming, channels_last=True, fuse_conv_bias=False)))
        methods.append(("streaming, overlapped, channels_last",
                        functools.partial(run_streaming, overlap=True, channels_last=True)))
        if dtype == torch.float32:
            for name, dot in ((FP64, "fp64"), (TF32, "tf32")):
                methods.append((name + ", channels_last",
                                functools.partial(run_streaming, f32_dot=dot,
                                                  channels_last=True)))
    if cuda:  # CUDA graphs: the graphed forward passes, then the graphed calibrations
        methods.append((FWD_GRAPH, run_forward_graphed))
        if nhwc:
            methods.append((FWD_GRAPH + ", channels_last",
                            functools.partial(run_forward_graphed, channels_last=True)))
        methods.append((GRAPHS, functools.partial(run_streaming, cuda_graphs=True)))
        if nhwc:
            methods.append((GRAPHS + ", channels_last",
                            functools.partial(run_streaming, cuda_graphs=True,
                                              channels_last=True)))
            if dtype == torch.float32:
                methods.append((TF32 + ", cuda graphs, channels_last",
                                functools.partial(run_streaming, f32_dot="tf32",
                                                  cuda_graphs=True, channels_last=True)))
    methods.append(("materialize", run_materialize))
    outs: dict = {}  # each method's statistics / Grams, for the comparisons at the end
    record = {
        "benchmark": "calibration",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": sys.version.split()[0],
        "width": args.width, "images": args.images, "batch": args.batch, "dtype": args.dtype,
        "repeats": args.repeats,
        "layers": len(find_cob_layers(model)),
        "max_rel_diff_gram": None,
        "max_rel_diff_overlapped_vs_streaming": None,
        "max_rel_diff_fp64_vs_streaming": None,
        "max_rel_diff_tf32_vs_streaming": None,
        "max_rel_diff_channels_last_vs_streaming": None,
        "max_rel_diff_cuda_graphs_vs_streaming": None,
        "layouts": layouts,
        "results": results,
        "partial": True,
        "note": ("CPU run: the streaming column is the reference path (harness check only)"
                 if not cuda else "CUDA: streaming uses the Triton covariance kernel"),
    }
    for name, fn in methods:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        elapsed, notes = float("inf"), {}
        for _ in range(args.repeats):  # the same policy for every method: the fastest run
            outs[name] = None  # the previous repeat's output is not held during the next one
            t, outs[name], held, *extra = fn(model, loader, device)
            elapsed = min(elapsed, t)
            notes.update(*extra)
        peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
        results[name] = {"seconds": elapsed, "images_per_s": args.images / elapsed,
                         "peak_bytes_measured": peak, "bytes_held": held, **notes}
        _ratios(results)
        _write(args.out, record)  # a run stopped by a deadline keeps the rows it timed

    stats, grams = outs["streaming"], outs["materialize"]
    stats_overlapped, stats_cl = outs["streaming, overlapped"], outs.get(CL)
    stats_fp64, stats_tf32 = outs.get(FP64), outs.get(TF32)
    stats_graphs = outs.get(GRAPHS)
    worst = worst_overlap = worst_fp64 = worst_tf32 = worst_cl = worst_graphs = 0.0
    for n, (gu, gv) in grams.items():
        for a, b, o in ((stats[n].gram_u, gu, stats_overlapped[n].gram_u),
                        (stats[n].gram_v, gv, stats_overlapped[n].gram_v)):
            b = b.double().cpu()
            worst = max(worst, _rel(a, b))
            worst_overlap = max(worst_overlap, _rel(o, a))
        if stats_cl is not None:  # the same products of NHWC activations
            worst_cl = max(worst_cl, _rel(stats_cl[n].gram_u, stats[n].gram_u),
                           _rel(stats_cl[n].gram_v, stats[n].gram_v))
        if stats_fp64 is not None:  # against IEEE streaming: the two float32-exact products
            worst_fp64 = max(worst_fp64, _rel(stats_fp64[n].gram_u, stats[n].gram_u),
                             _rel(stats_fp64[n].gram_v, stats[n].gram_v))
        if stats_graphs is not None:
            worst_graphs = max(worst_graphs, _rel(stats_graphs[n].gram_u, stats[n].gram_u),
                               _rel(stats_graphs[n].gram_v, stats[n].gram_v))
        if stats_tf32 is not None:
            worst_tf32 = max(worst_tf32, _rel(stats_tf32[n].gram_u, stats[n].gram_u),
                             _rel(stats_tf32[n].gram_v, stats[n].gram_v))
    record.update({
        "max_rel_diff_gram": worst,
        "max_rel_diff_overlapped_vs_streaming": worst_overlap,
        "max_rel_diff_fp64_vs_streaming": worst_fp64 if stats_fp64 is not None else None,
        "max_rel_diff_tf32_vs_streaming": worst_tf32 if stats_tf32 is not None else None,
        "max_rel_diff_channels_last_vs_streaming": worst_cl if stats_cl is not None else None,
        "max_rel_diff_cuda_graphs_vs_streaming": (worst_graphs if stats_graphs is not None
                                                  else None),
        "partial": False,
    })
    _write(args.out, record)
    print(_markdown(record))
    return record


def _ratios(results: dict) -> None:
    """Each row's time over the forward pass in its own layout and over the NCHW one, and
    (graph rows) over the graphed forward pass in its own layout."""
    fwd = results["forward only"]["seconds"]
    fwd_cl = results.get(FWD_CL, {}).get("seconds")
    for name, v in results.items():
        cl = name.endswith("channels_last")
        own = fwd_cl if cl else fwd
        v["x_forward"] = v["seconds"] / own if own else None
        v["x_nchw_forward"] = v["seconds"] / fwd
        if "cuda graph" in name:
            graphed = results.get(FWD_GRAPH + (", channels_last" if cl else ""), {})
            v["x_forward_graphed"] = (v["seconds"] / graphed["seconds"] if graphed
                                      else None)


def _write(out: str, record: dict) -> None:
    """Write the JSON and Markdown results (again after every method)."""
    os.makedirs(out, exist_ok=True)
    for name, text in (("bench_calibration.json", json.dumps(record, indent=2)),
                       ("bench_calibration.md", _markdown(record))):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest entry of ``|a - b|`` relative to the largest entry of ``|b|``."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _mib(x: int | None) -> str:
    return "—" if x is None else f"{x / 2**20:,.1f}"


def _markdown(r: dict) -> str:
    lines = [
        f"# Calibration benchmark ({r['device']})",
        "",
        f"VGG-16 TSRA, width {r['width']}, {r['images']} images, batch {r['batch']}, "
        f"{r['dtype']}, {r['layers']} CoB layers; torch {r['torch']}, triton {r['triton']}; "
        f"{r['date']}. Time: the fastest of {r.get('repeats', 1)} run(s) per method.",
        "",
        "| method | time (s) | × forward pass | × NCHW forward | × graphed forward "
        "| images/s | peak memory measured (MiB) | bytes held (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failed = []
    for name, v in r["results"].items():
        own = "—" if v.get("x_forward") is None else f"{v['x_forward']:.2f}"
        graphed = ("—" if v.get("x_forward_graphed") is None
                   else f"{v['x_forward_graphed']:.2f}")
        if v.get("graph_capture_failed"):
            failed.append(f"{name}: {v['graph_capture_failed']}")
        lines.append(f"| {name} | {v['seconds']:.3f} | {own} | "
                     f"{v.get('x_nchw_forward', v['x_forward']):.2f} | {graphed} | "
                     f"{v['images_per_s']:,.0f} | "
                     f"{_mib(v['peak_bytes_measured'])} | {_mib(v['bytes_held'])} |")
    if failed:
        lines += ["", "**Graph capture failed** (these rows ran eagerly): " + "; ".join(failed)]
    if r.get("partial"):
        lines += ["", "**Partial**: the run stopped before every method was timed (rows so "
                  "far; no Gram comparison)."]
        return "\n".join(lines + ["", r["note"], ""])
    lines += ["", f"Largest relative difference between the streaming and materialising "
              f"Gram matrices: {r['max_rel_diff_gram']:.2e}; overlapped vs streaming: "
              f"{r['max_rel_diff_overlapped_vs_streaming']:.2e}."]
    if r.get("max_rel_diff_fp64_vs_streaming") is not None:
        lines[-1] += (f" `f32_dot=fp64` vs IEEE streaming: "
                      f"{r['max_rel_diff_fp64_vs_streaming']:.2e}.")
    if r.get("max_rel_diff_tf32_vs_streaming") is not None:
        lines[-1] += (f" `f32_dot=tf32` vs IEEE streaming: "
                      f"{r['max_rel_diff_tf32_vs_streaming']:.2e}.")
    if r.get("max_rel_diff_cuda_graphs_vs_streaming") is not None:
        lines[-1] += (f" cuda graphs vs streaming: "
                      f"{r['max_rel_diff_cuda_graphs_vs_streaming']:.2e}.")
    if r.get("max_rel_diff_channels_last_vs_streaming") is not None:
        lines[-1] += (f" channels_last vs NCHW streaming (different convolution kernels "
                      f"too): {r['max_rel_diff_channels_last_vs_streaming']:.2e}.")
    lines += ["", "× forward pass: against the forward pass in the same layout (the "
              "channels_last rows against `forward only, channels_last`)."]
    if FWD_FUSED in r["results"]:
        lines[-1] += (" On CUDA the streaming rows add the convolutions' biases inside the "
                      "TSRA kernels (calibrate's default there) while `forward only` is "
                      "the model's plain forward; `forward only, fused conv bias` is that "
                      "forward with the same fusion.")
    lines += ["", r["note"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
