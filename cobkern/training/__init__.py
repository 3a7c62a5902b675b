"""Training: presets, the training loop (single process or DDP), evaluation, fine-tuning.

* :class:`TrainConfig`, :func:`get_preset` (``paper``, ``fast``, ``quick``);
* :func:`train`, :func:`finetune`, :func:`evaluate`;
* :func:`cobkern.training.cli.main` — ``python -m cobkern.training``.
"""

from .config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    get_preset,
    load_config_file,
)
from .trainer import CheckpointError, evaluate, finetune, lr_factor, train

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
