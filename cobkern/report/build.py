"""Build ``OUT/report.md`` (+ summary.json, tables/*.csv, figures/*.png) from an experiment
directory alone: ``OUT/config.json``, ``OUT/metrics.jsonl``, ``OUT/calibration.pt`` and the
training runs' ``final.json``. Nothing is recomputed, so ``cobkern report`` can be re-run at
any time (e.g. after more sweep points were added).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cobkern.experiments.config import ExperimentConfig, load_experiment_config
from cobkern.experiments.files import Layout, atomic_write_json, atomic_write_text, read_jsonl
from cobkern.experiments.identity import current_inputs, record_is_current

from . import figures as F
from .analysis import curve, dedupe, latest, reliable_frontier, select
from .published import PAPER_CLAIMS, PUBLISHED, PUBLISHED_CAVEAT

__all__ = ["build_report", "summarize"]


def _pct(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{nd}f}"


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                    for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _spectra(layout: Layout) -> list[dict[str, Any]]:
    if not layout.calibration.is_file():
        return []
    from cobkern.cob import CalibrationStats

    stats = CalibrationStats.load(layout.calibration)
    out = []
    for s in stats:
        e = s.eigh()
        out.append({"name": s.name, "channels": s.num_channels, "split": s.split,
                    "u": e.values_u.tolist(), "v": e.values_v.tolist()})
    return out


#: The experiments whose records make the fixed-ratio curves and table.
FIXED_EXPERIMENTS = ("fixed", "normalizer")


def _expected_steps(r: dict[str, Any], cfg: ExperimentConfig) -> int:
    if r.get("experiment") == "peers" and not cfg.peer_finetune:
        return 0
    return cfg.finetune.steps


def matches_recipe(r: dict[str, Any], cfg: ExperimentConfig) -> bool:
    """Whether a threshold / peer record was fine-tuned as the current config says (records
    of an earlier recipe stay in ``metrics.jsonl`` but are not reported as this run's)."""
    if r.get("experiment") not in ("threshold", "peers"):
        return True
    steps = r.get("finetune_steps", 0) if r.get("finetuned") else 0
    return steps == _expected_steps(r, cfg)


def fixed_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the fixed-ratio table: the fixed and normaliser sweeps, no fine-tuning
    (single ``cobkern prune`` records and fine-tuned peers are not part of it)."""
    rows = [r for r in records if r.get("experiment") in FIXED_EXPERIMENTS
            and r.get("strategy") == "param_target" and not r.get("finetuned")
            and r.get("target") is not None]
    return sorted(rows, key=lambda r: (str(r.get("importance")), str(r.get("normalizer")),
                                       str(r.get("method")), r["target"]))


# ---------------------------------------------------------------------------- summary
def summarize(records: list[dict[str, Any]], cfg: ExperimentConfig,
              train_final: dict[str, Any] | None = None,
              relu_final: dict[str, Any] | None = None) -> dict[str, Any]:
    """The numbers the report states (also written to ``summary.json``)."""
    records = [r for r in dedupe(records) if matches_recipe(r, cfg)]
    tol = cfg.frontier_tolerance
    ref = latest(records, key="reference|tsra")
    ref_acc = ref["accuracy"] if ref else None
    relu_ref = latest(records, key="reference|relu")
    s: dict[str, Any] = {
        "preset": cfg.preset, "eval_images": ref["n_eval"] if ref else None,
        "unpruned_accuracy": ref_acc, "unpruned_params": ref["params_after"] if ref else None,
        "relu_accuracy": relu_ref["accuracy"] if relu_ref else None,
        "train": train_final, "train_relu": relu_final,
        "frontier_definition": (
            f"the largest swept target fraction P such that the accuracy at P and at every "
            f"smaller swept target stays within {100 * tol:g} point(s) of the unpruned "
            f"model's accuracy (fixed ratio, no fine-tuning); shown as the fraction of "
            f"parameters actually removed there, and at the first target that fails"),
        "frontier_tolerance": tol, "fixed": {}, "frontiers": {}, "cob_wins": {},
    }
    if ref_acc is not None and s["relu_accuracy"] is not None:
        s["tsra_minus_relu_points"] = 100 * (ref_acc - s["relu_accuracy"])
    for imp in cfg.importances:
        by_method = {}
        for method in ("cob", "baseline"):
            pts = [p for p in curve(records, method=method, importance=imp,
                                    normalizer=cfg.normalizer, finetuned=False)
                   if p.get("experiment", "fixed") in FIXED_EXPERIMENTS]
            by_method[method] = pts
            s["fixed"][f"{imp}/{method}"] = [
                {"target": p["target"], "fraction_pruned": p["fraction_pruned"],
                 "accuracy": p["accuracy"]} for p in pts]
            if ref_acc is not None and pts:
                f = reliable_frontier(pts, ref_acc, tol)
                nxt = min((p for p in pts if f is not None and p["target"] > f["frontier"]),
                          key=lambda p: p["target"], default=None)
                s["frontiers"][f"{imp}/{method}"] = None if f is None else {
                    "target": f["frontier"], "achieved": f["achieved"], "accuracy": f["accuracy"],
                    "next_target": None if nxt is None else nxt["target"],
                    "next_achieved": None if nxt is None else nxt["fraction_pruned"]}
        cob = {round(p["target"], 6): p["accuracy"] for p in by_method["cob"]}
        base = {round(p["target"], 6): p["accuracy"] for p in by_method["baseline"]}
        common = sorted(set(cob) & set(base) - {0.0})
        s["cob_wins"][imp] = {"ratios": len(common),
                              "cob_better": sum(cob[t] > base[t] for t in common),
                              "ties": sum(cob[t] == base[t] for t in common)}
    ll = select(records, experiment="lossless")
    if ll:
        r = ll[-1]
        s["lossless"] = {k: r.get(k) for k in ("fraction_pruned", "params_after", "accuracy",
                                               "agreement", "max_logit_diff", "logit_scale")}
        s["lossless"]["tol"] = r["value"][0]
        s["lossless"]["accuracy_change"] = (r["accuracy"] - ref_acc) if ref_acc else None
        s["lossless"]["layers"] = r.get("layers", [])
        s["lossless"]["saturation_bound"] = r.get("saturation_bound", {})
    th = select(records, experiment="threshold")
    if th:
        s["threshold"] = [{"method": r["method"], "strategy": r["strategy"],
                           "t": r["value"][0], "fraction_pruned": r["fraction_pruned"],
                           "finetune_steps": r.get("finetune_steps"),
                           "accuracy_before_ft": r.get("accuracy_before_ft"),
                           "accuracy": r["accuracy"],
                           "drop_points": None if ref_acc is None
                           else 100 * (ref_acc - r["accuracy"])} for r in th]
    pe = select(records, experiment="peers")
    if pe:
        s["peers"] = [{"method": r["method"], "arch": r["arch"], "target": r["target"],
                       "fraction_pruned": r["fraction_pruned"],
                       "accuracy_before_ft": r.get("accuracy_before_ft"),
                       "accuracy": r["accuracy"], "finetuned": r.get("finetuned"),
                       "finetune_steps": r.get("finetune_steps", 0) if r.get("finetuned")
                       else 0} for r in pe]
    s["speed"] = _speed_rows(records)
    return s


def _speed_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The speed table of the device measured last: ratios never mix machines."""
    sp = select(records, experiment="speed")
    if not sp:
        return []
    device = sp[-1].get("device")
    sp = [r for r in sp if r.get("device") == device]
    batches = sorted({r["batch"] for r in sp})
    b1, bmax = batches[0], batches[-1]
    base = {r["batch"]: r for r in sp if r["method"] == "unpruned"}
    rows = []
    for t in sorted({r["target"] for r in sp}):
        rs = {r["batch"]: r for r in sp if r["target"] == t}
        any_r = next(iter(rs.values()))
        row = {"method": any_r["method"], "target": t, "params": any_r["params"],
               "flops": any_r["flops"], "device": any_r.get("device"),
               "latency_ms_b1": rs[b1]["latency_ms"] if b1 in rs else None,
               "throughput_bmax": rs[bmax]["throughput"] if bmax in rs else None,
               "batch_small": b1, "batch_large": bmax}
        if base:
            u = next(iter(base.values()))
            row["params_ratio"] = u["params"] / any_r["params"]
            row["flops_ratio"] = u["flops"] / any_r["flops"]
            if b1 in rs and b1 in base:
                row["speedup_b1"] = base[b1]["latency_ms"] / rs[b1]["latency_ms"]
            if bmax in rs and bmax in base:
                row["speedup_bmax"] = rs[bmax]["throughput"] / base[bmax]["throughput"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- report
def build_report(out: str | Path) -> Path:
    """Write summary.json, tables/*.csv, figures/*.png and report.md under ``out``.

    Raises:
        MissingStepError: no ``OUT/metrics.jsonl`` (run ``cobkern sweep`` first).
    """
    layout = Layout(out)
    layout.require(layout.metrics, f"cobkern sweep --out {layout.root}", "sweep results")
    cfg = (load_experiment_config(layout.config) if layout.config.is_file()
           else ExperimentConfig())
    # only what was measured from the files and settings now in OUT (the trained model,
    # calibration.pt, eval_subset, the fine-tuning recipe); see cobkern.experiments.identity
    current = current_inputs(layout, cfg)
    records = dedupe(r for r in read_jsonl(layout.metrics) if record_is_current(r, current))
    records = [r for r in records if matches_recipe(r, cfg)]
    train_final = _read_json(layout.train_dir("tsra") / "final.json")
    relu_final = _read_json(layout.train_dir("relu") / "final.json")
    s = summarize(records, cfg, train_final, relu_final)
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
        _write_csv(tab_dir / "speed.csv", s["speed"],
                   ["method", "target", "params", "flops", "params_ratio", "flops_ratio",
                    "latency_ms_b1", "speedup_b1", "throughput_bmax", "speedup_bmax",
                    "batch_small", "batch_large", "device"])
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
            fig_dir / "accuracy_vs_pruned.png"))
    norm_fr = cfg.normalizer_fractions if cfg.normalizer_fractions is not None else cfg.fractions
    if select(records, experiment="normalizer"):
        figs["normalizer"] = rel(F.fig_normalizer(records, cfg.normalizer_importance, ref,
                                                  norm_fr, fig_dir / "normalizer.png"))
    spectra = _spectra(layout)
    if spectra:
        figs["spectra"] = rel(F.fig_spectra(spectra, fig_dir / "eigen_spectra.png"))
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
        figs["kept"] = rel(F.fig_kept_channels(kept_cfgs, fig_dir / "kept_channels.png"))
    if "threshold" in s:
        figs["threshold"] = rel(F.fig_threshold(records, ref, fig_dir / "threshold_finetune.png"))
    if "peers" in s:
        refs = {"tsra": ref} if ref is not None else {}
        if s["relu_accuracy"] is not None:
            refs["relu"] = s["relu_accuracy"]
        figs["peers"] = rel(F.fig_peers(records, refs, fig_dir / "peers.png"))
    if s["speed"]:
        figs["speed"] = rel(F.fig_speed([r for r in s["speed"] if r["method"] != "unpruned"],
                                        fig_dir / "speed.png"))
    s["figures"] = figs
    atomic_write_json(layout.summary, s)
    text = _markdown(s, cfg, records, figs)
    return atomic_write_text(layout.report, text)


def _markdown(s: dict[str, Any], cfg: ExperimentConfig, records: list[dict[str, Any]],
              figs: dict[str, str]) -> str:
    ref = s["unpruned_accuracy"]
    L: list[str] = ["# Change-of-basis pruning: experiment report", ""]
    tf = s.get("train") or {}
    L += ["## Setup", "",
          f"- Preset **{cfg.preset}**; seed {cfg.seed}. Settings: `config.json`; every "
          "measurement: `metrics.jsonl` (one JSON line per model); numbers below: "
          "`summary.json`; tables: `tables/*.csv`.",
          f"- Trained TSRA model: {s['unpruned_params']:,} parameters"
          if s["unpruned_params"] else "- Trained TSRA model: (no reference record)",
          ]
    if tf:
        L.append(f"- Training: {tf.get('steps')} steps ({tf.get('epochs', 0):.1f} epochs) in "
                 f"{tf.get('elapsed_s', 0):.0f} s; test accuracy at the end of training "
                 f"{_pct(tf.get('test_accuracy'), 2)}% (on the training run's test images).")
    L.append(f"- Every pruned model is evaluated on {s['eval_images'] or '?'} test images "
             f"(`eval_subset` = {cfg.eval_subset or 'all'}); the unpruned model scores "
             f"**{_pct(ref, 2)}%** on them.")
    L.append(f"- Calibration: {cfg.calib_samples:,} training images "
             f"({'with' if cfg.calib_augment else 'without'} crop/flip augmentation), one pass, "
             "uncentered second moments per subspace (`calibration.pt`).")
    if cfg.preset == "quick":
        L += ["", "> **Quick preset.** A width-1/8 model trained for a few minutes on a CPU: "
              "the numbers show the pipeline working and the qualitative trends, not the "
              "paper's accuracies. Run `cobkern run --preset paper` on a GPU for those."]
    L.append("")

    # 1. fixed ratio
    L += ["## 1. Fixed-ratio pruning, no fine-tuning", "",
          "Every CoB layer loses the same fraction `p = 1 − sqrt(1 − P)` of its channels, "
          "separately in U and in V, for a target fraction `P` of parameters; CoB rotates "
          "each layer into its principal basis first, the TSRA baseline prunes the original "
          "channels with the same importance. The x axis is the fraction of *all* parameters "
          "actually removed (biases included).", ""]
    if "fixed" in figs:
        L += [f"![accuracy vs % parameters pruned]({figs['fixed']})", ""]
    L += [f"**Reliable frontier** — {s['frontier_definition']}.", ""]
    rows = []
    for imp in cfg.importances:
        fc, fb = s["frontiers"].get(f"{imp}/cob"), s["frontiers"].get(f"{imp}/baseline")
        w = s["cob_wins"].get(imp, {})
        rows.append([imp.upper(), _frontier_text(fb), _frontier_text(fc),
                     f"{w['cob_better']} of {w['ratios']}" if w.get("ratios") else "not run"])
    L += [_md_table(["importance", "baseline frontier", "CoB frontier", "ratios where CoB > "
                     "baseline"], rows), ""]
    for imp in cfg.importances:
        pc = curve(records, method="cob", importance=imp, normalizer=cfg.normalizer,
                   finetuned=False)
        pb = {round(p["target"], 6): p for p in curve(records, method="baseline", importance=imp,
                                                      normalizer=cfg.normalizer, finetuned=False)}
        if not pc:
            continue
        trs = []
        for p in pc:
            b = pb.get(round(p["target"], 6))
            trs.append([f"{100 * p['target']:g}%", _pct(p["fraction_pruned"]) + "%",
                        _pct(p["accuracy"], 2), _pct(b["accuracy"], 2) if b else "–",
                        f"{100 * (p['accuracy'] - b['accuracy']):+.2f}" if b else "–"])
        L += [f"{imp.upper()} importance (accuracy %, normaliser `{cfg.normalizer}`):", "",
              _md_table(["target P", "pruned (CoB)", "CoB", "baseline", "CoB − baseline"], trs),
              ""]

    # 6. normaliser
    if "normalizer" in figs:
        L += ["## Normaliser: kept vs original width", "",
              "After pruning, the authors' RMSNorm averages over the kept channels, which "
              "rescales the activations by sqrt(C_kept / C); `original` keeps dividing by the "
              "unpruned width.", "", f"![normaliser]({figs['normalizer']})", ""]
        nr = []
        for method in ("cob", "baseline"):
            for norm in ("kept", "original"):
                for p in curve(records, method=method, importance=cfg.normalizer_importance,
                               normalizer=norm, finetuned=False):
                    nr.append([method, norm, f"{100 * p['target']:g}%", _pct(p["accuracy"], 2)])
        L += [_md_table(["method", "normaliser", "target P", "accuracy %"], nr), ""]

    # 3. lossless
    if "lossless" in s:
        ll = s["lossless"]
        L += ["## Lossless width: the rank tolerance alone", "",
              f"CoB with only the rank tolerance (`λ ≤ {ll['tol']:g}·λ_max` goes, "
              "normaliser `original`): directions the layer's input cannot reach carry no "
              "energy and are removed without changing the function (method.md §5: a TSRA "
              "layer with input width d spans at most 2(d + 1) directions).", "",
              f"- Parameters removed: **{_pct(ll['fraction_pruned'], 2)}%** "
              f"({ll['params_after']:,} left).",
              f"- Accuracy change: {100 * (ll['accuracy_change'] or 0):+.2f} points; "
              f"predictions identical on {_pct(ll['agreement'], 2)}% of the evaluation images; "
              f"largest logit change {ll['max_logit_diff']:.2e} (logits up to "
              f"{ll['logit_scale']:.2f}).", ""]
        bounds = ll.get("saturation_bound") or {}
        lr_ = [[x["name"], x["before"], x["after"], bounds.get(x["name"], "–")]
               for x in ll["layers"] if x["after"] != x["before"]]
        if lr_:
            L += ["Layers that lost width (the bound 2(d + 1), d the producer's fan-in):", "",
                  _md_table(["layer", "channels", "kept", "bound 2(d+1)"], lr_), ""]
        else:
            L += ["No layer had unreachable directions at this tolerance.", ""]

    # 2. thresholds
    if "threshold" in s:
        L += ["## 2. Threshold pruning + fine-tuning", "",
              "Per-subspace thresholds on the importance (L2): prop-of-max prunes `s < t·max`, "
              "z-score `(s − mean)/std < t`, prop-of-mean `s < t·mean`, prop-of-median "
              "`s < t·median`; then fine-tuning. Recipe: " + cfg.finetune.describe() + ".", ""]
        if "threshold" in figs:
            L += [f"![threshold pruning]({figs['threshold']})", ""]
        L += [_md_table(["method", "rule", "t", "FT steps", "% pruned", "acc. before FT",
                         "acc. after FT", "drop (points)"],
                        [[r["method"], r["strategy"], f"{r['t']:g}",
                          r.get("finetune_steps", "–"), _pct(r["fraction_pruned"]),
                          _pct(r["accuracy_before_ft"], 2), _pct(r["accuracy"], 2),
                          "–" if r["drop_points"] is None else f"{r['drop_points']:.2f}"]
                         for r in s["threshold"]]), ""]

    # 4. peers
    if "peers" in s:
        L += ["## 4. Peer comparison: Torch-Pruning", "",
              "Torch-Pruning (`torch-pruning`) magnitude pruning (group L2 / L1 norm of the "
              "coupled weights) with a uniform channel ratio `1 − sqrt(1 − P)`, the logits "
              "protected, through cobkern's integration "
              "(`cobkern.integrations.torch_pruning`: TSRA / RMSNorm registered as custom "
              "pruners, a guard that keeps one channel per subspace). Same budgets and same "
              "fine-tuning as CoB.", ""]
        if "peers" in figs:
            L += [f"![peers]({figs['peers']})", ""]
        L += [_md_table(["method", "model", "target P", "FT steps", "% pruned",
                         "acc. before FT", "acc. after FT"],
                        [[r["method"], r["arch"], f"{100 * r['target']:g}%",
                          r.get("finetune_steps", 0), _pct(r["fraction_pruned"]),
                          _pct(r["accuracy_before_ft"], 2),
                          _pct(r["accuracy"], 2)] for r in sorted(
                              s["peers"], key=lambda r: (r["target"], r["arch"], r["method"]))]),
              ""]

    # 5. speed
    if s["speed"]:
        sp = s["speed"]
        dev = sp[0].get("device")
        L += ["## 5. What pruning buys: parameters, FLOPs, speed", "",
              f"Measured on {dev}, random inputs, median of {cfg.speed_repeats} timed runs "
              "after warm-up.", ""]
        if "speed" in figs:
            L += [f"![speed]({figs['speed']})", ""]
        L += [_md_table(
            ["model", "params", "GFLOPs/img", f"latency ms (batch {sp[0]['batch_small']})",
             f"images/s (batch {sp[0]['batch_large']})", "FLOPs ×", "latency ×",
             "throughput ×"],
            [[("unpruned" if r["method"] == "unpruned" else f"CoB {100 * r['target']:g}%"),
              f"{r['params']:,}", f"{r['flops'] / 1e9:.4f}",
              f"{r['latency_ms_b1']:.2f}" if r["latency_ms_b1"] else "–",
              f"{r['throughput_bmax']:.0f}" if r["throughput_bmax"] else "–",
              f"{r.get('flops_ratio', 1):.2f}", _ratio(r.get("speedup_b1")),
              _ratio(r.get("speedup_bmax"))] for r in sp]), "",
              "Where the speed-up comes from: CoB pruning is structured — it deletes whole "
              "channels and rebuilds every `Conv2d` / `Linear` as a smaller dense layer (no "
              "masks, no sparse formats), so each convolution's work falls with the product of "
              "its kept input and output channels and any dense kernel runs it faster. "
              "Libraries that prune by zeroing weights (masks, unstructured sparsity) keep the "
              "dense shapes, which is why their users often see no speed-up. The measured "
              "speed-up trails the FLOPs reduction where a run is bound by fixed costs rather "
              "than arithmetic: at batch 1 (kernel launches and per-layer overheads dominate, "
              "most of all on a GPU) and for the thin late layers." + _speed_summary(sp), ""]

    # spectra & kept channels
    if "spectra" in figs:
        L += ["## Eigenvalue spectra", "",
              "Eigenvalues of each layer's uncentered second moment, per subspace, "
              "normalised by the largest. Fast decay means a few principal directions carry "
              "the activations' energy, so pruning the rest in the rotated basis loses little; "
              "a sheer drop to ~0 marks width beyond the layer's reachable rank.", "",
              f"![spectra]({figs['spectra']})", ""]
    if "kept" in figs:
        L += ["## Kept channels per layer", "", f"![kept channels]({figs['kept']})", ""]

    # 7. context + side by side
    L += ["## Context: published VGG-16 / CIFAR-10 structured pruning", "",
          _md_table(["method", "venue", "baseline %", "pruned %", "change (points)",
                     "params removed", "FLOPs removed"],
                    [[p["method"], p["venue"], p["baseline"], p["pruned"],
                      f"{p['pruned'] - p['baseline']:+.2f}", f"{p['params_pct']}%",
                      f"{p['flops_pct']}%"] for p in PUBLISHED]),
          "", "Caveat: " + PUBLISHED_CAVEAT, ""]
    L += ["## Side by side: the paper's claims and this run", "",
          _md_table(["claim (paper)", "this run"], _side_by_side(s, cfg)), ""]
    if s.get("relu_accuracy") is None:
        L += ["(The ReLU control was not trained in this run, so the accuracy gap is not "
              "measured.)", ""]
    L += ["---", "Generated by `cobkern report` from the files in this directory; re-run it "
          "to rebuild this page (nothing is recomputed).", ""]
    return "\n".join(L)


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _speed_summary(sp: list[dict[str, Any]]) -> str:
    """One sentence on what this run measured at large batch (most-pruned model)."""
    pruned = [r for r in sp if r["method"] != "unpruned" and r.get("speedup_bmax")]
    if not pruned:
        return ""
    r = max(pruned, key=lambda r: r.get("flops_ratio", 1))
    return (f" In this run the most pruned model (CoB {100 * r['target']:g}%) has "
            f"{r.get('flops_ratio', 1):.2f}× fewer FLOPs and {r['speedup_bmax']:.2f}× the "
            f"throughput at batch {r['batch_large']}.")


def _frontier_text(f: dict[str, Any] | None) -> str:
    """``"28.6% (fails at 48.4%)"``: parameters removed at the frontier and at the first
    target that fails — one unit (summaries written before ``next_achieved`` existed name
    that target instead)."""
    if f is None:
        return "none"
    text = f"{_pct(f['achieved'])}%"
    if f.get("next_achieved") is not None:
        text += f" (fails at {_pct(f['next_achieved'])}%)"
    elif f.get("next_target") is not None:
        text += f" (fails at target P = {100 * f['next_target']:g}%)"
    return text


def _side_by_side(s: dict[str, Any], cfg: ExperimentConfig) -> list[list[str]]:
    rows = []
    gap = s.get("tsra_minus_relu_points")
    rows.append([PAPER_CLAIMS["gap"], "not measured" if gap is None
                 else f"TSRA {_pct(s['unpruned_accuracy'], 2)}% vs ReLU "
                      f"{_pct(s['relu_accuracy'], 2)}%: {abs(gap):.2f} points "
                      f"{'below' if gap < 0 else 'above'}"])
    wins = "; ".join(f"{imp.upper()}: CoB better at {w['cob_better']} of {w['ratios']} ratios"
                     for imp, w in s["cob_wins"].items() if w.get("ratios"))
    rows.append([PAPER_CLAIMS["fixed"], wins or "not run"])
    fr = []
    for imp in cfg.importances:
        fb, fc = s["frontiers"].get(f"{imp}/baseline"), s["frontiers"].get(f"{imp}/cob")
        if f"{imp}/cob" in s["frontiers"]:
            fr.append(f"{imp.upper()}: {_frontier_text(fb)} → {_frontier_text(fc)}")
    rows.append([PAPER_CLAIMS["frontier"], "; ".join(fr) or "not run"])
    th = [r for r in s.get("threshold", []) if r["method"] == "cob"]
    if th:
        best = max(th, key=lambda r: r["fraction_pruned"])
        pruned = ", ".join(_pct(r["fraction_pruned"]) + "%" for r in th)
        rows.append([PAPER_CLAIMS["threshold"],
                     f"CoB {pruned} pruned; "
                     f"at {_pct(best['fraction_pruned'])}%: "
                     + ("no reference accuracy" if best["drop_points"] is None
                        else f"{best['drop_points']:.2f} point drop")
                     + " "
                     f"after {best.get('finetune_steps') or cfg.finetune.steps} fine-tuning "
                     "steps"])
    else:
        rows.append([PAPER_CLAIMS["threshold"], "not run"])
    ll = s.get("lossless")
    if ll:
        first = next((x for x in ll["layers"] if x["name"].startswith("classifier")), None)
        bound = (ll.get("saturation_bound") or {}).get(first["name"]) if first else None
        rows.append([PAPER_CLAIMS["lossless"],
                     f"{first['name']}: {first['after']} of {first['before']} kept (bound "
                     f"{bound}); {_pct(ll['fraction_pruned'], 2)}% of parameters removed, "
                     f"{_pct(ll['agreement'], 2)}% predictions unchanged" if first
                     else "no classifier layer"])
    else:
        rows.append([PAPER_CLAIMS["lossless"], "not run"])
    return rows


