"""Report: the frontier definition, summaries and a report built from records alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cobkern.cli.main import main
from cobkern.experiments import ExperimentConfig, MissingStepError
from cobkern.experiments.files import append_jsonl, atomic_write_json, read_jsonl
from cobkern.report import build_report, dedupe, reliable_frontier, summarize


def _pt(target: float, acc: float, method: str = "cob", imp: str = "l2") -> dict:
    return {"experiment": "fixed", "key": f"{method}|{imp}|{target}", "method": method,
            "arch": "tsra", "importance": imp, "normalizer": "kept", "strategy": "param_target",
            "value": [target, target], "target": target, "finetuned": False,
            "fraction_pruned": target * 0.98, "params_before": 1000,
            "params_after": int(1000 * (1 - target * 0.98)), "accuracy": acc, "loss": 1.0,
            "n_eval": 2000}


def test_frontier_is_the_last_point_of_the_unbroken_run_within_tolerance() -> None:
    pts = [_pt(0.0, 0.90), _pt(0.3, 0.895), _pt(0.5, 0.891), _pt(0.7, 0.85), _pt(0.8, 0.895)]
    f = reliable_frontier(pts, 0.90, 0.01)
    assert f is not None and f["frontier"] == 0.5  # 0.8 recovers but 0.7 broke the run
    assert f["achieved"] == pytest.approx(0.49)
    assert reliable_frontier(pts, 0.90, 0.1)["frontier"] == 0.8
    assert reliable_frontier([_pt(0.3, 0.5)], 0.90, 0.01) is None
    # order of the input does not matter
    assert reliable_frontier(list(reversed(pts)), 0.90, 0.01)["frontier"] == 0.5


def test_dedupe_keeps_the_last_record_per_key() -> None:
    a, b = _pt(0.3, 0.5), _pt(0.3, 0.7)
    assert dedupe([a, b, {"experiment": "evaluate"}]) == [b, {"experiment": "evaluate"}]


def _records() -> list[dict]:
    ref = {"experiment": "reference", "key": "reference|tsra", "method": "unpruned",
           "arch": "tsra", "finetuned": False, "target": 0.0, "params_before": 1000,
           "params_after": 1000, "fraction_pruned": 0.0, "accuracy": 0.90, "loss": 0.3,
           "n_eval": 2000}
    recs = [ref]
    for imp in ("l2", "l1"):
        recs += [_pt(t, a, "cob", imp) for t, a in
                 [(0.0, 0.90), (0.3, 0.899), (0.5, 0.895), (0.7, 0.893), (0.9, 0.5)]]
        recs += [_pt(t, a, "baseline", imp) for t, a in
                 [(0.0, 0.90), (0.3, 0.895), (0.5, 0.80), (0.7, 0.5), (0.9, 0.1)]]
    recs.append({"experiment": "speed", "key": "speed|unpruned|0|b1|cpu", "method": "unpruned",
                 "target": 0.0, "params": 1000, "flops": 8000, "batch": 1, "latency_ms": 2.0,
                 "throughput": 500.0, "device": "CPU"})
    recs.append({"experiment": "speed", "key": "speed|cob|0.7|b1|cpu", "method": "cob",
                 "target": 0.7, "params": 300, "flops": 2000, "batch": 1, "latency_ms": 1.0,
                 "throughput": 1000.0, "device": "CPU"})
    return recs


def test_summary_numbers() -> None:
    s = summarize(_records(), ExperimentConfig())
    assert s["unpruned_accuracy"] == 0.90
    assert s["frontiers"]["l2/cob"]["target"] == 0.7
    assert s["frontiers"]["l2/baseline"]["target"] == 0.3
    assert s["frontiers"]["l2/baseline"]["next_target"] == 0.5
    assert s["frontiers"]["l2/baseline"]["next_achieved"] == pytest.approx(0.49)
    assert s["cob_wins"]["l1"] == {"ratios": 4, "cob_better": 4, "ties": 0}
    (row,) = [r for r in s["speed"] if r["method"] == "cob"]
    assert row["flops_ratio"] == 4.0 and row["speedup_b1"] == 2.0
    assert row["params_ratio"] == 1000 / 300


def test_report_from_records_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    atomic_write_json(out / "config.json", {"experiment": ExperimentConfig(
        fractions=[0.0, 0.3, 0.5, 0.7, 0.9]).to_dict()})
    for r in _records():
        append_jsonl(out / "metrics.jsonl", r)
    path = build_report(out)
    text = path.read_text()
    assert "figures/accuracy_vs_pruned.png" in text and "figures/speed.png" in text
    # the baseline frontier, L2: 0.3 * 0.98 removed; the failing target 0.5 removed 0.49
    # (both achieved fractions: "fails at 50%" mixed in the next point's *target*)
    assert "29.4% (fails at 49.0%)" in text
    assert "68.6%" in text  # the CoB frontier: 0.7 * 0.98
    assert "15 M" in text and "HRank" in text and "CHIP" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["frontiers"]["l1/cob"]["target"] == 0.7
    assert (out / "tables" / "fixed_ratio.csv").read_text().count("\n") == 1 + 20
    assert (out / "figures" / "accuracy_vs_pruned.png").stat().st_size > 1000
    # the report is a pure function of the files
    assert build_report(out).read_text() == text


def test_report_without_sweep_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(MissingStepError, match="cobkern sweep --out"):
        build_report(tmp_path)


def test_jsonl_skips_torn_lines(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"a": 1, "nan": float("nan")})
    with open(p, "a") as f:
        f.write('{"b": 2')  # a line torn by a crash
    assert read_jsonl(p) == [{"a": 1, "nan": None}]
    assert main(["report", "--out", str(tmp_path / "none")]) == 2


def test_append_after_a_torn_line_keeps_the_new_record(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"a": 1})
    with open(p, "a") as f:
        f.write('{"b": 2')  # a line torn by a crash
    append_jsonl(p, {"c": 3})
    append_jsonl(p, {"d": 4})
    assert read_jsonl(p) == [{"a": 1}, {"c": 3}, {"d": 4}]


def _threshold(method: str, steps: int, acc: float) -> dict:
    return {"experiment": "threshold", "key": f"{method}|tsra|l2|kept|max:0.1,0.1|ft{steps}",
            "method": method, "arch": "tsra", "importance": "l2", "normalizer": "kept",
            "strategy": "max", "value": [0.1, 0.1], "target": None, "finetuned": True,
            "fraction_pruned": 0.5, "params_after": 500, "accuracy_before_ft": 0.5,
            "accuracy": acc, "loss": 1.0, "finetune_steps": steps}


def test_threshold_and_peer_tables_show_the_current_recipe_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = ExperimentConfig(fractions=[0.0, 0.3, 0.5, 0.7, 0.9]).with_overrides(
        {"finetune": {"steps": 3}})
    atomic_write_json(out / "config.json", {"experiment": cfg.to_dict()})
    recs = _records() + [_threshold("cob", 2, 0.61), _threshold("cob", 3, 0.83),
                         _threshold("baseline", 3, 0.7)]
    recs += [{"experiment": "peers", "key": f"tp-l2|tsra|l2|kept|tp_ratio:0.5|ft{s}",
              "method": "tp-l2", "arch": "tsra", "importance": "l2", "strategy": "tp_ratio",
              "target": 0.5, "finetuned": True, "finetune_steps": s, "fraction_pruned": 0.5,
              "accuracy_before_ft": 0.3, "accuracy": a} for s, a in ((2, 0.41), (3, 0.42))]
    for r in recs:
        append_jsonl(out / "metrics.jsonl", r)
    text = build_report(out).read_text()
    s = json.loads((out / "summary.json").read_text())
    assert [(r["method"], r["finetune_steps"]) for r in s["threshold"]] == \
        [("cob", 3), ("baseline", 3)]
    assert [r["finetune_steps"] for r in s["peers"]] == [3]
    assert "61.00" not in text and "83.00" in text and "41.00" not in text
    with open(out / "tables" / "threshold_finetune.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["finetune_steps"]) for r in rows] == [("cob", "3"),
                                                                  ("baseline", "3")]
    with open(out / "tables" / "peers.csv") as f:
        assert [r["finetune_steps"] for r in csv.DictReader(f)] == ["3"]
    assert "after 3 fine-tuning steps" in text


def test_side_by_side_says_not_run_without_the_fixed_sweep(tmp_path: Path) -> None:
    out = tmp_path / "out"
    atomic_write_json(out / "config.json", {"experiment": ExperimentConfig().to_dict()})
    for r in _records()[:1] + [_threshold("cob", 2000, 0.8)]:
        append_jsonl(out / "metrics.jsonl", r)
    text = build_report(out).read_text()
    assert "0 of 0" not in text
    row = next(line for line in text.splitlines() if "TSRA baseline at every ratio" in line)
    assert row.rstrip(" |").endswith("not run")


def test_records_of_other_inputs_are_not_reported(tmp_path: Path) -> None:
    from cobkern.experiments.identity import record_is_current

    cur = {"model": {"tsra": "m1", "relu": None}, "calibration": "c1",
           "eval": {"subset": 0, "seed": 0}, "finetune": {"steps": 2}}
    ok = {"key": "k", "arch": "tsra",
          "inputs": {"model": "m1", "calibration": "c1", "eval": {"subset": 0, "seed": 0}}}
    assert record_is_current(ok, cur)
    for field, value in (("model", "m2"), ("calibration", "c2"),
                         ("eval", {"subset": 60, "seed": 0}), ("finetune", {"steps": 3})):
        assert not record_is_current({**ok, "inputs": {**ok["inputs"], field: value}}, cur)
    assert not record_is_current({**ok, "arch": "relu"}, cur)  # no ReLU model now
    assert record_is_current({"experiment": "evaluate"}, cur)  # a one-off line


def test_report_wording_follows_the_measurements(tmp_path: Path) -> None:
    """The ReLU gap row said "-4.00 points below" when TSRA was above; the normaliser text
    had the rescaling factor upside down; the speed section claimed that large batches
    approach the FLOPs ratio whatever was measured, and printed 1.00 for a speed-up that
    was not measured."""
    out = tmp_path / "out"
    atomic_write_json(out / "config.json", {"experiment": ExperimentConfig(
        fractions=[0.0, 0.3, 0.5, 0.7, 0.9], speed_batches=[1, 64]).to_dict()})
    recs = _records()
    recs.append({**recs[0], "key": "reference|relu", "arch": "relu", "accuracy": 0.86})
    recs.append({"experiment": "speed", "key": "speed|unpruned|0|b64|cpu",
                 "method": "unpruned", "target": 0.0, "params": 1000, "flops": 8000,
                 "batch": 64, "latency_ms": 20.0, "throughput": 3200.0, "device": "CPU"})
    recs.append({"experiment": "speed", "key": "speed|cob|0.7|b64|cpu", "method": "cob",
                 "target": 0.7, "params": 300, "flops": 2000, "batch": 64, "latency_ms": 12.0,
                 "throughput": 5000.0, "device": "CPU"})
    for r in recs:
        append_jsonl(out / "metrics.jsonl", r)
    text = build_report(out).read_text()
    assert "TSRA 90.00% vs ReLU 86.00%: 4.00 points above" in text
    assert "approaches the FLOPs ratio" not in text
    assert ("the most pruned model (CoB 70%) has 4.00× fewer FLOPs and 1.56× the throughput "
            "at batch 64") in text
    from cobkern.report import markdown as report_md

    assert report_md._ratio(None) == "–" and report_md._ratio(2.0) == "2.00"
    assert "sqrt(C / C_kept)" not in Path(report_md.__file__).read_text()


def test_speed_ratios_never_mix_devices() -> None:
    """A CPU run followed by a GPU run of the unpruned model only: the speed-up divided the
    GPU's time by the CPU's (0.53× and 0.03× in an audit). Rows come from one device, the
    one measured last."""
    recs = [r for r in _records() if r["experiment"] != "speed"]
    cpu = [r for r in _records() if r["experiment"] == "speed"]
    gpu = {**cpu[0], "key": "speed|unpruned|0|b1|NVIDIA H100", "latency_ms": 0.1,
           "device": "NVIDIA H100"}
    s = summarize(recs + cpu + [gpu], ExperimentConfig())
    assert {r["device"] for r in s["speed"]} == {"NVIDIA H100"}
    assert [r["method"] for r in s["speed"]] == ["unpruned"]
    s = summarize(recs + [gpu] + cpu, ExperimentConfig())  # the CPU measured last
    (row,) = [r for r in s["speed"] if r["method"] == "cob"]
    assert row["device"] == "CPU" and row["speedup_b1"] == 2.0


def test_result_sections_are_numbered_in_order(tmp_path: Path) -> None:
    """Result sections are numbered 1, 2, ... in the order they appear, whichever
    experiments ran (a run without the normaliser or threshold sweeps had read 1, 5)."""
    import re

    out = tmp_path / "out"
    atomic_write_json(out / "config.json", {"experiment": ExperimentConfig(
        fractions=[0.0, 0.3, 0.5, 0.7, 0.9]).to_dict()})
    for r in _records():
        append_jsonl(out / "metrics.jsonl", r)
    text = build_report(out).read_text()
    numbered = re.findall(r"^## (\d+)\. (.+)$", text, flags=re.MULTILINE)
    assert [int(n) for n, _ in numbered] == list(range(1, len(numbered) + 1))
    assert [t for _, t in numbered][:2] == ["Fixed-ratio pruning, no fine-tuning",
                                             "What pruning buys: parameters, FLOPs, speed"]


def test_normaliser_table_has_one_row_per_target(tmp_path: Path) -> None:
    """The kept-vs-original comparison is one row per target P with a column per
    (method, normaliser); a target swept for one normaliser only shows '–' for the other."""
    out = tmp_path / "out"
    atomic_write_json(out / "config.json", {"experiment": ExperimentConfig(
        fractions=[0.0, 0.3, 0.5, 0.7, 0.9]).to_dict()})
    recs = _records()
    for method, acc in (("cob", 0.885), ("baseline", 0.60)):
        r = _pt(0.5, acc, method)
        r.update(experiment="normalizer", normalizer="original",
                 key=f"norm|{method}|original|0.5")
        recs.append(r)
    for r in recs:
        append_jsonl(out / "metrics.jsonl", r)
    text = build_report(out).read_text()
    lines = text.splitlines()
    head = lines.index("| target P | CoB, kept | CoB, original | baseline, kept | "
                       "baseline, original |")
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines[head + 2:]
            if ln.startswith("| ")}
    assert rows["50%"] == "| 50% | 89.50 | 88.50 | 80.00 | 60.00 |"
    assert rows["30%"] == "| 30% | 89.90 | – | 89.50 | – |"


# ---------------------------------------------------------------------------- mutation gaps
def test_frontier_tolerance_is_inclusive_despite_float_round_off() -> None:
    """A point exactly `tolerance` below the reference is within it ("stays within 1
    point"): both when ``ref - tol`` is exact in floating point (0.90 - 0.01) and when it
    rounds up past the accuracy (0.5006 - 0.01 = 0.49060000000000004 > 2453/5000)."""
    pts = [_pt(0.0, 0.90), _pt(0.3, 0.89), _pt(0.5, 0.8899)]
    assert reliable_frontier(pts, 0.90, 0.01)["frontier"] == 0.3
    assert 0.5006 - 0.01 > 2453 / 5000  # the round-off this test is about
    pts = [_pt(0.0, 0.5006), _pt(0.3, 2453 / 5000), _pt(0.5, 2452 / 5000)]
    assert reliable_frontier(pts, 0.5006, 0.01)["frontier"] == 0.3


def test_cob_wins_count_ties_apart() -> None:
    """A ratio where CoB and the baseline score the same is a tie, not a CoB win."""
    recs = [r for r in _records() if not (r.get("method") == "baseline"
                                          and r.get("importance") == "l2"
                                          and r.get("target") == 0.3)]
    recs.append(_pt(0.3, 0.899, "baseline", "l2"))  # = CoB's accuracy at 0.3
    s = summarize(recs, ExperimentConfig())
    assert s["cob_wins"]["l2"] == {"ratios": 4, "cob_better": 3, "ties": 1}


def test_summary_signs_of_drops_and_changes() -> None:
    """drop_points is positive for a model below the reference; the lossless
    accuracy_change is negative for one below it (exact to float round-off: 1e-9)."""
    recs = _records() + [
        _threshold("cob", 2000, 0.85),
        {"experiment": "lossless", "key": "cob|tsra|l2|original|lossless:1e-07,1e-07|ft0",
         "method": "cob", "arch": "tsra", "strategy": "lossless", "value": [1e-7, 1e-7],
         "target": None, "finetuned": False, "fraction_pruned": 0.2, "params_after": 800,
         "accuracy": 0.89, "agreement": 0.99, "max_logit_diff": 0.1, "logit_scale": 10.0,
         "layers": [], "saturation_bound": {}}]
    s = summarize(recs, ExperimentConfig())
    (th,) = s["threshold"]
    assert th["drop_points"] == pytest.approx(5.0, abs=1e-9)
    assert s["lossless"]["accuracy_change"] == pytest.approx(-0.01, abs=1e-9)
    assert s["lossless"]["tol"] == 1e-7


def test_normaliser_experiment_points_stay_out_of_the_fixed_curves() -> None:
    """The normaliser sweep's "original" points (config normaliser "kept") are not part of
    the fixed-ratio curves, their frontier or the CoB-vs-baseline count."""
    recs = _records()
    for method in ("cob", "baseline"):
        r = _pt(0.3, 0.1, method)
        r.update(experiment="normalizer", normalizer="original", key=f"norm|{method}|0.3")
        recs.append(r)
    s = summarize(recs, ExperimentConfig())
    assert [p["target"] for p in s["fixed"]["l2/cob"]] == [0.0, 0.3, 0.5, 0.7, 0.9]
    assert s["frontiers"]["l2/cob"]["target"] == 0.7
    assert s["cob_wins"]["l2"] == {"ratios": 4, "cob_better": 4, "ties": 0}


def test_summary_reports_the_last_record_of_a_key() -> None:
    """summarize() dedupes by itself: a point measured again replaces the old one."""
    stale = _pt(0.3, 0.2, "cob", "l2")  # an earlier measurement of the same key
    s = summarize([stale] + _records(), ExperimentConfig())
    assert [p["accuracy"] for p in s["fixed"]["l2/cob"]][1] == 0.899
    assert s["frontiers"]["l2/cob"]["target"] == 0.7


def test_peers_without_finetuning_are_reported_when_the_config_says_so() -> None:
    """peer_finetune=false: the peers are measured without fine-tuning and are this run's,
    whatever finetune.steps says."""
    peer = {"experiment": "peers", "key": "tp-l2|tsra|l2|kept|tp_ratio:0.5|ft0",
            "method": "tp-l2", "arch": "tsra", "importance": "l2", "strategy": "tp_ratio",
            "target": 0.5, "finetuned": False, "fraction_pruned": 0.5, "accuracy": 0.4}
    cfg = ExperimentConfig(peer_finetune=False, peer_fractions=[0.5, 0.7])
    s = summarize(_records() + [peer], cfg)
    # CoB at the same budgets, un-fine-tuned like the peers: the fixed sweep's records of
    # those keys (the comparison had no CoB point at all)
    assert [(r["method"], r["target"], r["finetune_steps"]) for r in s["peers"]] == \
        [("tp-l2", 0.5, 0), ("cob", 0.5, 0), ("cob", 0.7, 0)]
    assert [r["accuracy"] for r in s["peers"][1:]] == [0.895, 0.893]
    assert "peers" not in summarize(_records() + [peer], ExperimentConfig())


def test_records_of_another_eval_seed_are_not_current() -> None:
    """The test images depend on the seed as well as on eval_subset."""
    from cobkern.experiments.identity import eval_inputs, plain, record_is_current

    cfg0, cfg1 = ExperimentConfig(), ExperimentConfig(seed=1)
    rec = {"key": "k", "arch": "tsra", "inputs": {"model": "m1", "eval": plain(eval_inputs(cfg0))}}
    cur = {"model": {"tsra": "m1", "relu": None}, "calibration": None}
    assert record_is_current(rec, {**cur, "eval": plain(eval_inputs(cfg0))})
    assert not record_is_current(rec, {**cur, "eval": plain(eval_inputs(cfg1))})


def test_threshold_and_peer_records_of_another_normaliser_are_not_this_runs() -> None:
    """The tables have no normaliser column: a record measured with the other normaliser
    would show as a duplicate row with other numbers."""
    other = dict(_threshold("cob", 2000, 0.61), normalizer="original",
                 key="cob|tsra|l2|original|max:0.1,0.1|ft2000")
    s = summarize(_records() + [_threshold("cob", 2000, 0.83), other], ExperimentConfig())
    assert [r["accuracy"] for r in s["threshold"]] == [0.83]
    s = summarize(_records() + [_threshold("cob", 2000, 0.83), other],
                  ExperimentConfig(normalizer="original"))
    assert [r["accuracy"] for r in s["threshold"]] == [0.61]


def _lossless(tol: float, frac: float) -> dict:
    return {"experiment": "lossless", "key": f"lossless|{tol}", "method": "cob",
            "arch": "tsra", "strategy": "lossless", "value": [tol, tol],
            "fraction_pruned": frac, "params_after": 1, "accuracy": 0.9}


def test_lossless_summary_is_the_configured_tolerance_not_the_last_key() -> None:
    """Records are deduplicated where each key first appeared, so the last one need not be
    the latest: the summary takes the record of the config's tolerance (or the default)."""
    recs = _records() + [_lossless(1e-10, 0.50), _lossless(1e-3, 0.74)]
    assert summarize(recs, ExperimentConfig())["lossless"]["tol"] == 1e-10
    s = summarize(recs, ExperimentConfig(lossless_tol=1e-3))["lossless"]
    assert (s["tol"], s["fraction_pruned"]) == (1e-3, 0.74)


def test_speed_section_states_the_repeats_that_were_measured(tmp_path: Path) -> None:
    """speed_repeats is not part of a speed record's identity (old records are reused):
    the report states the records' own count."""
    out = tmp_path / "out"
    cfg = ExperimentConfig(fractions=[0.0, 0.3, 0.5, 0.7, 0.9], speed_repeats=50)
    atomic_write_json(out / "config.json", {"experiment": cfg.to_dict()})
    for r in _records():
        append_jsonl(out / "metrics.jsonl", dict(r, repeats=5) if r["experiment"] == "speed"
                     else r)
    text = build_report(out).read_text()
    assert "median of 5 timed runs" in text and "median of 50" not in text


def test_a_cob_model_at_zero_pruning_has_a_speed_row_of_its_own() -> None:
    """speed_fractions may hold 0.0: the CoB model at P = 0 shares the unpruned model's
    target and round_to, and rows grouped by those two merged them — the unpruned row (the
    one every ratio is relative to) disappeared."""
    recs = [r for r in _records() if r["experiment"] != "speed"]
    cpu = [r for r in _records() if r["experiment"] == "speed"]
    p0 = {**cpu[1], "key": "speed|cob|0|b1|cpu", "target": 0.0, "params": 990, "flops": 7900,
          "latency_ms": 2.2}
    s = summarize(recs + [cpu[0], p0, cpu[1]], ExperimentConfig())
    assert [(r["method"], r["target"]) for r in s["speed"]] == \
        [("unpruned", 0.0), ("cob", 0.0), ("cob", 0.7)]
    assert s["speed"][0]["speedup_b1"] == 1.0
    assert s["speed"][1]["speedup_b1"] == pytest.approx(2.0 / 2.2)
    assert s["speed"][1]["params"] == 990


def _lossless_record(**kw) -> dict:
    return {"experiment": "lossless", "key": "cob|tsra|l2|original|lossless:1e-07,1e-07|ft0",
            "method": "cob", "arch": "tsra", "strategy": "lossless", "value": [1e-7, 1e-7],
            "target": None, "finetuned": False, "fraction_pruned": 0.2, "params_after": 800,
            "accuracy": 0.89, "agreement": 0.99, "max_logit_diff": 0.1, "logit_scale": 10.0,
            "layers": [], "saturation_bound": {}, **kw}


def _write_records(out: Path, records: list[dict], config: bool = True) -> None:
    if config:
        atomic_write_json(out / "config.json", {"experiment": ExperimentConfig(
            fractions=[0.0, 0.3, 0.5, 0.7, 0.9]).to_dict()})
    (out / "metrics.jsonl").unlink(missing_ok=True)
    for r in records:
        append_jsonl(out / "metrics.jsonl", r)


def test_a_rebuilt_report_leaves_no_stale_tables_or_figures(tmp_path: Path) -> None:
    """Optional tables and figures were written only when their section existed, so after
    a section went away (its records no longer current) the old files stayed, with the old
    numbers, next to a report that no longer had the section."""
    out = tmp_path / "out"
    _write_records(out, _records() + [_lossless_record()])
    build_report(out)
    for f in ("tables/speed.csv", "tables/lossless_layers.csv", "figures/speed.png",
              "figures/accuracy_vs_pruned.png"):
        assert (out / f).is_file(), f
    _write_records(out, [r for r in _records() if r["experiment"] == "reference"])
    text = build_report(out).read_text()
    for f in ("tables/speed.csv", "tables/lossless_layers.csv", "figures/speed.png",
              "figures/accuracy_vs_pruned.png"):
        assert not (out / f).exists(), f
    assert (out / "tables/published.csv").is_file()  # always written
    # no fixed-ratio records: no fixed-ratio section (it used to show "none" frontiers,
    # which means "measured, failing at once"), and the claims table says "not run"
    assert "Fixed-ratio pruning" not in text and "| none |" not in text
    assert "not run" in text


def test_report_without_config_json_reads_the_records_with_the_steps_settings(
        tmp_path: Path) -> None:
    """Without OUT/config.json the pipeline's steps run the quick preset, but the report
    judged their records by ExperimentConfig()'s defaults (another eval_subset and
    fine-tuning recipe): every record looked stale and the report came out empty."""
    from cobkern.experiments import get_experiment_preset
    from cobkern.experiments.identity import eval_inputs

    quick = get_experiment_preset("quick")
    out = tmp_path / "out"
    recs = _records()
    for r in recs:  # records as the steps write them: with the inputs they depend on
        r["inputs"] = {"eval": eval_inputs(quick)}
    _write_records(out, recs, config=False)
    text = build_report(out).read_text()
    assert "(no reference record)" not in text and "68.6%" in text


def test_setup_states_the_calibration_and_width_used_and_tolerates_null_logits(
        tmp_path: Path) -> None:
    """The setup stated the configured calibration count (not the images the pass used)
    and always a width-1/8 model; a lossless record whose logits were not finite (written
    as null) crashed the report with a TypeError."""
    import torch

    from cobkern.cob.stats import CalibrationStats, LayerStats

    out = tmp_path / "out"
    _write_records(out, _records() + [_lossless_record(max_logit_diff=None, logit_scale=None)])
    g = torch.eye(2, dtype=torch.float64)
    layer = LayerStats("features.0", 4, 2, g, g, torch.ones(4, dtype=torch.float64),
                       torch.ones(4, dtype=torch.float64), 100)
    CalibrationStats({"features.0": layer}, 240, {}).save(out / "calibration.pt")
    atomic_write_json(out / "train" / "config.json", {"width": 0.0625})  # Layout.train_dir
    text = build_report(out).read_text()
    assert "Calibration: 240 training images" in text
    assert "A width-1/16 model" in text
    assert "largest logit change – (logits up to –;" in text


def test_a_fixed_ratio_point_the_peers_sweep_logged_first_is_in_every_output() -> None:
    """Without peer fine-tuning the peers' CoB point has the fixed sweep's key; run first
    (``cobkern sweep --experiments peers``), it logged that record as a "peers" one, the
    fixed sweep then skipped the key — and the summary's curves, frontier and CoB-vs-baseline
    count left the point out while report.md's table showed it."""
    from cobkern.report.summary import fixed_rows

    recs = _records()
    for r in recs:
        if r.get("key") == "cob|l2|0.5":
            r["experiment"] = "peers"
    for finetune in (False, True):  # also after peer_finetune is switched on
        s = summarize(recs, ExperimentConfig(peer_finetune=finetune, peer_fractions=[0.5]))
        assert [p["target"] for p in s["fixed"]["l2/cob"]] == [0.0, 0.3, 0.5, 0.7, 0.9]
        assert s["cob_wins"]["l2"] == {"ratios": 4, "cob_better": 4, "ties": 0}
        # a peers table of fine-tuned points does not show it
        assert [r["target"] for r in s.get("peers", [])] == ([] if finetune else [0.5])
    assert 0.5 in [r["target"] for r in fixed_rows(recs) if r["method"] == "cob"
                   and r["importance"] == "l2"]


def test_the_speed_table_shows_the_configured_batches() -> None:
    """After speed_batches changed from [1, 8] to [1, 4], the records of batch 8 (still
    current: the batch is in their key, not their inputs) stayed the "large batch" and the
    new batch-4 measurements showed nowhere."""
    recs = [r for r in _records() if r["experiment"] != "speed"]
    for method, target, params in (("unpruned", 0.0, 1000), ("cob", 0.7, 300)):
        for b, thr in ((1, 100.0), (8, 800.0), (4, 400.0)):
            recs.append({"experiment": "speed", "key": f"speed|{method}|{target}|b{b}|cpu",
                         "method": method, "target": target, "params": params,
                         "flops": 8 * params, "batch": b, "latency_ms": 1.0,
                         "throughput": thr * (2 if method == "cob" and b == 4 else 1),
                         "device": "CPU"})
    rows = summarize(recs, ExperimentConfig(speed_batches=[1, 4]))["speed"]
    assert {(r["batch_small"], r["batch_large"]) for r in rows} == {(1, 4)}
    assert [r["throughput_bmax"] for r in rows] == [400.0, 800.0]
    assert rows[1]["speedup_bmax"] == 2.0
    assert summarize(recs, ExperimentConfig(speed_batches=[1, 8]))["speed"][1][
        "speedup_bmax"] == 1.0


def test_the_lossless_summary_without_a_tolerance_is_the_default_the_sweep_used() -> None:
    """lossless_tol null → 1e-7 → null on float64 statistics (default 1e-10): the third
    sweep reused the 1e-10 record, but the summary took the newest record whose tolerance
    is any precision's default — the explicit 1e-7 one."""
    first = dict(_lossless(1e-10, 0.50), default_tol=1e-10, time="2026-11-29T10:00:00")
    explicit = dict(_lossless(1e-7, 0.60), default_tol=1e-10, time="2026-11-29T11:00:00")
    s = summarize(_records() + [first, explicit], ExperimentConfig())["lossless"]
    assert (s["tol"], s["fraction_pruned"]) == (1e-10, 0.50)
    s = summarize(_records() + [first, explicit], ExperimentConfig(lossless_tol=1e-7))
    assert s["lossless"]["tol"] == 1e-7


def test_the_speed_figure_names_its_batches_and_draws_no_bar_for_a_missing_ratio(
        tmp_path: Path, monkeypatch) -> None:
    """The legend said "batch 1" whatever speed_batches were, and a ratio that was not
    measured was drawn as a 0× bar (the table says "–")."""
    import math

    from cobkern.report import figures

    figs = []
    monkeypatch.setattr(figures, "save", lambda fig, path: figs.append(fig) or path)
    rows = [{"target": 0.5, "flops_ratio": 2.0, "speedup_b1": 1.5, "speedup_bmax": None,
             "batch_small": 16, "batch_large": 256}]
    figures.fig_speed(rows, tmp_path / "speed.png")
    ax = figs[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "FLOPs reduction ×", "latency speed-up ×, batch 16", "throughput speed-up ×, batch 256"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:2] == [2.0, 1.5] and math.isnan(heights[2])
    figures.plt.close(figs[0])


def test_the_setup_states_the_float32_products_the_statistics_record(tmp_path: Path) -> None:
    """The setup printed the config's calib_f32_dot ("float32 products on the GPU: fp64")
    even for statistics a CPU pass made, where no kernel (and no such product) ran. It
    states what calibration.pt records now."""
    import torch

    from cobkern.cob.stats import CalibrationStats, LayerStats

    out = tmp_path / "out"
    cfg = ExperimentConfig(calib_f32_dot="fp64")
    _write_records(out, _records(), config=False)
    atomic_write_json(out / "config.json", {"experiment": cfg.to_dict()})
    g = torch.eye(2, dtype=torch.float64)
    layer = LayerStats("features.0", 4, 2, g, g, torch.ones(4, dtype=torch.float64),
                       torch.ones(4, dtype=torch.float64), 100)
    for meta, shown in (({}, False), ({"f32_dot": "fp64"}, True)):
        CalibrationStats({"features.0": layer}, 240, meta).save(out / "calibration.pt")
        text = build_report(out).read_text()
        assert ("float32 products on the GPU: `fp64`" in text) is shown


def test_relu_peers_do_not_depend_on_the_normaliser() -> None:
    """The ReLU control has no RMSNorm, but its Torch-Pruning peers were keyed (and filtered)
    by the normaliser: switching it pruned and fine-tuned every ReLU peer again for an
    identical model. They are keyed "none" now and reported under either normaliser."""
    relu = {"experiment": "peers", "key": "tp-l2|relu|l2|none|tp_ratio:0.5|ft0",
            "method": "tp-l2", "arch": "relu", "importance": "l2", "normalizer": "none",
            "strategy": "tp_ratio", "target": 0.5, "finetuned": False,
            "fraction_pruned": 0.5, "accuracy": 0.4}
    old = {**relu, "key": "tp-l2|relu|l2|kept|tp_ratio:0.5|ft0", "normalizer": "kept",
           "accuracy": 0.3}  # keyed by a normaliser: measured again, not shown
    for norm in ("kept", "original"):
        cfg = ExperimentConfig(peer_finetune=False, peer_fractions=[0.5], normalizer=norm)
        rows = [r for r in summarize(_records() + [old, relu], cfg)["peers"]
                if r["arch"] == "relu"]
        assert [r["accuracy"] for r in rows] == [0.4], norm


def test_a_report_with_only_the_unpruned_model_timed_is_written(tmp_path: Path) -> None:
    """A sweep killed in the speed experiment after the unpruned model's measurements (or
    whose pruned models' records are no longer current): the figure of the pruned models'
    speed-ups got no rows and raised IndexError, after the tables were rewritten and before
    summary.json / report.md were."""
    out = tmp_path / "out"
    _write_records(out, [r for r in _records()
                         if not (r["experiment"] == "speed" and r["method"] != "unpruned")])
    text = build_report(out).read_text()
    assert "| unpruned | 1,000 |" in text
    assert not (out / "figures" / "speed.png").exists()
    assert json.loads((out / "summary.json").read_text())["speed"][0]["method"] == "unpruned"
