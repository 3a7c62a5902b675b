"""Atomic file writes: a killed run never leaves a half-written file behind.

Every file cobkern writes (model files, checkpoints, calibration statistics, caches, metrics,
reports) goes through :func:`atomic_path`: the content is written to a temporary file in the
same folder, flushed to disk (``fsync``), then renamed over the target with ``os.replace``
(atomic on POSIX and Windows), and the folder is synced where the platform allows it, so
neither a killed process nor a power loss leaves an empty or partial file under the name.
The file gets the permissions of a plain ``open(path, "w")`` (``0o666`` less the umask),
whatever the writer created the temporary file with (safetensors creates ``0o600`` files).
A temporary file left by a writer killed outright (SIGKILL: no cleanup runs) is removed by
the next write of the same file, once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "remove_stale"]


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (the writer may already have closed it)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Persist a rename in folder ``path``; a no-op where folders cannot be opened or synced
    (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    """This machine's name, as it goes into temporary file names (no separators)."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def remove_stale(path: str | os.PathLike) -> None:
    """Remove ``path``'s temporary files whose writer died on this machine: the names end
    in ``-<host>-<pid>`` (``-<pid>`` before the host was part of them). One of another
    machine (a shared folder) or of a live process is left alone."""
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    host = _host()
    for p in path.parent.glob(f"{prefix}*"):
        tag = p.name[len(prefix):]
        owner, _, pid = tag.rpartition("-")
        if not pid.isdigit() or owner not in ("", host):
            continue
        if int(pid) != os.getpid() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    The parent folder is created. The temporary file is given the mode ``0o666`` less the
    umask (as every other output; some writers create ``0o600`` files), fsynced before the
    rename and the folder after it. If the block raises, the temporary file is removed and
    ``path`` is left as it was.

    Example::

        with atomic_path("out/model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}")
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
