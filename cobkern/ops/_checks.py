"""Argument validation and channel-axis geometry shared by every cobkern op.

All ops reduce over one *channel* axis of a tensor at every other index ("position").
A tensor is viewed, without copying, as ``(B, C, P)`` with three strides:

* channel-major  (NCHW, or any contiguous tensor): ``stride_c = P``, ``stride_p = 1``;
* channels-last (NHWC, or (N, C) with dim=1): ``stride_c = 1``, ``stride_p = C``
  and all positions collapse into one axis (``B = 1``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: The smallest normal and the largest finite float32: the range an ``eps`` must lie in to
#: stay itself in the float32 arithmetic of the kernels (and not round to 0 or ``inf``).
F32_TINY = float(torch.finfo(torch.float32).tiny)
F32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class ChannelGeometry:
    """How a tensor maps onto the kernels' ``(B, C, P)`` view.

    Attributes:
        B: number of outer blocks (batch for NCHW, 1 for channels-last).
        C: channels, the reduction axis.
        P: positions per block.
        stride_b, stride_c, stride_p: element strides of the three axes.
        channels_contig: ``True`` when ``stride_c == 1`` (NHWC / row-major 2-D).
    """

    B: int
    C: int
    P: int
    stride_b: int
    stride_c: int
    stride_p: int
    channels_contig: bool


def is_int(v: object) -> bool:
    """``True`` for a Python ``int`` (or a ``torch.SymInt`` while tracing), never a ``bool``."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def int_arg(name: str, arg: str, v: object) -> int:
    """An integer argument as a Python ``int`` (a ``torch.SymInt`` while tracing is kept):
    ``int``, numpy integers and one-element integer tensors — as :func:`as_int`, which
    names ``arg`` in the ``TypeError`` for anything else (floats and bools included)."""
    if isinstance(v, torch.SymInt):
        return v  # type: ignore[return-value]
    return as_int(name, arg, v)


def check_activation_input(
    name: str, x: torch.Tensor, split: int, dim: int, *, min_rank: int = 2, max_rank: int = 5
) -> tuple[int, int]:
    """Validate the common arguments of the TSRA-family ops; return ``(split, dim)`` as
    Python ints (numpy integers accepted), ``dim`` normalised to ``[0, x.dim())``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if not (min_rank <= x.dim() <= max_rank):
        raise ValueError(
            f"{name}: expected a {min_rank}-D to {max_rank}-D tensor such as (N, C) or "
            f"(N, C, H, W), got shape {tuple(x.shape)} ({x.dim()}-D)"
        )
    dim = int_arg(name, "dim", dim)
    if not (-x.dim() <= dim < x.dim()):
        raise IndexError(
            f"{name}: dim={dim} is out of range for a {x.dim()}-D tensor "
            f"(expected -{x.dim()} <= dim < {x.dim()})"
        )
    dim = dim % x.dim()
    c = x.shape[dim]
    if c < 2:
        raise ValueError(
            f"{name}: the channel axis (dim={dim}) has size {c}; TSRA needs at least 2 channels "
            "(one in each subspace)"
        )
    split = int_arg(name, "split", split)
    if not (1 <= split < c):
        raise ValueError(
            f"{name}: split={split} is out of range for {c} channels (need 1 <= split < {c}, "
            "so that both subspaces are non-empty)"
        )
    return split, dim


def _as_float(name: str, arg: str, v: object) -> float:
    """``float(v)`` for a number (numpy and 0-d tensor scalars included); a ``TypeError``
    naming ``arg`` for anything else — strings and bools too, which ``float`` would take."""
    if isinstance(v, (str, bytes, bool)):
        raise TypeError(f"{name}: {arg} must be a float, got {type(v).__name__}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: {arg} must be a float, got {type(v).__name__}") from None


def check_tsra_eps(name: str, eps: float, arg: str = "eps") -> float:
    """Validate TSRA's ``eps`` (added to ``||x||`` in ``r``): a normal float32 number ``> 0``
    (from :data:`F32_TINY` to :data:`F32_MAX`), the precision every path computes ``r`` in.

    ``eps = 0`` would turn ``x = 0`` into ``0 / 0 = NaN`` (``method.md`` §1 requires output 0
    there), and so does an ``eps`` that rounds to 0 in float32 (``1e-50``; a subnormal one is
    flushed to 0 on GPUs); a negative ``eps`` can make ``||x|| + eps`` vanish, one beyond
    float32's range is ``inf``. Returns ``float(eps)``.
    """
    value = _as_float(name, arg, eps)
    if not (F32_TINY <= value <= F32_MAX):  # also rejects NaN; comparisons trace under dynamo
        raise ValueError(f"{name}: {arg} (TSRA's epsilon in r = ||x_U|| / (||x|| + {arg})) "
                         f"must be a number from {F32_TINY:.6g} (the smallest normal float32, "
                         f"which the kernels compute in) to {F32_MAX:.6g}, got {eps!r}")
    return value


def as_int(name: str, arg: str, v: object, expected: str = "an int") -> int:
    """``v`` as a Python ``int``: an ``int`` or anything with ``__index__`` (numpy integers,
    one-element integer tensors), never a bool. Anything else, floats such as ``1e4``
    included, is a ``TypeError``: ``"{name}: {arg} must be {expected}, got ..."``."""
    try:
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: {arg} must be {expected}, got {type(v).__name__} "
                        f"{v!r}") from None


def check_norm_size(name: str, norm_size: int | None, c: int) -> int:
    """RMSNorm's normaliser ``n`` in ``sum(x²) / n``: an int ``>= 1`` (numpy integers too),
    or ``None`` for ``c`` (the channel count). Returns ``n`` as an ``int``.

    Raises:
        TypeError: anything but ``None`` or an integer (a bool, a float such as 2.5).
        ValueError: an integer below 1, or above the int64 range the ops take (an
            ``OverflowError`` naming no argument before).
    """
    if norm_size is None:
        return c
    if isinstance(norm_size, torch.SymInt):  # traced: its range was checked eagerly
        return norm_size
    n = as_int(name, "norm_size", norm_size, "a positive int or None")
    if not 1 <= n <= _INT64_MAX:
        raise ValueError(f"{name}: norm_size must be a positive int or None (an int at most "
                         f"2**63 - 1), got {norm_size!r}")
    return n


_INT64_MAX = 2**63 - 1


def check_gain(name: str, a_u: float, b_u: float, a_v: float, b_v: float
               ) -> tuple[float, float, float, float]:
    """TSRA's logistic gain constants ``g_U = σ(a_U (r - b_U))``, ``g_V = σ(a_V (r - b_V))``:
    finite numbers (numpy and 0-d tensor scalars included). Returns them as ``float``.

    Raises:
        TypeError: a constant that is not a number (a string, ``None``, a bool), named.
        ValueError: NaN or ±inf, which would make every output NaN or a step function.
    """
    out = []
    for arg, v in (("a_u", a_u), ("b_u", b_u), ("a_v", a_v), ("b_v", b_v)):
        f = _as_float(name, arg, v)
        if not (-math.inf < f < math.inf):  # NaN fails both; comparisons trace under dynamo
            raise ValueError(f"{name}: the gain constant {arg} must be a finite number, got {v!r}")
        out.append(f)
    return out[0], out[1], out[2], out[3]


def check_rms_eps(name: str, rms_eps: float, arg: str = "eps") -> float:
    """RMSNorm's ``eps`` inside the square root: a number ``>= 0`` (a negative one can make
    the mean square plus ``eps`` negative, and the output NaN). ``eps = 0`` is allowed — the
    normalisation is then exactly scale-invariant — but divides ``0 / 0`` at ``x = 0``: the
    output and gradient there are NaN. It must be finite in float32 (up to :data:`F32_MAX`):
    ``inf`` gave a zero output but a NaN gradient from the kernels. Returns ``float(eps)``."""
    value = _as_float(name, arg, rms_eps)
    if not (0 <= value <= F32_MAX):  # also rejects NaN
        raise ValueError(f"{name}: {arg} must be >= 0 and finite in float32 "
                         f"(<= {F32_MAX:.6g}), got {rms_eps!r}")
    return value


def check_same_device(name: str, **tensors: torch.Tensor) -> None:
    """Raise if the given tensors are not all on one device."""
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise RuntimeError(f"{name}: expected all tensors on one device, got {listing}")


def check_bias(name: str, bias: torch.Tensor | None, x: torch.Tensor, dim: int) -> None:
    """``bias`` must be ``None`` or a floating ``(C,)`` tensor on ``x``'s device, ``C`` the
    size of ``x``'s channel axis ``dim`` (already normalised)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: bias must be a floating-point tensor, got dtype {bias.dtype}")
    c = x.shape[dim]
    if bias.dim() != 1 or bias.shape[0] != c:
        raise ValueError(f"{name}: bias must have shape ({c},), one value per channel of x's "
                         f"axis {dim}, got {tuple(bias.shape)}")
    if bias.device != x.device:  # (checked on every eager call: the message only if needed)
        check_same_device(name, x=x, bias=bias)


def check_same_shape(name: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: {a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}"
        )


def channel_geometry(x: torch.Tensor, dim: int) -> ChannelGeometry | None:
    """Describe ``x`` as ``(B, C, P)`` without copying, or return ``None``.

    ``None`` means the layout is neither channel-major contiguous nor channels-last; the
    caller then works on a contiguous copy.
    """
    shape = x.shape
    c = shape[dim]
    if x.is_contiguous():
        b = 1
        for s in shape[:dim]:
            b *= s
        p = 1
        for s in shape[dim + 1 :]:
            p *= s
        if p == 1:  # (N, C) rows: the channel axis itself is contiguous
            return ChannelGeometry(1, c, b, 0, 1, c, True)
        return ChannelGeometry(b, c, p, c * p, p, 1, False)
    if x.dim() == 4 and dim == 1 and x.is_contiguous(memory_format=torch.channels_last):
        n, _, h, w = shape
        return ChannelGeometry(1, c, n * h * w, 0, 1, c, True)
    return None
