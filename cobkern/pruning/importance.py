"""Channel importance from calibration statistics (``method.md`` §4.4, §4.6).

Scores are computed once, before any layer is pruned, per CoB layer and per subspace:

* ``"l2"``: ``sqrt(Σ a²)``. In the rotated basis (``cob=True``) the rotated channel ``i``
  of U has ``Σ a'² = λ_i``, the ``i``-th eigenvalue of ``G_U`` — no second pass needed.
* ``"l1"``: ``Σ |a|``. In the rotated basis this is not a function of ``G``; it needs
  statistics from a second calibration pass through the *rotated* model
  (``basis="rotated"``; :func:`cobkern.pruning.prune` runs it when given a loader).
* Baseline (``cob=False``, "TSRA baseline"): the same scores of the original channels.

Every :class:`LayerScores` also carries the per-direction energies (the eigenvalues) when in
the rotated basis; the energy-budget and rank-tolerance strategies use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cobkern.cob.stats import CalibrationStats, LayerStats

__all__ = ["LayerScores", "compute_importance", "IMPORTANCE_KINDS"]

IMPORTANCE_KINDS = ("l2", "l1")


@dataclass
class LayerScores:
    """Importance of one layer's channels (float64, CPU).

    Attributes:
        name: the layer (producer) name.
        split: size of U.
        u: ``(split,)`` scores of U's channels; v: ``(C-split,)`` scores of V's.
        energy_u, energy_v: the eigenvalues of each channel's direction (rotated basis), or
            ``None`` in the baseline (original channels have no such meaning).
        kind: ``"l2"`` or ``"l1"``; rotated: whether the channels are the principal
            directions.
        accumulation: precision of the statistics' sums (``"float64"`` / ``"float32"``).
    """

    name: str
    split: int
    u: Tensor
    v: Tensor
    energy_u: Tensor | None
    energy_v: Tensor | None
    kind: str
    rotated: bool
    accumulation: str = "float64"

    @property
    def num_channels(self) -> int:
        return self.u.numel() + self.v.numel()

    @property
    def scores(self) -> Tensor:
        """``(C,)``: U's scores then V's."""
        return torch.cat([self.u, self.v])


def _layer_scores(s: LayerStats, kind: str, cob: bool) -> LayerScores:
    s.check_finite()  # NaN sums would rank channels at random
    sp = s.split
    if not cob:
        if s.basis != "original":
            raise ValueError(f"{s.name}: baseline importance (cob=False) needs statistics of the "
                             f"un-rotated model, got basis {s.basis!r}")
        sc = s.sum_sq.sqrt() if kind == "l2" else s.sum_abs
        sc = sc.to(torch.float64)
        return LayerScores(s.name, sp, sc[:sp].clone(), sc[sp:].clone(), None, None, kind, False,
                           s.accumulation)
    if s.basis == "original":
        e = s.eigh()
        eu, ev = e.values_u, e.values_v
        if kind == "l1":
            raise ValueError(
                f"{s.name}: L1 importance in the rotated basis needs Σ|a| of the rotated "
                "channels, which the covariance does not determine; rotate the model, calibrate "
                "it again (basis='rotated') and pass those statistics — or pass loader= to "
                "cobkern.pruning.prune, which does the second pass")
        return LayerScores(s.name, sp, eu.sqrt(), ev.sqrt(), eu, ev, kind, True, s.accumulation)
    # rotated-basis statistics (a pass through the rotated model, or LayerStats.rotated())
    sq = s.sum_sq.to(torch.float64).clamp_min(0.0)
    if kind == "l2":
        sc = sq.sqrt()
    else:
        sc = s.sum_abs.to(torch.float64)
        if torch.isnan(sc).any():
            raise ValueError(f"{s.name}: these rotated statistics carry no Σ|a| (they were "
                             "derived from the eigen-decomposition); calibrate the rotated model "
                             "for L1 importance")
    return LayerScores(s.name, sp, sc[:sp].clone(), sc[sp:].clone(), sq[:sp].clone(),
                       sq[sp:].clone(), kind, True, s.accumulation)


def compute_importance(stats: CalibrationStats, kind: str = "l2", cob: bool = True,
                       layers: list[str] | None = None) -> dict[str, LayerScores]:
    """Per-channel importance of every (or the named) layer.

    Args:
        stats: calibration statistics; ``basis="original"`` (L2 with or without CoB, L1
            baseline) or ``"rotated"`` (a pass through the rotated model: L1/L2 with CoB).
        kind: ``"l2"`` (default) or ``"l1"``.
        cob: scores of the principal directions (``True``) or of the original channels.
        layers: restrict to these layer names.

    Returns:
        ``name → LayerScores`` in the statistics' order.
    """
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"unknown importance {kind!r}; expected one of {IMPORTANCE_KINDS}")
    names = list(stats.layers) if layers is None else layers
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(f"no statistics for layers {missing}")
    return {n: _layer_scores(stats[n], kind, cob) for n in names}
