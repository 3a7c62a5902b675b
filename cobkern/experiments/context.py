"""The shared state of the experiment steps: settings, data, the trained model, statistics.

:class:`Context` loads everything lazily and caches it, so one ``cobkern run`` decodes the
data, loads the model and rotates it once, however many models the sweeps measure.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cobkern._modes import eval_mode
from cobkern.cob import CalibrationStats, calibrate, rotate_model
from cobkern.data import DeviceLoader, ImageSet, calibration_set, load_cifar10, subset
from cobkern.models import load_model
from cobkern.pruning import PruneReport, Strategy, as_strategy, default_normalizer, prune
from cobkern.training import TrainConfig, apply_overrides, evaluate, get_preset
from cobkern.training.config import ConfigError
from cobkern.training.evaluation import check_num_classes

from .config import ExperimentConfig, saved_or_default_config
from .files import Layout, MissingStepError, append_jsonl, atomic_write_json, read_jsonl
from .identity import (
    calibration_meta_id,
    eval_inputs,
    finetune_inputs,
    model_fingerprint,
    plain,
    state_fingerprint,
)

__all__ = ["Context", "resolve_device", "count_params"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def count_params(model: nn.Module) -> int:
    """Every parameter of ``model`` (biases included)."""
    return sum(p.numel() for p in model.parameters())


def cfg_f32_dot(cfg: ExperimentConfig) -> str | None:
    """The ``calibrate(f32_dot=...)`` of a config: ``None`` for the default IEEE products
    (what the statistics' ``meta`` then records: nothing)."""
    return None if cfg.calib_f32_dot == "ieee" else cfg.calib_f32_dot


class Context:
    """Settings, data and models of one experiment directory.

    Args:
        out: the experiment directory.
        config: the settings; default: ``OUT/config.json`` if it exists, else the ``quick``
            preset.
        device: overrides ``config.device``.
        progress: show progress bars.
        data: ``(train, test)`` image sets to use instead of loading CIFAR-10 (tests).
    """

    def __init__(self, out: str | os.PathLike, config: ExperimentConfig | None = None, *,
                 device: str | None = None, progress: bool = True,
                 data: tuple[ImageSet, ImageSet] | None = None) -> None:
        self.layout = Layout(out)
        if config is None:
            config = saved_or_default_config(self.layout.config)
        self.config = config.validate()
        self.device = resolve_device(device or config.device)
        self.progress = progress
        self._data = data
        self._eval_set: ImageSet | None = None
        self._models: dict[str, nn.Module] = {}
        self._stats: CalibrationStats | None = None
        self._rotated: tuple[nn.Module, CalibrationStats] | None = None
        self._rotated_l1: CalibrationStats | None = None
        self._done: dict[str, list[dict[str, Any]]] | None = None
        self._fingerprints: dict[str, str] = {}

    # ------------------------------------------------------------------ settings
    def train_config(self, arch: str = "tsra") -> TrainConfig:
        """The training settings: the preset for ``arch`` plus the config's overrides."""
        cfg = self.config
        overrides = dict(cfg.train if arch == "tsra" else cfg.train_relu_overrides)
        if arch != "tsra":
            # the data settings (the class count is the data's) are shared with the main model
            for k in ("data_source", "data_root", "cache_dir", "train_subset", "test_subset",
                      "num_classes", "width"):
                if k in cfg.train and k not in overrides:
                    overrides[k] = cfg.train[k]
        overrides.setdefault("seed", cfg.seed)
        overrides.setdefault("device", str(self.device) if cfg.device == "auto" else cfg.device)
        overrides.setdefault("progress", self.progress)
        return apply_overrides(get_preset(cfg.preset, arch), overrides)

    def save_config(self) -> Path:
        """Write ``OUT/config.json``: the experiment settings and the resolved training ones."""
        return atomic_write_json(self.layout.config, {
            "experiment": self.config.to_dict(),
            "training": asdict(self.train_config("tsra")),
        })

    # ------------------------------------------------------------------ data
    def data(self) -> tuple[ImageSet, ImageSet]:
        """``(train, test)``: CIFAR-10 from the training config's source (cached)."""
        if self._data is None:
            tc = self.train_config("tsra")
            self._data = load_cifar10(tc.data_source, tc.data_root, tc.cache_dir,
                                      download=tc.download, progress=self.progress)
        return self._data

    def eval_set(self) -> ImageSet:
        """The test images every sweep evaluation uses (``eval_subset``, seeded)."""
        if self._eval_set is None:
            _, test = self.data()
            self._eval_set = subset(test, self.config.eval_subset or None, self.config.seed + 1)
        return self._eval_set

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy and loss of ``model`` on :meth:`eval_set`.

        Raises:
            ConfigError: the model has another number of outputs than the test data has
                classes (e.g. a model file trained on other data).
        """
        check_num_classes(model, len(self.eval_set().classes), "test data")
        return evaluate(model, self.eval_set(), self.device,
                        batch_size=self.config.eval_batch_size)

    @torch.no_grad()
    def logits(self, model: nn.Module) -> torch.Tensor:
        """Logits of ``model`` on :meth:`eval_set` (float64, CPU)."""
        loader = DeviceLoader.from_imageset(self.eval_set(), self.config.eval_batch_size,
                                            augment=False, shuffle=False, drop_last=False,
                                            device=self.device)
        with eval_mode(model):
            return torch.cat([model(x).double().cpu() for x, _ in loader])

    # ------------------------------------------------------------------ models
    def model(self, arch: str = "tsra") -> nn.Module:
        """The trained model (eval mode, on the device). Do not modify: use a copy."""
        if arch not in self._models:
            path = self.layout.require_model(arch)
            self._models[arch] = load_model(path, self.device).eval()
        return self._models[arch]

    def model_fingerprint(self, arch: str = "tsra") -> str:
        """The fingerprint of the trained model's weights (see :mod:`.identity`)."""
        if arch not in self._fingerprints:
            self._fingerprints[arch] = model_fingerprint(self.layout.require_model(arch))
        return self._fingerprints[arch]

    def forget_model(self, arch: str = "tsra") -> None:
        """Drop what was cached about the trained ``arch`` model (it was just (re)trained)."""
        self._models.pop(arch, None)
        self._fingerprints.pop(arch, None)
        if arch == "tsra":
            self._stats, self._rotated, self._rotated_l1 = None, None, None

    def stats(self) -> CalibrationStats:
        """Calibration statistics of the trained model (``OUT/calibration.pt``).

        Raises:
            ValueError: the statistics were collected from another model (or by a cobkern
                that did not record which one).
        """
        if self._stats is None:
            path = self.layout.require_calibration()
            stats = CalibrationStats.load(path)
            if stats.meta.get("model") != self.model_fingerprint("tsra"):
                raise ValueError(
                    f"{path} was not collected from the model now in "
                    f"{self.layout.train_dir('tsra')} (it was retrained, or the statistics "
                    f"predate this check); recalibrate with `cobkern calibrate --out "
                    f"{self.layout.root}`")
            self._stats = stats
        return self._stats

    def calibration_settings(self) -> dict[str, Any]:
        """What ``calibration.pt`` must have been made with: this model and these settings."""
        cfg = self.config
        out = {"model": self.model_fingerprint("tsra"), "samples": cfg.calib_samples,
               "augment": cfg.calib_augment, "seed": cfg.seed,
               # calibrate() records the products only when not IEEE (older files: none)
               "f32_dot": cfg_f32_dot(cfg)}
        if cfg.calib_augment:  # crops and flips are drawn per batch: another batch size,
            out["batch_size"] = cfg.calib_batch_size  # other images (un-augmented: the same)
        return out

    def calibration_is_current(self) -> bool:
        """Whether ``OUT/calibration.pt`` exists and was made from the current model with the
        current ``calib_samples`` / ``calib_augment`` / ``calib_f32_dot`` / ``seed`` (and,
        with augmentation, ``calib_batch_size``)."""
        path = self.layout.calibration
        if not path.is_file():
            return False
        try:
            stats = CalibrationStats.load(path)
        except Exception:  # noqa: BLE001 - unreadable: not current, recalibrate
            return False
        want = self.calibration_settings()
        if not all(stats.meta.get(k) == v for k, v in want.items()):
            return False
        self._stats = stats  # what stats() would load and check (the model is in `want`)
        return True

    def calibration_id(self) -> str:
        """The identity of the statistics in use (see :mod:`.identity`)."""
        stats = self.stats()
        cid = calibration_meta_id(stats.meta, stats.num_images)
        assert cid is not None  # stats() checked the model fingerprint
        return cid

    def inputs(self, *, arch: str = "tsra", calibration: bool = False,
               finetune: bool = False, evaluation: bool = True) -> dict[str, Any]:
        """The ``inputs`` of a record measured now (see :mod:`.identity`)."""
        out: dict[str, Any] = {"model": self.model_fingerprint(arch)}
        if calibration:
            out["calibration"] = self.calibration_id()
        if evaluation:
            out["eval"] = eval_inputs(self.config)
        if finetune:
            out["finetune"] = finetune_inputs(self.config)
        return plain(out)

    def calibration_loader(self) -> DeviceLoader:
        """The calibration images: ``calib_samples`` training images, augmented or not."""
        cfg = self.config
        train, _ = self.data()
        calib = calibration_set(train, cfg.calib_samples, seed=cfg.seed)
        return DeviceLoader.from_imageset(calib, cfg.calib_batch_size, augment=cfg.calib_augment,
                                          shuffle=False, drop_last=False, seed=cfg.seed,
                                          device=self.device)

    def calibrate(self, force: bool = False) -> CalibrationStats:
        """Calibrate the trained model and write ``OUT/calibration.pt`` (skipped if present)."""
        path = self.layout.calibration
        if path.is_file() and not force:
            return self.stats()
        model = self.model()
        stats = calibrate(model, self.calibration_loader(), max_samples=self.config.calib_samples,
                          progress=self.progress, device=self.device,
                          meta=self.calibration_settings(), f32_dot=cfg_f32_dot(self.config),
                          channels_last=self.config.calib_channels_last,
                          cuda_graphs=self.config.calib_cuda_graphs)
        stats.save(path)
        if self.layout.calibration_rotated.is_file():
            self.layout.calibration_rotated.unlink()  # stale now
        self._stats, self._rotated, self._rotated_l1 = stats, None, None
        return stats

    def rotated(self) -> tuple[nn.Module, CalibrationStats]:
        """The trained model rotated into its principal bases, and the rotated statistics."""
        if self._rotated is None:
            m = copy.deepcopy(self.model())
            res = rotate_model(m, self.stats())
            self._rotated = (m.eval(), res.stats)
        return self._rotated

    def rotated_stats(self, importance: str) -> CalibrationStats:
        """Rotated-basis statistics for ``importance``: derived from the eigenvalues for L2;
        a second calibration pass through the rotated model for L1 (cached in
        ``OUT/calibration-rotated.pt``)."""
        model, stats = self.rotated()
        if importance == "l2":
            return stats
        if self._rotated_l1 is None:
            path = self.layout.calibration_rotated
            cid = self.calibration_id()
            cached = None
            if path.is_file():
                try:
                    cached = CalibrationStats.load(path)
                except Exception:  # noqa: BLE001 - unreadable cache: recompute it
                    cached = None
                if cached is not None and cached.meta.get("calibration") != cid:
                    cached = None  # made from other statistics (or another model)
            if cached is None:
                cached = calibrate(
                    model, self.calibration_loader(), max_samples=self.config.calib_samples,
                    progress=self.progress, device=self.device,
                    meta={"basis": "rotated", **self.calibration_settings(),
                          "calibration": cid}, f32_dot=cfg_f32_dot(self.config),
                          channels_last=self.config.calib_channels_last,
                          cuda_graphs=self.config.calib_cuda_graphs)
                cached.save(path)
            self._rotated_l1 = cached
        return self._rotated_l1

    def prune(self, strategy: Strategy | tuple[str, Any], *, importance: str = "l2",
              cob: bool = True, normalizer: str | None = None,
              round_to: int = 1) -> tuple[nn.Module, PruneReport]:
        """A pruned copy of the trained model (CoB: of the rotated model).

        Args:
            strategy: a :class:`~cobkern.pruning.Strategy` or ``(name, value)`` for
                :func:`~cobkern.pruning.make_strategy`.
            importance, cob, normalizer: as :func:`cobkern.pruning.prune` (``normalizer``
                ``None``: the config's where the strategy's default is ``"kept"``).
            round_to: with ``(name, value)``, passed to :func:`make_strategy`: each subspace
                keeps a multiple of ``round_to`` channels (capped at its size; rounding up
                keeps more than the strategy asks). A :class:`Strategy` carries its own
                ``round_to``; a different value here (other than the default 1) is a
                ``ValueError``, raised before any work, as is a ``round_to`` < 1 (a
                non-integer: ``TypeError``).
        """
        strategy = as_strategy(strategy, round_to, "Context.prune")  # before any work
        if normalizer is None and default_normalizer(strategy) == "kept":
            normalizer = self.config.normalizer  # else prune()'s own default (lossless)
        if cob:
            base, _ = self.rotated()
            stats = self.rotated_stats(importance)
        else:
            base, stats = self.model(), self.stats()
        m = copy.deepcopy(base)
        m, report = prune(m, stats, strategy, importance=importance, cob=cob,
                          normalizer=normalizer)
        return m.eval(), report

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, model: nn.Module, run_name: str, arch: str = "tsra",
                 out: Path | None = None) -> dict[str, Any]:
        """Fine-tune ``model`` in place with the config's recipe; returns the final metrics.

        The run lives in ``out`` (default ``OUT/runs/<run_name>/``); an interrupted run
        resumes from its checkpoint. The training images are the config's
        ``finetune.train_subset``; the run's test images are :meth:`eval_set`.
        """
        r = self.config.finetune
        train, _ = self.data()
        overrides: dict[str, Any] = {
            "steps": r.steps, "batch_size": r.batch_size,
            "warmup_steps": min(r.warmup_steps, r.steps),
            "weight_decay": r.weight_decay, "train_subset": r.train_subset, "test_subset": 0,
            "eval_every": 0,
            # resumable: about ten checkpoints per run (checkpoint_every may change on resume,
            # so start.json does not depend on it)
            "checkpoint_every": max(1, r.steps // 10), "log_every": max(1, min(20, r.steps)),
            "eval_batch_size": self.config.eval_batch_size, "schedule": "cosine",
            "min_lr": 0.0}
        if arch == "tsra":
            overrides.update(optimizer="adamw", lr=r.lr, grad_clip=1.0)
        else:
            overrides.update(optimizer="sgd", lr=r.lr_relu, grad_clip=0.0)
        config = apply_overrides(self.train_config(arch), overrides)
        out = out if out is not None else self.layout.runs / run_name
        from cobkern.training.checkpoint import CHECKPOINT_NAME, RESUME_MAY_CHANGE
        from cobkern.training.trainer import finetune

        # A checkpoint in `out` is resumed only if that run started from this very model with
        # this recipe; anything else (another pruned model, another recipe) starts over.
        start = plain({"model": state_fingerprint(model),
                       "config": {k: v for k, v in asdict(config).items()
                                  if k not in RESUME_MAY_CHANGE}})
        start_file = out / "start.json"
        resume = (out / CHECKPOINT_NAME).is_file()
        if resume:
            try:
                resume = json.loads(start_file.read_text()) == start
            except (OSError, ValueError):
                resume = False
        if not resume and out.exists():
            # refuse a recipe the data cannot run before deleting the previous fine-tuning
            # (the count of the trainer's subset, without building it)
            n = min(r.train_subset, len(train)) if r.train_subset else len(train)
            if n < config.batch_size:
                raise ConfigError(f"{n} training images make no full fine-tuning batch of "
                                  f"{config.batch_size}; {out} is left as it was")
            shutil.rmtree(out)
        if not resume:
            atomic_write_json(start_file, start)
        res = finetune(model, (train, self.eval_set()), config, out, resume=resume)
        model.eval()
        return res

    # ------------------------------------------------------------------ records
    def records(self) -> list[dict[str, Any]]:
        """Every record in ``OUT/metrics.jsonl``."""
        return read_jsonl(self.layout.metrics)

    def done(self, key: str, inputs: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The latest record with this key — and, when given, these ``inputs`` (the model,
        calibration, test images and fine-tuning it was measured with) — if already measured.
        Sweeps resume by key; a record made from other inputs is not reused."""
        if self._done is None:
            self._done = {}
            for r in self.records():
                if "key" in r:
                    self._done.setdefault(r["key"], []).append(r)
        want = None if inputs is None else plain(inputs)
        for r in reversed(self._done.get(key, [])):
            if want is None or r.get("inputs") == want:
                return r
        return None

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append a record to ``OUT/metrics.jsonl``."""
        append_jsonl(self.layout.metrics, record)
        if self._done is not None and "key" in record:
            self._done.setdefault(record["key"], []).append(record)
        return record


_ = MissingStepError
