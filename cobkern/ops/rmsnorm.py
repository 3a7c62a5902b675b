"""Unlearned RMSNorm over the channel axis (plain PyTorch; fused with TSRA in :mod:`.tsra`)."""

from __future__ import annotations

from torch import Tensor

from . import reference
from ._checks import FLOAT_DTYPES, check_norm_size, check_rms_eps, int_arg

__all__ = ["rmsnorm"]


def rmsnorm(x: Tensor, dim: int = 1, *, eps: float = 1e-6, norm_size: int | None = None) -> Tensor:
    """``x / sqrt(sum(x², dim) / norm_size + eps)`` with no learned scale.

    Args:
        x: ``(N, C, ...)`` floating tensor (accumulated in float32 for half types).
        dim: the channel axis.
        eps: added inside the square root, ``>= 0`` (``0``: NaN at ``x = 0``).
        norm_size: normaliser, a positive int; ``None`` means ``x.shape[dim]``.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"cobkern.rmsnorm: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cobkern.rmsnorm: expected a floating-point tensor, got dtype {x.dtype}")
    dim = int_arg("cobkern.rmsnorm", "dim", dim)
    if not (-x.dim() <= dim < x.dim()):
        raise IndexError(f"cobkern.rmsnorm: dim={dim} is out of range for a {x.dim()}-D tensor")
    n = check_norm_size("cobkern.rmsnorm", norm_size, x.shape[dim])
    return reference.rmsnorm(x, dim, n, check_rms_eps("cobkern.rmsnorm", eps))
