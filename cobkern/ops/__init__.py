"""cobkern's differentiable ops (``torch.library`` custom ops backed by Triton kernels).

* :func:`tsra`, :func:`rmsnorm_tsra` — forward with autograd;
* :func:`tsra_backward`, :func:`rmsnorm_tsra_backward` — explicit backward;
* :func:`rmsnorm` — unlearned RMSNorm (plain PyTorch);
* :func:`subspace_moments`, :class:`CovarianceAccumulator` — streaming per-subspace
  second moments for calibration;
* :func:`use_backend`, :func:`set_backend` — choose Triton kernels or the reference;
* :func:`set_compile_kernels`, :func:`use_compile_kernels` — how ``torch.compile`` reaches
  the TSRA kernels: the opaque custom ops or their inline ``triton_op`` twins.
"""

from .backend import (
    get_backend,
    get_compile_kernels,
    set_backend,
    set_compile_kernels,
    use_backend,
    use_compile_kernels,
)
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
    "get_compile_kernels",
    "set_compile_kernels",
    "use_compile_kernels",
    "DEFAULT_A_U",
    "DEFAULT_B_U",
    "DEFAULT_A_V",
    "DEFAULT_B_V",
    "DEFAULT_EPS",
    "DEFAULT_RMS_EPS",
]
