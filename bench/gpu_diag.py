"""Diagnostics for a short GPU lease: where the time of the TSRA ops and of calibration goes.

Run: ``python bench/gpu_diag.py --out DIR [--parts covariance,tiles]``. CUDA only (a CPU
smoke run: ``TRITON_INTERPRET=1 GPU_DIAG_DEVICE=cpu GPU_DIAG_BATCH=1 GPU_DIAG_COV_BATCH=1``).

* ``tiles``       — the TSRA kernels alone (CUDA-graph replay, no host overhead) at the VGG-16
  shapes, batch 1024, bf16 and fp32, forward and backward, of the ops in ``TILE_OPS``
  (RMSNorm→TSRA by default, the layer the models run), for the shipped tile configuration
  and alternatives (elements per program tile × elements per thread, and 1-/2-/4-warp
  programs), as % of the device-copy
  bandwidth measured in the same run. Variants are compiled in parallel worker processes
  first (they share Triton's on-disk cache), so the sweep costs seconds, not minutes.
* ``overhead``    — forward+backward per call through the eager fast path
  (``autograd.Function``), through the registered custom op, through the fast path with
  every launch going through ``JITFunction.run`` (``cobkern.kernels._launch`` off), through
  the fast path with a layer's bias added in the kernel (its gradient included), compiled
  (``torch.compile`` of the forward, the backward by AOTAutograd) through the opaque custom
  ops and through the inline ``triton_op``s, and replayed from a CUDA graph: the differences
  are host time.
* ``covariance``  — the covariance kernel alone (CUDA-graph replay) at each VGG-16 layer's
  activation shape, batch 500, fp32 and bf16: the shipped launch against the same launch
  with one pipeline stage (float32's launch before 2026-11-26), with the other Gram tile
  size (32 vs 64), with a quarter / four times the programs (each program ends with one
  tile of float64 atomic adds), with more samples a step (bf16: 128, 256; float32: 64) and
  fewer warps a program (float32 IEEE: 2 and 1, with 2× and 4× the programs), and with
  ``tf32`` / ``tf32x3`` / ``bf16x6`` float32 products (one or three TF32 / six bf16
  tensor-core products per float32 product), with ``fp64`` products (float64 tensor
  cores), and on channels_last maps (``NHWC``: channel-contiguous slabs, as
  ``calibrate(channels_last=True)`` gives the kernel); achieved TFLOP/s of the products
  actually computed.
* ``biasgrad``    — the RMSNorm→TSRA backward with a convolution's bias (CUDA-graph replay)
  at the VGG-16 conv shapes, bf16 and fp32, NCHW and channels_last: the bias gradient as
  ``dx`` summed over the positions in a pass of its own, against the kernel writing its
  per-program partial sums (``BIAS_GRAD``) and a sum over programs; the backward without a
  bias gradient beside them.
* ``nhwcsplit``   — the channels-last RMSNorm→TSRA kernels (CUDA-graph replay, a bias added
  as ``fuse_conv_bias`` launches them) at the VGG-16 conv shapes, bf16 and fp32, forward and
  backward: the split kernels (U and V channel blocks, shipped for 16-aligned splits since
  2026-11-27) against the single tile with per-element subspace selects (shipped before),
  each with the launch heuristic.
* ``calibration`` — a plain forward pass vs streaming calibration (float32 ``ieee``,
  ``tf32``, ``tf32x3``, ``bf16x6`` and ``fp64`` products, and a bf16 model; ``ieee``,
  ``tf32``, ``fp64`` and bf16 also with channels_last inputs, against a channels_last
  forward) on 10,000 images of VGG-16, each the fastest of three runs; each Gram's error
  against float64 and each mode's lossless counts; what copying the statistics to the host
  adds; and the profiler's top CUDA kernels of a streaming calibration (float32 NCHW, and
  the bf16 model channels-last).

Writes ``DIR/gpu_diag.json`` and ``DIR/gpu_diag.md`` (rewritten after each part), and after
the ``tiles`` part ``DIR/tsra_tuning.json``: the sweep as a ``cobkern.ops.tuning`` table
(each problem's winner where it beats the launchers' heuristic by more than
:data:`MIN_GAIN`), ready to ship as ``cobkern/ops/tuning_tables/<device>.json`` or to try
with ``COBKERN_TSRA_TUNING=DIR/tsra_tuning.json``. ``--table-from gpu_diag.json`` rewrites
it from an earlier run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

import torch

#: the tile sweep's VGG-16 activation shapes (C, H, W) or (C,), at batch BATCH
SHAPES = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2), (4096,)]
#: Layouts of the conv shapes in the tile sweep (``GPU_DIAG_LAYOUTS``, comma list):
#: ``nchw`` (what ``bench_tsra.py`` times) and ``nhwc`` — channels_last, what training with
#: ``channels_last=True`` (the ``fast`` preset, ``bench_training.py``) launches. The linear
#: shape is timed once (its rows are channels-contiguous in either case).
LAYOUTS = tuple(x.strip() for x in os.environ.get("GPU_DIAG_LAYOUTS", "nchw,nhwc").split(",")
                if x.strip())
if not LAYOUTS or set(LAYOUTS) - {"nchw", "nhwc"}:
    raise SystemExit(f"GPU_DIAG_LAYOUTS must list nchw and/or nhwc, got {LAYOUTS!r}")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Directions of the tile sweep (``GPU_DIAG_TILE_DIRECTIONS``, comma list of ``forward`` and
#: ``backward``; default both). A sweep of one direction leaves the tuning table's entries of
#: the other as they were (:func:`merge_tables`).
TILE_DIRECTIONS = tuple(x.strip() for x in os.environ.get(
    "GPU_DIAG_TILE_DIRECTIONS", "forward,backward").split(",") if x.strip())
if not TILE_DIRECTIONS or set(TILE_DIRECTIONS) - {"forward", "backward"}:
    raise SystemExit(f"GPU_DIAG_TILE_DIRECTIONS must list forward and/or backward, got "
                     f"{TILE_DIRECTIONS!r}")
#: Ops of the tile sweep (``GPU_DIAG_TILE_OPS``, comma list of ``rmsnorm_tsra`` and
#: ``tsra``). Default RMSNorm→TSRA, the layer the VGG-16 models run: the sweeps up to the
#: second lease of 2026-11-27 timed plain TSRA only, and with their tile the bf16 NCHW
#: RMSNorm→TSRA backward at 1024×64×32×32 took 0.129 ms against TSRA's 0.098 (0.195 / 0.164
#: ms forward+backward, CUDA graphs). The table entries record the op they were timed on
#: (``cobkern.ops.tuning``).
TILE_OPS = tuple(x.strip() for x in os.environ.get("GPU_DIAG_TILE_OPS", "rmsnorm_tsra")
                 .split(",") if x.strip())
if not TILE_OPS or set(TILE_OPS) - {"tsra", "rmsnorm_tsra"}:
    raise SystemExit(f"GPU_DIAG_TILE_OPS must list tsra and/or rmsnorm_tsra, got {TILE_OPS!r}")
#: Backward candidates of the streaming kernel (a fixed grid of programs per SM, each
#: loading its next tile while it computes the current one; added 2026-11-28, not yet
#: timed). The bf16 NCHW RMSNorm→TSRA backward at 1024×64×32×32 took 0.127 ms on the H200
#: (2026-11-28) with the 2048/32/2w VEC_P=2 tile that ran plain TSRA in 0.098 (2026-11-27):
#: the same bytes, 8 % more instructions (offline sm_90: 27.3 against 25.3 per element), so the
#: longer per-position chain between a program's loads and its stores, with no load in
#: flight, is the lead. Offline (sm_90, triton 3.8, bf16 at that shape): the streaming
#: 2048/32/2w takes 191 registers (5 programs fit an SM), 1024/16/2w 115 (8), 2048/16/4w 124
#: (4), with 26.9 / 37.8 / 38.8 SASS instructions per element in the loop; channels-last
#: 64 registers at 16 per thread (hence 8 programs of 4 warps too). NCHW tiles need the
#: capped position vector here: with ``VEC_P=0`` the 16-per-thread loops issued 88-106 per
#: element. No spills at any sweep shape (``tests/test_tsra_aot.py`` compiles every
#: candidate).
STREAM_CONFIGS = [(2048, 32, 2, 2, 4), (1024, 16, 2, 2, 8), (2048, 16, 4, 2, 4),
                  (2048, 16, 4, 2, 8), (4096, 16, 8, 2, 2)]
# (tile elements, elements per thread[, warps[, VEC_P[, programs per SM]]]); the heuristic's
# launch is among them and marked in the results (forward 16 KiB tiles with 64 B per
# thread — 4096/16 fp32, 8192/32 bf16 — since the 2026-11-26 sweep; backward 4096/32 since
# the 2026-11-27 one, which timed it faster than 4096/16 at every conv shape). When first
# listed, not yet measured:
# 4- and 2-warp tiles (7 barriers per bf16 forward program at 64×32×32 instead of 15),
# 1-warp tiles (channel
# reductions all warp shuffles, no shared memory or barrier), and 1- and 2-warp tiles with a
# capped position vector (VEC_P: far fewer repeated per-position ops — `kernel_proxies.py
# --vec`; a 1-warp program of 1,024 elements is small, so launch and block scheduling may
# weigh: the 2-warp and 2,048-element candidates hedge that).
# Dropped after an offline sm_90 check of every candidate at every timed shape
# (tests/test_tsra_aot.py): forward 16384/32 and backward 8192/16 spill in bf16 (16-warp
# programs, which the 2026-11-26 sweep had already found 1.7-2.1x slower than 8-warp ones).
# Added after the H200's second lease of 2026-11-27 (not yet timed): backward 8192/32 (8
# warps) with VEC_P 0 / 2 / 4 and 4096/32 with VEC_P 4 — the NCHW bf16 backward at
# 1024×128×16×16 ran at 71 % of the copy rate with the table's 2048/32/2w VEC_P=2 launch
# (16-position rows: 32 bytes of each channel per program, 4-byte loads), against 100 %
# channels-last; these give each program 64-position rows (whole 128-byte lines) and, with
# VEC_P=4, 8-byte loads, at 28.2-32.8 SASS instructions per element offline (issue floor
# 0.68-0.78 of the memory floor), no spills under triton 3.8 or 3.6.
CONFIGS = {"forward": [(4096, 16), (8192, 16), (8192, 32), (2048, 8), (4096, 8),
                       (4096, 32), (8192, 64), (2048, 16),
                       (2048, 32, 2), (1024, 16, 2), (1024, 32, 1), (512, 16, 1),
                       (1024, 32, 1, 2), (2048, 64, 1, 4), (2048, 64, 1, 2),
                       (2048, 32, 2, 2)],
           "backward": [(2048, 8), (4096, 8), (4096, 16), (1024, 4), (2048, 4),
                        (2048, 16), (4096, 32), (1024, 16, 2), (512, 16, 1),
                        (1024, 32, 1, 2), (1024, 32, 1, 4), (512, 16, 1, 2),
                        (2048, 32, 2, 2), (8192, 32), (8192, 32, 8, 2), (8192, 32, 8, 4),
                        (4096, 32, 4, 4), *STREAM_CONFIGS]}
# VGG-16 CoB layer activations (C, H, W) at calibration batch 500, for the covariance sweep
COV_SHAPES = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2), (4096,)]
COV_BATCH = int(os.environ.get("GPU_DIAG_COV_BATCH", "500"))
BATCH = int(os.environ.get("GPU_DIAG_BATCH", "1024"))
#: ``GPU_DIAG_DEVICE=cpu`` (with ``TRITON_INTERPRET=1``) smoke-tests the script without a GPU
DEVICE = os.environ.get("GPU_DIAG_DEVICE", "cuda")
CONSTS = (5.0, 0.5, 5.0, 0.7, 1e-12, 0, 0.0)  # a_u, b_u, a_v, b_v, eps, norm_size, rms_eps
RMS_EPS = 1e-6  # RMSNorm→TSRA launches: norm_size = C (the unpruned default), this eps


def tile_cases() -> list[tuple[tuple[int, ...], bool]]:
    """``(shape, nhwc)`` of every tile-sweep problem: each conv shape in each of
    :data:`LAYOUTS`, the linear shape once."""
    return [(s, lay == "nhwc") for s in SHAPES for lay in (LAYOUTS if len(s) > 1 else ("nchw",))]


def problem(shape, nhwc: bool = False) -> tuple[int, int, bool]:
    """``(C, P, channels_contig)`` of the kernels' view of a ``(BATCH, *shape)`` activation:
    NCHW conv shapes are ``BATCH`` images of ``H·W`` positions, channels_last ones
    (``nhwc``) and the linear rows one run of channel-contiguous positions."""
    if len(shape) == 1:
        return shape[0], BATCH, True
    hw = shape[1] * shape[2]
    return (shape[0], BATCH * hw, True) if nhwc else (shape[0], hw, False)


def fits(shape, itemsize: int, direction: str, cfg, nhwc: bool = False) -> bool:
    """Whether a candidate's tile, at this shape, stays within the elements it asks for.

    A tile always spans every channel of a position, so a candidate smaller than one
    position's channels (a 1,024-element tile of the 4096-wide linear layer) is silently
    enlarged, and each thread then holds many times its intended elements: offline sm_90
    compiles of the 1-warp backward candidates there spill 0.3-8 KB per thread. Such
    launches are not timed (and so never enter a tuning table). Nor are channels-last
    candidates of more than 32 elements per thread: on the split kernels (channels-last
    since 2026-11-27) triton 3.6's sm_90 compile of the 64-per-thread bf16 forward spills at
    128-512 channels (64 registers, 4 bytes; ``tests/test_tsra_aot.py``, compat venv); the
    heuristic holds 16-32.
    """
    from cobkern.kernels.tsra import specialization

    c, p, cl = problem(shape, nhwc)
    if cl and cfg and cfg[1] > 32:
        return False
    spec = specialization(c, p, c // 2, cl, direction, False, itemsize, **_tuning(cfg))
    return _tile_fits(spec, cfg)


def _tile_fits(spec, cfg) -> bool:
    """:func:`fits` for an already resolved launch ``spec`` (``specialization``'s result)."""
    consts = spec[1]
    rows = consts.get("BLOCK_C") or consts["BLOCK_U"] + consts["BLOCK_V"]
    return rows * consts["BLOCK_P"] <= cfg[0]


def _tensors(shape, dtype, direction, nhwc: bool = False):
    x = torch.randn((BATCH, *shape), device=DEVICE, dtype=dtype)
    if nhwc:
        x = x.to(memory_format=torch.channels_last)  # empty_like / randn_like keep it
    out = torch.empty_like(x)
    return (x, out) if direction == "forward" else (torch.randn_like(x), x, out)


def _tuning(cfg) -> dict:
    """Launch overrides of a ``(tile, elems per thread[, warps[, VEC_P[, programs per
    SM]]])`` entry (``programs_per_sm`` only where given: the streaming backward)."""
    tile, ept, warps, vec_p, pps = (*cfg, None, None, None)[:5] if cfg else (None,) * 5
    over = dict(tile_elems=tile, elems_per_thread=ept, num_warps=warps, vec_p=vec_p)
    return dict(over, programs_per_sm=pps) if pps else over


def _launch(direction, tensors, cfg, rmsnorm: bool = False):
    from cobkern.kernels import tsra as k
    from cobkern.ops._checks import channel_geometry

    geo = channel_geometry(tensors[0], 1)
    split = tensors[0].shape[1] // 2
    consts = (*CONSTS[:5], geo.C, RMS_EPS) if rmsnorm else CONSTS
    k._launch(direction, tensors, geo, split, *consts, **_tuning(cfg))


def _run_tile_job(job) -> None:
    shape, nhwc, dname, direction, cfg, op = job
    _launch(direction, _tensors(shape, DTYPES[dname], direction, nhwc), cfg,
            op == "rmsnorm_tsra")


def _run_cov_job(job) -> None:
    _cov_case(*job)[0]()


def _compile_worker(run_job, jobs) -> int:
    """Worker process: run each job once, which compiles its kernel variant into Triton's
    on-disk cache (shared with the parent); failures are reported by the timing pass."""
    done = 0
    for job in jobs:
        try:
            run_job(job)
            done += 1
        except Exception as e:
            print(f"compile failed {job}: {e}", flush=True)
    _sync()
    return done


def precompile(run_job, jobs) -> int:
    """Compile every variant in parallel worker processes; returns how many compiled."""
    n_workers = min(14, os.cpu_count() or 4)
    with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as ex:
        chunks = [jobs[i::n_workers] for i in range(n_workers)]
        return sum(ex.map(_compile_worker, [run_job] * n_workers, chunks))


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _wall_ms(fn, n: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def _fastest_s(fn, repeats: int = 3):
    """``(seconds, result)``: the fastest of ``repeats`` CUDA-synchronised runs of ``fn``
    (one ~0.1 s calibration or forward pass is noisy) and the last run's result; a run's
    result is released before the next run starts."""
    best, result = float("inf"), None
    for _ in range(repeats):
        result = None
        _sync()
        t = time.perf_counter()
        result = fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best, result


def _graph_ms(fn, rep_ms: float = 30.0) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (no host overhead); wall time on a
    CPU smoke run."""
    if DEVICE != "cuda":
        return _wall_ms(fn)
    from bench._timing import cudagraph_ms

    return cudagraph_ms(fn, rep_ms)


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**29 if DEVICE == "cuda" else 2**20, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = _graph_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def part_tiles(rec: dict) -> None:
    from cobkern.kernels.tsra import specialization
    from cobkern.ops._checks import channel_geometry

    jobs = [(s, nhwc, d, dr, cfg, op) for s, nhwc in tile_cases() for d in DTYPES
            for dr in TILE_DIRECTIONS for cfg in CONFIGS[dr] for op in TILE_OPS
            if fits(s, DTYPES[d].itemsize, dr, cfg, nhwc)]
    t0 = time.perf_counter()
    compiled = precompile(_run_tile_job, jobs)
    rec["tiles_compile_s"] = time.perf_counter() - t0
    print(f"compiled {compiled}/{len(jobs)} variants in {rec['tiles_compile_s']:.1f}s",
          flush=True)
    bw = copy_bandwidth()
    rec["copy_GBps"] = bw / 1e9
    rows = []
    for (shape, nhwc), op in itertools.product(tile_cases(), TILE_OPS):
        rms = op == "rmsnorm_tsra"
        for dname, dtype in DTYPES.items():
            for direction in TILE_DIRECTIONS:
                cfgs = CONFIGS[direction]
                tensors = _tensors(shape, dtype, direction, nhwc)
                nbytes = tensors[0].numel() * tensors[0].element_size() * (
                    2 if direction == "forward" else 3)
                geo = channel_geometry(tensors[0], 1)
                args = (geo.C, geo.P, geo.C // 2, geo.channels_contig, direction, rms,
                        dtype.itemsize)
                heuristic = specialization(*args)
                timed = set()
                for cfg in cfgs:
                    over = _tuning(cfg)
                    spec = specialization(*args, **over)
                    if not _tile_fits(spec, cfg):  # not timed (see fits)
                        continue
                    # candidates that resolve to one launch are timed once (channels_last
                    # tiles ignore VEC_P, so its variants repeat their base candidate)
                    launch = (spec[0], tuple(sorted(spec[1].items())), spec[2])
                    if launch in timed:
                        continue
                    timed.add(launch)
                    _, consts, warps, _ = spec
                    row = dict(shape=list(shape), dtype=dname, direction=direction,
                               tile=cfg[0], ept=cfg[1], warps=warps, vec_p=consts["VEC_P"],
                               pps=over.get("programs_per_sm", 0),
                               C=geo.C, split=geo.C // 2, P=geo.P,
                               channels_last=geo.channels_contig,
                               layout="nhwc" if nhwc else "nchw",
                               itemsize=dtype.itemsize, rmsnorm=rms,
                               # the same launch as without overrides (the heuristic's)
                               default=spec[1:] == heuristic[1:])
                    try:
                        ms = _graph_ms(lambda d=direction, ts=tensors, cfg=cfg, rms=rms:
                                       _launch(d, ts, cfg, rms))
                        row.update(ms=ms, pct_copy=100 * nbytes / (ms * 1e-3) / bw)
                    except Exception as e:
                        row.update(error=str(e)[:200])
                    rows.append(row)
    rec["tiles"] = rows


#: A sweep winner enters the tuning table only if it beats the heuristic's launch by this
#: fraction: CUDA-graph medians of one call scatter by a few percent, and an entry that is
#: only noise would make the shipped launch depend on the run.
MIN_GAIN = 0.03


def _problem(e: dict) -> tuple:
    """A table entry's or sweep row's problem: (direction, itemsize, layout, C, split, P)."""
    return (e["direction"], e["itemsize"], e["channels_last"], e["C"], e["split"], e["P"])


def merge_tables(new: dict, base: dict | None, timed: set[tuple]) -> dict:
    """``new`` (a sweep's table) with ``base``'s entries (an earlier table of the device)
    for what the sweep did not time: an entry of ``base`` stays unless the sweep timed its
    problem on its op — and an entry without an op (tables before the sweep recorded one:
    measured on TSRA, serving both ops) keeps serving only the op the sweep did not time,
    or goes when the sweep timed both. A problem the sweep timed on an op drops ``base``'s
    entries for it even where the heuristic won (then no entry is the right answer).
    ``timed``: the ``(problem..., rmsnorm)`` keys the sweep timed (``rmsnorm`` ``None`` for
    rows without an op, which count for both)."""
    if not base:
        return new
    ops_timed: dict[tuple, set] = {}
    for key in timed:
        ops_timed.setdefault(key[:6], set()).add(key[6])
    kept = []
    for e in base.get("entries", []):
        ops = ops_timed.get(_problem(e), set())
        if e.get("rmsnorm") is None:
            left = set() if None in ops else {True, False} - ops
            if not left:
                continue
            e = dict(e, **({} if len(left) == 2 else {"rmsnorm": left.pop()}))
        elif e["rmsnorm"] in ops or None in ops:
            continue
        kept.append(e)
    out = dict(new, entries=sorted(new["entries"] + kept, key=lambda e: (
        _problem(e), e.get("rmsnorm") is None, bool(e.get("rmsnorm")))))
    out["merged_from"] = base.get("source_file") or base.get("date")
    return out


def tuning_table(rec: dict, min_gain: float = MIN_GAIN, base: dict | None = None) -> dict:
    """The tile sweep as a ``cobkern.ops.tuning`` table (JSON-ready dict).

    ``rec`` is ``gpu_diag.json``'s content (``"tiles"`` rows plus device and versions). For
    each problem (direction, element size, layout, C, split, P) and op (``rmsnorm``: rows
    since the sweep recorded it) the fastest candidate becomes an entry when it beats the
    heuristic's launch (the row marked ``default``) by more than ``min_gain``; problems
    where the heuristic is as good get no entry. Entries carry the op they were timed on
    (rows without one: an entry for either op). ``base``: an earlier table of the device,
    whose entries for what this sweep did not time are kept (:func:`merge_tables`).
    """
    from cobkern.ops.tuning import FORMAT

    by_problem: dict[tuple, list[dict]] = {}
    for r in rec.get("tiles", []):
        if "ms" in r and "split" in r:  # timed, with its problem recorded (since 2026-11-26)
            key = (*_problem(r), r.get("rmsnorm"))
            by_problem.setdefault(key, []).append(r)
    entries = []
    for key, rows in sorted(by_problem.items(), key=lambda kv: (kv[0][:6], str(kv[0][6]))):
        direction, itemsize, cl, c, split, p, rms = key
        best = min(rows, key=lambda r: r["ms"])
        # several candidates can resolve to the heuristic's launch: credit it the best
        default = min((r for r in rows if r.get("default")), key=lambda r: r["ms"],
                      default=None)
        if default is not None and best["ms"] >= default["ms"] * (1 - min_gain):
            continue
        entry = dict(direction=direction, itemsize=itemsize, channels_last=cl, C=c,
                     split=split, P=p, tile_elems=best["tile"], elems_per_thread=best["ept"],
                     num_warps=best["warps"], vec_p=best.get("vec_p") or 0)
        if best.get("pps"):
            entry["programs_per_sm"] = best["pps"]
        if rms is not None:
            entry["rmsnorm"] = rms
        entries.append(dict(entry, ms=round(best["ms"], 5),
                            default_ms=None if default is None else round(default["ms"], 5)))
    new = {"format": FORMAT, "device": rec.get("device"), "torch": rec.get("torch"),
           "triton": rec.get("triton"), "date": rec.get("date"),
           "source": "bench/gpu_diag.py tile sweep (CUDA-graph replay, median)",
           "min_gain": min_gain, "entries": entries}
    return merge_tables(new, base, set(by_problem))


def shipped_table(device: str | None) -> dict | None:
    """The shipped tuning table of a device name (``cobkern/ops/tuning_tables``), as JSON,
    with ``source_file`` added; ``None`` if there is none."""
    from cobkern.ops.tuning import TABLE_DIR, table_name

    path = TABLE_DIR / f"{table_name(device or '')}.json"
    if not device or not path.is_file():
        return None
    return dict(json.loads(path.read_text()), source_file=f"cobkern/ops/tuning_tables/{path.name}")


def write_tuning_table(rec: dict, path: str, min_gain: float = MIN_GAIN,
                       base: dict | None = None) -> dict:
    """Write :func:`tuning_table` (merged with ``base``) atomically to ``path``; returns it."""
    from cobkern._atomic import atomic_path

    table = tuning_table(rec, min_gain, base)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table, indent=1) + "\n")
    return table


def _scalar_slab_loads(shape) -> bool:
    """Whether the covariance kernel loads a ``(C, H, W)`` NCHW map's slabs as scalars: the
    positions are not a multiple of 16 (VGG-16's 2×2 maps; kernels/covariance.py)."""
    return len(shape) > 1 and (shape[1] * shape[2]) % 16 != 0


def _cov_step_variants(dname: str, scalar_loads: bool = False,
                       nhwc: bool = False) -> dict[str, dict]:
    """The samples-per-step and warps-per-program overrides of one dtype's shipped launch
    (offline, sm_90, SASS instructions per sample across VGG-16's layers: bf16 at 128
    samples a step 22–36 % fewer than at 64, at 256 31–54 %; float32 IEEE on
    channel-contiguous slabs on 2 warps 19–21 % fewer, on 1 warp 25–28 %, with 2.7× and
    3.8× the FMAs per shared-memory load; ``bench/kernel_proxies.py --covariance``).
    The steps around the shipped ones (since the 2026-11-28 sweep: 128 samples for bf16,
    64 for float32 IEEE NHWC, 32 for float32 NCHW): the previous default and the next
    wider step. Fewer warps a program get proportionally more programs, so an SM holds as
    many warps. ``scalar_loads`` (NCHW 2×2 maps: the slabs load element by element into
    registers): without the widest step and the 1-warp program, which spill there (1,764
    and 376 bytes); bf16 there ships 64 samples a step (128 spilled on sm_80/86/89, not on
    sm_90), so its one step row is the 128 that bf16 took on this layer before."""
    from cobkern.kernels.covariance import TARGET_PROGRAMS_GPU

    if dname == "bf16":
        if scalar_loads:
            return {"128 samples a step": {"block_k": 128}}
        return {"64 samples a step": {"block_k": 64}, "256 samples a step": {"block_k": 256}}
    steps = {"32 samples a step": {"block_k": 32}, "128 samples a step": {"block_k": 128}}
    out = {**(steps if nhwc else {"64 samples a step": {"block_k": 64}}),
           f"2 warps, {2 * TARGET_PROGRAMS_GPU} programs":
               {"num_warps": 2, "target_programs": 2 * TARGET_PROGRAMS_GPU}}
    if not (scalar_loads or nhwc):  # on NHWC slabs 21-47 % more time than 4 warps on the
        # H200 (2026-11-28), and with their 64 samples a step it spills (offline, sm_90)
        out[f"1 warp, {4 * TARGET_PROGRAMS_GPU} programs"] = {
            "num_warps": 1, "target_programs": 4 * TARGET_PROGRAMS_GPU}
    return out


def _cov_jobs():
    """Per layer and dtype: the shipped launch, then one change at a time against it:
    ``(shape, dtype, label, overrides)`` with the overrides as sorted ``(key, value)`` pairs
    of :func:`cobkern.kernels.covariance.subspace_moments` keywords (picklable for the
    compile pool)."""
    from cobkern.kernels.covariance import TARGET_PROGRAMS_GPU, launch_config

    jobs = []
    for shape in COV_SHAPES:
        for dname in ("fp32", "bf16"):
            other = 96 - launch_config(shape[0] // 2, DTYPES[dname])[0]   # 64 <-> 32
            variants = {"shipped": {}, "1 stage": {"num_stages": 1},
                        f"{other}×{other} tiles": {"block": other},
                        # fewer programs: fewer float64 atomic tile adds (one tile of
                        # atomics per program); more: more parallelism. Absolute counts:
                        # the shipped default depends on dtype and tile (kernels docstring)
                        **{f"{n} programs": {"target_programs": n}
                           for n in (TARGET_PROGRAMS_GPU // 4, TARGET_PROGRAMS_GPU,
                                     TARGET_PROGRAMS_GPU * 4)}}
            # (N, C) rows are channel-contiguous, like NHWC maps
            variants.update(_cov_step_variants(dname, _scalar_slab_loads(shape),
                                               nhwc=len(shape) == 1))
            if dname == "fp32":
                variants["tf32"] = {"f32_dot": "tf32"}
                variants["tf32x3"] = {"f32_dot": "tf32x3"}
                variants["bf16x6"] = {"f32_dot": "bf16x6"}
                wide = launch_config(shape[0] // 2, DTYPES[dname], f32_dot="fp64")[0]
                variants["fp64"] = {"f32_dot": "fp64"}
                variants[f"fp64 {96 - wide}×{96 - wide}"] = {"f32_dot": "fp64",
                                                              "block": 96 - wide}
            if len(shape) > 1:  # the conv maps channels_last too (calibrate(channels_last=))
                variants["NHWC"] = {"nhwc": True}
                variants[f"NHWC {other}×{other} tiles"] = {"nhwc": True, "block": other}
                # channels-last is float32 calibration's CUDA default since the H200's second
                # lease of 2026-11-27, which timed only these three NHWC rows: the program
                # counts (tuned on NCHW), and for float32 the tensor-core products
                for n in (TARGET_PROGRAMS_GPU // 4, TARGET_PROGRAMS_GPU * 4):
                    variants[f"NHWC {n} programs"] = {"nhwc": True, "target_programs": n}
                variants.update({f"NHWC {label}": {"nhwc": True, **over}
                                 for label, over in _cov_step_variants(dname,
                                                                       nhwc=True).items()})
                # a third pipeline stage: NHWC float32 Grams moved 43 % of the copy rate on
                # the H200 (2026-11-28, 64×32×32), so more loads in flight may pay
                variants["NHWC 3 stages"] = {"nhwc": True, "num_stages": 3}
                if dname == "fp32":
                    # tf32 on the IEEE tiles (32×32, 64 samples a step): on 64×32×32, where
                    # they are tf32's own tiles too, 0.0859 ms against IEEE's 0.1040; the
                    # wider layers were timed only with 64×64 tiles (0.185 ms at 128×16×16)
                    variants["NHWC tf32 32×32 tiles"] = {"nhwc": True, "f32_dot": "tf32",
                                                         "block": 32, "block_k": 64}
                    # and the three-product split on them (IEEE-like accuracy: 1.7e-7 of
                    # the Gram on the H200, same lossless counts; timed on 64×64 tiles only)
                    variants["NHWC tf32x3 32×32 tiles"] = {"nhwc": True, "f32_dot": "tf32x3",
                                                           "block": 32}
                    variants["NHWC fp64"] = {"nhwc": True, "f32_dot": "fp64"}
                    variants["NHWC tf32"] = {"nhwc": True, "f32_dot": "tf32"}
                    variants["NHWC tf32 64 samples a step"] = {"nhwc": True, "f32_dot": "tf32",
                                                               "block_k": 64}
                    variants["NHWC tf32x3"] = {"nhwc": True, "f32_dot": "tf32x3"}
                    variants["NHWC bf16x6"] = {"nhwc": True, "f32_dot": "bf16x6"}
            jobs += [(shape, dname, label, tuple(sorted(over.items())))
                     for label, over in variants.items()]
    return jobs


def _cov_case(shape, dname, label, over):
    from cobkern.kernels import covariance as kcov
    from cobkern.ops._checks import channel_geometry

    del label
    over = dict(over)
    x = torch.randn((COV_BATCH, *shape), device=DEVICE, dtype=DTYPES[dname])
    if over.pop("nhwc", False):
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[0]
    su = sv = c // 2
    packed = torch.zeros(su * su + sv * sv, device=DEVICE, dtype=torch.float64)
    sa = torch.zeros(c, device=DEVICE, dtype=torch.float64)
    sq = torch.zeros(c, device=DEVICE, dtype=torch.float64)
    geo = channel_geometry(x, 1)
    block = over.get("block") or kcov.launch_config(su, x.dtype, f32_dot=over.get("f32_dot"))[0]

    def fn():
        kcov.subspace_moments(x, geo, su, packed, sa, sq, mirror=False, **over)

    n = x.numel() // c
    tiles = 2 * sum(1 for i in range(-(-su // block)) for _ in range(i, -(-su // block)))
    return fn, 2.0 * n * tiles * block * block, block  # FLOPs of the products computed


def part_covariance(rec: dict) -> None:
    jobs = _cov_jobs()
    precompile(_run_cov_job, jobs)
    rows = []
    for job in jobs:
        shape, dname, label, over = job
        row = dict(shape=list(shape), dtype=dname, variant=label, overrides=dict(over))
        try:
            fn, flops, block = _cov_case(*job)
            ms = _graph_ms(fn)
            row.update(block=block, ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as e:
            row["error"] = str(e)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    rec["covariance"] = rows


def part_overhead(rec: dict) -> None:
    import triton.testing as tt

    import cobkern
    from cobkern.kernels import _launch

    _launch_default = _launch.FAST_LAUNCH

    rows = []
    for shape in [(512, 2, 2), (64, 32, 32), (4096,)]:
        x = torch.randn((BATCH, *shape), device=DEVICE, dtype=torch.bfloat16)
        split = shape[0] // 2
        xg = x.detach().requires_grad_(True)
        dy = torch.randn_like(x)
        def fast(xg=xg, dy=dy, split=split):
            return torch.autograd.grad(cobkern.tsra(xg, split), xg, dy)

        def op(xg=xg, dy=dy, split=split):
            return torch.autograd.grad(torch.ops.cobkern.tsra(xg, split, 1, *CONSTS), xg, dy)

        bias = torch.nn.Parameter(torch.randn(shape[0], device=DEVICE))

        def fast_bias(xg=xg, dy=dy, split=split, bias=bias):  # a layer's bias, fused
            return torch.autograd.grad(cobkern.tsra(xg, split, bias=bias), (xg, bias), dy)

        row = {"shape": [BATCH, *shape], "dtype": "bf16"}
        for name, fn, fast_launch in (("fast_path", fast, True), ("custom_op", op, True),
                                      ("fast_path_jit_launch", fast, False),
                                      ("fast_path_bias", fast_bias, True)):
            # fast_launch False: every launch through JITFunction.run (as before the
            # cached launcher of cobkern.kernels._launch), side by side
            _launch.FAST_LAUNCH = fast_launch and _launch_default
            try:
                row[name + "_ms"] = (
                    float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))
                    if DEVICE == "cuda" else _wall_ms(fn))
            finally:
                _launch.FAST_LAUNCH = _launch_default
        # compiled code: torch.compile of the forward (AOTAutograd compiles the backward),
        # reaching the kernels through the opaque custom ops or the inline triton_ops
        for mode in ("opaque", "inline"):
            torch._dynamo.reset()
            with cobkern.ops.use_compile_kernels(mode):
                g = torch.compile(lambda t, split=split: cobkern.tsra(t, split), fullgraph=True)

                def compiled(g=g, xg=xg, dy=dy):
                    return torch.autograd.grad(g(xg), xg, dy)

                try:
                    compiled()  # compiles
                    row[f"compiled_{mode}_ms"] = (
                        float(tt.do_bench(compiled, warmup=25, rep=100, return_mode="median"))
                        if DEVICE == "cuda" else _wall_ms(compiled))
                except Exception as e:  # report, keep the other rows
                    row[f"compiled_{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        torch._dynamo.reset()
        try:
            row["graph_ms"] = _graph_ms(fast)
        except Exception as e:
            row["graph_error"] = str(e)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    rec["overhead"] = rows


def lossless_kept(stats, tol: float | None = None) -> dict[str, int]:
    """Directions the lossless rule keeps per CoB layer (U + V): eigenvalues above
    ``tol · λ_max`` of each subspace's Gram, in float64 — by default the rule's own
    ``DEFAULT_RANK_TOL[accumulation]`` (1e-7 for float32 sums, 1e-10 for float64 ones, e.g.
    ``fp64`` products). Compared across float32 product modes at one tolerance it says
    whether a faster mode's Gram error lifts the null directions above it (the first
    classifier layer can hold at most 2·(512 + 1) = 1026 of its 4096 directions whatever
    the weights: method.md §5)."""
    from cobkern.pruning.strategy import DEFAULT_RANK_TOL

    kept = {}
    for name, st in stats.layers.items():
        t = DEFAULT_RANK_TOL[st.accumulation] if tol is None else tol
        n = 0
        for g in (st.gram_u, st.gram_v):
            ev = torch.linalg.eigvalsh(g.double())
            n += int((ev > t * ev.max()).sum())
        kept[name] = n
    return kept


def _mode_f32_dot(mode: str) -> str | None:
    """``calibrate(f32_dot=)`` of a calibration-part mode (``ieee``, ``fp64-nhwc``, ...)."""
    base = mode.removesuffix("-nhwc")
    return None if base == "bf16" else base


def _host_copy_cost(calibrate, model, loader, repeats: int = 3) -> dict:
    """Channels-last IEEE calibration, fastest of ``repeats``, as shipped and with its last
    step — the statistics' copies to pinned host memory (135 MiB for VGG-16: two
    2048² float64 Gram pairs) — replaced by device copies: the difference is what the
    host copy adds to a calibration (``fp32_host_copy_s``)."""
    import importlib

    cal_mod = importlib.import_module("cobkern.cob.calibrate")  # the module, not the function

    def best() -> float:
        return _fastest_s(lambda: calibrate(model, loader, max_samples=None, progress=False,
                                            channels_last=True), repeats)[0]

    shipped = best()
    to_cpu = cal_mod._to_cpu
    cal_mod._to_cpu = lambda tensors: [t.clone() for t in tensors]
    try:
        on_device = best()
    finally:
        cal_mod._to_cpu = to_cpu
    print(f"fp32 ieee-nhwc: {shipped:.4f}s, statistics kept on the device {on_device:.4f}s",
          flush=True)
    return {"fp32_ieee-nhwc_best_s": shipped, "fp32_ieee-nhwc_stats_on_device_s": on_device,
            "fp32_host_copy_s": shipped - on_device}


def _context_capture(fn):
    """``cobkern.cob.graphs.cuda_capture`` as it was until 2026-11-28: the capture through
    ``torch.cuda.graph``'s context manager (device synchronisation, device and pinned-host
    caches emptied before it), for the per-batch comparison."""
    current = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            fn()
    except BaseException:
        torch.cuda.set_stream(current)
        raise
    return graph.replay


def _per_batch_s(calibrate, model, loader, **kwargs) -> list[float]:
    """Seconds each batch of one ``calibrate(model, loader, **kwargs)`` took, the device
    synchronised between batches (the loader is read through a generator that waits for
    the GPU before handing out the next batch; the last entry ends with the statistics'
    copy to the host). With ``cuda_graphs=True`` entry 0 is the eager warm-up, entry 1 the
    capture and its first replay, the rest replays: whether graphed calibration is slower
    (2026-11-28: 0.154 s against 0.091 s eager, channels-last, 20 batches of 500) by a cost
    paid once or by every replay."""
    marks: list[float] = []

    def timed():
        for xb in loader:
            _sync()
            marks.append(time.perf_counter())
            yield xb
        _sync()

    calibrate(model, timed(), max_samples=None, progress=False, **kwargs)
    _sync()
    marks.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(marks)]


def _per_batch_variants(calibrate, model, loader, graphs: bool) -> dict:
    """Channels-last IEEE calibration batch by batch (:func:`_per_batch_s`, after a warm-up
    run): eager, and with ``graphs`` also graphed twice — captured as shipped, and through
    ``torch.cuda.graph``'s context manager (:func:`_context_capture`). Keys
    ``fp32_ieee-nhwc[-graphs[-context]]_per_batch_s``; the shipped capture is restored
    whatever happens."""
    from cobkern.cob import graphs as graphs_mod

    shipped_capture = graphs_mod.cuda_capture
    variants = (("", False, None), ("-graphs", True, None),
                ("-graphs-context", True, _context_capture))
    out = {}
    for suffix, cuda_graphs, capture in variants if graphs else variants[:1]:
        key = f"fp32_ieee-nhwc{suffix}_per_batch_s"
        graphs_mod.cuda_capture = capture or shipped_capture
        try:
            _per_batch_s(calibrate, model, loader, channels_last=True,
                         cuda_graphs=cuda_graphs)  # warm: the timed run's first batch
            out[key] = _per_batch_s(calibrate, model, loader, channels_last=True,
                                    cuda_graphs=cuda_graphs)
        finally:
            graphs_mod.cuda_capture = shipped_capture
        print(key, " ".join(f"{t * 1e3:.2f}" for t in out[key]), "ms", flush=True)
    return out


def part_calibration(rec: dict) -> None:

    from cobkern.cob import calibrate, find_cob_layers
    from cobkern.models import vgg16_tsra

    images, batch = (10_000, 500) if DEVICE == "cuda" else (64, 16)
    out = {}
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = vgg16_tsra(width=1.0 if DEVICE == "cuda" else 0.125).to(DEVICE).to(dtype).eval()
        g = torch.Generator().manual_seed(0)
        data = torch.randn(images, 3, 32, 32, generator=g)
        loader = [data[i:i + batch].to(DEVICE).to(dtype) for i in range(0, images, batch)]
        modes = (["ieee", "tf32", "tf32x3", "bf16x6", "fp64"] if dtype == torch.float32
                 else ["bf16"])
        # channels_last inputs: NHWC activations, channel-contiguous Gram slabs
        modes += (["ieee-nhwc", "tf32-nhwc", "fp64-nhwc"] if dtype == torch.float32
                  else ["bf16-nhwc"])
        with torch.no_grad():
            model(loader[0])
            for m in modes:  # compile every layer's kernel variant outside the timings
                calibrate(model, loader[:1], max_samples=None, progress=False,
                          f32_dot=_mode_f32_dot(m), channels_last=m.endswith("-nhwc"))
        fwd = {}
        for layout in ("nchw", "nhwc"):  # NHWC: converted per batch, as calibrate() does
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            with torch.no_grad():
                model(loader[0].contiguous(memory_format=fmt))

            def forward(model=model, loader=loader, fmt=fmt):
                with torch.no_grad():
                    for xb in loader:
                        model(xb.contiguous(memory_format=fmt))

            fwd[layout] = _fastest_s(forward)[0]  # as the calibrations below
        out[f"{dname}_forward_s"] = fwd["nchw"]
        out[f"{dname}_forward_nhwc_s"] = fwd["nhwc"]
        for m in modes:
            f32_dot = _mode_f32_dot(m)  # the calibrate() arguments, as a user sets them
            cl = m.endswith("-nhwc")
            stats = None  # the previous mode's statistics are not held while timing
            s, stats = _fastest_s(functools.partial(
                calibrate, model, loader, max_samples=None, progress=False, f32_dot=f32_dot,
                channels_last=cl))
            f = fwd["nhwc" if cl else "nchw"]  # against the forward pass in the same layout
            out[f"{dname}_{m}_calibrate_s"] = s
            out[f"{dname}_{m}_x_forward"] = s / f
            out[f"{dname}_{m}_x_nchw_forward"] = s / fwd["nchw"]
            print(f"{dname} {m}: forward {f:.3f}s calibrate {s:.3f}s ({s / f:.2f}x)",
                  flush=True)
            out[f"{dname}_{m}_lossless_kept"] = lossless_kept(stats)
            out[f"{dname}_{m}_accumulation"] = sorted({s.accumulation
                                                       for s in stats.layers.values()})
            if m == "fp64":  # also at float32's tolerance: the same rule as the other modes
                out[f"{dname}_{m}_lossless_kept_at_1e-7"] = lossless_kept(stats, 1e-7)
            if not m.startswith("bf16"):  # accuracy on the first layers vs float64
                err = 0.0
                acts = {}
                layers = find_cob_layers(model)[:3]
                hooks = [lay.activation.register_forward_hook(
                    lambda mod, i, o, n=lay.name, acts=acts: acts.setdefault(n, []).append(
                        o.double()))
                    for lay in layers]
                with torch.no_grad():  # the activations of the layout calibrated below
                    for xb in loader[:4]:
                        model(xb.contiguous(memory_format=torch.channels_last) if cl else xb)
                for h in hooks:
                    h.remove()
                st = calibrate(model, loader[:4], max_samples=None, progress=False,
                               f32_dot=f32_dot, channels_last=cl)
                for lay in layers:
                    a = torch.cat(acts[lay.name]).movedim(1, -1).reshape(-1, lay.num_channels)
                    gu = a[:, :lay.split].T @ a[:, :lay.split]
                    e = ((st[lay.name].gram_u - gu.cpu()).abs().max() / gu.abs().max()).item()
                    err = max(err, e)
                out[f"{dname}_{m}_max_rel_err"] = err
        if dtype == torch.float32:  # what copying the statistics to the host costs
            out.update(_host_copy_cost(calibrate, model, loader))
            out.update(_per_batch_variants(calibrate, model, loader, DEVICE == "cuda"))
        del stats
    # where the streaming time goes: float32 NCHW, and the bf16 model channels-last (on the
    # H200 of 2026-11-27 it calibrated in 0.122 s against 0.066 s NCHW, which its covariance
    # kernel's time did not explain)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    for key, dtype, cl in (("profile_top_cuda", torch.float32, False),
                           ("profile_top_cuda_bf16_nhwc", torch.bfloat16, True)):
        model = vgg16_tsra(width=1.0 if DEVICE == "cuda" else 0.125).to(DEVICE).to(dtype).eval()
        loader = [torch.randn(batch, 3, 32, 32, device=DEVICE, dtype=dtype) for _ in range(4)]
        calibrate(model, loader[:1], max_samples=None, progress=False, channels_last=cl)
        _sync()  # compiled outside the profile
        with profile(activities=acts) as prof:
            calibrate(model, loader, max_samples=None, progress=False, channels_last=cl)
            _sync()
        table = prof.key_averages().table(
            sort_by="cuda_time_total" if DEVICE == "cuda" else "cpu_time_total", row_limit=15)
        out[key] = table
        print(table, flush=True)
    rec["calibration"] = out


def part_biasgrad(rec: dict) -> None:
    from cobkern.kernels import tsra as ktsra
    from cobkern.ops._checks import channel_geometry

    rows = []
    consts = (*CONSTS[:5], 0, 1e-6)  # RMSNorm→TSRA: norm_size set per shape below
    for shape in [s for s in SHAPES if len(s) == 3]:
        for dname, dtype in DTYPES.items():
            for nhwc in (False, True):
                x, dy = (t.to(dtype) for t in (torch.randn((BATCH, *shape), device=DEVICE),
                                               torch.randn((BATCH, *shape), device=DEVICE)))
                if nhwc:
                    x, dy = (t.to(memory_format=torch.channels_last) for t in (x, dy))
                dx, b = torch.empty_like(x), torch.randn(shape[0], device=DEVICE)
                geo, split = channel_geometry(x, 1), shape[0] // 2
                args = (*consts[:5], shape[0], consts[6])
                itemsize = x.element_size()
                plain = ktsra.plan("backward", geo, split, True, itemsize, has_bias=True)
                fused = ktsra.plan("backward", geo, split, True, itemsize, has_bias=True,
                                   bias_grad=True)
                row = {"shape": [BATCH, *shape], "dtype": dname, "nhwc": nhwc,
                       "fused_by_default": bool(fused.constexprs["BIAS_GRAD"])}
                if not fused.constexprs["BIAS_GRAD"]:  # time the partials all the same
                    kernel, constexprs, warps, _ = ktsra.specialization(
                        geo.C, geo.P, split, geo.channels_contig, "backward", True, itemsize,
                        has_bias=True, bias_grad=True)
                    fused = ktsra.LaunchPlan(kernel, fused.grid, fused.ints, constexprs, warps)
                buf = ktsra.bias_grad_buffer(fused, DEVICE)
                row["partials_bytes"] = buf.numel() * 4
                row["dx_bytes"] = dx.numel() * itemsize

                def kernel_only(p=plain, x=x, dy=dy, dx=dx, b=b, args=args):
                    ktsra.run(p, (dy, x, dx), *args, b)

                def summed(p=plain, x=x, dy=dy, dx=dx, b=b, args=args):
                    ktsra.run(p, (dy, x, dx), *args, b)
                    return dx.sum((0, 2, 3), dtype=torch.float32)

                def partials(p=fused, x=x, dy=dy, dx=dx, b=b, args=args, buf=buf):
                    ktsra.run(p, (dy, x, dx), *args, b, buf)
                    return buf.sum(0)

                for name, fn in (("backward", kernel_only), ("sum_dx", summed),
                                 ("partials", partials)):
                    try:
                        row[name + "_ms"] = (_graph_ms(fn) if DEVICE == "cuda"
                                             else _wall_ms(fn))
                    except Exception as e:  # report, keep the other rows
                        row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                if "sum_dx_ms" in row and "partials_ms" in row:
                    row["sum_over_partials"] = row["sum_dx_ms"] / row["partials_ms"]
                ref = summed().double()
                row["max_rel_diff"] = float((partials().double() - ref).abs().max()
                                            / ref.abs().max().clamp_min(1e-30))
                rows.append(row)
                print(json.dumps(row), flush=True)
    rec["biasgrad"] = rows


def part_nhwcsplit(rec: dict) -> None:
    from cobkern.kernels import tsra as ktsra
    from cobkern.ops._checks import channel_geometry

    rows = []
    align = ktsra.SPLIT_ALIGN
    for shape in [s for s in SHAPES if len(s) == 3]:
        for dname, dtype in DTYPES.items():
            for direction in ("forward", "backward"):
                tensors = _tensors(shape, dtype, direction, nhwc=True)
                x = tensors[0] if direction == "forward" else tensors[1]
                geo, split = channel_geometry(x, 1), shape[0] // 2
                b = torch.randn(shape[0], device=DEVICE)
                args = (*CONSTS[:5], shape[0], 1e-6)
                row = {"shape": [BATCH, *shape], "dtype": dname, "direction": direction}
                for label, a in (("split", align), ("tile", 1 << 30)):
                    ktsra.SPLIT_ALIGN = a  # read by specialization(), which is cached
                    ktsra.specialization.cache_clear()
                    try:
                        p = ktsra.plan(direction, geo, split, True, x.element_size(),
                                       has_bias=True)
                        row[label + "_kernel"] = p.kernel.__name__
                        def fn(p=p, t=tensors, b=b, args=args):
                            ktsra.run(p, t, *args, b)

                        row[label + "_ms"] = _graph_ms(fn) if DEVICE == "cuda" else _wall_ms(fn)
                    except Exception as e:  # report, keep the other rows
                        row[label + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    finally:
                        ktsra.SPLIT_ALIGN = align
                        ktsra.specialization.cache_clear()
                if "split_ms" in row and "tile_ms" in row:
                    row["tile_over_split"] = row["tile_ms"] / row["split_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    rec["nhwcsplit"] = rows


def _markdown(rec: dict) -> str:
    lines = [f"# GPU diagnostics — {rec.get('device')}, torch {rec.get('torch')}, "
             f"triton {rec.get('triton')}, {rec.get('date')}", ""]
    if "tiles" in rec:
        lines += [f"Copy bandwidth (2 GiB, CUDA graph): {rec['copy_GBps']:.0f} GB/s. "
                  "Kernel times from CUDA-graph replay (median).", "",
                  "| op | shape | dtype | pass | tile/elems-per-thread/warps | ms | "
                  "% of copy BW |",
                  "|---|---|---|---|---|---:|---:|"]
        for r in rec["tiles"]:
            op = {True: "rmsnorm_tsra", False: "tsra"}.get(r.get("rmsnorm"), "—")
            shp = "×".join(map(str, [BATCH, *r["shape"]])) + (
                " (NHWC)" if r.get("layout") == "nhwc" else "")
            cfg = f"{r['tile']}/{r['ept']}/{r['warps']}w" + (
                f" VEC_P={r['vec_p']}" if r.get("vec_p") else "") + (
                f" stream {r['pps']}/SM" if r.get("pps") else "") + (
                " (heuristic)" if r.get("default") else "")
            v = ("error | " + r["error"][:60] if "error" in r
                 else f"{r['ms']:.4f} | {r['pct_copy']:.0f}%")
            lines.append(f"| {op} | {shp} | {r['dtype']} | {r['direction']} | {cfg} | {v} |")
        lines.append("")
    if "overhead" in rec:
        lines += ["| shape (bf16, fwd+bwd) | fast path ms | custom op ms | fast path, "
                  "launches through JITFunction.run ms | fast path with a bias (its "
                  "gradient too) ms | compiled, opaque ops ms | compiled, inline ops ms | "
                  "CUDA graph ms |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]

        def ms(r, key):
            return f"{r[key + '_ms']:.4f}" if key + "_ms" in r else r.get(key + "_error", "—")

        for r in rec["overhead"]:
            cells = [ms(r, k) for k in ("fast_path", "custom_op", "fast_path_jit_launch",
                                        "fast_path_bias", "compiled_opaque", "compiled_inline",
                                        "graph")]
            lines.append(f"| {'×'.join(map(str, r['shape']))} | " + " | ".join(cells) + " |")
        lines.append("")
    if "biasgrad" in rec:
        lines += ["RMSNorm→TSRA backward with a bias (CUDA-graph replay): the bias gradient "
                  "summed from dx in a pass of its own vs from the kernel's partial sums.", "",
                  "| shape | dtype | layout | backward alone ms | + sum of dx ms | with partial "
                  "sums ms | sum / partials | shipped plan fuses | max rel. diff |",
                  "|---|---|---|---:|---:|---:|---:|---|---:|"]
        for r in rec["biasgrad"]:
            cells = [f"{r[k]:.4f}" if k in r else r.get(k.replace("_ms", "_error"), "—")
                     for k in ("backward_ms", "sum_dx_ms", "partials_ms")]
            ratio = f"{r['sum_over_partials']:.2f}×" if "sum_over_partials" in r else "—"
            lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['dtype']} | "
                         f"{'NHWC' if r['nhwc'] else 'NCHW'} | " + " | ".join(cells)
                         + f" | {ratio} | {r['fused_by_default']} | {r['max_rel_diff']:.1e} |")
        lines.append("")
    if "nhwcsplit" in rec:
        lines += ["Channels-last RMSNorm→TSRA with a bias (CUDA-graph replay): split kernels "
                  "vs the single tile.", "",
                  "| shape | dtype | pass | split kernels ms | single tile ms | tile / split |",
                  "|---|---|---|---:|---:|---:|"]
        for r in rec["nhwcsplit"]:
            cells = [f"{r[k]:.4f}" if k in r else r.get(k.replace("_ms", "_error"), "—")
                     for k in ("split_ms", "tile_ms")]
            ratio = f"{r['tile_over_split']:.2f}×" if "tile_over_split" in r else "—"
            lines.append(f"| {'×'.join(map(str, r['shape']))} (NHWC) | {r['dtype']} | "
                         f"{r['direction']} | " + " | ".join(cells) + f" | {ratio} |")
        lines.append("")
    if "covariance" in rec:
        lines += [f"Covariance kernel alone, batch {COV_BATCH} (CUDA-graph replay):", "",
                  "| layer (C×H×W) | dtype | variant | tile | ms | TFLOP/s computed |",
                  "|---|---|---|---|---:|---:|"]
        for r in rec["covariance"]:
            v = (f"{r['ms']:.4f} | {r['tflops']:.1f}" if "ms" in r
                 else f"error | {r['error'][:60]}")
            lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['dtype']} | "
                         f"{r['variant']} | {r.get('block', '')} | {v} |")
        lines.append("")
    if "calibration" in rec:
        c = {k: v for k, v in rec["calibration"].items() if not k.startswith("profile_")}
        lines += ["```", json.dumps(c, indent=1), "```"]
        for k, v in rec["calibration"].items():
            if k.startswith("profile_"):
                lines += ["", f"{k}:", "```", v, "```"]
    return "\n".join(lines) + "\n"


#: ``--parts``'s names, in the default order: tiles first, as its tuning table feeds the
#: session's next step (bench_tsra --tuning)
PART_NAMES = ("tiles", "covariance", "overhead", "nhwcsplit", "biasgrad", "calibration")


def _parts(p: argparse.ArgumentParser, text: str) -> list[str]:
    """``--parts`` as a list of part names (in the order given, once each). An unknown name is
    ``p.error``, before anything runs: inside the run it was a ``KeyError`` caught as that
    part's error, and a misspelt ``--parts tile`` exited 0 having measured nothing."""
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in PART_NAMES]
    if bad or not names:
        what = f"unknown part(s) {bad}" if bad else "no part"
        p.error(f"--parts: {what} in {text!r}; choose from {list(PART_NAMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-results")
    p.add_argument("--parts", default=",".join(PART_NAMES),
                   help=f"comma list of {', '.join(PART_NAMES)} (default: all, in that order)")
    p.add_argument("--check-args", action="store_true",
                   help="only check the arguments (and the GPU_DIAG_* environment, read on "
                        "import) and exit: bench/gpu_session.sh runs this before its first "
                        "step, so that a misspelt GPU_DIAG_PARTS stops it at once")
    p.add_argument("--table-from", default=None, metavar="GPU_DIAG_JSON",
                   help="only (re)write OUT/tsra_tuning.json from an earlier run's "
                        "gpu_diag.json (no GPU needed)")
    p.add_argument("--no-base", action="store_true",
                   help="write the sweep's entries alone, without the shipped table's "
                        "entries for what it did not time (ops, layouts, shapes)")
    args = p.parse_args(argv)
    names = _parts(p, args.parts)
    if args.check_args:
        return 0
    if args.table_from:
        with open(args.table_from) as f:
            rec = json.load(f)
        if not any("ms" in r and "split" in r for r in rec.get("tiles", [])):
            p.error(f"{args.table_from} holds no tile-sweep timings with problem sizes")
        os.makedirs(args.out, exist_ok=True)
        base = None if args.no_base else shipped_table(rec.get("device"))
        table = write_tuning_table(rec, os.path.join(args.out, "tsra_tuning.json"),
                                   base=base)
        print(f"{len(table['entries'])} entries -> {args.out}/tsra_tuning.json"
              + (f" (with {base['source_file']}'s for what the sweep did not time)"
                 if base else ""))
        return 0
    if DEVICE == "cuda" and not torch.cuda.is_available():
        p.error("gpu_diag needs a CUDA device")
    import datetime as dt

    import triton

    from cobkern._atomic import atomic_path

    rec = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
           "torch": torch.__version__, "triton": triton.__version__,
           "date": dt.date.today().isoformat()}
    os.makedirs(args.out, exist_ok=True)
    parts = {"tiles": part_tiles, "overhead": part_overhead, "covariance": part_covariance,
             "calibration": part_calibration, "biasgrad": part_biasgrad,
             "nhwcsplit": part_nhwcsplit}
    for name in names:
        t = time.perf_counter()
        try:
            parts[name](rec)
        except Exception as e:  # keep the other parts' results
            import traceback

            traceback.print_exc()
            rec[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
        rec[f"{name}_s"] = time.perf_counter() - t
        with atomic_path(os.path.join(args.out, "gpu_diag.json")) as tmp:
            tmp.write_text(json.dumps(rec, indent=1))
        with atomic_path(os.path.join(args.out, "gpu_diag.md")) as tmp:
            tmp.write_text(_markdown(rec))
        if name == "tiles" and "tiles" in rec:
            base = None if args.no_base else shipped_table(rec.get("device"))
            table = write_tuning_table(rec, os.path.join(args.out, "tsra_tuning.json"),
                                       base=base)
            print(f"tuning table: {len(table['entries'])} entries "
                  f"(the sweep's winners over the heuristic"
                  + (f", and {base['source_file']}'s for what it did not time"
                     if base else "") + f") -> {args.out}/tsra_tuning.json", flush=True)
        print(f"== part {name} done in {rec[f'{name}_s']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
