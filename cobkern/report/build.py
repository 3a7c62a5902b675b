"""Build ``OUT/report.md`` (+ summary.json, tables/*.csv, figures/*.png) from an experiment
directory alone: ``OUT/config.json``, ``OUT/metrics.jsonl``, ``OUT/calibration.pt`` and the
training runs' ``final.json``. Nothing is recomputed, so ``cobkern report`` can be re-run at
any time (e.g. after more sweep points were added).

This module reads the files and writes the outputs; the numbers come from
:mod:`.summary`, the page from :mod:`.markdown`, the plots from :mod:`.figures`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cobkern.experiments.config import saved_or_default_config
from cobkern.experiments.files import Layout, atomic_write_json, atomic_write_text, read_jsonl
from cobkern.experiments.identity import current_inputs, record_is_current

from . import figures as F
from .analysis import dedupe, select
from .markdown import render_markdown
from .published import PUBLISHED
from .summary import fixed_rows, matches_recipe, peer_records, summarize

__all__ = ["build_report"]


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                    for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _spectra(layout: Layout) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Every calibrated layer's eigenvalues, the images the calibration used and the float32
    products its kernel used where not the default (``None`` also where no kernel ran)."""
    if not layout.calibration.is_file():
        return [], None, None
    from cobkern.cob import CalibrationStats

    stats = CalibrationStats.load(layout.calibration)
    out = []
    for s in stats:
        e = s.eigh()
        out.append({"name": s.name, "channels": s.num_channels, "split": s.split,
                    "u": e.values_u.tolist(), "v": e.values_v.tolist()})
    return out, stats.num_images, stats.meta.get("f32_dot")


#: Figure key (``summary.json``'s ``figures``) → file under ``figures/``.
_FIGURES = {"fixed": "accuracy_vs_pruned.png", "normalizer": "normalizer.png",
            "spectra": "eigen_spectra.png", "kept": "kept_channels.png",
            "threshold": "threshold_finetune.png", "peers": "peers.png", "speed": "speed.png"}


def _remove_unwritten(folder: Path, made: dict[str, bool]) -> None:
    """Remove the optional outputs (file name → written by this build) not written now:
    their section is gone (its records are no longer current), and a file left from an
    earlier build would still show its old numbers."""
    for name, written in made.items():
        if not written:
            (folder / name).unlink(missing_ok=True)


def build_report(out: str | Path) -> Path:
    """Write summary.json, tables/*.csv, figures/*.png and report.md under ``out``.

    Raises:
        MissingStepError: no ``OUT/metrics.jsonl`` (run ``cobkern sweep`` first).
    """
    layout = Layout(out)
    layout.require(layout.metrics, f"cobkern sweep --out {layout.root}", "sweep results")
    cfg = saved_or_default_config(layout.config)  # as the steps that wrote the records
    # only what was measured from the files and settings now in OUT (the trained model,
    # calibration.pt, eval_subset, the fine-tuning recipe); see cobkern.experiments.identity
    current = current_inputs(layout, cfg)
    records = dedupe(r for r in read_jsonl(layout.metrics) if record_is_current(r, current))
    records = [r for r in records if matches_recipe(r, cfg)]
    train_final = _read_json(layout.train_dir("tsra") / "final.json")
    relu_final = _read_json(layout.train_dir("relu") / "final.json")
    s = summarize(records, cfg, train_final, relu_final)
    spectra, s["calibration_images"], s["calibration_f32_dot"] = _spectra(layout)
    train_cfg = _read_json(layout.train_dir("tsra") / "config.json") or {}
    s["train_width"] = train_cfg.get("width")
    ref = s["unpruned_accuracy"]
    tol = cfg.frontier_tolerance
    figs: dict[str, str] = {}
    fig_dir, tab_dir = layout.figures, layout.tables

    def rel(p: Path) -> str:
        return p.relative_to(layout.root).as_posix()

    # ---- tables
    fixed = fixed_rows(records)
    cols = ["method", "importance", "normalizer", "target", "fraction_pruned", "params_before",
            "params_after", "accuracy", "loss", "n_eval"]
    _write_csv(tab_dir / "fixed_ratio.csv", fixed, cols)
    _write_csv(tab_dir / "frontier.csv", [
        {"curve": k, **(v or {"target": None})} for k, v in s["frontiers"].items()],
        ["curve", "target", "achieved", "accuracy", "next_target"])
    if "threshold" in s:
        _write_csv(tab_dir / "threshold_finetune.csv", s["threshold"],
                   ["method", "strategy", "t", "finetune_steps", "fraction_pruned",
                    "accuracy_before_ft", "accuracy", "drop_points"])
    if "peers" in s:
        _write_csv(tab_dir / "peers.csv", s["peers"],
                   ["method", "arch", "target", "fraction_pruned", "accuracy_before_ft",
                    "accuracy", "finetuned", "finetune_steps"])
    if "lossless" in s:
        bounds = s["lossless"]["saturation_bound"] or {}
        _write_csv(tab_dir / "lossless_layers.csv",
                   [{**x, "bound": bounds.get(x["name"])} for x in s["lossless"]["layers"]],
                   ["name", "before", "after", "split_before", "split_after", "bound"])
    if s["speed"]:
        # round_to only where a rounded model was timed: older runs' CSV stays the same
        rounded = ["round_to"] if any("round_to" in r for r in s["speed"]) else []
        rows = [{**r, "round_to": r.get("round_to", 1)} if rounded and r["method"] != "unpruned"
                else r for r in s["speed"]]
        _write_csv(tab_dir / "speed.csv", rows,
                   ["method", "target", *rounded, "params", "flops", "params_ratio",
                    "flops_ratio", "latency_ms_b1", "speedup_b1", "throughput_bmax",
                    "speedup_bmax", "batch_small", "batch_large", "device"])
    _write_csv(tab_dir / "published.csv", PUBLISHED,
               ["method", "venue", "baseline", "pruned", "params_pct", "flops_pct"])
    _write_csv(tab_dir / "records.csv", records,
               ["experiment", "key", "method", "arch", "importance", "normalizer", "strategy",
                "value", "target", "finetuned", "fraction_pruned", "params_after", "accuracy",
                "accuracy_before_ft", "loss"])

    # ---- figures
    if fixed:
        figs["fixed"] = rel(F.fig_accuracy_vs_pruned(
            records, cfg.importances, cfg.normalizer, ref, tol, s["frontiers"],
            fig_dir / _FIGURES["fixed"]))
    norm_fr = cfg.normalizer_fractions if cfg.normalizer_fractions is not None else cfg.fractions
    if select(records, experiment="normalizer"):
        figs["normalizer"] = rel(F.fig_normalizer(records, cfg.normalizer_importance, ref,
                                                  norm_fr, fig_dir / _FIGURES["normalizer"]))
    if spectra:
        figs["spectra"] = rel(F.fig_spectra(spectra, fig_dir / _FIGURES["spectra"]))
    kept_cfgs = []
    if "lossless" in s and s["lossless"]["layers"]:
        kept_cfgs.append({"label": "CoB lossless (rank tolerance)",
                          "layers": s["lossless"]["layers"]})
    for r in select(records, experiment="threshold", method="cob")[:3]:
        kept_cfgs.append({"label": f"CoB {r['strategy']} {r['value'][0]:g}",
                          "layers": r.get("layers", [])})
    big = [r for r in fixed if r["method"] == "cob" and r.get("layers")]
    if big and not kept_cfgs:
        r = max(big, key=lambda r: r["target"])
        kept_cfgs.append({"label": f"CoB fixed {100 * r['target']:.0f}%", "layers": r["layers"]})
    if kept_cfgs:
        figs["kept"] = rel(F.fig_kept_channels(kept_cfgs, fig_dir / _FIGURES["kept"]))
    if "threshold" in s:
        figs["threshold"] = rel(F.fig_threshold(records, ref, fig_dir / _FIGURES["threshold"]))
    if "peers" in s:
        refs = {"tsra": ref} if ref is not None else {}
        if s["relu_accuracy"] is not None:
            refs["relu"] = s["relu_accuracy"]
        figs["peers"] = rel(F.fig_peers(peer_records(records, cfg), refs,
                                        fig_dir / _FIGURES["peers"]))
    pruned_speed = [r for r in s["speed"] if r["method"] != "unpruned"]
    if pruned_speed:  # the unpruned model alone (a sweep killed after timing it): no bars
        figs["speed"] = rel(F.fig_speed(pruned_speed, fig_dir / _FIGURES["speed"]))
    s["figures"] = figs
    _remove_unwritten(tab_dir, {"threshold_finetune.csv": "threshold" in s,
                                "peers.csv": "peers" in s, "lossless_layers.csv": "lossless" in s,
                                "speed.csv": bool(s["speed"])})
    _remove_unwritten(fig_dir, {name: key in figs for key, name in _FIGURES.items()})
    atomic_write_json(layout.summary, s)
    text = render_markdown(s, cfg, records, figs)
    return atomic_write_text(layout.report, text)
