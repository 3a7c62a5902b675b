"""nn modules built on cobkern's ops: :class:`TSRA`, :class:`RMSNorm`, :class:`RMSNormTSRA`."""

from .activation import TSRA, RMSNormTSRA
from .norm import RMSNorm

__all__ = ["TSRA", "RMSNorm", "RMSNormTSRA"]
