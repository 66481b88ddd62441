"""The release a long-running service answers from, swapped for a newer one without a restart.

A watcher thread reads the release's ``CURRENT`` pointer every ``poll_s``; when it names another
version, that version is loaded *beside* the served one and then swapped in with one reference
assignment. A request takes the reference once, at its start, and uses that object to the end: it
finishes on the release it started with, and never sees a mix of two (model of one, index of the
other). The old release is dropped when its last request ends (nothing else refers to it), so
memory stays at one release plus, during a swap, the next one. Only the watcher loads: requests
never trigger a load, so many requests at the moment of a switch cause no reload storm. A version
that fails to load (pruned meanwhile, damaged) is logged and retried at the next poll; the served
release keeps answering.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from vpr.shared.release import Release, load_release
from vpr.shared.shardio import ShardError, ShardReader
from vpr.shared.versions import current_version

logger = logging.getLogger(__name__)
MAP_POINTS = 20_000  # database positions sent to the page's map, at most (an even subsample)


@dataclass(frozen=True)
class Served:
    """Everything one answer needs, from one release version."""

    release: Release
    reader: ShardReader | None  # database thumbnails by id; None when the shards are not here

    @property
    def version(self) -> str:
        return self.release.version

    def positions(self) -> dict:
        """UTM positions of the indexed images (subsampled) and their bounds, for the page's map."""
        ids = self.release.ids
        step = max(1, ids.height // MAP_POINTS)
        east, north = ids["utm_east"].to_numpy(), ids["utm_north"].to_numpy()
        return {
            "version": self.version,
            "count": ids.height,
            "bounds": [float(east.min()), float(north.min()), float(east.max()), float(north.max())],
            "points": np.round(np.stack([east[::step], north[::step]], axis=1), 1).tolist(),
        }

    def thumbnail(self, image_id: int) -> bytes | None:
        """The database image's JPEG bytes as stored in the shards, or None if it is not in this release."""
        if self.reader is None or self.release.ids.filter(pl.col("id") == image_id).is_empty():
            return None
        try:
            return self.reader.read_jpeg(image_id)
        except (KeyError, ShardError):
            return None


def _shard_reader(shards_dir: Path | None) -> ShardReader | None:
    if shards_dir is None:
        return None
    try:
        return ShardReader(shards_dir)
    except (OSError, ValueError, ShardError) as exc:
        logger.warning("shards at %s unreadable (%s): no thumbnails", shards_dir, exc)
        return None


class LiveRelease:
    """The served release of ``release_dir``; ``current()`` is what a request uses from start to end."""

    def __init__(
        self, release_dir: Path, *, device: torch.device | str = "cpu", shards_dir: Path | None = None
    ) -> None:
        self.release_dir, self.device, self.shards_dir = Path(release_dir), device, shards_dir
        self._served = Served(load_release(self.release_dir, device), _shard_reader(shards_dir))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0

    def current(self) -> Served:
        return self._served  # one reference read: atomic under the GIL

    def refresh(self) -> bool:
        """Load and swap in the pointer's version if it is another one; whether a swap happened."""
        try:
            live = current_version(self.release_dir)
        except Exception as exc:  # noqa: BLE001 - a garbled pointer: keep serving, say why
            logger.warning("release pointer unreadable (%s): still serving %s", exc, self._served.version)
            return False
        if live is None or live.name == self._served.version:
            return False
        try:
            fresh = Served(load_release(self.release_dir, self.device), _shard_reader(self.shards_dir))
        except Exception as exc:  # noqa: BLE001 - retried at the next poll; the served one keeps answering
            logger.warning("release %s not loaded (%s): still serving %s", live.name, exc, self._served.version)
            return False
        old, self._served = self._served.version, fresh
        self.swaps += 1
        logger.info("release %s → %s", old, fresh.version)
        return True

    def start(self, poll_s: float) -> None:
        """Watch the pointer in a daemon thread every ``poll_s`` seconds."""

        def watch() -> None:
            while not self._stop.wait(poll_s):
                self.refresh()

        self._thread = threading.Thread(target=watch, name="release-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
