"""Ahead-of-time compilation of the covariance kernel for sm_90 (H100), without a GPU.

Every shipped variant (input dtype × layout at the launcher's block configuration, adding into
float64 running sums as the calibration accumulator does, or into float32 one-batch outputs;
the ``tf32x3`` float32 product mode the launcher also accepts) must compile,
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


def _spec(dtype: torch.dtype, flat: bool, index64: bool = False, out: str = "fp64",
          f32_dot: str = "ieee") -> dict:
    from cobkern.kernels.covariance import launch_config

    block, block_k, warps, stages = launch_config(256, dtype)
    sig = {"X": f"*{_TYPES[dtype]}", "TILES": "*i32", "G": f"*{out}", "SABS": f"*{out}",
           "SSQ": f"*{out}"}
    for n in ("C", "P", "split", "n_samples", "n_tiles", "chunk", "stride_b", "stride_c",
              "stride_p"):
        sig[n] = "i32"
    cx = {"BLOCK": block, "BLOCK_K": block_k, "FLAT": flat,
          "F32_DOT": f32_dot if dtype == torch.float32 else "",
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


# (dtype, flat, 64-bit indexing, output dtype, float32 product mode)
VARIANTS = [(dt, flat, False, "fp64", "ieee")
            for dt in (torch.bfloat16, torch.float16, torch.float32) for flat in (True, False)]
VARIANTS += [(torch.bfloat16, False, True, "fp64", "ieee"),   # 64-bit indexing
             (torch.bfloat16, False, False, "fp32", "ieee"),  # one batch: float32 outputs
             (torch.float32, False, False, "fp32", "ieee"),
             (torch.float32, False, False, "fp64", "tf32x3")]


def _id(v) -> str:
    d, f, i64, out, dot = v
    return (f"{_TYPES[d]}-{'flat' if f else 'nchw'}{'-i64' if i64 else ''}-to-{out}"
            f"{'-' + dot if dot != 'ieee' else ''}")


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compile_specs([_spec(*v) for v in VARIANTS])


@pytest.mark.parametrize("i", range(len(VARIANTS)), ids=[_id(v) for v in VARIANTS])
def test_compiles_for_sm90_without_spills(compiled, i):
    dtype = VARIANTS[i][0]
    r = compiled[i]
    assert "error" not in r, r.get("error")
    assert r["ptxas_ok"], r["ptxas_log"]
    spill = r["spill_stores"] + r["spill_loads"]
    assert spill == 0, f"{spill} bytes spilled ({r['registers']} registers)\n{r['ptxas_log']}"
    if dtype in (torch.bfloat16, torch.float16):
        assert r["wgmma"] > 0, "16-bit tiles should run on the tensor cores (wgmma)"
