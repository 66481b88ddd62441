"""Shards: pack the catalog's images into deterministic WebDataset tars plus an id → bytes index.

After this step nothing reads the original image folders again. Each sample is a resized RGB JPEG
and a JSON metadata record under a dot-free key. The tars are byte-identical for the same catalog
and parameters (fixed tar headers, sorted order), so DVC sees no change when nothing changed.

``index.parquet`` gives, for every image id, the shard file, the byte range of its JPEG data
inside the tar and the CRC-32 of those bytes, so ``ShardReader`` can serve random access (training
batches) with one ``pread``, while ``iter_split`` streams a split in order through
``webdataset.WebDataset`` (extraction). Both readers check every sample against the index (size,
checksum, members): a truncated or corrupted tar is an error naming the shard and the sample, never
a silently different image, and a sample carrying any member but ``.jpg`` and ``.json`` (e.g. a
``.pyd``/``.pickle`` payload) is refused; nothing is ever unpickled.

Writing is all-or-nothing for readers: every new tar and the new index are first written to
staging names (``*.tar.tmp``); only when all of them are on disk is the old index removed, the tars
renamed into place and the new index renamed last. A failure while staging (full disk, unreadable
source) leaves the previous shards and index untouched; a ``kill -9`` during the commit leaves no
index (readers refuse with "run `vpr shard`"), never an old index over new tars.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image, ImageOps
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vpr.atomic import fsync_dir
from vpr.catalog import strict_pillow
from vpr.config import ShardConfig
from vpr.procs import exit_with_parent

INDEX_FILE = "index.parquet"
STAGED_INDEX_FILE = "index.parquet.tmp"  # the next index, written before the commit (never read)
SAMPLE_MEMBERS = frozenset({"jpg", "json"})  # anything else in a sample is refused, never decoded
META_FIELDS = ("path", "split", "role", "utm_east", "utm_north", "lat", "lon", "heading", "sha256")
_SHARD_NAME = re.compile(r"^[a-z]+-[a-z]+-\d{6}\.tar(\.tmp)?$")
_BLOCK = tarfile.BLOCKSIZE
_JPEG_SOI = b"\xff\xd8"

INDEX_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Int64, "key": pl.String, "path": pl.String, "split": pl.String, "role": pl.String,
    "utm_east": pl.Float64, "utm_north": pl.Float64, "lat": pl.Float64, "lon": pl.Float64,
    "shard": pl.String, "offset": pl.Int64, "size": pl.Int64, "crc32": pl.Int64,
}


class ShardError(Exception):
    """A shard is missing, truncated or corrupt, or a source image cannot be packed."""


def sample_key(split: str, role: str, n: int) -> str:
    """Stable WebDataset key: no dots (WebDataset splits keys from extensions at the first dot)."""
    return f"{split}_{role}_{n:07d}"


def shard_name(split: str, role: str, n: int) -> str:
    return f"{split}-{role}-{n:06d}.tar"


def checksum(data: bytes) -> int:
    """CRC-32 of a sample's JPEG bytes, as stored in the index's ``crc32`` column."""
    return zlib.crc32(data)


# --------------------------------------------------------------------------- encoding (workers)


def encode_image(path: str, height: int, width: int, quality: int) -> bytes:
    """Source file → upright RGB JPEG of exactly ``width``×``height`` (deterministic bytes)."""
    try:
        with strict_pillow(None), Image.open(path) as im:  # ingest already enforced max_pixels
            _draft(im, width, height)
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = im.resize((width, height), Image.Resampling.BILINEAR)
    except OSError as exc:
        raise ShardError(f"cannot read source image {path}: {exc}") from None
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _draft(im: Image.Image, width: int, height: int) -> None:
    """Let the JPEG decoder downscale by 1/2..1/8 while staying at least the target size (speed)."""
    if im.format != "JPEG":
        return
    orientation = im.getexif().get(0x0112)
    size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    im.draft("RGB", size)


def _encode_job(job: tuple[str, int, int, int]) -> bytes:
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


def _meta_json(row: dict[str, Any], sample_id: int, key: str) -> bytes:
    meta = {k: row.get(k) for k in META_FIELDS}
    meta.update(id=sample_id, key=key)
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------- planning


def _load_catalog(catalog_path: Path) -> pl.DataFrame:
    if not catalog_path.exists():
        raise ShardError(f"catalog not found: {catalog_path} (run `vpr ingest` first)")
    catalog = pl.read_parquet(catalog_path)
    missing = [c for c in ("path", "split", "role", "utm_east", "utm_north") if c not in catalog.columns]
    if missing:
        raise ShardError(f"{catalog_path} lacks column(s): {', '.join(missing)}")
    if catalog.height == 0:
        raise ShardError(f"{catalog_path} has no images")
    for col in ("lat", "lon", "heading", "sha256"):
        if col not in catalog.columns:
            catalog = catalog.with_columns(pl.lit(None).alias(col))
    return catalog.sort("path").with_row_index("id").with_columns(pl.col("id").cast(pl.Int64))


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


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]shard"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def _encode_rows(rows: list[dict], data_root: Path, cfg: ShardConfig, pool: ProcessPoolExecutor | None
                 ) -> list[bytes]:
    jobs = [(str(data_root / r["path"]), cfg.height, cfg.width, cfg.jpeg_quality) for r in rows]
    if pool is None:
        return [_encode_job(j) for j in jobs]
    return list(pool.map(_encode_job, jobs, chunksize=max(1, len(jobs) // 32)))


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete shard files of an earlier run that the new index no longer names."""
    for f in out_dir.iterdir():
        if _SHARD_NAME.match(f.name) and f.name not in keep:
            f.unlink(missing_ok=True)


def _pack(plan: list[tuple[str, list[dict]]], data_root: Path, out_dir: Path, cfg: ShardConfig,
          workers: int) -> list[dict]:
    """Encode every planned shard into its staging file; index rows (catalog row + shard, offset, size, crc32).

    Nothing a reader looks at is touched: the tars are written as ``*.tar.tmp`` (see ``_commit``).
    """
    index_rows: list[dict] = []
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=exit_with_parent, initargs=(os.getpid(),))
            if workers > 1 else None)  # spawn: callers (Prefect thread runners) may hold locks
    try:
        with _progress() as bar:
            task = bar.add_task("shard", total=sum(len(rows) for _, rows in plan))
            for name, rows in plan:
                jpgs = _encode_rows(rows, data_root, cfg, pool)
                samples = [(r["key"], j, _meta_json(r, r["id"], r["key"])) for r, j in zip(rows, jpgs)]
                try:
                    ranges = _write_tar_file(staged(out_dir / name), samples)
                except OSError as exc:  # ENOSPC, EDQUOT, EIO...: name the file and the cause
                    raise ShardError(f"cannot write shard {name} in {out_dir}: {exc.strerror or exc}; "
                                     "the previous shards and index are unchanged") from exc
                index_rows += [{**r, "shard": name, "offset": off, "size": size, "crc32": checksum(j)}
                               for r, j, (off, size) in zip(rows, jpgs, ranges)]
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
            index.sort("id").write_parquet(out_dir / STAGED_INDEX_FILE)
            with open(out_dir / STAGED_INDEX_FILE, "rb") as fh:
                os.fsync(fh.fileno())
        except Exception as exc:  # noqa: BLE001 - OSError or polars' own I/O error (full disk...)
            why = getattr(exc, "strerror", None) or exc
            raise ShardError(f"cannot write the shard index in {out_dir}: {why}; "
                             "the previous shards and index are unchanged") from exc
    except BaseException:
        _discard_staged(out_dir, names)
        raise
    index_path = _commit(out_dir, names)
    _remove_stale(out_dir, set(names))
    return index_path


# --------------------------------------------------------------------------- readers


def read_index(shards_dir: str | Path) -> pl.DataFrame:
    """The shard index table (``id``, ``key``, ``shard``, ``offset``, ``size``, geo columns)."""
    path = Path(shards_dir) / INDEX_FILE
    if not path.exists():
        raise ShardError(f"shard index not found: {path} (run `vpr shard` first)")
    return pl.read_parquet(path)


class ShardReader:
    """Random access to shard JPEGs by image id, via the index's byte ranges.

    File descriptors are opened lazily, per process (a pickled or forked reader reopens its own),
    and read with ``os.pread`` so threads and DataLoader workers never share a file position.
    """

    def __init__(self, shards_dir: str | Path) -> None:
        self.shards_dir = Path(shards_dir)
        index = read_index(self.shards_dir).sort("id")
        if index["id"].to_list() != list(range(index.height)):
            raise ShardError(f"{self.shards_dir / INDEX_FILE}: ids are not 0..N-1")
        self.index = index
        self._shard: list[str] = index["shard"].to_list()
        self._key: list[str] = index["key"].to_list()
        self._offset: list[int] = index["offset"].to_list()
        self._size: list[int] = index["size"].to_list()
        # indexes written before checksums were recorded (or rows appended without one): size check only
        self._crc: list[int | None] = (index["crc32"].to_list() if "crc32" in index.columns
                                       else [None] * index.height)
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._shard)

    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # inherited through fork: descriptors belong to the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.shards_dir / shard, os.O_RDONLY)
            except OSError as exc:
                raise ShardError(f"cannot open shard {shard} in {self.shards_dir}: {exc}") from None
            self._fds[shard] = fd
        return fd

    def _where(self, i: int) -> str:
        return f"shard {self.shards_dir / self._shard[i]}, sample {self._key[i]} (id {i})"

    def read_jpeg(self, i: int) -> bytes:
        """The stored JPEG bytes of image ``i``; ``ShardError`` if the shard is short or corrupt."""
        if not 0 <= i < len(self):
            raise IndexError(f"image id {i} out of range 0..{len(self) - 1}")
        data = os.pread(self._fd(self._shard[i]), self._size[i], self._offset[i])
        if len(data) != self._size[i]:
            raise ShardError(f"truncated {self._where(i)}: expected {self._size[i]} bytes at offset "
                             f"{self._offset[i]}, got {len(data)}")
        if not data.startswith(_JPEG_SOI):
            raise ShardError(f"corrupt {self._where(i)}: data at offset {self._offset[i]} is not a JPEG")
        crc = self._crc[i]
        if crc is not None and checksum(data) != crc:
            raise ShardError(f"corrupt {self._where(i)}: the {self._size[i]} bytes at offset {self._offset[i]} "
                             f"do not match the index checksum (crc32 {checksum(data):08x}, expected {crc:08x})")
        return data

    def load(self, i: int) -> Image.Image:
        """Image ``i`` decoded to RGB."""
        data = self.read_jpeg(i)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise ShardError(f"corrupt {self._where(i)}: {exc}") from None

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}  # descriptors do not travel; the receiving process opens its own
        return state


@dataclass(frozen=True)
class _ShardPlan:
    """What the index says one shard holds: keys in order and each jpg's byte range."""

    url: Path
    keys: list[str]
    ends: list[int]  # offset + size of each sample's jpg data
    crcs: list[int | None]  # the index's checksum of each sample's jpg data (None: not recorded)


def split_shards(shards_dir: str | Path, split: str, role: str) -> list[_ShardPlan]:
    """Shard files of one split/role in order, each with the samples the index says it holds."""
    index = read_index(shards_dir).filter((pl.col("split") == split) & (pl.col("role") == role)).sort("id")
    if "crc32" not in index.columns:
        index = index.with_columns(pl.lit(None, pl.Int64).alias("crc32"))
    plans: dict[str, _ShardPlan] = {}
    for shard, key, offset, size, crc in index.select("shard", "key", "offset", "size", "crc32").iter_rows():
        plan = plans.setdefault(shard, _ShardPlan(Path(shards_dir) / shard, [], [], []))
        plan.keys.append(key)
        plan.ends.append(offset + size)
        plan.crcs.append(crc)
    return [plans[name] for name in sorted(plans)]


def _damage(plan: _ShardPlan, n_read: int, exc: Exception) -> ShardError:
    """Name the first sample the file cannot hold (truncation), else the one being read."""
    size = plan.url.stat().st_size if plan.url.exists() else 0
    cut = next((k for k, end in zip(plan.keys, plan.ends) if end > size), None)
    where = (f"sample {cut} lies beyond the end of the file ({size} bytes)" if cut is not None
             else f"at or after sample {plan.keys[min(n_read, len(plan.keys) - 1)]}")
    reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else repr(exc)
    return ShardError(f"shard {plan.url} is truncated or corrupt: {where}; "
                      f"{n_read} of {len(plan.keys)} samples read ({reason})")


def _stream_shard(plan: _ShardPlan) -> Iterator[tuple[str, Image.Image, dict]]:
    """Stream one tar through WebDataset, checking every sample against the index."""
    import webdataset as wds  # imports torch (~1.5 s): keep it out of the resize workers' start-up

    url, expected = plan.url, plan.keys
    if not url.exists():
        raise ShardError(f"shard missing: {url}")
    # workersplitter=None: this one shard is read whole wherever it runs (WebDataset's default would give
    # it to DataLoader worker 0 only and leave the others empty, so streaming in workers failed)
    dataset = wds.WebDataset(str(url), shardshuffle=False, empty_check=False, handler=wds.reraise_exception,
                             workersplitter=None)
    n = 0
    try:
        for sample in dataset:
            key = sample["__key__"]
            if n >= len(expected) or key != expected[n]:
                raise ShardError(f"shard {url}: unexpected sample {key} (index expects "
                                 f"{expected[n] if n < len(expected) else 'end of shard'})")
            members = {k for k in sample if not k.startswith("__")}
            if members - SAMPLE_MEMBERS:  # e.g. .pyd / .pickle: a payload we never decode, let alone unpickle
                extra = ", ".join(f".{m}" for m in sorted(members - SAMPLE_MEMBERS))
                raise ShardError(f"shard {url}: sample {key} has unexpected member(s) {extra}; only .jpg and "
                                 ".json are allowed (refused, nothing was decoded)")
            if "jpg" not in sample or "json" not in sample:
                raise ShardError(f"shard {url}: sample {key} is incomplete (truncated or corrupt tar)")
            crc = plan.crcs[n]
            if crc is not None and checksum(sample["jpg"]) != crc:
                raise ShardError(f"shard {url}: sample {key} is corrupt: its jpg data does not match the "
                                 f"index checksum (crc32 {checksum(sample['jpg']):08x}, expected {crc:08x})")
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                image = im.convert("RGB")
            yield key, image, json.loads(sample["json"])
            n += 1
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile.ReadError, OSError from PIL, JSON errors...
        raise _damage(plan, n, exc) from exc
    if n != len(expected):
        raise ShardError(f"shard {url} ends early (truncated or corrupt): {n} of {len(expected)} "
                         f"samples read, first missing {expected[n]}")


def iter_split(shards_dir: str | Path, split: str, role: str) -> Iterator[tuple[str, Image.Image, dict]]:
    """Stream ``(key, RGB image, metadata)`` of one split/role in id order (descriptor extraction)."""
    for plan in split_shards(shards_dir, split, role):
        yield from _stream_shard(plan)
