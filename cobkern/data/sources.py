"""Decoding the three CIFAR-10 sources into arrays (no caching, no tensors).

* the shipped JPEG archive (or any ``.tar.gz`` in its layout): :func:`_decode_archive`;
* an ImageFolder tree ``root/{train,test,val}/<class>/<image>``: :func:`_image_files`,
  :func:`_decode_folder` and its cache key :func:`_folder_key`;
* torchvision's pickled batches (``cifar-10-batches-py``): :func:`_load_torchvision`.

Each returns ``{"classes", "train_images", "train_labels", "test_images", "test_labels"}``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .cache import _REPO, default_cache_dir
from .imageset import CIFAR10_CLASSES, DataError

__all__ = ["default_archive_path"]

IMAGE_SIZE = 32
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".gif", ".tif", ".tiff"}


def default_archive_path() -> Path:
    """``$COBKERN_DATA`` if set, else ``<repo>/data/cifar10-jpeg.tar.gz``."""
    env = os.environ.get("COBKERN_DATA")
    return Path(env) if env else _REPO / "data" / "cifar10-jpeg.tar.gz"


# ----------------------------------------------------------------------------- decoding
def _decode(blob: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            if im.mode.startswith("I;16"):  # 16-bit grey: convert() would clip it at 255
                a = np.asarray(im).astype(np.uint32)
                im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
            elif im.mode in ("I", "F"):
                kind = "integers" if im.mode == "I" else "floats"
                raise ValueError(f"its pixels are 32-bit {kind} (mode {im.mode}), whose range "
                                 "is not known; save it with 8 or 16 bits per channel")
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


#: split folder name → split (``val`` stands in for a missing ``test``)
_SPLITS = {"train": "train", "test": "test", "val": "test"}


def _split_and_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """``(split, class)`` from ``.../<train|test|val>/<class>/<file>``."""
    if len(parts) < 3:
        return None
    split = _SPLITS.get(parts[-3])
    return (split, parts[-2]) if split else None


def _decode_archive(path: Path, progress: bool = False) -> dict[str, object]:
    from tqdm.auto import tqdm

    found: list[tuple[str, str, str, np.ndarray]] = []
    pickles = False  # members under cifar-10-batches-py/: torchvision's download, packed
    # the member count is not known before the (compressed) stream has been read
    bar = tqdm(desc=f"decode {path.name}", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        with bar, tarfile.open(path, "r:*") as tf:
            # Members in archive order: a compressed archive seeks backwards only by
            # decompressing again from the start, so reading them in name order is
            # quadratic for an archive not packed sorted (GNU tar's readdir order).
            for m in tf:
                # a hard link is how tar stores a file's second name (a tree deduplicated
                # with `cp -l`), a symlink another's; both are images of the tree, as the
                # folder source reads them
                if not (m.isfile() or m.islnk() or m.issym()):
                    continue
                sc = _split_and_class(Path(m.name).parts)
                pickles |= _PICKLES in Path(m.name).parts
                if sc is None or Path(m.name).suffix.lower() not in _IMAGE_EXTS:
                    continue
                try:
                    f = tf.extractfile(m)
                except KeyError:  # a link to a member the archive does not hold
                    f = None
                if f is None:
                    raise DataError(f"archive {path}: {m.name} is a link to {m.linkname!r}, "
                                    "which is not a file in the archive")
                found.append((m.name, Path(m.name).parts[-3], sc[1],
                              _decode(f.read(), m.name)))
                bar.update(1)
            # tarfile ends its iteration without a word at a truncated or damaged header:
            # the members must end at the end-of-archive marker (a zero block).
            tf.fileobj.seek(tf.offset)
            if tf.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise DataError(f"archive {path} is truncated or damaged: no end-of-archive "
                                f"marker after its first {len(found)} images")
            while tf.fileobj.read(1 << 20):  # to the end: a compressed stream's checksum
                pass
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot read archive {path}: {e}") from None
    if not found and pickles:
        raise DataError(_packed_pickles(path))
    items: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    skip_val = _val_is_not_test({d for _, d, _, _ in found}, str(path))
    # by path components, as the folder source walks a tree ("cat" before "cat-big", whose
    # full name sorts first: "-" < "/")
    for _, split_dir, cls, image in sorted(found, key=lambda t: Path(t[0]).parts):
        if not (skip_val and split_dir == "val"):
            items[_SPLITS[split_dir]].append((cls, image))
    return _assemble(items, str(path))


def _val_is_not_test(split_dirs: set[str], where: str) -> bool:
    """Whether a tree with these split folders has ``val`` images to leave out: ``val``
    stands in for ``test`` only where there is no ``test`` (a train/val/test tree's
    validation images are not test data); a warning says so."""
    if {"val", "test"} <= split_dirs:
        warnings.warn(f"{where} has both test/ and val/ images: val/ is left out (it stands "
                      "for test/ only where there is none)", stacklevel=4)
        return True
    return False


def _image_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    """``(split, class, file)`` of every image under ``root/<split>/<class>/``.

    A class folder without images is not a class (the classes are the folders with
    images, numbered in sorted order); a warning names it, since the labels of the classes
    after it shift by one (torchvision's ``ImageFolder`` refuses such a tree).
    """
    split_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    skip_val = _val_is_not_test({p.name for p in split_dirs}, str(root))
    for split_dir in split_dirs:
        split = _SPLITS.get(split_dir.name)
        if split is None or (skip_val and split_dir.name == "val"):
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


def _decode_folder(root: Path, files: list[tuple[str, str, Path]],
                   progress: bool = False) -> dict[str, object]:
    from tqdm.auto import tqdm

    items: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    for split, cls, f in tqdm(files, desc=f"decode {root.name}", unit="img",
                              disable=not progress, dynamic_ncols=True):
        items[split].append((cls, _decode(f.read_bytes(), str(f))))
    return _assemble(items, str(root))


def _folder_key(root: Path, files: list[tuple[str, str, Path]]) -> str:
    # "decoder 2": 16-bit grey images scaled (caches from before hold them clipped, white)
    h = hashlib.sha256(b"decoder 2\0" + os.fsencode(root.resolve()) + b"\0\n")
    for _, _, f in files:
        st = f.stat()
        # fsencode: a file name that is not valid UTF-8 (surrogate-escaped) hashes too. The
        # change time too: a file replaced with its size and mtime kept (cp -p, rsync -a,
        # tar x) still changes it.
        h.update(os.fsencode(f.relative_to(root)))
        h.update(f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- torchvision
_PICKLES = "cifar-10-batches-py"


def _packed_pickles(path: Path) -> str:
    return (f"{path} is torchvision's CIFAR-10 python archive, still packed: extract it "
            f"(tar xzf {path.name}) and pass the folder that holds {_PICKLES}/ as the data "
            "root")


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


def _batch_content(d: object, path: Path) -> tuple[np.ndarray, list[int]]:
    """The ``(N, 3072)`` uint8 rows and the N labels of one unpickled batch file."""
    if not isinstance(d, dict) or "data" not in d:
        raise DataError(f"CIFAR-10 batch file {path} holds no 'data' entry (not a CIFAR-10 "
                        "python batch)")
    rows = np.asarray(d["data"])
    if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32 or rows.dtype != np.uint8:
        raise DataError(f"CIFAR-10 batch file {path}: 'data' must be uint8 rows of 3072 "
                        f"(3x32x32) values, got {rows.dtype} {rows.shape}")
    labels = d.get("labels", d.get("fine_labels"))
    if labels is None or len(labels) != len(rows):
        raise DataError(f"CIFAR-10 batch file {path}: {len(rows)} images but "
                        f"{'no' if labels is None else len(labels)} labels")
    return rows, list(labels)


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
            rows, labs = _batch_content(d, p)
            data.append(rows.reshape(-1, 3, 32, 32))
            labels.extend(labs)
        out[f"{split}_images"] = np.concatenate(data).transpose(0, 2, 3, 1)
        out[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    meta = folder / "batches.meta"
    out["classes"] = _unpickle(meta)["label_names"] if meta.is_file() else list(CIFAR10_CLASSES)
    return out


def _load_torchvision(root: Path | None, download: bool) -> dict[str, object]:
    root = Path(root) if root is not None else default_cache_dir() / "torchvision"
    if root.is_file():
        raise DataError(_packed_pickles(root) if tarfile.is_tarfile(root) else
                        f"{root} is a file; the torchvision source needs the folder that holds "
                        f"{_PICKLES}/")
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
