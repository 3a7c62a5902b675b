"""Ahead-of-time compilation of the covariance kernel for sm_90 (H100), without a GPU.

Every shipped variant — the launch decisions of :func:`cobkern.kernels.covariance.
specialization` for VGG-16's activation shapes in each dtype and layout, adding into float64
running sums as the calibration accumulator does or into float32 one-batch outputs, the
``tf32``, ``tf32x3``, ``bf16x6`` and ``fp64`` float32 product modes, 64-bit indexing, and
shapes whose unit-stride axis is not a multiple of 16 — must compile, assemble with ptxas
with **0 bytes of spill**, and for bf16/fp16 (and the float32 tensor-core modes) run its
products on
the tensor cores (``wgmma`` for 64×64 tiles, ``mma`` for 32×32; float64 ``mma`` for
``fp64``). Where the launcher asks
for two stages (every VGG shape but the 2×2 maps) the slab loads must really be vectorised
and pipelined: ``cp.async`` copies, and no scalar global loads beyond the three of the tile
table. Compilation runs in a subprocess with the Triton interpreter off (``aot_tools``; the
suite turns it on for CPU runs).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from aot_tools import compile_specs  # noqa: E402

from cobkern.ops._checks import channel_geometry  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_INTS = ("C", "P", "split", "n_samples", "n_tiles", "chunk", "stride_b", "stride_c", "stride_p")
#: scalar global loads the kernel makes outside the slab loads: the tile table's three ints
TILE_TABLE_LOADS = 3


def _spec(shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype, out: str = "fp64",
          f32_dot: str | None = None, index64: bool = False, block: int | None = None,
          num_stages: int | None = None, block_k: int | None = None,
          num_warps: int | None = None, arch: int = 90) -> dict:
    """What the JIT compiles for an activation of this shape (batch dimension included);
    ``block`` / ``num_stages`` / ``block_k`` / ``num_warps`` are the launcher's sweep
    overrides (``kernel_proxies.py``, ``gpu_diag.py``); ``arch`` the compile target
    (sm_80 … sm_90; the launch decisions do not depend on it)."""
    from cobkern.kernels.covariance import specialization

    x = torch.empty(shape, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    geo = channel_geometry(x, 1)
    split = geo.C // 2
    cx, warps, stages = specialization(geo, split, dtype, x.numel(), True, f32_dot, block,
                                       num_stages, block_k, num_warps)
    cx = dict(cx, INDEX64=index64 or cx["INDEX64"])
    n = geo.B * geo.P
    ints = {"C": geo.C, "P": geo.P, "split": split, "n_samples": n, "n_tiles": 1,
            "chunk": 1024, "stride_b": geo.stride_b, "stride_c": geo.stride_c,
            "stride_p": geo.stride_p}
    sig = {"X": f"*{_TYPES[dtype]}", "TILES": "*i32", "G": f"*{out}", "SABS": f"*{out}",
           "SSQ": f"*{out}"}
    sig.update({k: "i32" for k in _INTS})
    # what the JIT specialises: ints equal to 1 become constants, multiples of 16 and the
    # (16-byte aligned) pointers are marked divisible by 16
    for k, v in ints.items():
        if v == 1:
            cx[k] = 1
    sig.update({k: "constexpr" for k in cx})
    div = ["X", "TILES", "G", "SABS", "SSQ"] + [k for k, v in ints.items()
                                                if v % 16 == 0 and k not in cx]
    return {"module": "cobkern.kernels.covariance", "kernel": "_moments_kernel",
            "signature": sig, "constexprs": cx, "divisible": div, "num_warps": warps,
            "num_stages": stages, "arch": arch}


# (id, shape, channels_last, dtype, output dtype, float32 product mode, 64-bit indexing)
VARIANTS = []
for _dt in (torch.bfloat16, torch.float16, torch.float32):
    _t = _TYPES[_dt]
    VARIANTS += [
        (f"{_t}-nchw-256x8x8", (500, 256, 8, 8), False, _dt, "fp64", None, False),
        (f"{_t}-nhwc-256x8x8", (500, 256, 8, 8), True, _dt, "fp64", None, False),
        (f"{_t}-nchw-64x32x32-tile32", (500, 64, 32, 32), False, _dt, "fp64", None, False),
        (f"{_t}-rows-4096", (500, 4096), False, _dt, "fp64", None, False),
    ]
VARIANTS += [
    ("bf16-nchw-i64", (500, 256, 8, 8), False, torch.bfloat16, "fp64", None, True),
    ("bf16-nchw-to-fp32", (500, 256, 8, 8), False, torch.bfloat16, "fp32", None, False),
    ("fp32-nchw-to-fp32", (500, 256, 8, 8), False, torch.float32, "fp32", None, False),
    ("fp32-nchw-tf32x3", (500, 256, 8, 8), False, torch.float32, "fp64", "tf32x3", False),
    ("fp32-nchw-tf32", (500, 256, 8, 8), False, torch.float32, "fp64", "tf32", False),
    ("fp32-nhwc-256x8x8-tf32", (500, 256, 8, 8), True, torch.float32, "fp64", "tf32", False),
    ("fp32-nhwc-64x32x32-tf32", (500, 64, 32, 32), True, torch.float32, "fp64", "tf32",
     False),
    ("fp32-rows-4096-tf32", (500, 4096), False, torch.float32, "fp64", "tf32", False),
    ("fp32-nchw-bf16x6", (500, 256, 8, 8), False, torch.float32, "fp64", "bf16x6", False),
    ("fp32-nchw-64x32x32-bf16x6", (500, 64, 32, 32), False, torch.float32, "fp64", "bf16x6",
     False),
    ("fp32-rows-4096-bf16x6", (500, 4096), False, torch.float32, "fp64", "bf16x6", False),
    ("fp32-nchw-64x32x32-fp64", (500, 64, 32, 32), False, torch.float32, "fp64", "fp64",
     False),
    ("fp32-nchw-256x8x8-fp64", (500, 256, 8, 8), False, torch.float32, "fp64", "fp64", False),
    ("fp32-nhwc-256x8x8-fp64", (500, 256, 8, 8), True, torch.float32, "fp64", "fp64", False),
    ("fp32-rows-4096-fp64", (500, 4096), False, torch.float32, "fp64", "fp64", False),
    ("fp32-nchw-fp64-to-fp32", (500, 256, 8, 8), False, torch.float32, "fp32", "fp64", False),
    ("fp32-nchw-2x2-unaligned-fp64", (500, 512, 2, 2), False, torch.float32, "fp64", "fp64",
     False),
    ("fp32-nchw-i64-fp64", (500, 256, 8, 8), False, torch.float32, "fp64", "fp64", True),
    ("fp32-nchw-2x2-unaligned", (500, 512, 2, 2), False, torch.float32, "fp64", None, False),
    ("bf16-nchw-2x2-unaligned", (500, 512, 2, 2), False, torch.bfloat16, "fp64", None, False),
    ("fp32-nchw-unaligned", (5, 67, 5, 7), False, torch.float32, "fp64", None, False),
    ("bf16-rows-unaligned", (37, 67), False, torch.bfloat16, "fp64", None, False),
]


#: the deterministic-mode launches (``SLICED``: each sample chunk adds into its own slice)
#: (slices are float64 whatever the outputs' dtype)
SLICED_VARIANTS = ["fp32-nchw-256x8x8", "bf16-nchw-256x8x8", "fp32-nchw-256x8x8-fp64",
                   "fp32-rows-4096-fp64", "fp16-nhwc-256x8x8", "fp32-nchw-2x2-unaligned"]


def _variant_spec(v: tuple, sliced: bool = False) -> dict:
    _, shape, cl, dt, out, dot, i64 = v
    spec = _spec(shape, cl, dt, out, dot, i64)
    spec["constexprs"]["SLICED"] = sliced
    return spec


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    by_name = {v[0]: v for v in VARIANTS}
    specs = [_variant_spec(v) for v in VARIANTS]
    specs += [_variant_spec(by_name[n], sliced=True) for n in SLICED_VARIANTS]
    return [dict(r, stages=s["num_stages"], block=s["constexprs"]["BLOCK"])
            for s, r in zip(specs, compile_specs(specs), strict=True)]


@pytest.mark.parametrize("j", range(len(SLICED_VARIANTS)), ids=SLICED_VARIANTS)
def test_deterministic_mode_compiles_without_spills(compiled, j):
    r = compiled[len(VARIANTS) + j]
    assert "error" not in r, r.get("error")
    spill = r["spill_stores"] + r["spill_loads"]
    assert spill == 0, f"{spill} bytes spilled ({r['registers']} registers)\n{r['ptxas_log']}"


@pytest.mark.parametrize("i", range(len(VARIANTS)), ids=[v[0] for v in VARIANTS])
def test_compiles_for_sm90_without_spills(compiled, i):
    dtype = VARIANTS[i][3]
    r = compiled[i]
    assert "error" not in r, r.get("error")
    assert r["ptxas_ok"], r["ptxas_log"]
    spill = r["spill_stores"] + r["spill_loads"]
    assert spill == 0, f"{spill} bytes spilled ({r['registers']} registers)\n{r['ptxas_log']}"
    if VARIANTS[i][5] == "fp64":  # float64 tensor cores: Hopper has no float64 wgmma
        assert r["mma_f64"] > 0, "fp64 products should run on the float64 tensor cores (DMMA)"
    elif dtype in (torch.bfloat16, torch.float16) or VARIANTS[i][5] in ("tf32", "tf32x3",
                                                                         "bf16x6"):
        if r["block"] >= 64:
            assert r["wgmma"] > 0, "64×64 tensor-core tiles should use wgmma (Hopper)"
        else:
            assert r["mma"] + r["wgmma"] > 0, "32×32 tensor-core tiles should use mma"


@pytest.mark.parametrize("i", range(len(VARIANTS)), ids=[v[0] for v in VARIANTS])
def test_two_stage_launches_vectorise_and_pipeline(compiled, i):
    """Where the launcher asks for two stages the slabs arrive by ``cp.async`` into shared
    memory a step ahead of the products; elsewhere (scalar loads) it keeps one stage."""
    r = compiled[i]
    assert "error" not in r, r.get("error")
    if "unaligned" in VARIANTS[i][0]:
        assert r["stages"] == 1, "scalar slab loads should not get a second stage"
        return
    assert r["stages"] == 2, "a VGG shape lost its two-stage launch"
    assert r["cp_async"] > 0, "slab loads are not pipelined (no cp.async)"
    assert r["ld_scalar"] <= TILE_TABLE_LOADS, (
        f"{r['ld_scalar']} scalar global loads: slab loads are not vectorised")


#: float32 IEEE launches on channel-contiguous data: NHWC maps and ``(N, C)`` rows
CHANNEL_CONTIGUOUS_IEEE = ["fp32-nhwc-256x8x8", "fp32-rows-4096"]


@pytest.mark.parametrize("name", CHANNEL_CONTIGUOUS_IEEE)
def test_channel_contiguous_float32_products_read_shared_memory_as_vectors(compiled, name):
    """The premise of ``calibrate(channels_last=True)``: the float32 IEEE products (the
    CUDA-core ``tl.dot``) read their operands from shared memory, which Triton lays out
    unswizzled in the slabs' own order. With the channels contiguous (NHWC maps, ``(N, C)``
    rows) each thread's operand values are neighbours there and load as vectors. On NCHW
    maps the slabs are sample-contiguous: most loads are scalar (56 of 98 at 64×32×32), and
    a channel's samples fill one 128-byte row, so threads of a warp reading different
    channels at one sample hit the same bank. Requires at least 90 % vector shared loads."""
    i = [v[0] for v in VARIANTS].index(name)
    r = compiled[i]
    assert "error" not in r, r.get("error")
    vec = r["ld_shared_v4"] + r["ld_shared_v2"]
    assert vec >= 0.9 * (vec + r["ld_shared_scalar"]), (
        f"{r['ld_shared_scalar']} scalar against {vec} vector shared loads")


def test_tf32_products_read_the_float32_bits_unconverted(compiled):
    """``f32_dot="tf32"`` emits no ``cvt.rna.tf32.f32``: the tensor cores read the float32
    bits and ignore the 13 low mantissa bits — the truncation its accuracy notes, the CPU
    emulation (``bench/dot_split_error.py``) and the GPU test of its bound assume.
    ``tf32x3`` rounds its splits with that conversion (the check can fail)."""
    names = [v[0] for v in VARIANTS]
    for name in ("fp32-nchw-tf32", "fp32-nhwc-256x8x8-tf32", "fp32-rows-4096-tf32"):
        r = compiled[names.index(name)]
        assert "error" not in r, r.get("error")
        assert r["cvt_rna_tf32"] == 0, f"{name}: {r['cvt_rna_tf32']} TF32 conversions"
    assert compiled[names.index("fp32-nchw-tf32x3")]["cvt_rna_tf32"] > 0


def _sweep_specs() -> list[tuple[str, dict]]:
    """The distinct launches of ``bench/gpu_diag.py``'s covariance rows that override the
    samples a step or the warps a program, add a pipeline stage, or use ``tf32`` products
    (``tf32x3`` on 32×32 tiles too): a GPU lease should not spend a row on a launch that
    does not compile or spills."""
    import json

    from bench.gpu_diag import DTYPES, _cov_jobs

    seen, out = set(), []
    for shape, dname, label, over in _cov_jobs():
        over = dict(over)
        if not ({"block_k", "num_warps"} & over.keys() or over.get("f32_dot") == "tf32"
                or over.get("num_stages", 0) > 2
                or (over.get("f32_dot") == "tf32x3" and over.get("block") == 32)):
            continue
        spec = _spec((500, *shape), bool(over.get("nhwc")), DTYPES[dname],
                     f32_dot=over.get("f32_dot"), block=over.get("block"),
                     num_stages=over.get("num_stages"), block_k=over.get("block_k"),
                     num_warps=over.get("num_warps"))
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((f"{'×'.join(map(str, shape))} {dname} {label}", spec))
    return out


def test_sweep_step_and_warp_variants_compile_without_spills():
    """Every distinct launch of the covariance sweep's samples-a-step, warps-a-program,
    three-stage and ``tf32`` rows compiles for sm_90 without spilling (offline registers:
    116–168 for bf16 at 128–256 samples a step, 96 / 179 for float32 IEEE on 2 / 1 warps)."""
    specs = _sweep_specs()
    assert len(specs) >= 10, "the sweep lost its step / warp / tf32 rows"
    bad = []
    for (name, _), r in zip(specs, compile_specs([s for _, s in specs]), strict=True):
        if "error" in r:
            bad.append(f"{name}: {r['error'][:120]}")
        elif r["spill_stores"] + r["spill_loads"]:
            bad.append(f"{name}: {r['spill_stores'] + r['spill_loads']} bytes spilled "
                       f"({r['registers']} registers)")
    assert not bad, "\n".join(bad)


#: 16-bit activations whose slab loads are scalar (no unit-stride axis a multiple of 16):
#: NCHW 2×2 maps, and channels-last maps and rows of pruned widths
SCALAR_16BIT = [("nchw-512x2x2", (500, 512, 2, 2), False),
                ("nhwc-pruned-200x8x8", (500, 200, 8, 8), True),
                ("rows-pruned-1000", (500, 1000), False)]


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_scalar_16_bit_launches_fit_the_registers_of_each_architecture(arch):
    """Where the slab loads are scalar, 128 samples a step took 216–255 registers and the
    NCHW 2×2 launch spilled 32–116 bytes (fp16 on sm_90 and sm_80, bf16 on sm_80/86/89,
    triton 3.8): the launcher takes 64 samples a step for them, which compiles without
    spills for each of these targets."""
    specs = [_spec(shape, cl, dt, arch=arch) for dt in (torch.bfloat16, torch.float16)
             for _, shape, cl in SCALAR_16BIT]
    for spec in specs:
        spec["constexprs"]["SLICED"] = False
        assert spec["constexprs"]["BLOCK_K"] == 64
        assert spec["num_stages"] == 1  # scalar loads: no pipelining
    names = [f"{dt}-{n}" for dt in ("bf16", "fp16") for n, _, _ in SCALAR_16BIT]
    bad = []
    for name, r in zip(names, compile_specs(specs), strict=True):
        if "error" in r:
            bad.append(f"{name}: {r['error'][:120]}")
        elif r["spill_stores"] + r["spill_loads"]:
            bad.append(f"{name}: {r['spill_stores'] + r['spill_loads']} bytes spilled "
                       f"({r['registers']} registers)")
    assert not bad, f"sm_{arch}:\n" + "\n".join(bad)
