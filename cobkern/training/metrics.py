"""The trainer's output files in strict JSON: the ``metrics.jsonl`` log and JSON documents.

Non-finite numbers (a diverged loss) are written as ``null``; every whole-file write goes
through :func:`cobkern._atomic.atomic_path`, so a killed run never leaves a torn file
(``metrics.jsonl`` is appended to line by line, and replaced atomically when started or
trimmed back to a checkpoint).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cobkern._atomic import atomic_path

__all__ = ["METRICS_NAME", "json_safe", "json_line", "write_json", "trim_metrics",
           "start_metrics"]

METRICS_NAME = "metrics.jsonl"


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None`` (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_line(record: dict[str, Any]) -> str:
    """One strict-JSON metrics line (non-finite numbers as ``null``)."""
    return json.dumps(json_safe(record), allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (they belong to the interrupted tail)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed run
        s = rec.get("step", 0) if isinstance(rec, dict) else None
        if isinstance(s, int) and not isinstance(s, bool) and s <= step:
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep))


def start_metrics(path: Path) -> None:
    """Begin an empty metrics file (a fresh run never appends to an old run's lines)."""
    with atomic_path(path) as tmp:
        tmp.write_text("")
