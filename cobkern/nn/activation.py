"""TSRA and fused RMSNorm→TSRA modules."""

from __future__ import annotations

from torch import Tensor, nn

from cobkern.ops import rmsnorm_tsra, tsra
from cobkern.ops._checks import (
    as_int,
    check_gain,
    check_norm_size,
    check_rms_eps,
    check_tsra_eps,
)
from cobkern.ops.tsra import (
    DEFAULT_A_U,
    DEFAULT_A_V,
    DEFAULT_B_U,
    DEFAULT_B_V,
    DEFAULT_EPS,
    DEFAULT_RMS_EPS,
)

__all__ = ["TSRA", "RMSNormTSRA"]


def _default_split(name: str, num_channels: int, split: int | None) -> tuple[int, int]:
    """``(num_channels, split)`` as ints (numpy integers accepted, as for ``norm_size``; a
    float failed only at forward), ``split`` defaulting to ``num_channels // 2``."""
    num_channels = as_int(name, "num_channels", num_channels)
    split = None if split is None else as_int(name, "split", split)
    if num_channels < 2:
        raise ValueError(f"TSRA needs at least 2 channels, got num_channels={num_channels}")
    split = num_channels // 2 if split is None else split
    if not (1 <= split < num_channels):
        raise ValueError(f"split={split} is out of range for {num_channels} channels "
                         f"(need 1 <= split < {num_channels})")
    return num_channels, split


class _TSRABase(nn.Module):
    """Shared state of :class:`TSRA` and :class:`RMSNormTSRA`.

    TSRA's epsilon is stored as ``tsra_eps`` on both classes (the name model configs and
    saved modules use); :class:`TSRA` also exposes it as ``eps``, its constructor argument.
    """

    def __init__(self, num_channels: int, split: int | None, dim: int, a_u: float, b_u: float,
                 a_v: float, b_v: float, tsra_eps: float, eps_arg: str) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_channels, self.split = _default_split(name, num_channels, split)
        self.dim = as_int(name, "dim", dim)  # a float or str dim failed only at forward
        self.a_u, self.b_u, self.a_v, self.b_v = check_gain(type(self).__name__, a_u, b_u,
                                                            a_v, b_v)
        self.tsra_eps = check_tsra_eps(type(self).__name__, tsra_eps, eps_arg)

    def _check(self, x: Tensor) -> None:
        # a non-tensor or an out-of-range dim is left to the op, whose error names it
        if isinstance(x, Tensor) and -x.dim() <= self.dim < x.dim() and \
                x.shape[self.dim] != self.num_channels:
            raise ValueError(f"{type(self).__name__}: expected {self.num_channels} channels on "
                             f"dim {self.dim}, got input of shape {tuple(x.shape)}")

    def _gain_repr(self, eps_name: str) -> str:
        """The gain constants, and TSRA's epsilon as ``eps_name=...`` when not the default."""
        s = f"a_u={self.a_u}, b_u={self.b_u}, a_v={self.a_v}, b_v={self.b_v}"
        if self.tsra_eps != DEFAULT_EPS:
            s += f", {eps_name}={self.tsra_eps}"
        return s


class TSRA(_TSRABase):
    r"""Two-subspace radial activation (``method.md`` §1).

    The channels split into ``U = [0, split)`` and ``V = [split, C)``; each subspace is scaled
    by a logistic function of ``r = ||x_U|| / (||x|| + eps)``. It commutes with any rotation
    ``diag(R_U, R_V)``, and the gains are invariant to positive scaling of ``x``.

    Args:
        num_channels: ``C``.
        split: size of ``U``; default ``C // 2``. After pruning the two subspaces differ.
        dim: the channel axis (default 1).
        a_u, b_u, a_v, b_v: logistic constants (defaults 5, 0.5, 5, 0.7).
        eps: added to ``||x||`` in ``r`` (default 1e-12); a normal float32 number (about
            ``1.2e-38`` to ``3.4e38``, as :func:`~cobkern.ops.tsra` checks). Readable
            and settable as the attribute ``eps`` (also available as ``tsra_eps``, the name
            :class:`RMSNormTSRA` uses); shown in the repr when not the default.

    Shape:
        - Input: 2-D to 5-D, ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` (NCHW or
          channels_last) or ``(N, C, D, H, W)``
        - Output: same shape, dtype and memory format.

    Example::

        >>> act = TSRA(64)
        >>> y = act(torch.randn(8, 64, 32, 32))
    """

    def __init__(self, num_channels: int, split: int | None = None, dim: int = 1,
                 a_u: float = DEFAULT_A_U, b_u: float = DEFAULT_B_U, a_v: float = DEFAULT_A_V,
                 b_v: float = DEFAULT_B_V, eps: float = DEFAULT_EPS) -> None:
        super().__init__(num_channels, split, dim, a_u, b_u, a_v, b_v, eps, "eps")

    @property
    def eps(self) -> float:
        """TSRA's epsilon (the constructor's ``eps``); the same value as ``tsra_eps``."""
        return self.tsra_eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.tsra_eps = check_tsra_eps("TSRA", value, "eps")

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x``: the input; ``bias``: optional ``(C,)``, added to ``x`` first inside the
        kernel (``TSRA(x + bias)``): the bias of the layer in front, run without it."""
        self._check(x)
        return tsra(x, self.split, self.dim, a_u=self.a_u, b_u=self.b_u, a_v=self.a_v,
                    b_v=self.b_v, eps=self.tsra_eps, bias=bias)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, split={self.split}, dim={self.dim}, "
                f"{self._gain_repr('eps')}")


class RMSNormTSRA(_TSRABase):
    r"""Unlearned RMSNorm followed by TSRA, fused into one kernel.

    Equivalent to ``TSRA(C, split)(RMSNorm(C, eps=eps, norm_size=norm_size)(x))`` with one
    read and one write of ``x`` in each direction.

    Args:
        num_channels: ``C``.
        split: size of ``U``; default ``C // 2``.
        dim: the channel axis (default 1).
        eps: RMSNorm's epsilon (default 1e-6).
        norm_size: RMSNorm's normaliser; ``None`` (default) means ``num_channels``.
        a_u, b_u, a_v, b_v, tsra_eps: TSRA's constants (``tsra_eps``, TSRA's epsilon, must
            be ``> 0``; shown in the repr when not the default 1e-12).

    Attributes ``eps`` (RMSNorm's) and ``tsra_eps`` (TSRA's) match the constructor.

    Shape:
        - Input: 2-D to 5-D, ``(N, C)`` … ``(N, C, D, H, W)`` (NCHW or channels_last)
        - Output: same shape, dtype and memory format.
    """

    def __init__(self, num_channels: int, split: int | None = None, dim: int = 1,
                 eps: float = DEFAULT_RMS_EPS, norm_size: int | None = None,
                 a_u: float = DEFAULT_A_U, b_u: float = DEFAULT_B_U, a_v: float = DEFAULT_A_V,
                 b_v: float = DEFAULT_B_V, tsra_eps: float = DEFAULT_EPS) -> None:
        super().__init__(num_channels, split, dim, a_u, b_u, a_v, b_v, tsra_eps, "tsra_eps")
        self.eps = check_rms_eps(type(self).__name__, eps)
        self.norm_size = (None if norm_size is None
                          else check_norm_size(type(self).__name__, norm_size, num_channels))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x``: the input; ``bias``: optional ``(C,)``, added to ``x`` first inside the
        kernel (the output is that of ``x + bias``, in the same one read and one write): a
        convolution's bias, with the convolution run without it."""
        self._check(x)
        return rmsnorm_tsra(x, self.split, self.dim, eps=self.eps, norm_size=self.norm_size,
                            a_u=self.a_u, b_u=self.b_u, a_v=self.a_v, b_v=self.b_v,
                            tsra_eps=self.tsra_eps, bias=bias)

    def extra_repr(self) -> str:
        s = f"{self.num_channels}, split={self.split}, dim={self.dim}, eps={self.eps}"
        if self.norm_size is not None:
            s += f", norm_size={self.norm_size}"
        return s + ", " + self._gain_repr("tsra_eps")
