"""CIFAR-10 from the shipped JPEG archive, torchvision's official files or an ImageFolder tree.

Every source ends up as two :class:`ImageSet` (train, test) holding ``uint8`` images in
**NHWC** layout ``(N, 32, 32, 3)`` (the layout of the official pickles and of
``torchvision.datasets.CIFAR10.data``), ``int64`` labels and the class names.

The sources are decoded in :mod:`cobkern.data.sources`, JPEG sources go through the
checksummed cache of :mod:`cobkern.data.cache`, and :mod:`cobkern.data.imageset` holds
:class:`ImageSet`; this module picks the source (:func:`load_cifar10`) and re-exports the
names that used to live here.

Paths:

* the shipped archive: ``root`` if it is a file, else ``$COBKERN_DATA`` if set, else
  ``<repo>/data/cifar10-jpeg.tar.gz``;
* the cache: ``cache_dir`` if given, else ``$COBKERN_CACHE``, else ``<repo>/.cache`` in a
  source checkout, else ``~/.cache/cobkern``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .cache import CacheError, _cached, _sha256_file, default_cache_dir
from .imageset import CIFAR10_CLASSES, DataError, ImageSet, calibration_set, subset
from .sources import (
    _decode_archive,
    _decode_folder,
    _find_batches,
    _folder_key,
    _image_files,
    _load_torchvision,
    default_archive_path,
)

__all__ = [
    "ImageSet",
    "DataError",
    "CacheError",
    "CIFAR10_CLASSES",
    "load_cifar10",
    "subset",
    "calibration_set",
    "default_archive_path",
    "default_cache_dir",
]


def _to_sets(arrays: dict[str, object]) -> tuple[ImageSet, ImageSet]:
    classes = list(arrays["classes"])  # type: ignore[arg-type]
    sets = []
    for split in ("train", "test"):
        images = torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_images"]))
        labels = torch.from_numpy(np.asarray(arrays[f"{split}_labels"], dtype=np.int64))
        sets.append(ImageSet(images, labels, classes))
    return sets[0], sets[1]


# ----------------------------------------------------------------------------- entry point
SOURCES = ("auto", "shipped", "torchvision", "imagefolder")


def _archive_not_found(archive: Path, given: bool) -> str:
    """The message for a missing CIFAR-10 archive: how to point at one from where it was
    looked for (an installed package has no ``data/``: the archive ships with the source)."""
    if given:
        return f"CIFAR-10 archive not found: {archive}"
    if os.environ.get("COBKERN_DATA"):
        return f"CIFAR-10 archive not found: {archive} (the COBKERN_DATA environment variable)"
    return (f"CIFAR-10 archive not found: {archive}. The copy cobkern ships is "
            "data/cifar10-jpeg.tar.gz in its source checkout (an installed wheel does not "
            "include it): point to it, or to torchvision's cifar-10-batches-py folder or an "
            "ImageFolder tree, with COBKERN_DATA=PATH (every entry point), `cobkern run "
            "--data-root PATH`, `cobkern train --set data_root=PATH`, `python -m "
            "cobkern.training --data-root PATH` or load_cifar10(root=PATH)")


def load_cifar10(
    source: str = "auto",
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    rebuild_cache: bool = False,
    progress: bool = True,
) -> tuple[ImageSet, ImageSet]:
    """Load CIFAR-10 (or any two-split image set) as ``(train, test)`` :class:`ImageSet`.

    Args:
        source: ``"shipped"`` — the project's JPEG archive (``root`` may name another
            ``.tar.gz`` in the same layout); ``"torchvision"`` — the official python pickles
            under ``root/cifar-10-batches-py`` (downloaded with torchvision only when
            ``download=True``); ``"imagefolder"`` — ``root/{train,test}/<class>/<image>``
            (``val`` is accepted for ``test`` where there is no ``test``; other sizes are
            resized to 32×32);
            ``"auto"`` — picks one from what ``root`` is (archive file, pickles folder,
            ImageFolder tree) or, without ``root``, the shipped archive.
        root: path for the chosen source (see above).
        cache_dir: where decoded JPEG sources are cached (default: see module docstring).
        download: allow torchvision to download the official files.
        rebuild_cache: decode the source again even if a cache exists.
        progress: a progress bar while images are decoded (not when read from the cache).

    Returns:
        ``(train, test)``: images ``uint8 (N, 32, 32, 3)`` NHWC, labels ``int64 (N,)``.

    Raises:
        DataError: unknown source, missing or malformed data. CacheError: corrupt cache.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; expected one of {SOURCES}")
    rootp = Path(root).expanduser() if root is not None else None
    if source == "auto":
        if rootp is None:
            source = "shipped"
        elif rootp.is_file():
            source = "shipped"
        elif rootp.is_dir() and _find_batches(rootp) is not None:
            source = "torchvision"
        elif rootp.is_dir() and any((rootp / s).is_dir() for s in ("train", "test", "val")):
            source = "imagefolder"
        else:
            raise DataError(f"data root {rootp} does not exist or is not a CIFAR-10 archive, "
                            "a cifar-10-batches-py folder, or an ImageFolder tree with "
                            "train/ and test/")
    if source == "shipped":
        archive = rootp if rootp is not None else default_archive_path()
        if archive.is_dir():
            return load_cifar10("auto", archive, cache_dir, download=download,
                                rebuild_cache=rebuild_cache, progress=progress)
        if not archive.is_file():
            raise DataError(_archive_not_found(archive, given=rootp is not None))
        # The letter marks the decoder: "l" read link members (hard links, symlinks) as
        # images (a cache from before skipped them), "p" orders members by path component
        # and scales 16-bit grey images (caches from before: "cat-big" before "cat", white)
        key = "p" + _sha256_file(archive)
        arrays = _cached(key, cache_dir, f"archive:{archive}",
                         lambda: _decode_archive(archive, progress), rebuild_cache)
    elif source == "imagefolder":
        if rootp is None:
            raise DataError("data source 'imagefolder' needs a root folder (--data-root)")
        if not rootp.is_dir():
            raise DataError(f"ImageFolder root not found: {rootp}")
        files = list(_image_files(rootp))
        if not files:
            raise DataError(f"no images under {rootp}/train|test/<class>/")
        key = _folder_key(rootp, files)
        arrays = _cached(key, cache_dir, f"imagefolder:{rootp}",
                         lambda: _decode_folder(rootp, files, progress), rebuild_cache)
    else:
        arrays = _load_torchvision(rootp, download)
    return _to_sets(arrays)
