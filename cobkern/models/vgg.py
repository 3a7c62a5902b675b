"""VGG-16 for CIFAR-10: the TSRA model and the ReLU control (``method.md`` §2).

Both models are a :class:`VGG` with two ``nn.Sequential`` halves, ``features`` and
``classifier``; ``forward(x) = classifier(features(x))``.

* TSRA model (:func:`vgg16_tsra`): every conv block is ``Conv2d(3×3, pad 1, bias)`` followed
  by :class:`cobkern.nn.RMSNormTSRA` (``fused=True``, the default: one fused kernel on CUDA,
  the reference math on CPU, chosen automatically) or by :class:`cobkern.nn.RMSNorm` then
  :class:`cobkern.nn.TSRA` (``fused=False``); pooling is ``AvgPool2d(2)``; the classifier
  uses TSRA; PyTorch's default initialisation.
* ReLU control (:func:`vgg16_relu`): ``Conv2d → BatchNorm2d → ReLU``, ``MaxPool2d(2)``, ReLU
  in the classifier, ``kaiming_uniform_(mode="fan_out", nonlinearity="relu")`` with zero bias
  for every conv and linear layer.

``width`` multiplies every hidden width (conv channels and the two 4096-wide linear
layers), giving small models for CPU runs and tests; at ``width=1.0`` the TSRA model has
33,638,218 parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from cobkern._wrappers import compiled_in_place
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA

__all__ = ["VGG", "VGG_CFG_D", "vgg16_tsra", "vgg16_relu", "scaled_width",
           "init_relu_weights", "forward_fusing_conv_bias"]

#: VGG configuration "D" (VGG-16): conv output widths, ``"M"`` = 2×2 pooling.
VGG_CFG_D: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)

#: Width of the two hidden linear layers at ``width=1``.
HIDDEN = 4096


class VGG(nn.Module):
    """A VGG network: ``classifier(features(x))``.

    Args:
        features: convolutional part; maps ``(N, 3, 32, 32)`` to ``(N, C, 1, 1)``.
        classifier: starts with ``nn.Flatten()``; maps to ``(N, num_classes)`` logits.

    Shape:
        - Input: ``(N, 3, 32, 32)`` float (NCHW or channels_last).
        - Output: ``(N, num_classes)`` logits, same dtype as the last layer computes in.

    Attributes:
        fuse_conv_bias: run ``features`` through :func:`forward_fusing_conv_bias` (each
            convolution's bias added inside the TSRA kernel behind it). Default ``False``;
            a runtime switch, not part of the state dict or the model file. The function is
            the same. ``features`` runs as it is (``self.features(x)``) while it is off and
            also when it is not a plain ``nn.Sequential`` (e.g. a ``torch.compile`` wrapper),
            was compiled in place (``features.compile()``) or has hooks of its own, or
            when global module hooks are registered; a convolution with hooks keeps its bias
            (see :func:`forward_fusing_conv_bias`).
    """

    fuse_conv_bias: bool = False

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        f = self.features
        if (self.fuse_conv_bias and type(f) is nn.Sequential and not compiled_in_place(f)
                and not _has_hooks(f)):
            return self.classifier(forward_fusing_conv_bias(f, x))
        return self.classifier(f(x))

    @property
    def num_classes(self) -> int:
        """Number of logits (the last Linear's ``out_features``)."""
        last = [m for m in self.classifier if isinstance(m, nn.Linear)][-1]
        return last.out_features


def forward_fusing_conv_bias(seq: nn.Sequential, x: Tensor) -> Tensor:
    """``seq(x)``, with every ``Conv2d`` that has a bias and is directly followed by a
    :class:`~cobkern.nn.TSRA` or :class:`~cobkern.nn.RMSNormTSRA` on channel axis 1 run
    without its bias, which the activation adds as its kernel loads the convolution's output
    (``activation(x, bias)``).

    That saves a read and a write of every such output in the forward pass: PyTorch adds a
    convolution's bias in a pass of its own after cuDNN, and so does ``torch.compile`` on
    CUDA (inductor peels the bias off into a pointwise add, which in a BatchNorm/ReLU model
    fuses into the next kernel but cannot fuse into a cobkern op). The same function up to
    rounding (the add happens in float32 in the kernel; under bf16 autocast the bias is no
    longer rounded to bf16 first) and the same gradients, the bias's included.

    Hooks: a pair is fused only when the convolution has no hooks (forward, pre-forward or
    backward — e.g. :mod:`torch.nn.utils.prune` recomputes ``weight`` in a pre-hook, which
    a fused call would skip) and the activation no pre-forward or backward hooks, and when
    no global module hooks are registered; otherwise both run as they are. The
    activation's forward hooks do run on a fused pair, with the inputs ``(convolution
    output without its bias, bias)`` and the same output. The hooks of ``seq`` itself are
    not called: it is not called, only its layers.

    Args:
        seq: the layers, applied in order.
        x: the input of ``seq``.
    """
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if (type(m) is nn.Conv2d and m.bias is not None and isinstance(nxt, (TSRA, RMSNormTSRA))
                and nxt.dim == 1 and not _has_hooks(m)
                and not _has_hooks(nxt, forward=False)):
            x = nxt(m._conv_forward(x, m.weight, None), m.bias)
            i += 2
        else:
            x = m(x)
            i += 1
    return x


def _has_hooks(m: nn.Module, forward: bool = True) -> bool:
    """Whether calling ``m`` runs hooks besides its ``forward``: its own pre-forward and
    backward (and, with ``forward=True``, forward) hooks, or any global module hook
    (``torch.nn.modules.module.register_module_*_hook``), which fire for every module."""
    from torch.nn.modules import module as mm

    own = [m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks]
    if forward:
        own.append(m._forward_hooks)
    glob = [getattr(mm, n, None) for n in ("_global_forward_pre_hooks", "_global_forward_hooks",
                                            "_global_backward_hooks",
                                            "_global_backward_pre_hooks")]
    return any(own) or any(glob)


def scaled_width(channels: int, width: float) -> int:
    """``round(channels * width)``, at least 2 (TSRA needs two non-empty subspaces)."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return max(2, int(round(channels * width)))


def _tsra_features(cfg: tuple[int | str, ...], width: float, fused: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.AvgPool2d(2))
            continue
        c = scaled_width(int(v), width)
        layers.append(nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=True))
        if fused:
            layers.append(RMSNormTSRA(c))
        else:
            layers += [RMSNorm(c), TSRA(c)]
        c_in = c
    return nn.Sequential(*layers)


def _relu_features(cfg: tuple[int | str, ...], width: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        c = scaled_width(int(v), width)
        layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=True), nn.BatchNorm2d(c),
                   nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers)


def _last_conv_width(cfg: tuple[int | str, ...], width: float) -> int:
    return scaled_width(int([v for v in cfg if v != "M"][-1]), width)


def vgg16_tsra(num_classes: int = 10, width: float = 1.0, fused: bool = True) -> VGG:
    """VGG-16 with unlearned RMSNorm + TSRA and average pooling (``method.md`` §2).

    Args:
        num_classes: number of logits.
        width: multiplier for every hidden width (``round(c * width)``, at least 2).
        fused: use one :class:`~cobkern.nn.RMSNormTSRA` per conv block (default) instead of
            separate :class:`~cobkern.nn.RMSNorm` and :class:`~cobkern.nn.TSRA` modules.
            Both compute the same function.

    Returns:
        A :class:`VGG` with PyTorch's default initialisation. Input ``(N, 3, 32, 32)``,
        output ``(N, num_classes)``.
    """
    c = _last_conv_width(VGG_CFG_D, width)
    h = scaled_width(HIDDEN, width)
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(c, h), TSRA(h), nn.Dropout(0.5),
        nn.Linear(h, h), TSRA(h), nn.Dropout(0.5),
        nn.Linear(h, num_classes),
    )
    return VGG(_tsra_features(VGG_CFG_D, width, fused), classifier)


def init_relu_weights(model: nn.Module, linear: bool = False) -> None:
    """``kaiming_uniform_(fan_out, relu)`` and zero bias for every Conv2d (``method.md`` §2).

    Linear layers keep PyTorch's default initialisation unless ``linear=True``. Applied to
    the classifier, fan_out means the 10 logits of the last layer: its weights get a
    standard deviation of sqrt(2/10), the initial logits one of ~26 at full width, and the
    paper's ReLU recipe (SGD, lr 0.1, no warm-up) diverged to NaN within six steps (2-core
    CPU, float32, batch 128) and from the first evaluation of the ``fast`` preset (H200,
    2026-11-27). ``linear=True`` gives that reading, for comparison. Grad-norm clipping at
    1.0 (which ``method.md`` §3 lists for the TSRA model only) keeps that reading finite,
    but it starts far off and recovers slowly. Width 0.5, batch 128, SGD lr 0.1 Nesterov,
    augmented CIFAR-10, 15 steps (2-core CPU, 2026-11-29): full init unclipped, loss 29.2 →
    NaN at step 8; full init clipped, 29.2 → 10.1; this default (convs only), unclipped,
    2.34 → 2.24.

    Args:
        model: initialised in place.
        linear: also give every ``nn.Linear`` the Kaiming fan_out weights and zero bias.
    """
    kinds = (nn.Conv2d, nn.Linear) if linear else (nn.Conv2d,)
    for m in model.modules():
        if isinstance(m, kinds):
            nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def vgg16_relu(num_classes: int = 10, width: float = 1.0) -> VGG:
    """The ReLU control: VGG-16 with BatchNorm2d, ReLU and max pooling (``method.md`` §2).

    Args:
        num_classes: number of logits.
        width: multiplier for every hidden width.

    Returns:
        A :class:`VGG`, Kaiming-uniform (fan_out, relu) weights and zero biases in every
        conv layer, PyTorch's default in the linear layers (see :func:`init_relu_weights`).
        Input ``(N, 3, 32, 32)``, output ``(N, num_classes)``.
    """
    c = _last_conv_width(VGG_CFG_D, width)
    h = scaled_width(HIDDEN, width)
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(c, h), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(h, h), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(h, num_classes),
    )
    model = VGG(_relu_features(VGG_CFG_D, width), classifier)
    init_relu_weights(model)
    return model
