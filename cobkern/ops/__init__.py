"""cobkern's differentiable ops (``torch.library`` custom ops backed by Triton kernels).

* :func:`tsra`, :func:`rmsnorm_tsra` — forward with autograd;
* :func:`tsra_backward`, :func:`rmsnorm_tsra_backward` — explicit backward;
* :func:`rmsnorm` — unlearned RMSNorm (plain PyTorch);
* :func:`subspace_moments`, :class:`CovarianceAccumulator` — streaming per-subspace
  second moments for calibration;
* :func:`use_backend`, :func:`set_backend` — choose Triton kernels or the reference.
"""

from .backend import get_backend, set_backend, use_backend
from .covariance import CovarianceAccumulator, Moments, subspace_moments
from .rmsnorm import rmsnorm
from .tsra import (
    DEFAULT_A_U,
    DEFAULT_A_V,
    DEFAULT_B_U,
    DEFAULT_B_V,
    DEFAULT_EPS,
    DEFAULT_RMS_EPS,
    rmsnorm_tsra,
    rmsnorm_tsra_backward,
    tsra,
    tsra_backward,
)

__all__ = [
    "tsra",
    "rmsnorm_tsra",
    "tsra_backward",
    "rmsnorm_tsra_backward",
    "rmsnorm",
    "subspace_moments",
    "Moments",
    "CovarianceAccumulator",
    "get_backend",
    "set_backend",
    "use_backend",
    "DEFAULT_A_U",
    "DEFAULT_B_U",
    "DEFAULT_A_V",
    "DEFAULT_B_V",
    "DEFAULT_EPS",
    "DEFAULT_RMS_EPS",
]
