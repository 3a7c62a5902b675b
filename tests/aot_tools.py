"""Ahead-of-time compilation of Triton kernels for an sm_90 target (or another, per spec), on
a machine without a GPU.

``TRITON_INTERPRET=1`` (set by conftest on CPU machines) turns every ``@triton.jit``
function into an interpreted one that ``triton.compile`` cannot take, so compilation runs in
a subprocess with the interpreter off. Each spec names a kernel and one configuration::

    {"module": "cobkern.kernels.tsra", "kernel": "_tsra_fwd_kernel",
     "signature": {"X": "*bf16", ..., "BLOCK_C": "constexpr"},
     "constexprs": {"BLOCK_C": 64, ...}, "num_warps": 8,
     "divisible": ["X", "Y", "P"],            # args JIT-specialised as multiples of 16
     "sass": True,                            # optional: SASS instruction counts
     "arch": 80}                              # optional: another target (default sm_90)

and the result holds the PTX-level facts the suite checks: vectorised and scalar global
loads/stores, asynchronous (pipelined) ``cp.async`` copies, ``wgmma`` / ``mma`` instructions,
and ptxas' register / spill report; with ``"sass"``, also SASS instruction counts (whole
kernel, longest loop body) for the offline proxies of ``bench/kernel_proxies.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any


def _compile_one(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(spec["module"])
    fn = getattr(mod, spec["kernel"])
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.get("divisible", [])}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec.get("constexprs", {}),
                    attrs=attrs)
    options = {"num_warps": spec.get("num_warps", 4)}
    if "num_stages" in spec:
        options["num_stages"] = spec["num_stages"]
    arch = spec.get("arch", 90)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        sm = "sm_90a" if arch == 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas, f"-arch={sm}", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=False)
    finally:
        os.unlink(f.name)
    info = proc.stdout + proc.stderr
    sass = _sass_stats(compiled.asm["cubin"]) if spec.get("sass") else {}
    spill_stores = [int(m) for m in re.findall(r"(\d+) bytes spill stores", info)]
    spill_loads = [int(m) for m in re.findall(r"(\d+) bytes spill loads", info)]
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", info)]
    return {
        "ptxas_ok": proc.returncode == 0,
        "ptxas_log": info,
        "spill_stores": sum(spill_stores),
        "spill_loads": sum(spill_loads),
        "registers": max(regs) if regs else None,
        **_memory_ops(ptx, "ld"),
        **_memory_ops(ptx, "st"),
        **_memory_ops(ptx, "ld", "shared"),
        "wgmma": ptx.count("wgmma.mma_async"),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.", ptx)),
        "cvt_rna_tf32": len(re.findall(r"\bcvt\.rna\.tf32\.f32", ptx)),
        "mma": len(re.findall(r"\bmma\.sync", ptx)),
        "mma_f64": len(re.findall(r"\bmma\.sync\S*\.f64\.f64", ptx)),
        # float64 arithmetic (conversions, loads and moves not counted)
        "f64_arith": len(re.findall(
            r"\b(?:add|sub|mul|fma|mad|div|rcp|sqrt|rsqrt|ex2|lg2|min|max|neg|abs|setp)"
            r"(?:\.\w+)*\.f64\b", ptx)),
        **sass,
    }


def _sass_stats(cubin: bytes) -> dict[str, int]:
    """SASS instruction counts (``cuobjdump`` bundled with triton): the whole kernel, the
    body of its longest loop (the instructions between a backward branch and its target,
    what a streaming kernel executes per step), barriers and special-function (MUFU) ops."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    ins = [(int(a, 16), op, rest) for a, op, rest in re.findall(
        r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;\n]*)", out)]
    loop = 0
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            loop = max(loop, sum(1 for a, _, _ in ins if lo <= a <= addr))
    return {"sass_total": len(ins), "sass_loop": loop,
            "sass_bar": sum(op.startswith("BAR") for _, op, _ in ins),
            "sass_mufu": sum(op.startswith("MUFU") for _, op, _ in ins)}


def _memory_ops(ptx: str, kind: str, space: str = "global") -> dict[str, int]:
    """Count ``ld``/``st`` instructions of a state space by vector width (v4, v2, scalar):
    keys ``ld_v4`` ... for global memory, ``ld_shared_v4`` ... for shared memory
    (``ldmatrix`` not counted)."""
    ops = re.findall(rf"\b{kind}\.{space}(?:\.[\w:]+)*", ptx)
    v4 = sum(".v4" in o for o in ops)
    v2 = sum(".v2" in o for o in ops)
    pre = kind if space == "global" else f"{kind}_{space}"
    return {f"{pre}_v4": v4, f"{pre}_v2": v2, f"{pre}_scalar": len(ops) - v4 - v2}


def run_uninterpreted(script: str, timeout: float = 900) -> Any:
    """Run ``script`` (a file beside this one) in a subprocess with the Triton interpreter
    off; return its last line of output, parsed as JSON. A failure shows its stderr."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_specs(specs: list[dict[str, Any]], timeout: float = 900) -> list[dict[str, Any]]:
    """Compile every spec in one subprocess (interpreter off); return one result per spec.

    A spec that fails to compile yields ``{"error": "<message>"}`` so that a test can
    report which configuration the GPU compiler rejected.
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(specs),
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    specs = json.loads(sys.stdin.read())
    results = []
    for spec in specs:
        try:
            results.append(_compile_one(spec))
        except Exception as exc:  # report, don't die: the test names the failing variant
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
