"""Per-subspace second moments of post-TSRA activations (``method.md`` §4.1–4.2).

For a batch of activations with channels along ``dim`` and the layer's split
``U = [0, split)``, ``V = [split, C)``, every position (every ``(n, h, w)``) is one sample
``a ∈ R^C``. The op returns, summed over all samples of the batch:

* ``gram_u = Σ a_U a_Uᵀ``  — ``(split, split)``, the uncentered second moment of U;
* ``gram_v = Σ a_V a_Vᵀ``  — ``(C - split, C - split)``;
* ``sum_abs = Σ |a|``      — ``(C,)``;
* ``sum_sq  = Σ a²``       — ``(C,)`` (the diagonals of the two Gram matrices).

All four are float32 (float64 for float64 inputs). The number of samples is
``x.numel() // C`` (see :func:`num_samples`).

On CUDA (and on CPU under ``TRITON_INTERPRET=1``) the Triton kernel in
:mod:`cobkern.kernels.covariance` reads the batch once in its own layout (NCHW,
channels_last or ``(N, C)``; float32/bfloat16/float16) and never builds the flattened
``(N·H·W, C)`` matrix; elsewhere a plain-PyTorch reference runs.

:class:`CovarianceAccumulator` adds successive batches into float64 running sums (the
kernel's float32 per-batch sums — Kahan-compensated inside each tile — are promoted before
they are added, so the error does not grow with the number of batches; on the reference
path the products themselves are summed in float64) and can all-reduce them across
``torch.distributed`` ranks.

Public API::

    subspace_moments(x, split, dim=1) -> Moments
    subspace_moments_reference(x, split, dim=1, accum_dtype=None) -> Moments
    CovarianceAccumulator(num_channels, split, device=None, dtype=torch.float64)
        .update(x, dim=1); .all_reduce(group=None); .count; .gram_u; ...
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import KERNEL_DTYPES, channel_geometry, check_activation_input
from .backend import use_triton
from .reference import compute_dtype

__all__ = [
    "Moments",
    "subspace_moments",
    "subspace_moments_reference",
    "num_samples",
    "CovarianceAccumulator",
]


class Moments(NamedTuple):
    """The sums one batch contributes (see the module docstring for shapes)."""

    gram_u: Tensor
    gram_v: Tensor
    sum_abs: Tensor
    sum_sq: Tensor


def num_samples(x: Tensor, dim: int = 1) -> int:
    """Samples in ``x``: every index except the channel axis (``N·H·W`` for NCHW)."""
    c = x.shape[dim]
    return x.numel() // c if c else 0


def subspace_moments_reference(
    x: Tensor, split: int, dim: int = 1, accum_dtype: torch.dtype | None = None
) -> Moments:
    """Plain-PyTorch reference of :func:`subspace_moments` (any device, any float dtype).

    It forms the ``(samples, C)`` matrix of this batch (one copy of the batch, in
    ``accum_dtype``; default float32, float64 for float64 inputs) and multiplies.
    """
    dim = check_activation_input("cobkern.subspace_moments", x, split, dim)
    cd = accum_dtype or compute_dtype(x.dtype)
    c = x.shape[dim]
    h = x.movedim(dim, -1).reshape(-1, c).to(cd)
    hu, hv = h[:, :split], h[:, split:]
    return Moments(hu.T @ hu, hv.T @ hv, h.abs().sum(0), h.square().sum(0))


@torch.library.custom_op("cobkern::subspace_moments", mutates_args=())
def _moments_op(x: Tensor, split: int, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = x.shape[dim]
    supported = x.dtype in KERNEL_DTYPES
    if x.numel() == 0 or not use_triton(x, op="cobkern.subspace_moments", supported=supported):
        return tuple(t.contiguous() for t in subspace_moments_reference(x, split, dim))
    from cobkern.kernels import covariance as kernels  # deferred: importing triton is slow

    geo = channel_geometry(x, dim)
    if geo is None:  # an odd layout (e.g. a permuted view): one contiguous copy
        x = x.contiguous()
        geo = channel_geometry(x, dim)
    su, sv = split, c - split
    packed = torch.zeros(su * su + sv * sv, device=x.device, dtype=torch.float32)
    sum_abs = torch.zeros(c, device=x.device, dtype=torch.float32)
    sum_sq = torch.zeros(c, device=x.device, dtype=torch.float32)
    kernels.subspace_moments(x, geo, split, packed, sum_abs, sum_sq)
    return (packed[: su * su].view(su, su).clone(), packed[su * su:].view(sv, sv).clone(),
            sum_abs, sum_sq)


@_moments_op.register_fake
def _(x, split, dim):
    c = x.shape[dim]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sv = c - split
    return (x.new_empty((split, split), dtype=dt), x.new_empty((sv, sv), dtype=dt),
            x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt))


def subspace_moments(x: Tensor, split: int, dim: int = 1) -> Moments:
    """Per-subspace uncentered second moments of one batch, in one read of ``x``.

    Args:
        x: activations, ``(N, C)``, ``(N, C, H, W)`` (NCHW or channels_last) or any
            ``(N, C, *)``; float16, bfloat16, float32 (kernel, float32 accumulation) or
            float64 (reference, float64 accumulation).
        split: size of ``U``, ``1 <= split < C``.
        dim: the channel axis (default 1).

    Returns:
        :class:`Moments` ``(gram_u (split, split), gram_v (C-split, C-split),
        sum_abs (C,), sum_sq (C,))``, float32 (float64 for float64 input). Not
        differentiable.

    Example::

        >>> m = subspace_moments(torch.randn(8, 64, 16, 16), split=32)
        >>> m.gram_u.shape
        torch.Size([32, 32])
    """
    dim = check_activation_input("cobkern.subspace_moments", x, split, dim)
    with torch.no_grad():
        return Moments(*_moments_op(x.detach(), split, dim))


class CovarianceAccumulator:
    """Running per-subspace sums over many batches, for one layer.

    Attributes (all on ``device``, in ``dtype``, default float64):
        gram_u: ``(split, split)``; gram_v: ``(C-split, C-split)``;
        sum_abs, sum_sq: ``(C,)``; count: samples seen (Python int; a float64 tensor
        internally so it can be all-reduced with the rest).

    Memory: ``O(C²)``, independent of the number of samples.
    """

    def __init__(self, num_channels: int, split: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        if not (1 <= split < num_channels):
            raise ValueError(f"split={split} is out of range for {num_channels} channels")
        self.num_channels = num_channels
        self.split = split
        kw = {"device": device, "dtype": dtype}
        sv = num_channels - split
        self.gram_u = torch.zeros(split, split, **kw)
        self.gram_v = torch.zeros(sv, sv, **kw)
        self.sum_abs = torch.zeros(num_channels, **kw)
        self.sum_sq = torch.zeros(num_channels, **kw)
        self._count = torch.zeros((), **kw)
        #: ``"float32"`` once any batch went through the float32 kernel, else the
        #: accumulator's own dtype: how precise the sums are (sets the lossless tolerance).
        self.accumulation = "float64" if dtype == torch.float64 else "float32"

    @property
    def count(self) -> int:
        """Samples accumulated so far."""
        return int(round(self._count.item()))

    def update(self, x: Tensor, dim: int = 1) -> None:
        """Add one batch (shape ``(N, C, *)``, channels on ``dim``)."""
        if x.shape[dim] != self.num_channels:
            raise ValueError(f"CovarianceAccumulator: expected {self.num_channels} channels on "
                             f"dim {dim}, got shape {tuple(x.shape)}")
        if x.dtype in KERNEL_DTYPES and use_triton(x, op="cobkern.subspace_moments"):
            m = subspace_moments(x, self.split, dim)
            self.accumulation = "float32"
        else:  # the reference path accumulates directly in the accumulator's dtype
            m = subspace_moments_reference(x, self.split, dim, accum_dtype=self.gram_u.dtype)
        dev = self.gram_u.device
        self.gram_u += m.gram_u.to(dev, self.gram_u.dtype)
        self.gram_v += m.gram_v.to(dev, self.gram_v.dtype)
        self.sum_abs += m.sum_abs.to(dev, self.sum_abs.dtype)
        self.sum_sq += m.sum_sq.to(dev, self.sum_sq.dtype)
        self._count += num_samples(x, dim)

    def tensors(self) -> list[Tensor]:
        """The running sums, in a fixed order (for all-reduce / serialisation)."""
        return [self.gram_u, self.gram_v, self.sum_abs, self.sum_sq, self._count]

    def all_reduce(self, group=None) -> None:
        """Sum the accumulators of all ranks in ``group`` (in place, every rank gets the sum).

        A no-op unless ``torch.distributed`` is initialised. The sums travel as one flat
        buffer (one collective per layer).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        ts = self.tensors()
        flat = torch.cat([t.reshape(-1) for t in ts])
        if dist.get_backend(group) == "nccl" and flat.device.type != "cuda":
            flat = flat.cuda()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.to(ts[0].device)
        off = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n
