"""Unlearned RMSNorm over the channel axis (plain PyTorch; fused with TSRA in :mod:`.tsra`)."""

from __future__ import annotations

from torch import Tensor

from . import reference
from ._checks import FLOAT_DTYPES

__all__ = ["rmsnorm"]


def rmsnorm(x: Tensor, dim: int = 1, *, eps: float = 1e-6, norm_size: int | None = None) -> Tensor:
    """``x / sqrt(sum(x², dim) / norm_size + eps)`` with no learned scale.

    Args:
        x: ``(N, C, ...)`` floating tensor (accumulated in float32 for half types).
        dim: the channel axis.
        eps: added inside the square root.
        norm_size: normaliser, a positive int; ``None`` means ``x.shape[dim]``.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cobkern.rmsnorm: expected a floating-point tensor, got dtype {x.dtype}")
    if not (-x.dim() <= dim < x.dim()):
        raise IndexError(f"cobkern.rmsnorm: dim={dim} is out of range for a {x.dim()}-D tensor")
    if norm_size is not None and (isinstance(norm_size, bool) or not isinstance(norm_size, int)
                                  or norm_size < 1):
        raise ValueError(f"cobkern.rmsnorm: norm_size must be a positive int or None, got "
                         f"{norm_size!r}")
    n = x.shape[dim] if norm_size is None else norm_size
    return reference.rmsnorm(x, dim, n, eps)
