"""Change of basis: discover CoB layers, calibrate, rotate (``method.md`` §4.1–4.3).

Public API::

    find_cob_layers(model) -> list[CoBLayer]
    calibrate(model, loader, layers=None, max_samples=10_000, progress=True) -> CalibrationStats
    CalibrationStats.save(path) / CalibrationStats.load(path); LayerStats.eigh() -> Eigen
    rotate_model(model, stats, layers=None) -> RotationResult   # in place
"""

from .calibrate import batch_inputs, calibrate
from .discovery import ROTATION_COMPATIBLE, CoBLayer, find_cob_layers, leaf_modules, select_layers
from .rotate import RotationResult, rotate_input, rotate_model, rotate_output
from .stats import CalibrationStats, Eigen, LayerStats, weight_fingerprint

__all__ = [
    "CoBLayer",
    "find_cob_layers",
    "select_layers",
    "leaf_modules",
    "ROTATION_COMPATIBLE",
    "calibrate",
    "batch_inputs",
    "CalibrationStats",
    "LayerStats",
    "Eigen",
    "weight_fingerprint",
    "rotate_model",
    "rotate_output",
    "rotate_input",
    "RotationResult",
]
