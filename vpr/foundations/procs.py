"""The one worker-pool helper (ingest, sharding, the synthetic city) and its worker-process hygiene."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor


def exit_with_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Pool initializer: end this worker as soon as the process that started it is gone.

    A ``kill -9`` of ``vpr shard`` or ``vpr ingest`` runs no cleanup, and an idle pool worker waits on
    its task queue forever (it holds the queue's write end itself, so it never sees end-of-file):
    without this, every killed run would leave its workers behind.
    """

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start_worker(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    exit_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def fork_is_safe() -> bool:
    """Whether forking this process is safe: no other Python threads (a forked child can inherit a
    lock that some thread held, and deadlock on it) and a platform that can fork."""
    return threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()


def worker_pool(
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    start_method: str = "spawn",
) -> ProcessPoolExecutor | None:
    """A process pool of ``workers`` whose workers end with this process; None for one worker (run inline).

    ``spawn`` by default: callers (Prefect's thread runner, a progress bar, polars' and torch's own
    thread pools) may hold locks that a forked child would inherit. ``fork`` only where the caller
    checked ``fork_is_safe()`` and wants workers to inherit large state instead of receiving a copy.
    """
    if workers <= 1:
        return None
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(start_method),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )


def imap_bounded(pool: Executor, fn: Callable, items: Iterable, in_flight: int) -> Iterator:
    """``pool.map(fn, items)``, in order, with at most ``in_flight`` tasks submitted and not yet read.

    ``Executor.map`` submits every item up front and keeps each result until it is read, so its memory
    grows with the number of items; this pulls the next item from ``items`` (a generator, say) only
    as a result is read, so a stream of any length runs in bounded memory.
    """
    pending: deque = deque()
    for item in items:
        if len(pending) >= max(1, in_flight):
            yield pending.popleft().result()
        pending.append(pool.submit(fn, item))
    while pending:
        yield pending.popleft().result()
