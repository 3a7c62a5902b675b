"""End-to-end CoB experiments: settings, the experiment directory, sweeps, speed.

* :class:`ExperimentConfig`, :func:`get_experiment_preset` (``quick``, ``fast``, ``paper``);
* :class:`Context` — data, trained model, statistics and records of one ``OUT/``;
* :func:`run_experiments` and the experiments of :mod:`.sweeps` (fixed ratio, normaliser,
  lossless, threshold + fine-tuning, Torch-Pruning peers, speed);
* :func:`run_pipeline` — train → calibrate → sweep → report (``cobkern run``);
* :func:`measure_speed`, :func:`count_flops`.
"""

from .config import (
    EXPERIMENTS,
    ExperimentConfig,
    FinetuneRecipe,
    get_experiment_preset,
    load_experiment_config,
)
from .context import Context, count_params, resolve_device
from .files import Layout, MissingStepError
from .pipeline import calibrate_step, report_step, run_pipeline, sweep_step, train_step
from .speed import count_flops, layer_flops, measure_speed
from .sweeps import layer_widths, run_experiments

__all__ = [
    "ExperimentConfig",
    "FinetuneRecipe",
    "EXPERIMENTS",
    "get_experiment_preset",
    "load_experiment_config",
    "Context",
    "Layout",
    "MissingStepError",
    "count_params",
    "resolve_device",
    "run_experiments",
    "run_pipeline",
    "train_step",
    "calibrate_step",
    "sweep_step",
    "report_step",
    "measure_speed",
    "count_flops",
    "layer_flops",
    "layer_widths",
]
