"""Offline performance proxies of the TSRA kernels at the VGG-16 shapes (no GPU needed).

Compiles each configuration the launcher picks for sm_90 and prints a Markdown table of
registers, spills and vector widths of global loads/stores (see
``shared/docs/kernel-checks-without-gpu.md``), plus the launch grid per shape.

Run: ``python bench/kernel_proxies.py``.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from aot_tools import compile_specs  # noqa: E402
from cobkern.kernels.tsra import specialization  # noqa: E402
from test_tsra_aot import _signature  # noqa: E402

SHAPES = [  # (label, C, P, channels_contig)
    ("conv 64×32×32 NCHW", 64, 1024, False), ("conv 128×16×16 NCHW", 128, 256, False),
    ("conv 256×8×8 NCHW", 256, 64, False), ("conv 512×4×4 NCHW", 512, 16, False),
    ("conv 512×2×2 NCHW", 512, 4, False), ("conv 64×32×32 NHWC", 64, 1024 * 1024, True),
    ("conv 512×2×2 NHWC", 512, 4096, True), ("linear 4096", 4096, 1024, True),
    ("linear 16384", 16384, 1024, True),
]


def main() -> None:
    specs, labels = [], []
    for label, c, p, cl in SHAPES:
        for direction in ["forward", "backward"]:
            for dtype in ["bf16", "fp32"]:
                kernel, consts, warps, n_pblocks = specialization(
                    c, p, cl, direction, True, 4 if dtype == "fp32" else 2)
                kernel = getattr(kernel, "fn", kernel).__name__
                ints = {"C": c, "P": p, "stride_b": 0 if cl else c * p,
                        "stride_c": 1 if cl else p, "stride_p": c if cl else 1}
                consts = {**consts, **{k: 1 for k, v in ints.items() if v == 1}}
                sig = _signature(kernel, dtype)
                sig.update({k: "constexpr" for k in consts})
                divisible = [k for k, v in sig.items() if v.startswith("*")]
                divisible += [k for k, v in ints.items() if v % 16 == 0]
                specs.append(dict(module="cobkern.kernels.tsra", kernel=kernel, signature=sig,
                                  constexprs=consts, num_warps=warps, divisible=divisible))
                grid = n_pblocks * (1 if cl else 1024)
                labels.append((label, direction, dtype,
                               f"{consts['BLOCK_C']}×{consts['BLOCK_P']}", warps, grid))
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


if __name__ == "__main__":
    main()
