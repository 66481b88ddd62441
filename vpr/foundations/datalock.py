"""The project's data lock: a full pipeline run and a re-index never interleave.

``train-all`` holds it for its whole flow (it blocks until a running re-index is done); a re-index takes
it without waiting and, when a pipeline run holds it, leaves the inbox for the next run. So the final
DVC record of a pipeline run never claims outputs match a catalog they were not computed from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from vpr.foundations.atomic import write_text_atomic

LOCK_FILE = ".data.lock"
HOLDER_FILE = ".data.lock.holder"  # who holds it, for the message of whoever is turned away


class DataBusy(Exception):
    """Another writer (named in the message) holds the project's data lock."""


@contextmanager
def data_lock(artifacts: str | Path, holder: str, *, wait: bool = True) -> Iterator[None]:
    """Hold the data lock of the project whose artifacts are in ``artifacts``.

    ``wait=False`` raises ``DataBusy`` at once when it is held (naming the holder) instead of blocking.
    """
    folder = Path(artifacts)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_FILE, timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        who = current_holder(folder) or "another run"
        raise DataBusy(f"{who} holds the data lock ({folder / LOCK_FILE})") from None
    try:
        write_text_atomic(folder / HOLDER_FILE, f"{holder} (pid {os.getpid()})\n")
        yield
    finally:
        (folder / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def current_holder(artifacts: str | Path) -> str | None:
    """Who holds the data lock now, as it said when it took it (None when nobody does)."""
    try:
        return (Path(artifacts) / HOLDER_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None
