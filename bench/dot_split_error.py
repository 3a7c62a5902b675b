"""Gram-matrix error of the tensor-core float32 product modes, emulated exactly on a CPU.

``tl.dot(..., input_precision=...)`` for float32 operands on the tensor cores splits each
value into lower-precision parts and keeps the largest partial products:

* ``tf32x3``: ``a = hi + lo`` in TF32 (10 explicit mantissa bits each); ``hi·hi + hi·lo +
  lo·hi`` — the dropped ``lo·lo`` and the bits below ``lo`` are ~2^-22 relative;
* ``bf16x6``: ``a = hi + mid + lo`` in bf16 (7 explicit bits each, 24 in all); the six
  products with ``i + j <= 2`` — the dropped ``mid·lo``, ``lo·mid``, ``lo·lo`` are ~2^-24
  relative and of random sign.

This script evaluates each mode's kept products in float64 (so only the split and the
dropped terms contribute, not the accumulation inside the tensor cores, which a GPU run
measures: ``bench/gpu_diag.py --parts calibration``) and prints ``max|G - G64| /
max|G64|`` for ``G = AᵀA`` on a few sample distributions, next to a plain float32 matmul.

Run: ``python bench/dot_split_error.py [--samples 20000] [--channels 128]``.
"""

from __future__ import annotations

import argparse

import torch


def split_bf16(a: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``a`` (float32) as ``parts`` bf16 values (returned in float64), largest first;
    rounding to nearest at each step, as Triton's decomposition does."""
    out, rest = [], a.clone()
    for _ in range(parts):
        head = rest.to(torch.bfloat16).float()
        out.append(head.double())
        rest = rest - head
    return out


def _tf32(x: torch.Tensor) -> torch.Tensor:
    mant, exp = torch.frexp(x)
    return torch.ldexp(torch.round(mant * 2**11) / 2**11, exp)


def split_tf32(a: torch.Tensor) -> list[torch.Tensor]:
    """``a`` (float32) as ``hi + lo`` in TF32 (returned in float64)."""
    hi = _tf32(a)
    return [hi.double(), _tf32(a - hi).double()]


def gram_kept(parts: list[torch.Tensor], max_order: int) -> torch.Tensor:
    """``Σ_{i+j <= max_order} part_iᵀ part_j`` in float64."""
    g = torch.zeros(parts[0].shape[1], parts[0].shape[1], dtype=torch.float64)
    for i, pi in enumerate(parts):
        for j, pj in enumerate(parts):
            if i + j <= max_order:
                g += pi.T @ pj
    return g


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--channels", type=int, default=128)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    n, c = args.samples, args.channels
    cases = {
        "gaussian": torch.randn(n, c, generator=g),
        "positive mean (post-activation-like)": torch.randn(n, c, generator=g) * 0.3 + 1.0,
        "heavy-tailed (cubed gaussian)": torch.randn(n, c, generator=g) ** 3,
    }
    print(f"{n} samples × {c} channels; max|G − G64| / max|G64|, kept products in float64\n")
    print("| samples | bf16x6 | tf32x3 | bf16x3 | float32 matmul |")
    print("|---|---:|---:|---:|---:|")
    for name, a in cases.items():
        a = a.float()
        exact = a.double().T @ a.double()
        scale = exact.abs().max()

        def err(gm: torch.Tensor, exact=exact, scale=scale) -> str:
            return f"{((gm - exact).abs().max() / scale).item():.1e}"

        b3 = split_bf16(a, 3)
        print(f"| {name} | {err(gram_kept(b3, 2))} | {err(gram_kept(split_tf32(a), 1))} | "
              f"{err(gram_kept(b3[:2], 1))} | {err((a.T @ a).double())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
