"""The decoded-array cache for JPEG sources: checksummed ``.npz`` files with a JSON sidecar.

JPEG sources are decoded once and cached as one uncompressed ``.npz`` plus a JSON sidecar
holding its sha256; later loads verify the hash (a corrupt cache is an error, never silently
used) and skip decoding. The cache key is derived from the source (the archive's sha256, or
the ImageFolder tree's paths, sizes and mtimes), so a changed source gets a new cache.

The cache location: ``cache_dir`` if given, else ``$COBKERN_CACHE``, else ``<repo>/.cache`` in
a source checkout, else ``~/.cache/cobkern`` (:func:`default_cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from cobkern._atomic import atomic_path

from .imageset import DataError

__all__ = ["CacheError", "default_cache_dir"]

_CACHE_VERSION = 1
_REPO = Path(__file__).resolve().parents[2]


class CacheError(DataError):
    """A decoded-data cache file that fails its checksum or cannot be read."""


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
