"""Atomic file writes: a killed run never leaves a half-written file behind.

Every file cobkern writes (model files, checkpoints, calibration statistics, caches, metrics,
reports) goes through :func:`atomic_path`: the content is written to a temporary file in the
same folder, then renamed over the target with ``os.replace`` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    The parent folder is created. If the block raises, the temporary file is removed and
    ``path`` is left as it was.

    Example::

        with atomic_path("out/model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
