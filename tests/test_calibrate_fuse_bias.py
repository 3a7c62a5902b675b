"""``calibrate(fuse_conv_bias=...)``: the convolutions' biases added inside the TSRA kernels
for the calibration pass (a cobkern VGG's ``fuse_conv_bias`` switch), and put back after.

The automatic choice (on for a VGG run as it is on CUDA) is checked on ``torch.device``
objects: this machine has no GPU. The pass itself runs on CPU tensors with the switch forced
on: the statistics must match the unfused pass's, the convolutions' own forward (and so
their hooks) must be skipped, and the model must come back as it was, also after a failure.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cobkern.cob import calibrate
from cobkern.cob.calibrate import _resolve_fuse_conv_bias, _switch_fuse_conv_bias
from cobkern.models import vgg16_tsra
from cobkern.nn import RMSNormTSRA

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def small_vgg() -> nn.Module:
    torch.manual_seed(0)
    return vgg16_tsra(width=1 / 16).eval()


def images(n_batches: int = 2, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(n_batches)]


def assert_close_stats(got, want) -> None:
    """The same layers and sample counts, and every sum within 1e-6 of its matrix's (or
    vector's) largest entry: float32 round-off, reordered (see the tests' docstrings)."""
    assert list(got.layers) == list(want.layers)
    for name in want.layers:
        a, b = got[name], want[name]
        assert a.count == b.count, name
        for x, y in zip((a.gram_u, a.gram_v, a.sum_abs, a.sum_sq),
                        (b.gram_u, b.gram_v, b.sum_abs, b.sum_sq), strict=True):
            assert (x - y).abs().max() <= 1e-6 * y.abs().max(), name


def test_auto_fuses_a_plain_vgg_on_cuda_only() -> None:
    vgg = small_vgg()
    assert _resolve_fuse_conv_bias(vgg, None, CUDA) is True
    assert _resolve_fuse_conv_bias(vgg, None, CPU) is None  # the model's own setting
    # through torch.compile the switch would trace the graphs again: left alone
    assert _resolve_fuse_conv_bias(torch.compile(vgg), None, CUDA) is None
    assert _resolve_fuse_conv_bias(nn.Sequential(nn.Linear(2, 2)), None, CUDA) is None
    assert _resolve_fuse_conv_bias(vgg, False, CUDA) is False


def test_forcing_it_on_another_model_or_with_a_non_bool_is_refused() -> None:
    with pytest.raises(ValueError, match="fuse_conv_bias=True needs a cobkern VGG.*Sequential"):
        _resolve_fuse_conv_bias(nn.Sequential(nn.Linear(2, 2)), True, CPU)
    with pytest.raises(TypeError, match="fuse_conv_bias must be True or False"):
        _resolve_fuse_conv_bias(small_vgg(), 1, CPU)
    # through calibrate, before any batch is read: a model with CoB layers, not a VGG
    net = nn.Sequential(nn.Conv2d(3, 4, 3), RMSNormTSRA(4), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="needs a cobkern VGG"):
        calibrate(net, iter(()), progress=False, fuse_conv_bias=True)


def test_switch_restores_the_class_default_or_the_instance_value() -> None:
    vgg = small_vgg()
    restore = _switch_fuse_conv_bias(vgg, True)
    assert vgg.fuse_conv_bias is True
    restore()
    assert "fuse_conv_bias" not in vars(vgg) and vgg.fuse_conv_bias is False
    vgg.fuse_conv_bias = True  # the user's own setting
    restore = _switch_fuse_conv_bias(vgg, False)
    assert vgg.fuse_conv_bias is False
    restore()
    assert vars(vgg)["fuse_conv_bias"] is True
    _switch_fuse_conv_bias(vgg, None)()  # None: untouched
    assert vars(vgg)["fuse_conv_bias"] is True


def test_fused_pass_skips_the_convolutions_forward_and_keeps_the_statistics() -> None:
    """Forced on (CPU): the convolutions run without their bias (their forward hooks do not
    fire) and the activations get it instead. The statistics equal the unfused pass's to
    float32 rounding: on CPU the convolution adds its bias inside its own kernel, the
    activation after it — the same sum in another order, whose last-bit differences grow
    through the layers (measured: equal bits in the first eight layers, then up to 8e-8 of
    each matrix's largest entry). Bound: 1e-6 of the largest entry; counts exactly."""
    vgg, data = small_vgg(), images()
    conv = vgg.features[0]
    calls = []
    handle = conv.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = calibrate(vgg, data, max_samples=None, progress=False)
        n_plain = len(calls)
        fused = calibrate(vgg, data, max_samples=None, progress=False, fuse_conv_bias=True)
    finally:
        handle.remove()
    assert n_plain == len(data) and len(calls) == n_plain  # no conv forward when fused
    assert "fuse_conv_bias" not in vars(vgg)
    assert_close_stats(fused, plain)


def test_the_setting_comes_back_after_a_failed_pass() -> None:
    vgg = small_vgg()

    def failing():
        yield images(1)[0]
        raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError, match="the loader broke"):
        calibrate(vgg, failing(), max_samples=None, progress=False, fuse_conv_bias=True)
    assert "fuse_conv_bias" not in vars(vgg) and vgg.fuse_conv_bias is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_on_cuda_the_default_fuses_and_keeps_the_statistics(channels_last: bool) -> None:
    """On a GPU the default fuses (the convolutions' forward hooks do not fire) and gives
    the unfused pass's statistics: in float32 the kernel adds the same bias to the same
    convolution output, rounded once, as the separate add did; the covariance kernel's
    atomic adds may order sums differently (bound: 1e-6 of each matrix's largest entry)."""
    vgg = small_vgg().cuda()
    data = [x.cuda() for x in images(3, 8)]
    calls = []
    handle = vgg.features[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        fused = calibrate(vgg, data, max_samples=None, progress=False,
                          channels_last=channels_last)
        assert calls == []
        plain = calibrate(vgg, data, max_samples=None, progress=False,
                          channels_last=channels_last, fuse_conv_bias=False)
        assert len(calls) == len(data)
    finally:
        handle.remove()
    assert_close_stats(fused, plain)
