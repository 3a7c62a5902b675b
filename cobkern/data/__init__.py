"""CIFAR-10 data: sources, a checksummed decode cache, and a device-resident loader.

* :func:`load_cifar10` → ``(train, test)`` :class:`ImageSet` (``uint8`` NHWC images);
* :func:`subset`, :func:`calibration_set` — seeded choices of images;
* :class:`DeviceLoader` — batches built on the device with batched crop/flip/normalise.
"""

from .cache import CacheError, default_cache_dir
from .cifar import load_cifar10
from .imageset import CIFAR10_CLASSES, DataError, ImageSet, calibration_set, subset
from .loader import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader, normalize
from .sources import default_archive_path

__all__ = [
    "ImageSet",
    "load_cifar10",
    "subset",
    "calibration_set",
    "DeviceLoader",
    "normalize",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_CLASSES",
    "DataError",
    "CacheError",
    "default_archive_path",
    "default_cache_dir",
]
