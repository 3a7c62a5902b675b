"""Ahead-of-time compilation of the covariance kernel for sm_90 (H100), without a GPU.

Every shipped variant (dtype × layout at the launcher's block configuration) must compile,
assemble with ptxas with **0 bytes of spill**, and — for bf16/fp16 — run its products on
the tensor cores (``wgmma.mma_async`` in the PTX). Compilation runs in a subprocess with
the Triton interpreter off (the suite turns it on for CPU runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(r'''
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cobkern.kernels import covariance as k

    fn = k._moments_kernel
    names = list(fn.arg_names)
    out = []
    for spec in json.loads(sys.stdin.read()):
        try:
            attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec["divisible"]}
            src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                            attrs=attrs)
            c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": spec["num_warps"],
                                        "num_stages": spec["num_stages"]})
            ptx = c.asm["ptx"]
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                 "ptxas")
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            p = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
            os.unlink(f.name)
            log = p.stdout + p.stderr
            out.append({"ok": p.returncode == 0, "log": log[-2000:],
                        "spill": sum(int(m) for m in re.findall(r"(\d+) bytes spill", log)),
                        "regs": max([int(m) for m in re.findall(r"Used (\d+) registers", log)]
                                    or [0]),
                        "wgmma": ptx.count("wgmma.mma_async")})
        except Exception as e:  # report which variant failed
            out.append({"error": f"{type(e).__name__}: {e}"})
    print(json.dumps(out))
''')

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
    # what the JIT sees at VGG shapes: 16-aligned pointers, C/strides multiples of 16
    div = ["X", "TILES", "G", "SABS", "SSQ", "C", "P", "chunk", "stride_b", "stride_c",
           "stride_p"]
    return {"signature": sig, "constexprs": cx, "divisible": div, "num_warps": warps,
            "num_stages": stages}


VARIANTS = [(dt, flat, False) for dt in (torch.bfloat16, torch.float16, torch.float32)
            for flat in (True, False)] + [(torch.bfloat16, False, True)]  # + 64-bit indexing


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    specs = [_spec(dt, flat, i64) for dt, flat, i64 in VARIANTS]
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(specs),
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("i", range(len(VARIANTS)),
                         ids=[f"{_TYPES[d]}-{'flat' if f else 'nchw'}{'-i64' if i else ''}"
                              for d, f, i in VARIANTS])
def test_compiles_for_sm90_without_spills(compiled, i):
    dtype = VARIANTS[i][0]
    r = compiled[i]
    assert "error" not in r, r.get("error")
    assert r["ok"], r["log"]
    assert r["spill"] == 0, f"{r['spill']} bytes spilled ({r['regs']} registers)\n{r['log']}"
    if dtype in (torch.bfloat16, torch.float16):
        assert r["wgmma"] > 0, "16-bit tiles should run on the tensor cores (wgmma)"
