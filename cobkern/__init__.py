"""cobkern: change-of-basis pruning for PyTorch, with fused Triton kernels.

Quick start::

    import torch, cobkern
    y = cobkern.tsra(torch.randn(8, 64, 32, 32), split=32)
    block = cobkern.nn.RMSNormTSRA(64)
"""

from . import nn, ops
from .ops import rmsnorm, rmsnorm_tsra, tsra, use_backend

__version__ = "0.1.0"

__all__ = ["ops", "nn", "tsra", "rmsnorm_tsra", "rmsnorm", "use_backend", "__version__"]
