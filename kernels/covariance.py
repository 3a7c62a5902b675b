"""Triton kernel: streaming per-subspace second moments of a batch of activations.

One launch reads a batch ``x`` viewed as ``(B, C, P)`` (see
:class:`cobkern.ops._checks.ChannelGeometry`; every ``(b, p)`` is a sample) and adds into
float32 outputs (one batch) or float64 outputs (running sums over batches):

* the two Gram matrices ``G_U = A_Uᵀ A_U`` and ``G_V = A_Vᵀ A_V``, packed one after the
  other in one buffer (``G_U`` row-major ``split × split``, then ``G_V``);
* the per-channel ``Σ|a|`` and ``Σa²``.

Work decomposition: each subspace's Gram matrix is cut into ``BLOCK × BLOCK`` tiles and
only the block-upper triangle is computed (the launcher mirrors it). A program owns one
tile and one contiguous chunk of samples; it walks the chunk ``BLOCK_K`` samples at a time,
loads the two ``[BLOCK, BLOCK_K]`` channel slabs straight from ``x`` in its own layout, and
accumulates ``slab_i · slab_jᵀ`` with ``tl.dot`` and Kahan-compensated adds (tensor cores
for bf16/fp16: ``wgmma`` on sm_90; IEEE fp32 FMA for float32 input, so no TF32 rounding
enters the statistics; or, with ``F32_DOT="fp64"``, float32 slabs widened to float64 on
the float64 tensor cores with float64 sums and no compensation). At the end it adds its
tile into the output with ``atomic_add``.
Programs on the same sample chunk have neighbouring ids, so the slabs a chunk's tiles
share are served from L2: ``x`` comes from HBM about once. Nothing of size
``samples × C`` is ever allocated. The adds of different sample chunks into one tile race
(float addition is not associative: the last bits depend on their order); under
``torch.use_deterministic_algorithms(True)`` each chunk adds into a slice of its own
(``O(chunks · C²)`` scratch) and the slices are summed in a fixed order, so the result is
bit-reproducible. Diagonal tiles (each channel lies in exactly one) also
reduce ``|a|`` over the samples, with the same Kahan compensation across steps, and add
their tile's diagonal as ``Σa²``, which is therefore exactly the Gram diagonal.

Loads: the slab loads vectorise, and the software pipeliner copies them (``cp.async``)
one step ahead of the products, when the JIT can see that the unit-stride axis comes in
multiples of 16 (it specialises integer arguments divisible by 16): ``P`` and the image
stride for NCHW, ``split`` and ``C`` for ``(N, C)`` / NHWC — every VGG-16 activation but the
2×2 maps. Otherwise every slab element is a scalar load and a second stage would only
cost registers, so :func:`specialization` keeps one (offline sm_90 PTX/SASS, checked in
the test suite; ``bench/kernel_proxies.py --covariance``).

Interpreter caveat: triton 3.8's interpreter computes ``tl.dot`` of bfloat16 tiles wrongly,
so on CPU tensors bfloat16 slabs are widened to float32 before the dot (exact: a product
of two bfloat16 values is representable in float32). The GPU path keeps bf16 operands.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._host import cdiv
from ._launch import launch

__all__ = ["subspace_moments", "launch_config", "specialization", "tile_table",
           "mirror_upper", "default_target_programs", "KERNELS"]


@triton.jit
def _moments_kernel(
    X, TILES, G, SABS, SSQ,
    C, P, split, n_samples, n_tiles, chunk, stride_b, stride_c, stride_p,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, FLAT: tl.constexpr, F32_DOT: tl.constexpr,
    UPCAST: tl.constexpr, INDEX64: tl.constexpr, SLICED: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % n_tiles
    pid_k = pid // n_tiles
    sub = tl.load(TILES + tile * 3)
    ti = tl.load(TILES + tile * 3 + 1)
    tj = tl.load(TILES + tile * 3 + 2)
    lo = sub * split                       # U: [0, split), V: [split, C)
    hi = split + sub * (C - split)
    size = hi - lo
    g_base = sub * split * split           # packed: G_U then G_V
    offs = tl.arange(0, BLOCK)
    rows = lo + ti * BLOCK + offs
    cols = lo + tj * BLOCK + offs
    rmask = rows < hi
    cmask = cols < hi
    if INDEX64:  # only for tensors of 2^31 elements or more: 64-bit offsets cost registers
        row_off = rows.to(tl.int64) * stride_c
        col_off = cols.to(tl.int64) * stride_c
    else:
        row_off = rows * stride_c
        col_off = cols * stride_c
    if F32_DOT == "fp64":  # float64 sums: exact float32 products, no Kahan step needed
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
        s_abs = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        s_abs = tl.zeros((BLOCK,), dtype=tl.float32)
    comp = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    c_abs = tl.zeros((BLOCK,), dtype=tl.float32)  # Kahan compensation of s_abs
    is_diag = ti == tj
    start = pid_k * chunk
    end = tl.minimum(start + chunk, n_samples)
    for k0 in range(start, end, BLOCK_K):
        q = k0 + tl.arange(0, BLOCK_K)
        qmask = q < end
        if INDEX64:
            q64 = q.to(tl.int64)
            if FLAT:
                q_off = q64 * stride_p
            else:
                b = q64 // P
                q_off = b * stride_b + (q64 - b * P) * stride_p
        else:
            if FLAT:
                q_off = q * stride_p
            else:
                b = q // P
                q_off = b * stride_b + (q - b * P) * stride_p
        a = tl.load(X + row_off[:, None] + q_off[None, :],
                    mask=rmask[:, None] & qmask[None, :], other=0.0)      # [BLOCK, BLOCK_K]
        bt = tl.load(X + q_off[:, None] + col_off[None, :],
                     mask=qmask[:, None] & cmask[None, :], other=0.0)     # [BLOCK_K, BLOCK]
        if F32_DOT == "fp64":  # float64 tensor cores (DMMA): a float32 product is exact
            a64 = a.to(tl.float64)
            acc = tl.dot(a64, bt.to(tl.float64), acc, out_dtype=tl.float64)
            if is_diag:
                s_abs += tl.sum(tl.abs(a64), axis=1)
        else:
            if UPCAST:  # interpreter only: its bf16 tl.dot is wrong (triton 3.8); fp32 exact
                step = tl.dot(a.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
            elif F32_DOT == "":  # 16-bit operands: tensor cores, exact products, fp32 sums
                step = tl.dot(a, bt)
            else:
                step = tl.dot(a, bt, input_precision=F32_DOT)
            # Kahan summation across steps: the tile's error stays ~eps instead of growing
            # with the chunk length (the lossless strategy reads eigenvalues near the noise
            # floor).
            y = step - comp
            t = acc + y
            comp = (t - acc) - y
            acc = t
            if is_diag:  # Σ|a| (compensated too: the l1 importance reads it directly)
                ya = tl.sum(tl.abs(a.to(tl.float32)), axis=1) - c_abs
                ta = s_abs + ya
                c_abs = (ta - s_abs) - ya
                s_abs = ta
    g_off = g_base + (rows - lo)[:, None] * size + (cols - lo)[None, :]
    if SLICED:  # deterministic mode: each sample chunk adds into its own output slice
        # (offsets made here, after the loop: pointers kept live across it cost a spill)
        k = tl.program_id(0) // n_tiles
        G += k * (split * split + (C - split) * (C - split))
        SABS += k * C
        SSQ += k * C
    # into the outputs' own dtype: float32 for one batch, float64 for running sums
    tl.atomic_add(G + g_off, acc.to(G.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
    if is_diag:  # Σa² is the Gram diagonal: taken from the compensated tile, not re-summed
        s_sq = tl.sum(tl.where(offs[:, None] == offs[None, :], acc, 0.0), axis=1)
        tl.atomic_add(SABS + rows, s_abs.to(SABS.dtype.element_ty), mask=rmask)
        tl.atomic_add(SSQ + rows, s_sq.to(SSQ.dtype.element_ty), mask=rmask)


KERNELS = {"moments": _moments_kernel}

#: Programs to aim for on a GPU: a few per SM of an H100 (132 SMs).
TARGET_PROGRAMS_GPU = 4 * 132
#: ... except for 16-bit inputs on 64×64 tiles: one per SM. There a program's tensor-core
#: products are cheap next to its epilogue, 4,096 float64 atomic adds, so fewer sample
#: chunks (fewer epilogues) win: on an H200 (2026-11-27, batch 500, CUDA-graph replay, one
#: run) 132 programs against 528 took 0.035 / 0.026 / 0.030 / 0.025 ms against 0.059 /
#: 0.042 / 0.040 / 0.037 ms at 128×16×16 / 256×8×8 / 512×4×4 / 512×2×2 (1.3–1.7× faster),
#: and the same at the 4096-wide layers (0.087 ms); the 32×32 tiles of 64×32×32 were 1.7×
#: *slower* (0.123 against 0.071 ms), and float32 was mostly slower too — both keep 528.
TARGET_PROGRAMS_GPU_16BIT_WIDE = 132
#: On the interpreter every program runs one after another: few and large is faster.
TARGET_PROGRAMS_INTERPRETER = 4


#: ``tl.dot`` precision for float32 activations: exact IEEE products (no TF32 rounding).
#: Tensor-core alternatives: ``"tf32"`` (one TF32 product: no conversion is emitted, the
#: tensor cores read the float32 bits and ignore the 13 low mantissa bits — PyTorch's
#: numerical-accuracy notes, triton-lang/triton#4574 — so every operand is truncated by up
#: to 2^-10 relative; the cheapest float32 mode offline — 4,560 SASS instructions per
#: sample on a 128×16×16 channels-last layer against 11,928 for ``"ieee"`` and 8,832 for
#: ``"tf32x3"``, sm_90, triton 3.8. Emulated on a CPU
#: (``bench/dot_split_error.py --lossless``) the leading Gram eigenvalues shrink by ~7e-4
#: relative (Gram error 7e-4 of its largest entry, against 5e-8 for tf32x3), the leading
#: eigenvectors and the lossless rule's counts do not change, and the null directions of a
#: saturated layer rise to at most 4e-9 of the largest eigenvalue, well under the float32
#: tolerance of 1e-7 — on a 512 → 4096 TSRA layer and the CoB layers of the README's
#: trained ``quick`` model; not yet timed), ``"tf32x3"`` (three TF32 products; 1.7e-7 relative
#: Gram error on an H200) and ``"bf16x6"`` (each float32 value split into three bf16
#: parts, the six largest of the nine partial products: dropped terms are 2^-24 relative;
#: an exact-arithmetic emulation on 20,000×128 samples put its Gram error at 2e-10–3e-9
#: relative against 5e-8 for tf32x3 — hardware accumulation inside the tensor cores comes
#: on top, so only a GPU run can say whether it keeps the lossless strategy's margin).
#: ``"fp64"``: each float32 slab widened to float64 in registers and multiplied on the
#: float64 tensor cores (``mma.sync ... .f64``, DMMA, on sm_80/sm_90 — 67 TFLOP/s on an
#: H100/H200, against the FMA path's 3.8–6.5 TFLOP/s measured on the convolutions): a
#: product of two float32 values is exact in float64 and the tile sums in float64, so it is
#: more accurate than ``"ieee"`` (no Kahan step needed). Timed on an H200 (2026-11-27,
#: batch 500, CUDA-graph replay, ``BENCHMARKS.md``): on NCHW conv maps 1.1–2.7× faster
#: than ``"ieee"`` (0.293 / 0.123 / 0.079 / 0.077 / 0.043 ms against 0.324 / 0.244 / 0.216
#: / 0.202 / 0.066 from 64×32×32 to 512×2×2), but slower on the 4096-wide linear layers
#: (0.225 against 0.185) and on channels-last maps (0.234 against 0.123 at 64×32×32), where
#: IEEE reads vectors — and channels-last IEEE is the fastest of all, hence the default
#: (and channels-last calibration for float32 models on CUDA). Consumer GPUs run float64 at
#: 1/64 rate, where it would be slow.
F32_DOT_DEFAULT = "ieee"


def launch_config(subspace: int, dtype: torch.dtype, block: int | None = None,
                  f32_dot: str | None = None, block_k: int | None = None,
                  num_warps: int | None = None,
                  channels_contig: bool = False,
                  vector_loads: bool = True) -> tuple[int, int, int, int]:
    """``(BLOCK, BLOCK_K, num_warps, num_stages)`` for a subspace of this size and dtype.

    ``channels_contig``: the slabs' channel axis is the unit-stride one (``(N, C)`` rows and
    NHWC maps; NCHW maps have unit-stride positions), which sets float32 IEEE's step.
    ``vector_loads``: the slab loads vectorise (:func:`specialization`: a unit-stride axis
    in multiples of 16); where they do not, 16-bit inputs take 64 samples a step, not 128.

    16-bit inputs: tiles of 64×64 (8 warps), or 32×32 (4 warps) when the wider subspace has
    at most 32 channels — a 64×64 tile of a 32-channel subspace is three quarters padding
    (VGG-16's first two layers; offline sm_90 SASS: 2.6× fewer instructions per sample).
    float32 with IEEE products: 32×32 tiles at every width. On an H200 (2026-11-27, batch
    500, CUDA-graph replay) they beat 64×64 at every VGG-16 layer wider than 32 channels:
    3 % (512×4×4) to 25 % (128×16×16, 0.244 ms against 0.325), 12 % less kernel time over
    the network; in bf16 they were mixed (27 % faster at 512×2×2, 19 % slower on the
    4096-wide layers), so bf16 keeps 64×64, and so do float32's tensor-core modes
    (``tf32x3``, ``bf16x6``: timed with 64×64 tiles; with 32×32 ones ``bf16x6`` spills 12
    bytes on the 4096-wide layers under triton 3.6, offline). Wider subspaces get more
    tiles rather than bigger ones. Samples a step (H200, 2026-11-28, batch 500, CUDA-graph
    replay, every VGG-16 CoB layer): 128 for 16-bit inputs — against 64, bf16 NHWC 16–27 %
    less time at every layer (0.0578 against 0.0744 ms at 64×32×32), NCHW 2–10 % less at
    every layer but 64×32×32 (1.6 % more), the 4096-wide linears 10 % less (256 was faster
    still on NHWC maps but took 27 % more than 64 on the linears; fp16 takes bf16's
    settings, untimed) — where the slab loads vectorise. With scalar ones (no unit-stride
    axis in multiples of 16: NCHW maps whose H·W is not, e.g. VGG-16's 2×2, and pruned
    widths) 128 samples took 216–255 registers offline and the NCHW 2×2 launch spilled
    32–116 bytes (fp16 on sm_90 and sm_80, bf16 on sm_80/86/89), so those take 64
    (125–239 registers, no spills): 8 % slower than 128 in bf16 at 512×2×2 on the H200
    (0.0247 against 0.0228 ms, ~2 µs a batch). float32 IEEE: 64 on channel-contiguous
    slabs — against 32, 3–13 % less time at every NHWC layer, 4 % on the linears — and 32
    on NCHW ones (64 within ±3.2 % there); the tensor-core modes 32. Two pipeline stages
    (``cp.async`` on sm_90; :func:`specialization` keeps one where the loads are scalar).
    The fp32 tile accumulator, its Kahan compensation and each step's product tile live
    in registers: with 4 warps a 64×64 tile needs more than 255 registers per thread and
    spills; with 8 warps float32 uses 128 registers (two programs
    per SM) and bf16 ~100, no spills. float32 with ``f32_dot="fp64"`` takes the 16-bit
    tiles (64×64 above 32 channels): each step widens both slabs to float64 (conversions
    run at a fraction of the DMMA rate), and a wider tile converts fewer elements per
    product; its float64 accumulator has no Kahan term. It runs 8 warps with steps of 16
    samples on 64×64 tiles and 32 on 32×32 ones: offline sm_90, triton 3.6 (whose float64
    ``mma`` is m16n8k16) spilled 84 bytes at 64×64 with 32-sample steps and 24 bytes at
    32×32 with 4 warps; these settings are spill-free on 3.6 and 3.8 (102–118 and 46–80
    registers). ``f32_dot="tf32"`` takes the tensor-core modes' tiles, 32
    samples a step (120 registers at 64×64, 8 warps). These configurations are compiled and
    checked for spills, tensor-core products and pipelined loads in the test suite.
    ``block``, ``block_k`` (samples a step) and ``num_warps`` override the defaults (tuning
    sweeps, ``bench/gpu_diag.py --parts covariance``; 2 warps a program, twice the
    programs, on float32 IEEE NHWC slabs — 19–21 % fewer SASS instructions per sample
    offline — took 14 % less to 9 % more time than 4 warps on the H200, and beat 64
    samples a step by 2 % at one layer only).
    """
    if dtype == torch.float32 and f32_dot == "fp64":
        block = block or (32 if subspace <= 32 else 64)
        default_k, default_warps = (16 if block >= 64 else 32), 8
    else:
        ieee = dtype == torch.float32 and f32_dot in (None, "", "ieee")
        block = block or (32 if subspace <= 32 or ieee else 64)
        if dtype != torch.float32:
            default_k = 128 if vector_loads else 64
        else:
            default_k = 64 if ieee and channels_contig else 32
        default_warps = 8 if block >= 64 else 4
    return block, block_k or default_k, num_warps or default_warps, 2


#: Products the float32 path accepts (both triton 3.6 and 3.8 on sm_90): ``tl.dot`` input
#: precisions, and ``"fp64"`` (float64 tensor cores; see :data:`F32_DOT_DEFAULT`).
F32_DOTS = ("ieee", "tf32", "tf32x3", "bf16x6", "fp64")


def _f32_dot(mode: str, on_gpu: bool) -> str:
    if mode not in F32_DOTS:
        raise ValueError(f"f32_dot must be one of {F32_DOTS}, got {mode!r}")
    # the interpreter accepts only tf32 / tf32x3 / ieee and computes every float32 dot
    # exactly anyway: bf16x6 runs there as ieee (its GPU products are checked on a GPU)
    return "ieee" if mode == "bf16x6" and not on_gpu else mode


@functools.lru_cache(maxsize=1024)
def specialization(geo, split: int, dtype: torch.dtype, numel: int, on_gpu: bool = True,
                   f32_dot: str | None = None, block: int | None = None,
                   num_stages: int | None = None, block_k: int | None = None,
                   num_warps: int | None = None) -> tuple[dict, int, int]:
    """``(constexprs, num_warps, num_stages)`` of one launch on a ``geo``-shaped input.

    The single source of the launch decisions, shared by the launcher and the
    ahead-of-time tests (which compile exactly these variants). Two pipeline stages only
    where the slab loads vectorise (see the module docstring): with scalar loads the
    second stage adds registers (float32: 154 instead of 128 at 8 warps, one program per SM
    instead of two) and no prefetch. Cached: it runs on every calibration batch and layer.
    The returned dict is shared; do not mutate it. ``block`` / ``num_stages`` /
    ``block_k`` / ``num_warps`` override the defaults (tuning sweeps).
    """
    n = geo.B * geo.P
    mode = _f32_dot(f32_dot or "ieee", on_gpu) if dtype == torch.float32 else ""
    vector_q = geo.stride_p == 1 and geo.P % 16 == 0 and (geo.B == 1 or geo.stride_b % 16 == 0)
    vector_c = geo.stride_c == 1 and split % 16 == 0 and geo.C % 16 == 0
    vector = vector_q or vector_c
    block, block_k, num_warps, stages = launch_config(max(split, geo.C - split), dtype, block,
                                                      mode, block_k, num_warps,
                                                      channels_contig=geo.stride_c == 1,
                                                      vector_loads=vector)
    if num_stages is None:
        num_stages = stages if vector else 1
    constexprs = {
        "BLOCK": block, "BLOCK_K": block_k, "FLAT": geo.B == 1,
        "F32_DOT": mode,
        "UPCAST": not on_gpu and dtype == torch.bfloat16,
        "INDEX64": numel >= 2**31 - 1 or n >= 2**31 - 2 * block_k,
        "SLICED": False,  # the launcher sets it in deterministic mode
    }
    return constexprs, num_warps, num_stages


def default_target_programs(on_gpu: bool, constexprs: dict) -> int:
    """The grid size :func:`subspace_moments` aims for with a :func:`specialization`'s
    constexprs: :data:`TARGET_PROGRAMS_GPU_16BIT_WIDE` for 16-bit inputs on 64×64 tiles,
    :data:`TARGET_PROGRAMS_GPU` for other GPU launches, :data:`TARGET_PROGRAMS_INTERPRETER`
    under the interpreter."""
    if not on_gpu:
        return TARGET_PROGRAMS_INTERPRETER
    if constexprs["F32_DOT"] == "" and constexprs["BLOCK"] >= 64:
        return TARGET_PROGRAMS_GPU_16BIT_WIDE
    return TARGET_PROGRAMS_GPU


@functools.cache
def tile_table(su: int, sv: int, block: int, device: torch.device) -> torch.Tensor:
    """Flat int32 ``(n_tiles·3,)`` table of ``(subspace, tile_row, tile_col)``, block-upper.

    Cached per device: a calibration calls the kernel once per layer and batch, and a
    host-to-device copy each time would cost more than a small layer's kernel. Never
    evicted: a recorded CUDA graph (``calibrate(cuda_graphs=True)``) reads the table at the
    address it had when captured (a process meets a handful of layer shapes).
    """
    rows = []
    for sub, size in ((0, su), (1, sv)):
        nb = cdiv(size, block)
        rows += [(sub, i, j) for i in range(nb) for j in range(i, nb)]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1).to(device)


def mirror_upper(g: torch.Tensor) -> None:
    """Make the square ``g`` exactly symmetric from its upper triangle, in place.

    The kernel computes the block-upper tiles, which contain the element-wise upper
    triangle; the lower triangle (including the lower halves of diagonal tiles, computed
    by ``tl.dot`` with a different summation order) is replaced by the transpose.
    """
    g.copy_(torch.triu(g) + torch.triu(g, 1).T)


def subspace_moments(x: torch.Tensor, geo, split: int, packed: torch.Tensor,
                     sum_abs: torch.Tensor, sum_sq: torch.Tensor,
                     target_programs: int | None = None, mirror: bool = True,
                     f32_dot: str | None = None, block: int | None = None,
                     num_stages: int | None = None, block_k: int | None = None,
                     num_warps: int | None = None) -> None:
    """Add the moments of ``x`` into the outputs (float32, or float64 running sums).

    Args:
        x: the batch, float32/bfloat16/float16, described by ``geo`` (a
            :class:`~cobkern.ops._checks.ChannelGeometry`).
        split: size of ``U``.
        packed: float32 or float64 ``(split² + (C-split)²,)``: ``G_U`` then ``G_V``,
            row-major. Only the block-upper tiles are added to.
        sum_abs, sum_sq: ``(C,)``, the same dtype as ``packed``.
        target_programs: grid size to aim for (default: a few per H100 SM on CUDA — one for
            16-bit inputs on 64×64 tiles, :data:`TARGET_PROGRAMS_GPU_16BIT_WIDE` — and a
            handful under the interpreter).
        mirror: make both Gram matrices symmetric from their upper triangles afterwards.
            Running sums pass ``False`` and mirror once when read (:func:`mirror_upper`).
        f32_dot: ``tl.dot`` input precision for float32 ``x`` (one of :data:`F32_DOTS`);
            default :data:`F32_DOT_DEFAULT`.
        block: Gram tile size override (tuning sweeps; see :func:`launch_config`).
        num_stages: pipeline stages override (tuning sweeps; see :func:`specialization`).
        block_k: samples per step override (tuning sweeps; a power of two, at least 16).
        num_warps: warps per program override (tuning sweeps).
    """
    C, n = geo.C, geo.B * geo.P
    su, sv = split, C - split
    # the module default is read here, not inside the cached specialization: a change of
    # F32_DOT_DEFAULT (the diag's mode switch) must reach the next launch
    f32_dot = f32_dot or F32_DOT_DEFAULT
    constexprs, num_warps, num_stages = specialization(
        geo, split, x.dtype, x.numel(), x.device.type == "cuda", f32_dot, block, num_stages,
        block_k, num_warps)
    table = tile_table(su, sv, constexprs["BLOCK"], x.device)
    n_tiles = table.numel() // 3
    if target_programs is None:
        target_programs = default_target_programs(x.device.type == "cuda", constexprs)
    block_k = constexprs["BLOCK_K"]
    n_chunks = max(1, min(cdiv(n, block_k), cdiv(target_programs, n_tiles)))
    chunk = cdiv(cdiv(n, n_chunks), block_k) * block_k
    n_chunks = cdiv(n, chunk)
    ints = (C, geo.P, split, n, n_tiles, chunk, geo.stride_b, geo.stride_c, geo.stride_p)
    if n_chunks > 1 and torch.are_deterministic_algorithms_enabled():
        # every sample chunk into its own slice, then a fixed-order sum: no two programs
        # add into one element, so the result does not depend on their timing. The slices
        # are float64 whatever the outputs (float32 outputs: one rounding, at the end; and
        # the float32-output launch with slices spilled 4 bytes, offline sm_90)
        parts = [torch.zeros((n_chunks, t.numel()), dtype=torch.float64, device=t.device)
                 for t in (packed, sum_abs, sum_sq)]
        launch(_moments_kernel, (n_tiles * n_chunks,), (x, table, *parts), ints, (),
               dict(constexprs, SLICED=True), num_warps, num_stages)
        for t, part in zip((packed, sum_abs, sum_sq), parts, strict=True):
            t += part.sum(0).to(t.dtype)
    else:
        launch(_moments_kernel, (n_tiles * n_chunks,), (x, table, packed, sum_abs, sum_sq),
               ints, (), constexprs, num_warps, num_stages)
    if mirror:
        mirror_upper(packed[: su * su].view(su, su))
        mirror_upper(packed[su * su:].view(sv, sv))
