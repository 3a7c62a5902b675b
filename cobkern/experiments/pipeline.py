"""The steps of an experiment (train → calibrate → sweep → report) and ``run`` (all of them).

Each step reads the files of the previous one from ``OUT/`` (see
:mod:`cobkern.experiments.files`) and skips work whose output already exists, so re-running
a command continues an interrupted experiment rather than starting again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cobkern.training import train
from cobkern.training.trainer import CHECKPOINT_NAME

from .context import Context
from .files import atomic_write_json
from .sweeps import run_experiments

__all__ = ["train_step", "calibrate_step", "sweep_step", "report_step", "run_pipeline"]


def _say(ctx: Context, msg: str) -> None:
    if ctx.progress:
        print(f"[cobkern] {msg}", flush=True)


def train_step(ctx: Context, arch: str = "tsra", force: bool = False) -> dict[str, Any]:
    """Train the ``arch`` model into ``OUT/train[-arch]/`` (skipped when its model file and
    ``final.json`` exist; resumed when a checkpoint exists)."""
    d = ctx.layout.train_dir(arch)
    final = d / "final.json"
    if not force and final.is_file() and ctx.layout.model_file(arch).is_file():
        _say(ctx, f"{arch} model already trained: {ctx.layout.model_file(arch)}")
        return json.loads(final.read_text())
    config = ctx.train_config(arch)
    resume = (d / CHECKPOINT_NAME).is_file() and not force
    if force and d.exists():
        for name in (CHECKPOINT_NAME, "final.json", "metrics.jsonl"):
            if (d / name).exists():
                (d / name).unlink()
    _say(ctx, f"training the {arch} model ({config.steps} steps, width {config.width:g}, "
              f"batch {config.batch_size}) into {d}")
    data = ctx._data  # injected data (tests); None → the trainer loads config.data_source
    result = train(config, d, resume=resume, data=data)
    ctx._models.pop(arch, None)
    return result


def calibrate_step(ctx: Context, force: bool = False) -> Path:
    """Calibrate the trained model into ``OUT/calibration.pt``."""
    if ctx.layout.calibration.is_file() and not force:
        _say(ctx, f"calibration statistics already exist: {ctx.layout.calibration}")
        return ctx.layout.calibration
    ctx.layout.require_model("tsra")
    _say(ctx, f"calibrating on {ctx.config.calib_samples:,} training images")
    ctx.calibrate(force=True)
    return ctx.layout.calibration


def sweep_step(ctx: Context, experiments: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the experiments; records go to ``OUT/metrics.jsonl``."""
    names = experiments or ctx.config.experiments
    _say(ctx, f"sweep: {', '.join(names)}")
    return run_experiments(ctx, names)


def report_step(out: str | Path) -> Path:
    """Build the report from ``OUT`` alone."""
    from cobkern.report import build_report

    return build_report(out)


def run_pipeline(ctx: Context, experiments: list[str] | None = None) -> dict[str, Any]:
    """Everything end to end: train, calibrate, sweep, report. Returns the stage timings
    (also written to ``OUT/run.json``)."""
    t_all = time.perf_counter()
    ctx.save_config()
    names = list(experiments or ctx.config.experiments)
    timings: dict[str, float] = {}

    def stage(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - t0
        return out

    stage("train", train_step, ctx, "tsra")
    if ctx.config.train_relu or ("peers" in names and "relu" in ctx.config.peer_archs):
        stage("train_relu", train_step, ctx, "relu")
    stage("calibrate", calibrate_step, ctx)
    stage("sweep", sweep_step, ctx, names)
    report = stage("report", report_step, ctx.layout.root)
    timings["total"] = time.perf_counter() - t_all
    atomic_write_json(ctx.layout.root / "run.json", {"timings_s": timings,
                                                    "device": str(ctx.device),
                                                    "experiments": names})
    _say(ctx, "done in " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    _say(ctx, f"report: {report}")
    return timings
