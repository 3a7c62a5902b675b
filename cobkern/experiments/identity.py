"""What a result depends on, so stale results are never reused or reported.

Every sweep record carries ``inputs``: a small JSON object naming everything its
measurement depends on —

* ``model``: the fingerprint of the trained model's weights (:func:`model_fingerprint`; the
  ReLU control's for ``arch="relu"`` records) — of the weights, not the file's bytes, so a
  model file rewritten with the same weights (a run finished again from its checkpoint)
  keeps its results;
* ``calibration``: the identity of the calibration statistics it was pruned with
  (:func:`calibration_id`: the model's fingerprint, images, augmentation, seed) — only for
  records that used them;
* ``eval``: the test images it was evaluated on (``eval_subset`` and ``seed``);
* ``finetune``: the whole fine-tuning recipe (and seed) — only for fine-tuned records.

A sweep reuses a record only when its ``inputs`` equal the current ones, and
``cobkern report`` shows only records whose ``inputs`` match the files and settings now
in ``OUT`` (:func:`current_inputs`, :func:`record_is_current`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any

from cobkern._digest import tensor_digest

from .config import ExperimentConfig
from .files import Layout

__all__ = ["file_fingerprint", "model_fingerprint", "state_fingerprint", "calibration_id",
           "calibration_meta_id", "eval_inputs", "finetune_inputs", "current_inputs",
           "record_is_current", "plain"]


def plain(o: Any) -> Any:
    """``o`` as it reads back from JSON (tuples → lists), for comparisons with records."""
    return json.loads(json.dumps(o))


def file_fingerprint(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the SHA-256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike) -> str:
    """:func:`state_fingerprint` of the model saved at ``path`` (loaded on the CPU)."""
    from cobkern.models import load_model

    return state_fingerprint(load_model(path, "cpu"))


def state_fingerprint(model: Any) -> str:
    """SHA-256 (16 hex digits) of a model's state dict: names, shapes, dtypes and bytes."""
    return tensor_digest(model.state_dict().items())[:16]


def calibration_meta_id(meta: dict[str, Any], num_images: int) -> str | None:
    """The identity of calibration statistics from their saved ``meta`` (``None`` for
    statistics saved without the model's fingerprint, i.e. of unknown provenance)."""
    if not meta.get("model"):
        return None
    key = {k: meta.get(k) for k in ("model", "samples", "augment", "seed")}
    key["num_images"] = int(num_images)
    if meta.get("f32_dot"):  # other products, other statistics (IEEE's: no key, older ids)
        key["f32_dot"] = meta["f32_dot"]
    if meta.get("batch_size") is not None:  # augmented: the draws depend on the batches
        key["batch_size"] = meta["batch_size"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def calibration_id(path: str | os.PathLike) -> str | None:
    """:func:`calibration_meta_id` of a saved ``calibration.pt`` (``None`` if unreadable)."""
    from cobkern.cob import CalibrationStats

    try:
        stats = CalibrationStats.load(path)
    except Exception:  # noqa: BLE001 - an unreadable file has no identity
        return None
    return calibration_meta_id(stats.meta, stats.num_images)


def eval_inputs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The test images of every evaluation: ``eval_subset`` images drawn with ``seed``."""
    return {"subset": cfg.eval_subset, "seed": cfg.seed}


def finetune_inputs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The whole fine-tuning recipe (and the seed of its data order)."""
    return plain({**asdict(cfg.finetune), "seed": cfg.seed})


def current_inputs(layout: Layout, cfg: ExperimentConfig) -> dict[str, Any]:
    """What records made now from ``layout`` with ``cfg`` would carry (``model`` per arch)."""
    models = {}
    for arch in ("tsra", "relu"):
        path = layout.model_file(arch)
        models[arch] = model_fingerprint(path) if path.is_file() else None
    calib = calibration_id(layout.calibration) if layout.calibration.is_file() else None
    return {"model": models, "calibration": calib, "eval": plain(eval_inputs(cfg)),
            "finetune": finetune_inputs(cfg)}


def record_is_current(record: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether ``record`` was measured with the current inputs.

    Records without ``inputs`` (one-off ``cobkern evaluate`` / ``finetune`` lines, records
    written by hand or by an older cobkern) carry no provenance and are kept; sweeps never
    reuse them (they measure such a key again, and the newer record then wins the key).
    """
    inputs = record.get("inputs")
    if not isinstance(inputs, dict):
        return True
    for k, v in inputs.items():
        if k == "model":
            want = current["model"].get(record.get("arch") or "tsra")
        else:
            want = current.get(k)
        if want is None or v != want:
            return False
    return True
