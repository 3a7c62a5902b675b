"""Unlearned RMSNorm module."""

from __future__ import annotations

from torch import Tensor, nn

from cobkern.ops import rmsnorm
from cobkern.ops._checks import as_int, check_norm_size, check_rms_eps
from cobkern.ops.tsra import DEFAULT_RMS_EPS

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    r"""RMSNorm over the channel axis with no learned scale or shift.

    .. math:: y = x / \sqrt{\textstyle\sum_c x_c^2 / n + \epsilon}

    It commutes with any rotation of the channels, which is why CoB networks use it in
    place of BatchNorm.

    Args:
        num_channels: ``C``, the size of the channel axis.
        dim: the channel axis (default 1: ``(N, C)`` or ``(N, C, H, W)``).
        eps: added inside the square root. Default: 1e-6.
        norm_size: the normaliser ``n``; ``None`` (default) means ``num_channels``. After
            pruning, keeping the original width here keeps the activations' scale.

    Shape:
        - Input: ``(N, C, *)``
        - Output: same shape and dtype as the input.
    """

    def __init__(
        self, num_channels: int, dim: int = 1, eps: float = DEFAULT_RMS_EPS,
        norm_size: int | None = None,
    ) -> None:
        super().__init__()
        # numpy integers are stored as ints (as norm_size); a float or str is a TypeError
        num_channels = as_int("RMSNorm", "num_channels", num_channels)
        if num_channels < 1:
            raise ValueError(f"RMSNorm: num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        self.dim = as_int("RMSNorm", "dim", dim)  # a float or str failed only at forward
        self.eps = check_rms_eps("RMSNorm", eps)
        self.norm_size = (None if norm_size is None
                          else check_norm_size("RMSNorm", norm_size, num_channels))

    def forward(self, x: Tensor) -> Tensor:
        # a non-tensor or an out-of-range dim is left to rmsnorm, whose error names it
        if isinstance(x, Tensor) and -x.dim() <= self.dim < x.dim() and \
                x.shape[self.dim] != self.num_channels:
            raise ValueError(f"RMSNorm: expected {self.num_channels} channels on dim {self.dim}, "
                             f"got input of shape {tuple(x.shape)}")
        return rmsnorm(x, self.dim, eps=self.eps, norm_size=self.norm_size)

    def extra_repr(self) -> str:
        s = f"{self.num_channels}, dim={self.dim}, eps={self.eps}"
        if self.norm_size is not None:
            s += f", norm_size={self.norm_size}"
        return s
