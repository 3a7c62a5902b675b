"""Importance, strategies and surgery for (CoB) structured pruning (``method.md`` §4.4–4.6, §5).

Kept apart in the style of Torch-Pruning:

* :mod:`.importance` — statistics → per-channel scores (:func:`compute_importance`);
* :mod:`.strategy` — scores → keep sets (:class:`FixedRatio`, :class:`ParameterTarget`,
  :class:`ExactParameterTarget`, :class:`AbsoluteCount`, :class:`ZScore`,
  :class:`RelativeThreshold`, :class:`EnergyBudget`, :class:`RankTolerance`,
  :func:`make_strategy`);
* :mod:`.surgery` — keep sets → a smaller model + :class:`PruneReport`.

:func:`prune` chains them (with the rotation when ``cob=True``)::

    stats = calibrate(model, loader)                       # once; stats.save(path)
    model, report = prune(model, stats, FixedRatio((0.5, 0.5)))
    print(report.summary()); report.to_json("report.json")
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

from torch import nn

from cobkern.cob import CalibrationStats, calibrate, select_layers
from cobkern.cob.rotate import checked_layers, rotate_layers, undone_on_error

from .importance import IMPORTANCE_KINDS, LayerScores, compute_importance
from .strategy import (
    STRATEGIES,
    AbsoluteCount,
    EnergyBudget,
    ExactParameterTarget,
    FixedRatio,
    ParameterTarget,
    RankTolerance,
    RelativeThreshold,
    Strategy,
    ZScore,
    as_strategy,
    make_strategy,
    parameter_target_ratio,
)
from .surgery import (
    NORMALIZERS,
    KeepSet,
    LayerReport,
    ModuleReport,
    PruneReport,
    apply_keep_sets,
    check_keep_sets,
    count_params_after,
    refuse_ddp,
)

__all__ = [
    "prune",
    "default_normalizer",
    "compute_importance",
    "LayerScores",
    "IMPORTANCE_KINDS",
    "Strategy",
    "FixedRatio",
    "ParameterTarget",
    "ExactParameterTarget",
    "AbsoluteCount",
    "ZScore",
    "RelativeThreshold",
    "EnergyBudget",
    "RankTolerance",
    "make_strategy",
    "as_strategy",
    "parameter_target_ratio",
    "STRATEGIES",
    "KeepSet",
    "PruneReport",
    "ModuleReport",
    "LayerReport",
    "apply_keep_sets",
    "check_keep_sets",
    "count_params_after",
    "NORMALIZERS",
]


def default_normalizer(strategy: Strategy) -> str:
    """The RMSNorm normaliser :func:`prune` uses unless told: ``"kept"`` (the authors'),
    except ``"original"`` for :class:`RankTolerance` ("lossless" pruning). Cutting
    zero-energy directions leaves ``Σx²`` unchanged, but dividing it by the kept width
    instead of the original one would rescale every activation of the layer (measured on a
    saturated conv: logits moved 1.3e-2 relative with ``"kept"``, 1e-15 with
    ``"original"``)."""
    return "original" if isinstance(strategy, RankTolerance) else "kept"


def prune(
    model: nn.Module,
    stats: CalibrationStats,
    strategy: Strategy | tuple[str, Any],
    importance: str = "l2",
    cob: bool = True,
    normalizer: str | None = None,
    layers: list[str] | None = None,
    loader: Iterable[Any] | None = None,
    max_samples: int | None = 10_000,
    progress: bool = False,
    round_to: int = 1,
) -> tuple[nn.Module, PruneReport]:
    """Rotate (when ``cob``), score, select and cut ``model`` in place.

    Args:
        model: the un-rotated model ``stats`` were computed on (``stats.basis ==
            "original"``), or — with ``stats.basis == "rotated"`` — a model already rotated
            by :func:`~cobkern.cob.rotate_model` and recalibrated.
        stats: :class:`~cobkern.cob.CalibrationStats`.
        strategy: a :class:`Strategy` or ``(name, value)`` for :func:`make_strategy`.
        importance: ``"l2"`` (default) or ``"l1"``.
        cob: rotate into the principal basis first (``False``: the TSRA baseline).
        normalizer: RMSNorm normaliser after pruning: ``"kept"`` (the authors') or
            ``"original"`` (keeps the activations' scale). ``None`` (default):
            :func:`default_normalizer` — ``"kept"``, except ``"original"`` for the lossless
            :class:`RankTolerance`, which only keeps the function unchanged that way.
        layers: CoB layer names to prune (default: every layer in ``stats``).
        loader: for ``importance="l1"`` with ``cob=True`` from original-basis statistics: the
            data of the second calibration pass through the rotated model.
        max_samples, progress: for that second pass.
        round_to: with ``(name, value)``, passed to :func:`make_strategy`: each subspace
            keeps a multiple of ``round_to`` channels (capped at its size). A
            :class:`Strategy` carries its own ``round_to``; a different value here
            (other than the default 1) is an error.

    Returns:
        ``(model, report)``; the model is the same object, modified.
    """
    if importance not in IMPORTANCE_KINDS:
        raise ValueError(f"unknown importance {importance!r}; expected one of {IMPORTANCE_KINDS}")
    strategy = as_strategy(strategy, round_to, "prune")
    normalizer = normalizer or default_normalizer(strategy)
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; expected one of {NORMALIZERS}")
    refuse_ddp(model, "prune")
    found = select_layers(model, None)
    stats.check_model(found)
    if layers is None:
        layers = [lay.name for lay in found if lay.name in stats]
        if not layers:
            raise ValueError(f"none of the model's CoB layers {[lay.name for lay in found]} are "
                             "in the statistics (they hold no layers)")
    chosen = select_layers(model, layers)
    stats.check_matches(chosen)
    basis = stats.basis
    if basis == "mixed":
        raise ValueError("the statistics mix original- and rotated-basis layers")
    if not cob and basis != "original":
        raise ValueError("the baseline (cob=False) needs statistics of the un-rotated model")
    rotate = cob and basis == "original"
    if rotate and importance == "l1" and loader is None:
        raise ValueError("importance='l1' with cob=True needs a second calibration pass "
                         "through the rotated model: pass loader=")
    # Everything that can fail runs before the model is cut; if it fails after the rotation,
    # the weights are put back, so that a retry does not rotate an already rotated model.
    with undone_on_error(chosen) if rotate else nullcontext():
        if rotate:
            # unguarded: this block's guard puts the weights back (one copy, not two)
            stats = rotate_layers(checked_layers(model, stats, layers), stats).stats
            if importance == "l1":
                stats = calibrate(model, loader, layers, max_samples=max_samples,
                                  progress=progress, meta={"basis": "rotated"})
        scores = compute_importance(stats, importance, cob, layers)
        # checked here, not only by the surgery: a keep set it refused (a custom strategy's)
        # would otherwise leave the model rotated and the statistics no longer its own
        keep = check_keep_sets(chosen, strategy.plan(scores, chosen, model))
    report = apply_keep_sets(model, chosen, keep, normalizer)
    report.meta.update({"importance": importance, "cob": cob, **strategy.describe()})
    if isinstance(strategy, ExactParameterTarget):
        report.meta.update({"ratio": strategy.ratio, "achieved": strategy.achieved})
    return model, report
