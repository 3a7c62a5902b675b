"""Matplotlib figures of the report (Agg backend, PNG, written atomically)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cobkern.experiments.files import atomic_write_bytes  # noqa: E402

from .analysis import curve, select  # noqa: E402

__all__ = ["fig_accuracy_vs_pruned", "fig_normalizer", "fig_spectra", "fig_kept_channels",
           "fig_threshold", "fig_peers", "fig_speed", "save"]

COLORS = {"cob": "tab:blue", "baseline": "tab:orange", "tp-l2": "tab:green", "tp-l1": "tab:red",
          "unpruned": "black"}
LABELS = {"cob": "CoB (rotate, then prune)", "baseline": "TSRA baseline (no rotation)"}


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _ref_lines(ax: Any, ref: float | None, tol: float) -> None:
    if ref is None:
        return
    ax.axhline(100 * ref, color="gray", lw=0.8, ls="--", label="unpruned")
    ax.axhline(100 * (ref - tol), color="gray", lw=0.8, ls=":",
               label=f"unpruned − {100 * tol:g} pt")


def fig_accuracy_vs_pruned(records: list[dict[str, Any]], importances: list[str],
                           normalizer: str, ref: float | None, tol: float,
                           frontiers: dict[str, dict[str, Any] | None], path: Path) -> Path:
    """Accuracy vs % parameters pruned, CoB vs baseline, one panel per importance."""
    n = max(1, len(importances))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4), squeeze=False)
    for ax, imp in zip(axes[0], importances, strict=False):
        for method in ("cob", "baseline"):
            pts = curve(records, method=method, importance=imp, normalizer=normalizer,
                        finetuned=False)
            if not pts:
                continue
            ax.plot([100 * p["fraction_pruned"] for p in pts], [100 * p["accuracy"] for p in pts],
                    "o-", color=COLORS[method], label=LABELS[method])
            f = frontiers.get(f"{imp}/{method}")
            if f is not None:
                ax.axvline(100 * f["achieved"], color=COLORS[method], lw=0.8, alpha=0.6)
        if not ax.lines:  # say so rather than draw an empty panel
            ax.text(0.5, 0.5, f"{imp.upper()}: not measured", ha="center", va="center",
                    transform=ax.transAxes)
        _ref_lines(ax, ref, tol)
        ax.set_title(f"fixed ratio, no fine-tuning — {imp.upper()} importance")
        ax.set_xlabel("% of parameters pruned")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)


def fig_normalizer(records: list[dict[str, Any]], importance: str, ref: float | None,
                   fractions: list[float], path: Path) -> Path:
    """Kept vs original RMSNorm normaliser, CoB and baseline."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    fr = {round(float(f), 6) for f in fractions}
    for method in ("cob", "baseline"):
        for norm, ls in (("kept", "-"), ("original", "--")):
            pts = [p for p in curve(records, method=method, importance=importance,
                                    normalizer=norm, finetuned=False)
                   if round(p["target"], 6) in fr]
            if pts:
                ax.plot([100 * p["fraction_pruned"] for p in pts],
                        [100 * p["accuracy"] for p in pts], "o" + ls, color=COLORS[method],
                        label=f"{method}, normaliser {norm}")
    if ref is not None:
        ax.axhline(100 * ref, color="gray", lw=0.8, ls="--", label="unpruned")
    ax.set_xlabel("% of parameters pruned")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"RMSNorm normaliser: kept vs original width ({importance.upper()})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def fig_spectra(spectra: list[dict[str, Any]], path: Path) -> Path:
    """Normalised eigenvalue spectra (λ / λ_max, log scale) of every CoB layer, U and V."""
    n = len(spectra)
    cols = 4
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows), squeeze=False)
    for ax, s in zip(axes.flat, spectra, strict=False):
        for sub, color in (("u", "tab:blue"), ("v", "tab:purple")):
            vals = [max(v, 1e-18) for v in s[sub]]
            top = max(vals) if vals else 1.0
            ax.semilogy(range(1, len(vals) + 1), [v / top for v in vals], color=color,
                        label=sub.upper())
        ax.set_title(f"{s['name']} ({s['channels']} ch)", fontsize=8)
        ax.set_ylim(1e-12, 2)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if n:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("eigenvalue spectra per layer (λ / λ_max, descending; U and V subspaces)")
    fig.tight_layout()
    return save(fig, path)


def fig_kept_channels(configs: list[dict[str, Any]], path: Path) -> Path:
    """Kept channels per CoB layer for several pruned models (grouped bars, log scale)."""
    fig, ax = plt.subplots(figsize=(11, 4))
    if configs:
        names = [x["name"] for x in configs[0]["layers"]]
        before = [x["before"] for x in configs[0]["layers"]]
        k = len(configs) + 1
        w = 0.8 / k
        xs = range(len(names))
        ax.bar([x - 0.4 + w / 2 for x in xs], before, w, color="lightgray", label="unpruned")
        for i, c in enumerate(configs, start=1):
            after = {x["name"]: x["after"] for x in c["layers"]}
            ax.bar([x - 0.4 + w / 2 + i * w for x in xs], [after.get(nm, 0) for nm in names],
                   w, label=c["label"])
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
    ax.set_ylabel("channels kept")
    ax.set_title("kept channels per layer")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)


def fig_threshold(records: list[dict[str, Any]], ref: float | None, path: Path) -> Path:
    """Threshold pruning: accuracy before and after fine-tuning vs % pruned."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in ("cob", "baseline"):
        pts = sorted(select(records, experiment="threshold", method=method),
                     key=lambda r: r["fraction_pruned"])
        if not pts:
            continue
        x = [100 * p["fraction_pruned"] for p in pts]
        ax.plot(x, [100 * p["accuracy_before_ft"] for p in pts], "x", color=COLORS[method],
                label=f"{method}, before fine-tuning")
        ax.plot(x, [100 * p["accuracy"] for p in pts], "o", color=COLORS[method],
                label=f"{method}, after fine-tuning")
        for p, xi in zip(pts, x, strict=True):
            ax.annotate(f"{p['strategy']} {p['value'][0]:g}", (xi, 100 * p["accuracy"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    if ref is not None:
        ax.axhline(100 * ref, color="gray", lw=0.8, ls="--", label="unpruned")
    ax.set_xlabel("% of parameters pruned")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("threshold pruning + fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def fig_peers(records: list[dict[str, Any]], refs: dict[str, float], path: Path) -> Path:
    """Torch-Pruning (TSRA and ReLU models) vs CoB at the same budgets; ``records``: the
    comparison's (:func:`~.summary.peer_records`)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["arch"]), []).append(r)
    markers = {"tsra": "o", "relu": "s"}
    for (method, arch), pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda r: r["fraction_pruned"])
        lbl = ("CoB" if method == "cob" else f"Torch-Pruning {method[3:].upper()}") + f" ({arch})"
        ax.plot([100 * p["fraction_pruned"] for p in pts], [100 * p["accuracy"] for p in pts],
                markers.get(arch, "o") + "-", color=COLORS.get(method, None), label=lbl)
    for arch, acc in refs.items():
        ax.axhline(100 * acc, lw=0.8, ls="--" if arch == "tsra" else "-.", color="gray",
                   label=f"unpruned {arch}")
    ax.set_xlabel("% of parameters pruned")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("peer comparison (same budgets, same fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def fig_speed(rows: list[dict[str, Any]], path: Path) -> Path:
    """Speed-up of pruned models: FLOPs ratio vs measured latency / throughput ratios (a
    model pruned with ``round_to`` N > 1 is a bar group of its own, labelled so)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = [f"{100 * r['target']:.0f}%"
              + (f"\nround_to {r['round_to']}" if r.get("round_to", 1) != 1 else "")
              for r in rows]
    xs = range(len(rows))
    series = [("flops_ratio", "FLOPs reduction ×"),
              ("speedup_b1", f"latency speed-up ×, batch {rows[0]['batch_small']}"),
              ("speedup_bmax", f"throughput speed-up ×, batch {rows[0]['batch_large']}")]
    w = 0.8 / len(series)
    for i, (k, lbl) in enumerate(series):  # a ratio not measured: no bar (not a 0× one)
        ys = [math.nan if r.get(k) is None else r[k] for r in rows]
        ax.bar([x - 0.4 + w / 2 + i * w for x in xs], ys, w, label=lbl)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_xlabel("parameter target (CoB, L2, fixed ratio)")
    ax.set_ylabel("× vs unpruned")
    ax.set_title("what pruning buys")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return save(fig, path)
