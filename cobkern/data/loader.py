"""A device-resident data loader with batched augmentation.

The whole image set sits on the device as ``uint8``; each batch is gathered, randomly
cropped (32×32 from the image zero-padded by 4), flipped and normalised with a handful of
batched tensor ops on that device, so a GPU never waits on CPU workers. The same code runs
on a CPU.

Randomness is a pure function of ``(seed, epoch, batch index)``: the epoch's permutation
comes from ``(seed, epoch)`` and a batch's crops/flips from ``(seed, epoch, batch)``. The
resumable state is therefore just ``(epoch, next batch)`` and a resumed run sees exactly the
batches an uninterrupted one would. Under data parallelism every rank draws the same global
batch of ``batch_size * world_size`` images and keeps its own slice, so N ranks see the same
images and augmentations as one process with the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .imageset import DataError, ImageSet

__all__ = ["DeviceLoader", "CIFAR10_MEAN", "CIFAR10_STD", "normalize"]

#: ``method.md`` §3 normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
PAD = 4


def _seed(*words: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative integers."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _check_images(who: str, images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[-1] != 3:
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor)
               else type(images).__name__)
        raise DataError(f"{who} expects uint8 NHWC images (N, H, W, 3), got {got}")


def normalize(images: Tensor, channels_last: bool = False) -> Tensor:
    """``uint8 (N, H, W, 3)`` NHWC → ``float32 (N, 3, H, W)`` normalised with §3 mean/std.

    The result is NCHW-contiguous, or channels_last-contiguous if ``channels_last``.

    Raises:
        DataError: anything but a uint8 ``(N, H, W, 3)`` tensor (float images in [0, 1]
            would be normalised as if they were 0..255, NCHW ones not at all).
    """
    _check_images("normalize", images)
    mean = torch.tensor(CIFAR10_MEAN, device=images.device)
    std = torch.tensor(CIFAR10_STD, device=images.device)
    x = images.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)  # NHWC, broadcast over C
    x = x.permute(0, 3, 1, 2)  # a channels_last view of the NHWC data
    return x if channels_last else x.contiguous()


class DeviceLoader:
    """Iterate ``(x, y)`` batches from images held on ``device``.

    Args:
        images: ``uint8 (N, H, W, 3)`` NHWC (an :class:`ImageSet`'s ``images``); copied to
            ``device`` once.
        labels: ``int64 (N,)``.
        batch_size: images per batch **per rank**.
        augment: random crop (pad 4, zero fill) and horizontal flip (p = 0.5).
        shuffle: a new permutation every epoch.
        drop_last: drop the final partial global batch.
        seed: seed for permutations and augmentation.
        device: where the images live and batches are produced.
        rank, world_size: this process's slice of each global batch (data parallelism).
        channels_last: return ``x`` channels_last-contiguous instead of NCHW-contiguous.

    Yields:
        ``x``: ``float32 (B, 3, H, W)`` normalised with the §3 mean/std; ``y``: ``int64 (B,)``.
        The final partial batch (``drop_last=False``) is split as evenly as possible across
        ranks.

    Iterating runs from the current position to the end of the epoch, then advances the
    epoch; :meth:`state_dict` / :meth:`load_state_dict` save and restore that position.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        augment: bool,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        _check_images("DeviceLoader", images)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or \
                labels.dtype == torch.bool:  # .to(int64) would truncate 1.7 to 1
            raise DataError(f"DeviceLoader expects integer labels, got {labels.dtype}")
        if labels.shape != images.shape[:1]:
            raise DataError(f"labels {tuple(labels.shape)} do not match {images.shape[0]} images")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not (0 <= rank < world_size):
            raise DataError(f"rank {rank} is out of range for world_size {world_size}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be an int >= 0 (numpy's SeedSequence takes no "
                            f"negative seed), got {seed!r}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.augment, self.shuffle, self.drop_last = augment, shuffle, drop_last
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        self.epoch = 0
        self.batch = 0
        self._mean_std()
        if len(self) == 0:
            raise DataError("no images to load" if not len(self.labels) else
                            f"{len(self.labels)} images make no full batch of "
                            f"{self.global_batch_size} (drop_last=True)")

    def plain(self) -> DeviceLoader:
        """A loader over the same images (no copy), ranks, batch size and layout that
        yields every image once, in order, un-augmented (``augment``, ``shuffle`` and
        ``drop_last`` off), from the start; this loader's position is not touched."""
        return DeviceLoader(self.images, self.labels, self.batch_size, augment=False,
                            shuffle=False, drop_last=False, seed=self.seed, device=self.device,
                            rank=self.rank, world_size=self.world_size,
                            channels_last=self.channels_last)

    @classmethod
    def from_imageset(cls, data: ImageSet, batch_size: int, **kwargs: Any) -> DeviceLoader:
        """``DeviceLoader(data.images, data.labels, batch_size, **kwargs)``."""
        return cls(data.images, data.labels, batch_size, **kwargs)

    def _mean_std(self) -> None:
        std = torch.tensor(CIFAR10_STD, device=self.device)
        self._scale = 1.0 / (255.0 * std)
        self._shift = torch.tensor(CIFAR10_MEAN, device=self.device) / std

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        """Batches per epoch."""
        n, g = self.num_samples, self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(_seed(self.seed, 0, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def _slice(self, t: Tensor, dim: int) -> Tensor:
        if self.world_size == 1:
            return t
        return torch.tensor_split(t, self.world_size, dim=dim)[self.rank]

    def _make_batch(self, idx: Tensor, epoch: int, batch: int) -> tuple[Tensor, Tensor]:
        local = self._slice(idx, 0).to(self.device)
        x, y = self.images[local], self.labels[local]
        if self.augment:
            x = self._augment(x, idx.numel(), epoch, batch)
        x = x.float().mul_(self._scale).sub_(self._shift).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last \
            else x.contiguous()
        return x, y

    def _augment(self, x: Tensor, global_b: int, epoch: int, batch: int) -> Tensor:
        """Random crop (zero padding 4) + horizontal flip of uint8 NHWC ``x``, batched.

        Parameters are drawn for the whole global batch of ``global_b`` images (from
        ``(seed, epoch, batch)``) and sliced to this rank, so the result does not depend on
        the number of ranks.
        """
        b, h, w, _ = x.shape
        g = torch.Generator().manual_seed(_seed(self.seed, 1, epoch, batch))
        params = self._slice(torch.randint(0, 2 * PAD + 1, (2, global_b), generator=g), 1)
        flip = self._slice(torch.rand(global_b, generator=g) < 0.5, 0)
        oy, ox = params[0].to(x.device), params[1].to(x.device)
        flip = flip.to(x.device)
        padded = F.pad(x, (0, 0, PAD, PAD, PAD, PAD))  # (B, H+8, W+8, 3), zero fill
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        rows = oy[:, None] + ar_h  # (B, H)
        cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
        bi = torch.arange(b, device=x.device)[:, None, None]
        return padded[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, start = self.epoch, self.batch
        order = self._order(epoch)
        g = self.global_batch_size
        for b in range(start, len(self)):
            idx = order[b * g:(b + 1) * g]
            self.batch = b + 1  # the position a checkpoint taken after this batch resumes at
            yield self._make_batch(idx, epoch, b)
        self.epoch, self.batch = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch", "seed", "num_samples", "global_batch_size"}``."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; the data and batch geometry must match."""
        for k in ("seed", "num_samples", "global_batch_size"):
            if k in state and state[k] != getattr(self, k):
                raise DataError(f"loader state has {k}={state[k]} but this loader has "
                                f"{getattr(self, k)}; the data or batch size changed")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise DataError(f"loader state has epoch={epoch}, batch={batch}; both must be >= 0")
        if batch > len(self):  # iterating would yield nothing: an epoch silently skipped
            raise DataError(f"loader state has batch={batch}, but an epoch of this loader has "
                            f"{len(self)} batches (drop_last={self.drop_last})")
        self.epoch, self.batch = epoch, batch
