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

:class:`CovarianceAccumulator` adds successive batches into float64 running sums and can
all-reduce them across ``torch.distributed`` ranks. On the kernel path one launch per batch
adds straight into those float64 sums: each program's float32 partial sums (Kahan-
compensated inside its tile) are added with float64 atomics, so the error does not grow
with the number of batches or sample chunks, and the Gram matrices are mirrored from their
upper triangles once, when read. On the reference path the products themselves are summed
in float64.

Public API::

    subspace_moments(x, split, dim=1) -> Moments
    subspace_moments_reference(x, split, dim=1, accum_dtype=None) -> Moments
    CovarianceAccumulator(num_channels, split, device=None, dtype=torch.float64,
                          f32_dot=None)
        .update(x, dim=1); .all_reduce(group=None); .count; .gram_u; ...
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import (
    KERNEL_DTYPES,
    as_int,
    channel_geometry,
    check_activation_input,
    int_arg,
)
from .backend import use_triton
from .reference import compute_dtype

__all__ = [
    "Moments",
    "subspace_moments",
    "subspace_moments_reference",
    "num_samples",
    "CovarianceAccumulator",
    "F32_DOTS",
]

#: Products the kernel can use for float32 batches (``f32_dot``; the same names as
#: ``cobkern.kernels.covariance.F32_DOTS``, kept here so that checking an argument does not
#: import Triton): ``"ieee"`` — exact float32 products on the CUDA cores (the default);
#: ``"tf32"`` — one TF32 tensor-core product (operands truncated by up to 2^-10 relative:
#: the cheapest mode, emulated accuracy and offline cost in
#: ``cobkern.kernels.covariance.F32_DOT_DEFAULT``'s notes; not yet timed on a GPU);
#: ``"tf32x3"`` / ``"bf16x6"`` — float32 emulated on the tensor cores, faster on the
#: convolutions, with Gram errors of 1.7e-7 / 5.7e-8 relative against 1.5e-9 (H200,
#: 2026-11-27, ``BENCHMARKS.md``); ``"fp64"`` — the slabs widened to float64 and multiplied
#: on the float64 tensor cores of data-centre GPUs (exact products, float64 sums: more
#: accurate than ``"ieee"``; on an H200 1.1–2.7× faster than ``"ieee"`` per conv layer on
#: NCHW maps, slower on channels-last maps and on the linear layers — the second lease of
#: 2026-11-27 in ``BENCHMARKS.md``). Under the interpreter ``bf16x6`` runs as ``"ieee"``.
F32_DOTS = ("ieee", "tf32", "tf32x3", "bf16x6", "fp64")


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
    ``accum_dtype``; default float32, float64 for float64 inputs) and multiplies — with
    autocast off: under ``torch.autocast`` the products ran in bfloat16/float16 (Grams
    2.7e-3 off, returned in that dtype, where the compiled op's float32 was promised).
    """
    split, dim = check_activation_input("cobkern.subspace_moments", x, split, dim)
    cd = accum_dtype or compute_dtype(x.dtype)
    c = x.shape[dim]
    with _no_autocast(x.device.type):
        h = x.movedim(dim, -1).reshape(-1, c).to(cd)
        hu, hv = h[:, :split], h[:, split:]
        return Moments(hu.T @ hu, hv.T @ hv, h.abs().sum(0), h.square().sum(0))


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device_type`` (nothing to switch where it has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("cobkern::subspace_moments", mutates_args=())
def _moments_op(x: Tensor, split: int, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # the op is public as torch.ops.cobkern.subspace_moments and the kernel trusts split and
    # dim: validate (and normalise a negative dim) here, not only in the Python wrapper
    split, dim = check_activation_input("cobkern.subspace_moments", x, split, dim)
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
    split, dim = check_activation_input("cobkern.subspace_moments", x, split, dim)
    c = x.shape[dim]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sv = c - split
    return (x.new_empty((split, split), dtype=dt), x.new_empty((sv, sv), dtype=dt),
            x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt))


def subspace_moments(x: Tensor, split: int, dim: int = 1) -> Moments:
    """Per-subspace uncentered second moments of one batch, in one read of ``x``.

    Args:
        x: activations, 2-D to 5-D: ``(N, C)``, ``(N, C, H, W)`` (NCHW or channels_last),
            ``(N, C, L)`` or ``(N, C, D, H, W)``; float16, bfloat16, float32 (kernel,
            float32 accumulation) or float64 (reference, float64 accumulation).
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
    split, dim = check_activation_input("cobkern.subspace_moments", x, split, dim)
    with torch.no_grad():
        return Moments(*_moments_op(x.detach(), split, dim))


class CovarianceAccumulator:
    """Running per-subspace sums over many batches, for one layer.

    ``f32_dot``: the kernel's products for float32 batches
    (:data:`~cobkern.ops.covariance.F32_DOTS`; ``None``: the kernel module's default,
    ``"ieee"``). Other dtypes and the reference path ignore it.

    Attributes (all on ``device``, in ``dtype``, default float64):
        gram_u: ``(split, split)``; gram_v: ``(C-split, C-split)`` (symmetric views of one
        packed buffer); sum_abs, sum_sq: ``(C,)``; count: samples seen (Python int).

    Memory: ``O(C²)``, independent of the number of samples. On the kernel path an update is
    one kernel launch (no per-batch temporaries), which keeps calibration close to the cost
    of the forward pass it rides on.
    """

    def __init__(self, num_channels: int, split: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64, f32_dot: str | None = None) -> None:
        if f32_dot is not None and f32_dot not in F32_DOTS:
            raise ValueError(f"CovarianceAccumulator: f32_dot must be one of {F32_DOTS} or "
                             f"None, got {f32_dot!r}")
        num_channels = as_int("CovarianceAccumulator", "num_channels", num_channels)
        split = as_int("CovarianceAccumulator", "split", split)  # 2.0 failed in zeros()
        if not (1 <= split < num_channels):
            raise ValueError(f"split={split} is out of range for {num_channels} channels")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"CovarianceAccumulator: dtype must be float32 or float64, "
                            f"got {dtype}")
        self.num_channels = num_channels
        self.split = split
        kw = {"device": device, "dtype": dtype}
        sv = num_channels - split
        self._packed = torch.zeros(split * split + sv * sv, **kw)  # G_U then G_V, row-major
        self.sum_abs = torch.zeros(num_channels, **kw)
        self.sum_sq = torch.zeros(num_channels, **kw)
        self._count = 0
        self._symmetric = True  # False after kernel updates: only the upper triangles count
        #: ``"float32"`` once any batch went through the kernel's float32 sums, else the
        #: accumulator's own dtype (float32 batches with ``f32_dot="fp64"`` keep float64):
        #: how precise the sums are (sets the lossless tolerance).
        self.accumulation = "float64" if dtype == torch.float64 else "float32"
        #: ``tl.dot`` products of float32 batches on the kernel path (``None``: the kernel
        #: module's default, IEEE); see :data:`~cobkern.ops.covariance.F32_DOTS`.
        self.f32_dot = f32_dot
        #: whether a float32 batch went through the kernel, i.e. ``f32_dot`` took effect
        #: (the reference path, e.g. on a CPU, and 16-bit batches ignore it)
        self.f32_dot_applied = False

    def _views(self) -> tuple[Tensor, Tensor]:
        su, sv = self.split, self.num_channels - self.split
        return (self._packed[: su * su].view(su, su), self._packed[su * su:].view(sv, sv))

    def _symmetrize(self) -> None:
        if not self._symmetric:
            from cobkern.kernels.covariance import mirror_upper

            for g in self._views():
                mirror_upper(g)
            self._symmetric = True

    @property
    def gram_u(self) -> Tensor:
        """``(split, split)`` running ``Σ a_U a_Uᵀ``."""
        self._symmetrize()
        return self._views()[0]

    @property
    def gram_v(self) -> Tensor:
        """``(C-split, C-split)`` running ``Σ a_V a_Vᵀ``."""
        self._symmetrize()
        return self._views()[1]

    @property
    def count(self) -> int:
        """Samples accumulated so far."""
        return self._count

    def sums(self) -> list[Tensor]:
        """The running-sum buffers themselves (not copies; the Gram buffer packed, its lower
        triangles possibly stale): what a kernel adds into. For code that must check or
        restore them around a CUDA-graph capture (:mod:`cobkern.cob.graphs`)."""
        return [self._packed, self.sum_abs, self.sum_sq]

    def count_samples(self, n: int) -> None:
        """Add ``n`` to :attr:`count` without adding any sums.

        For CUDA-graph replays of :meth:`update` (:mod:`cobkern.cob.graphs`): a replay runs
        the recorded kernel, which adds the batch's sums, but not this method's Python,
        which counts its samples. A negative ``n`` takes back the count of a capture that
        recorded an update but never ran it.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: the count would drop below zero.
        """
        n = int_arg("CovarianceAccumulator.count_samples", "n", n)
        if self._count + n < 0:
            raise ValueError(f"CovarianceAccumulator.count_samples: the count {self._count} "
                             f"cannot drop by {-n}")
        self._count += int(n)

    def update(self, x: Tensor, dim: int = 1) -> None:
        """Add one batch (shape ``(N, C, *)``, channels on ``dim``).

        Raises:
            TypeError: ``x`` is not a floating-point tensor or ``dim`` not an int.
            IndexError: ``dim`` is out of range for ``x``.
            ValueError: ``x`` does not have ``num_channels`` channels on ``dim``, or is not
                2-D to 5-D.
        """
        name = "cobkern.CovarianceAccumulator.update"
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        dim = int_arg(name, "dim", dim)
        if not -x.dim() <= dim < x.dim():
            raise IndexError(f"{name}: dim={dim} is out of range for a {x.dim()}-D input of "
                             f"shape {tuple(x.shape)} (expected -{x.dim()} <= dim < {x.dim()})")
        dim %= x.dim()
        if x.shape[dim] != self.num_channels:
            raise ValueError(f"CovarianceAccumulator: expected {self.num_channels} channels on "
                             f"dim {dim}, got shape {tuple(x.shape)}")
        dim = check_activation_input(name, x, self.split, dim)[1]
        x = x.detach()
        if x.numel() == 0:  # no samples: nothing to add, and no precision to lose
            return
        if x.dtype in KERNEL_DTYPES and use_triton(x, op="cobkern.subspace_moments"):
            if x.device == self._packed.device:
                self._kernel_update(x, dim)
            else:  # sums computed elsewhere (another device, float32), then added
                self.accumulation = "float32"
                self._add(subspace_moments(x, self.split, dim))
        else:  # the reference path accumulates directly in the accumulator's dtype
            self._add(subspace_moments_reference(x, self.split, dim,
                                                 accum_dtype=self._packed.dtype))
        self._count += num_samples(x, dim)

    def _add(self, m: Moments) -> None:
        dev, dt = self._packed.device, self._packed.dtype
        gu, gv = self.gram_u, self.gram_v  # symmetric before full matrices are added
        gu += m.gram_u.to(dev, dt)
        gv += m.gram_v.to(dev, dt)
        self.sum_abs += m.sum_abs.to(dev, dt)
        self.sum_sq += m.sum_sq.to(dev, dt)

    def _kernel_update(self, x: Tensor, dim: int) -> None:
        from cobkern.kernels import covariance as kernels  # deferred: importing triton is slow

        geo = channel_geometry(x, dim)  # dim validated and normalised by update()
        if geo is None:  # an odd layout (e.g. a permuted view): one contiguous copy
            x = x.contiguous()
            geo = channel_geometry(x, dim)
        kernels.subspace_moments(x, geo, self.split, self._packed, self.sum_abs, self.sum_sq,
                                 mirror=False, f32_dot=self.f32_dot)
        self._symmetric = False
        self.f32_dot_applied |= x.dtype == torch.float32
        # float32 batches with float64 products (exact) and float64 sums are as precise as
        # the reference path; everything else on the kernel path sums in float32
        exact = (x.dtype == torch.float32 and self._packed.dtype == torch.float64
                 and (self.f32_dot or kernels.F32_DOT_DEFAULT) == "fp64")
        if not exact:
            self.accumulation = "float32"

    def tensors(self) -> list[Tensor]:
        """The running sums, in a fixed order: ``[gram_u, gram_v, sum_abs, sum_sq]``."""
        return [self.gram_u, self.gram_v, self.sum_abs, self.sum_sq]

    def all_reduce(self, group=None) -> None:
        """Sum the accumulators of all ranks in ``group`` (in place, every rank gets the sum).

        A no-op unless ``torch.distributed`` is initialised. The sums travel as one flat
        buffer in the accumulator's dtype and the sample count as a separate int64 tensor
        (two collectives per layer): a float32 buffer holds integers exactly only up to
        ``2**24`` (16.8 M samples, e.g. 20,000 images × 32×32 positions exceed it).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        self._symmetrize()
        flat = torch.cat([self._packed, self.sum_abs, self.sum_sq])
        if dist.get_backend(group) == "nccl" and flat.device.type != "cuda":
            flat = flat.cuda()
        count = torch.tensor([self._count], dtype=torch.int64, device=flat.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
        flat = flat.to(self._packed.device)
        n, c = self._packed.numel(), self.num_channels
        self._packed.copy_(flat[:n])
        self.sum_abs.copy_(flat[n:n + c])
        self.sum_sq.copy_(flat[n + c:n + 2 * c])
        self._count = int(count.item())
