"""Importance, strategies, surgery and ``prune`` (``method.md`` §4.4–4.6, §5).

Tolerances: float32 forward passes of a model and of its rotated/pruned copy agree to
~1e-6 relative; we allow 1e-4 relative on the logits (max |Δ| / max |logit|). Parameter
counts are exact integers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pruning_tools import data, net, rel_err, saturated_net
from torch import nn

from cobkern.cob import calibrate, find_cob_layers, rotate_model
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA
from cobkern.ops import use_backend
from cobkern.pruning import (
    AbsoluteCount,
    EnergyBudget,
    ExactParameterTarget,
    FixedRatio,
    KeepSet,
    LayerScores,
    ParameterTarget,
    RankTolerance,
    RelativeThreshold,
    ZScore,
    apply_keep_sets,
    compute_importance,
    default_normalizer,
    make_strategy,
    parameter_target_ratio,
    prune,
)

LOGIT_RTOL = 1e-4


def scores(u, v, energy=True):
    u = torch.tensor(u, dtype=torch.float64)
    v = torch.tensor(v, dtype=torch.float64)
    return LayerScores("l", u.numel(), u, v, u**2 if energy else None, v**2 if energy else None,
                       "l2", energy)


# ------------------------------------------------------------------------- strategies
def test_fixed_ratio_pair_and_single():
    s = scores([5.0, 1.0, 3.0, 2.0], [0.5, 4.0, 0.1])
    k = FixedRatio((0.5, 0.4)).select(s)   # floor(0.5·4)=2 in U, floor(0.4·3)=1 in V
    assert k.u.tolist() == [0, 2] and k.v.tolist() == [0, 1]
    k = FixedRatio(0.5).select(s)          # whole layer: floor(0.5·7)=3 lowest of all 7
    assert k.u.tolist() == [0, 2, 3] and k.v.tolist() == [1]
    k = FixedRatio((0.99, 0.99)).select(s)  # at least one channel stays, the best one
    assert k.u.tolist() == [0] and k.v.tolist() == [1]
    assert FixedRatio(0.0).select(s).num_kept == 7


def test_parameter_target_map_and_counts_and_thresholds():
    assert parameter_target_ratio(0.75) == pytest.approx(0.5)
    assert ParameterTarget((0.75, 0.75)).values == pytest.approx((0.5, 0.5))
    s = scores([5.0, 1.0, 3.0, 2.0], [0.5, 4.0, 0.1])
    assert AbsoluteCount((1, 2)).select(s).u.tolist() == [0, 2, 3]
    assert AbsoluteCount((1, 2)).select(s).v.tolist() == [1]
    assert AbsoluteCount(10).select(s).num_kept == 2          # one per subspace remains
    # z-score over U: mean 2.75, std ~1.479 → z(1.0) ≈ -1.18 < -1
    assert ZScore((-1.0, -1.0)).select(s).u.tolist() == [0, 2, 3]
    assert RelativeThreshold((0.5, 0.5), "max").select(s).u.tolist() == [0, 2]
    assert RelativeThreshold((1.0, 1.0), "mean").select(s).u.tolist() == [0, 2]
    assert RelativeThreshold((1.0, 1.0), "median").select(s).v.tolist() == [0, 1]
    assert make_strategy("median", 1.0).select(s).num_kept == 4  # median of all 7 is 2.0
    # an even count: the median is the midpoint of the two middle scores (2.5 for U), not
    # the lower one (2.0), so 2.0 is below it and goes
    assert RelativeThreshold((1.0, 1.0), "median").select(s).u.tolist() == [0, 2]


def test_equal_scores_are_equal_for_the_z_score_and_the_mean():
    """Three 0.1s have a computed population std of 1.4e-17 (not 0) and a mean of
    0.1 + 1.4e-17: every z-score came out ±1 by rounding, and equal scores counted as below
    1.0 · mean — channels were cut where the rules (and the README) cut none."""
    for n in (3, 6, 7, 9, 11):
        s = scores([0.1] * n, [0.1] * n)
        assert ZScore((0.0, 0.0)).select(s).num_kept == 2 * n, n
        assert ZScore((5.0, 5.0)).select(s).num_kept == 2 * n, n
        assert ZScore(0.0).select(s).num_kept == 2 * n, n  # one value over the whole layer
        for ref in ("mean", "median", "max"):
            assert RelativeThreshold((1.0, 1.0), ref).select(s).num_kept == 2 * n, (n, ref)
    # unequal scores are still cut by the same rules
    s = scores([0.1, 0.1, 0.3], [0.2, 0.2, 0.2])
    assert ZScore((0.0, 0.0)).select(s).u.tolist() == [2]
    assert RelativeThreshold((1.0, 1.0), "mean").select(s).u.tolist() == [2]


def test_cob_prunes_a_layer_with_a_one_channel_subspace():
    """split = 1 (a one-channel U, as an earlier prune can leave it): the rotation's marker
    digested the 1x1 Gram's diagonal, a one-element view of stride 2, and
    ``view(torch.uint8)`` raised RuntimeError. The digest copies densely now."""
    from cobkern._digest import tensor_digest

    g = torch.eye(1, dtype=torch.float64).diagonal()
    assert g.stride() == (2,)
    assert tensor_digest([("g", g)]) == tensor_digest([("g", torch.ones(1, dtype=torch.float64))])
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), TSRA(6, split=1), nn.Linear(6, 3)).double().eval()
    x = torch.randn(32, 4, dtype=torch.float64)
    with use_backend("reference"):
        st = calibrate(m, [x], progress=False)
        _, report = prune(m, st, ("ratio", (0.0, 0.5)))
    assert report.total_after < report.total_before
    assert m[1].split == 1 and m[1].num_channels == 4  # U kept whole, V: 5 → 3


def test_energy_and_rank_tolerance():
    s = scores([4.0, 2.0, 1.0, 0.0], [3.0, 1e-9, 1.0])      # energies = squares
    # U energies 16, 4, 1, 0 (total 21): 16/21 < 0.8 ≤ 20/21 → keep 2 leading directions
    assert EnergyBudget((0.8, 0.5)).select(s).u.tolist() == [0, 1]
    assert EnergyBudget((0.8, 0.5)).select(s).v.tolist() == [0]
    assert EnergyBudget((1.0, 1.0)).select(s).u.tolist() == [0, 1, 2]  # zero energy goes
    assert RankTolerance().select(s).u.tolist() == [0, 1, 2]
    assert RankTolerance((1e-6, 1e-6)).select(s).v.tolist() == [0, 2]
    base = scores([1.0, 2.0], [3.0, 4.0], energy=False)
    with pytest.raises(ValueError, match="rotated basis"):
        EnergyBudget(0.9).select(base)


def test_rank_tolerance_default_follows_the_statistics_precision():
    """A direction at 1e-8 of the largest eigenvalue is real for float64 sums (kept at the
    1e-10 default) but below the float32 kernel's noise floor (cut at the 1e-7 default)."""
    s = scores([1.0, 1e-4, 1e-7], [1.0, 1e-4])  # energies 1, 1e-8, 1e-14 | 1, 1e-8
    assert RankTolerance().select(s).u.tolist() == [0, 1]
    s.accumulation = "float32"
    assert RankTolerance().select(s).u.tolist() == [0]
    assert RankTolerance().select(s).v.tolist() == [0]
    assert RankTolerance().describe()["value"] == "auto"
    # applied per subspace (above), and so described: prune.json said per_subspace false
    assert RankTolerance().describe()["per_subspace"] is True
    assert make_strategy("lossless", None).select(s).u.tolist() == [0]
    # per subspace: a weak V (energies 1e-12, 9e-14) is measured against its own largest
    # eigenvalue, not against U's 1 (which would cut it to a single direction)
    weak_v = scores([1.0, 1e-4], [1e-6, 3e-7])
    assert RankTolerance().select(weak_v).v.tolist() == [0, 1]
    assert RankTolerance(1e-10).select(weak_v).v.tolist() == [0]  # whole layer, on request


@pytest.mark.parametrize("bad", [
    lambda: FixedRatio(1.0), lambda: FixedRatio(-0.1), lambda: FixedRatio((0.5, 1.5)),
    lambda: FixedRatio((0.1, 0.2, 0.3)), lambda: make_strategy("nope", 0.5),
    lambda: AbsoluteCount(1.5), lambda: EnergyBudget(0.0), lambda: ParameterTarget(1.0),
    lambda: ExactParameterTarget((0.3, 0.5)), lambda: RelativeThreshold(0.1, "mode"),
    lambda: FixedRatio(float("nan")),
])
def test_bad_strategy_values(bad):
    with pytest.raises(ValueError):
        bad()


def test_strategy_values_accept_numpy_scalars():
    """Values from numpy (a sweep over ``np.linspace``, counts from ``np.arange``) are real
    numbers: they were refused as "expected a finite number" / "count must be a
    non-negative int" (np.int64, np.float32), as round_to already accepted them."""
    np = pytest.importorskip("numpy")
    s = LayerScores("x", 4, torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64),
                    torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), None, None, "l2",
                    False)
    for value, plain in [((np.float32(0.5), np.float64(0.25)), (0.5, 0.25)),
                         (np.float32(0.5), 0.5)]:
        a, b = FixedRatio(value), FixedRatio(plain)
        assert a.values == b.values and all(type(v) is float for v in a.values)
        assert torch.equal(a.select(s).indices(4), b.select(s).indices(4))
    c = AbsoluteCount((np.int64(2), np.int32(1)))
    assert c.values == (2, 1) and all(type(v) is int for v in c.values)
    assert c.select(s).u.tolist() == [0, 1] and c.select(s).v.tolist() == [1, 2, 3]
    for make in (ZScore, RelativeThreshold, EnergyBudget, RankTolerance,
                 ExactParameterTarget, ParameterTarget):
        assert make(np.float32(0.5)).values == make(0.5).values
    assert RelativeThreshold(np.int64(1)).values == (1,)
    assert ParameterTarget(np.float32(0.36)).describe()["target"] == pytest.approx(0.36)


@pytest.mark.parametrize("bad", [
    lambda: ParameterTarget(False), lambda: ParameterTarget("0.5"), lambda: ParameterTarget(None),
    lambda: ParameterTarget(float("nan")), lambda: ParameterTarget((0.5,)),
    lambda: AbsoluteCount(2.0), lambda: AbsoluteCount(True),
    lambda: ExactParameterTarget(0.3, 0), lambda: ExactParameterTarget(0.3, -1),
])
def test_bad_parameter_targets_counts_and_iterations(bad):
    """ParameterTarget checks its targets as the other strategies check their values
    (``False`` read as 0, and a str or None gave a bare TypeError from a comparison), and
    ExactParameterTarget refuses ``iterations < 1``, with which it skipped the bisection and
    pruned the most it could (95% of the parameters for a target of 0.3)."""
    with pytest.raises(ValueError):
        bad()


def test_parameter_target_errors_name_the_targets_given():
    with pytest.raises(ValueError, match=r"got \(0\.1, 0\.2, 0\.3\)"):
        ParameterTarget((0.1, 0.2, 0.3))
    with pytest.raises(TypeError, match="iterations"):
        ExactParameterTarget(0.3, 2.5)


# ------------------------------------------------------------------------- surgery
def _expected_params(c, fc_hidden=12, s=4):
    """Parameters of ``net`` with widths c = (c0, c1, c2)."""
    c0, c1, c2 = c
    return ((3 * 9 + 1) * c0 + (c0 * 9 + 1) * c1 + (c1 * s + 1) * c2 + (c2 + 1) * 4)


@pytest.mark.parametrize("fused", [True, False])
def test_surgery_equals_masking_and_counts_exact(fused):
    """Pruning = zeroing the pruned channels, when the RMSNorm keeps the original width.

    Zeroed channels add nothing to the norms TSRA/RMSNorm compute, nor to the consumer, so
    the two models must agree — a check of every index the surgery cuts (incl. Flatten).
    """
    torch.manual_seed(0)
    m = net(fused).eval()
    layers = find_cob_layers(m)
    keep = {layers[0].name: KeepSet(torch.tensor([0, 2, 3]), torch.tensor([1, 4])),
            layers[1].name: KeepSet(torch.tensor([1]), torch.tensor([0, 2, 4])),
            layers[2].name: KeepSet(torch.tensor([0, 1, 4]), torch.tensor([6]))}
    masked = net(fused).eval()
    masked.load_state_dict(m.state_dict())
    with torch.no_grad():
        for lay, mlay in zip(layers, find_cob_layers(masked), strict=True):
            idx = keep[lay.name].indices(lay.split)
            drop = torch.ones(lay.num_channels, dtype=torch.bool)
            drop[idx] = False
            mlay.producer.weight[drop] = 0
            mlay.producer.bias[drop] = 0
    x = torch.randn(5, 3, 8, 8)
    with use_backend("reference"):
        y_masked = masked(x)
        report = apply_keep_sets(m, layers, keep, normalizer="original")
        y = m(x)
    assert rel_err(y, y_masked) <= 1e-5
    assert report.total_before == _expected_params((10, 8, 12)) == sum(
        p.numel() for p in masked.parameters())
    assert report.total_after == _expected_params((5, 4, 4)) == sum(p.numel()
                                                                      for p in m.parameters())
    assert sum(r.params_after for r in report.modules) == report.total_after
    new = find_cob_layers(m)
    assert [(lay.num_channels, lay.split) for lay in new] == [(5, 3), (4, 1), (4, 3)]
    norm_mods = [mod for lay in new for _, mod in lay.tsra + lay.norms
                 if isinstance(mod, (RMSNorm, RMSNormTSRA))]
    assert [mod.norm_size for mod in norm_mods] == [10, 8]
    assert m[0].in_channels == 3 and m[-1].out_features == 4  # RGB in, logits out untouched
    assert report.fraction_pruned == pytest.approx(1 - 412 / 1456)  # hand count: see helper
    d = report.to_dict()
    assert d["total_after"] == report.total_after and len(d["layers"]) == 3


def test_surgery_rejects_empty_subspace_and_kept_normalizer():
    m = net().eval()
    layers = find_cob_layers(m)
    with pytest.raises(ValueError, match="empty"):
        apply_keep_sets(m, layers, {"0": KeepSet(torch.tensor([], dtype=torch.long),
                                                 torch.tensor([0]))})
    # a plain empty list (torch reads [] as float32) is the same empty subspace, not a
    # TypeError about float indices
    with pytest.raises(ValueError, match="leaves subspace U empty"):
        apply_keep_sets(m, layers, {"0": KeepSet([], [0])})
    with pytest.raises(ValueError, match="normalizer"):
        apply_keep_sets(m, layers, {}, normalizer="both")
    apply_keep_sets(m, layers, {"0": KeepSet(torch.tensor([0]), torch.tensor([0, 1]))})
    assert m[1].norm_size is None and m[1].num_channels == 3 and m[1].split == 1


# ------------------------------------------------------------------------- prune()
def test_lossless_saturation_keeps_function():
    """§5: Linear(512→4096, bias) → TSRA(4096) has ≤ 2·513 non-zero directions; lossless
    pruning keeps exactly those and the logits do not change."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(512, 4096), TSRA(4096), nn.Linear(4096, 10)).eval()
    xs = [torch.randn(512, 512) for _ in range(3)]  # 1536 samples > 1026
    x = torch.randn(64, 512)
    with use_backend("reference"):
        st = calibrate(m, xs, progress=False)
        y0 = m(x)
        m, report = prune(m, st, RankTolerance())  # default tolerance for float64 sums
        y1 = m(x)
    (lay,) = report.layers
    assert (lay.split_after, lay.channels_after - lay.split_after) == (513, 513)
    assert rel_err(y1, y0) <= LOGIT_RTOL
    assert report.total_after == (512 + 1) * 1026 + (1026 + 1) * 10
    assert report.total_before == (512 + 1) * 4096 + (4096 + 1) * 10


@pytest.mark.parametrize("cob", [True, False])
def test_prune_fixed_ratio_runs_and_counts(cob):
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
        m, report = prune(m, st, ("ratio", (0.5, 0.5)), cob=cob)
        out = m(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4)
    # floor(0.5·size) pruned per subspace: U/V = 5/5 → 3/3, 3/5 → 2/3, 5/7 → 3/4
    assert [(r.channels_after, r.split_after) for r in report.layers] == [(6, 3), (5, 2),
                                                                        (7, 3)]
    assert report.total_after == _expected_params((6, 5, 7))
    assert report.meta["cob"] is cob


def test_prune_with_mild_energy_budget_is_close_and_l2_scores_are_eigen():
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
        sc = compute_importance(st, "l2", cob=True)
        e = st["0"].eigh()
        torch.testing.assert_close(sc["0"].u ** 2, e.values_u)
        base = compute_importance(st, "l1", cob=False)
        torch.testing.assert_close(base["0"].u, st["0"].sum_abs[:5])


def test_prune_l1_rotated_needs_second_pass():
    torch.manual_seed(0)
    m = net().eval()
    xs = data()
    with use_backend("reference"):
        st = calibrate(m, xs, progress=False)
        with pytest.raises(ValueError, match="loader"):
            prune(copy.deepcopy(m), st, FixedRatio((0.5, 0.5)), importance="l1")
        ref = net().eval()
        ref.load_state_dict(m.state_dict())
        rotate_model(ref, st)
        st_rot = calibrate(ref, xs, progress=False, meta={"basis": "rotated"})
        m, report = prune(m, st, FixedRatio((0.5, 0.5)), importance="l1", loader=xs)
        sc = compute_importance(st_rot, "l1", cob=True)
    # the kept channels are those with the largest rotated-basis Σ|a|
    top_u = torch.sort(sc["0"].u, descending=True).indices[:3].sort().values
    top_v = torch.sort(sc["0"].v, descending=True).indices[:3].sort().values
    assert report.layers[0].split_after == 3
    torch.testing.assert_close(m[0].weight, ref[0].weight[torch.cat([top_u, 5 + top_v])])


def test_exact_parameter_target():
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
    for target in (0.3, 0.6):
        mm = net().eval()
        mm.load_state_dict(m.state_dict())
        strat = ExactParameterTarget((target, target))
        mm, report = prune(mm, st, strat)
        assert report.fraction_pruned >= target
        assert report.fraction_pruned == pytest.approx(strat.achieved)
        # the next-smaller attainable ratio would miss the target: the solver is tight
        lower = FixedRatio((math.nextafter(strat.ratio, 0.0),) * 2)
        mm2 = net().eval()
        mm2.load_state_dict(m.state_dict())
        with use_backend("reference"):
            _, r2 = prune(mm2, st, lower)
        assert r2.fraction_pruned < target or r2.total_after == report.total_after
    with pytest.raises(ValueError, match="at most"):
        prune(copy.deepcopy(m), st, ExactParameterTarget(0.999))


def test_prune_errors():
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
    with pytest.raises(ValueError, match="not CoB layers"):
        prune(net().eval(), st, FixedRatio(0.5), layers=["0", "9"])
    other = nn.Sequential(nn.Linear(4, 6), TSRA(6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="another"):
        prune(other, st, FixedRatio(0.5))
    with pytest.raises(ValueError, match="importance"):
        prune(net().eval(), st, FixedRatio(0.5), importance="l3")
    with pytest.raises(ValueError, match="unknown pruning strategy"):
        prune(net().eval(), st, ("magic", 0.5))


def test_prune_vgg_and_config_roundtrip():
    models = pytest.importorskip("cobkern.models")
    if not hasattr(models, "vgg16_tsra"):
        pytest.skip("cobkern.models.vgg16_tsra not available yet")
    torch.manual_seed(0)
    vgg = models.vgg16_tsra(width=1 / 16).eval()
    imgs = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    x = torch.randn(2, 3, 32, 32)
    with use_backend("reference"):
        st = calibrate(vgg, imgs, progress=False)
        vgg, report = prune(vgg, st, FixedRatio((0.5, 0.5)), normalizer="original")
        y = vgg(x)
    assert y.shape == (2, 10)
    assert report.total_after == sum(p.numel() for p in vgg.parameters())
    assert len(report.layers) == 15
    if hasattr(models, "model_config") and hasattr(models, "build_model"):
        rebuilt = models.build_model(models.model_config(vgg))
        rebuilt.load_state_dict(vgg.state_dict())
        with use_backend("reference"):
            assert rel_err(rebuilt.eval()(x), y) <= 1e-6


def test_a_failed_prune_leaves_the_model_as_it_was():
    """prune() rotates before it plans; when planning fails the rotation is undone, so a
    retry on the same model prunes in the right basis (and gives what a fresh model does)."""
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(ValueError, match="at most"):
            prune(m, st, ExactParameterTarget(0.999))
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
        with pytest.raises(ValueError, match="loader"):  # refused before any rotation
            prune(m, st, FixedRatio(0.5), importance="l1")
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
        fresh = net().eval()
        fresh.load_state_dict(before)
        m, _ = prune(m, st, FixedRatio((0.5, 0.5)))
        fresh, _ = prune(fresh, st, FixedRatio((0.5, 0.5)))
    for (k, v), w in zip(m.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_lossless_keeps_the_normaliser_by_default():
    """Lossless pruning drops zero-energy directions; with the kept width as RMSNorm's
    normaliser every activation would be rescaled by sqrt(kept / C), so its default is the
    original width. A conv from 3×3×3 inputs (+ bias) to 64 channels reaches at most
    2·(27 + 1) = 56 directions."""
    m, st, x, y0 = saturated_net(3)
    with use_backend("reference"):
        kept_model = copy.deepcopy(m)
        m, report = prune(m, st, RankTolerance())
        assert report.meta["normalizer"] == "original"
        assert report.layers[0].channels_after == 56
        assert rel_err(m(x), y0) <= LOGIT_RTOL
        kept_model, _ = prune(kept_model, st, RankTolerance(), normalizer="kept")
        assert rel_err(kept_model(x), y0) > 1e-3  # why the default differs
    assert default_normalizer(FixedRatio(0.5)) == "kept"



def test_surgery_keeps_a_channels_last_model_channels_last():
    """A pruned conv of a channels_last model must stay channels_last: otherwise every call
    re-lays out its weight (13 extra copies per VGG-16 forward)."""
    torch.manual_seed(0)
    plain = net().eval()
    m = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
        m, _ = prune(m, st, FixedRatio((0.5, 0.5)))
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                         and not c.weight.is_contiguous() for c in convs)
    plain, _ = prune(plain, st, FixedRatio((0.5, 0.5)))
    assert all(c.weight.is_contiguous() for c in plain.modules() if isinstance(c, nn.Conv2d))


@pytest.mark.parametrize("target, ratio", [(0.19, 0.1), (0.36, 0.2), (0.96, 0.8)])
def test_param_target_counts_exact_ratios_exactly(target, ratio):
    """1 − sqrt(1 − 0.19) is 0.09999999999999998 in binary floating point: a bare floor of
    p·size pruned one channel fewer than the rule (and than ``ratio`` 0.1) at 10 channels."""
    scores = torch.arange(10, dtype=torch.float64)
    for strategy in (ParameterTarget((target, target)), FixedRatio((ratio, ratio))):
        pruned = strategy._prune_mask(scores, None, strategy.values[0])
        assert int(pruned.sum()) == round(ratio * 10)


def test_ratio_floor_is_exact_at_decimal_boundaries_and_floors_otherwise():
    scores = torch.arange(100, dtype=torch.float64)
    mask = FixedRatio(0.29)._prune_mask  # 0.29 · 100 = 28.999999999999996 in floats
    assert int(mask(scores, None, 0.29).sum()) == 29
    assert int(mask(scores, None, 0.295).sum()) == 29  # a real fraction still floors
    assert int(mask(scores, None, 0.2899999).sum()) == 28
    assert int(mask(scores[:7], None, 0.5).sum()) == 3


# ------------------------------------------------------- mutation-testing gaps (issue: tests)
def test_cob_prune_keeps_the_leading_principal_directions():
    """The default path (cob=True, l2, original-basis statistics) must rank the rotated
    channels by their eigenvalues: with distinct eigenvalues sorted descending, a fixed
    ratio keeps the first rows of each subspace of the rotated producer. Layer '0' (U = V
    = 5, floor(0.5·5) = 2 pruned each) keeps rotated rows 0-2 and 5-7; the weights are the
    same float64-rotated values, copied, so they compare exactly (rtol 0)."""
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
        ref = copy.deepcopy(m)
        rotate_model(ref, st)
        m, report = prune(m, st, FixedRatio((0.5, 0.5)))
    e = st["0"].eigh()
    assert (e.values_u[:-1] > e.values_u[1:]).all() and (e.values_v[:-1] > e.values_v[1:]).all()
    torch.testing.assert_close(m[0].weight, ref[0].weight[[0, 1, 2, 5, 6, 7]], rtol=0, atol=0)
    torch.testing.assert_close(m[0].bias, ref[0].bias[[0, 1, 2, 5, 6, 7]], rtol=0, atol=0)
    assert report.layers[0].split_after == 3


def test_baseline_ranks_the_original_channels_by_their_own_norms():
    """cob=False (the TSRA baseline, §4.6): l2 scores are sqrt(Σa²) of the original channels
    (not the eigenvalues) and the pruned model keeps un-rotated rows of the original
    weights, those with the largest Σa² in each subspace. Exact copies: rtol 0."""
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
        sc = compute_importance(st, "l2", cob=False)["0"]
        orig = copy.deepcopy(m)
        m, _ = prune(m, st, FixedRatio((0.5, 0.5)), cob=False)
    sq = st["0"].sum_sq
    torch.testing.assert_close(sc.scores, sq.sqrt(), rtol=0, atol=0)
    assert sc.energy_u is None and not sc.rotated
    top_u = torch.sort(sq[:5], descending=True).indices[:3].sort().values
    top_v = 5 + torch.sort(sq[5:], descending=True).indices[:3].sort().values
    torch.testing.assert_close(m[0].weight, orig[0].weight[torch.cat([top_u, top_v])],
                               rtol=0, atol=0)


def test_exact_parameter_target_hits_an_attainable_fraction_exactly():
    """The achieved fraction is the smallest attainable one >= P: when P is itself attained
    by some ratio (here the fraction FixedRatio((0.5, 0.5)) prunes, computed from the same
    integer counts), the solver must land on it exactly, not on the next larger one."""
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
        _, r = prune(copy.deepcopy(m), st, FixedRatio((0.5, 0.5)))
        target = r.fraction_pruned
        strat = ExactParameterTarget((target, target))
        _, report = prune(copy.deepcopy(m), st, strat)
    assert strat.achieved == target
    assert report.total_after == r.total_after


def test_thresholds_are_strict_and_lossless_is_inclusive():
    """§4.5 / the strategy table: z-score *below* t prunes (a score exactly at t stays), and
    lossless drops λ <= tol·λ_max (an exact zero goes at tol 0). Scores 0 and 2 have mean 1
    and population std 1: z-scores exactly −1 and +1, no round-off."""
    s = scores([0.0, 2.0], [2.0, 0.0])
    assert ZScore((-1.0, -1.0)).select(s).u.tolist() == [0, 1]
    assert ZScore((-0.5, -0.5)).select(s).u.tolist() == [1]
    assert RankTolerance((0.0, 0.0)).select(s).v.tolist() == [0]  # energy 0 <= 0·4


def test_zscore_uses_the_population_std():
    """The z-score divides by the population std (the strategy's docstring): scores 0 and 2
    have std 1, so score 0 has z = −1 exactly and goes at t = −0.9; with the sample std
    (√2) its z would be −0.707 and it would stay. Exact in binary floating point, so the
    keep sets are compared exactly; the whole-layer (pooled) value too: 0, 2, 2, 0 have
    mean 1 and population std 1 (sample std 1.155, z = −0.866 > −0.9)."""
    s = scores([0.0, 2.0], [2.0, 0.0])
    assert ZScore((-0.9, -0.9)).select(s).u.tolist() == [1]
    assert ZScore((-0.9, -0.9)).select(s).v.tolist() == [0]
    k = ZScore(-0.9).select(s)
    assert k.u.tolist() == [1] and k.v.tolist() == [0]


def test_the_at_least_one_guard_keeps_the_best_channel():
    """When a rule would empty a subspace, the channel that stays is the best one: the
    highest score, or for the eigenvalue rules the highest energy (which can differ from the
    score order with l1 scores of a rotated second pass)."""
    s = scores([1.0, 5.0, 3.0, 2.0], [0.5, 4.0, 0.1])
    k = AbsoluteCount((4, 3)).select(s)
    assert k.u.tolist() == [1] and k.v.tolist() == [1]
    # pooled energy budget: the strong subspace's one direction holds 100/105 ≥ 0.5, so the
    # other one is emptied; its survivor is its highest-energy direction (index 0), not its
    # highest l1 score (index 1). Checked with the weak subspace as V, then as U.
    f64 = {"dtype": torch.float64}
    weak, weak_e = torch.tensor([1.0, 2.0], **f64), torch.tensor([4.0, 1.0], **f64)
    strong, strong_e = torch.tensor([10.0], **f64), torch.tensor([100.0], **f64)
    k = EnergyBudget(0.5).select(LayerScores("l", 1, strong, weak, strong_e, weak_e, "l1", True))
    assert k.u.tolist() == [0] and k.v.tolist() == [0]
    k = EnergyBudget(0.5).select(LayerScores("l", 2, weak, strong, weak_e, strong_e, "l1", True))
    assert k.u.tolist() == [0] and k.v.tolist() == [0]


def test_energy_budget_of_one_tolerates_round_off_in_the_sums():
    """e = 1 keeps every direction with energy and drops exact zeros. With (unsorted,
    second-pass) energies 0.1, 0.2, 0.3, 0 the cumulative sum in descending order ends at
    0.9999999999999998 of the total, two ulps short of 1: the 1e-12 slack must absorb that
    instead of keeping the zero-energy direction."""
    e = torch.tensor([0.1, 0.2, 0.3, 0.0], dtype=torch.float64)
    s = LayerScores("l", 4, e.sqrt(), e.sqrt(), e, e.clone(), "l2", True)
    k = EnergyBudget((1.0, 1.0)).select(s)
    assert k.u.tolist() == [0, 1, 2] and k.v.tolist() == [0, 1, 2]


def test_original_normaliser_is_the_first_width_across_repeated_prunes():
    """normalizer="original" keeps the pre-pruning width as RMSNorm's divisor; pruning in
    two steps must keep the *first* width (norm_size already set is left alone), so two
    steps give the same model as one step to the same channels. Same weights, same ops:
    the logits agree to float32 round-off (1e-6 relative)."""
    torch.manual_seed(0)
    m = net().eval()
    once = copy.deepcopy(m)
    x = torch.randn(3, 3, 8, 8)
    with use_backend("reference"):
        apply_keep_sets(m, find_cob_layers(m),
                        {"0": KeepSet(torch.tensor([0, 1, 3, 4]), torch.tensor([0, 2, 3, 4]))},
                        normalizer="original")
        apply_keep_sets(m, find_cob_layers(m),
                        {"0": KeepSet(torch.tensor([1, 2]), torch.tensor([0, 3]))},
                        normalizer="original")
        apply_keep_sets(once, find_cob_layers(once),
                        {"0": KeepSet(torch.tensor([1, 3]), torch.tensor([0, 4]))},
                        normalizer="original")
        assert m[1].norm_size == once[1].norm_size == 10
        assert rel_err(m(x), once(x)) <= 1e-6


def test_derived_rotated_statistics_are_refused_for_the_unrotated_model(tmp_path):
    """``CalibrationStats.rotated()`` carries no fingerprint of the rotated weights (it is
    derived, not measured), but remembers the un-rotated model's: with that model it is
    refused (it would rank the original channels by eigenvalue index), with the rotated
    model it is accepted — also after a save/load round trip."""
    from cobkern.cob import CalibrationStats

    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
    derived = st.rotated()
    derived.save(tmp_path / "rot.pt")
    for s in (derived, CalibrationStats.load(tmp_path / "rot.pt")):
        with pytest.raises(ValueError, match="rotated basis .* un-rotated ones"):
            prune(copy.deepcopy(m), s, FixedRatio((0.5, 0.5)))
        rotated = copy.deepcopy(m)
        rotate_model(rotated, st)
        _, rep = prune(rotated, s, FixedRatio((0.5, 0.5)))
        assert rep.total_after < rep.total_before


@pytest.mark.parametrize("attr,cut", [("sum_sq", slice(0, -1)), ("sum_abs", slice(0, -1)),
                                      ("gram_v", (slice(0, -1), slice(0, -1)))])
def test_statistics_of_the_wrong_shape_are_named(attr, cut):
    """A sum vector one entry short used to prune a channel at ratio 0 without a word."""
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
    setattr(st["0"], attr, getattr(st["0"], attr)[cut])
    with pytest.raises(ValueError, match=f"{attr} has shape .* the statistics are malformed"):
        prune(copy.deepcopy(m), st, FixedRatio((0.0, 0.0)), cob=False)


def test_a_keep_set_refused_by_surgery_leaves_the_model_unrotated():
    """A custom strategy whose plan empties a subspace is refused; the refusal used to come
    from the surgery, after the rotation, which was not undone: the model stayed rotated
    and a retry with the same statistics was refused as "taken with other weights"."""

    class EmptiesV(FixedRatio):
        def plan(self, scores, layers=None, model=None):
            keep = super().plan(scores, layers, model)
            keep["0"] = KeepSet(keep["0"].u, keep["0"].v[:0])
            return keep

    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(ValueError, match="empty"):
            prune(m, st, EmptiesV((0.5, 0.5)))
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
        prune(m, st, FixedRatio((0.5, 0.5)))  # the retry is not refused


def test_keep_sets_take_index_sequences_and_refuse_non_integers():
    """apply_keep_sets is public: lists and numpy arrays of indices work (they raised
    AttributeError: 'list' object has no attribute 'numel'); float indices were truncated
    (2.7 → 2) and a bool mask was read as indices — both are refused, the model unchanged."""
    np = pytest.importorskip("numpy")
    base = net().eval()
    ref = copy.deepcopy(base)
    apply_keep_sets(ref, find_cob_layers(ref), {"0": KeepSet(torch.tensor([0, 2]),
                                                             torch.tensor([1]))})
    for u, v in [([0, 2], [1]), (np.array([0, 2]), np.array([1])), ((0, 2), torch.tensor([1]))]:
        m = copy.deepcopy(base)
        report = apply_keep_sets(m, find_cob_layers(m), {"0": KeepSet(u, v)})
        assert report.layers[0].split_after == 2
        for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    for bad in [KeepSet(torch.tensor([0.0, 2.7]), torch.tensor([1])),
                KeepSet(torch.tensor([True, False]), torch.tensor([1])),
                KeepSet(["a"], [1])]:
        m = net().eval()
        with pytest.raises(TypeError, match="integer indices"):
            apply_keep_sets(m, find_cob_layers(m), {"0": bad})
        assert m[0].out_channels == 10


def test_pruning_under_inference_mode_leaves_a_trainable_model():
    """Pruned under torch.inference_mode() (as evaluation code often runs), the new
    Conv2d/Linear parameters were inference tensors: the pruned model could not be
    fine-tuned ("Inference tensors cannot be saved for backward")."""
    torch.manual_seed(0)
    m = net().eval()
    xs = data()
    with use_backend("reference"):
        st = calibrate(m, xs, progress=False)
        with torch.inference_mode():
            prune(m, st, FixedRatio((0.5, 0.5)))
        assert not any(p.is_inference() for p in m.parameters())
        m.train()(xs[0]).square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_surgery_keeps_the_modules_and_their_hooks():
    """The cut Conv2d/Linear stay the same module objects: their forward hooks (and the
    handles that remove them), and references held elsewhere, still apply. Surgery used to
    replace them with new modules, dropping every hook silently."""
    torch.manual_seed(0)
    m = net().eval()
    prod, cons = m[0], m[3]
    seen = []
    handle = prod.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[1]))
    cons.register_forward_pre_hook(lambda mod, inp: (inp[0] * 0.0,))  # a hook that matters
    x = data()[0]
    with use_backend("reference"):
        apply_keep_sets(m, find_cob_layers(m), {"0": KeepSet(torch.tensor([0, 2]),
                                                             torch.tensor([1, 3]))})
        y = m(x)
        assert m[0] is prod and m[3] is cons
        assert prod.weight.shape == (4, 3, 3, 3) and prod.out_channels == 4
        assert cons.weight.shape == (8, 4, 3, 3) and cons.in_channels == 4
        assert seen == [4]  # the producer's hook ran on the pruned output
        # the consumer's hook zeroed its input: what follows sees only the biases
        ref = m[4:](m[3].bias.view(1, -1, 1, 1).expand(x.shape[0], -1, 4, 4))
        assert torch.equal(y, ref)
        handle.remove()
        m(x)
    assert seen == [4]


def test_lossless_tolerance_is_relative_to_the_largest_eigenvalue_not_the_sum():
    """``"lossless"`` drops ``λ ≤ tol·λ_max`` (strategy.py's table, method.md §5), not
    ``λ ≤ tol·Σλ``: with several comparable eigenvalues the sum is several times the
    largest, and a sum-relative cut removes real directions. U energies 1, .81, .64, .25
    (sum 2.7): at tol 0.3 the max rule cuts only .25; a sum rule (cut below .81) would keep
    one. Exact float64 comparisons far from the thresholds: no tolerance needed."""
    s = scores([1.0, 0.9, 0.8, 0.5], [1.0, 0.95, 0.1])      # energies = squares
    k = RankTolerance((0.3, 0.3)).select(s)
    assert k.u.tolist() == [0, 1, 2]
    assert k.v.tolist() == [0, 1]                            # .01 ≤ .3 · 1 goes, .9025 stays
    assert RankTolerance(0.3).select(s).num_kept == 5       # pooled: λ_max = 1 over all 7


# ------------------------------------------------------------ target: tests/test_pruning.py


def test_energy_budget_cuts_a_subspace_without_energy_to_one_channel():
    """A subspace whose eigenvalues are all zero (a dead half: its activations were zero on
    every calibration sample) holds no energy, so no direction is needed to reach any
    budget: the rule prunes it all and the at-least-one guard leaves one channel (index 0 on
    the ties). Keeping every channel there would keep pure dead width. Exact: no tolerance."""
    s = scores([3.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0])
    k = EnergyBudget((0.9, 0.9)).select(s)
    assert k.u.tolist() == [0, 1]                            # 9, 1 of 10.25 reach 0.9
    assert k.v.tolist() == [0]
    assert EnergyBudget((1.0, 1.0)).select(s).v.tolist() == [0]


# --------------------------------------------------------------- target: tests/test_cob.py
