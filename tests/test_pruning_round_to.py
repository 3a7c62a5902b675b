"""``round_to``: every pruned subspace keeps a multiple of ``round_to`` channels.

The kept count of each subspace is rounded up (capped at the subspace's size) by adding back
the best pruned channels; ``round_to=1`` is today's behaviour. Tolerances as in
``tests/test_pruning.py``: logits of a model and its pruned copy agree to 1e-4 relative.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pruning_tools import data, net, rel_err, saturated_net

from cobkern.cob import calibrate, find_cob_layers
from cobkern.ops import use_backend
from cobkern.pruning import (
    STRATEGIES,
    AbsoluteCount,
    ExactParameterTarget,
    FixedRatio,
    LayerScores,
    ParameterTarget,
    RankTolerance,
    RelativeThreshold,
    compute_importance,
    count_params_after,
    make_strategy,
    prune,
)

LOGIT_RTOL = 1e-4


# ------------------------------------------------------------------------- helpers
def layer_scores(seed=0, nu=13, nv=10):
    """Random positive scores with ties and near-zero energies (for the lossless rule);
    energies are the squares (the l2 rotated case). Sizes 13 and 10: no multiple of 3/4/8."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(nu, generator=g, dtype=torch.float64) + 0.1
    v = torch.rand(nv, generator=g, dtype=torch.float64) + 0.1
    u[[2, 4, 7, 11]] = 0.2          # ties in U, among the lowest scores
    u[[0, 9]] = 1e-7                # energies 1e-14: below the lossless tolerance
    v[[3, 5]] = 1e-7
    v[[1, 6]] = 0.5                 # a tie in V
    return LayerScores("l", nu, u, v, u**2, v**2, "l2", True)


#: a valid pair and a valid single value per strategy name (param_exact works on a model)
VALUES = {
    "ratio": ((0.3, 0.6), 0.45),
    "param_target": ((0.5, 0.7), 0.6),
    "count": ((5, 7), 9),
    "zscore": ((0.0, 0.3), 0.1),
    "mean": ((1.0, 0.8), 1.0),
    "median": ((1.0, 1.1), 1.0),
    "max": ((0.5, 0.3), 0.4),
    "energy": ((0.8, 0.6), 0.7),
    "lossless": ((1e-10, 1e-10), None),
}


def _expected_round_up(keep0: list[int], rank: torch.Tensor, r: int) -> list[int]:
    """The unrounded keep set plus the best pruned channels up to a multiple of r (capped):
    best = last in ascending stable order of ``rank`` — written with plain Python lists."""
    n = rank.numel()
    want = min(n, -(-len(keep0) // r) * r)
    vals = rank.tolist()
    order = sorted(range(n), key=lambda i: (vals[i], i))  # ascending, ties by index
    pruned = [i for i in order if i not in keep0]
    added = pruned[len(pruned) - (want - len(keep0)):] if want > len(keep0) else []
    return sorted(keep0 + added)


# ------------------------------------------------------------------------- select()
def test_every_strategy_name_is_covered():
    assert set(VALUES) | {"param_exact"} == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(VALUES))
@pytest.mark.parametrize("single", [False, True], ids=["pair", "single"])
def test_kept_counts_are_rounded_up_with_the_best_pruned_channels(name, single):
    """For round_to 2, 3, 4, 8 and 16 (16 > both sizes: capped, nothing pruned), each
    subspace keeps min(size, ceil(k0 / r)·r) channels, k0 the unrounded count: a superset of
    the unrounded keep set, the added ones the highest-ranked pruned channels (ties: higher
    index first, the reverse of the order _lowest prunes in)."""
    value = VALUES[name][1 if single else 0]
    needs_energy = STRATEGIES[name](value).needs_energy
    rounded_any = False
    for seed in range(3):
        s = layer_scores(seed)
        k0 = make_strategy(name, value).select(s)
        for r in (2, 3, 4, 8, 16):
            k = make_strategy(name, value, round_to=r).select(s)
            for sub, idx, idx0, sc, en in (("U", k.u, k0.u, s.u, s.energy_u),
                                           ("V", k.v, k0.v, s.v, s.energy_v)):
                size = sc.numel()
                n = idx.numel()
                assert n == min(size, math.ceil(idx0.numel() / r) * r), (sub, r)
                assert n % r == 0 or n == size, (sub, r, n)
                assert set(idx0.tolist()) <= set(idx.tolist())
                assert idx.tolist() == sorted(set(idx.tolist()))
                rank = en if needs_energy else sc
                assert idx.tolist() == _expected_round_up(idx0.tolist(), rank, r), (sub, r)
                rounded_any |= n > idx0.numel() and n < size
            if single:  # pooled: the layer's width is aligned too (where nothing is capped)
                if k.u.numel() < s.u.numel() and k.v.numel() < s.v.numel():
                    assert k.num_kept % r == 0
    assert rounded_any  # the rule left counts to round, so the checks above bit


def test_round_to_one_is_todays_behaviour():
    """round_to=1: the keep sets, repr and describe() of every strategy are those without
    the argument, and the hand-checked keep sets of tests/test_pruning.py still hold."""
    for seed in range(2):
        s = layer_scores(seed)
        for name, (pair, single) in VALUES.items():
            for value in (pair, single):
                a = make_strategy(name, value).select(s)
                b = make_strategy(name, value, round_to=1).select(s)
                assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v), name
                assert repr(make_strategy(name, value, round_to=1)) == repr(
                    make_strategy(name, value))
                assert "round_to" not in make_strategy(name, value, round_to=1).describe()
    u = torch.tensor([5.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    v = torch.tensor([0.5, 4.0, 0.1], dtype=torch.float64)
    s = LayerScores("l", 4, u, v, u**2, v**2, "l2", True)
    k = FixedRatio((0.5, 0.4), round_to=1).select(s)
    assert k.u.tolist() == [0, 2] and k.v.tolist() == [0, 1]
    k = FixedRatio(0.5, round_to=1).select(s)
    assert k.u.tolist() == [0, 2, 3] and k.v.tolist() == [1]
    k = FixedRatio((0.99, 0.99), round_to=1).select(s)
    assert k.u.tolist() == [0] and k.v.tolist() == [1]
    assert repr(FixedRatio((0.5, 0.5))) == "FixedRatio((0.5, 0.5))"


def test_rounded_fixed_ratio_is_the_ratio_that_prunes_fewer():
    """Adding back in the ranking's order: a rounded FixedRatio keep set is exactly the one
    that prunes size − rounded count lowest channels (same tie order), per subspace."""
    s = layer_scores(1)
    for p in (0.2, 0.5, 0.8, 0.95):
        for r in (2, 3, 4):
            k = FixedRatio((p, p), round_to=r).select(s)
            n_u, n_v = k.u.numel(), k.v.numel()
            ref = AbsoluteCount((s.u.numel() - n_u, s.v.numel() - n_v)).select(s)
            assert torch.equal(k.u, ref.u) and torch.equal(k.v, ref.v), (p, r)


def test_the_guard_then_rounding_keeps_the_best_channels():
    """A rule that empties a subspace: one channel (the best) stays, then round_to brings
    the next best back — the top round_to channels; capped at the subspace's size."""
    u = torch.tensor([1.0, 5.0, 3.0, 2.0, 4.0], dtype=torch.float64)
    v = torch.tensor([0.5, 4.0, 0.1], dtype=torch.float64)
    s = LayerScores("l", 5, u, v, u**2, v**2, "l2", True)
    k = AbsoluteCount((5, 3), round_to=2).select(s)
    assert k.u.tolist() == [1, 4] and k.v.tolist() == [0, 1]
    k = AbsoluteCount((5, 3), round_to=4).select(s)
    assert k.u.tolist() == [1, 2, 3, 4] and k.v.tolist() == [0, 1, 2]


def test_eigenvalue_rules_add_back_by_eigenvalue():
    """With l1 scores of a rotated second pass, scores and eigenvalues can disagree; the
    eigenvalue rules (energy, lossless) rank by eigenvalue, and so does their rounding."""
    f64 = {"dtype": torch.float64}
    sc = torch.tensor([1.0, 2.0, 3.0, 4.0], **f64)        # l1: index 3 looks best
    en = torch.tensor([100.0, 0.0, 2.0, 1.0], **f64)      # eigenvalues: index 2 is next
    s = LayerScores("l", 4, sc, sc.clone(), en, en.clone(), "l1", True)
    k = RankTolerance((0.5, 0.5), round_to=2).select(s)   # the rule keeps only index 0
    assert k.u.tolist() == [0, 2]
    assert make_strategy("energy", (0.5, 0.5), round_to=2).select(s).v.tolist() == [0, 2]


# ------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-8, ValueError), (2.0, TypeError),
                                      ("8", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_round_to_raises(bad, exc):
    match = rf"round_to.*{bad!r}".replace("(", r"\(").replace(")", r"\)")
    for build in (lambda: FixedRatio(0.5, round_to=bad),
                  lambda: ParameterTarget((0.5, 0.5), round_to=bad),
                  lambda: ExactParameterTarget(0.5, round_to=bad),
                  lambda: RelativeThreshold(0.5, "mean", round_to=bad),
                  lambda: RankTolerance(round_to=bad),
                  lambda: make_strategy("count", 3, round_to=bad),
                  lambda: make_strategy("median", 1.0, round_to=bad),
                  lambda: prune(net(), None, ("ratio", 0.5), round_to=bad)):
        with pytest.raises(exc, match=match):
            build()


def test_round_to_accepts_numpy_ints():
    np = pytest.importorskip("numpy")
    assert FixedRatio(0.5, round_to=np.int64(8)).round_to == 8
    assert type(FixedRatio(0.5, round_to=np.int64(8)).round_to) is int


def test_repr_and_describe_name_round_to_only_when_not_one():
    assert repr(FixedRatio((0.5, 0.5), round_to=8)) == "FixedRatio((0.5, 0.5), round_to=8)"
    assert repr(ParameterTarget(0.5, round_to=8)) == "ParameterTarget(0.5, round_to=8)"
    assert repr(make_strategy("max", 0.5, round_to=4)) == \
        "RelativeThreshold(0.5, ref='max', round_to=4)"
    assert repr(RankTolerance(round_to=8)) == "RankTolerance(auto, round_to=8)"
    assert repr(RankTolerance()) == "RankTolerance(auto)"
    for name, (pair, _) in VALUES.items():
        assert make_strategy(name, pair, round_to=8).describe()["round_to"] == 8, name
        assert make_strategy(name, pair, round_to=8).round_to == 8
    ex = make_strategy("param_exact", (0.3, 0.3), round_to=8)
    assert isinstance(ex, ExactParameterTarget) and ex.describe()["round_to"] == 8
    assert "round_to" not in FixedRatio(0.5).describe()


# ------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    m = net().eval()
    with use_backend("reference"):
        st = calibrate(m, data(), progress=False)
    return m, st


def _achievable(model, layers, scores, r, single):
    """Every fraction a FixedRatio with round_to=r prunes: the count only changes where some
    floor(p·n) does, at p = k/n for the sizes n it is taken of (subspaces, or whole layers
    for a single value)."""
    total = sum(p.numel() for p in model.parameters())
    sizes = {s.num_channels for s in scores.values()} if single else \
        {n for s in scores.values() for n in (s.u.numel(), s.v.numel())}
    ratios = sorted({0.0} | {k / n for n in sizes for k in range(1, n)})
    out = set()
    for p in ratios:
        keep = FixedRatio(p if single else (p, p), round_to=r).plan(scores)
        after = count_params_after(model, layers, {n: k.num_kept for n, k in keep.items()})
        out.add((total - after) / total)
    return sorted(out)


@pytest.mark.parametrize("single", [False, True], ids=["pair", "single"])
def test_exact_target_with_rounding_is_the_smallest_achievable(calibrated, single):
    """ExactParameterTarget(round_to=r) prunes the smallest fraction >= P that a rounded
    fixed ratio reaches (brute force over every step of the ratio); its kept counts are
    rounded; and rounding made the achievable set coarser (else this would test nothing)."""
    m, st = calibrated
    sc = compute_importance(st, "l2", cob=True)
    layers = find_cob_layers(m)
    plain = _achievable(m, layers, sc, 1, single)
    coarser = False
    for r in (2, 3):
        fractions = _achievable(m, layers, sc, r, single)
        assert set(fractions) != set(plain)
        for target in (0.1, 0.3, 0.45, 0.6):
            ok = [f for f in fractions if f >= target]
            if not ok:
                continue
            strat = ExactParameterTarget(target if single else (target, target), round_to=r)
            keep = strat.plan(sc, layers, m)
            assert strat.achieved >= target
            assert strat.achieved == min(ok), (r, target)
            coarser |= strat.achieved != min(f for f in plain if f >= target)
            for lay in layers:
                for n, size in ((keep[lay.name].u.numel(), lay.split),
                                (keep[lay.name].v.numel(), lay.num_channels - lay.split)):
                    assert n % r == 0 or n == size
    assert coarser


def test_exact_target_with_rounding_through_prune(calibrated):
    """End to end: prune(("param_exact", ...), round_to=2) meets the target, records
    round_to and the achieved fraction, and every pruned subspace is even (or whole)."""
    m, st = calibrated
    with use_backend("reference"):
        pm, report = prune(copy.deepcopy(m), st, ("param_exact", (0.4, 0.4)), round_to=2)
        assert pm(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    assert report.fraction_pruned >= 0.4
    assert report.fraction_pruned == pytest.approx(report.meta["achieved"])
    assert report.meta["round_to"] == 2
    for lr in report.layers:
        for n, size in ((lr.split_after, lr.split_before),
                        (lr.channels_after - lr.split_after,
                         lr.channels_before - lr.split_before)):
            assert n % 2 == 0 or n == size
    with pytest.raises(ValueError, match="round_to=4"):  # the unreachable-target message
        prune(copy.deepcopy(m), st, ExactParameterTarget(0.99, round_to=4))
    with pytest.raises(ValueError, match="round_to"):    # two different round_to values
        prune(copy.deepcopy(m), st, FixedRatio(0.5, round_to=2), round_to=4)


def test_lossless_with_rounding_keeps_the_function():
    """A 2×2 conv from 3 channels (+ bias) reaches at most 13 directions per subspace of 32:
    lossless keeps 13 + 13; round_to=8 keeps 16 + 16, adding back zero-energy directions
    only, so the logits stay the same (and the model is still pruned, 64 → 32)."""
    m, st, x, y0 = saturated_net(2)
    with use_backend("reference"):
        _, plain = prune(copy.deepcopy(m), st, RankTolerance())
        m, report = prune(m, st, ("lossless", None), round_to=8)
        y = m(x)
    assert plain.layers[0].channels_after == 26 and plain.layers[0].split_after == 13
    assert report.layers[0].channels_after == 32 and report.layers[0].split_after == 16
    assert report.meta["normalizer"] == "original" and report.meta["round_to"] == 8
    assert rel_err(y, y0) <= LOGIT_RTOL


def test_vgg_widths_are_multiples_of_round_to():
    """vgg16_tsra(width=1/16) (subspaces of 2 to 128 channels) pruned at a parameter target
    with round_to=4: every subspace keeps a multiple of 4 or, where smaller, all of it; the
    pruned model still runs."""
    from cobkern.models import vgg16_tsra
    torch.manual_seed(0)
    vgg = vgg16_tsra(width=0.0625).eval()
    with use_backend("reference"):
        st = calibrate(vgg, [torch.randn(16, 3, 32, 32)], progress=False)
        before = [(lay.num_channels, lay.split) for lay in find_cob_layers(vgg)]
        vgg, report = prune(vgg, st, ("param_target", (0.75, 0.75)), round_to=4)
        assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    after = [(lay.num_channels, lay.split) for lay in find_cob_layers(vgg)]
    pruned_any = False
    for (c0, s0), (c, s) in zip(before, after, strict=True):
        for n, size in ((s, s0), (c - s, c0 - s0)):
            assert n % 4 == 0 or n == size, (before, after)
            pruned_any |= n < size
    assert pruned_any
