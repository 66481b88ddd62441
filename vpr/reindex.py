"""Re-indexing: new imagery dropped into the inbox joins the shards, the catalog and the live release.

Pure logic (no Prefect): the scheduled ``reindex`` flow and ``vpr reindex`` both call ``run_reindex``.

What a run does, for files directly or indirectly under ``inbox/`` (hidden files and ``inbox/quarantine``
are skipped — copy a file in under a hidden name, then rename it, so a half-copied file is never read):

1. **Validate** each file exactly like ingest (``vpr.catalog``: readable, not empty, an image, fully
   decodable, at most ``ingest.max_pixels``). Its position comes from a datasets_vg file name or, for an
   ordinary photo, from EXIF GPS (lat/lon → UTM), in which case the file gets the datasets_vg name built
   from that position (``@E@N@zone@letter@lat@lon@@@heading@@@@timestamp@note@.jpg``, note = original
   name). Bad files are **quarantined**, never deleted: moved to ``inbox/quarantine/`` with a
   ``<name>.reason.txt`` beside them. A name already in the data tree or catalog is quarantined too
   ("already indexed"), as is a second file with the same name in one batch, and a UTM zone number
   that differs from the catalog's (distances across zones are meaningless).
2. **Plan** the batch: new image ids continue after the shard index's last id (existing ids never
   change), new sample keys continue per split/role, and new shard files continue the numbering
   (``test-database-000004.tar``...). The plan is written to ``artifacts/reindex/pending.json``
   before anything else.
3. **Write new shards** (existing tar files are never rewritten). Nothing references them yet.
4. **Extract and add** descriptors with each live release's own model to its FAISS index under the new
   ids (``vpr.index.add_to_release``: a new release version switched in atomically; ids already present
   are skipped). This switch is the commit point that ``locate`` sees.
5. **Append** the rows to the shard index, then to the catalog (each an atomic file replace; the
   catalog stays sorted by path with duplicates marked, as ``vpr ingest`` would write it), and
   **move** the files from the inbox to ``data/images/<reindex_split>/database/``.
6. Remove the plan, append the batch to ``artifacts/reindex/history.jsonl``.

Atomicity: a crash before step 4 leaves the previous release, shard index and catalog untouched
(new tar files are unreferenced); a crash anywhere leaves ``pending.json``, and the next run resumes
that exact plan (same ids, same shard names, each step skipped if already done) before looking at
new files. Idempotence: an empty inbox with no pending plan writes nothing. Concurrent runs are
serialised by an exclusive file lock (the flow adds a Prefect concurrency limit on top).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from vpr.atomic import write_parquet_atomic, write_text_atomic
from vpr.catalog import (
    CATALOG_SCHEMA,
    REASON_BAD_NAME,
    REASON_EMPTY,
    REASON_UNREADABLE,
    _decode,
    _mark_duplicates,
    _name_fields,
    printable_path,
    strict_pillow,
)
from vpr.config import Config
from vpr.geo import format_name, latlon_to_utm
from vpr.layout import Layout
from vpr.shards import (INDEX_SCHEMA, _meta_json, checksum, encode_image, read_index, sample_key, shard_name,
                         write_tar)

QUARANTINE = "quarantine"
PENDING = "pending.json"
HISTORY = "history.jsonl"
ROLE = "database"  # new imagery is always database imagery (what locate searches)

REASON_NO_POSITION = "no position"  # full: "no position: not a datasets_vg name (...) and no EXIF GPS"
REASON_ALREADY_INDEXED = "already indexed"
REASON_DUPLICATE_NAME = "duplicate name in batch"
REASON_OTHER_ZONE = "other UTM zone"

_GPS_IFD = 0x8825
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 36867
_DATETIME = 306
_KEY_NUMBER = re.compile(r"_(\d+)$")
_SHARD_NUMBER = re.compile(r"-(\d{6})\.tar$")


class ReindexError(Exception):
    """The re-index cannot proceed (no release to extend, inconsistent state)."""


@dataclass
class ReindexResult:
    """What one run did (also the flow's summary artifact)."""

    batch: str | None = None
    resumed: bool = False
    added: list[dict] = field(default_factory=list)  # id, path (in data/), source ("name"|"exif"), inbox
    rejected: list[dict] = field(default_factory=list)  # inbox, reason, quarantined (path)
    releases: dict[str, str] = field(default_factory=dict)  # head → live version after the run
    note: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.added)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "resumed": self.resumed, "added": self.added, "rejected": self.rejected,
                "releases": self.releases, "note": self.note}


def _reached(step: str) -> None:
    """Called after each step of a batch (``shards-written``, ``release-switched``, ``shard-index-written``,
    ``catalog-written``, ``files-moved``); tests replace it to simulate a crash at that point."""


# --------------------------------------------------------------------------- paths


def work_dir(layout: Layout) -> Path:
    return layout.artifacts / "reindex"


def quarantine_dir(layout: Layout) -> Path:
    return layout.inbox / QUARANTINE


@contextmanager
def reindex_lock(layout: Layout) -> Iterator[None]:
    """Exclusive lock: one re-index at a time on this project, whatever started it."""
    folder = work_dir(layout)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def scan_inbox(inbox: Path) -> list[str]:
    """Files under the inbox (relative posix paths, sorted), skipping hidden ones and the quarantine."""
    if not inbox.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(inbox):
        rel_dir = Path(dirpath).relative_to(inbox)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (rel_dir == Path(".") and d == QUARANTINE))
        found += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(found)


# --------------------------------------------------------------------------- EXIF GPS


def _rational(value) -> float:
    try:
        return float(value)
    except (TypeError, ZeroDivisionError, ValueError):
        num, den = value
        return float(num) / float(den)


def _dms(value, ref: str | None) -> float:
    d, m, s = (_rational(v) for v in value)
    deg = d + m / 60.0 + s / 3600.0
    return -deg if (ref or "").strip().upper() in ("S", "W") else deg


def exif_position(data: bytes) -> dict | None:
    """lat, lon (WGS84), heading and timestamp from a photo's EXIF GPS block; None without a usable fix."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            exif = im.getexif()
            gps = exif.get_ifd(_GPS_IFD)
            sub = exif.get_ifd(_EXIF_IFD)
    except Exception:  # noqa: BLE001 - no EXIF, broken EXIF: no position
        return None
    if not gps or 2 not in gps or 4 not in gps:
        return None
    try:
        lat = _dms(gps[2], gps.get(1))
        lon = _dms(gps[4], gps.get(3))
    except Exception:  # noqa: BLE001 - malformed rationals
        return None
    if not (np.isfinite(lat) and np.isfinite(lon) and -80.0 <= lat <= 84.0 and -180.0 <= lon <= 180.0):
        return None  # outside UTM's latitude band (or garbage)
    heading = None
    if 17 in gps:
        try:
            heading = _rational(gps[17]) % 360.0
        except Exception:  # noqa: BLE001
            heading = None
    stamp = sub.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    timestamp = re.sub(r"[^0-9]", "", str(stamp))[:14] if stamp else ""
    return {"lat": lat, "lon": lon, "heading": heading, "timestamp": timestamp}


def _note(original: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(original).stem)[:64]


def name_from_exif(original: str, pos: dict) -> str:
    """The datasets_vg name of a photo at an EXIF position (note field = the original file stem)."""
    east, north, zone, letter = latlon_to_utm(pos["lat"], pos["lon"])
    ext = Path(original).suffix.lstrip(".").lower() or "jpg"
    return format_name(east, north, utm_zone=zone, utm_letter=letter, lat=pos["lat"], lon=pos["lon"],
                       heading=pos["heading"], timestamp=pos["timestamp"], note=_note(original), ext=ext)


# --------------------------------------------------------------------------- validation


def check_file(inbox: Path, rel: str, split: str, max_pixels: int) -> dict:
    """A catalog row (``reason`` None) for the file's place in the data tree, or a reject ``reason``.

    The same checks as ingest's ``inspect_file``; only the name may come from EXIF GPS instead.
    """
    base = {"inbox": rel, "split": split, "role": ROLE}
    try:
        data = (inbox / rel).read_bytes()
    except OSError:
        return {**base, "reason": REASON_UNREADABLE}
    if not data:
        return {**base, "reason": REASON_EMPTY}
    name, source = Path(rel).name, "name"
    fields = _name_fields(name)
    with strict_pillow(max_pixels):
        facts = _decode(data, max_pixels)
    if isinstance(facts, str):
        return {**base, "reason": facts}
    if isinstance(fields, str):  # not a datasets_vg name: an ordinary photo needs EXIF GPS
        pos = exif_position(data)
        if pos is None:
            why = fields[len(REASON_BAD_NAME) + 2:] if fields.startswith(REASON_BAD_NAME) else fields
            return {**base, "reason": f"{REASON_NO_POSITION}: not a datasets_vg name ({why}) and no EXIF GPS"}
        name, source = name_from_exif(rel, pos), "exif"
        fields = _name_fields(name)
        if isinstance(fields, str):  # pragma: no cover - format_name always parses
            return {**base, "reason": fields}
    path = f"images/{split}/{ROLE}/{name}"
    return {**base, "path": path, "source": source, **fields, **facts,
            "sha256": hashlib.sha256(data).hexdigest(), "reason": None}


def quarantine(inbox: Path, rel: str, reason: str) -> Path:
    """Move a rejected file to ``inbox/quarantine/`` (never overwriting) with a ``.reason.txt`` beside it.

    The file keeps its base name only (it lands directly in the quarantine folder, whatever folders or
    ``..`` parts ``rel`` has), spelled as printable UTF-8 when the original bytes are not.
    """
    qdir = inbox / QUARANTINE
    qdir.mkdir(parents=True, exist_ok=True)
    name = printable_path(Path(rel).name)
    if name in ("", ".", ".."):
        name = "unnamed"
    target = qdir / name
    n = 1
    while target.exists() or target.with_name(target.name + ".reason.txt").exists():
        target = qdir / f"{Path(name).stem}.{n}{Path(name).suffix}"
        n += 1
    write_text_atomic(target.with_name(target.name + ".reason.txt"),
                      f"{reason}\nfrom inbox/{printable_path(rel)} at {_now()}\n")
    _move(inbox / rel, target)
    return target


def _move(src: Path, dst: Path) -> None:
    """Rename (atomic on one file system); across devices copy to a temp name, rename, then delete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)
        src.unlink()


# --------------------------------------------------------------------------- planning


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _catalog(layout: Layout) -> pl.DataFrame:
    if not layout.catalog.exists():
        raise ReindexError(f"catalog not found: {layout.catalog} (run train-all or `vpr ingest` first)")
    return pl.read_parquet(layout.catalog)


def _release_dirs(cfg: Config, layout: Layout) -> list[Path]:
    """Every release with a live version (the configured head's first); at least that one must exist."""
    from vpr.index import current_version

    root = layout.release_dir(cfg.index.head).parent
    dirs = [layout.release_dir(cfg.index.head)]
    if root.is_dir():
        dirs += sorted(p for p in root.iterdir() if p.is_dir() and p not in dirs and not p.name.startswith("."))
    live = [d for d in dirs if current_version(d) is not None]
    if layout.release_dir(cfg.index.head) not in live:
        raise ReindexError(f"no release in {layout.release_dir(cfg.index.head)} to extend "
                           "(run train-all or `vpr index` first); inbox files are left where they are")
    return live


def _next_number(values: list[str], pattern: re.Pattern) -> int:
    numbers = [int(m.group(1)) for v in values if (m := pattern.search(v))]
    return max(numbers) + 1 if numbers else 0


def plan_batch(accepted: list[dict], index: pl.DataFrame, split: str, per_shard: int) -> dict:
    """Ids, sample keys and new shard files for accepted rows (sorted by data path)."""
    accepted = sorted(accepted, key=lambda r: r["path"])
    same = index.filter((pl.col("split") == split) & (pl.col("role") == ROLE))
    next_id = int(index["id"].max()) + 1 if index.height else 0
    next_key = _next_number(same["key"].to_list(), _KEY_NUMBER)
    next_shard = _next_number(same["shard"].unique().to_list(), _SHARD_NUMBER)
    items = []
    for i, row in enumerate(accepted):
        items.append({
            "id": next_id + i, "key": sample_key(split, ROLE, next_key + i),
            "shard": shard_name(split, ROLE, next_shard + i // per_shard),
            "inbox": row["inbox"], "source": row["source"],
            "row": {k: row.get(k) for k in CATALOG_SCHEMA if k != "duplicate_of"},
        })
    digest = hashlib.sha256(json.dumps([(it["row"]["path"], it["row"]["sha256"]) for it in items]).encode())
    return {"batch": digest.hexdigest()[:16], "created": _now(), "split": split, "base_count": index.height,
            "items": items}


def _validate_inbox(cfg: Config, layout: Layout, result: ReindexResult) -> list[dict]:
    """Check every inbox file; quarantine the bad ones; return the accepted rows."""
    inbox, split = layout.inbox, cfg.orchestration.reindex_split
    catalog = _catalog(layout)
    known = set(catalog["path"].to_list())
    zones = {z for z in catalog["utm_zone"].unique().to_list() if z is not None}
    accepted, seen = [], set()
    for rel in scan_inbox(inbox):
        row = check_file(inbox, rel, split, cfg.ingest.max_pixels)
        reason = row["reason"]
        if reason is None:
            if row["path"] in known or (layout.data / row["path"]).exists():
                reason = f"{REASON_ALREADY_INDEXED}: {row['path']} is in the data tree"
            elif row["path"] in seen:
                reason = f"{REASON_DUPLICATE_NAME}: another inbox file becomes {row['path']}"
            elif row["utm_zone"] is not None and zones and row["utm_zone"] not in zones:
                have = ", ".join(str(z) for z in sorted(zones))
                reason = f"{REASON_OTHER_ZONE}: zone {row['utm_zone']} is not the catalog's ({have})"
        if reason is not None:
            target = quarantine(inbox, rel, reason)
            result.rejected.append({"inbox": printable_path(rel), "reason": reason,
                                    "quarantined": target.relative_to(layout.inbox).as_posix()})
            continue
        seen.add(row["path"])
        accepted.append(row)
    return accepted


# --------------------------------------------------------------------------- applying a plan


def _index_has(index: pl.DataFrame, plan: dict) -> bool:
    ids = [it["id"] for it in plan["items"]]
    have = index.filter(pl.col("id").is_in(ids)).select("id", "path").sort("id")
    return have.rows() == [(it["id"], it["row"]["path"]) for it in plan["items"]]


def _plan_state(index: pl.DataFrame, plan: dict) -> str:
    """``applied`` (shard index holds the batch), ``pending`` (untouched since planning) or ``stale``."""
    if _index_has(index, plan):
        return "applied"
    if index.height == plan["base_count"]:
        return "pending"
    return "stale"


def _write_batch_shards(plan: dict, layout: Layout, cfg: Config) -> list[dict]:
    """Encode the batch into its new tar files; the shard-index rows (with byte ranges) they give."""
    shards_dir, sc = layout.shards_dir, cfg.shards
    by_shard: dict[str, list[dict]] = {}
    for it in plan["items"]:
        by_shard.setdefault(it["shard"], []).append(it)
    rows = []
    for name, items in sorted(by_shard.items()):
        target = shards_dir / name
        samples = []
        for it in items:
            src = _source(layout, it)
            jpg = encode_image(str(src), sc.height, sc.width, sc.jpeg_quality)
            samples.append((it["key"], jpg, _meta_json(it["row"], it["id"], it["key"])))
        ranges = write_tar(target, samples)
        for it, (offset, size), (_, jpg, _) in zip(items, ranges, samples):
            r = it["row"]
            rows.append({"id": it["id"], "key": it["key"], "path": r["path"], "split": r["split"],
                         "role": r["role"], "utm_east": r["utm_east"], "utm_north": r["utm_north"],
                         "lat": r["lat"], "lon": r["lon"], "shard": name, "offset": offset, "size": size,
                         "crc32": checksum(jpg)})
    return rows


def _source(layout: Layout, item: dict) -> Path:
    """Where the batch file is now: still in the inbox, or already moved into the data tree."""
    src = layout.inbox / item["inbox"]
    if src.exists():
        return src
    dst = layout.data / item["row"]["path"]
    if dst.exists():
        return dst
    raise ReindexError(f"inbox/{item['inbox']} of pending batch vanished before it reached {dst}")


def _read_images(layout: Layout, rows: list[dict]) -> list[Image.Image]:
    """The batch images exactly as stored in the shards (what every database descriptor is made from)."""
    images = []
    for r in rows:
        with open(layout.shards_dir / r["shard"], "rb") as fh:
            data = os.pread(fh.fileno(), r["size"], r["offset"])
        with Image.open(io.BytesIO(data)) as im:
            images.append(im.convert("RGB"))
    return images


def _add_to_releases(cfg: Config, layout: Layout, rows: list[dict], result: ReindexResult) -> None:
    from vpr.index import add_to_release, load_release

    images = _read_images(layout, rows)
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    meta = pl.DataFrame(rows).select("id", "path", "split", "role", "utm_east", "utm_north", "lat", "lon")
    for release_dir in _release_dirs(cfg, layout):
        release = load_release(release_dir, cfg.train.device)
        if release.manifest.get("splits") is not None and cfg.orchestration.reindex_split not in release.manifest["splits"]:
            result.releases[release_dir.name] = release.version  # this release does not index that split
            continue
        fresh = ~np.isin(ids, release.ids["id"].to_numpy())
        if fresh.any():
            desc = release.encode_images([im for im, f in zip(images, fresh) if f],
                                         batch_size=cfg.evaluate.batch_size)
            version = add_to_release(release, ids[fresh], desc, meta)
        else:
            version = release.path
        result.releases[release_dir.name] = Path(version).name


def _append_index(layout: Layout, rows: list[dict]) -> None:
    index = read_index(layout.shards_dir)
    if "crc32" not in index.columns:  # an index from before checksums: its rows stay unchecked
        index = index.with_columns(pl.lit(None, pl.Int64).alias("crc32"))
    new = pl.DataFrame(rows, schema=INDEX_SCHEMA)
    write_parquet_atomic(pl.concat([index.cast(INDEX_SCHEMA), new]).sort("id"),  # type: ignore[arg-type]
                         layout.shards_dir / "index.parquet")


def _append_catalog(layout: Layout, plan: dict) -> None:
    catalog = _catalog(layout)
    have = set(catalog["path"].to_list())
    new = [it["row"] for it in plan["items"] if it["row"]["path"] not in have]
    if not new:
        return
    schema = {k: v for k, v in CATALOG_SCHEMA.items() if k != "duplicate_of"}
    merged = pl.concat([catalog.select(list(schema)).cast(schema),  # type: ignore[arg-type]
                        pl.DataFrame(new, schema=schema)]).sort("path")
    write_parquet_atomic(_mark_duplicates(merged).select(list(CATALOG_SCHEMA)), layout.catalog)


def _move_files(layout: Layout, plan: dict) -> None:
    for it in plan["items"]:
        src, dst = layout.inbox / it["inbox"], layout.data / it["row"]["path"]
        if src.exists() and not dst.exists():
            _move(src, dst)
        elif src.exists():  # moved before a crash, the inbox copy remained (cross-device move)
            if hashlib.sha256(src.read_bytes()).hexdigest() == it["row"]["sha256"]:
                src.unlink()
        elif not dst.exists():
            raise ReindexError(f"inbox/{it['inbox']} vanished before it reached {dst}")


def _discard(plan: dict, layout: Layout, index: pl.DataFrame) -> None:
    """Drop a plan the shard index has moved away from (e.g. a full re-shard): unreferenced tars go."""
    referenced = set(index["shard"].unique().to_list())
    for name in {it["shard"] for it in plan["items"]} - referenced:
        (layout.shards_dir / name).unlink(missing_ok=True)
    (work_dir(layout) / PENDING).unlink(missing_ok=True)


def _apply(plan: dict, cfg: Config, layout: Layout, result: ReindexResult) -> None:
    index = read_index(layout.shards_dir)
    if _plan_state(index, plan) == "applied":
        rows = index.filter(pl.col("id").is_in([it["id"] for it in plan["items"]])).sort("id").to_dicts()
    else:
        rows = _write_batch_shards(plan, layout, cfg)
    _reached("shards-written")
    _add_to_releases(cfg, layout, rows, result)
    _reached("release-switched")
    if not _index_has(read_index(layout.shards_dir), plan):
        _append_index(layout, rows)
    _reached("shard-index-written")
    _append_catalog(layout, plan)
    _reached("catalog-written")
    _move_files(layout, plan)
    _reached("files-moved")
    paths = [it["row"]["path"] for it in plan["items"]]
    duplicate_of = dict(_catalog(layout).filter(pl.col("path").is_in(paths))
                        .select("path", "duplicate_of").iter_rows())  # same bytes as an earlier image
    result.added = [{"id": it["id"], "path": it["row"]["path"], "source": it["source"],
                     "inbox": printable_path(it["inbox"]),
                     "utm_east": it["row"]["utm_east"], "utm_north": it["row"]["utm_north"],
                     "duplicate_of": duplicate_of.get(it["row"]["path"])}
                    for it in plan["items"]]


def _log(layout: Layout, result: ReindexResult) -> None:
    line = json.dumps({"finished": _now(), **result.to_dict()}, default=str)
    with open(work_dir(layout) / HISTORY, "a") as fh:
        fh.write(line + "\n")


# --------------------------------------------------------------------------- entry point


def run_reindex(cfg: Config, layout: Layout) -> ReindexResult:
    """Resume a pending batch if there is one, else validate the inbox and add a new batch.

    Returns what was added and rejected. With nothing pending and an empty inbox, nothing is written.
    """
    if cfg.index.splits is not None and cfg.orchestration.reindex_split not in cfg.index.splits:
        raise ReindexError(f"orchestration.reindex_split={cfg.orchestration.reindex_split!r} is not among "
                           f"index.splits={cfg.index.splits}: a rebuilt release would drop the new images")
    result = ReindexResult()
    pending_path = work_dir(layout) / PENDING
    if not pending_path.exists() and not scan_inbox(layout.inbox):
        result.note = "inbox empty: nothing to do"
        return result
    with reindex_lock(layout):
        plan = json.loads(pending_path.read_text()) if pending_path.exists() else None
        if plan is not None and _plan_state(read_index(layout.shards_dir), plan) == "stale":
            print(f"reindex: pending batch {plan['batch']} no longer fits the shard index; re-planning",
                  file=sys.stderr)
            _discard(plan, layout, read_index(layout.shards_dir))
            plan = None
        if plan is None:
            _release_dirs(cfg, layout)  # fail before touching the inbox when there is no release
            accepted = _validate_inbox(cfg, layout, result)
            if not accepted:
                result.note = "no usable new images" if result.rejected else "inbox empty: nothing to do"
                if result.rejected:
                    _log(layout, result)
                return result
            plan = plan_batch(accepted, read_index(layout.shards_dir), cfg.orchestration.reindex_split,
                              cfg.shards.samples_per_shard)
            write_text_atomic(pending_path, json.dumps(plan, indent=1, default=str))
        else:
            result.resumed = True
        result.batch = plan["batch"]
        _apply(plan, cfg, layout, result)
        pending_path.unlink()
        result.note = f"added {len(result.added)} image(s)" + (" (resumed batch)" if result.resumed else "")
        dups = [a for a in result.added if a["duplicate_of"]]
        if dups:
            result.note += (f"; {len(dups)} with the same bytes as an image already indexed (kept; e.g. "
                            f"{dups[0]['path']} == {dups[0]['duplicate_of']})")
        _log(layout, result)
        return result
