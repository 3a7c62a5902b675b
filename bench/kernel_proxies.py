"""Offline performance proxies of the TSRA kernels at the VGG-16 shapes (no GPU needed).

Compiles each configuration the launcher picks for sm_90 and prints a Markdown table of
registers, spills and vector widths of global loads/stores (see
``shared/docs/kernel-checks-without-gpu.md``), plus the launch grid per shape.

Run: ``python bench/kernel_proxies.py`` (TSRA), ``python bench/kernel_proxies.py --vec``
(SASS per element of the shipped NCHW TSRA launches against the 1-warp ``VEC_P`` sweep
candidates), ``python bench/kernel_proxies.py --nhwc`` (the same for the channels-last
launches that training makes, against every tile-sweep candidate, with the bias gradient's
partial sums too) or ``python bench/kernel_proxies.py --covariance`` (the covariance kernel per
layer, with SASS instruction counts).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from aot_tools import compile_specs  # noqa: E402
from test_tsra_aot import _rows, _spec  # noqa: E402

SHAPES = [  # (label, C, P, channels_contig)
    ("conv 64×32×32 NCHW", 64, 1024, False), ("conv 128×16×16 NCHW", 128, 256, False),
    ("conv 256×8×8 NCHW", 256, 64, False), ("conv 512×4×4 NCHW", 512, 16, False),
    ("conv 512×2×2 NCHW", 512, 4, False), ("conv 64×32×32 NHWC", 64, 1024 * 1024, True),
    ("conv 512×2×2 NHWC", 512, 4096, True), ("linear 4096", 4096, 1024, True),
    ("linear 16384", 16384, 1024, True),
]


def _tsra_spec(c: int, p: int, cl: bool, direction: str, dtype: str, **tuning) -> tuple:
    """The AOT spec of the launch the launcher makes for a ``(C, P)`` batch-1024 problem
    (split ``C // 2``, with ``tuning`` overrides; built by the AOT tests' ``_spec``), and
    ``(constexprs, num_warps, programs, tile rows)``."""
    spec = _spec(c, p, cl, direction, dtype, True, **tuning)
    spec.pop("meta")
    consts = spec["constexprs"]
    grid = -(-p // consts["BLOCK_P"]) * (1 if cl else 1024)
    return spec, consts, spec["num_warps"], grid, _rows(consts)


def main() -> None:
    specs, labels = [], []
    for label, c, p, cl in SHAPES:
        for direction in ["forward", "backward"]:
            for dtype in ["bf16", "fp32"]:
                spec, consts, warps, grid, rows = _tsra_spec(c, p, cl, direction, dtype)
                specs.append(spec)
                labels.append((label, direction, dtype,
                               f"{rows}×{consts['BLOCK_P']}", warps, grid))
    print("| shape (batch 1024) | pass | dtype | tile C×P | warps | programs | registers | "
          "spill B | ld v4 / v2 / scalar | st v4 / v2 / scalar |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lab, r in zip(labels, compile_specs(specs), strict=True):
        if "error" in r:
            print(f"| {' | '.join(map(str, lab))} | error: {r['error'][:60]} |")
            continue
        ld = f"{r['ld_v4']} / {r['ld_v2']} / {r['ld_scalar']}"
        st = f"{r['st_v4']} / {r['st_v2']} / {r['st_scalar']}"
        print(f"| {' | '.join(map(str, lab))} | {r['registers']} | "
              f"{r['spill_stores'] + r['spill_loads']} | {ld} | {st} |")


def vec() -> None:
    """SASS per element of the shipped NCHW launches against the ``VEC_P`` candidates:
    instructions and special-function ops per element (all threads of a program / the
    tile's elements), barriers per program, registers, spills. The candidates are the tile
    sweep's (``bench/gpu_diag.py``: ``(tile, elements per thread, warps, VEC_P)``)."""
    from bench.gpu_diag import CONFIGS

    rows, specs = [], []
    for label, c, p, cl in SHAPES:
        if cl:
            continue
        for direction in ["forward", "backward"]:
            for dtype in ["bf16", "fp32"]:
                for cand in [None, *(c for c in CONFIGS[direction] if len(c) == 4)]:
                    tuning = {} if cand is None else dict(
                        tile_elems=cand[0], elems_per_thread=cand[1], num_warps=cand[2],
                        vec_p=cand[3])
                    spec, consts, warps, _, n_rows = _tsra_spec(c, p, cl, direction, dtype,
                                                                **tuning)
                    spec["sass"] = True
                    specs.append(spec)
                    rows.append((label, direction, dtype, "shipped" if cand is None else
                                 f"{cand[0]}/{cand[1]}/{cand[2]}w VEC_P={cand[3]}",
                                 f"{n_rows}×{consts['BLOCK_P']}", warps,
                                 n_rows * consts["BLOCK_P"]))
    print("| shape (batch 1024) | pass | dtype | variant | tile C×P | warps | registers | "
          "spill B | SASS / element | MUFU / element | barriers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, direction, dtype, variant, tile, warps, n), r in zip(
            rows, compile_specs(specs), strict=True):
        if "error" in r:
            print(f"| {label} | {direction} | {dtype} | {variant} | error: {r['error'][:60]} |")
            continue
        per = 32 * warps / n
        print(f"| {label} | {direction} | {dtype} | {variant} | {tile} | {warps} | "
              f"{r['registers']} | {r['spill_stores'] + r['spill_loads']} | "
              f"{r['sass_total'] * per:.1f} | {r['sass_mufu'] * per:.2f} | {r['sass_bar']} |")


#: channels-last conv activations (C, H·W) of VGG-16 at batch 1024: what training launches
NHWC_SHAPES = [(64, 1024), (128, 256), (256, 64), (512, 16), (512, 4)]
#: H200 (132 SMs, 4 schedulers each, 1.98 GHz boost; 4.8 TB/s spec): warp-instructions and
#: bytes per second, for the floors printed by :func:`nhwc` — arithmetic, not measurements
H200_WARP_INSTR_PER_S = 132 * 4 * 1.98e9
H200_BYTES_PER_S = 4.8e12


def nhwc() -> None:
    """SASS per element of the channels-last RMSNorm→TSRA launches (bias added, as with
    ``fuse_conv_bias``) at the VGG-16 conv shapes, bf16 and fp32, forward and backward (the
    backward also with the bias gradient's partial sums, ``BIAS_GRAD``): the heuristic's
    launch against every tile-sweep candidate (``bench/gpu_diag.py``'s ``CONFIGS``;
    ``VEC_P`` does not apply to channels-last tiles). Per row: registers, spills, SASS and
    MUFU per element, barriers per program, and two floors per element by arithmetic — the
    issue floor (SASS per element / 32 per warp-instruction at the H200's issue rate) and
    the memory floor (the pass's minimum bytes at the H200's 4.8 TB/s spec): a launch whose
    issue floor is near or above its memory floor cannot reach the bandwidth."""
    from bench.gpu_diag import CONFIGS

    rows, specs = [], []
    for c, p in NHWC_SHAPES:
        for direction, bias_grads in (("forward", (False,)), ("backward", (False, True))):
            for dtype, itemsize in (("bf16", 2), ("fp32", 4)):
                cands = [None, *dict.fromkeys(tuple(c3[:3]) for c3 in CONFIGS[direction])]
                for cand in cands:
                    for bg in bias_grads:
                        tuning = {} if cand is None else dict(
                            tile_elems=cand[0], elems_per_thread=cand[1],
                            num_warps=cand[2] if len(cand) > 2 else None)
                        if bg:
                            tuning["bias_grad"] = True
                        try:
                            spec, consts, warps, _, n_rows = _tsra_spec(
                                c, 1024 * p, True, direction, dtype, has_bias=True, **tuning)
                        except ValueError:
                            continue
                        if n_rows * consts["BLOCK_P"] < c:  # a tile below one position
                            continue
                        spec["signature"]["BIAS"] = "*fp32"
                        spec["sass"] = True
                        specs.append(spec)
                        bytes_el = itemsize * (2 if direction == "forward" else 3)
                        rows.append((f"{c}×{p} NHWC", direction, dtype,
                                     ("heuristic" if cand is None else
                                      "/".join(map(str, cand)) + "w" * (len(cand) > 2))
                                     + (" + bias grad" if bg else ""),
                                     f"{n_rows}×{consts['BLOCK_P']}", warps,
                                     n_rows * consts["BLOCK_P"], bytes_el))
    print("| shape (batch 1024) | pass | dtype | launch (tile/per thread[/warps]) | tile C×P | "
          "warps | registers | spill B | SASS / element | MUFU / element | barriers | "
          "issue floor / memory floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, direction, dtype, variant, tile, warps, n, bytes_el), r in zip(
            rows, compile_specs(specs), strict=True):
        if "error" in r:
            print(f"| {label} | {direction} | {dtype} | {variant} | error: {r['error'][:60]} |")
            continue
        per = 32 * warps / n
        sass = r["sass_total"] * per
        issue_s = sass / 32 / H200_WARP_INSTR_PER_S
        mem_s = bytes_el / H200_BYTES_PER_S
        print(f"| {label} | {direction} | {dtype} | {variant} | {tile} | {warps} | "
              f"{r['registers']} | {r['spill_stores'] + r['spill_loads']} | {sass:.1f} | "
              f"{r['sass_mufu'] * per:.2f} | {r['sass_bar']} | {issue_s / mem_s:.2f} |")


COV_LAYERS = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2), (4096,)]


def covariance() -> None:
    """The covariance kernel per VGG-16 layer (batch 500, split C/2): the shipped launch
    against the same launch with one pipeline stage (the launch before 2026-11-26 for
    float32) and with the other tile size, and for float32 the ``fp64`` products (float64
    tensor cores) at both tile sizes, ``tf32`` products, 64 samples a step and 2 or 1 warps
    a program, for bf16 128 and 256 samples a step; the conv layers also channels_last
    (``NHWC``, what ``calibrate(channels_last=True)`` feeds the kernel). "SASS per
    sample" = loop body × threads / samples per step × Gram tiles of the layer: the
    instructions the whole layer issues per sample (lower is better). "shared ld" = the
    PTX's shared-memory loads, scalar / vector (``ld.shared`` v2 and v4; ``ldmatrix`` not
    counted): the float32 IEEE products read their operands from unswizzled shared memory,
    where scalar loads of sample-contiguous slabs bank-conflict."""
    import torch
    from test_covariance_aot import _spec

    from bench.gpu_diag import _cov_step_variants, _scalar_slab_loads
    from cobkern.kernels.covariance import launch_config, tile_table

    def steps(name: str, scalar_loads: bool = False,
              nhwc: bool = False) -> list[tuple[str, dict]]:
        """gpu_diag's samples-a-step and warps-a-program rows, without its program
        counts (they change the grid, not what compiles)."""
        return [(label.split(",")[0], {k: v for k, v in over.items()
                                       if k != "target_programs"})
                for label, over in _cov_step_variants(name, scalar_loads, nhwc).items()]

    rows, specs = [], []
    for shape in COV_LAYERS:
        s = shape[0] // 2
        for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            shipped = launch_config(s, dt)[0]
            # (label, overrides of _spec): one change at a time against the shipped launch
            variants = [("shipped", {}), ("1 stage", {"num_stages": 1}),
                        (f"{96 - shipped}×{96 - shipped} tiles", {"block": 96 - shipped})]
            if dt == torch.float32:  # the float64 tensor-core products, both tile sizes
                wide = launch_config(s, dt, f32_dot="fp64")[0]
                variants += [("fp64", {"f32_dot": "fp64"}),
                             (f"fp64 {96 - wide}×{96 - wide}",
                              {"f32_dot": "fp64", "block": 96 - wide}),
                             ("tf32", {"f32_dot": "tf32"})]
            variants += steps(name, _scalar_slab_loads(shape), nhwc=len(shape) == 1)
            if len(shape) > 1:  # conv maps, channels_last
                variants.append(("NHWC", {"nhwc": True}))
                if dt == torch.float32:
                    variants += [("NHWC fp64", {"nhwc": True, "f32_dot": "fp64"}),
                                 ("NHWC tf32", {"nhwc": True, "f32_dot": "tf32"}),
                                 ("NHWC tf32x3", {"nhwc": True, "f32_dot": "tf32x3"})]
                variants += [(f"NHWC {label}", {"nhwc": True, **over})
                             for label, over in steps(name, nhwc=True)]
            for label, over in variants:
                over = dict(over)
                spec = _spec((500, *shape), over.pop("nhwc", False), dt, **over)
                spec["sass"] = True
                specs.append(spec)
                cx = spec["constexprs"]
                n_tiles = tile_table(s, s, cx["BLOCK"], torch.device("cpu")).numel() // 3
                rows.append(("×".join(map(str, shape)), name, label, cx["BLOCK"],
                             spec["num_warps"], spec["num_stages"], cx["BLOCK_K"], n_tiles))
    print("| layer | dtype | variant | tile | warps | stages | registers | cp.async | "
          "scalar ld | shared ld scalar / vector | SASS loop | SASS per sample |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (layer, dt, label, block, warps, stages, bk, n_tiles), r in zip(
            rows, compile_specs(specs), strict=True):
        if "error" in r:
            print(f"| {layer} | {dt} | {label} | error: {r['error'][:60]} |")
            continue
        per_sample = r["sass_loop"] * 32 * warps / bk * n_tiles
        shared = f"{r['ld_shared_scalar']} / {r['ld_shared_v2'] + r['ld_shared_v4']}"
        print(f"| {layer} | {dt} | {label} | {block} | {warps} | {stages} | {r['registers']} | "
              f"{r['cp_async']} | {r['ld_scalar']} | {shared} | {r['sass_loop']} | "
              f"{per_sample:,.0f} |")


def cli(argv: list[str] | None = None) -> None:
    """Pick the table from the command line: one of ``--vec``, ``--nhwc``,
    ``--covariance``, or none for the TSRA table. Anything else is a usage error (a typo
    such as ``--covarience`` silently ran the default table)."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--vec", dest="table", action="store_const", const=vec,
                   help="SASS per element of the NCHW launches vs the VEC_P candidates")
    g.add_argument("--nhwc", dest="table", action="store_const", const=nhwc,
                   help="the same for the channels-last launches, bias gradient included")
    g.add_argument("--covariance", dest="table", action="store_const", const=covariance,
                   help="the covariance kernel per layer, with SASS instruction counts")
    (p.parse_args(argv).table or main)()


if __name__ == "__main__":
    cli()
