"""Ahead-of-time compilation of the covariance kernel for sm_90 (H100), without a GPU.

Every shipped variant (dtype × layout at the launcher's block configuration) must compile,
assemble with ptxas with **0 bytes of spill**, and — for bf16/fp16 — run its products on
the tensor cores (``wgmma.mma_async`` in the PTX). Compilation runs in a subprocess with
the Triton interpreter off (``aot_tools``; the suite turns it on for CPU runs).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from aot_tools import compile_specs  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _spec(dtype: torch.dtype, flat: bool, index64: bool = False) -> dict:
    from cobkern.kernels.covariance import launch_config

    block, block_k, warps, stages = launch_config(256, dtype)
    sig = {"X": f"*{_TYPES[dtype]}", "TILES": "*i32", "G": "*fp32", "SABS": "*fp32",
           "SSQ": "*fp32"}
    for n in ("C", "P", "split", "n_samples", "n_tiles", "chunk", "stride_b", "stride_c",
              "stride_p"):
        sig[n] = "i32"
    cx = {"BLOCK": block, "BLOCK_K": block_k, "FLAT": flat, "IEEE": dtype == torch.float32,
          "UPCAST": False, "INDEX64": index64}
    for n in cx:
        sig[n] = "constexpr"
    # what the JIT sees at VGG shapes: 16-aligned pointers, C/strides multiples of 16, and
    # the unit stride (channels for (N, C)/NHWC, positions for NCHW) specialised to 1
    unit = "stride_c" if flat else "stride_p"
    cx[unit] = 1
    sig[unit] = "constexpr"
    div = ["X", "TILES", "G", "SABS", "SSQ", "C", "P", "chunk", "stride_b",
           "stride_p" if flat else "stride_c"]
    return {"module": "cobkern.kernels.covariance", "kernel": "_moments_kernel",
            "signature": sig, "constexprs": cx, "divisible": div, "num_warps": warps,
            "num_stages": stages}


VARIANTS = [(dt, flat, False) for dt in (torch.bfloat16, torch.float16, torch.float32)
            for flat in (True, False)] + [(torch.bfloat16, False, True)]  # + 64-bit indexing


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compile_specs([_spec(dt, flat, i64) for dt, flat, i64 in VARIANTS])


@pytest.mark.parametrize("i", range(len(VARIANTS)),
                         ids=[f"{_TYPES[d]}-{'flat' if f else 'nchw'}{'-i64' if i else ''}"
                              for d, f, i in VARIANTS])
def test_compiles_for_sm90_without_spills(compiled, i):
    dtype = VARIANTS[i][0]
    r = compiled[i]
    assert "error" not in r, r.get("error")
    assert r["ptxas_ok"], r["ptxas_log"]
    spill = r["spill_stores"] + r["spill_loads"]
    assert spill == 0, f"{spill} bytes spilled ({r['registers']} registers)\n{r['ptxas_log']}"
    if dtype in (torch.bfloat16, torch.float16):
        assert r["wgmma"] > 0, "16-bit tiles should run on the tensor cores (wgmma)"
