"""An independent float64 TSRA reference, written the way the method reads (norms,
sigmoid, multiply, concatenate) and differentiated by autograd — it shares no code with
:mod:`cobkern.ops.reference` or the kernels."""

from __future__ import annotations

import torch


def tsra64(x: torch.Tensor, split: int, dim: int = 1, a_u: float = 5.0, b_u: float = 0.5,
           a_v: float = 5.0, b_v: float = 0.7, eps: float = 1e-12,
           norm_size: int | None = None, rms_eps: float | None = None) -> torch.Tensor:
    """TSRA of ``x`` (RMSNorm→TSRA when ``rms_eps`` is given) in float64."""
    x = x.double()
    if rms_eps is not None:
        n = x.shape[dim] if norm_size is None else norm_size
        x = x / torch.sqrt((x * x).sum(dim, keepdim=True) / n + rms_eps)
    c = x.shape[dim]
    xu, xv = torch.split(x, [split, c - split], dim)
    su = torch.linalg.vector_norm(xu, dim=dim, keepdim=True)
    sv = torch.linalg.vector_norm(xv, dim=dim, keepdim=True)
    s = torch.sqrt(su**2 + sv**2)
    r = su / (s + eps)
    gu = torch.sigmoid(a_u * (r - b_u))
    gv = torch.sigmoid(a_v * (r - b_v))
    return torch.cat([gu * xu, gv * xv], dim)


def tsra64_grad(x: torch.Tensor, dy: torch.Tensor, split: int, dim: int = 1,
                **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, dL/dx)`` in float64 for upstream gradient ``dy``."""
    xd = x.detach().double().requires_grad_(True)
    y = tsra64(xd, split, dim, **kw)
    (dx,) = torch.autograd.grad(y, xd, dy.double())
    return y.detach(), dx
