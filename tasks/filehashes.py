"""File content hashes that outlive the process: what lets a cached re-run skip reading every dependency.

The cache keys (``tasks.cache``) hash every file a stage depends on. ``FileHashes`` remembers each
file's SHA-256 in memory and in a small SQLite file (by default ``$PREFECT_HOME/vpr-file-hashes.sqlite``,
beside the cache records the keys are compared with), keyed as DVC's own state db keys its entries, by
the file's path, inode, size and mtime, plus its device and ctime: a later process reuses the hash while the file's
metadata is unchanged.

Never a stale hash:

* an entry is kept (in memory or on disk) only when the file was already *settled* when hashing began:
  its mtime and ctime at least ``settle_s`` (2 s) in the past. A file rewritten right after being
  hashed, within one tick of the filesystem's clock, could otherwise keep its size and timestamps (the
  "racy git" problem); a rewrite after the hash began moves the ctime past the one recorded.
* ctime cannot be set from user space (``os.utime`` sets mtime and atime, and moves ctime to now), so a
  same-size rewrite whose mtime is put back still misses.

What is left: a filesystem that does not keep ctime (some FUSE or network mounts), or a clock stepped
back by more than ``settle_s`` between the hash and the rewrite, could hand back the old hash. ``rm`` the
SQLite file to start afresh; it is only ever a memo (any SQLite error: the hash is computed, not kept).

Concurrency: one connection per process (re-opened after a fork), its use serialised by a lock;
processes share the file through SQLite's own locking (WAL journal, busy timeout), each batch of new
entries one transaction. Size: at most ``max_entries`` rows; the least recently used go first.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from vpr.foundations.digest import file_sha256

log = logging.getLogger(__name__)

TABLE = "file_sha256_v1"  # a new name if what a row means ever changes: old rows are then never read
DB_NAME = "vpr-file-hashes.sqlite"
_CHUNK = 500  # paths per SELECT (SQLite's bound-parameter limit is 32766 since 3.32; stay well under)
_DAY_NS = 86_400 * 10**9

Meta = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


def file_meta(st: os.stat_result) -> Meta:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileHashes:
    """SHA-256 of files by content, remembered per (path, inode, size, mtime, ctime) across processes.

    ``db``: the SQLite file (None: memory only, this process). ``settle_s``: how old a file's last
    change must be for its hash to be kept. ``max_entries``: the most rows the file holds.
    """

    def __init__(self, db: str | Path | None, *, settle_s: float = 2.0, max_entries: int = 200_000) -> None:
        self.db = Path(db) if db is not None else None
        self.settle_ns = int(settle_s * 1e9)
        self.max_entries = max_entries
        self._memo: dict[tuple[str, Meta], str] = {}
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._inherited: sqlite3.Connection | None = None
        self._disabled = db is None

    # ------------------------------------------------------------------ public

    def sha256(self, path: str | Path) -> str:
        """SHA-256 of one file's bytes."""
        return self.many([Path(path)])[0]

    def many(self, paths: Iterable[str | Path]) -> list[str]:
        """SHA-256 of each file, in order: remembered ones from memory or the SQLite file (one query per
        500), the others read, and those that were settled kept (one transaction)."""
        now = time.time_ns()  # before any stat: a change after this moment gives a file a later ctime
        names = [os.path.abspath(p) for p in paths]
        keys = [(name, file_meta(os.stat(name))) for name in names]
        with self._lock:
            found = {k: self._memo[k] for k in keys if k in self._memo}
        missing = [k for k in keys if k not in found]
        if missing:
            found.update(self._load(missing, now))
        fresh: list[tuple[str, Meta, str]] = []
        for key in keys:
            if key in found:
                continue
            path, meta = key
            found[key] = value = file_sha256(path)
            if max(meta[3], meta[4]) + self.settle_ns <= now:  # settled: kept
                fresh.append((path, meta, value))
        if fresh:
            with self._lock:
                self._remember({(path, meta): value for path, meta, value in fresh})
            self._store(fresh, now)
        return [found[k] for k in keys]

    # ------------------------------------------------------------------ SQLite

    def _connection(self) -> sqlite3.Connection | None:
        """This process's connection (caller holds the lock); None once the file proved unusable."""
        if self._disabled:
            return None
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._inherited = self._conn  # a forked child never uses (nor closes) its parent's connection
        self._conn = None
        for attempt in (1, 2):
            try:
                self._conn = self._open()
                self._pid = os.getpid()
                return self._conn
            except sqlite3.DatabaseError as exc:  # not a database (a torn or foreign file): start afresh once
                if attempt == 2 or isinstance(exc, sqlite3.OperationalError):
                    return self._give_up(exc)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.db}{suffix}").unlink(missing_ok=True)
            except (OSError, sqlite3.Error) as exc:
                return self._give_up(exc)
        return None

    def _open(self) -> sqlite3.Connection:
        assert self.db is not None
        self.db.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            conn.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last entries, never corrupt
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER,"
                " mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT, used_ns INTEGER)"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_used ON {TABLE} (used_ns)")
        except BaseException:
            conn.close()
            raise
        return conn

    def _give_up(self, exc: BaseException) -> None:
        log.warning("file-hash memo %s unusable (%s): hashing without it", self.db, exc)
        self._disabled = True
        self._conn = None
        return None

    def _load(self, keys: list[tuple[str, Meta]], now: int) -> dict[tuple[str, Meta], str]:
        """The persisted hashes of ``keys`` whose metadata still matches; marks them used (at most daily)."""
        wanted = dict(keys)
        found: dict[tuple[str, Meta], str] = {}
        stale_use: list[str] = []
        with self._lock:
            conn = self._connection()
            if conn is None:
                return found
            try:
                names = list(wanted)
                for i in range(0, len(names), _CHUNK):
                    chunk = names[i : i + _CHUNK]
                    rows = conn.execute(
                        f"SELECT path, dev, ino, size, mtime_ns, ctime_ns, sha256, used_ns FROM {TABLE}"
                        f" WHERE path IN ({','.join('?' * len(chunk))})",
                        chunk,
                    ).fetchall()
                    for path, dev, ino, size, mtime_ns, ctime_ns, value, used_ns in rows:
                        meta = (dev, ino, size, mtime_ns, ctime_ns)
                        if wanted[path] == meta:
                            found[(path, meta)] = value
                            if used_ns < now - _DAY_NS:
                                stale_use.append(path)
                if stale_use:
                    with conn:
                        conn.execute("BEGIN IMMEDIATE")
                        touched = [(now, p) for p in stale_use]
                        conn.executemany(f"UPDATE {TABLE} SET used_ns = ? WHERE path = ?", touched)
            except sqlite3.Error as exc:
                self._give_up(exc)
            self._remember(found)
        return found

    def _remember(self, entries: dict[tuple[str, Meta], str]) -> None:
        """Into this process's memory (caller holds the lock), which never outgrows ``max_entries``."""
        if len(self._memo) + len(entries) > self.max_entries:
            self._memo.clear()
        self._memo.update(entries)

    def _store(self, fresh: list[tuple[str, Meta, str]], now: int) -> None:
        """Keep the new hashes (one transaction), then trim the file to ``max_entries`` rows."""
        rows = [(path, *meta, value, now) for path, meta, value in fresh]
        with self._lock:
            conn = self._connection()
            if conn is None:
                return
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    (count,) = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
                    if count > self.max_entries:  # down to 90 %: not one eviction per new file
                        excess = count - int(self.max_entries * 0.9)
                        conn.execute(
                            f"DELETE FROM {TABLE} WHERE path IN (SELECT path FROM {TABLE} ORDER BY used_ns LIMIT ?)",
                            (excess,),
                        )
            except sqlite3.Error as exc:
                self._give_up(exc)


_DEFAULT: dict[Path, FileHashes] = {}
_DEFAULT_LOCK = threading.Lock()


def file_hashes() -> FileHashes:
    """The memo the cache keys use: ``$PREFECT_HOME/vpr-file-hashes.sqlite`` (one per Prefect home)."""
    from prefect.settings import get_current_settings

    db = Path(get_current_settings().home).expanduser() / DB_NAME
    with _DEFAULT_LOCK:
        if db not in _DEFAULT:
            _DEFAULT[db] = FileHashes(db)
        return _DEFAULT[db]
