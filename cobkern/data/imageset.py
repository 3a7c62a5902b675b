"""Labelled image sets: :class:`ImageSet` and seeded choices of images from one.

An :class:`ImageSet` holds ``uint8`` NHWC images, ``int64`` labels and the class names;
:func:`subset` and :func:`calibration_set` pick a seeded, order-preserving subset. This module
also defines :class:`DataError`, the error every data source raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ImageSet", "DataError", "CIFAR10_CLASSES", "subset", "calibration_set"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


class DataError(ValueError):
    """Missing, malformed or inconsistent input data."""


# ----------------------------------------------------------------------------- ImageSet
@dataclass
class ImageSet:
    """A labelled image set held as tensors.

    Attributes:
        images: ``(N, H, W, 3)`` ``torch.uint8``, NHWC, RGB.
        labels: ``(N,)`` ``torch.int64`` in ``[0, len(classes))``.
        classes: class names; ``classes[k]`` is label ``k``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=lambda: list(CIFAR10_CLASSES))

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or \
                self.images.shape[-1] != 3:
            raise DataError(f"ImageSet.images must be uint8 (N, H, W, 3), got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DataError(f"ImageSet.labels must be int64 ({self.images.shape[0]},), got "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}")
        if self.labels.numel():  # a label without a class would fail (or wrap) in the loss
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= len(self.classes):
                raise DataError(f"ImageSet.labels must be in [0, {len(self.classes)}) for "
                                f"{len(self.classes)} classes, got labels from {lo} to {hi}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        """A seeded random choice of ``n`` distinct images, kept in their original order."""
        return subset(self, n, seed)

    def to(self, device: torch.device | str) -> ImageSet:
        """The same set with its tensors on ``device``."""
        return ImageSet(self.images.to(device), self.labels.to(device), list(self.classes))


def subset(data: ImageSet, n: int | None, seed: int = 0) -> ImageSet:
    """``n`` images chosen uniformly without replacement with a seeded generator.

    ``n=None`` or ``n >= len(data)`` returns ``data`` unchanged. The chosen indices are
    sorted, so the subset keeps the original order.
    """
    if n is None or n >= len(data):
        return data
    if n < 1:
        raise DataError(f"subset size must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n].sort().values
    idx = idx.to(data.images.device)
    return ImageSet(data.images[idx], data.labels[idx], list(data.classes))


def calibration_set(train: ImageSet, n: int = 10_000, seed: int = 0) -> ImageSet:
    """The CoB calibration set (``method.md`` §4): ``n`` un-augmented training images.

    A seeded choice (:func:`subset`); feed it through a
    :class:`~cobkern.data.DeviceLoader` with ``augment=False`` for the clean variant, or
    ``augment=True`` to mimic the authors' notebook.
    """
    return subset(train, n, seed)
