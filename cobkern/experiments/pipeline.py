"""The steps of an experiment (train → calibrate → sweep → report) and ``run`` (all of them).

Each step reads the files of the previous one from ``OUT/`` (see
:mod:`cobkern.experiments.files`) and skips work whose output already exists *and was made
from the current inputs* (:mod:`cobkern.experiments.identity`), so re-running a command
continues an interrupted experiment rather than starting again, while changed inputs are
measured again: other calibration settings recalibrate, other training settings than
``OUT/train`` was made with are refused (:func:`check_trained_settings`; retrain with
``cobkern train --force`` or use another ``--out``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cobkern.training import train
from cobkern.training.checkpoint import CHECKPOINT_NAME, RESUME_MAY_CHANGE, setting_change

from .context import Context
from .files import atomic_write_bytes, atomic_write_json
from .sweeps import check_requirements, run_experiments

__all__ = ["train_step", "calibrate_step", "sweep_step", "report_step", "run_pipeline",
           "check_trained_settings", "trained_with", "saved_config", "train_command"]


def train_command(ctx: Context, arch: str = "tsra") -> str:
    """``cobkern train --out OUT`` (``--arch relu`` for the ReLU control): the command the
    messages name for (re)training ``arch`` in ``ctx``'s directory."""
    return f"cobkern train --out {ctx.layout.root}" + ("" if arch == "tsra" else " --arch relu")


def _say(msg: str) -> None:
    """One line per stage, on stdout. Printed with or without progress bars: ``--no-progress``
    (logs, CI) hides the bars, not which stage runs and where the report went."""
    print(f"[cobkern] {msg}", flush=True)


def _read_final(path: Path) -> dict[str, Any] | None:
    """``final.json`` as a dict, or ``None`` if it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


#: The training fields an experiment directory's model may have been trained with other
#: values of: the trainer's resume rules, but not ``data_root`` — a resumed training run
#: checks its data by fingerprint, the sweeps' records do not (their ``inputs`` name the
#: test subset, not the images), so other data must not inherit their results.
TRAINED_MAY_CHANGE = RESUME_MAY_CHANGE - {"data_root"}


def check_trained_settings(ctx: Context, arch: str = "tsra") -> None:
    """Raise ``ValueError`` if ``OUT/train[-arch]/`` holds a model (or an interrupted run)
    made with other training settings than ``ctx``'s (fields that may change on resume,
    such as ``device`` or ``progress``, do not count). Nothing is retrained silently: the
    message says to use another ``--out`` or to retrain with ``--force``."""
    d = ctx.layout.train_dir(arch)
    saved_path = d / "config.json"
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return  # the trainer's own resume check still compares the checkpoint's settings
    if not isinstance(saved, dict):
        return
    change = setting_change(saved, ctx.train_config(arch), missing_ok=True,
                            may_change=TRAINED_MAY_CHANGE)
    if change is not None:
        name, old, value = change
        raise ValueError(
            f"{d} holds a {arch} model trained with {name}={old!r}, but these "
            f"settings ask for {name}={value!r}. Use another --out for the new settings, or "
            f"retrain (which invalidates everything derived from that model) with "
            f"`{train_command(ctx, arch)} --force --set {name}={json.dumps(value)}`")


def trained_with(ctx: Context, arch: str = "tsra") -> bool:
    """Whether ``OUT/train[-arch]/`` holds a run (finished or interrupted) that the trainer
    started with ``ctx``'s training settings (fields that may change on resume aside)."""
    try:
        saved = json.loads((ctx.layout.train_dir(arch) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and \
        setting_change(saved, ctx.train_config(arch), may_change=TRAINED_MAY_CHANGE) is None


@contextlib.contextmanager
def saved_config(ctx: Context, keep: Callable[[], bool] | None = None) -> Iterator[None]:
    """Write ``OUT/config.json`` for the block; if the block fails (an exception, not an
    interrupt, which the same command continues) and ``keep()`` is false, the previous file
    is put back (or removed, with ``OUT`` itself if the command created it and it is still
    empty), so a command refused for bad input never leaves its settings behind.

    ``keep``: whether outputs made with the new settings exist despite the failure (e.g.
    :func:`trained_with`), so that ``config.json`` must describe them; default: never.
    """
    path = ctx.layout.config
    root_existed = ctx.layout.root.exists()
    before = path.read_bytes() if path.is_file() else None
    ctx.save_config()
    try:
        yield
    except Exception:
        if keep is None or not keep():
            if before is not None:
                atomic_write_bytes(path, before)
            else:
                path.unlink(missing_ok=True)
                if not root_existed:
                    with contextlib.suppress(OSError):  # not empty: leave it
                        ctx.layout.root.rmdir()
        raise


def _remove_derived(ctx: Context) -> None:
    """After retraining the TSRA model: its calibration statistics are stale."""
    for p in (ctx.layout.calibration, ctx.layout.calibration_rotated):
        if p.exists():
            p.unlink()


def train_step(ctx: Context, arch: str = "tsra", force: bool = False) -> dict[str, Any]:
    """Train the ``arch`` model into ``OUT/train[-arch]/`` (skipped when its model file and
    ``final.json`` exist; resumed when a checkpoint exists).

    Without ``force`` the settings must be those the existing run was made with
    (:func:`check_trained_settings`). With ``force`` the model is trained again and, for the
    TSRA model, the calibration statistics derived from the old one are removed (records of
    the old model in ``metrics.jsonl`` stay, but no longer match its fingerprint).
    An unreadable ``final.json`` counts as an unfinished run: it is resumed from the
    checkpoint (which finishes at once), or, without one, a ``ValueError`` names the file.
    """
    d = ctx.layout.train_dir(arch)
    final = d / "final.json"
    if not force:
        check_trained_settings(ctx, arch)
        if final.is_file() and ctx.layout.model_file(arch).is_file():
            result = _read_final(final)
            if result is not None:
                _say(f"{arch} model already trained: {ctx.layout.model_file(arch)}")
                return result
            if not (d / CHECKPOINT_NAME).is_file():
                raise ValueError(
                    f"{final} is unreadable and there is no checkpoint in {d} to finish the "
                    f"run from; retrain with `{train_command(ctx, arch)} --force` (or "
                    "restore the file)")
            _say(f"{final} is unreadable; finishing the run from its checkpoint")
    config = ctx.train_config(arch)
    resume = (d / CHECKPOINT_NAME).is_file() and not force
    _say(f"training the {arch} model ({config.steps} steps, width {config.width:g}, "
         f"batch {config.batch_size}) into {d}")
    data = ctx._data  # injected data (tests); None → the trainer loads config.data_source
    # With force the old run's files (the model too: until the new run finishes, no step
    # may use the old model under the new settings; calibrate / prune / evaluate only check
    # that it exists) are set aside, and deleted — with the TSRA model's calibration — once
    # the trainer has checked the new settings and data. A run refused before that (a typo
    # in --set) puts them back: it must not cost the trained model. An interrupt leaves them
    # aside, as config.json keeps the new settings for the same command to run again.
    moved = _set_aside(d) if force else []

    def start() -> None:
        shutil.rmtree(d / _REPLACED, ignore_errors=True)
        if force and arch == "tsra":
            _remove_derived(ctx)

    try:
        result = train(config, d, resume=resume, data=data, on_start=start)
    except Exception:
        _restore_replaced(d, moved)  # nothing to put back once the run has started
        raise
    ctx.forget_model(arch)
    return result


#: Where ``train --force`` keeps the old run's files until the new run starts.
_REPLACED = ".replaced"
_RUN_FILES = (CHECKPOINT_NAME, "final.json", "metrics.jsonl", "model.safetensors", "model.pt")


def _set_aside(d: Path) -> list[str]:
    """Move the run files of ``d`` into ``d/.replaced/`` (renames: atomic, no copies);
    return their names."""
    keep, moved = d / _REPLACED, []
    for name in _RUN_FILES:
        if (d / name).exists():
            keep.mkdir(parents=True, exist_ok=True)
            (d / name).replace(keep / name)
            moved.append(name)
    return moved


def _restore_replaced(d: Path, names: list[str]) -> None:
    """Put back the files ``names`` that :func:`_set_aside` moved (a forced run refused
    before it started), where the run left no file of that name."""
    for name in names:
        src = d / _REPLACED / name
        if src.exists() and not (d / name).exists():
            src.replace(d / name)
    with contextlib.suppress(OSError):  # left only if something is still in it
        (d / _REPLACED).rmdir()


def calibrate_step(ctx: Context, force: bool = False) -> Path:
    """Calibrate the trained model into ``OUT/calibration.pt`` — skipped when the file
    exists and was made from the current model with the current ``calib_samples``,
    ``calib_augment`` and ``seed``; otherwise (re)calibrated."""
    if not force and ctx.calibration_is_current():
        _say(f"calibration statistics already exist: {ctx.layout.calibration}")
        return ctx.layout.calibration
    ctx.layout.require_model("tsra")
    if ctx.layout.calibration.is_file() and not force:
        _say(f"{ctx.layout.calibration} was made from another model or with other "
             "settings; calibrating again")
    wanted = ctx.config.calib_samples
    available = len(ctx.data()[0])
    if wanted > available:  # calibration_set takes them all
        _say(f"calibrating on {available:,} training images ({wanted:,} requested, "
             f"{available:,} available)")
    else:
        _say(f"calibrating on {wanted:,} training images")
    ctx.calibrate(force=True)
    return ctx.layout.calibration


def sweep_step(ctx: Context, experiments: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the experiments; records go to ``OUT/metrics.jsonl``."""
    names = experiments or ctx.config.experiments
    _say(f"sweep: {', '.join(names)}")
    return run_experiments(ctx, names)


def report_step(out: str | Path) -> Path:
    """Build the report from ``OUT`` alone."""
    from cobkern.report import build_report

    return build_report(out)


def run_pipeline(ctx: Context, experiments: list[str] | None = None) -> dict[str, Any]:
    """Everything end to end: train, calibrate, sweep, report. Returns the stage timings
    (also written to ``OUT/run.json``)."""
    t_all = time.perf_counter()
    names = list(experiments or ctx.config.experiments)
    check_requirements(names)  # before hours of training, not at the sweep
    relu = ctx.config.train_relu or ("peers" in names and "relu" in ctx.config.peer_archs)
    # refuse before config.json claims settings the trained models were not made with
    check_trained_settings(ctx, "tsra")
    if relu:
        check_trained_settings(ctx, "relu")
    timings: dict[str, float] = {}

    def stage(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - t0
        return out

    # config.json stays once the TSRA model was trained (or started) with its settings
    with saved_config(ctx, keep=lambda: trained_with(ctx, "tsra")):
        stage("train", train_step, ctx, "tsra")
        if relu:
            stage("train_relu", train_step, ctx, "relu")
        stage("calibrate", calibrate_step, ctx)
        stage("sweep", sweep_step, ctx, names)
        report = stage("report", report_step, ctx.layout.root)
    timings["total"] = time.perf_counter() - t_all
    atomic_write_json(ctx.layout.root / "run.json", {"timings_s": timings,
                                                    "device": str(ctx.device),
                                                    "experiments": names})
    _say("done in " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    _say(f"report: {report}")
    return timings
