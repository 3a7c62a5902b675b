"""The numbers a report states, computed from the sweep records alone (``summary.json``).

:func:`summarize` turns the deduplicated records of ``metrics.jsonl`` into the frontiers,
the CoB-vs-baseline counts, the lossless, threshold, peer and speed summaries;
:func:`fixed_rows` selects the fixed-ratio table; :func:`matches_recipe` drops fine-tuned
records of an earlier fine-tuning recipe.
"""

from __future__ import annotations

from typing import Any

from cobkern.experiments.config import ExperimentConfig

from .analysis import curve, dedupe, latest, reliable_frontier, select

__all__ = ["summarize", "fixed_rows", "matches_recipe", "FIXED_EXPERIMENTS"]


#: The experiments whose records make the fixed-ratio curves and table: the peers' CoB
#: point without fine-tuning has the fixed sweep's key, so whichever experiment ran first
#: logged it (the filters on strategy and fine-tuning leave the other peer records out).
FIXED_EXPERIMENTS = ("fixed", "normalizer", "peers")


def _expected_steps(r: dict[str, Any], cfg: ExperimentConfig) -> int:
    if r.get("experiment") == "peers" and not cfg.peer_finetune:
        return 0
    return cfg.finetune.steps


def _fixed_point(r: dict[str, Any]) -> bool:
    """A fixed-ratio measurement without fine-tuning (the fixed sweep's key, also when the
    peers sweep logged it)."""
    return r.get("strategy") == "param_target" and not r.get("finetuned")


def matches_recipe(r: dict[str, Any], cfg: ExperimentConfig) -> bool:
    """Whether a threshold / peer record was fine-tuned as the current config says (records
    of an earlier recipe stay in ``metrics.jsonl`` but are not reported as this run's)."""
    if r.get("experiment") not in ("threshold", "peers"):
        return True
    if r.get("experiment") == "peers" and _fixed_point(r):
        return True  # a fixed-ratio point whatever the peers' recipe is now
    # the tables have no normaliser column: only this config's normaliser (records of another
    # one would show as duplicate rows with other numbers); the ReLU peers have none (their
    # records keyed by a normaliser predate that and are measured again)
    want = "none" if r.get("experiment") == "peers" and r.get("arch") == "relu" \
        else cfg.normalizer
    if r.get("normalizer", want) != want:
        return False
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


def peer_records(records: list[dict[str, Any]], cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The peer comparison's records: Torch-Pruning's and CoB's (L2, fixed ratio, this
    config's normaliser) at :attr:`~ExperimentConfig.peer_fractions`. Without peer
    fine-tuning the CoB point is the fixed-ratio sweep's record of that budget (the same
    key: one measurement, logged by whichever experiment ran first)."""
    pe = select(records, experiment="peers")
    if cfg.peer_finetune:  # the peers' fine-tuned CoB points, not fixed-ratio ones
        return [r for r in pe if not (r.get("method") == "cob" and _fixed_point(r))]
    have = {r["key"] for r in pe}
    budgets = {round(float(p), 6) for p in cfg.peer_fractions}
    cob = [r for r in fixed_rows(records)
           if r["key"] not in have and r.get("method") == "cob" and r.get("arch") == "tsra"
           and r.get("importance") == "l2" and r.get("normalizer") == cfg.normalizer
           and round(r["target"], 6) in budgets]
    return pe + cob


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
    if cfg.lossless_tol is not None:  # the config's tolerance, not whichever key came last
        ll = [r for r in ll if (r.get("value") or [None])[0] == cfg.lossless_tol]
    else:
        ll = [r for r in ll if _at_default_tol(r)]
    ll.sort(key=lambda r: str(r.get("time", "")))
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
    pe = peer_records(records, cfg)
    if pe:
        s["peers"] = [{"method": r["method"], "arch": r["arch"], "target": r["target"],
                       "fraction_pruned": r["fraction_pruned"],
                       "accuracy_before_ft": r.get("accuracy_before_ft"),
                       "accuracy": r["accuracy"], "finetuned": r.get("finetuned"),
                       "finetune_steps": r.get("finetune_steps", 0) if r.get("finetuned")
                       else 0} for r in pe]
    s["speed"] = _speed_rows(records, cfg.speed_batches)
    return s


def _at_default_tol(r: dict[str, Any]) -> bool:
    """Whether a lossless record ran at the default tolerance of its statistics (recorded
    as ``default_tol``; older records: any precision's default)."""
    from cobkern.pruning.strategy import DEFAULT_RANK_TOL

    tol = (r.get("value") or [None])[0]
    if "default_tol" in r:
        return tol == r["default_tol"]
    return tol in DEFAULT_RANK_TOL.values()


def _speed_rows(records: list[dict[str, Any]],
                batches: list[int] | None = None) -> list[dict[str, Any]]:
    """The speed table of the device measured last: ratios never mix machines.

    One row per model: the unpruned one and each CoB fraction, a model pruned with
    ``round_to`` N > 1 (the record's ``round_to``) in a row of its own after the unrounded
    one of its fraction, with ``round_to`` in the row (rows of unrounded models have none);
    every ratio is relative to the unpruned model. The small and large batch are the
    smallest and largest of ``batches`` (the config's ``speed_batches``: records of an
    earlier setting are not shown as this one's), each where it was measured, else the
    smallest / largest batch of the records.
    """
    sp = select(records, experiment="speed")
    if not sp:
        return []
    device = sp[-1].get("device")
    sp = [r for r in sp if r.get("device") == device]
    measured = {r["batch"] for r in sp}
    # the config's smallest / largest batch where it was measured, else the records' own
    b1 = min(batches) if batches and min(batches) in measured else min(measured)
    bmax = max(batches) if batches and max(batches) in measured else max(measured)
    base = {r["batch"]: r for r in sp if r["method"] == "unpruned"}
    rows = []
    # the unpruned model first; a CoB model at P = 0 has the unpruned one's target and
    # round_to, so the method is part of a row's key (it merged the two rows)
    keys = {(r["method"] != "unpruned", r["target"], _round_to(r), r["method"]) for r in sp}
    for _, t, n, method in sorted(keys):
        rs = {r["batch"]: r for r in sp
              if r["method"] == method and r["target"] == t and _round_to(r) == n}
        any_r = next(iter(rs.values()))
        row = {"method": any_r["method"], "target": t, "params": any_r["params"],
               "flops": any_r["flops"], "device": any_r.get("device"),
               "latency_ms_b1": rs[b1]["latency_ms"] if b1 in rs else None,
               "throughput_bmax": rs[bmax]["throughput"] if bmax in rs else None,
               "batch_small": b1, "batch_large": bmax,
               "repeats": sorted({x.get("repeats") for x in rs.values()} - {None})}
        if n != 1:
            row["round_to"] = n
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


def _round_to(r: dict[str, Any]) -> int:
    """The ``round_to`` a speed record's model was pruned with (1: none; older records)."""
    return int(r.get("round_to") or 1)
