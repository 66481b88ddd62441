"""The release a long-running service answers from, swapped for a newer one without a restart.

A watcher thread reads the release's ``CURRENT`` pointer every ``poll_s``; when it names another
release (told apart by the SHA-256 of its manifest, not its name: a name could be reused after a
removal), that version is loaded *beside* the served one and then swapped in with one reference
assignment. A request takes the reference once, at its start, and uses that object to the end: it
finishes on the release it started with, and never sees a mix of two (model of one, index of the
other). The old release is dropped when its last request ends (nothing else refers to it), so
memory stays at one release plus, during a swap, the next one. Only the watcher loads: requests
never trigger a load, so many requests at the moment of a switch cause no reload storm.

A version whose files fail their check (``ReleaseError``: damaged, replaced) is refused for good and
said once; any other failure (pruned meanwhile, out of memory) is said once and retried at the next
poll. Either way the served release keeps answering. At start the service serves the newest kept
version that loads, when the live one does not.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from vpr.shared.descriptors import resolve_device
from vpr.shared.release import Release, load_release, load_version
from vpr.shared.shardio import ShardError, ShardReader
from vpr.shared.versions import ReleaseError, current_version, read_manifest, versions

logger = logging.getLogger(__name__)
MAP_POINTS = 20_000  # database positions sent to the page's map, at most (an even subsample)
GEO_POINTS = 256  # (east, north, lat, lon) pairs the page fits its map ↔ GPS transform to (the GPS prior)


@dataclass(frozen=True)
class Served:
    """Everything one answer needs, from one release version."""

    release: Release
    reader: ShardReader | None  # database thumbnails by id; None when the shards are not here

    @property
    def version(self) -> str:
        return self.release.version

    def positions(self) -> dict:
        """UTM positions of the indexed images (subsampled) and their bounds, for the page's map, and
        ``geo``: (east, north, lat, lon) of some of them, so the page draws a GPS prior (lat/lon, as the
        search filters it) where those images lie on its UTM map."""
        ids = self.release.ids
        step = max(1, ids.height // MAP_POINTS)
        east, north = ids["utm_east"].to_numpy(), ids["utm_north"].to_numpy()
        geo = ids.filter(pl.col("lat").is_not_nan() & pl.col("lon").is_not_nan())  # NaN: no GPS in the name
        geo = geo.select("utm_east", "utm_north", "lat", "lon").gather_every(max(1, geo.height // GEO_POINTS))
        return {
            "version": self.version,
            "count": ids.height,
            "bounds": [float(east.min()), float(north.min()), float(east.max()), float(north.max())],
            "points": np.round(np.stack([east[::step], north[::step]], axis=1), 1).tolist(),
            "geo": np.round(geo.to_numpy(), 7).tolist(),
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


def _identity(version: Path) -> tuple[str, str | None]:
    """(name, manifest SHA-256); the hash is None while the manifest cannot be read."""
    try:
        return version.name, read_manifest(version)[1]
    except (OSError, ReleaseError):
        return version.name, None


class LiveRelease:
    """The served release of ``release_dir``; ``current()`` is what a request uses from start to end."""

    def __init__(
        self, release_dir: Path, *, device: torch.device | str = "cpu", shards_dir: Path | None = None
    ) -> None:
        self.release_dir, self.shards_dir = Path(release_dir), shards_dir
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.refused: dict[tuple[str, str | None], str] = {}  # versions whose files failed: never retried
        self._said: set[tuple] = set()  # problems already logged (each once, not every poll)
        self._served = Served(self._newest_good(), _shard_reader(shards_dir))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0

    def _newest_good(self) -> Release:
        """The live version, or when its files fail their check the newest older kept version that loads."""
        try:
            return load_release(self.release_dir, self.device)
        except ReleaseError as exc:
            live = current_version(self.release_dir)
            if live is None:
                raise
            self.refused[_identity(live)] = str(exc)
            for name in reversed(versions(self.release_dir)):
                if name >= live.name:  # a newer folder was never switched in (a writer died): not published
                    continue
                try:
                    release = load_version(self.release_dir / name, self.device)
                except (OSError, ReleaseError):
                    continue
                logger.warning("release %s refused (%s): serving %s, the newest that loads", live.name, exc, name)
                return release
            raise

    def _say(self, key: tuple, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning(message, *args)

    def current(self) -> Served:
        return self._served  # one reference read: atomic under the GIL

    def refresh(self) -> bool:
        """Load and swap in the pointer's release if it is another one; whether a swap happened."""
        served = self._served.version
        try:
            live = current_version(self.release_dir)
        except Exception as exc:  # noqa: BLE001 - a garbled pointer: keep serving, say why (once)
            self._say(("pointer", str(exc)), "release pointer unreadable (%s): still serving %s", exc, served)
            return False
        if live is None:
            return False
        identity = _identity(live)
        if identity[1] == self._served.release.digest or identity in self.refused:
            return False
        try:
            release = load_version(live, self.device)
        except ReleaseError as exc:  # its files fail their check: it stays refused, said once
            self.refused[identity] = str(exc)
            logger.warning("release %s refused (%s): still serving %s", live.name, exc, served)
            return False
        except Exception as exc:  # noqa: BLE001 - retried at the next poll; the served one keeps answering
            self._say(
                ("load", identity, str(exc)), "release %s not loaded (%s): still serving %s", live.name, exc, served
            )
            return False
        self._served = Served(release, _shard_reader(self.shards_dir))
        self.swaps += 1
        logger.info("release %s → %s", served, release.version)
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
