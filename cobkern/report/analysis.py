"""Pure functions from the records of ``OUT/metrics.jsonl`` to the numbers of the report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["select", "curve", "reliable_frontier", "latest", "dedupe"]


def dedupe(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per key (the last one written wins); records without a key are kept."""
    by_key: dict[str, dict[str, Any]] = {}
    rest = []
    for r in records:
        if "key" in r:
            by_key[r["key"]] = r
        else:
            rest.append(r)
    return list(by_key.values()) + rest


def select(records: Iterable[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """Records whose fields equal every ``where`` value (``None`` matches a missing field)."""
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def latest(records: Iterable[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    """The last record matching ``where``, or ``None``."""
    found = select(records, **where)
    return found[-1] if found else None


def curve(records: Iterable[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """Fixed-ratio records matching ``where``, sorted by target fraction."""
    pts = [r for r in select(records, strategy="param_target", **where)
           if r.get("target") is not None]
    return sorted(pts, key=lambda r: r["target"])


def reliable_frontier(points: list[dict[str, Any]], reference_accuracy: float,
                      tolerance: float) -> dict[str, Any] | None:
    """The reliable frontier of a fixed-ratio curve.

    Definition: the largest swept parameter fraction ``P`` such that the accuracy at ``P``
    and at every smaller swept fraction stays within ``tolerance`` (e.g. 0.01 = 1 point) of
    the unpruned model's accuracy. ``None`` when even the smallest swept fraction falls
    outside. Returns the point's record augmented with ``frontier`` (the target fraction)
    and ``achieved`` (the actual fraction of parameters pruned).
    """
    best = None
    for r in sorted(points, key=lambda r: r["target"]):
        if r["accuracy"] >= reference_accuracy - tolerance - 1e-12:
            best = r
        else:
            break
    if best is None:
        return None
    return {**best, "frontier": best["target"], "achieved": best["fraction_pruned"]}
