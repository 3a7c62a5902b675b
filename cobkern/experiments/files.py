"""The layout of an experiment directory ``OUT/`` and atomic file helpers.

Every step of the pipeline reads the files the previous one wrote, so a user can train
once, calibrate once and prune many times::

    OUT/config.json              the resolved experiment settings (ExperimentConfig)
    OUT/train/                   the training run (model file, metrics.jsonl, final.json)
    OUT/train-relu/              the ReLU control's run (peer comparison), when trained
    OUT/calibration.pt           calibration statistics of the trained model (original basis)
    OUT/calibration-rotated.pt   statistics of the rotated model (for L1 importance with CoB)
    OUT/pruned/<name>/           a model pruned by `cobkern prune` (+ prune.json, finetune/)
    OUT/runs/<name>/             the sweeps' fine-tuning runs (start.json: the model and recipe
                                 a run started from; another start is never resumed)
    OUT/metrics.jsonl            one JSON line per measured model. The sweeps' records carry
                                 a ``key`` and the ``inputs`` they were measured from (see
                                 identity.py): a re-run reuses them, the report reads them.
                                 Those of `cobkern prune` / `finetune` / `evaluate` are a log,
                                 one line per run of the command (not reused or reported)
    OUT/summary.json, OUT/tables/*.csv, OUT/figures/*.png, OUT/report.md   (`cobkern report`)

All writes go to a temporary file in the same folder and are renamed into place, so an
interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cobkern._atomic import atomic_path

__all__ = [
    "MissingStepError",
    "Layout",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "append_jsonl",
    "read_jsonl",
    "json_default",
]


class MissingStepError(FileNotFoundError):
    """A file a step needs does not exist; the message names the command that makes it."""


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for tensors, numpy scalars and paths."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """Replace NaN/inf floats by None so the output is strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON, atomically."""
    return atomic_write_text(path, json.dumps(_clean(obj), indent=1, default=json_default) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most that line; a line
    torn by an earlier crash is ended first, so it never swallows this one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_clean(record), default=json_default)
    with open(path, "ab+") as f:
        # a torn last line (a crash mid-write) must not swallow this record: end it first
        torn = f.seek(0, os.SEEK_END) > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
        f.write((("\n" if torn else "") + line + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All parseable lines of a JSON-lines file (a torn last line is skipped); [] if absent."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class Layout:
    """Paths inside an experiment directory (see the module docstring)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.root = Path(out)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    def train_dir(self, arch: str = "tsra") -> Path:
        return self.root / ("train" if arch == "tsra" else f"train-{arch}")

    def model_file(self, arch: str = "tsra") -> Path:
        """The trained model's file (safetensors or .pt, whichever exists); when neither
        does, the one training writes (``model.safetensors`` where the package is
        installed, else ``model.pt``)."""
        from cobkern.models.io import default_model_filename

        d = self.train_dir(arch)
        for name in ("model.safetensors", "model.pt"):
            if (d / name).is_file():
                return d / name
        return d / default_model_filename()

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.pt"

    @property
    def calibration_rotated(self) -> Path:
        return self.root / "calibration-rotated.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def runs(self) -> Path:
        """Fine-tuning runs of the sweeps."""
        return self.root / "runs"

    def pruned_dir(self, name: str) -> Path:
        return self.root / "pruned" / name

    def require(self, path: Path, command: str, what: str) -> Path:
        """``path`` if it exists, else :class:`MissingStepError` naming ``command``."""
        if not path.exists():
            raise MissingStepError(f"{what} not found: {path} — make it with `{command}`")
        return path

    def require_model(self, arch: str = "tsra") -> Path:
        path = self.model_file(arch)
        flag = "" if arch == "tsra" else f" --arch {arch}"
        return self.require(path, f"cobkern train --out {self.root}{flag}",
                            f"the trained {arch} model")

    def require_calibration(self) -> Path:
        return self.require(self.calibration, f"cobkern calibrate --out {self.root}",
                            "calibration statistics")
