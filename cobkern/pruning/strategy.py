"""Pruning strategies: per-layer scores → keep sets (``method.md`` §4.5, §5).

Every strategy takes its value either as a **pair** ``(value_U, value_V)`` — applied
separately in U and in V (the paper's experiments) — or as a **single** value, which ranks
the whole layer's channels together (U and V pooled). Whatever the rule says, at least one
channel stays in each subspace (the highest-scoring one).

=====================  ======================  =============================================
name (make_strategy)   class                   prunes, per subspace (or whole layer)
=====================  ======================  =============================================
``"ratio"``            :class:`FixedRatio`     the ``floor(p·size)`` lowest scores, p ∈ [0,1)
``"param_target"``     :class:`ParameterTarget` fixed ratio ``p = 1 − sqrt(1 − P)``
``"param_exact"``      :class:`ExactParameterTarget`  the one ratio (bisection on the exact
                                               count) pruning the smallest achievable
                                               fraction ≥ P of all parameters
``"count"``            :class:`AbsoluteCount`  the ``n`` lowest scores
``"zscore"``           :class:`ZScore`         ``(s − mean)/std < t``
``"mean"``             :class:`RelativeThreshold`  ``s < t·mean``
``"median"``           :class:`RelativeThreshold`  ``s < t·median``
``"max"``              :class:`RelativeThreshold`  ``s < t·max``
``"energy"``           :class:`EnergyBudget`   all but the fewest leading directions whose
                                               eigenvalues hold a fraction ``e`` of the energy
``"lossless"``         :class:`RankTolerance`  directions with ``λ ≤ tol·λ_max`` (§5: removes
                                               saturated width without changing the function)
=====================  ======================  =============================================

``"energy"`` and ``"lossless"`` work on eigenvalues and so only in the rotated basis.

Every strategy also takes ``round_to`` (keyword, default 1: no rounding), as Torch-Pruning's
option of that name: tensor-core convolutions and GEMMs handle channel counts that are not
multiples of 8 badly. After the rule (and the at-least-one guard) has decided, the number kept
in **each subspace** is rounded up to the next multiple of ``round_to``, capped at the
subspace's size, by adding back the best pruned channels (highest score, or eigenvalue for
the eigenvalue rules; ties in the order :func:`_lowest` ranks). This holds for a single
(pooled) value too, so a layer's width stays a multiple of ``round_to`` wherever no subspace
is capped. Rounding only ever keeps more than the rule asked, so ``"lossless"`` stays
lossless; ``"param_exact"`` solves for its target with the rounding included.

Interface: ``strategy.plan(scores, layers=None, model=None) -> {name: KeepSet}`` (the exact
parameter solver needs ``layers`` and ``model``; the others decide per layer with
``strategy.select(layer_scores)``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from cobkern.cob.discovery import CoBLayer

from .importance import LayerScores
from .surgery import KeepSet, count_params_after

__all__ = [
    "Strategy",
    "FixedRatio",
    "ParameterTarget",
    "ExactParameterTarget",
    "AbsoluteCount",
    "ZScore",
    "RelativeThreshold",
    "EnergyBudget",
    "RankTolerance",
    "DEFAULT_RANK_TOL",
    "make_strategy",
    "as_strategy",
    "parameter_target_ratio",
    "STRATEGIES",
]

Value = float | int | tuple[float, float] | list[float]


def parameter_target_ratio(P: float) -> float:
    """The authors' per-layer ratio for a parameter target: ``p = 1 − sqrt(1 − P)``.

    A weight matrix that loses a fraction ``p`` of its rows and of its columns keeps
    ``(1 − p)²`` of its entries, hence ``p`` for a target ``P`` of pruned parameters.
    """
    if not 0.0 <= P < 1.0:
        raise ValueError(f"parameter target P must be in [0, 1), got {P!r}")
    return 1.0 - math.sqrt(1.0 - P)


def _ratio_count(p: float, n: int) -> int:
    """``floor(p·n)``, exact where ``p·n`` is a whole number up to float round-off.

    ``p`` is a binary float: ``0.29 · 100`` evaluates to ``28.999999999999996`` and
    ``parameter_target_ratio(0.19)`` to ``0.09999999999999998`` instead of ``0.1``, and a
    plain floor would prune one channel fewer than the rule says. A product within a few
    ulps of an integer (relative ``1e-12``, far above float64 round-off of one product,
    far below one channel's ``1/n``) counts as that integer.
    """
    x = p * n
    k = round(x)
    return k if abs(x - k) <= 1e-12 * max(1.0, abs(x)) else math.floor(x)


def _check_positive_int(v: Any, name: str, owner: str) -> int:
    """``v`` as an int; ``TypeError`` unless an integer (numpy ones too; bool is not one
    here), ``ValueError`` unless ``>= 1``. ``name`` is the argument, ``owner`` its user."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be a positive int, got {v!r} "
                        f"({type(v).__name__})")
    if v < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
    return int(v)


def _check_round_to(round_to: Any, owner: str = "round_to") -> int:
    """``round_to`` as an int (:func:`_check_positive_int`)."""
    return _check_positive_int(round_to, "round_to", owner)


def _as_number(v: Any, integral: bool = False) -> Any:
    """``v`` as a plain ``int`` (an integer) or ``float`` (another real number) if it is a
    real number — numpy scalars included (``np.int64(2)``, ``np.float32(0.5)``), a bool
    not — and, with ``integral``, an integer; else ``v`` unchanged, for the caller's check
    to refuse."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral if integral else numbers.Real):
        return v
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` lowest scores (ties: lower index first)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, stable=True).indices
        mask[order[:k]] = True
    return mask


class Strategy:
    """Base class. Subclasses implement :meth:`_prune_mask` on one group of channels."""

    #: Whether the rule needs eigenvalues (rotated basis only).
    needs_energy = False

    def __init__(self, value: Value, *, round_to: int = 1) -> None:
        self.round_to = _check_round_to(round_to, type(self).__name__)
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError(f"{type(self).__name__}: a pair needs exactly two values "
                                 f"(U, V), got {value!r}")
            self.values: tuple[Any, ...] = (value[0], value[1])
            self.per_subspace = True
        else:
            self.values = (value,)
            self.per_subspace = False
        self.values = tuple(self._coerce(v) for v in self.values)
        for v in self.values:
            self._check_value(v)

    def _coerce(self, v: Any) -> Any:
        """A real number (numpy scalars included) as a plain ``float``; anything else as
        it is, for :meth:`_check_value` to refuse."""
        return _as_number(v)

    def _check_value(self, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{type(self).__name__}: expected a finite number, got {v!r}")

    def _prune_mask(self, scores: Tensor, energy: Tensor | None, value: Any) -> Tensor:
        """Boolean ``(n,)`` mask of the channels to prune in one group."""
        raise NotImplementedError

    def _repr_round_to(self) -> str:
        """``", round_to=N"`` for :meth:`__repr__`, empty when ``round_to == 1``."""
        return "" if self.round_to == 1 else f", round_to={self.round_to}"

    def __repr__(self) -> str:
        v = self.values if self.per_subspace else self.values[0]
        return f"{type(self).__name__}({v!r}{self._repr_round_to()})"

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (for reports); ``round_to`` only when it is not 1."""
        d = {"strategy": type(self).__name__, "value": list(self.values)
             if self.per_subspace else self.values[0], "per_subspace": self.per_subspace}
        if self.round_to != 1:
            d["round_to"] = self.round_to
        return d

    # ------------------------------------------------------------------ selection
    def select(self, s: LayerScores) -> KeepSet:
        """Keep set of one layer: the rule's, then at least one channel per subspace, then
        each subspace's kept count rounded up to a multiple of ``round_to`` (capped at the
        subspace's size) with its best pruned channels — pair or single value alike."""
        if self.needs_energy and (s.energy_u is None or s.energy_v is None):
            raise ValueError(f"{type(self).__name__} ranks principal directions by eigenvalue: "
                             "it is only meaningful in the rotated basis (cob=True)")
        su = s.split
        if self.per_subspace:
            pu = self._prune_mask(s.u, s.energy_u, self.values[0])
            pv = self._prune_mask(s.v, s.energy_v, self.values[1])
        else:
            energy = None if s.energy_u is None else torch.cat([s.energy_u, s.energy_v])
            p = self._prune_mask(s.scores, energy, self.values[0])
            pu, pv = p[:su], p[su:]
        ru = s.energy_u if self.needs_energy else s.u
        rv = s.energy_v if self.needs_energy else s.v
        return KeepSet(_keep_at_least_one(pu, ru, self.round_to),
                       _keep_at_least_one(pv, rv, self.round_to))

    def plan(self, scores: dict[str, LayerScores], layers: list[CoBLayer] | None = None,
             model: nn.Module | None = None) -> dict[str, KeepSet]:
        """Keep sets of every layer in ``scores``."""
        return {n: self.select(s) for n, s in scores.items()}


def _keep_at_least_one(pruned: Tensor, rank: Tensor, round_to: int = 1) -> Tensor:
    """Sorted kept indices of one subspace, from the rule's ``pruned`` mask.

    At least one channel stays (the highest ``rank``, first index on ties). Then the kept
    count is rounded up to the next multiple of ``round_to``, capped at the subspace's size,
    by adding back the pruned channels that rank highest: the last ones in the ascending
    stable order :func:`_lowest` prunes in (so on ties the higher index comes back first,
    and a :class:`FixedRatio` keep set rounded up to ``k`` is the one that prunes ``n − k``).
    ``round_to = 1`` changes nothing.
    """
    keep = ~pruned
    if not keep.any():
        keep[int(torch.argmax(rank))] = True
    if round_to > 1:
        n, k = keep.numel(), int(keep.sum())
        want = min(n, -(-k // round_to) * round_to)
        if want > k:
            order = torch.sort(rank, stable=True).indices  # worst → best
            back = order[~keep[order]]                      # the pruned ones, worst → best
            keep[back[back.numel() - (want - k):]] = True
    return keep.nonzero().flatten()


class FixedRatio(Strategy):
    """Prune ``floor(p·size)`` lowest-scoring channels; ``p ∈ [0, 1)``."""

    def _check_value(self, v: Any) -> None:
        super()._check_value(v)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{type(self).__name__}: ratio must be in [0, 1), got {v!r}")

    def _prune_mask(self, scores, energy, value):
        return _lowest(scores, _ratio_count(value, scores.numel()))


class ParameterTarget(FixedRatio):
    """The authors' map: prune a fixed ratio ``p = 1 − sqrt(1 − P)`` for a target ``P``."""

    def __init__(self, value: Value, *, round_to: int = 1) -> None:
        # check the targets themselves (as FixedRatio checks ratios), so that errors name
        # what was passed, not the converted ratios
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError(f"ParameterTarget: a pair needs exactly two values (U, V), "
                                 f"got {value!r}")
            targets: Value = tuple(self._target(v) for v in value)
            conv: Value = tuple(parameter_target_ratio(v) for v in targets)
        else:
            targets = self._target(value)
            conv = parameter_target_ratio(targets)
        self.targets = targets
        super().__init__(conv, round_to=round_to)

    @staticmethod
    def _target(v: Any) -> float:
        t = _as_number(v)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"ParameterTarget: expected a finite number, got {v!r}")
        if not 0.0 <= t < 1.0:
            raise ValueError(f"ParameterTarget: parameter target P must be in [0, 1), got {v!r}")
        return t

    def __repr__(self) -> str:
        return f"ParameterTarget({self.targets!r}{self._repr_round_to()})"

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["target"] = self.targets
        return d


class ExactParameterTarget(Strategy):
    """The fixed ratio (one ``p`` for every layer) that prunes a fraction ``P`` of all
    parameters of the model, found by bisection on the exact parameter count.

    A pair ``(P, P)`` ranks per subspace, a single ``P`` the whole layer; the two entries
    of a pair must be equal (the target is one number for the whole model). Because
    channel counts are integers the achieved fraction is the smallest one ``≥ P``
    (:attr:`achieved` after :meth:`plan`).

    With ``round_to`` the ratios it tries are :class:`FixedRatio` with that ``round_to``, so
    the count it solves on already includes the rounding: the achieved fraction is the
    smallest ``≥ P`` that a rounded fixed ratio reaches (a coarser set of fractions). The
    rounded kept counts are still non-increasing in the ratio, so the pruned fraction is
    still non-decreasing in it and the bisection still finds its first step ``≥ P``.
    """

    def __init__(self, value: Value, iterations: int = 60, *, round_to: int = 1) -> None:
        super().__init__(value, round_to=round_to)
        if self.per_subspace and self.values[0] != self.values[1]:
            raise ValueError("ExactParameterTarget: the target is one fraction for the whole "
                             f"model; a pair must repeat it (got {value!r})")
        # iterations < 1: no bisection step would return the largest ratio tried
        self.iterations = _check_positive_int(iterations, "iterations", "ExactParameterTarget")
        self.ratio: float | None = None
        self.achieved: float | None = None

    def _check_value(self, v: Any) -> None:
        super()._check_value(v)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"ExactParameterTarget: target must be in [0, 1), got {v!r}")

    def _ratio_strategy(self, p: float) -> FixedRatio:
        return FixedRatio((p, p) if self.per_subspace else p, round_to=self.round_to)

    def plan(self, scores, layers=None, model=None):
        if layers is None or model is None:
            raise ValueError("ExactParameterTarget.plan needs the model and its CoB layers")
        target = float(self.values[0])
        total = sum(p.numel() for p in model.parameters())
        lays = [lay for lay in layers if lay.name in scores]

        def fraction(p: float) -> tuple[float, dict[str, KeepSet]]:
            keep = self._ratio_strategy(p).plan(scores)
            after = count_params_after(model, lays, {n: k.num_kept for n, k in keep.items()})
            return (total - after) / total, keep

        lo, hi = 0.0, math.nextafter(1.0, 0.0)
        f_hi, keep_hi = fraction(hi)
        if f_hi < target:
            stays = ("one channel stays" if self.round_to == 1 else
                     f"min(round_to={self.round_to}, size) channels stay")
            raise ValueError(f"ExactParameterTarget: at most {f_hi:.4f} of the parameters can be "
                             f"pruned from these layers ({stays} per subspace), asked "
                             f"for {target}")
        f_lo, keep_lo = fraction(lo)
        if f_lo >= target:
            self.ratio, self.achieved = lo, f_lo
            return keep_lo
        for _ in range(self.iterations):
            mid = 0.5 * (lo + hi)
            f_mid, keep_mid = fraction(mid)
            if f_mid >= target:
                hi, f_hi, keep_hi = mid, f_mid, keep_mid
            else:
                lo = mid
        self.ratio, self.achieved = hi, f_hi
        return keep_hi

    def select(self, s):  # pragma: no cover - plan() is the entry point
        raise ValueError("ExactParameterTarget works on the whole model: call plan()")


class AbsoluteCount(Strategy):
    """Prune the ``n`` lowest-scoring channels (``n`` a non-negative int)."""

    def _coerce(self, v: Any) -> Any:
        return _as_number(v, integral=True)

    def _check_value(self, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"AbsoluteCount: count must be a non-negative int, got {v!r}")

    def _prune_mask(self, scores, energy, value):
        return _lowest(scores, min(value, scores.numel()))


class ZScore(Strategy):
    """Prune channels whose z-score ``(s − mean) / std`` is below ``t`` (population std;
    nothing is pruned when all scores are equal)."""

    def _prune_mask(self, scores, energy, value):
        # equal scores tested as such: their computed std is round-off (1.4e-17 for three
        # 0.1s), which made every z-score ±1 and cut channels by rounding
        if scores.numel() <= 1 or bool(scores.max() == scores.min()):
            return torch.zeros(scores.numel(), dtype=torch.bool)
        std = scores.std(unbiased=False)
        if std <= 0:
            return torch.zeros(scores.numel(), dtype=torch.bool)
        return (scores - scores.mean()) / std < value


class RelativeThreshold(Strategy):
    """Prune channels with score below ``t · ref``, ``ref`` the mean, median or max."""

    REFS = ("mean", "median", "max")

    def __init__(self, value: Value, ref: str = "max", *, round_to: int = 1) -> None:
        if ref not in self.REFS:
            raise ValueError(f"RelativeThreshold: ref must be one of {self.REFS}, got {ref!r}")
        self.ref = ref
        super().__init__(value, round_to=round_to)

    def _check_value(self, v: Any) -> None:
        super()._check_value(v)
        if v < 0:
            raise ValueError(f"RelativeThreshold: t must be >= 0, got {v!r}")

    def _prune_mask(self, scores, energy, value):
        # the median of an even count is the mean of the two middle scores (quantile 0.5);
        # torch's median() would return the lower one
        if scores.numel() and bool(scores.max() == scores.min()):
            ref = scores.max()  # every reference is the common value: exactly, not a mean
            # whose round-off (0.1 + 1.4e-17 for three 0.1s) put equal scores below it
        else:
            ref = {"mean": scores.mean, "median": lambda: scores.quantile(0.5),
                   "max": scores.max}[self.ref]()
        return scores < value * ref

    def __repr__(self) -> str:
        v = self.values if self.per_subspace else self.values[0]
        return f"RelativeThreshold({v!r}, ref={self.ref!r}{self._repr_round_to()})"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ref": self.ref}


class EnergyBudget(Strategy):
    """Keep the fewest leading principal directions whose eigenvalues hold at least a
    fraction ``e ∈ (0, 1]`` of the group's energy; prune the rest (rotated basis only)."""

    needs_energy = True

    def _check_value(self, v: Any) -> None:
        super()._check_value(v)
        if not 0.0 < v <= 1.0:
            raise ValueError(f"EnergyBudget: energy fraction must be in (0, 1], got {v!r}")

    def _prune_mask(self, scores, energy, value):
        e = energy.clamp_min(0.0)
        order = torch.sort(e, descending=True, stable=True).indices
        total = e.sum()
        pruned = torch.ones(e.numel(), dtype=torch.bool)
        if total <= 0:
            return pruned
        cum = torch.cumsum(e[order], 0) / total
        # fewest leading directions reaching the budget (small slack for round-off at e = 1)
        k = int((cum < value * (1 - 1e-12)).sum().item()) + 1
        pruned[order[: min(k, e.numel())]] = False
        return pruned


#: Default relative rank tolerance per precision of the statistics' sums: comfortably
#: above the eigenvalue noise floor of an unreachable direction (about 1e-14 of the largest
#: eigenvalue for float64 sums of float32 activations; about 1e-8 for the kernel's float32
#: partial sums, Kahan-compensated per tile and added into float64) and as small as that
#: allows, so that small but real directions stay. Measured on the quick CPU model: 1e-9
#: kept exactly the 2(d+1) reachable directions of the first classifier layer, while 1e-6
#: cut real ones (logits moved ~1e-3 relative).
DEFAULT_RANK_TOL = {"float64": 1e-10, "float32": 1e-7}


class RankTolerance(Strategy):
    """"Lossless" pruning (``method.md`` §5): drop directions with ``λ ≤ tol · λ_max``.

    With a small ``tol`` this removes the directions the layer's input cannot reach (a
    saturated width: at most ``2(d + 1)`` directions carry energy), leaving the function
    unchanged up to round-off. It cuts every direction below ``tol · λ_max``, reachable or
    not: on a steep spectrum real directions can lie there too, and the function then
    changes by about the share of energy they carried (a float64 VGG-16 of width 1/16 on
    256 random images: ``classifier.4`` kept 132 of its 134 reachable directions at the
    default 1e-10, and the logits moved 2.6e-6 relative). ``value`` is ``tol``; ``None``
    (default) picks, per layer, the
    tolerance for the precision its statistics were accumulated in
    (:data:`~cobkern.pruning.strategy.DEFAULT_RANK_TOL`: 1e-10 for float64 sums, 1e-7 for
    the float32 kernel's),
    applied per subspace (each subspace's directions against its own largest eigenvalue,
    so a weak but real subspace is not cut for being small next to the other).
    """

    needs_energy = True

    def __init__(self, value: Value | None = None, *, round_to: int = 1) -> None:
        self.auto = value is None
        super().__init__(0.0 if value is None else value, round_to=round_to)

    def _check_value(self, v: Any) -> None:
        super()._check_value(v)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"RankTolerance: tol must be in [0, 1), got {v!r}")

    def select(self, s: LayerScores) -> KeepSet:
        if self.auto:  # per subspace, as the lossless experiment of the sweeps does
            tol = DEFAULT_RANK_TOL[s.accumulation]
            return RankTolerance((tol, tol), round_to=self.round_to).select(s)
        return super().select(s)

    def __repr__(self) -> str:
        return (f"RankTolerance(auto{self._repr_round_to()})" if self.auto
                else super().__repr__())

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.auto:
            d["value"] = "auto"
            d["tolerances"] = dict(DEFAULT_RANK_TOL)
            d["per_subspace"] = True  # what select() applies (was reported as False)
        return d

    def _prune_mask(self, scores, energy, value):
        e = energy.clamp_min(0.0)
        return e <= value * e.max()


#: ``make_strategy`` names: each entry is called as ``entry(value, round_to=round_to)``.
STRATEGIES: dict[str, Any] = {
    "ratio": FixedRatio,
    "param_target": ParameterTarget,
    "param_exact": ExactParameterTarget,
    "count": AbsoluteCount,
    "zscore": ZScore,
    "mean": lambda v, **kw: RelativeThreshold(v, "mean", **kw),
    "median": lambda v, **kw: RelativeThreshold(v, "median", **kw),
    "max": lambda v, **kw: RelativeThreshold(v, "max", **kw),
    "energy": EnergyBudget,
    "lossless": RankTolerance,
}


def make_strategy(name: str, value: Value | None, round_to: int = 1) -> Strategy:
    """Build a strategy by name (see the module table), e.g. ``make_strategy("ratio", (0.5,
    0.5))``; ``round_to`` keeps each subspace's kept count a multiple of it (module
    docstring)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown pruning strategy {name!r}; expected one of {list(STRATEGIES)}")
    return STRATEGIES[name](value, round_to=round_to)



def as_strategy(strategy: Strategy | tuple[str, Any] | list[Any], round_to: int = 1,
                owner: str = "prune") -> Strategy:
    """``strategy`` itself, or :func:`make_strategy` of a ``(name, value)`` pair with
    ``round_to``: the one place that turns what ``prune`` callers pass into a strategy.

    Raises:
        TypeError: ``strategy`` is neither; ``round_to`` not an int.
        ValueError: ``round_to`` < 1, or a :class:`Strategy` with another ``round_to`` than
            a given ``round_to`` other than 1 (it carries its own; set it there only).
    """
    round_to = _check_round_to(round_to, owner)
    if isinstance(strategy, Strategy):
        if round_to != 1 and round_to != strategy.round_to:
            raise ValueError(f"{owner}: round_to={round_to} but the strategy {strategy!r} has "
                             f"round_to={strategy.round_to}; set it on the strategy only")
        return strategy
    if not (isinstance(strategy, (tuple, list)) and len(strategy) == 2):
        raise TypeError(f"strategy must be a Strategy or (name, value), got {strategy!r}")
    return make_strategy(*strategy, round_to=round_to)
