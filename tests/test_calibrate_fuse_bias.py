"""``calibrate(fuse_conv_bias=...)``: the convolutions' biases added inside the TSRA kernels
for the calibration pass (a cobkern VGG's ``fuse_conv_bias`` switch), and put back after.

The automatic choice (on for a VGG run as it is on CUDA) is checked on ``torch.device``
objects: this machine has no GPU. The pass itself runs on CPU tensors with the switch forced
on: the statistics must match the unfused pass's, the activations must get the biases
(a fused activation is called with ``(conv output, bias)``), a convolution with hooks must
run as it is, and the model must come back as it was, also after a failure.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from cobkern.cob import calibrate
from cobkern.cob.calibrate import _resolve_fuse_conv_bias, _switch_fuse_conv_bias
from cobkern.models import VGG, vgg16_tsra
from cobkern.nn import RMSNormTSRA

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
# the module (cobkern.cob's `calibrate` attribute is the function)
calibrate_module = importlib.import_module("cobkern.cob.calibrate")


def small_vgg() -> nn.Module:
    torch.manual_seed(0)
    return vgg16_tsra(width=1 / 16).eval()


def images(n_batches: int = 2, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(n_batches)]


def count_fused(act: nn.Module, log: list[bool]):
    """Record, per call of ``act``, whether it got the bias (two inputs: fused)."""
    return act.register_forward_hook(lambda _m, inputs, _out: log.append(len(inputs) == 2))


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
    # through torch.compile the switch would trace the graphs again: left alone, wrapped
    # or compiled in place (nn.Module.compile)
    assert _resolve_fuse_conv_bias(torch.compile(vgg), None, CUDA) is None
    vgg.compile()
    assert _resolve_fuse_conv_bias(vgg, None, CUDA) is None
    assert _resolve_fuse_conv_bias(nn.Sequential(nn.Linear(2, 2)), None, CUDA) is None
    assert _resolve_fuse_conv_bias(small_vgg(), False, CUDA) is False
    # False on a model without the switch: nothing to set (no attribute written)
    assert _resolve_fuse_conv_bias(nn.Sequential(nn.Linear(2, 2)), False, CPU) is None


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


def test_fused_pass_gives_the_activations_the_bias_and_keeps_the_statistics() -> None:
    """Forced on (CPU): the convolutions run without their bias and the activations get it
    (called with two inputs). The statistics equal the unfused pass's to float32 rounding:
    on CPU the convolution adds its bias inside its own kernel, the activation after it —
    the same sum in another order, whose last-bit differences grow through the layers
    (measured: equal bits in the first eight layers, then up to 8e-8 of each matrix's
    largest entry). Bound: 1e-6 of the largest entry; counts exactly."""
    vgg, data = small_vgg(), images()
    fused_calls: list[bool] = []
    handle = count_fused(vgg.features[1], fused_calls)
    try:
        plain = calibrate(vgg, data, max_samples=None, progress=False)
        assert fused_calls == [False] * len(data)
        fused = calibrate(vgg, data, max_samples=None, progress=False, fuse_conv_bias=True)
    finally:
        handle.remove()
    assert fused_calls == [False] * len(data) + [True] * len(data)
    assert "fuse_conv_bias" not in vars(vgg)
    assert_close_stats(fused, plain)


def test_a_convolution_with_hooks_is_not_fused() -> None:
    """``torch.nn.utils.prune`` recomputes a convolution's ``weight`` in a pre-forward hook;
    a fused pass that skipped it calibrated with a stale weight (2.9 % off in the first
    layer's Gram before the fix). That convolution now keeps its bias and its hook, so the
    statistics match the unfused pass's (bound as above)."""
    from torch.nn.utils import prune

    vgg, data = small_vgg(), images()
    prune.l1_unstructured(vgg.features[0], "weight", amount=0.5)
    with torch.no_grad():
        vgg.features[0].weight_orig.mul_(2.0)  # as after an optimizer step
    fused_calls: list[bool] = []
    handles = [count_fused(vgg.features[1], fused_calls),
               count_fused(vgg.features[3], fused_calls)]
    try:
        fused = calibrate(vgg, data, max_samples=None, progress=False, fuse_conv_bias=True)
    finally:
        for h in handles:
            h.remove()
    assert fused_calls == [False, True] * len(data)  # only the hooked pair runs unfused
    plain = calibrate(vgg, data, max_samples=None, progress=False, fuse_conv_bias=False)
    assert_close_stats(fused, plain)


def test_the_setting_comes_back_after_a_failed_pass() -> None:
    vgg = small_vgg()

    def failing():
        yield images(1)[0]
        raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError, match="the loader broke"):
        calibrate(vgg, failing(), max_samples=None, progress=False, fuse_conv_bias=True)
    assert "fuse_conv_bias" not in vars(vgg) and vgg.fuse_conv_bias is False


def test_a_failing_switch_or_cleanup_leaves_no_hook_behind(monkeypatch) -> None:
    """Every change calibrate makes is undone however it fails: a model whose
    ``fuse_conv_bias`` cannot be set (a read-only property), and a graph replayer whose
    ``close`` raises, leave no hook on the model and its training mode as it was."""

    class ReadOnly(VGG):
        @property
        def fuse_conv_bias(self) -> bool:
            return False

    torch.manual_seed(0)
    base = small_vgg()
    vgg = ReadOnly(base.features, base.classifier).train()
    with pytest.raises(AttributeError, match="fuse_conv_bias"):
        calibrate(vgg, images(1), max_samples=None, progress=False, fuse_conv_bias=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vgg.modules())
    assert all(m.training for m in vgg.modules())

    class BrokenReplay:  # a ForwardReplay whose close fails
        def __init__(self, forward, _accs) -> None:
            self.forward = forward

        def __call__(self, x):
            self.forward(x)

        def close(self) -> None:
            raise RuntimeError("close failed")

    monkeypatch.setattr(calibrate_module, "ForwardReplay", BrokenReplay)
    monkeypatch.setattr(calibrate_module, "_graphs_on", lambda _device: True)
    vgg = small_vgg().train()
    with pytest.raises(RuntimeError, match="close failed"):
        calibrate(vgg, images(1), max_samples=None, progress=False, cuda_graphs=True,
                  fuse_conv_bias=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vgg.modules())
    assert all(m.training for m in vgg.modules())
    assert "fuse_conv_bias" not in vars(vgg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_on_cuda_the_default_fuses_and_keeps_the_statistics(channels_last: bool) -> None:
    """On a GPU the default fuses (the activations get the biases) and gives
    the unfused pass's statistics: in float32 the kernel adds the same bias to the same
    convolution output, rounded once, as the separate add did; the covariance kernel's
    atomic adds may order sums differently (bound: 1e-6 of each matrix's largest entry)."""
    vgg = small_vgg().cuda()
    data = [x.cuda() for x in images(3, 8)]
    fused_calls: list[bool] = []
    handle = count_fused(vgg.features[1], fused_calls)
    try:
        fused = calibrate(vgg, data, max_samples=None, progress=False,
                          channels_last=channels_last)
        assert fused_calls == [True] * len(data)
        plain = calibrate(vgg, data, max_samples=None, progress=False,
                          channels_last=channels_last, fuse_conv_bias=False)
        assert fused_calls == [True] * len(data) + [False] * len(data)
    finally:
        handle.remove()
    assert_close_stats(fused, plain)
