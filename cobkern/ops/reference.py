"""Plain-PyTorch reference of the TSRA-family ops (the CPU path).

The same closed-form math as the Triton kernels in :mod:`cobkern.kernels.tsra`,
written with ordinary tensor ops so that it runs on any device. It accumulates in
float32 (float64 for float64 inputs) and returns the input dtype.

Notation (``method.md`` §1), per position, with ``x_U = x[:split]``, ``x_V = x[split:]``::

    s_U = ||x_U||,  s_V = ||x_V||,  s = sqrt(s_U² + s_V²),  r = s_U / (s + eps)
    g_U = sigmoid(a_U (r - b_U)),   g_V = sigmoid(a_V (r - b_V))
    y   = concat(g_U x_U, g_V x_V)

The fused RMSNorm→TSRA first scales ``x`` by ``q = 1 / sqrt((s_U² + s_V²) / n + eps_rms)``
where ``n`` is the normaliser size (by default ``C``), then applies TSRA.

Backward (one pass over ``x`` and ``dy``): with the dots ``d_U = <dy_U, x_U>``,
``d_V = <dy_V, x_V>`` and ``c = q (a_U g_U (1-g_U) d_U + a_V g_V (1-g_V) d_V)``,
``t = c / (s + eps)``, ``k_U = t (1/s_U - r/s)``, ``k_V = -t r / s`` (``1/0 := 0``; the
norms here are those of the normalised input)::

    TSRA:          dx = g dy + k x
    RMSNorm→TSRA:  dx = q g dy + (q² k - q³ w / n) x,
                   w  = g_U d_U + g_V d_V + q (k_U s_U'² + k_V s_V'²)

where ``s_U'``, ``s_V'`` are the raw (un-normalised) norms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["tsra_forward", "tsra_backward", "rmsnorm", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sumsq_split(x: torch.Tensor, split: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.shape[dim]
    xu = x.narrow(dim, 0, split)
    xv = x.narrow(dim, split, c - split)
    return xu.square().sum(dim, keepdim=True), xv.square().sum(dim, keepdim=True)


def _per_subspace(dim: int, c: int, split: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Broadcast per-position values of U and V back to ``c`` channels along ``dim``."""
    shape_u = list(u.shape)
    shape_u[dim] = split
    shape_v = list(v.shape)
    shape_v[dim] = c - split
    return torch.cat([u.expand(shape_u), v.expand(shape_v)], dim)


def _safe_sqrt(sumsq: torch.Tensor) -> torch.Tensor:
    """``sqrt(sumsq)`` with a zero (not infinite) derivative at ``sumsq = 0``.

    The value is exactly ``sqrt``'s. Only autograd through :func:`tsra_backward` (the
    double backward) differentiates it: where a subspace is exactly zero the first-order
    formula's ``1/0 := 0`` guards hold, and a plain ``sqrt`` would still send ``inf · 0 = NaN``
    into every second-order term of that position.
    """
    nz = sumsq != 0  # not ``> 0``: a NaN sum stays NaN
    return torch.where(nz, torch.where(nz, sumsq, 1.0).sqrt(), 0.0)


def _gains(
    s2u: torch.Tensor,
    s2v: torch.Tensor,
    q: torch.Tensor | float,
    a_u: float,
    b_u: float,
    a_v: float,
    b_v: float,
    eps: float,
    sqrt: Callable[[torch.Tensor], torch.Tensor] = torch.sqrt,
):
    su = sqrt(s2u) * q
    s = sqrt(s2u + s2v) * q
    den = s + eps
    r = su / den
    gu = torch.sigmoid(a_u * (r - b_u))
    gv = torch.sigmoid(a_v * (r - b_v))
    return su, s, den, r, gu, gv


def _with_bias(xf: torch.Tensor, bias: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``xf + bias`` broadcast along the channel axis ``dim`` (``xf`` itself without one)."""
    if bias is None:
        return xf
    shape = [1] * xf.dim()
    shape[dim] = -1
    return xf + bias.to(xf.dtype).view(shape)


def _rms_scale(s2u: torch.Tensor, s2v: torch.Tensor, norm_size: int, rms_eps: float):
    return torch.rsqrt((s2u + s2v) / norm_size + rms_eps)


def tsra_forward(
    x: torch.Tensor,
    split: int,
    dim: int,
    a_u: float,
    b_u: float,
    a_v: float,
    b_v: float,
    eps: float,
    norm_size: int = 0,
    rms_eps: float = 0.0,
    *,
    differentiable: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """TSRA (``norm_size == 0``) or RMSNorm→TSRA (``norm_size > 0``) forward.

    Args:
        x: ``(..., C, ...)`` floating tensor; channels along ``dim``.
        bias: ``(C,)``, added to ``x`` in the accumulation dtype first (the function of
            ``x + bias``, without rounding the sum to ``x``'s dtype, as the kernels do).
        differentiable: for autograd and ``torch.func`` through this function itself (the
            public ops' route under ``torch.func`` transforms and forward-mode AD): out of
            place, and norms whose derivative at 0 is 0 — the kernels' ``1/0 := 0``
            convention, so the derivative stays finite where a subspace is zero. Same values.
    Returns:
        Tensor of ``x``'s shape, dtype and memory format.
    """
    c = x.shape[dim]
    xf = _with_bias(x.to(compute_dtype(x.dtype)), bias, dim)
    s2u, s2v = _sumsq_split(xf, split, dim)
    q = _rms_scale(s2u, s2v, norm_size, rms_eps) if norm_size > 0 else 1.0
    _, _, _, _, gu, gv = _gains(s2u, s2v, q, a_u, b_u, a_v, b_v, eps,
                                _safe_sqrt if differentiable else torch.sqrt)
    gain = _per_subspace(dim, c, split, gu * q, gv * q)
    if differentiable:
        return (xf * gain).to(x.dtype)
    out = torch.empty_like(x)
    out.copy_(xf * gain)
    return out


def tsra_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    split: int,
    dim: int,
    a_u: float,
    b_u: float,
    a_v: float,
    b_v: float,
    eps: float,
    norm_size: int = 0,
    rms_eps: float = 0.0,
    *,
    differentiable: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of :func:`tsra_forward` with respect to ``x`` (shapes as ``x``; with a
    ``bias``, the gradient with respect to ``x + bias``, which is the same).

    ``differentiable=True`` (the double backward's use, and ``torch.func``'s) computes the
    norms with a square root whose derivative at 0 is 0, so that autograd through this
    function stays finite where a subspace is exactly zero, and returns a new tensor (out of
    place); the values are the same either way.
    """
    c = x.shape[dim]
    cd = compute_dtype(x.dtype)
    xf = _with_bias(x.to(cd), bias, dim)
    gf = grad.to(cd)
    s2u, s2v = _sumsq_split(xf, split, dim)
    prod = gf * xf
    du = prod.narrow(dim, 0, split).sum(dim, keepdim=True)
    dv = prod.narrow(dim, split, c - split).sum(dim, keepdim=True)
    rms = norm_size > 0
    q = _rms_scale(s2u, s2v, norm_size, rms_eps) if rms else torch.ones_like(s2u)
    su, s, den, r, gu, gv = _gains(s2u, s2v, q, a_u, b_u, a_v, b_v, eps,
                                   _safe_sqrt if differentiable else torch.sqrt)
    cc = q * (a_u * gu * (1 - gu) * du + a_v * gv * (1 - gv) * dv)
    t = cc / den
    inv_su = torch.where(su > 0, 1.0 / torch.where(su > 0, su, 1.0), 0.0)
    inv_s = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    ku = t * (inv_su - r * inv_s)
    kv = -t * r * inv_s
    if rms:
        w = gu * du + gv * dv + q * (ku * s2u + kv * s2v)
        corr = q * (q * (q * w) / norm_size)  # not q³: it leaves float32 where this does not
        coef_u = q * (q * ku) - corr
        coef_v = q * (q * kv) - corr
        gain = _per_subspace(dim, c, split, q * gu, q * gv)
        coef = _per_subspace(dim, c, split, coef_u, coef_v)
    else:
        gain = _per_subspace(dim, c, split, gu, gv)
        coef = _per_subspace(dim, c, split, ku, kv)
    if differentiable:  # out of place: also under torch.func transforms
        return (gain * gf + coef * xf).to(x.dtype)
    out = torch.empty_like(x)
    out.copy_(gain * gf + coef * xf)
    return out


def rmsnorm(x: torch.Tensor, dim: int, norm_size: int, eps: float) -> torch.Tensor:
    """Unlearned RMSNorm over ``dim``: ``x / sqrt(sum(x²) / norm_size + eps)`` (autograd-able)."""
    xf = x.to(compute_dtype(x.dtype))
    q = torch.rsqrt(xf.square().sum(dim, keepdim=True) / norm_size + eps)
    return (xf * q).to(x.dtype)
