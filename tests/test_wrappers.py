"""Compiled and (Distributed)DataParallel models: CoB names layers as on the plain model.

``torch.compile`` wraps a model in an ``OptimizedModule`` that holds it as ``_orig_mod``, and
DataParallel / DDP hold it as ``module``; names taken through the wrapper get a prefix. Layer
discovery, calibration statistics and pruning surgery look through both, so statistics
computed through a wrapped model apply to the plain one and the other way round. The
compiled models here use ``backend="eager"``: the wrapper is the same ``OptimizedModule``,
without inductor's compile time (the function is not what is tested).
"""

from __future__ import annotations

import copy

import pytest
import torch
from cob_tools import tiny_net
from torch import nn

from cobkern._wrappers import get_submodule, named_modules, unwrap_model
from cobkern.cob import calibrate, find_cob_layers, leaf_modules, rotate_model
from cobkern.models import unwrap_model as public_unwrap_model
from cobkern.pruning import prune


def batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def compiled(m: nn.Module) -> nn.Module:
    return torch.compile(m, backend="eager")


def test_unwrap_strips_nested_wrappers_and_keeps_the_public_name() -> None:
    m = tiny_net()
    assert unwrap_model(compiled(nn.DataParallel(compiled(m)))) is m
    assert unwrap_model(m) is m
    assert public_unwrap_model is unwrap_model  # cobkern.models.unwrap_model is the same


def test_named_modules_and_get_submodule_look_through_wrappers() -> None:
    """A compiled part inside a plain container is named as if it were plain."""
    m = tiny_net()
    inner = m[0]
    m[0] = compiled(inner)
    wrapped = nn.DataParallel(m)
    names = dict(named_modules(wrapped))
    assert names["0"] is inner and names[""] is m
    assert not any("_orig_mod" in n or n.startswith("module") for n in names)
    assert get_submodule(wrapped, "0") is inner and get_submodule(wrapped, "") is m


def test_discovery_names_layers_as_on_the_plain_model() -> None:
    m = tiny_net()
    plain = find_cob_layers(m)
    for w in (compiled(m), nn.DataParallel(m), compiled(nn.DataParallel(m))):
        got = find_cob_layers(w)
        assert [lay.name for lay in got] == [lay.name for lay in plain] == ["0", "4"]
        assert all(a.producer is b.producer and a.consumer is b.consumer
                   for a, b in zip(got, plain, strict=True))
    assert [n for n, _ in leaf_modules(compiled(m))] == [n for n, _ in leaf_modules(m)]


@pytest.mark.parametrize("how", ["wrapped", "in_place"])
def test_a_compiled_model_that_already_ran_under_no_grad_is_calibrated(how) -> None:
    """Compile, evaluate, calibrate: the graph compiled by the eval / no_grad call does not
    guard on hooks added later (Dynamo skips module-hook guards), so calibrate's hooks never
    ran and it refused every layer as "never ran in the model's forward". The calibration
    pass now runs eagerly: the statistics equal the plain model's."""
    m, data = tiny_net(), batches()
    plain = calibrate(m, data, max_samples=None, progress=False)
    twin = copy.deepcopy(m).eval()
    if how == "wrapped":
        net = compiled(twin)
    else:
        twin.compile(backend="eager")
        net = twin
    with torch.no_grad():
        net(data[0])
    through = calibrate(net, data, max_samples=None, progress=False)
    for n in plain.layers:
        assert torch.equal(through[n].gram_u, plain[n].gram_u)
        assert torch.equal(through[n].gram_v, plain[n].gram_v)


def test_statistics_through_a_compiled_model_rotate_the_plain_one() -> None:
    """Calibrated through ``torch.compile``: the same statistics as the plain model's (the
    eager backend runs the same ops: bit-identical), and they rotate a plain copy without
    changing its function (float32, 1e-5 of the logits' scale: rotation round-off)."""
    m, data = tiny_net(), batches()
    through = calibrate(compiled(m), data, max_samples=None, progress=False)
    plain = calibrate(m, data, max_samples=None, progress=False)
    assert list(through.layers) == list(plain.layers) == ["0", "4"]
    for n in plain.layers:
        assert torch.equal(through[n].gram_u, plain[n].gram_u)
        assert torch.equal(through[n].gram_v, plain[n].gram_v)
    rotated = copy.deepcopy(m)
    rotate_model(rotated, through)
    x = torch.cat(data)
    with torch.no_grad():
        ref, out = m(x), rotated(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_pruning_a_compiled_model_cuts_the_model_inside() -> None:
    """``prune`` of the wrapper with the plain model's statistics: the wrapped model is cut
    (the same surgery as on a plain copy) and the wrapper runs the smaller model."""
    m, data = tiny_net(), batches()
    stats = calibrate(m, data, max_samples=None, progress=False)
    plain = copy.deepcopy(m)
    wrapper = compiled(m)
    _, rep = prune(wrapper, stats, ("ratio", 0.5))
    _, rep_plain = prune(plain, stats, ("ratio", 0.5))
    assert rep.total_after == rep_plain.total_after < rep.total_before
    assert m[0].out_channels == plain[0].out_channels < 6
    x = torch.cat(data)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), plain(x))


def test_calibrate_runs_the_model_inside_a_dataparallel_wrapper(monkeypatch) -> None:
    """DataParallel would run the hooks in one thread per GPU; calibration runs the plain
    model instead (the wrapper's forward is never called), with the plain statistics."""
    m, data = tiny_net(), batches()
    wrapper = nn.DataParallel(m)

    def refuse(*args, **kwargs):
        raise AssertionError("calibrate ran the DataParallel wrapper")

    monkeypatch.setattr(wrapper, "forward", refuse)
    through = calibrate(compiled(wrapper), data, max_samples=None, progress=False)
    plain = calibrate(m, data, max_samples=None, progress=False)
    for n in plain.layers:
        assert torch.equal(through[n].gram_u, plain[n].gram_u)


def test_pruning_refuses_a_ddp_module_before_touching_the_weights(tmp_path) -> None:
    """DDP's gradient sync is bound to the parameters surgery would replace: ``prune``
    refuses it up front (the weights are not rotated either), naming the way out."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        m, data = tiny_net(), batches()
        stats = calibrate(m, data, max_samples=None, progress=False)
        before = [p.detach().clone() for p in m.parameters()]
        ddp = nn.parallel.DistributedDataParallel(m)
        for model in (ddp, nn.Sequential(ddp)):
            with pytest.raises(ValueError, match=r"prune the module inside \(ddp.module\)"):
                prune(model, stats, ("ratio", 0.5))
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before, strict=True))
        prune(ddp.module, stats, ("ratio", 0.5))  # the way out
        assert m[0].out_channels < 6
    finally:
        dist.destroy_process_group()
