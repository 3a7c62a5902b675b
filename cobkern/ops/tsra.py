"""TSRA and fused RMSNorm→TSRA as ``torch.library`` custom ops with autograd.

Public functions: :func:`tsra`, :func:`rmsnorm_tsra` (differentiable) and their explicit
backward functions :func:`tsra_backward`, :func:`rmsnorm_tsra_backward`.

The ops ``cobkern::tsra`` / ``cobkern::tsra_backward`` carry an integer ``norm_size``:
``0`` is plain TSRA, ``n > 0`` prepends an unlearned RMSNorm with normaliser size ``n``.
They have fake (meta) implementations and an autograd formula, so they trace under
``torch.compile(fullgraph=True)`` as single opaque nodes and pass ``torch.library.opcheck``.
Only ``x`` is saved for backward; the per-position norms are recomputed there from ``x``,
which the backward must read anyway.

Eager fast path: outside ``torch.compile`` tracing, on plain tensors, the public functions
run the same launchers through a ``torch.autograd.Function`` instead of the dispatcher's
custom-op round trip. Both paths call :func:`_launch_or_reference`, so they compute the
same bits; the fast one costs a fraction of the host time per call, which is what limits
small layers (a 1024×512×2×2 activation takes microseconds on the GPU). Tensor subclasses
(fake tensors, functorch wrappers) and compiled code always take the registered ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._checks import (
    KERNEL_DTYPES,
    channel_geometry,
    check_activation_input,
    check_same_device,
    check_same_shape,
)
from .backend import use_triton
from .tuning import launch_tuning

__all__ = ["tsra", "rmsnorm_tsra", "tsra_backward", "rmsnorm_tsra_backward"]

DEFAULT_A_U = 5.0
DEFAULT_B_U = 0.5
DEFAULT_A_V = 5.0
DEFAULT_B_V = 0.7
DEFAULT_EPS = 1e-12
DEFAULT_RMS_EPS = 1e-6


def _kernel_supported(x: Tensor) -> bool:
    return x.dtype in KERNEL_DTYPES


def _launch_or_reference(fwd: bool, x: Tensor, grad: Tensor | None, args: tuple) -> Tensor:
    split, dim, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps = args
    op = "cobkern.tsra" if fwd else "cobkern.tsra_backward"
    if x.numel() == 0:
        return torch.empty_like(x)
    if not use_triton(x, op=op, supported=_kernel_supported(x)):
        if fwd:
            return reference.tsra_forward(x, *args)
        return reference.tsra_backward(grad, x, *args)

    from cobkern.kernels import tsra as kernels  # deferred: importing triton is slow

    out = torch.empty_like(x)
    geo = channel_geometry(x, dim)
    if grad is not None and geo is not None and channel_geometry(grad, dim) != geo:
        geo = None  # grad in another layout: fall back to one common contiguous layout
    if geo is None:
        xc = x.contiguous()
        gc = grad.contiguous() if grad is not None else None
        res = torch.empty_like(xc)
        geo = channel_geometry(xc, dim)
        _run(kernels, fwd, xc, gc, res, geo, split, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps)
        out.copy_(res)
        return out
    _run(kernels, fwd, x, grad, out, geo, split, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps)
    return out


def _run(kernels, fwd, x, grad, out, geo, split, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps):
    tuning = launch_tuning(x.device, "forward" if fwd else "backward", x.element_size(),
                           geo.channels_contig, geo.C, split, geo.P)
    if fwd:
        kernels.tsra_forward(x, out, geo, split, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps,
                             tuning)
    else:
        kernels.tsra_backward(grad, x, out, geo, split, a_u, b_u, a_v, b_v, eps, norm_size,
                              rms_eps, tuning)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("cobkern::tsra", mutates_args=())
def _tsra_op(
    x: Tensor,
    split: int,
    dim: int,
    a_u: float,
    b_u: float,
    a_v: float,
    b_v: float,
    eps: float,
    norm_size: int,
    rms_eps: float,
) -> Tensor:
    return _launch_or_reference(True, x, None, (split, dim, a_u, b_u, a_v, b_v, eps, norm_size,
                                                rms_eps))


@_tsra_op.register_fake
def _(x, split, dim, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps):
    return torch.empty_like(x)


@torch.library.custom_op("cobkern::tsra_backward", mutates_args=())
def _tsra_backward_op(
    grad: Tensor,
    x: Tensor,
    split: int,
    dim: int,
    a_u: float,
    b_u: float,
    a_v: float,
    b_v: float,
    eps: float,
    norm_size: int,
    rms_eps: float,
) -> Tensor:
    return _launch_or_reference(False, x, grad, (split, dim, a_u, b_u, a_v, b_v, eps, norm_size,
                                                 rms_eps))


@_tsra_backward_op.register_fake
def _(grad, x, split, dim, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, *params = inputs
    ctx.save_for_backward(x)
    ctx.params = params


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    dx = _tsra_backward_op(grad, x, *ctx.params)
    return (dx,) + (None,) * len(ctx.params)


torch.library.register_autograd("cobkern::tsra", _backward, setup_context=_setup_context)


class _TSRAFunction(torch.autograd.Function):
    """Eager fast path: the same launchers as the custom ops, without the dispatcher."""

    @staticmethod
    def forward(ctx, x: Tensor, *params) -> Tensor:
        ctx.save_for_backward(x)
        ctx.params = params
        return _launch_or_reference(True, x, None, params)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        dx = _launch_or_reference(False, x, grad, ctx.params)
        return (dx,) + (None,) * len(ctx.params)


def _apply(x: Tensor, *params) -> Tensor:
    """Run TSRA through the eager fast path when that is safe, else through the custom op."""
    if (type(x) is Tensor and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()):
        return _TSRAFunction.apply(x, *params)
    return _tsra_op(x, *params)


# ----------------------------------------------------------------------------- public API
def tsra(
    x: Tensor,
    split: int,
    dim: int = 1,
    *,
    a_u: float = DEFAULT_A_U,
    b_u: float = DEFAULT_B_U,
    a_v: float = DEFAULT_A_V,
    b_v: float = DEFAULT_B_V,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Two-subspace radial activation (``method.md`` §1), differentiable.

    Splits the channels of ``x`` along ``dim`` into ``U = [0, split)`` and ``V = [split, C)``
    and scales each subspace by a logistic function of ``r = ||x_U|| / (||x|| + eps)``.

    Args:
        x: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` (NCHW or channels_last) or
            ``(N, C, D, H, W)``; float16, bfloat16, float32 (accumulated in float32) or
            float64 (reference path only). Any ``C >= 2``.
        split: size of the first subspace, ``1 <= split < C``.
        dim: the channel axis (default 1).
        a_u, b_u, a_v, b_v: logistic gain constants; defaults 5, 0.5, 5, 0.7.
        eps: added to ``||x||`` in the ratio; default 1e-12.

    Returns:
        Tensor of ``x``'s shape, dtype and memory format.

    Example::

        >>> y = tsra(torch.randn(8, 64, 32, 32), split=32)
    """
    dim = check_activation_input("cobkern.tsra", x, split, dim)
    return _apply(x, split, dim, float(a_u), float(b_u), float(a_v), float(b_v), float(eps),
                    0, 0.0)


def _check_norm_size(name: str, norm_size: int | None, c: int) -> int:
    if norm_size is None:
        return c
    if isinstance(norm_size, bool) or not isinstance(norm_size, int) or norm_size < 1:
        raise ValueError(f"{name}: norm_size must be a positive int or None, got {norm_size!r}")
    return norm_size


def _check_rms_eps(name: str, rms_eps: float) -> float:
    if not rms_eps >= 0:
        raise ValueError(f"{name}: eps must be >= 0, got {rms_eps!r}")
    return float(rms_eps)


def rmsnorm_tsra(
    x: Tensor,
    split: int,
    dim: int = 1,
    *,
    eps: float = DEFAULT_RMS_EPS,
    norm_size: int | None = None,
    a_u: float = DEFAULT_A_U,
    b_u: float = DEFAULT_B_U,
    a_v: float = DEFAULT_A_V,
    b_v: float = DEFAULT_B_V,
    tsra_eps: float = DEFAULT_EPS,
) -> Tensor:
    """Fused unlearned RMSNorm followed by TSRA, differentiable.

    Computes ``tsra(x / sqrt(sum(x², dim) / norm_size + eps), split, dim)`` in one read and
    one write of ``x``: the RMS is a function of the same two subspace norms TSRA needs.

    Args:
        x: as in :func:`tsra`.
        split: size of the first subspace, ``1 <= split < C``.
        dim: the channel axis (default 1).
        eps: RMSNorm's epsilon inside the square root (default 1e-6).
        norm_size: the normaliser ``n`` in ``sum(x²)/n``; ``None`` means ``C``. A pruned
            model may keep its original width here so that the scale does not shift.
        a_u, b_u, a_v, b_v, tsra_eps: TSRA's constants, as in :func:`tsra`.

    Returns:
        Tensor of ``x``'s shape, dtype and memory format.
    """
    name = "cobkern.rmsnorm_tsra"
    dim = check_activation_input(name, x, split, dim)
    n = _check_norm_size(name, norm_size, x.shape[dim])
    return _apply(x, split, dim, float(a_u), float(b_u), float(a_v), float(b_v),
                  float(tsra_eps), n, _check_rms_eps(name, eps))


def _check_backward_inputs(name: str, grad: Tensor, x: Tensor, split: int, dim: int) -> int:
    dim = check_activation_input(name, x, split, dim)
    if not isinstance(grad, Tensor):
        raise TypeError(f"{name}: grad must be a torch.Tensor, got {type(grad).__name__}")
    check_same_device(name, grad=grad, x=x)
    check_same_shape(name, "grad", grad, "x", x)
    if grad.dtype != x.dtype:
        raise TypeError(f"{name}: grad has dtype {grad.dtype} but x has dtype {x.dtype}")
    return dim


def tsra_backward(
    grad: Tensor,
    x: Tensor,
    split: int,
    dim: int = 1,
    *,
    a_u: float = DEFAULT_A_U,
    b_u: float = DEFAULT_B_U,
    a_v: float = DEFAULT_A_V,
    b_v: float = DEFAULT_B_V,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Explicit vector-Jacobian product of :func:`tsra`: ``dL/dx`` given ``grad = dL/dy``.

    Reads ``x`` and ``grad`` once and writes ``dx`` once. Shapes and dtypes as ``x``.
    """
    dim = _check_backward_inputs("cobkern.tsra_backward", grad, x, split, dim)
    return _tsra_backward_op(grad, x, split, dim, float(a_u), float(b_u), float(a_v), float(b_v),
                             float(eps), 0, 0.0)


def rmsnorm_tsra_backward(
    grad: Tensor,
    x: Tensor,
    split: int,
    dim: int = 1,
    *,
    eps: float = DEFAULT_RMS_EPS,
    norm_size: int | None = None,
    a_u: float = DEFAULT_A_U,
    b_u: float = DEFAULT_B_U,
    a_v: float = DEFAULT_A_V,
    b_v: float = DEFAULT_B_V,
    tsra_eps: float = DEFAULT_EPS,
) -> Tensor:
    """Explicit vector-Jacobian product of :func:`rmsnorm_tsra`."""
    name = "cobkern.rmsnorm_tsra_backward"
    dim = _check_backward_inputs(name, grad, x, split, dim)
    n = _check_norm_size(name, norm_size, x.shape[dim])
    return _tsra_backward_op(grad, x, split, dim, float(a_u), float(b_u), float(a_v), float(b_v),
                             float(tsra_eps), n, _check_rms_eps(name, eps))
