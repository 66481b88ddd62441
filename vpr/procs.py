"""Worker-process hygiene for the process pools of ingest and sharding."""

from __future__ import annotations

import os
import threading
import time


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
