"""CIFAR-10 from the shipped JPEG archive, torchvision's official files or an ImageFolder tree.

Every source ends up as two :class:`ImageSet` (train, test) holding ``uint8`` images in
**NHWC** layout ``(N, 32, 32, 3)`` (the layout of the official pickles and of
``torchvision.datasets.CIFAR10.data``), ``int64`` labels and the class names.

JPEG sources are decoded once and cached as one uncompressed ``.npz`` plus a JSON sidecar
holding its sha256; later loads verify the hash (a corrupt cache is an error, never silently
used) and skip decoding. The cache key is derived from the source (the archive's sha256, or
the ImageFolder tree's paths, sizes and mtimes), so a changed source gets a new cache.

Paths:

* the shipped archive: ``root`` if it is a file, else ``$COBKERN_DATA`` if set, else
  ``<repo>/data/cifar10-jpeg.tar.gz``;
* the cache: ``cache_dir`` if given, else ``$COBKERN_CACHE``, else ``<repo>/.cache`` in a
  source checkout, else ``~/.cache/cobkern``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cobkern._atomic import atomic_path

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

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
IMAGE_SIZE = 32
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".gif", ".tif", ".tiff"}
_CACHE_VERSION = 1
_REPO = Path(__file__).resolve().parents[2]


class DataError(ValueError):
    """Missing, malformed or inconsistent input data."""


class CacheError(DataError):
    """A decoded-data cache file that fails its checksum or cannot be read."""


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


# ----------------------------------------------------------------------------- paths
def default_archive_path() -> Path:
    """``$COBKERN_DATA`` if set, else ``<repo>/data/cifar10-jpeg.tar.gz``."""
    env = os.environ.get("COBKERN_DATA")
    return Path(env) if env else _REPO / "data" / "cifar10-jpeg.tar.gz"


def default_cache_dir() -> Path:
    """``$COBKERN_CACHE``, else ``<repo>/.cache`` in a source checkout, else ``~/.cache``."""
    env = os.environ.get("COBKERN_CACHE")
    if env:
        return Path(env)
    if (_REPO / "pyproject.toml").is_file() and os.access(_REPO, os.W_OK):
        return _REPO / ".cache"
    return Path.home() / ".cache" / "cobkern"


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- decoding
def _decode(blob: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"cannot decode image {name}: {e}") from None


def _assemble(items: dict[str, list[tuple[str, np.ndarray]]], source: str) -> dict[str, object]:
    """``items[split]`` = list of (class, HWC array) → arrays, labels and classes."""
    if not items.get("train") or not items.get("test"):
        raise DataError(f"{source}: need both a train/ and a test/ split with images, found "
                        f"{sorted(k for k, v in items.items() if v) or 'none'}")
    classes = sorted({c for c, _ in items["train"]})
    test_classes = sorted({c for c, _ in items["test"]})
    if not set(test_classes) <= set(classes):
        raise DataError(f"{source}: test classes {test_classes} are not among the train "
                        f"classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, object] = {"classes": classes}
    for split in ("train", "test"):
        out[f"{split}_images"] = np.stack([a for _, a in items[split]])
        out[f"{split}_labels"] = np.array([index[c] for c, _ in items[split]], dtype=np.int64)
    return out


def _split_and_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """``(split, class)`` from ``.../<train|test|val>/<class>/<file>``."""
    if len(parts) < 3:
        return None
    split = {"train": "train", "test": "test", "val": "test"}.get(parts[-3])
    return (split, parts[-2]) if split else None


def _decode_archive(path: Path) -> dict[str, object]:
    items: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:*") as tf:
            members = sorted((m for m in tf if m.isfile()), key=lambda m: m.name)
            for m in members:
                parts = Path(m.name).parts
                sc = _split_and_class(parts)
                if sc is None or Path(m.name).suffix.lower() not in _IMAGE_EXTS:
                    continue
                f = tf.extractfile(m)
                assert f is not None
                items[sc[0]].append((sc[1], _decode(f.read(), m.name)))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot read archive {path}: {e}") from None
    return _assemble(items, str(path))


def _image_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    """``(split, class, file)`` of every image under ``root/<split>/<class>/``.

    A class folder without images is not a class (the classes are the folders with
    images, numbered in sorted order); a warning names it, since the labels of the classes
    after it shift by one (torchvision's ``ImageFolder`` refuses such a tree).
    """
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        split = {"train": "train", "test": "test", "val": "test"}.get(split_dir.name)
        if split is None:
            continue
        for cls_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            empty = True
            for f in sorted(cls_dir.iterdir()):
                if f.is_file() and f.suffix.lower() in _IMAGE_EXTS:
                    empty = False
                    yield split, cls_dir.name, f
            if empty:
                warnings.warn(f"ImageFolder class folder {cls_dir} holds no images: it is left "
                              "out of the classes (the labels of the classes after it shift)",
                              stacklevel=3)


def _decode_folder(root: Path, files: Iterable[tuple[str, str, Path]]) -> dict[str, object]:
    items: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    for split, cls, f in files:
        items[split].append((cls, _decode(f.read_bytes(), str(f))))
    return _assemble(items, str(root))


def _folder_key(root: Path, files: list[tuple[str, str, Path]]) -> str:
    h = hashlib.sha256()
    for _, _, f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- cache
def _to_sets(arrays: dict[str, object]) -> tuple[ImageSet, ImageSet]:
    classes = list(arrays["classes"])  # type: ignore[arg-type]
    sets = []
    for split in ("train", "test"):
        images = torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_images"]))
        labels = torch.from_numpy(np.asarray(arrays[f"{split}_labels"], dtype=np.int64))
        sets.append(ImageSet(images, labels, classes))
    return sets[0], sets[1]


_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _rebuild_hint(npz: Path, meta_path: Path) -> str:
    return (f"delete {npz} and {meta_path} to decode the source again (from Python: "
            "load_cifar10(..., rebuild_cache=True))")


def _read_meta(npz: Path, meta_path: Path) -> dict[str, object]:
    """The cache sidecar, checked: version, sha256, class names and split sizes."""
    def bad(why: str) -> CacheError:
        return CacheError(f"damaged cache metadata {meta_path} ({why}); "
                          + _rebuild_hint(npz, meta_path))

    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise bad(f"a JSON {type(meta).__name__}, not an object")
    if meta.get("version") != _CACHE_VERSION:
        raise bad(f"version {meta.get('version')!r}, expected {_CACHE_VERSION}")
    sha = meta.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise bad(f"sha256 {sha!r} is not a hex digest")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or \
            not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise bad(f"classes {classes!r} is not a list of distinct names")
    for k in ("n_train", "n_test"):
        v = meta.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f"{k} {v!r} is not a positive integer")
    return meta


def _read_cache(npz: Path, meta_path: Path) -> dict[str, object]:
    meta = _read_meta(npz, meta_path)
    expected = str(meta["sha256"])
    actual = _sha256_file(npz)
    if actual != expected:
        raise CacheError(f"cache file {npz} is corrupt (sha256 {actual[:16]}… != recorded "
                         f"{expected[:16]}…); " + _rebuild_hint(npz, meta_path))
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays: dict[str, object] = {k: z[k] for k in z.files}
    except Exception as e:
        raise CacheError(f"cannot read cache file {npz}: {e}; "
                         + _rebuild_hint(npz, meta_path)) from None
    missing = [k for k in _CACHE_ARRAYS if k not in arrays]
    if missing:
        raise CacheError(f"cache file {npz} lacks {missing}; " + _rebuild_hint(npz, meta_path))
    classes = list(meta["classes"])  # type: ignore[call-overload]
    for split in ("train", "test"):
        labels = np.asarray(arrays[f"{split}_labels"])
        images = np.asarray(arrays[f"{split}_images"])
        n = meta[f"n_{split}"]
        if labels.ndim != 1 or len(labels) != n or images.shape[:1] != (n,) or \
                (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes)):
            raise CacheError(f"cache file {npz} does not match its metadata {meta_path} "
                             f"({split}: {len(labels)} labels for {n} images of "
                             f"{len(classes)} classes); " + _rebuild_hint(npz, meta_path))
    arrays["classes"] = classes
    return arrays


def _write_cache(npz: Path, meta_path: Path, arrays: dict[str, object], source: str) -> None:
    # The data file first: a sidecar never points at a missing or partial file.
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: v for k, v in arrays.items() if k != "classes"})
        digest = _sha256_file(tmp)
    meta = {"version": _CACHE_VERSION, "source": source, "sha256": digest,
            "classes": arrays["classes"],
            "n_train": int(len(arrays["train_labels"])),  # type: ignore[arg-type]
            "n_test": int(len(arrays["test_labels"]))}  # type: ignore[arg-type]
    with atomic_path(meta_path) as tmp_meta:
        tmp_meta.write_text(json.dumps(meta, indent=1))


def _cached(key: str, cache_dir: Path | None, source: str, decode, rebuild: bool):
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npz = cache_dir / f"cifar10-{key[:24]}.npz"
    meta = npz.with_suffix(".json")
    if not rebuild and npz.exists() and meta.exists():
        return _read_cache(npz, meta)
    arrays = decode()
    try:
        _write_cache(npz, meta, arrays, source)
    except OSError as e:  # a read-only cache location must not stop training
        warnings.warn(f"could not write the data cache in {cache_dir}: {e}", stacklevel=3)
    return arrays


# ----------------------------------------------------------------------------- torchvision
def _find_batches(root: Path) -> Path | None:
    for cand in (root / "cifar-10-batches-py", root):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    return None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise DataError(f"cannot read CIFAR-10 batch file {path}: {e}") from None


def _read_batches(folder: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", ["test_batch"])):
        data, labels = [], []
        for n in names:
            p = folder / n
            if not p.is_file():
                raise DataError(f"missing CIFAR-10 file {p}")
            d = _unpickle(p)
            data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(d.get("labels", d.get("fine_labels", [])))
        out[f"{split}_images"] = np.concatenate(data).transpose(0, 2, 3, 1)
        out[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    meta = folder / "batches.meta"
    out["classes"] = _unpickle(meta)["label_names"] if meta.is_file() else list(CIFAR10_CLASSES)
    return out


def _load_torchvision(root: Path | None, download: bool) -> dict[str, object]:
    root = Path(root) if root is not None else default_cache_dir() / "torchvision"
    folder = _find_batches(root)
    if folder is None:
        if not download:
            raise DataError(f"no CIFAR-10 python files (cifar-10-batches-py/) under {root}; "
                            "pass download=True (--download) to fetch them with torchvision")
        import torchvision

        try:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as e:
            raise DataError(f"downloading CIFAR-10 into {root} failed: {e}") from None
        folder = _find_batches(root)
        if folder is None:
            raise DataError(f"torchvision download finished but {root} has no CIFAR-10 files")
    return _read_batches(folder)


# ----------------------------------------------------------------------------- entry point
SOURCES = ("auto", "shipped", "torchvision", "imagefolder")


def load_cifar10(
    source: str = "auto",
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    rebuild_cache: bool = False,
) -> tuple[ImageSet, ImageSet]:
    """Load CIFAR-10 (or any two-split image set) as ``(train, test)`` :class:`ImageSet`.

    Args:
        source: ``"shipped"`` — the project's JPEG archive (``root`` may name another
            ``.tar.gz`` in the same layout); ``"torchvision"`` — the official python pickles
            under ``root/cifar-10-batches-py`` (downloaded with torchvision only when
            ``download=True``); ``"imagefolder"`` — ``root/{train,test}/<class>/<image>``
            (``val`` is accepted for ``test``; other sizes are resized to 32×32);
            ``"auto"`` — picks one from what ``root`` is (archive file, pickles folder,
            ImageFolder tree) or, without ``root``, the shipped archive.
        root: path for the chosen source (see above).
        cache_dir: where decoded JPEG sources are cached (default: see module docstring).
        download: allow torchvision to download the official files.
        rebuild_cache: decode the source again even if a cache exists.

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
                                rebuild_cache=rebuild_cache)
        if not archive.is_file():
            raise DataError(f"CIFAR-10 archive not found: {archive} (set COBKERN_DATA or pass "
                            "--data-root)")
        key = _sha256_file(archive)
        arrays = _cached(key, cache_dir, f"archive:{archive}",
                         lambda: _decode_archive(archive), rebuild_cache)
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
                         lambda: _decode_folder(rootp, files), rebuild_cache)
    else:
        arrays = _load_torchvision(rootp, download)
    return _to_sets(arrays)
