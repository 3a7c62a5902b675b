"""Torch-Pruning integration: cobkern's TSRA / RMSNorm modules as custom pruners."""

from __future__ import annotations

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning")

from cobkern.integrations.torch_pruning import (  # noqa: E402
    SubspaceGuard,
    TSRAPruner,
    TSRAPruningError,
    customized_pruners,
    prune_with_torch_pruning,
)
from cobkern.models import vgg16_relu, vgg16_tsra  # noqa: E402
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA  # noqa: E402


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _check_widths(model: nn.Module) -> None:
    """Every TSRA/RMSNorm width equals the preceding conv/linear output width."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m.out_channels
        elif isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, (TSRA, RMSNormTSRA, RMSNorm)):
            assert m.num_channels == last
            if not isinstance(m, RMSNorm):
                assert 1 <= m.split < m.num_channels


def _tiny_block(fused: bool) -> nn.Sequential:
    act = [RMSNormTSRA(8)] if fused else [RMSNorm(8), TSRA(8)]
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *act, nn.Conv2d(8, 4, 3, padding=1))


@pytest.mark.parametrize("fused", [True, False])
def test_split_counts_kept_channels_below_old_split(fused: bool) -> None:
    net = _tiny_block(fused).eval()
    dg = tp.DependencyGraph().build_dependency(net, torch.randn(1, 3, 8, 8),
                                               customized_pruners=customized_pruners())
    dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=[0, 1, 5]).prune()
    tsra = net[1] if fused else net[2]
    assert tsra.num_channels == 5 and tsra.split == 2  # kept U = {2, 3}, V = {4, 6, 7}
    assert net[-1].in_channels == 5
    _check_widths(net)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("fused", [True, False])
def test_pruning_dead_channels_is_exact_with_original_normalizer(fused: bool) -> None:
    net = _tiny_block(fused).eval()
    dead = [1, 6]
    with torch.no_grad():
        net[0].weight[dead] = 0
        net[0].bias[dead] = 0
    x = torch.randn(4, 3, 8, 8)
    ref = net(x)
    dg = tp.DependencyGraph().build_dependency(
        net, x, customized_pruners=customized_pruners("original"))
    dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=dead).prune()
    norm = net[1]
    assert norm.num_channels == 6 and norm.norm_size == 8
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)


def test_kept_normalizer_leaves_norm_size_unset() -> None:
    net = _tiny_block(True).eval()
    dg = tp.DependencyGraph().build_dependency(net, torch.randn(1, 3, 8, 8),
                                               customized_pruners=customized_pruners("kept"))
    dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=[3]).prune()
    assert net[1].num_channels == 7 and net[1].norm_size is None


def test_bad_normalizer_rejected() -> None:
    with pytest.raises(ValueError, match="normalizer"):
        TSRAPruner("median")


def _skewed_block() -> nn.Sequential:
    """Conv whose U half has tiny weights, so magnitude ranks every U channel lowest."""
    net = _tiny_block(True).eval()
    with torch.no_grad():
        net[0].weight[:4] *= 1e-4
        net[0].bias[:4] *= 1e-4
        net[2].weight[:, :4] *= 1e-4
    return net


def test_unguarded_importance_would_empty_a_subspace() -> None:
    net = _skewed_block()
    pruner = tp.pruner.MetaPruner(
        net, torch.randn(1, 3, 8, 8), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5, ignored_layers=[net[2]], customized_pruners=customized_pruners())
    with pytest.raises(TSRAPruningError, match="at least one"):
        pruner.step()


@pytest.mark.parametrize("importance", ["l2", "l1", "l2-first", "random"])
def test_subspace_guard_keeps_both_subspaces(importance: str) -> None:
    from cobkern.integrations.torch_pruning import make_importance

    net = _skewed_block()
    pruner = tp.pruner.MetaPruner(
        net, torch.randn(1, 3, 8, 8), importance=SubspaceGuard(make_importance(importance)),
        pruning_ratio=0.75, ignored_layers=[net[2]], customized_pruners=customized_pruners())
    pruner.step()
    assert net[1].num_channels == 2 and net[1].split == 1
    assert net(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("normalizer", ["kept", "original"])
def test_prune_tsra_vgg_end_to_end(fused: bool, normalizer: str) -> None:
    model = vgg16_tsra(width=0.125, fused=fused).eval()
    n0 = _n_params(model)
    prune_with_torch_pruning(model, 0.5, normalizer=normalizer)
    _check_widths(model)
    n1 = _n_params(model)
    # Halving every width removes about 3/4 of the weights.
    assert 0.6 < 1 - n1 / n0 < 0.8
    assert model.classifier[-1].out_features == 10
    assert model.features[0].in_channels == 3
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    if normalizer == "original":
        norms = [m for m in model.modules() if isinstance(m, (RMSNorm, RMSNormTSRA))]
        assert all(m.norm_size == 2 * m.num_channels for m in norms)


def test_prune_relu_vgg() -> None:
    model = vgg16_relu(width=0.125).eval()
    n0 = _n_params(model)
    prune_with_torch_pruning(model, 0.5, importance="l1")
    assert 0.6 < 1 - _n_params(model) / n0 < 0.8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_ratio_too_high_is_rejected_before_any_change() -> None:
    model = vgg16_tsra(width=0.125).eval()
    n0 = _n_params(model)
    with pytest.raises(TSRAPruningError, match="at least 2"):
        prune_with_torch_pruning(model, 0.9)
    assert _n_params(model) == n0


# ---------------------------------------------------------------------------- mutation gaps
def _skewed_classifier(half: str) -> nn.Sequential:
    """A conv → RMSNormTSRA → conv → linear model whose U (or V) half has tiny weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RMSNormTSRA(8),
                        nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 10)).eval()
    tiny = slice(0, 4) if half == "u" else slice(4, 8)
    with torch.no_grad():
        net[0].weight[tiny] *= 1e-4
        net[0].bias[tiny] *= 1e-4
        net[2].weight[:, tiny] *= 1e-4
    return net


@pytest.mark.parametrize("half", ["u", "v"])
def test_prune_with_torch_pruning_guards_both_subspaces(half: str) -> None:
    """The one-call helper wraps its importance in SubspaceGuard, and the guard keeps a
    channel of V as well as of U: magnitude alone would empty the tiny half."""
    net = _skewed_classifier(half)
    prune_with_torch_pruning(net, 0.75)
    assert net[1].num_channels == 2 and net[1].split == 1
    assert net[-1].out_features == 10
    assert net(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_ratio_keeping_one_channel_is_rejected() -> None:
    """At channel_ratio 0.85 the 8-channel TSRA layers of a width-1/8 VGG would keep
    int(8 * 0.15) = 1 channel: fewer than the two TSRA needs, refused before any change."""
    model = vgg16_tsra(width=0.125).eval()
    n0 = _n_params(model)
    with pytest.raises(TSRAPruningError, match="keeps 1 of 8"):
        prune_with_torch_pruning(model, 0.85)
    assert _n_params(model) == n0


def test_original_normalizer_keeps_the_unpruned_width_over_repeated_prunes() -> None:
    net = _tiny_block(True).eval()
    dg = tp.DependencyGraph().build_dependency(
        net, torch.randn(1, 3, 8, 8), customized_pruners=customized_pruners("original"))
    dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=[3]).prune()
    dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=[0]).prune()
    assert net[1].num_channels == 6 and net[1].norm_size == 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_default_example_input_follows_the_model_dtype(dtype: torch.dtype) -> None:
    """Without example_inputs the tracing image is made in the model's dtype: a float32
    image failed to trace a float64 or bf16 model ("Input type (float) and bias type ...")."""
    model = vgg16_tsra(width=1 / 16).to(dtype).eval()
    prune_with_torch_pruning(model, 0.25)
    _check_widths(model)
    assert model(torch.randn(2, 3, 32, 32, dtype=dtype)).shape == (2, 10)


def test_failed_trace_restores_training_mode() -> None:
    """The helper puts the model in eval mode to trace it; a failure there (here a wrong
    example input) must not leave a model that was training in eval mode."""
    model = vgg16_tsra(width=1 / 16).train()
    with pytest.raises(RuntimeError):
        prune_with_torch_pruning(model, 0.25, example_inputs=torch.randn(1, 3, 32, 32,
                                                                          dtype=torch.float64))
    assert model.training and all(m.training for m in model.modules())
