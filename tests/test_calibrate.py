"""``calibrate``'s input layout: the automatic ``channels_last=None`` and its checks.

The rule (measured on an H200, ``BENCHMARKS.md``): channels-last exactly for a model whose
first floating-point parameter is float32 on a CUDA device; NCHW for bfloat16 (slower
channels-last there), for other dtypes and for every other device (CPU: untimed). This
machine has no GPU, so the CUDA cases use torch devices that allocate nothing: plain
``torch.device("cuda")`` objects for the rule itself, and parameters made under
:class:`~torch._subclasses.fake_tensor.FakeTensorMode` (fake tensors that report a CUDA
device and a dtype without any storage) for the model-level resolution.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from cobkern.cob import calibrate
from cobkern.cob.calibrate import _auto_channels_last, _layout_probe, _resolve_channels_last
from cobkern.nn import TSRA, RMSNormTSRA
from cobkern.ops import use_backend

CUDA = torch.device("cuda")


def tiny_net() -> nn.Sequential:
    """conv→RMSNormTSRA→pool→flatten→linear→TSRA→linear: two CoB layers, one of them a
    4-D conv activation (the one whose layout ``channels_last`` decides)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), RMSNormTSRA(6, split=2), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10), TSRA(10, split=4), nn.Linear(10, 3),
    )


def tiny_batches(n_batches: int = 2, n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(n_batches)]


def fake_cuda_linear(dtype: torch.dtype) -> nn.Linear:
    """A linear layer whose parameters report ``cuda:0`` and ``dtype`` (fake tensors: no
    GPU and no memory needed — but a torch built with CUDA: a CPU-only build refuses even
    fake CUDA tensors, and the test is skipped there)."""
    if not torch.backends.cuda.is_built():
        pytest.skip("fake CUDA tensors need a CUDA build of torch")
    with FakeTensorMode():
        return nn.Linear(2, 2, device="cuda", dtype=dtype)


# ---------------------------------------------------------------------- the rule itself
@pytest.mark.parametrize("dtype,device,expected", [
    (torch.float32, CUDA, True),
    (torch.float32, torch.device("cuda", 1), True),
    (torch.float32, "cuda", True),
    (torch.bfloat16, CUDA, False),   # measured 1.84x slower channels-last
    (torch.float16, CUDA, False),    # not measured
    (torch.float64, CUDA, False),    # not measured
    (torch.float32, torch.device("cpu"), False),   # CPU: never timed
    (torch.bfloat16, torch.device("cpu"), False),
    (torch.float32, torch.device("meta"), False),
])
def test_auto_rule_is_float32_on_cuda_only(dtype, device, expected) -> None:
    assert _auto_channels_last(dtype, device) is expected


# ------------------------------------------------------------- resolution from a model
def test_none_resolves_to_nchw_for_a_float32_cpu_model() -> None:
    assert _resolve_channels_last(tiny_net(), None, "cpu") is False


def test_none_resolves_to_nchw_for_a_bfloat16_model() -> None:
    assert _resolve_channels_last(tiny_net().to(torch.bfloat16), None, "cpu") is False
    assert _resolve_channels_last(fake_cuda_linear(torch.bfloat16), None, CUDA) is False


def test_none_resolves_to_channels_last_for_a_float32_cuda_model() -> None:
    m = fake_cuda_linear(torch.float32)
    assert (m.weight.device.type, m.weight.dtype) == ("cuda", torch.float32)
    assert _layout_probe(m, torch.device("cpu")) == (torch.float32, m.weight.device)
    # the parameters decide, not the device the caller names for the inputs
    assert _resolve_channels_last(m, None, "cpu") is True


def test_none_resolves_to_nchw_for_a_model_on_the_meta_device() -> None:
    m = nn.Linear(2, 2, device="meta")
    assert _resolve_channels_last(m, None, CUDA) is False


def test_the_first_floating_point_parameter_decides() -> None:
    """An integer parameter (a lookup table, say) says nothing about the activations: the
    first floating-point one does."""
    m = fake_cuda_linear(torch.float32)
    holder = nn.Module()
    holder.table = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    holder.layer = m
    assert next(holder.parameters()).dtype == torch.long
    assert _resolve_channels_last(holder, None, "cpu") is True


def test_a_model_without_parameters_follows_the_input_device() -> None:
    """No floating-point parameter: the inputs' device and the default dtype decide."""
    assert _layout_probe(nn.Identity(), CUDA) == (torch.get_default_dtype(), CUDA)
    assert _resolve_channels_last(nn.Identity(), None, CUDA) is True
    assert _resolve_channels_last(nn.Identity(), None, "cpu") is False


@pytest.mark.parametrize("explicit", [True, False])
def test_explicit_values_are_kept_whatever_the_model(explicit: bool) -> None:
    for m in (tiny_net(), tiny_net().to(torch.bfloat16), fake_cuda_linear(torch.float32)):
        assert _resolve_channels_last(m, explicit, "cpu") is explicit


@pytest.mark.parametrize("bad", ["yes", 1, 0, 1.0, "auto"])
def test_non_bool_non_none_is_a_type_error(bad) -> None:
    with pytest.raises(TypeError, match="channels_last must be True or False, or None"):
        _resolve_channels_last(tiny_net(), bad, "cpu")
    with pytest.raises(TypeError, match="channels_last must be True or False, or None"):
        calibrate(tiny_net().eval(), tiny_batches(), progress=False, channels_last=bad)


# --------------------------------------------------------------------- end to end (CPU)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_auto_on_cpu_calibrates_exactly_as_nchw(backend: str, monkeypatch) -> None:
    """On CPU ``channels_last=None`` resolves to ``False``: the same NCHW activations reach
    the same accumulators in the same order, so the statistics are bit-identical
    (``torch.equal``, no tolerance), and the conv activation is seen channel-major."""
    from cobkern.ops.covariance import CovarianceAccumulator

    m, data = tiny_net().eval(), tiny_batches()
    with use_backend(backend):
        nchw = calibrate(m, data, progress=False, channels_last=False)
        layouts: list[bool] = []
        original = CovarianceAccumulator.update

        def spy(self, x):
            if x.dim() == 4:
                layouts.append(x.is_contiguous())
            return original(self, x)

        monkeypatch.setattr(CovarianceAccumulator, "update", spy)
        auto = calibrate(m, data, progress=False)  # the default: None
        assert layouts and all(layouts), layouts
    assert auto.num_images == nchw.num_images and auto.meta == nchw.meta
    assert list(auto.layers) == list(nchw.layers) == ["0", "4"]
    for name in nchw.layers:
        a, b = nchw[name], auto[name]
        assert (a.count, a.accumulation) == (b.count, b.accumulation)
        for x, y in zip((a.gram_u, a.gram_v, a.sum_abs, a.sum_sq),
                        (b.gram_u, b.gram_v, b.sum_abs, b.sum_sq), strict=True):
            assert torch.equal(x, y), name


def test_calibrate_default_is_auto() -> None:
    import inspect

    assert inspect.signature(calibrate).parameters["channels_last"].default is None


def test_gpu_diag_per_batch_timing_reads_every_batch_once(monkeypatch) -> None:
    """``bench/gpu_diag.py``'s per-batch timing of a calibration (eager against CUDA graphs
    on a lease) hands the loader's batches through a timing generator: one duration per
    batch, and the statistics are those of the plain call (no batch dropped or repeated)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import gpu_diag

    monkeypatch.setattr(gpu_diag, "DEVICE", "cpu")
    m, data = tiny_net().eval(), [x for x, _ in tiny_batches()]
    seen: list[int] = []

    def spy(model, loader, **kw):
        stats = calibrate(model, (seen.append(x.shape[0]) or x for x in loader), **kw)
        spy.stats = stats
        return stats

    times = gpu_diag._per_batch_s(spy, m, data, channels_last=False)
    assert len(times) == len(data) and all(t > 0 for t in times)
    assert seen == [x.shape[0] for x in data]
    ref = calibrate(m, data, max_samples=None, progress=False)
    for name in ref.layers:
        assert torch.equal(spy.stats[name].gram_u, ref[name].gram_u), name


def test_gpu_diag_per_batch_variants_restore_the_shipped_capture(monkeypatch) -> None:
    """The per-batch comparison swaps ``cobkern.cob.graphs.cuda_capture`` for the old
    context-manager capture in one variant: every variant is timed batch by batch, and the
    shipped capture is back afterwards — also when a run fails. (On CPU ``cuda_graphs`` is
    ignored, so the graphed variants calibrate eagerly here.)"""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import gpu_diag
    from cobkern.cob import graphs

    monkeypatch.setattr(gpu_diag, "DEVICE", "cpu")
    shipped = graphs.cuda_capture
    m, data = tiny_net().eval(), [x for x, _ in tiny_batches()]
    seen = []

    def spy(*a, **k):
        seen.append((k["cuda_graphs"], graphs.cuda_capture))
        return calibrate(*a, **k)

    out = gpu_diag._per_batch_variants(spy, m, data, graphs=True)
    assert set(out) == {f"fp32_ieee-nhwc{s}_per_batch_s"
                        for s in ("", "-graphs", "-graphs-context")}
    assert all(len(v) == len(data) for v in out.values())
    assert [g for g, _ in seen] == [False, False, True, True, True, True]
    assert seen[-1][1] is gpu_diag._context_capture and seen[2][1] is shipped
    assert graphs.cuda_capture is shipped
    assert list(gpu_diag._per_batch_variants(spy, m, data, graphs=False)) == [
        "fp32_ieee-nhwc_per_batch_s"]

    def broken(*_a, **_k):
        raise RuntimeError("a failing run")

    with pytest.raises(RuntimeError, match="a failing run"):
        gpu_diag._per_batch_variants(broken, m, data, graphs=True)
    assert graphs.cuda_capture is shipped


def test_gpu_diag_host_copy_cost_restores_the_host_copy(monkeypatch) -> None:
    """``bench/gpu_diag.py`` times calibration with the statistics' host copy replaced by
    device copies. It must put the real copy back, even when a run fails, and report both
    timings and their difference."""
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import gpu_diag

    cal_mod = importlib.import_module("cobkern.cob.calibrate")  # the module, not the function
    monkeypatch.setattr(gpu_diag, "DEVICE", "cpu")  # no CUDA synchronisation here

    to_cpu = cal_mod._to_cpu
    m, data = tiny_net().eval(), [x for x, _ in tiny_batches()]
    out = gpu_diag._host_copy_cost(calibrate, m, data, repeats=1)
    assert cal_mod._to_cpu is to_cpu
    assert out["fp32_ieee-nhwc_best_s"] > 0 and out["fp32_ieee-nhwc_stats_on_device_s"] > 0
    assert out["fp32_host_copy_s"] == pytest.approx(
        out["fp32_ieee-nhwc_best_s"] - out["fp32_ieee-nhwc_stats_on_device_s"])

    def broken(*_a, **_k):
        raise RuntimeError("a failing run")

    calls = iter([0])

    def fails_second(*a, **k):  # the shipped run passes; the patched one fails
        if next(calls, None) is None:
            broken()
        return calibrate(*a, **k)

    with pytest.raises(RuntimeError, match="a failing run"):
        gpu_diag._host_copy_cost(fails_second, m, data, repeats=1)
    assert cal_mod._to_cpu is to_cpu


def test_the_progress_bar_counts_to_the_images_the_loader_holds(monkeypatch) -> None:
    """The bar's total was max_samples (10,000 by default) whatever the loader held: a
    40-image loader showed 40/10000 and then a bar closed short. It is now what a pass
    yields where the loader says (a DeviceLoader, a DataLoader over a sized dataset),
    capped by max_samples."""
    import tqdm.auto

    from cobkern.data import DeviceLoader

    totals = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs.get("total"))
            super().__init__(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g)
    loader = DeviceLoader(images, torch.zeros(40, dtype=torch.long), 16, augment=False,
                          shuffle=False, drop_last=False)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), RMSNormTSRA(6, split=2),
                        nn.Conv2d(6, 4, 1))
    xs = torch.utils.data.TensorDataset(torch.randn(30, 3, 8, 8))
    with use_backend("reference"):
        calibrate(net, loader)
        calibrate(net, loader, max_samples=24)
        calibrate(net, torch.utils.data.DataLoader(xs, batch_size=8), max_samples=None)
    assert totals == [40, 24, 30]
