"""SHA-256 digests of named tensors: what identifies a model's weights or a run's data."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["tensor_digest"]


def tensor_digest(items: Iterable[tuple[str, Tensor]]) -> str:
    """Hex SHA-256 of ``(name, tensor)`` pairs, in order: each name, shape and dtype, then
    the tensor's bytes (copied to the CPU, contiguous)."""
    h = hashlib.sha256()
    for name, t in items:
        # a fresh dense copy: .contiguous() leaves a one-element view's stride as it is
        # (a 1x1 matrix's diagonal has stride 2), which view(torch.uint8) refuses
        t = t.detach().cpu()
        t = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
