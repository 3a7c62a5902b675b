"""Every shipped TSRA kernel configuration compiles for sm_90 with no GPU present.

The interpreter accepts code the GPU compiler rejects; here each variant the launcher can
pick at the VGG-16 shapes (and at the edges: C = 2, odd C, C = 16,384) is compiled ahead
of time to PTX and assembled by ptxas, and the offline performance proxies of
``shared/docs/kernel-checks-without-gpu.md`` are checked: zero register spills, and
vectorised (``v4``) global loads and stores along the unit-stride axis wherever the JIT
would see 16-divisible sizes.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest

pytest.importorskip("triton")

from aot_tools import compile_specs  # noqa: E402

from cobkern.kernels.tsra import specialization  # noqa: E402

DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
BATCH = 1024
# (C, P, channels_contig[, split]): VGG-16 at batch 1024 in both layouts, the classifier, and
# edges; the split is C // 2 unless given.
SHAPES = [
    *[(c, hw, False) for c, hw in [(64, 1024), (128, 256), (256, 64), (512, 16), (512, 4)]],
    (300, 4, False), (100, 8, False), (64, 2, False),  # pruned widths at short rows
    *[(c, BATCH * hw, True) for c, hw in [(64, 1024), (128, 256), (256, 64), (512, 16),
                                          (512, 4)]],
    (4096, BATCH, True),  # classifier, widest single tile
    (16384, BATCH, True),  # chunked kernels
    (5000, 6, False),  # chunked, channel-major, ragged chunk
    (2, 1000, True),  # narrowest
    (300, 64, False),  # pruned widths: not a power of two
    (100, 64, False, 37), (256, 16, False, 200),  # pruned: unbalanced subspaces
    (300, 4096, True),
    # channels-last with a 16-aligned split (the split kernels), V not a power of two:
    # masked V block; and a split that is not 16-aligned (the single tile)
    (80, BATCH * 16, True, 32), (48, BATCH * 16, True, 16), (96, BATCH * 16, True, 40),
    (7, 15, False),
]


def _signature(kernel: str, dtype: str) -> dict[str, str]:
    """The runtime arguments' types; the constexprs are added from the specialisation."""
    ptrs = ["X", "Y", "BIAS"] if "_fwd_" in kernel else ["DY", "X", "DX", "BIAS", "DB"]
    sig = {p: f"*{dtype}" for p in ptrs}  # unused: ``_spec`` makes BIAS / DB None constexprs
    if "DB" in sig:
        sig["DB"] = "*fp32"  # the bias gradient's float32 partial sums
    ints = ["C", "P", "split", "n_pblocks", "stride_b", "stride_c", "stride_p"]
    if "_stream_" in kernel:  # the streaming backward also takes the tile count
        ints.insert(4, "n_tiles")
    sig.update({k: "i32" for k in ints})
    sig.update({k: "fp32" for k in ["a_u", "b_u", "a_v", "b_v", "eps", "inv_norm_size",
                                    "rms_eps"]})
    return sig


def _rows(consts: dict) -> int:
    """Channel rows of a program's tile: all channels, or the split kernels' two blocks."""
    return consts.get("BLOCK_C") or consts["BLOCK_U"] + consts["BLOCK_V"]


def _block_rows(consts: dict) -> int:
    """Rows of the smallest block a load covers (its elements per thread bound the vector
    width): the whole tile, or the split kernels' smaller subspace block."""
    return consts.get("BLOCK_C") or min(consts["BLOCK_U"], consts["BLOCK_V"])


def _spec(c: int, p: int, cl: bool, direction: str, dtype: str, rms: bool,
          split: int | None = None, **tuning: int | None) -> dict:
    """The launcher's variant for a ``(C, P)`` problem, with the facts the JIT would
    specialise on: pointers and ints divisible by 16 (0 included) marked, ints equal to 1
    turned into constants."""
    split = c // 2 if split is None else split
    kernel, consts, warps, _ = specialization(c, p, split, cl, direction, rms, DTYPES[dtype],
                                              **tuning)
    kernel = getattr(kernel, "fn", kernel).__name__
    ints = {"C": c, "P": p, "split": split, "stride_b": 0 if cl else c * p,
            "stride_c": 1 if cl else p, "stride_p": c if cl else 1}
    consts = {**consts, **{k: v for k, v in ints.items() if v == 1}}
    if not consts["HAS_BIAS"]:  # the launchers pass None, which the JIT makes a constexpr
        consts["BIAS"] = None
    if not consts.get("BIAS_GRAD", True):
        consts["DB"] = None
    sig = _signature(kernel, dtype)
    sig.update({k: "constexpr" for k in consts})
    ptrs = [k for k, v in sig.items() if v.startswith("*")]
    divisible = ptrs + [k for k, v in ints.items() if v % 16 == 0]
    return dict(module="cobkern.kernels.tsra", kernel=kernel, signature=sig,
                constexprs=consts, num_warps=warps, divisible=divisible,
                meta=dict(C=c, P=p, cl=cl, dtype=dtype, rms=rms, split=split,
                          block_p=consts["BLOCK_P"]))


def _variants():
    """One spec per distinct compiled variant."""
    seen = {}
    for direction in ["forward", "backward"]:
        for dtype in DTYPES:
            for rms in [False, True]:
                for c, p, cl, *split in SHAPES:
                    spec = _spec(c, p, cl, direction, dtype, rms, *split)
                    key = (spec["kernel"], dtype, spec["num_warps"],
                           tuple(sorted(spec["divisible"])),
                           tuple(sorted(spec["constexprs"].items())))
                    seen.setdefault(key, spec)
    return list(seen.values())


@functools.cache
def _compiled():
    specs = _variants()
    results = compile_specs([{k: v for k, v in s.items() if k != "meta"} for s in specs])
    return list(zip(specs, results, strict=True))


def _name(spec):
    m = spec["meta"]
    grad = ", bias grad" if spec["constexprs"].get("BIAS_GRAD") else ""
    return (f"{spec['kernel']}[{m['dtype']}, C={m['C']}, split={m['split']}, P={m['P']}, "
            f"{'NHWC' if m['cl'] else 'NCHW'}, rms={m['rms']}{grad}]")


def test_every_variant_compiles_and_assembles():
    failures = [f"{_name(s)}: {r.get('error') or r['ptxas_log'][-500:]}"
                for s, r in _compiled() if "error" in r or not r["ptxas_ok"]]
    assert not failures, "\n".join(failures)
    assert len(_compiled()) >= 60  # the enumeration really covers the family


def test_no_register_spills():
    spills = [f"{_name(s)}: {r['spill_stores']} B stores / {r['spill_loads']} B loads, "
              f"{r['registers']} regs" for s, r in _compiled()
              if "error" not in r and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, "\n".join(spills)


def test_unit_stride_axis_is_vectorised():
    """Where the unit-stride extent of a tile row is >= 16 bytes and the JIT would see
    16-divisible sizes, every global load and store is a 128-bit vector access."""
    checked, bad = 0, []
    for s, r in _compiled():
        m = s["meta"]
        elem = DTYPES[m["dtype"]]
        per_thread = (_block_rows(s["constexprs"]) * s["constexprs"]["BLOCK_P"]
                      // (32 * s["num_warps"]))  # a block too small for vectors cannot vectorise
        if m["cl"]:  # the single tile needs no channel mask; the split kernels' blocks
            # start 16-aligned (SPLIT_ALIGN), so a mask at a 16-divisible C stays uniform
            eligible = s["constexprs"].get("EVEN_C", True) and m["C"] % 16 == 0
        elif s["constexprs"]["SMALL_P"]:  # short NCHW rows: vectors of the whole row
            eligible = m["P"] * elem >= 16 and per_thread * elem >= 16
        else:
            eligible = m["P"] % 16 == 0 and m["block_p"] * elem >= 16
        if (s["constexprs"]["SMALL_P"] and m["P"] * elem == 8 and per_thread * elem >= 8
                and "error" not in r):
            if r["ld_scalar"] or r["ld_v2"] == 0:  # 8-byte rows: 64-bit vectors
                bad.append(f"{_name(s)}: ld v2={r['ld_v2']} scalar={r['ld_scalar']}")
        if not eligible or "error" in r:
            continue
        checked += 1
        if r["ld_scalar"] or r["st_scalar"] or r["ld_v4"] == 0 or r["st_v4"] == 0:
            bad.append(f"{_name(s)}: ld v4={r['ld_v4']} v2={r['ld_v2']} "
                       f"scalar={r['ld_scalar']}; st v4={r['st_v4']} scalar={r['st_scalar']}")
    assert checked >= 40
    assert not bad, "\n".join(bad)


def test_sweep_candidates_compile_without_spills():
    """The tile sweep (``bench/gpu_diag.py``) times every candidate at every VGG-16 shape it
    fits (:func:`bench.gpu_diag.fits`), and its winners become tuning-table entries: each
    such launch must compile for sm_90, assemble, and hold its tile in registers (a
    spilling candidate would be timed for nothing, or shipped). RMSNorm→TSRA, the variant
    with more arithmetic (where plain TSRA spilled, RMSNorm→TSRA spilled at least as much in
    the offline check that pruned the list)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.gpu_diag import CONFIGS, _tuning, fits, problem, tile_cases

    specs = [_spec(*problem(shape, nhwc), direction, dtype, True, **_tuning(cfg))
             for direction, cfgs in CONFIGS.items() for cfg in cfgs
             for dtype in ("bf16", "fp32") for shape, nhwc in tile_cases()
             if fits(shape, DTYPES[dtype], direction, cfg, nhwc)]
    assert len(specs) >= 300 and any(s["constexprs"]["VEC_P"] for s in specs)
    assert any(s["meta"]["cl"] and s["meta"]["P"] > 1024 for s in specs), \
        "no channels_last conv candidate"
    # one compile per distinct launch (channels_last candidates repeat without VEC_P)
    seen, unique = set(), []
    for s in specs:
        key = repr({k: v for k, v in s.items() if k != "meta"})
        if key not in seen:
            seen.add(key)
            unique.append(s)
    specs = unique
    results = compile_specs([{k: v for k, v in s.items() if k != "meta"} for s in specs])
    bad = [f"{_name(s)} {s['num_warps']}w VEC_P={s['constexprs']['VEC_P']}: "
           f"{r.get('error') or r['ptxas_log'][-300:]}"
           for s, r in zip(specs, results, strict=True)
           if "error" in r or not r["ptxas_ok"] or r["spill_stores"] or r["spill_loads"]]
    assert not bad, "\n".join(bad)


def _shipped_table_specs() -> list[dict]:
    """Each shipped tuning table's entries at the measured problem and, for channels-last
    entries, at the batch sizes they also serve (``P`` halved and doubled; channel-major
    entries serve only their own ``P``; ``C`` and the split must match exactly), both
    RMSNorm settings: what those launches would compile. Duplicates (the same compiled
    variant) once."""
    import json

    from cobkern.ops.tuning import TABLE_DIR, load_table

    dtypes_of = {4: ("fp32",), 2: ("bf16", "fp16")}  # fp16 launches read the 2-byte entries
    specs, seen = [], set()
    for path in sorted(TABLE_DIR.glob("*.json")):
        for e in load_table(path).entries:
            served = {e.P, max(1, e.P // 2), 2 * e.P} if e.channels_last else {e.P}
            for p in sorted(served):
                for rms in (False, True):
                    for dtype in dtypes_of[e.itemsize]:
                        s = _spec(e.C, p, e.channels_last, e.direction, dtype, rms, e.split,
                                  **e.tuning)
                        key = json.dumps({k: v for k, v in s.items() if k != "meta"},
                                         sort_keys=True)
                        if key not in seen:
                            seen.add(key)
                            specs.append(s)
    return specs


def test_shipped_tuning_tables_compile_without_spills():
    """A shipped table (``cobkern/ops/tuning_tables``) replaces the heuristic's launch on its
    device; every launch it can select must compile for sm_90 and hold its tile in
    registers, like the heuristic's."""
    specs = _shipped_table_specs()
    if not specs:
        pytest.skip("no tuning table is shipped yet (they come from GPU measurements)")
    results = compile_specs([{k: v for k, v in s.items() if k != "meta"} for s in specs])
    bad = [f"{_name(s)} {s['num_warps']}w: {r.get('error') or r['ptxas_log'][-300:]}"
           for s, r in zip(specs, results, strict=True)
           if "error" in r or not r["ptxas_ok"] or r["spill_stores"] or r["spill_loads"]]
    assert not bad, "\n".join(bad)


def test_float_constants_stay_float32_when_launched_as_fp64():
    """Triton's JIT passes the gain constants (Python floats) as fp32; inductor's generated
    launches of the inline ops (``set_compile_kernels("inline")``) pass them as fp64. The
    kernels cast them to float32 first, so either way no float64 arithmetic is compiled
    (float64 runs at a fraction of float32's rate, and its square roots and exponentials
    would differ from the eager launch). One variant per kernel family, fwd and bwd, with
    RMSNorm (the path that uses every constant); the fp32 launch is the control."""
    floats = ["a_u", "b_u", "a_v", "b_v", "eps", "inv_norm_size", "rms_eps"]
    specs, seen = [], set()
    for c, p, cl, split in [(64, 1024, False, 32), (64, BATCH * 1024, True, 40),
                            (16384, BATCH, True, 8192)]:  # split, tile, chunked
        for direction in ("forward", "backward"):
            spec = _spec(c, p, cl, direction, "bf16", True, split)
            if spec["kernel"] in seen:
                continue
            seen.add(spec["kernel"])
            for typ in ("fp32", "fp64"):
                s = dict(spec, signature={**spec["signature"], **dict.fromkeys(floats, typ)})
                specs.append(s)
    results = compile_specs([{k: v for k, v in s.items() if k != "meta"} for s in specs])
    assert len(seen) == 6  # split, tile and chunked kernels, both directions
    for s, r in zip(specs, results, strict=True):
        assert "error" not in r and r["ptxas_ok"], f"{_name(s)}: {r}"
        assert r["f64_arith"] == 0, f"{_name(s)} with {s['signature']['a_u']} constants"
        assert not (r["spill_stores"] or r["spill_loads"]), f"{_name(s)}: spills"


#: launches with a bias (``HAS_BIAS``: a float32 ``(C,)`` bias beside the activations, as a
#: convolution's bias under bf16 autocast): the VGG-16 conv shapes NCHW and channels-last,
#: the classifier rows, the chunked kernels and a pruned width
BIAS_SHAPES = [(64, 1024, False), (512, 4, False), (300, 64, False), (64, BATCH * 1024, True),
               (4096, BATCH, True), (16384, BATCH, True)]


@functools.cache
def _bias_compiled():
    specs = []
    for direction, bias_grad in (("forward", False), ("backward", False), ("backward", True)):
        for dtype in ("bf16", "fp32"):
            for c, p, cl in BIAS_SHAPES:
                tuning = {"bias_grad": True} if bias_grad else {}
                spec = _spec(c, p, cl, direction, dtype, True, has_bias=True, **tuning)
                spec["signature"]["BIAS"] = "*fp32"
                specs.append(spec)
    results = compile_specs([{k: v for k, v in s.items() if k != "meta"} for s in specs])
    return list(zip(specs, results, strict=True))


def test_bias_launches_compile_without_spills_and_keep_vector_accesses():
    """With the bias add compiled in, every launch still compiles for sm_90 without spills,
    and where the bias-free launch moves ``x`` in 128-bit vectors the biased one still does
    (the bias itself is ``C`` values a program loads once: a few scalar loads allowed)."""
    assert all(s["constexprs"]["HAS_BIAS"] for s, _ in _bias_compiled())
    bad = []
    for s, r in _bias_compiled():
        if "error" in r or not r["ptxas_ok"] or r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{_name(s)}: {r.get('error') or r['ptxas_log'][-300:]}")
            continue
        m = s["meta"]
        vector = (m["C"] % 16 == 0) if m["cl"] else (m["P"] % 16 == 0)
        # scalar stores: the bias gradient's partial sums (C floats a program), never dx
        if vector and (r["ld_v4"] == 0 or r["st_v4"] == 0
                       or (r["st_scalar"] and not s["constexprs"].get("BIAS_GRAD"))):
            bad.append(f"{_name(s)}: ld v4={r['ld_v4']} scalar={r['ld_scalar']}; "
                       f"st v4={r['st_v4']} scalar={r['st_scalar']}")
    assert not bad, "\n".join(bad)


def test_streaming_backward_with_bias_gradient_compiles_without_spills():
    """The streaming backward candidates (``bench/gpu_diag.py``'s ``STREAM_CONFIGS``) also
    hold a bias and their running per-channel sums of ``dx`` (the bias gradient's partials,
    stored once at the end) in registers: what training with ``fuse_conv_bias`` would
    launch, were a sweep to ship them. sm_90, the first and a small VGG-16 map, both
    layouts, both dtypes."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.gpu_diag import STREAM_CONFIGS, _tuning, problem

    specs = [_spec(*problem(shape, nhwc), "backward", dtype, True, has_bias=True,
                   bias_grad=True, **_tuning(cfg))
             for cfg in STREAM_CONFIGS for dtype in ("bf16", "fp32")
             for shape, nhwc in [((64, 32, 32), False), ((64, 32, 32), True),
                                 ((256, 8, 8), False)]]
    assert all("_stream_" in s["kernel"] and s["constexprs"]["BIAS_GRAD"] for s in specs)
    results = compile_specs([{k: v for k, v in s.items() if k != "meta"} for s in specs])
    bad = [f"{_name(s)} {s['num_warps']}w: {r.get('error') or r['ptxas_log'][-300:]}"
           for s, r in zip(specs, results, strict=True)
           if "error" in r or not r["ptxas_ok"] or r["spill_stores"] or r["spill_loads"]]
    assert not bad, "\n".join(bad)
