"""Shards: pack the catalog's images into deterministic WebDataset tars plus an id → bytes index.

After this step nothing reads the original image folders again. Each sample is a resized RGB JPEG
and a JSON metadata record under a dot-free key. The tars are byte-identical for the same catalog
and parameters (fixed tar headers, sorted order), so DVC sees no change when nothing changed.

``index.parquet`` gives, for every image id, the shard file, the byte range of its JPEG data
inside the tar and the CRC-32 of those bytes; the readers that check every sample against it live
in ``vpr.shared.shardio``. Re-indexing appends its rows in ``index.parts/`` (``vpr.foundations.parts``);
a full rebuild's index supersedes them.

Writing is all-or-nothing for readers: every new tar and the new index are first written to
staging names (``*.tar.tmp``); only when all of them are on disk is the old index removed, the tars
renamed into place and the new index renamed last. A failure while staging (full disk, unreadable
source) leaves the previous shards and index untouched; a ``kill -9`` during the commit leaves no
index (readers refuse with "run `vpr shard`"), never an old index over new tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from vpr.foundations.atomic import fsync_dir
from vpr.foundations.config import ShardConfig
from vpr.foundations.imageio import encode_jpeg, read_image_file, shard_rendition, strict_pillow
from vpr.foundations.layout import SPLITS, assign_ids
from vpr.foundations.parts import append_part, base_metadata, read_table, remove_superseded
from vpr.foundations.procs import worker_pool
from vpr.foundations.progress import step_progress
from vpr.shared.shardio import INDEX_FILE, INDEX_SCHEMA, ShardError, checksum

STAGED_INDEX_FILE = "index.parquet.tmp"  # the next index, written before the commit (never read)
META_FIELDS = ("path", "split", "role", "utm_east", "utm_north", "lat", "lon", "heading", "sha256")
_SHARD_NAME = re.compile(r"^[a-z]+-[a-z]+-\d{6}\.tar(\.tmp)?$")
_BLOCK = tarfile.BLOCKSIZE


def sample_key(split: str, role: str, n: int) -> str:
    """Stable WebDataset key: no dots (WebDataset splits keys from extensions at the first dot)."""
    return f"{split}_{role}_{n:07d}"


def shard_name(split: str, role: str, n: int) -> str:
    return f"{split}-{role}-{n:06d}.tar"


# --------------------------------------------------------------------------- encoding (workers)


def source_limit(row: dict[str, Any]) -> int:
    """A bound for reading a cataloged source file: 8 bytes per pixel (16-bit RGBA, uncompressed) + 1 MiB."""
    if row.get("width") and row.get("height"):
        return int(row["width"]) * int(row["height"]) * 8 + 2**20
    return 2**28


def read_source(path: Path, root: Path, row: dict[str, Any]) -> bytes:
    """The bytes of a cataloged image, as ingest saw them: a regular file inside ``root``, of bounded size,
    with the catalog's sha256 (a file replaced after ingest, or swapped for a link, is an error)."""
    try:
        data = read_image_file(path, source_limit(row), root=root)
    except OSError as exc:
        raise ShardError(f"cannot read source image {path}: {exc.strerror or exc}") from None
    if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise ShardError(f"source image {path} changed since it was cataloged (sha256 differs): run `vpr ingest`")
    return data


def encode_image(path: Path, root: Path, row: dict[str, Any], height: int, width: int, quality: int) -> bytes:
    """Source file → upright RGB JPEG of exactly ``width``×``height`` (deterministic bytes)."""
    data = read_source(path, root, row)
    try:
        with strict_pillow(None), Image.open(io.BytesIO(data)) as im:  # ingest already enforced max_pixels
            rendition = shard_rendition(im, width, height)
    except OSError as exc:
        raise ShardError(f"cannot read source image {path}: {exc}") from None
    return encode_jpeg(rendition, quality)


def _encode_job(job: tuple) -> bytes:
    return encode_image(*job)


# --------------------------------------------------------------------------- tar writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Header with every variable field pinned, so the same bytes always give the same tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def staged(path: Path) -> Path:
    """Where a tar is written before it is renamed into place (matched by the stale-file sweep)."""
    return path.with_name(path.name + ".tmp")


def _write_tar_file(dest: Path, samples: Sequence[tuple[str, bytes, bytes]]) -> list[tuple[int, int]]:
    """Write and fsync a tar at ``dest`` (removed again on any failure); each jpg's (offset, size)."""
    ranges: list[tuple[int, int]] = []
    try:
        with open(dest, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, jpg, meta in samples:
                    tar.addfile(_tarinfo(f"{key}.jpg", len(jpg)), io.BytesIO(jpg))
                    padded = -(-len(jpg) // _BLOCK) * _BLOCK
                    ranges.append((tar.offset - padded, len(jpg)))
                    tar.addfile(_tarinfo(f"{key}.json", len(meta)), io.BytesIO(meta))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return ranges


def write_tar(path: Path, samples: Sequence[tuple[str, bytes, bytes]]) -> list[tuple[int, int]]:
    """Write ``(key, jpg, json)`` samples to ``path`` atomically; returns each jpg's (offset, size)."""
    tmp = staged(path)
    ranges = _write_tar_file(tmp, samples)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ranges


def sample_metadata(row: dict[str, Any], sample_id: int, key: str) -> bytes:
    meta = {k: row.get(k) for k in META_FIELDS}
    meta.update(id=sample_id, key=key)
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------- planning


def _load_catalog(catalog_path: Path) -> pl.DataFrame:
    if not catalog_path.exists():
        raise ShardError(f"catalog not found: {catalog_path} (run `vpr ingest` first)")
    catalog = read_table(catalog_path, key="path", keep="last")  # the base and the batches appended to it
    missing = [c for c in ("path", "split", "role", "utm_east", "utm_north") if c not in catalog.columns]
    if missing:
        raise ShardError(f"{catalog_path} lacks column(s): {', '.join(missing)}")
    if catalog.height == 0:
        raise ShardError(f"{catalog_path} has no images")
    for col in ("lat", "lon", "heading", "sha256"):
        if col not in catalog.columns:
            catalog = catalog.with_columns(pl.lit(None).alias(col))
    # an image's id is a function of its split and path (``layout.image_id``): adding, removing or
    # re-sharding images never renumbers another, and a re-indexed image keeps its id through rebuilds
    unknown = sorted(set(catalog["split"].unique().to_list()) - set(SPLITS))
    if unknown:
        raise ShardError(f"{catalog_path}: unknown split(s) {unknown} (expected {', '.join(SPLITS)})")
    rank = pl.col("split").replace_strict({s: i for i, s in enumerate(SPLITS)}, return_dtype=pl.Int64)
    catalog = catalog.sort(rank, pl.col("path"))  # packing order: split, then path
    ids: list[int] = []
    for split in catalog["split"].unique(maintain_order=True).to_list():
        ids += assign_ids(split, catalog.filter(pl.col("split") == split)["path"].to_list())
    return catalog.with_columns(pl.Series("id", ids, dtype=pl.Int64))


def plan_shards(catalog: pl.DataFrame, per_shard: int) -> list[tuple[str, list[dict]]]:
    """(shard file name, rows with ``key``) per shard; each split/role packed in catalog order."""
    plan: list[tuple[str, list[dict]]] = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in catalog.iter_rows(named=True):
        group = groups.setdefault((row["split"], row["role"]), [])
        row["key"] = sample_key(row["split"], row["role"], len(group))
        group.append(row)
    for (split, role), rows in sorted(groups.items()):
        for n, start in enumerate(range(0, len(rows), per_shard)):
            plan.append((shard_name(split, role, n), rows[start : start + per_shard]))
    return plan


# --------------------------------------------------------------------------- driver


def encode_rows(rows: list[dict], data_root: Path, cfg: ShardConfig, pool: ProcessPoolExecutor | None) -> list[bytes]:
    """The shard rendition (JPEG bytes) of each catalog row, in ``pool``'s processes when there is one."""
    keep = ("width", "height", "sha256")
    jobs = [
        (data_root / r["path"], data_root, {k: r.get(k) for k in keep}, cfg.height, cfg.width, cfg.jpeg_quality)
        for r in rows
    ]
    if pool is None:
        return [_encode_job(j) for j in jobs]
    return list(pool.map(_encode_job, jobs, chunksize=max(1, len(jobs) // 32)))


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete shard files of an earlier run that the new index no longer names."""
    for f in out_dir.iterdir():
        if _SHARD_NAME.match(f.name) and f.name not in keep:
            f.unlink(missing_ok=True)


def _pack(
    plan: list[tuple[str, list[dict]]], data_root: Path, out_dir: Path, cfg: ShardConfig, workers: int
) -> list[dict]:
    """Encode every planned shard into its staging file; index rows (catalog row + shard, offset, size, crc32).

    Nothing a reader looks at is touched: the tars are written as ``*.tar.tmp`` (see ``_commit``).
    """
    index_rows: list[dict] = []
    pool = worker_pool(workers)
    try:
        with step_progress("shard") as bar:
            task = bar.add_task("shard", total=sum(len(rows) for _, rows in plan))
            for name, rows in plan:
                jpgs = encode_rows(rows, data_root, cfg, pool)
                samples = [(r["key"], j, sample_metadata(r, r["id"], r["key"])) for r, j in zip(rows, jpgs)]
                try:
                    ranges = _write_tar_file(staged(out_dir / name), samples)
                except OSError as exc:  # ENOSPC, EDQUOT, EIO...: name the file and the cause
                    raise ShardError(
                        f"cannot write shard {name} in {out_dir}: {exc.strerror or exc}; "
                        "the previous shards and index are unchanged"
                    ) from exc
                index_rows += [
                    {**r, "shard": name, "offset": off, "size": size, "crc32": checksum(j)}
                    for r, j, (off, size) in zip(rows, jpgs, ranges)
                ]
                bar.advance(task, len(rows))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return index_rows


def _commit(out_dir: Path, names: Sequence[str]) -> Path:
    """Switch from the previous shards to the staged ones; only renames and unlinks (no space needed).

    The old index goes first, so at no moment does an index name a tar it was not written with: a
    crash in here leaves no index (readers refuse) and the next ``write_shards`` redoes the lot.
    """
    index_path = out_dir / INDEX_FILE
    index_path.unlink(missing_ok=True)
    fsync_dir(out_dir)
    for name in names:
        os.replace(staged(out_dir / name), out_dir / name)
    fsync_dir(out_dir)  # every tar in place before the index that names them
    os.replace(out_dir / STAGED_INDEX_FILE, index_path)
    fsync_dir(out_dir)
    return index_path


def _discard_staged(out_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        staged(out_dir / name).unlink(missing_ok=True)
    (out_dir / STAGED_INDEX_FILE).unlink(missing_ok=True)


def write_shards(
    catalog_path: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    cfg: ShardConfig,
    *,
    workers: int | None = None,
) -> Path:
    """Pack every catalog image into ``{split}-{role}-NNNNNN.tar``; return ``out_dir/index.parquet``.

    ``workers`` (default: CPU count) resize images in parallel; output does not depend on it.
    All tars and the index are staged first, then switched in (``_commit``); shards of an earlier
    run that the new index does not name are deleted last. A failure before the switch raises
    ``ShardError`` and leaves the previous shards and index as they were.
    """
    catalog_path, data_root, out_dir = Path(catalog_path), Path(data_root), Path(out_dir)
    plan = plan_shards(_load_catalog(catalog_path), cfg.samples_per_shard)
    names = [name for name, _ in plan]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        rows = _pack(plan, data_root, out_dir, cfg, workers or os.cpu_count() or 1)
        index = pl.DataFrame([{k: r[k] for k in INDEX_SCHEMA} for r in rows], schema=INDEX_SCHEMA)
        try:
            index.sort("id").write_parquet(out_dir / STAGED_INDEX_FILE, metadata=base_metadata(out_dir / INDEX_FILE))
            with open(out_dir / STAGED_INDEX_FILE, "rb") as fh:
                os.fsync(fh.fileno())
        except Exception as exc:  # noqa: BLE001 - OSError or polars' own I/O error (full disk...)
            why = getattr(exc, "strerror", None) or exc
            raise ShardError(
                f"cannot write the shard index in {out_dir}: {why}; the previous shards and index are unchanged"
            ) from exc
    except BaseException:
        _discard_staged(out_dir, names)
        raise
    index_path = _commit(out_dir, names)
    remove_superseded(index_path)  # the batches appended to the previous index
    _remove_stale(out_dir, set(names))
    return index_path


# --------------------------------------------------------------------------- appending (re-indexing)


def write_new_shards(
    shards_dir: str | Path,
    samples: Sequence[tuple[str, int, str, dict, Path, Path]],
    cfg: ShardConfig,
    *,
    carried: dict[str, list[tuple[dict, str, bytes, bytes]]] | None = None,
) -> list[dict]:
    """Write ``(shard name, id, key, catalog row, source file, its root)`` samples into new tar files (each atomic).

    ``carried`` puts already-stored samples (index row, key, JPEG, JSON) first into a new tar, copied
    verbatim (a tail shard moving into a fuller one). Existing tars are never rewritten and nothing
    references the new ones until ``append_to_index``; returns the index rows (byte ranges, checksums)
    of every sample written, carried ones at their new place.
    """
    shards_dir = Path(shards_dir)
    carried = carried or {}
    by_shard: dict[str, list[tuple[int, str, dict, Path, Path]]] = {}
    for name, sample_id, key, row, src, root in samples:
        by_shard.setdefault(name, []).append((sample_id, key, row, src, root))
    rows = []
    for name, items in sorted(by_shard.items()):
        jpgs = [encode_image(src, root, row, cfg.height, cfg.width, cfg.jpeg_quality) for _, _, row, src, root in items]
        old = carried.get(name, [])
        tar_samples = [(key, jpg, meta) for _, key, jpg, meta in old]
        tar_samples += [(key, jpg, sample_metadata(row, i, key)) for (i, key, row, *_), jpg in zip(items, jpgs)]
        ranges = write_tar(shards_dir / name, tar_samples)
        placed = [(row, row["id"], key, jpg) for row, key, jpg, _ in old]
        placed += [(row, i, key, jpg) for (i, key, row, *_), jpg in zip(items, jpgs)]
        for (row, i, key, jpg), (offset, size) in zip(placed, ranges):
            entry = {k: row.get(k) for k in INDEX_SCHEMA}
            entry.update(id=i, key=key, shard=name, offset=offset, size=size, crc32=checksum(jpg))
            rows.append(entry)
    return rows


def read_tar_members(path: Path) -> dict[str, bytes]:
    """Every member of one of our (small, trusted) shard tars by name."""
    with tarfile.open(path, mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def rows_in_tar(path: Path, items: Sequence[dict]) -> list[dict] | None:
    """Index rows for plan ``items`` (``id``, ``key``, ``row``, for carried ones also the stored ``meta``
    JSON) read back from a tar an earlier run wrote.

    None when the tar is missing or does not hold exactly those samples with their metadata, so the
    caller writes it afresh. Lets an interrupted re-index finish from what is already durable.
    """
    if not path.is_file():
        return None
    want = {it["key"]: it for it in items}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = tar.getmembers()
            if {m.name for m in members} != {f"{k}.{ext}" for k in want for ext in ("jpg", "json")}:
                return None
            for m in members:
                key, ext = m.name.rsplit(".", 1)
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                it = want[key]
                meta = it.get("meta") or sample_metadata(it["row"], it["id"], key)  # carried: stored verbatim
                if ext == "json" and data != meta:
                    return None
                if ext == "jpg":
                    entry = {k: it["row"].get(k) for k in INDEX_SCHEMA}
                    entry.update(id=it["id"], key=key, shard=path.name, offset=m.offset_data, size=m.size)
                    found[key] = {**entry, "crc32": checksum(data)}
    except (OSError, tarfile.TarError):
        return None
    return [found[k] for k in want]


def append_to_index(shards_dir: str | Path, rows: list[dict]) -> Path:
    """Add rows (from ``write_new_shards``) to the shard index as one new part (``vpr.foundations.parts``):
    the new tars go live, the index's base is not rewritten. Returns the part written.

    A row whose id is already indexed replaces it (a sample carried into a new tar): readers keep an id's
    last row."""
    index_path = Path(shards_dir) / INDEX_FILE
    if not index_path.exists():
        raise ShardError(f"shard index not found: {index_path} (run `vpr shard` first)")
    new = pl.DataFrame(rows, schema=INDEX_SCHEMA).unique(subset="id", keep="last", maintain_order=True).sort("id")
    return append_part(index_path, new, key="id", keep="last")
