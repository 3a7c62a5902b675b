"""Training: presets, the training loop (single process or DDP), evaluation, fine-tuning.

* :class:`TrainConfig`, :func:`get_preset` (``paper``, ``fast``, ``quick``);
* :func:`train`, :func:`finetune` (:mod:`.trainer`: the loop) and :func:`evaluate`
  (:mod:`.evaluation`); the loop's pieces: :mod:`.optim` (optimizer, warm-up + cosine),
  :mod:`.checkpoint` (atomic checkpoints, resume checks, per-rank RNG state),
  :mod:`.metrics` (``metrics.jsonl`` and JSON outputs), :mod:`.distributed` (DDP context);
* :func:`cobkern.training.cli.main` — ``python -m cobkern.training``.
"""

from .checkpoint import CheckpointError
from .config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    get_preset,
    load_config_file,
)
from .evaluation import evaluate
from .optim import lr_factor
from .trainer import finetune, train

__all__ = [
    "TrainConfig",
    "PRESETS",
    "get_preset",
    "apply_overrides",
    "load_config_file",
    "train",
    "finetune",
    "evaluate",
    "lr_factor",
    "ConfigError",
    "CheckpointError",
]
