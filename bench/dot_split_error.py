"""Gram-matrix error of the tensor-core float32 product modes, emulated exactly on a CPU.

``tl.dot(..., input_precision=...)`` for float32 operands on the tensor cores splits each
value into lower-precision parts and keeps the largest partial products:

* ``tf32x3``: ``a = hi + lo`` in TF32 (10 explicit mantissa bits each); ``hi·hi + hi·lo +
  lo·hi`` — the dropped ``lo·lo`` and the bits below ``lo`` are ~2^-22 relative;
* ``tf32``: one product of the operands as the tensor cores read float32 bits without a
  conversion (Triton emits none for ``input_precision="tf32"``): the 13 low mantissa bits
  ignored, i.e. each value truncated toward zero by up to 2^-10 relative;
* ``bf16x6``: ``a = hi + mid + lo`` in bf16 (7 explicit bits each, 24 in all); the six
  products with ``i + j <= 2`` — the dropped ``mid·lo``, ``lo·mid``, ``lo·lo`` are ~2^-24
  relative and of random sign.

This script evaluates each mode's kept products in float64 (so only the split and the
dropped terms contribute, not the accumulation inside the tensor cores, which a GPU run
measures: ``bench/gpu_diag.py --parts calibration``) and prints ``max|G - G64| /
max|G64|`` for ``G = AᵀA`` on a few sample distributions, next to a plain float32 matmul.

``--lossless`` asks what the cheapest mode, ``tf32``, does to pruning: the eigenvalues the
lossless rule reads (method.md §5), on a saturated layer (TSRA of width 4096 fed by 512
features: at most 513 directions per subspace carry energy) and, with ``--model``, on a
trained model's CoB activations over CIFAR-10 training images (the shipped archive).

Run: ``python bench/dot_split_error.py [--samples 20000] [--channels 128]``;
``python bench/dot_split_error.py --lossless [--model runs/quick/train/model.safetensors]``.
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


def truncate_tf32(a: torch.Tensor) -> torch.Tensor:
    """``a`` (float32) as a tensor core reads it for a TF32 product: the 13 low mantissa bits
    cleared (toward zero)."""
    return (a.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


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


def spectrum(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of ``aᵀa`` in float64."""
    ev, vec = torch.linalg.eigh(a.double().T @ a.double())
    return ev.flip(0), vec.flip(1)


def compare_tf32(a: torch.Tensor, lead: int = 8) -> dict[str, float | int]:
    """Exact float32 Gram of ``a`` (samples × channels) against the ``tf32`` one: directions
    kept by the lossless rule at 1e-7 and 1e-6 of the largest eigenvalue (each), the largest
    relative change of the ``lead`` leading eigenvalues, the smallest squared cosine between
    the two leading subspaces, and the largest eigenvalue each puts past the exact Gram's
    rank (``lift``: ``λ / λ_max`` just beyond the exact count at 1e-10, the null directions
    the rule must not keep)."""
    ee, ve = spectrum(a)
    et, vt = spectrum(truncate_tf32(a))
    k = min(lead, ee.numel())
    rank = int((ee > 1e-10 * ee[0]).sum())
    out: dict[str, float | int] = {"channels": a.shape[1], "rank": rank}
    for tol in (1e-7, 1e-6):
        out[f"kept_exact_{tol:.0e}"] = int((ee > tol * ee[0]).sum())
        out[f"kept_tf32_{tol:.0e}"] = int((et > tol * et[0]).sum())
    out["lead_rel_change"] = ((et[:k] - ee[:k]).abs() / ee[:k]).max().item()
    out["lead_cos2_min"] = torch.linalg.svdvals(ve[:, :k].T @ vt[:, :k]).min().item() ** 2
    out["lift"] = (et[rank] / et[0]).item() if rank < ee.numel() else 0.0
    return out


def saturated_activations(samples: int = 10_000, features: int = 512, width: int = 4096,
                          seed: int = 0) -> torch.Tensor:
    """TSRA(Linear(features → width)) of Gaussian inputs, ``(samples, width)`` float32:
    each subspace holds at most ``features + 1`` directions (method.md §5)."""
    from cobkern.ops import tsra

    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(features, width)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(width, features, generator=g) / features**0.5)
        lin.bias.copy_(torch.randn(width, generator=g) * 0.1)
        return tsra(lin(torch.randn(samples, features, generator=g)), width // 2)


def model_activations(path: str, images: int = 2000) -> dict[str, tuple[torch.Tensor, int]]:
    """Each CoB layer's post-TSRA activations of a saved model over the first ``images``
    un-augmented CIFAR-10 training images: ``{name: ((samples, C) float32, split)}``."""
    from cobkern.cob import find_cob_layers
    from cobkern.data.cifar import load_cifar10
    from cobkern.data.loader import DeviceLoader
    from cobkern.models import load_model

    model = load_model(path).eval()
    train, _ = load_cifar10()
    loader = DeviceLoader.from_imageset(train, 500, shuffle=False, augment=False,
                                        drop_last=False)
    layers = find_cob_layers(model)
    acts: dict[str, list[torch.Tensor]] = {lay.name: [] for lay in layers}
    hooks = [lay.activation.register_forward_hook(
        lambda _m, _i, o, n=lay.name: acts[n].append(o.detach().float())) for lay in layers]
    seen = 0
    with torch.no_grad():
        for x, _ in loader:
            if seen >= images:
                break
            model(x[: images - seen])
            seen += x[: images - seen].shape[0]
    for h in hooks:
        h.remove()
    return {lay.name: (torch.cat(acts[lay.name]).movedim(1, -1).reshape(-1, lay.num_channels),
                       lay.split) for lay in layers}


def lossless(model: str | None) -> None:
    cases = {"saturated 512 → 4096 (U)": saturated_activations()[:, :2048]}
    if model:
        for name, (a, split) in model_activations(model).items():
            cases[f"{name} U"] = a[:, :split]
            cases[f"{name} V"] = a[:, split:]
    print("tf32 products (operands truncated to TF32) against exact float32 Grams, float64 "
          "eigenvalues\n")
    print("| activations | channels | exact rank | kept at 1e-7 exact / tf32 | kept at 1e-6 "
          "exact / tf32 | lift past the rank (λ/λmax) | leading 8 λ: max rel. change | "
          "leading 8 subspace: min cos² |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, a in cases.items():
        r = compare_tf32(a)
        print(f"| {name} | {r['channels']} | {r['rank']} | {r['kept_exact_1e-07']} / "
              f"{r['kept_tf32_1e-07']} | {r['kept_exact_1e-06']} / {r['kept_tf32_1e-06']} | "
              f"{r['lift']:.1e} | {r['lead_rel_change']:.1e} | {r['lead_cos2_min']:.6f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--lossless", action="store_true",
                   help="the tf32 mode against exact Grams, as the lossless rule reads them")
    p.add_argument("--model", default=None,
                   help="with --lossless: a saved model file whose CoB activations to compare")
    args = p.parse_args(argv)
    if args.lossless:
        lossless(args.model)
        return 0
    g = torch.Generator().manual_seed(0)
    n, c = args.samples, args.channels
    cases = {
        "gaussian": torch.randn(n, c, generator=g),
        "positive mean (post-activation-like)": torch.randn(n, c, generator=g) * 0.3 + 1.0,
        "heavy-tailed (cubed gaussian)": torch.randn(n, c, generator=g) ** 3,
    }
    print(f"{n} samples × {c} channels; max|G − G64| / max|G64|, kept products in float64\n")
    print("| samples | bf16x6 | tf32x3 | bf16x3 | tf32 | float32 matmul |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, a in cases.items():
        a = a.float()
        exact = a.double().T @ a.double()
        scale = exact.abs().max()

        def err(gm: torch.Tensor, exact=exact, scale=scale) -> str:
            return f"{((gm - exact).abs().max() / scale).item():.1e}"

        b3 = split_bf16(a, 3)
        print(f"| {name} | {err(gram_kept(b3, 2))} | {err(gram_kept(split_tf32(a), 1))} | "
              f"{err(gram_kept(b3[:2], 1))} | {err(gram_kept([truncate_tf32(a).double()], 0))}"
              f" | {err((a.T @ a).double())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
