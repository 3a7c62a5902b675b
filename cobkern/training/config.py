"""Training settings (:class:`TrainConfig`), presets and config-file handling.

Presets (``get_preset(name, arch)``):

* ``paper`` — the authors' settings (``method.md`` §3). TSRA: AdamW, lr 1e-3, weight decay
  5e-4, 1000 linear warm-up steps, cosine to 0, grad-norm clip 1.0, batch 1024, 120,000
  steps. ReLU control: SGD (momentum 0.9, Nesterov), lr 0.1, weight decay 5e-4, no warm-up,
  cosine, same batch and steps; ``method.md`` lists grad-norm clipping for the TSRA model
  only, so the control is not clipped (``--set grad_clip=1.0`` / ``--grad-clip 1`` clips it
  too).
* ``fast`` — the same recipe on a much shorter GPU schedule: 8,000 steps at batch 1024
  (about 164 epochs), warm-up scaled to 400 steps, bf16 autocast, ``torch.compile`` and
  channels_last, at ~1/15 of the ``paper`` preset's cost. Measured on an H200 (2026-11-27,
  torch 2.11, ``RESULTS.md``): the TSRA model reached 84.95 % test accuracy in 147 s of
  training. The ReLU control of that run trained to NaN because of its classifier's init,
  since fixed (``models/vgg.py``) but not yet re-run on a GPU.
* ``quick`` — a width-1/8 model (AdamW lr 2e-3, 100 warm-up steps), batch 128, 1,500 steps
  (about 4 epochs of the 50,000 training images) for CPU runs and smoke tests. Measured on
  an idle 2-core CPU inside ``cobkern run --preset quick`` (2026-11-27, ``RESULTS.md``):
  91 s of training, 48.74 % test accuracy (chance 10 %); the ReLU control (SGD, no
  warm-up) 62 s and 65.24 %.

Any field can be overridden from a JSON file and/or the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "ConfigError", "PRESETS", "get_preset", "load_config_file",
           "apply_overrides"]


class ConfigError(ValueError):
    """An invalid training setting, unknown preset or unreadable config file."""


#: ``torch.compile`` modes the trainer accepts (``compile_mode``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Every training setting. ``0`` means "off"/"all" where noted.

    Model:
        arch: ``"tsra"`` or ``"relu"``. width: hidden-width multiplier. num_classes.
        fused: one fused RMSNorm+TSRA module per conv block (TSRA model only).
    Optimisation:
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum, nesterov). lr, weight_decay,
        beta1, beta2 (AdamW). warmup_steps: linear warm-up from lr/warmup_steps.
        schedule: ``"cosine"`` (to min_lr at ``steps``) or ``"constant"``.
        grad_clip: max global grad norm (0: off). label_smoothing.
        batch_size: **global** batch (split across ranks). steps: optimizer steps.
    Evaluation / logging / checkpoints:
        eval_every: steps between evaluations (0: at the end of every epoch; the final
        step is always evaluated). eval_batch_size. log_every: steps per metrics line.
        checkpoint_every: steps between checkpoints (0: only at the end).
    Data:
        data_source (``auto|shipped|torchvision|imagefolder``), data_root, cache_dir,
        download, train_subset / test_subset (0: all; a seeded choice), augment.
    Runtime:
        seed, device (``auto|cpu|cuda|cuda:N``), bf16 (autocast), compile
        (``torch.compile``), compile_mode (its ``mode``: ``default``, ``reduce-overhead`` —
        the compiled forward and backward replayed as CUDA graphs, no host dispatch per
        kernel; not with several processes —, ``max-autotune``,
        ``max-autotune-no-cudagraphs``), channels_last, num_threads (CPU threads; 0: torch
        default), progress (tqdm bar).
    """

    arch: str = "tsra"
    width: float = 1.0
    num_classes: int = 10
    fused: bool = True

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 1000
    schedule: str = "cosine"
    min_lr: float = 0.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    batch_size: int = 1024
    steps: int = 120_000

    eval_every: int = 0
    eval_batch_size: int = 1024
    log_every: int = 50
    checkpoint_every: int = 1000

    data_source: str = "auto"
    data_root: str | None = None
    cache_dir: str | None = None
    download: bool = False
    train_subset: int = 0
    test_subset: int = 0
    augment: bool = True

    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    num_threads: int = 0
    progress: bool = True

    def validate(self) -> TrainConfig:
        """Check every value; raises :class:`ConfigError` naming the bad setting.

        Besides the choices and ranges below, every float setting must be finite. The
        ranges follow what PyTorch accepts, narrowed where a value would train nothing:
        ``0 <= beta1, beta2 < 1`` and ``momentum >= 0`` (as ``torch.optim`` checks);
        ``0 <= label_smoothing < 1`` (PyTorch also takes 1.0, which makes every target the
        uniform distribution, so the labels would be ignored); ``seed >= 0`` (PyTorch
        and the data loader's seeding need a non-negative seed).
        """
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                need(math.isfinite(value), f"{f.name} must be a finite number, got {value}")
        need(self.arch in ("tsra", "relu"), f"arch must be 'tsra' or 'relu', got {self.arch!r}")
        need(self.width > 0, f"width must be > 0, got {self.width}")
        need(self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        need(self.optimizer in ("adamw", "sgd"),
             f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        need(self.schedule in ("cosine", "constant"),
             f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "min_lr", "grad_clip", "label_smoothing", "warmup_steps",
                     "eval_every", "checkpoint_every", "train_subset", "test_subset",
                     "num_threads", "momentum", "seed"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(self, name) < 1,
                 f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("batch_size", "steps", "eval_batch_size", "log_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.data_source in ("auto", "shipped", "torchvision", "imagefolder"),
             f"unknown data_source {self.data_source!r}")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        need(self.compile_mode in COMPILE_MODES,
             f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got "
             f"{self.compile_mode!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(TrainConfig)}

_PAPER_RELU = dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, nesterov=True,
                   warmup_steps=0, grad_clip=0.0)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "tsra": dict(optimizer="adamw", lr=1e-3, weight_decay=5e-4, warmup_steps=1000,
                     grad_clip=1.0, batch_size=1024, steps=120_000),
        "relu": dict(_PAPER_RELU, batch_size=1024, steps=120_000),
    },
    "fast": {
        "tsra": dict(optimizer="adamw", lr=1e-3, weight_decay=5e-4, warmup_steps=400,
                     grad_clip=1.0, batch_size=1024, steps=8000, bf16=True, compile=True,
                     channels_last=True, checkpoint_every=1000),
        "relu": dict(_PAPER_RELU, batch_size=1024, steps=8000, bf16=True, compile=True,
                     channels_last=True, checkpoint_every=1000),
    },
    "quick": {
        "tsra": dict(width=0.125, optimizer="adamw", lr=2e-3, weight_decay=5e-4,
                     warmup_steps=100, grad_clip=1.0, batch_size=128, steps=1500,
                     train_subset=0, test_subset=0, eval_every=0, log_every=20,
                     checkpoint_every=250, eval_batch_size=1000, num_threads=0),
        # no warm-up, as in the paper: with Kaiming fan_out only in the convs (models/vgg.py)
        # it reached 65.5 % (150 warm-up steps: 64.2 %; 2-core CPU, 2026-11-27). Before that
        # fix the classifier's init made the net die without warm-up (11.9 %).
        "relu": dict(width=0.125, optimizer="sgd", lr=0.05, weight_decay=5e-4, momentum=0.9,
                     nesterov=True, warmup_steps=0, grad_clip=0.0, batch_size=128, steps=1500,
                     train_subset=0, test_subset=0, eval_every=0, log_every=20,
                     checkpoint_every=250, eval_batch_size=1000, num_threads=0),
    },
}


def get_preset(name: str, arch: str = "tsra") -> TrainConfig:
    """The :class:`TrainConfig` of a preset (``paper``, ``fast``, ``quick``) for an arch.

    Raises:
        ValueError (:class:`ConfigError`): unknown preset or arch; the message lists them.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: "
                          f"{', '.join(sorted(PRESETS))}")
    if arch not in PRESETS[name]:
        raise ConfigError(f"unknown arch {arch!r}; expected one of {sorted(PRESETS[name])}")
    return TrainConfig(arch=arch, **PRESETS[name][arch]).validate()


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(name: str, value: Any) -> Any:
    """``value`` as the type of setting ``name``, strictly (:class:`ConfigError` otherwise).

    * text settings: a string (``null`` only where the setting may be ``None``, i.e.
      ``data_root`` and ``cache_dir``); numbers, booleans, lists... are errors, not text;
    * booleans: ``true``/``false``, the integers ``0``/``1`` (unambiguous; any other
      number is an error), or — for values typed as text, e.g. ``--set augment=off`` —
      ``true|false|yes|no|on|off|1|0`` (any case);
    * integers: an integer, a float with an integral value (``1e3`` in JSON) or a string
      of an integer (command-line flags arrive as text); never a boolean;
    * floats: an integer, float or numeric string; never a boolean.
    """
    f = _FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if value is None:
            if "None" in kind:
                return None
            raise TypeError("null is not allowed")
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                if value.strip().lower() in _TRUE:
                    return True
                if value.strip().lower() in _FALSE:
                    return False
                raise ValueError("expected true or false")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise TypeError("expected true or false")
        if kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)) or \
                    (isinstance(value, float) and not value.is_integer()):
                raise TypeError("expected an integer")
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError("expected a number")
            return float(value)
        if not isinstance(value, str):
            raise TypeError("expected a string" + (" or null" if "None" in kind else ""))
        return value
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"bad value for {name}: {value!r} ({kind} expected; {e})") from None


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A copy of ``config`` with ``overrides`` applied (values coerced, then validated)."""
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid settings: {sorted(_FIELDS)}")
    values = {k: _coerce(k, v) for k, v in overrides.items()}
    return dataclasses.replace(config, **values).validate()


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object of settings (may include ``"preset"`` and ``"arch"``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot parse config file {p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a JSON object")
    return data
