"""VGG-16 models (TSRA and ReLU control) and model files.

* :func:`vgg16_tsra`, :func:`vgg16_relu`, :class:`VGG`, :data:`VGG_CFG_D` — ``method.md`` §2;
* :func:`model_config`, :func:`build_model` — architecture config derived from live modules
  (so pruned models round-trip);
* :func:`save_model`, :func:`load_model` — weights + config in one file, written atomically.
"""

from .io import (
    ModelFileError,
    build_model,
    default_model_filename,
    load_model,
    model_config,
    read_model_file,
    save_model,
    unwrap_model,
)
from .vgg import (
    VGG,
    VGG_CFG_D,
    forward_fusing_conv_bias,
    init_relu_weights,
    scaled_width,
    vgg16_relu,
    vgg16_tsra,
)

__all__ = [
    "VGG",
    "VGG_CFG_D",
    "vgg16_tsra",
    "vgg16_relu",
    "init_relu_weights",
    "scaled_width",
    "forward_fusing_conv_bias",
    "model_config",
    "build_model",
    "save_model",
    "load_model",
    "read_model_file",
    "unwrap_model",
    "default_model_filename",
    "ModelFileError",
]
