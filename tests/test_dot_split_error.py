"""``bench/dot_split_error.py``'s emulation of the ``tf32`` covariance products.

The accuracy notes of ``f32_dot="tf32"`` (``cobkern/kernels/covariance.py``) rest on this
emulation: a tensor core reading a float32 operand for a TF32 product ignores its 13 low
mantissa bits. These tests pin the emulation itself (bit-exact truncation toward zero,
within 2^-10 relative) and the lossless comparison on a small saturated layer, where the
exact Gram's rank is known (``features + 1`` per subspace, method.md §5).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import dot_split_error as dse  # noqa: E402


def test_truncate_tf32_clears_the_low_bits_toward_zero():
    a = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    t = dse.truncate_tf32(a)
    assert (t.view(torch.int32) & 0x1FFF).eq(0).all(), "low 13 mantissa bits not cleared"
    assert (t.abs() <= a.abs()).all() and (torch.sign(t) == torch.sign(a)).all()
    rel = ((a - t).abs() / a.abs()).max().item()
    assert 0 < rel < 2**-10, rel
    exact = torch.tensor([1.0, -0.5, 3.0 * 2**-12])  # 11 significant bits or fewer: unchanged
    assert torch.equal(dse.truncate_tf32(exact), exact)


def test_compare_tf32_on_a_saturated_layer_keeps_the_rank():
    """TSRA(Linear(16 → 128)): each 64-wide subspace holds at most 17 directions. The exact
    Gram's rank is 17; the truncated one keeps 17 at the lossless rule's float32 tolerance
    (its null directions are lifted far less than 1e-7 of the largest eigenvalue), and its
    leading eigenvalues move by about the truncation's bias (under 2e-3)."""
    a = dse.saturated_activations(samples=4000, features=16, width=128)[:, :64]
    r = dse.compare_tf32(a)
    assert r["rank"] == 17
    assert r["kept_exact_1e-07"] == r["kept_tf32_1e-07"] == 17
    assert 0 < r["lift"] < 1e-7
    assert 0 < r["lead_rel_change"] < 2e-3
    assert r["lead_cos2_min"] > 0.9999
