"""The cache keys' file-hash memo (``tasks.filehashes``): kept across processes, never stale, bounded."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.cache import hash_file, stage_key
from tasks.filehashes import TABLE, FileHashes

REPO = Path(__file__).resolve().parents[1]
PAST = 1_600_000_000  # an mtime long gone (2020)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes, mtime: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.exists() else "wb") as fh:  # in place: same inode, as an editor may
        fh.write(data)
        fh.truncate()
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _files(folder: Path, n: int, prefix: str = "f") -> list[Path]:
    return [_write(folder / f"{prefix}{i:04d}.bin", f"{prefix} {i}".encode(), PAST) for i in range(n)]


@pytest.fixture
def reads(monkeypatch):
    """How many files the memo actually read (each call to ``file_sha256``)."""
    import tasks.filehashes

    count = []
    real = tasks.filehashes.file_sha256
    monkeypatch.setattr(tasks.filehashes, "file_sha256", lambda p: count.append(p) or real(p))
    return count


def _settled() -> None:
    """Let a coarse filesystem clock tick past the files' ctime (they cannot be backdated)."""
    time.sleep(0.1)


def test_a_same_size_rewrite_with_its_mtime_put_back_changes_the_hash(tmp_path):
    """A file edited in place right after being hashed, same size, mtime restored: the new bytes count."""
    f = _write(tmp_path / "dep.txt", b"aaaa", PAST)
    assert hash_file(f) == _sha(b"aaaa")
    _write(f, b"bbbb", PAST)
    assert hash_file(f) == _sha(b"bbbb")


def test_a_stage_key_sees_a_changed_byte_in_a_folder_dependency(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    deps:\n      - d\n      - a.txt\n")
    _write(tmp_path / "a.txt", b"same", PAST)
    f = _write(tmp_path / "d" / "x.bin", b"0123", PAST)
    before = stage_key(tmp_path, "s", {})
    assert stage_key(tmp_path, "s", {}) == before
    _write(f, b"0124", PAST)
    assert stage_key(tmp_path, "s", {}) != before


@pytest.mark.parametrize("process", ["same", "next"])
def test_a_settled_hash_is_not_reused_once_the_file_changed(tmp_path, process):
    """Kept entry, then a same-size rewrite with mtime and inode unchanged: ctime tells it apart."""
    db = tmp_path / "memo.sqlite"
    f = _write(tmp_path / "dep.bin", b"old!", PAST)
    _settled()
    memo = FileHashes(db, settle_s=0.05)
    assert memo.sha256(f) == _sha(b"old!")
    ino = f.stat().st_ino
    _write(f, b"new!", PAST)
    assert f.stat().st_ino == ino and f.stat().st_mtime_ns == PAST * 10**9
    later = memo if process == "same" else FileHashes(db, settle_s=0.05)
    assert later.sha256(f) == _sha(b"new!")


def test_a_file_changed_just_before_the_hash_is_not_kept(tmp_path, reads):
    """Within ``settle_s`` of its last change a file could change again unseen: hashed, never kept."""
    db = tmp_path / "memo.sqlite"
    f = _write(tmp_path / "fresh.bin", b"fresh", PAST)  # mtime in the past, ctime now
    assert FileHashes(db).sha256(f) == _sha(b"fresh")
    assert FileHashes(db).sha256(f) == _sha(b"fresh")
    assert len(reads) == 2


def test_hashes_are_kept_across_processes(tmp_path, reads):
    db = tmp_path / "memo.sqlite"
    files = _files(tmp_path / "dep", 30)
    _settled()
    code = (
        "import sys; from tasks.filehashes import FileHashes;FileHashes(sys.argv[1], settle_s=0.05).many(sys.argv[2:])"
    )
    subprocess.run([sys.executable, "-c", code, str(db), *map(str, files)], check=True, cwd=REPO, timeout=300)
    memo = FileHashes(db, settle_s=0.05)
    assert memo.many(files) == [_sha(f.read_bytes()) for f in files]
    assert reads == []  # every hash came from the other process's entries


def test_writers_in_threads_and_processes_at_once(tmp_path):
    """Three processes and four threads fill one memo together: no error, every hash right and kept."""
    db = tmp_path / "memo.sqlite"
    shared = _files(tmp_path / "shared", 40)
    own = {w: _files(tmp_path / w, 60) for w in ("p0", "p1", "p2", "t0", "t1", "t2", "t3")}
    _settled()
    code = (
        "import sys; from tasks.filehashes import FileHashes; m = FileHashes(sys.argv[1], settle_s=0.05)\n"
        "for i in range(0, len(sys.argv) - 2, 7): m.many(sys.argv[2 + i : 9 + i])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(db), *map(str, shared + own[w])], cwd=REPO)
        for w in ("p0", "p1", "p2")
    ]
    memo = FileHashes(db, settle_s=0.05)
    results: dict[str, list[str]] = {}

    def thread(w: str) -> None:
        paths = shared + own[w]
        results[w] = [v for i in range(0, len(paths), 7) for v in memo.many(paths[i : i + 7])]

    threads = [threading.Thread(target=thread, args=(w,)) for w in ("t0", "t1", "t2", "t3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    for w, values in results.items():
        assert values == [_sha(f.read_bytes()) for f in shared + own[w]]
    everything = shared + [f for files in own.values() for f in files]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (len(everything),)


def test_the_memo_keeps_at_most_max_entries_the_most_recent_first(tmp_path, reads):
    db = tmp_path / "memo.sqlite"
    old, new = _files(tmp_path / "old", 20), _files(tmp_path / "new", 8)
    _settled()
    FileHashes(db, settle_s=0.05, max_entries=10).many(old)
    FileHashes(db, settle_s=0.05, max_entries=10).many(new)
    with sqlite3.connect(db) as conn:
        assert conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0] <= 10
    reads.clear()
    FileHashes(db, settle_s=0.05, max_entries=10).many(new)
    assert reads == []  # the newest entries stayed


def test_a_damaged_memo_file_is_replaced(tmp_path):
    db = tmp_path / "memo.sqlite"
    db.write_bytes(b"this is not a database, just bytes " * 200)
    f = _write(tmp_path / "dep.bin", b"content", PAST)
    _settled()
    assert FileHashes(db, settle_s=0.05).sha256(f) == _sha(b"content")
    with sqlite3.connect(db) as conn:
        assert conn.execute(f"SELECT sha256 FROM {TABLE}").fetchall() == [(_sha(b"content"),)]
