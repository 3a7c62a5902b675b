"""The experiments of issue 6 / ``method.md`` §4–6, each writing records to
``OUT/metrics.jsonl``.

=============  ===============================================================================
experiment     what it measures
=============  ===============================================================================
``fixed``      fixed-ratio pruning with no fine-tuning: for every parameter fraction ``P`` the
               per-subspace ratio ``p = 1 − sqrt(1 − P)``; CoB vs the TSRA baseline (same
               importance, no rotation), for each importance (L2, L1)
``normalizer`` the same with the RMSNorm normaliser ``"original"`` vs ``"kept"``
``lossless``   CoB with the rank tolerance alone: directions with ``λ ≤ tol·λ_max`` go; how
               many parameters, and whether the predictions change
``threshold``  per-subspace thresholds (prop-of-max, z-score, prop-of-mean/median), then
               fine-tuning with the config's recipe
``peers``      Torch-Pruning magnitude pruning (L2/L1, with cobkern's TSRA integration) of the
               TSRA model and of the ReLU control at the same parameter budgets, with the same
               fine-tuning, next to CoB
``speed``      parameters, FLOPs, latency (batch 1) and throughput (batch 1024) of CoB-pruned
               models vs the unpruned one, each also with its widths rounded to multiples of
               every ``speed_round_to`` value
=============  ===============================================================================

Every record has a ``key`` and ``inputs`` (the fingerprint of the trained model, the
identity of the calibration statistics, the test images and the whole fine-tuning recipe it
was measured with; see :mod:`.identity`). A sweep skips a key already in the file with the
same inputs, so an interrupted ``cobkern sweep`` continues where it stopped, while a record
made from another model, calibration, ``eval_subset`` or recipe is measured again;
``cobkern report`` only reads the file (and shows only records of the current inputs).
"""

from __future__ import annotations

import copy
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cobkern.cob import find_cob_layers
from cobkern.pruning import PruneReport, parameter_target_ratio
from cobkern.pruning.strategy import DEFAULT_RANK_TOL

from .context import Context, count_params
from .speed import count_flops, measure_speed

__all__ = ["run_experiments", "EXPERIMENT_FUNCS", "reference", "fixed_ratio", "normalizer",
           "lossless", "threshold", "peers", "speed", "layer_widths"]


def layer_widths(model: nn.Module) -> list[dict[str, Any]]:
    """Width and split of every CoB layer of ``model``."""
    return [{"name": lay.name, "channels": lay.num_channels, "split": lay.split}
            for lay in find_cob_layers(model)]


def _base_record(experiment: str, key: str, **fields: Any) -> dict[str, Any]:
    return {"experiment": experiment, "key": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **fields}


def _measure(ctx: Context, model: nn.Module, params_before: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ev = ctx.evaluate(model)
    after = count_params(model)
    return {"params_before": params_before, "params_after": after,
            "fraction_pruned": (params_before - after) / params_before,
            "accuracy": ev["accuracy"], "loss": ev["loss"], "n_eval": ev["n"],
            "eval_s": time.perf_counter() - t0}


def _report_fields(report: PruneReport) -> dict[str, Any]:
    return {"layers": [{"name": x.name, "before": x.channels_before, "after": x.channels_after,
                        "split_before": x.split_before, "split_after": x.split_after}
                       for x in report.layers],
            "strategy_meta": report.meta}


def reference(ctx: Context) -> dict[str, Any]:
    """The unpruned model's accuracy on the evaluation set (key ``reference``)."""
    key = "reference|tsra"
    inputs = ctx.inputs()
    rec = ctx.done(key, inputs)
    if rec is None:
        model = ctx.model()
        n = count_params(model)
        rec = ctx.log(_base_record("reference", key, method="unpruned", arch="tsra",
                                   finetuned=False, target=0.0, **_measure(ctx, model, n),
                                   widths=layer_widths(model), inputs=inputs))
    # the ReLU control's accuracy on the same images (the report's accuracy gap), whenever it
    # was trained -- not only when the peer comparison runs
    if ctx.config.train_relu and ctx.layout.model_file("relu").is_file():
        rkey, rinputs = "reference|relu", ctx.inputs(arch="relu")
        if ctx.done(rkey, rinputs) is None:
            m = ctx.model("relu")
            ctx.log(_base_record("reference", rkey, method="unpruned", arch="relu",
                                 finetuned=False, target=0.0,
                                 **_measure(ctx, m, count_params(m)), inputs=rinputs))
    return rec


def _prune_eval(ctx: Context, experiment: str, *, method: str, importance: str,
                normalizer: str, strategy: str, value: Any, target: float | None = None,
                extra: Callable[[nn.Module, nn.Module], dict[str, Any]] | None = None,
                finetune: bool = False) -> dict[str, Any]:
    """Prune the trained model with CoB (``method="cob"``) or without (``"baseline"``),
    evaluate, optionally fine-tune and evaluate again; log and return the record."""
    ft = ctx.config.finetune
    vkey = json_value(value)
    key = (f"{method}|tsra|{importance}|{normalizer}|{strategy}:{vkey}"
           f"|ft{ft.steps if finetune else 0}")
    inputs = ctx.inputs(calibration=True, finetune=finetune)
    rec = ctx.done(key, inputs)
    if rec is not None:
        return rec
    base = ctx.model()
    n0 = count_params(base)
    model, report = ctx.prune((strategy, value), importance=importance, cob=method == "cob",
                              normalizer=normalizer)
    fields: dict[str, Any] = {"method": method, "arch": "tsra", "importance": importance,
                              "normalizer": normalizer, "strategy": strategy, "value": value,
                              "target": target, "finetuned": finetune,
                              **_measure(ctx, model, n0), **_report_fields(report),
                              "inputs": inputs}
    if extra is not None:
        fields.update(extra(model, base))
    if finetune:
        fields["accuracy_before_ft"] = fields["accuracy"]
        fields["loss_before_ft"] = fields["loss"]
        run = ctx.finetune(model, key.replace("|", "_").replace(":", "-"))
        ev = ctx.evaluate(model)
        fields.update(accuracy=ev["accuracy"], loss=ev["loss"], finetune_steps=ft.steps,
                      finetune_s=run.get("elapsed_s"))
    return ctx.log(_base_record(experiment, key, **fields))


def json_value(v: Any) -> str:
    """A stable text form of a strategy value for record keys: ``:g`` (the keys of earlier
    runs), or the exact ``repr`` where ``:g``'s six digits would give two values one key
    (0.1234567 and 0.1234568, whose records would then stand for each other)."""
    if isinstance(v, (list, tuple)):
        return ",".join(json_value(x) for x in v)
    if not isinstance(v, float):
        return str(v)
    short = f"{v:g}"
    return short if float(short) == v else repr(v)


# ---------------------------------------------------------------------------- experiments
def fixed_ratio(ctx: Context, bar: Any = None) -> None:
    """Experiment 1: fixed-ratio sweep, CoB vs baseline × importances, no fine-tuning."""
    cfg = ctx.config
    for imp in cfg.importances:
        for method in ("cob", "baseline"):
            for P in cfg.fractions:
                _prune_eval(ctx, "fixed", method=method, importance=imp,
                            normalizer=cfg.normalizer, strategy="param_target",
                            value=[float(P), float(P)], target=float(P))
                _tick(bar)


def normalizer(ctx: Context, bar: Any = None) -> None:
    """Experiment 6: the RMSNorm normaliser (kept vs original width) on the fixed sweep."""
    cfg = ctx.config
    fr = cfg.normalizer_fractions if cfg.normalizer_fractions is not None else cfg.fractions
    for norm in ("kept", "original"):
        for method in ("cob", "baseline"):
            for P in fr:
                _prune_eval(ctx, "normalizer", method=method, importance=cfg.normalizer_importance,
                            normalizer=norm, strategy="param_target",
                            value=[float(P), float(P)], target=float(P))
                _tick(bar)


def lossless(ctx: Context, bar: Any = None) -> dict[str, Any]:
    """Experiment 3: CoB with the rank tolerance alone (normaliser ``original``, so only the
    directions the data never reaches are removed and nothing rescales)."""
    def default_tol() -> float:  # for the precision the statistics were accumulated in
        precisions = {s.accumulation for s in ctx.stats().layers.values()}
        return max(DEFAULT_RANK_TOL[p] for p in precisions)

    tol = ctx.config.lossless_tol
    if tol is None:
        tol = default_tol()

    def agreement(model: nn.Module, base: nn.Module) -> dict[str, Any]:
        a, b = ctx.logits(model), ctx.logits(base)
        # default_tol: which record the report shows when the config names no tolerance
        return {"default_tol": default_tol(),
                "agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
                "max_logit_diff": float((a - b).abs().max()),
                "logit_scale": float(b.abs().max()),
                "saturation_bound": _saturation_bounds(base)}

    rec = _prune_eval(ctx, "lossless", method="cob", importance="l2", normalizer="original",
                      strategy="lossless", value=[tol, tol], extra=agreement)
    _tick(bar)
    return rec


def _saturation_bounds(model: nn.Module) -> dict[str, int]:
    """``method.md`` §5: a TSRA layer with input width ``d`` spans at most ``2(d + 1)``
    directions (``2d`` without bias)."""
    out = {}
    for lay in find_cob_layers(model):
        p = lay.producer
        if isinstance(p, nn.Linear):
            d = p.in_features
        else:
            d = p.in_channels * p.kernel_size[0] * p.kernel_size[1]
        out[lay.name] = 2 * (d + (1 if p.bias is not None else 0))
    return out


def threshold(ctx: Context, bar: Any = None) -> None:
    """Experiment 2: threshold pruning (per subspace), then fine-tuning."""
    cfg = ctx.config
    methods = ["cob", "baseline"] if cfg.threshold_baseline else ["cob"]
    for name, t in cfg.thresholds:
        for method in methods:
            _prune_eval(ctx, "threshold", method=method, importance="l2",
                        normalizer=cfg.normalizer, strategy=name, value=[float(t), float(t)],
                        finetune=True)
            _tick(bar)


def peers(ctx: Context, bar: Any = None) -> None:
    """Experiment 4: Torch-Pruning at the same parameter budgets, same fine-tuning; CoB
    (L2, fixed ratio) fine-tuned the same way at those budgets."""
    from cobkern.integrations.torch_pruning import prune_with_torch_pruning

    cfg = ctx.config
    ft = cfg.finetune
    steps = ft.steps if cfg.peer_finetune else 0
    for P in cfg.peer_fractions:
        P = float(P)
        # CoB at the budget, fine-tuned as the peers are (without fine-tuning: the record of
        # the fixed-ratio sweep's key, measured here if that sweep did not run)
        _prune_eval(ctx, "peers", method="cob", importance="l2", normalizer=cfg.normalizer,
                    strategy="param_target", value=[P, P], target=P,
                    finetune=cfg.peer_finetune)
        _tick(bar)
        for arch in cfg.peer_archs:
            # the ReLU control has no RMSNorm: the normaliser does not change its pruning
            norm = cfg.normalizer if arch == "tsra" else "none"
            for crit in cfg.peer_criteria:
                key = (f"tp-{crit}|{arch}|{crit}|{norm}|tp_ratio:{json_value(P)}"
                       f"|ft{steps}")
                inputs = ctx.inputs(arch=arch, finetune=bool(steps))
                if ctx.done(key, inputs) is None:
                    base = ctx.model(arch)
                    n0 = count_params(base)
                    model = copy.deepcopy(base)
                    prune_with_torch_pruning(model, parameter_target_ratio(P), importance=crit,
                                             normalizer=cfg.normalizer)
                    model.eval()
                    fields: dict[str, Any] = {
                        "method": f"tp-{crit}", "arch": arch, "importance": crit,
                        "normalizer": norm, "strategy": "tp_ratio",
                        "value": parameter_target_ratio(P), "target": P,
                        "finetuned": bool(steps), **_measure(ctx, model, n0),
                        "inputs": inputs}
                    if arch == "tsra":
                        fields["widths"] = layer_widths(model)
                    if steps:
                        fields["accuracy_before_ft"] = fields["accuracy"]
                        run = ctx.finetune(model, key.replace("|", "_").replace(":", "-"), arch)
                        ev = ctx.evaluate(model)
                        fields.update(accuracy=ev["accuracy"], loss=ev["loss"],
                                      finetune_steps=steps, finetune_s=run.get("elapsed_s"))
                    ctx.log(_base_record("peers", key, **fields))
                _tick(bar)
        if "relu" in cfg.peer_archs:
            key = "reference|relu"
            inputs = ctx.inputs(arch="relu")
            if ctx.done(key, inputs) is None:
                m = ctx.model("relu")
                ctx.log(_base_record("reference", key, method="unpruned", arch="relu",
                                     finetuned=False, target=0.0,
                                     **_measure(ctx, m, count_params(m)), inputs=inputs))


def speed(ctx: Context, bar: Any = None) -> None:
    """Experiment 5: params, FLOPs, latency and throughput, unpruned vs CoB-pruned.

    Every CoB fraction is pruned and timed once per ``speed_round_to`` value. Keys:
    ``speed|<method>|<P>|b<batch>|<device>``, with ``|r<N>`` before the batch (and a
    ``round_to`` field in the record) for a rounded model (``round_to`` > 1); the unrounded
    models' keys and records are those of a sweep without rounding.
    """
    cfg = ctx.config
    models: list[tuple[str, float, int, Callable[[], nn.Module]]] = [
        ("unpruned", 0.0, 1, lambda: copy.deepcopy(ctx.model()))]
    for P in cfg.speed_fractions:
        for n in _round_tos(cfg):
            models.append(("cob", float(P), n, lambda P=P, n=n: ctx.prune(
                ("param_target", [float(P), float(P)]), importance="l2", cob=True,
                round_to=n)[0]))
    dev = ctx.device
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    for method, P, n, make in models:
        inputs = ctx.inputs(calibration=method == "cob", evaluation=False)
        rpart = f"|r{n}" if n != 1 else ""

        # the device's name in the key: another GPU (or CPU) measures everything again, so a
        # speed-up never divides one machine's time by another's
        def key(b: int, method: str = method, P: float = P, rpart: str = rpart) -> str:
            return f"speed|{method}|{json_value(P)}{rpart}|b{b}|{dev_name}"

        todo = [b for b in cfg.speed_batches if ctx.done(key(b), inputs) is None]
        if not todo:
            _tick(bar, len(cfg.speed_batches))
            continue
        model = make().eval()
        params, flops = count_params(model), count_flops(model)
        extra = {"round_to": n} if n != 1 else {}
        for b in todo:
            s = measure_speed(model, b, dev, repeats=cfg.speed_repeats)
            ctx.log(_base_record("speed", key(b), method=method, arch="tsra", target=P,
                                 **extra, params=params, flops=flops, device=dev_name, **s,
                                 inputs=inputs))
            _tick(bar)
        _tick(bar, len(cfg.speed_batches) - len(todo))


def _round_tos(cfg: Any) -> list[int]:
    """The config's ``speed_round_to`` values, each once, in order."""
    return list(dict.fromkeys(int(n) for n in cfg.speed_round_to))


EXPERIMENT_FUNCS: dict[str, Callable[..., Any]] = {
    "fixed": fixed_ratio, "normalizer": normalizer, "lossless": lossless,
    "threshold": threshold, "peers": peers, "speed": speed,
}


def _count(ctx: Context, name: str) -> int:
    cfg = ctx.config
    if name == "fixed":
        return len(cfg.importances) * 2 * len(cfg.fractions)
    if name == "normalizer":
        fr = cfg.normalizer_fractions if cfg.normalizer_fractions is not None else cfg.fractions
        return 4 * len(fr)
    if name == "lossless":
        return 1
    if name == "threshold":
        return len(cfg.thresholds) * (2 if cfg.threshold_baseline else 1)
    if name == "peers":
        return len(cfg.peer_fractions) * (1 + len(cfg.peer_archs) * len(cfg.peer_criteria))
    if name == "speed":
        return (1 + len(cfg.speed_fractions) * len(_round_tos(cfg))) * len(cfg.speed_batches)
    return 0


def _tick(bar: Any, n: int = 1) -> None:
    if bar is not None:
        bar.update(n)


def check_requirements(names: list[str]) -> None:
    """Refuse, before any work, experiments whose optional package is not installed (the
    peers need Torch-Pruning, an extra: without it a run trained, calibrated and swept, then
    failed at the peers with a traceback)."""
    if "peers" in names and importlib.util.find_spec("torch_pruning") is None:
        others = ",".join(n for n in names if n != "peers")
        raise ValueError("the peers experiment needs Torch-Pruning, which is not installed: "
                         "pip install 'cobkern[prune]' (or torch-pruning)"
                         + (f", or leave it out with --experiments {others}" if others else ""))


def run_experiments(ctx: Context, experiments: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the named experiments (default: the config's), skipping measured records.

    Returns:
        All records of ``OUT/metrics.jsonl`` afterwards.

    Raises:
        ValueError: an experiment needs a package that is not installed
            (:func:`check_requirements`).
    """
    from tqdm.auto import tqdm

    names = list(experiments or ctx.config.experiments)
    check_requirements(names)
    if "peers" in names and "relu" in ctx.config.peer_archs:
        ctx.layout.require_model("relu")
    ctx.layout.require_model("tsra")
    ctx.layout.require_calibration()
    total = sum(_count(ctx, n) for n in names)
    bar = tqdm(total=total, desc="sweep", unit="model", disable=not ctx.progress,
               dynamic_ncols=True)
    try:
        reference(ctx)
        for name in names:
            bar.set_description(f"sweep: {name}")
            EXPERIMENT_FUNCS[name](ctx, bar)
    finally:
        bar.close()
    return ctx.records()

