"""Experiment settings (:class:`ExperimentConfig`) and the presets ``quick`` / ``fast`` /
``paper``.

The config drives every step after training: calibration, the sweeps, fine-tuning,
the peer comparison and the speed measurements. The training itself is configured by
:class:`cobkern.training.TrainConfig` (the preset of the same name plus ``train``
overrides). ``cobkern run`` stores the resolved config in ``OUT/config.json``; the other
commands read it from there, and their flags override it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ExperimentConfig", "EXPERIMENTS", "get_experiment_preset", "load_experiment_config",
           "saved_or_default_config", "DEFAULT_PRESET", "FinetuneRecipe", "check_device",
           "PEER_CRITERIA"]

#: The preset an experiment directory without ``config.json`` is read with.
DEFAULT_PRESET = "quick"

#: Experiment names, in the order ``sweep`` runs them.
EXPERIMENTS = ("fixed", "normalizer", "lossless", "threshold", "peers", "speed")


def _check_number(name: str, v: Any) -> float:
    """``v`` if it is a finite real number (not a bool), else ``ValueError``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return float(v)


def _check_int(name: str, v: Any, minimum: int | None = None) -> int:
    """``v`` if it is an integer (not a bool) >= ``minimum``, else ``ValueError``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name}: expected an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _check_list(name: str, v: Any, allow_empty: bool = True) -> list[Any]:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name}: expected a JSON list, e.g. {name}=[...], got {v!r}")
    if not allow_empty and not v:
        raise ValueError(f"{name}: expected a non-empty list")
    return list(v)


def _check_fractions(name: str, v: Any) -> None:
    for p in _check_list(name, v):
        if not 0.0 <= _check_number(name, p) < 1.0:
            raise ValueError(f"{name}: parameter fractions must be in [0, 1), got {p}")


#: Torch-Pruning importances (:func:`cobkern.integrations.torch_pruning.make_importance`).
PEER_CRITERIA = ("l2", "l1", "l2-first", "l1-first", "random")


@dataclass
class FinetuneRecipe:
    """The fine-tuning applied after pruning (the same for CoB, baseline and peers).

    AdamW with linear warm-up and cosine decay to 0, grad-norm clip 1.0, random crop + flip,
    batch ``batch_size``, ``steps`` optimizer steps; ``optimizer="sgd"`` (momentum 0.9,
    Nesterov) for the ReLU control.
    """

    steps: int = 2000
    lr: float = 2e-4
    lr_relu: float = 0.01
    batch_size: int = 256
    warmup_steps: int = 100
    weight_decay: float = 5e-4
    train_subset: int = 0

    @property
    def effective_warmup_steps(self) -> int:
        """The warm-up actually used: never more than the run's steps."""
        return min(self.warmup_steps, self.steps)

    def validate(self) -> FinetuneRecipe:
        """Check the values; raises ``ValueError`` naming the bad field."""
        for name in ("steps", "batch_size"):
            _check_int(f"finetune.{name}", getattr(self, name), minimum=1)
        for name in ("warmup_steps", "train_subset"):
            _check_int(f"finetune.{name}", getattr(self, name), minimum=0)
        for name in ("lr", "lr_relu"):
            v = _check_number(f"finetune.{name}", getattr(self, name))
            if v <= 0:
                raise ValueError(f"finetune.{name} must be > 0, got {v!r}")
        if _check_number("finetune.weight_decay", self.weight_decay) < 0:
            raise ValueError(f"finetune.weight_decay must be >= 0, got {self.weight_decay!r}")
        return self

    def describe(self) -> str:
        """One sentence for the report."""
        sub = f" on {self.train_subset:,} training images" if self.train_subset else ""
        return (f"{self.steps} steps{sub} at batch {self.batch_size}; AdamW with peak lr "
                f"{self.lr:g} (TSRA) / SGD-Nesterov with peak lr {self.lr_relu:g} (ReLU); "
                f"{self.effective_warmup_steps} linear warm-up steps, "
                f"cosine decay to 0, weight decay {self.weight_decay:g}, grad-norm clip 1.0 "
                f"(TSRA), random crop + flip")


@dataclass
class ExperimentConfig:
    """Everything the experiments need besides the training recipe.

    Attributes:
        preset: the training preset (``quick``, ``fast``, ``paper``) and the name of this one.
        seed, device: as everywhere (``device="auto"``: CUDA when available).
        train: overrides on the training preset (``TrainConfig`` field → value).
        train_relu: train the ReLU control too (for the accuracy gap and the peer
            comparison); ``train_relu_overrides`` on its preset.
        calib_samples: calibration images (``method.md`` §4: 10,000);
            calib_augment: random crop/flip on them (the authors' notebook) or not;
            calib_f32_dot: the covariance kernel's products for float32 activations on a
            GPU (:data:`cobkern.ops.covariance.F32_DOTS`; default ``"ieee"``; ``"fp64"``:
            float64 tensor cores, float64-exact statistics on A100/H100-class GPUs);
            calib_channels_last: feed the calibration images in channels-last format
            (``true``), so the convolutions' activations reach the covariance kernel
            channel-contiguous, or NCHW (``false``); ``null`` / ``None`` (default):
            ``calibrate``'s automatic choice, channels-last exactly for a float32 model on
            CUDA (1.44–1.48× faster calibration there on an H200; a bfloat16 model was 1.84×
            slower channels-last on one lease, 7 % faster on the next; CPU untimed —
            ``BENCHMARKS.md``). The same statistics up
            to float round-off, so it is not part of their identity
            (``calibrate(channels_last=...)``);
            calib_cuda_graphs: on CUDA, replay each calibration batch's forward pass and
            covariance kernels as one CUDA graph (``calibrate(cuda_graphs=...)``; default
            ``false``: slower on an H200, ``BENCHMARKS.md``; the same statistics up to float
            round-off, so not part of their identity either).
        eval_subset: test images used for every sweep evaluation (0: all 10,000).
        eval_batch_size: evaluation batch.
        fractions: parameter fractions ``P`` of the fixed-ratio sweep.
        importances: ``"l2"``, ``"l1"``.
        normalizer: the sweep's normaliser; normalizer_fractions / normalizer_importance: the
            normaliser experiment (``"original"`` vs ``"kept"``).
        lossless_tol: rank tolerance of the lossless experiment; ``None`` (default): chosen
            per layer from the precision of its statistics
            (:data:`cobkern.pruning.strategy.DEFAULT_RANK_TOL`: 1e-10 for float64 sums, 1e-7
            for the GPU kernel's float32 sums).
        thresholds: ``[strategy, value]`` pairs (prop-of-max ``"max"``, ``"zscore"``,
            ``"mean"``, ``"median"``), applied per subspace, followed by fine-tuning.
        threshold_baseline: also run each threshold without CoB.
        finetune: the recipe (:class:`FinetuneRecipe`).
        peer_archs: models for the Torch-Pruning comparison (``"tsra"``, ``"relu"``);
            peer_fractions: its parameter budgets; peer_criteria: Torch-Pruning importances;
            peer_finetune: fine-tune the peers and CoB at those budgets.
        speed_fractions: CoB-pruned models (L2, fixed ratio) timed against the unpruned one;
            speed_round_to: each of them is pruned and timed once per value here, each
            subspace keeping a multiple of that many channels, or all of them (``round_to``
            of :func:`cobkern.pruning.make_strategy`; 1: no rounding, 8: widths that suit
            bf16/fp16 tensor cores; default ``[1]``, ``[1, 8]`` in the GPU presets);
            speed_batches: batch sizes; speed_repeats: timed runs per measurement.
        frontier_tolerance: accuracy drop (fraction, 0.01 = 1 point) of the reliable frontier.
        experiments: which of :data:`EXPERIMENTS` ``sweep`` runs.
    """

    preset: str = "quick"
    seed: int = 0
    device: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    train_relu: bool = False
    train_relu_overrides: dict[str, Any] = field(default_factory=dict)
    calib_samples: int = 10_000
    calib_augment: bool = False
    calib_f32_dot: str = "ieee"
    calib_channels_last: bool | None = None
    calib_cuda_graphs: bool = False
    calib_batch_size: int = 500
    eval_subset: int = 0
    eval_batch_size: int = 1000
    fractions: list[float] = field(default_factory=lambda: [
        0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    importances: list[str] = field(default_factory=lambda: ["l2", "l1"])
    normalizer: str = "kept"
    normalizer_fractions: list[float] | None = None
    normalizer_importance: str = "l2"
    lossless_tol: float | None = None
    thresholds: list[list[Any]] = field(default_factory=lambda: [
        ["max", 0.1], ["max", 0.05], ["zscore", -0.5], ["zscore", -0.25], ["mean", 0.5],
        ["mean", 0.25], ["median", 0.5], ["median", 0.25]])
    threshold_baseline: bool = True
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    peer_archs: list[str] = field(default_factory=lambda: ["tsra", "relu"])
    peer_fractions: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    peer_criteria: list[str] = field(default_factory=lambda: ["l2", "l1"])
    peer_finetune: bool = True
    speed_fractions: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    speed_round_to: list[int] = field(default_factory=lambda: [1])
    speed_batches: list[int] = field(default_factory=lambda: [1, 1024])
    speed_repeats: int = 20
    frontier_tolerance: float = 0.01
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))

    def validate(self) -> ExperimentConfig:
        """Check the types and values; raises ``ValueError`` naming the bad setting (before
        anything is written, so a bad ``--set`` never reaches ``config.json``)."""
        if not isinstance(self.preset, str):
            raise ValueError(f"preset: expected a name, got {self.preset!r}")
        if _check_int("seed", self.seed, 0) >= 2**63:  # the training's bound (64-bit seeds)
            raise ValueError(f"seed must be < 2**63, got {self.seed}")
        if not isinstance(self.device, str):
            raise ValueError(f"device: expected a string such as auto, cpu or cuda:0, got "
                             f"{self.device!r}")
        check_device(self.device)
        for name in ("train", "train_relu_overrides"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}: expected a JSON object of TrainConfig settings, "
                                 f"e.g. {name}={{\"steps\": 100}}, got {getattr(self, name)!r}")
        _check_train_settings(self)
        for name in ("train_relu", "calib_augment", "calib_cuda_graphs", "threshold_baseline",
                     "peer_finetune"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.calib_channels_last is not None and not isinstance(self.calib_channels_last,
                                                                   bool):
            raise ValueError(f"calib_channels_last: expected true, false or null (automatic: "
                             f"channels-last for a float32 model on CUDA), got "
                             f"{self.calib_channels_last!r}")
        _check_int("calib_samples", self.calib_samples, minimum=1)
        from cobkern.ops.covariance import F32_DOTS  # no triton import

        if self.calib_f32_dot not in F32_DOTS:
            raise ValueError(f"calib_f32_dot: expected one of {', '.join(F32_DOTS)}, got "
                             f"{self.calib_f32_dot!r}")
        _check_int("calib_batch_size", self.calib_batch_size, minimum=1)
        _check_int("eval_subset", self.eval_subset, minimum=0)
        _check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        bad = [e for e in _check_list("experiments", self.experiments) if e not in EXPERIMENTS]
        if bad:
            raise ValueError(f"unknown experiment(s) {bad}; expected some of {list(EXPERIMENTS)}")
        for name in ("fractions", "peer_fractions", "speed_fractions"):
            _check_fractions(name, getattr(self, name))
        if self.normalizer_fractions is not None:
            _check_fractions("normalizer_fractions", self.normalizer_fractions)
        for imp in _check_list("importances", self.importances) + [self.normalizer_importance]:
            if imp not in ("l2", "l1"):
                raise ValueError(f"importance must be 'l2' or 'l1', got {imp!r}")
        if self.normalizer not in ("kept", "original"):
            raise ValueError(f"normalizer must be 'kept' or 'original', got {self.normalizer!r}")
        if self.lossless_tol is not None:
            tol = _check_number("lossless_tol", self.lossless_tol)
            if not 0 <= tol < 1:
                raise ValueError(f"lossless_tol must be in [0, 1) (a fraction of the largest "
                                 f"eigenvalue) or null, got {tol}")
        for item in _check_list("thresholds", self.thresholds):
            if not (isinstance(item, (list, tuple)) and len(item) == 2
                    and item[0] in ("max", "zscore", "mean", "median")):
                raise ValueError(f"thresholds: expected [max|zscore|mean|median, t], got {item!r}")
            t = _check_number(f"thresholds {item!r}: t", item[1])
            if item[0] != "zscore" and t < 0:
                raise ValueError(f"thresholds {item!r}: t must be >= 0 for {item[0]}")
        if isinstance(self.finetune, dict):
            self.finetune = _recipe(self.finetune)
        if not isinstance(self.finetune, FinetuneRecipe):
            raise ValueError(f"finetune: expected a JSON object of recipe fields, got "
                             f"{self.finetune!r}")
        self.finetune.validate()
        for arch in _check_list("peer_archs", self.peer_archs):
            if arch not in ("tsra", "relu"):
                raise ValueError(f"peer_archs: expected 'tsra' or 'relu', got {arch!r}")
        for crit in _check_list("peer_criteria", self.peer_criteria):
            if crit not in PEER_CRITERIA:
                raise ValueError(f"peer_criteria: expected some of {list(PEER_CRITERIA)}, got "
                                 f"{crit!r}")
        for b in _check_list("speed_batches", self.speed_batches):
            _check_int("speed_batches", b, minimum=1)
        for n in _check_list("speed_round_to", self.speed_round_to):
            _check_int("speed_round_to", n, minimum=1)
        _check_int("speed_repeats", self.speed_repeats, minimum=1)
        tol = _check_number("frontier_tolerance", self.frontier_tolerance)
        if not 0 < tol < 1:
            raise ValueError(f"frontier_tolerance must be in (0, 1), got {self.frontier_tolerance}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown experiment setting(s) {unknown}; valid: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("finetune"), dict):
            d["finetune"] = _recipe(d["finetune"])
        return cls(**d).validate()

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """A copy with top-level settings replaced; a group (``train``,
        ``train_relu_overrides``, ``finetune``) given as a dict is merged key by key into the
        current one (``{"train": {"width": 0.5}}`` keeps the other training settings)."""
        if not isinstance(overrides, dict):
            raise ValueError(f"expected a dict of settings, got {overrides!r}")
        d = self.to_dict()
        for k, v in overrides.items():
            d[k] = merge_setting(d.get(k), v)
        return ExperimentConfig.from_dict(d)


def merge_setting(old: Any, new: Any) -> Any:
    """``new`` over ``old``: two dicts (a settings group) merge key by key, anything else is
    replaced."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **new}
    return new


def _recipe(d: dict[str, Any]) -> FinetuneRecipe:
    """A :class:`FinetuneRecipe` from a dict; unknown fields are a ``ValueError``."""
    names = {f.name for f in dataclasses.fields(FinetuneRecipe)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"finetune: unknown field(s) {unknown}; valid: {sorted(names)}")
    return FinetuneRecipe(**d).validate()


def _check_train_settings(cfg: ExperimentConfig) -> None:
    """The ``train`` / ``train_relu_overrides`` settings must make valid TrainConfigs."""
    from cobkern.training import TrainConfig, apply_overrides, get_preset

    valid = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name != "arch")
    for arch, key in (("tsra", "train"), ("relu", "train_relu_overrides")):
        if "arch" in getattr(cfg, key):  # a ReLU net trained into the TSRA model's place
            raise ValueError(f"{key}: 'arch' is not a setting here: {key} holds the "
                             f"{arch} model's settings (the ReLU control is trained with "
                             "`cobkern train --arch relu`, or by the pipeline)")
        unknown = sorted(set(getattr(cfg, key)) - set(valid))
        if unknown:  # listed here without 'arch', which is not one of them here
            raise ValueError(f"{key}: unknown setting(s) {unknown}; valid settings: {valid}")
        try:
            apply_overrides(get_preset(cfg.preset, arch), getattr(cfg, key))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None


def check_device(device: str) -> str:
    """``device`` if torch understands it (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ...), else
    ``ValueError``; whether CUDA is available is checked when the device is used."""
    if device == "auto":
        return device
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    return device


_PRESETS: dict[str, dict[str, Any]] = {
    # A 2-core CPU: the whole `cobkern run` in 5 to 17 minutes, depending on the machine
    # (4 min 52 s measured on one day, 16 min 57 s on another; README).
    "quick": dict(
        preset="quick", train_relu=True, calib_samples=10_000, calib_batch_size=500,
        eval_subset=5000,
        eval_batch_size=500,
        fractions=[0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], importances=["l2", "l1"],
        normalizer_fractions=[0.3, 0.5, 0.7, 0.9],
        thresholds=[["max", 0.1], ["zscore", -0.5], ["mean", 0.5]], threshold_baseline=True,
        finetune=FinetuneRecipe(steps=200, lr=3e-4, lr_relu=0.005, batch_size=128,
                                warmup_steps=10, train_subset=0),
        peer_archs=["tsra", "relu"], peer_fractions=[0.7, 0.9], peer_criteria=["l2"],
        peer_finetune=True, speed_fractions=[0.7, 0.9], speed_round_to=[1],
        speed_batches=[1, 1024], speed_repeats=5,
    ),
    # A GPU, a few hours.
    "fast": dict(
        preset="fast", train_relu=True, calib_samples=10_000, eval_subset=0,
        finetune=FinetuneRecipe(steps=1000, lr=2e-4, batch_size=512, warmup_steps=50),
        peer_archs=["tsra", "relu"],
        # also timed with widths that are multiples of 8 (bf16 tensor cores)
        speed_round_to=[1, 8],
    ),
    # The paper's setting (a GPU, about a day with the 120k-step training).
    "paper": dict(
        preset="paper", train_relu=True, calib_samples=10_000, eval_subset=0,
        finetune=FinetuneRecipe(steps=4000, lr=2e-4, batch_size=1024, warmup_steps=200),
        peer_archs=["tsra", "relu"],
        speed_round_to=[1, 8],
    ),
}


def get_experiment_preset(name: str) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of a preset (``quick``, ``fast``, ``paper``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(_PRESETS))}")
    return ExperimentConfig(**_PRESETS[name]).validate()


def load_experiment_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read ``OUT/config.json`` (the ``experiment`` section of it)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read experiment config {p}: {e}") from None
    if isinstance(data, dict) and "experiment" in data:
        data = data["experiment"]
    if not isinstance(data, dict):  # `[]` read as every default, `5` a TypeError
        raise ValueError(f"experiment config {p} must hold a JSON object of settings (as "
                         f"cobkern writes it), got {type(data).__name__} {data!r:.60}")
    return ExperimentConfig.from_dict(data)


def saved_or_default_config(path: str | os.PathLike) -> ExperimentConfig:
    """``OUT/config.json``'s settings (:func:`load_experiment_config`), or the
    :data:`DEFAULT_PRESET`'s where there is no such file: what the pipeline's steps run
    with, so the report judges their records by the same settings."""
    p = Path(path)
    return load_experiment_config(p) if p.is_file() else get_experiment_preset(DEFAULT_PRESET)
