"""Release versions on disk: immutable folders, an atomic ``CURRENT`` pointer, and segments shared by link.

A version folder holds a manifest (``release.json``) whose ``segments`` list what it indexes: one
*base* segment (``index.faiss`` + ``ids.parquet``, the full build) and any number of *delta* segments
(``delta-NNNNNN.npy`` raw vectors + ``delta-NNNNNN.parquet`` their ids), one per re-index batch. A new
version hard-links the segments of its parent (O(1) per file, whatever their size) and writes only
its own delta, so appending 10⁴ images costs the same beside 10⁵ or 10⁶ indexed ones; the files of a
pruned version live on as long as a kept version links them. Without hard links (another file
system) segments are copied, which is correct but proportional to the release.

Writers build a version in a hidden temporary folder, rename it into place, then switch ``CURRENT``
(see ``commit_version``); readers take no lock. Version numbers only grow: the last one handed out is
kept beside the writer lock, so a removed version's name is never published again.

Trust: the manifest records the size and SHA-256 of every file it names (each segment's ``files``,
the ``model``) and a random ``release_id``. Readers check sizes, then hashes, once per open
(``check_segments``, ``check_model``); a writer checks what it links into a new version before
linking it (the base segment by size alone, so that an append costs the batch, not the release), and
a new version carries its parent's records, never ones recomputed from linked files. A version
written before records existed loads unchecked (``recorded``), with a note to re-run ``vpr index``. A version's
identity is the SHA-256 of its manifest (``read_manifest``), not its name. The model is the
release's own copy (``copy_private``: a reflink where the file system has them), never a link to
the training checkpoint, which training overwrites.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
from filelock import FileLock

from vpr.foundations.atomic import fsync_dir, write_bytes_atomic, write_text_atomic
from vpr.foundations.digest import file_record

CURRENT = "CURRENT"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MODEL_FILE = "model.pt"
MANIFEST_FILE = "release.json"
VERSION_NAME = re.compile(r"^v(\d{6})$")
MAX_DELTAS = 32  # more delta segments than this are merged into one at the next append (cost: the deltas)
REBUILD = "rebuild the release with `vpr index`"
_FICLONE = 0x40049409  # Linux ioctl: share the source's blocks copy-on-write (btrfs, XFS)


class ReleaseError(Exception):
    """No release, or a release whose files disagree with each other."""


def versions(release_dir: Path) -> list[str]:
    if not release_dir.is_dir():
        return []
    return sorted(p.name for p in release_dir.iterdir() if p.is_dir() and VERSION_NAME.match(p.name))


def current_version(release_dir: str | Path) -> Path | None:
    """The live version folder, or None when no release was ever switched in."""
    release_dir = Path(release_dir)
    pointer = release_dir / CURRENT
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not VERSION_NAME.match(name):
        raise ReleaseError(f"{pointer} names {name!r}, not a version folder")
    return release_dir / name


@contextmanager
def release_lock(release_dir: str | Path) -> Iterator[None]:
    """Exclusive writer lock for one release folder (blocks until the other writer is done)."""
    release_dir = Path(release_dir)
    release_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(release_dir.parent / f".{release_dir.name}.lock"):
        yield


def commit_version(release_dir: Path, build: Callable[[Path, int], None]) -> Path:
    """Build a version in a temp folder via ``build(tmp_folder, version_number)``, rename, switch, prune.

    A crash at any point leaves the previous ``CURRENT`` and its complete version serving; a
    half-written folder is never named by ``CURRENT`` and is removed by the next writer. After the
    switch only the live and the previous version are kept. Must be called with the release lock held.
    """
    release_dir.mkdir(parents=True, exist_ok=True)
    previous = current_version(release_dir)
    prune(release_dir, live_pair(release_dir, previous))  # what a killed writer left: before building more
    number = next_number(release_dir)
    name = f"v{number:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=release_dir))
    try:
        build(tmp, number)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        os.rename(tmp, release_dir / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(release_dir)
    write_text_atomic(release_dir / CURRENT, name + "\n")
    prune(release_dir, {name} | ({previous.name} if previous is not None else set()))
    return release_dir / name


def counter_file(release_dir: Path) -> Path:
    """The last version number handed out, beside the writer lock (outlives the release folder itself)."""
    return release_dir.parent / f".{release_dir.name}.last-version"


def next_number(release_dir: Path) -> int:
    """One past every number this release has used (the counter, the folders, ``CURRENT``), recorded
    atomically before the version is built: a name once published is never reused, whatever was removed.
    Must be called with the release lock held."""
    used = [int(v[1:]) for v in versions(release_dir)]
    for path in (counter_file(release_dir), release_dir / CURRENT):
        try:
            text = path.read_text().strip().lstrip("v")
        except FileNotFoundError:
            continue
        if text.isdigit():
            used.append(int(text))
    number = max(used, default=0) + 1
    write_bytes_atomic(counter_file(release_dir), f"{number}\n".encode())  # not the switch (fault tests pause there)
    return number


def live_pair(release_dir: Path, live: Path | None) -> set[str]:
    """The live version and the one before it (kept for readers still opening it); empty without one."""
    if live is None:
        return set()
    older = [v for v in versions(release_dir) if v < live.name]
    return {live.name, *older[-1:]}


def prune(release_dir: Path, keep: set[str]) -> None:
    """Drop every version but ``keep``, and temp folders of crashed writers (linked segments survive)."""
    for p in release_dir.iterdir():
        if p.is_dir() and ((VERSION_NAME.match(p.name) and p.name not in keep) or p.name.startswith(".tmp-")):
            shutil.rmtree(p, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Share an immutable file between versions (a hard link), or copy it where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_private(src: Path, dst: Path) -> None:
    """A copy that later writes to ``src`` cannot change: a reflink where possible, else the bytes."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass
        shutil.copyfileobj(fin, fout, 2**20)


# --------------------------------------------------------------------------- integrity


def read_manifest(version: Path) -> tuple[dict, str]:
    """A version's manifest and its identity (the SHA-256 of its bytes); ``FileNotFoundError`` if gone."""
    path = version / MANIFEST_FILE
    data = path.read_bytes()
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ReleaseError(f"{path}: not a readable manifest ({exc}); {REBUILD}") from None
    if not isinstance(manifest, dict):
        raise ReleaseError(f"{path}: not a readable manifest (no JSON object); {REBUILD}")
    return manifest, hashlib.sha256(data).hexdigest()


def seal(folder: Path, manifest: dict) -> dict:
    """The manifest with a new ``release_id`` and a record for every file it names that has none yet
    (computed from ``folder``: the files this writer wrote; linked files keep their parent's records)."""
    segs = [
        seg if "files" in seg else {**seg, "files": {name: file_record(folder / name) for name in segment_files(seg)}}
        for seg in segments(manifest)
    ]
    model = manifest.get("model") or {"file": MODEL_FILE, **file_record(folder / MODEL_FILE)}
    return {**manifest, "segments": segs, "model": model, "release_id": uuid.uuid4().hex}


def recorded(manifest: dict) -> bool:
    """Whether the manifest records its files (versions written before records existed do not)."""
    return "model" in manifest


def check_file(path: Path, record: dict | None, *, deep: bool = True) -> None:
    """``ReleaseError`` naming ``path`` unless its size (and with ``deep`` its SHA-256) is the record's;
    ``FileNotFoundError`` when it is gone (a pruned version: readers retry at the live one)."""
    if record is None:
        raise ReleaseError(f"{path}: its manifest has no size or hash for it; {REBUILD}")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ReleaseError(f"{path}: {size} bytes, its manifest records {record['bytes']}: damaged; {REBUILD}")
    if deep and file_record(path)["sha256"] != record["sha256"]:
        raise ReleaseError(f"{path}: its SHA-256 is not the one its manifest records: damaged or replaced; {REBUILD}")


def check_segments(version: Path, manifest: dict, *, base: bool = True) -> None:
    """Every segment file against its record: all sizes first (a truncated file is named before any is
    read), then the hashes; ``base=False`` checks the base segment's size alone (what an append
    links: hashing it would make an append cost the release, not the batch)."""
    if not recorded(manifest):
        return
    files = [
        (seg["kind"], name, seg.get("files", {}).get(name)) for seg in segments(manifest) for name in segment_files(seg)
    ]
    for _, name, record in files:
        check_file(version / name, record, deep=False)
    for kind, name, record in files:
        if base or kind != "base":
            check_file(version / name, record)


def check_model(version: Path, manifest: dict) -> None:
    """The version's model against its record (when the manifest has records)."""
    if recorded(manifest):
        check_file(version / manifest["model"]["file"], manifest["model"])


# --------------------------------------------------------------------------- segments


def base_segment(count: int, ids: np.ndarray) -> dict:
    return {"kind": "base", "index": INDEX_FILE, "ids": IDS_FILE, **_span(count, ids)}


def delta_segment(number: int, ids: np.ndarray) -> dict:
    stem = f"delta-{number:06d}"
    return {"kind": "delta", "vectors": f"{stem}.npy", "ids": f"{stem}.parquet", **_span(len(ids), ids)}


def _span(count: int, ids: np.ndarray) -> dict:
    return {
        "count": int(count),
        "min_id": int(ids.min()) if len(ids) else None,
        "max_id": int(ids.max()) if len(ids) else None,
    }


def segments(manifest: dict) -> list[dict]:
    """The manifest's segments (a version written before segments existed: its one base)."""
    return manifest.get("segments") or [{"kind": "base", "index": INDEX_FILE, "ids": IDS_FILE, "min_id": None}]


def segment_files(segment: dict) -> list[str]:
    return [segment[k] for k in ("index", "vectors", "ids") if k in segment]


def held(version: Path, manifest: dict, ids: Sequence[int]) -> np.ndarray:
    """Which of ``ids`` the version indexes, reading only the id columns of segments whose id range
    overlaps them (new ids lie past every segment: nothing is read)."""
    ids = np.asarray(ids, dtype=np.int64)
    found = np.zeros(len(ids), dtype=bool)
    if not len(ids):
        return found
    lo, hi = int(ids.min()), int(ids.max())
    for seg in segments(manifest):
        if seg.get("min_id") is not None and (seg["max_id"] < lo or seg["min_id"] > hi):
            continue
        found |= np.isin(ids, pl.read_parquet(version / seg["ids"], columns=["id"])["id"].to_numpy())
    return found
