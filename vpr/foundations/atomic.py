"""Atomic writes: readers see the old file or the new one, never a partial one.

A temporary file is named ``.<target>.<pid>.<random>.tmp`` beside its target, and its writer holds an
exclusive ``flock`` on it until the rename. A writer killed before its rename (``kill -9``, power loss)
leaves one behind, and the kernel drops its lock; the next write of the same target removes the
temporaries nobody holds, so dead writers' leftovers do not pile up inside DVC-tracked folders. The lock,
not the PID in the name, decides: a PID means nothing across containers (PID namespaces) or hosts
sharing a filesystem, while a lock is held on the file itself (NFS passes ``flock`` on as a lock).
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | Path, *, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed over it.

    ``sweep``: first remove ``target``'s dead temporaries, which lists the whole folder; a writer of many
    files into one folder passes False and calls ``remove_dead_temporaries_in`` once instead (a listing
    per file makes writing N files O(N²)).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_dead_temporaries(target)
    fd, tmp_path = _locked_temporary(target)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; published files are world-readable
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        os.close(fd)  # the lock goes with it


def _locked_temporary(target: Path) -> tuple[int, Path]:
    """A new temporary beside ``target`` and an open descriptor holding its lock.

    Another writer's cleanup may remove the file between its creation and the lock: then it is made again.
    """
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, Path(tmp)
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_dead_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporaries of ``target`` that no writer holds (their writer died); the paths removed."""
    target = Path(target)
    return _remove_unheld(target.parent, re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp$"))


def remove_dead_temporaries_in(folder: str | Path) -> list[Path]:
    """Remove the dead temporaries of every target in ``folder`` (one listing); the paths removed."""
    return _remove_unheld(Path(folder), re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$"))


def _remove_unheld(folder: Path, pattern: re.Pattern) -> list[Path]:
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and _remove_if_unheld(Path(entry.path)):
            removed.append(Path(entry.path))
    return removed


def _remove_if_unheld(path: Path) -> bool:
    """Unlink ``path`` when no process holds its lock (checked and removed under our own lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # a live writer, whatever its PID says
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
            return True
        return False
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries, so that renames inside it survive a crash (not only the files' bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(target: str | Path, data: bytes, *, sweep: bool = True) -> Path:
    with atomic_path(target, sweep=sweep) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_atomic(target: str | Path, text: str) -> Path:
    return write_bytes_atomic(target, text.encode())


def write_parquet_atomic(table, target: str | Path) -> Path:
    """Write a polars DataFrame to parquet atomically."""
    with atomic_path(target) as tmp:
        table.write_parquet(tmp)
    return Path(target)
