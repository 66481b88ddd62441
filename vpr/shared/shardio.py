"""Reading the shards: the id → byte-range index, random access by id, and streaming through WebDataset.

Every read checks each sample against ``index.parquet`` (size, CRC-32 of the JPEG bytes, members): a
truncated or corrupted tar is an error naming the shard and the sample, never a silently different
image, and a sample carrying any member but ``.jpg`` and ``.json`` (e.g. a ``.pyd``/``.pickle``
payload) is refused; nothing is ever unpickled.

- ``ShardReader``: random access (triplet batches) with one ``pread`` per image;
- ``iter_split`` / ``stream_shard``: sequential reads of whole shards through ``webdataset``
  (descriptor extraction), so the same code runs per shard on many workers;
- ``evaluation_shards`` / ``release_shards``: the shards an evaluation or a release encodes, here
  rather than beside those steps so that a flow lists them without importing torch.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from vpr.foundations.config import Config
from vpr.foundations.layout import SPLITS, Layout
from vpr.foundations.parts import read_table
from vpr.shared.shardnet import RemoteShards, Transfer, TransferError, promised_bytes, tar_samples

INDEX_FILE = "index.parquet"
SAMPLE_MEMBERS = frozenset({"jpg", "json"})  # anything else in a sample is refused, never decoded
_JPEG_SOI = b"\xff\xd8"

INDEX_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Int64,
    "key": pl.String,
    "path": pl.String,
    "split": pl.String,
    "role": pl.String,
    "utm_east": pl.Float64,
    "utm_north": pl.Float64,
    "lat": pl.Float64,
    "lon": pl.Float64,
    "shard": pl.String,
    "offset": pl.Int64,
    "size": pl.Int64,
    "crc32": pl.Int64,
}


class ShardError(Exception):
    """A shard is missing, truncated or corrupt, or a source image cannot be packed."""


def checksum(data: bytes) -> int:
    """CRC-32 of a sample's JPEG bytes, as stored in the index's ``crc32`` column."""
    return zlib.crc32(data)


def read_index(shards_dir: str | Path, splits: Sequence[str] | None = None) -> pl.DataFrame:
    """The shard index (``id``, ``key``, ``shard``, ``offset``, ``size``, geo columns) of a shard folder.

    A folder with its own ``index.parquet`` is one shard set. Otherwise it is the root of one set per
    split (``train/``, ``val/``, ``test/``: what the pipeline writes): the tables of ``splits`` (default:
    every split folder present) are joined, ``shard`` naming each tar relative to the root. Each table is
    its base file and the batches re-indexing appended (``index.parts/``, ``vpr.foundations.parts``), an
    id's last row winning (a sample carried into a new tar).
    """
    root = Path(shards_dir)
    if (root / INDEX_FILE).exists():
        return read_table(root / INDEX_FILE, key="id", keep="last")
    names = list(splits) if splits is not None else [s for s in SPLITS if (root / s / INDEX_FILE).exists()]
    missing = [root / s / INDEX_FILE for s in names if not (root / s / INDEX_FILE).exists()]
    if missing or not names:
        where = missing[0] if missing else root / INDEX_FILE
        raise ShardError(f"shard index not found: {where} (run `vpr shard` first)")
    parts = [
        read_table(root / s / INDEX_FILE, key="id", keep="last").with_columns(
            (pl.lit(f"{s}/") + pl.col("shard")).alias("shard")
        )
        for s in names
    ]
    return pl.concat(parts, how="diagonal_relaxed").sort("id")


def verified_jpeg(data: bytes, size: int, offset: int, crc: int | None, where: str) -> bytes:
    """``data`` read at ``offset`` if it is the whole JPEG the index recorded there, else ``ShardError``."""
    if len(data) != size:
        raise ShardError(f"truncated {where}: expected {size} bytes at offset {offset}, got {len(data)}")
    if not data.startswith(_JPEG_SOI):
        raise ShardError(f"corrupt {where}: data at offset {offset} is not a JPEG")
    if crc is not None and checksum(data) != crc:
        raise ShardError(
            f"corrupt {where}: the {size} bytes at offset {offset} "
            f"do not match the index checksum (crc32 {checksum(data):08x}, expected {crc:08x})"
        )
    return data


class ShardReader:
    """Random access to shard JPEGs by image id, via the index's byte ranges.

    File descriptors are opened lazily, per process (a pickled or forked reader reopens its own),
    and read with ``os.pread`` so threads and DataLoader workers never share a file position.
    """

    def __init__(self, shards_dir: str | Path, splits: Sequence[str] | None = None) -> None:
        self.shards_dir = Path(shards_dir)
        index = read_index(self.shards_dir, splits).sort("id")
        self._ids = index["id"].to_numpy()
        if index.height and (self._ids[1:] == self._ids[:-1]).any():
            raise ShardError(f"shard index of {self.shards_dir}: an image id appears twice")
        self.index = index
        self._shard: list[str] = index["shard"].to_list()
        self._key: list[str] = index["key"].to_list()
        self._offset: list[int] = index["offset"].to_list()
        self._size: list[int] = index["size"].to_list()
        # indexes written before checksums were recorded (or rows appended without one): size check only
        self._crc: list[int | None] = index["crc32"].to_list() if "crc32" in index.columns else [None] * index.height
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()
        self._plans: list[ShardPlan] | None = None

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

    def _row(self, i: int) -> int:
        """Where image id ``i`` sits in the index; ``KeyError`` for an id the index does not hold."""
        row = int(np.searchsorted(self._ids, i))
        if row >= len(self._ids) or self._ids[row] != i:
            raise KeyError(f"image id {i} is not in the shard index of {self.shards_dir}")
        return row

    def _where(self, row: int) -> str:
        return f"shard {self.shards_dir / self._shard[row]}, sample {self._key[row]} (id {self._ids[row]})"

    def plans(self) -> list[ShardPlan]:
        """Every shard of the index with the samples it holds (computed once per reader)."""
        if self._plans is None:
            self._plans = shard_plans(self.index, self.shards_dir)
        return self._plans

    def read_jpeg(self, i: int) -> bytes:
        """The stored JPEG bytes of image ``i``; ``ShardError`` if the shard is short or corrupt."""
        r = self._row(i)
        data = os.pread(self._fd(self._shard[r]), self._size[r], self._offset[r])
        return verified_jpeg(data, self._size[r], self._offset[r], self._crc[r], self._where(r))

    def load(self, i: int) -> Image.Image:
        """Image ``i`` decoded to RGB."""
        data = self.read_jpeg(i)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise ShardError(f"corrupt {self._where(self._row(i))}: {exc}") from None

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __enter__(self) -> ShardReader:
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
class ShardPlan:
    """What the index says one shard holds: keys and ids in order and each jpg's byte range."""

    url: Path | str  # a local file, or a remote shard's URL (``is_url``)
    keys: list[str]
    ends: list[int]  # offset + size of each sample's jpg data
    crcs: list[int | None]  # the index's checksum of each sample's jpg data (None: not recorded)
    ids: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # each sample's jpg size
    remote: RemoteShards | None = None  # where a remote shard comes from, and the limits of its transfer


def is_url(location: str | Path) -> bool:
    """Whether shards live behind a URL (``http(s)://``, ``pipe:``...) rather than in a local folder."""
    return isinstance(location, str) and ("://" in location or location.startswith("pipe:"))


def shard_plans(index: pl.DataFrame, shards_dir: str | Path | RemoteShards) -> list[ShardPlan]:
    """One plan per shard file named in ``index`` (rows of a shard index), in shard-name order.

    ``shards_dir`` may be remote (``RemoteShards``, or a base URL with the default limits, where a
    ``pipe:`` is refused): the plans then stream ``{base}/{shard}`` instead.
    """
    remote = shards_dir if isinstance(shards_dir, RemoteShards) else None
    if is_url(shards_dir):
        try:
            remote = RemoteShards(str(shards_dir))
        except TransferError as exc:
            raise ShardError(str(exc)) from None
    index = index.sort("shard", "offset")  # tar order (ids are not: they hash the path)
    if "crc32" not in index.columns:
        index = index.with_columns(pl.lit(None, pl.Int64).alias("crc32"))
    plans: dict[str, ShardPlan] = {}
    for shard, key, offset, size, crc, i in index.select("shard", "key", "offset", "size", "crc32", "id").iter_rows():
        where = remote.location(shard) if remote else Path(shards_dir) / shard  # type: ignore[arg-type]
        plan = plans.setdefault(shard, ShardPlan(where, [], [], [], remote=remote))
        plan.keys.append(key)
        plan.sizes.append(size)
        plan.ends.append(offset + size)
        plan.crcs.append(crc)
        plan.ids.append(i)
    return [plans[name] for name in sorted(plans)]


def split_shards(shards_dir: str | Path, split: str, role: str) -> list[ShardPlan]:
    """Shard files of one split/role in order, each with the samples the index says it holds."""
    index = read_index(shards_dir, [split]).filter((pl.col("split") == split) & (pl.col("role") == role))
    return shard_plans(index, shards_dir)


def _damage(plan: ShardPlan, n_read: int, exc: Exception) -> ShardError:
    """Name the first sample the file cannot hold (truncation), else the one being read."""
    local = isinstance(plan.url, Path)
    size = plan.url.stat().st_size if local and plan.url.exists() else 0
    cut = next((k for k, end in zip(plan.keys, plan.ends) if end > size), None) if local else None
    where = (
        f"sample {cut} lies beyond the end of the file ({size} bytes)"
        if cut is not None
        else f"at or after sample {plan.keys[min(n_read, len(plan.keys) - 1)]}"
    )
    reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else repr(exc)
    return ShardError(
        f"shard {plan.url} is truncated or corrupt: {where}; {n_read} of {len(plan.keys)} samples read ({reason})"
    )


def _local_samples(url: Path) -> Iterator[dict]:
    """A local tar's samples through WebDataset (the file bounds what any header can claim)."""
    import webdataset as wds  # imports torch (slow to import): keep it out of the resize workers' start-up

    if not url.exists():
        raise ShardError(f"shard missing: {url}")
    # workersplitter/nodesplitter None: this one shard is read whole wherever it runs (in any loader worker,
    # on any rank of a distributed run); callers deal shards to workers and ids to ranks themselves
    yield from wds.WebDataset(
        str(url),
        shardshuffle=False,
        empty_check=False,
        handler=wds.reraise_exception,
        workersplitter=None,
        nodesplitter=None,
    )


def _remote_samples(plan: ShardPlan) -> Iterator[dict]:
    """A remote tar's samples (``vpr.shared.shardnet``: every header checked before its member is read,
    a deadline and a low-speed limit on the transfer, nothing read past the end of the tar)."""
    assert plan.remote is not None and isinstance(plan.url, str)
    offsets = [end - size for end, size in zip(plan.ends, plan.sizes)]
    with Transfer(plan.url, plan.remote, promised_bytes(plan.ends)) as transfer:
        yield from tar_samples(transfer, plan.keys, offsets, plan.sizes)


def stream_samples(plan: ShardPlan) -> Iterator[tuple[int, bytes, bytes]]:
    """Stream one tar: ``(position in plan, jpg bytes, json bytes)`` per sample.

    Every sample is checked against the index (key order, members, CRC-32) before it is yielded, and
    the shard must hold exactly the samples the index names.
    """
    url, expected = plan.url, plan.keys
    n = 0
    try:
        for sample in _remote_samples(plan) if plan.remote else _local_samples(Path(url)):
            key = sample["__key__"]
            if n >= len(expected) or key != expected[n]:
                raise ShardError(
                    f"shard {url}: unexpected sample {key} (index expects "
                    f"{expected[n] if n < len(expected) else 'end of shard'})"
                )
            members = {k for k in sample if not k.startswith("__")}
            if members - SAMPLE_MEMBERS:  # e.g. .pyd / .pickle: a payload we never decode, let alone unpickle
                extra = ", ".join(f".{m}" for m in sorted(members - SAMPLE_MEMBERS))
                raise ShardError(
                    f"shard {url}: sample {key} has unexpected member(s) {extra}; only .jpg and "
                    ".json are allowed (refused, nothing was decoded)"
                )
            if "jpg" not in sample or "json" not in sample:
                raise ShardError(f"shard {url}: sample {key} is incomplete (truncated or corrupt tar)")
            crc = plan.crcs[n]
            if crc is not None and checksum(sample["jpg"]) != crc:
                raise ShardError(
                    f"shard {url}: sample {key} is corrupt: its jpg data does not match the "
                    f"index checksum (crc32 {checksum(sample['jpg']):08x}, expected {crc:08x})"
                )
            yield n, sample["jpg"], sample["json"]
            n += 1
    except ShardError:
        raise
    except TransferError as exc:
        raise ShardError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - tarfile.ReadError, OSError, JSON errors...
        raise _damage(plan, n, exc) from exc
    if n != len(expected):
        raise ShardError(
            f"shard {url} ends early (truncated or corrupt): {n} of {len(expected)} "
            f"samples read, first missing {expected[n]}"
        )


def decode_sample(plan: ShardPlan, n: int, jpg: bytes) -> Image.Image:
    """A streamed sample's JPEG → RGB image (``ShardError`` naming the sample if it does not decode)."""
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError from a damaged JPEG
        raise ShardError(
            f"shard {plan.url}: sample {plan.keys[n]} is corrupt: its jpg does not decode ({exc})"
        ) from None


def stream_shard(plan: ShardPlan) -> Iterator[tuple[str, Image.Image, dict]]:
    """``(key, RGB image, metadata)`` of every sample of one shard, integrity-checked."""
    for n, jpg, meta in stream_samples(plan):
        yield plan.keys[n], decode_sample(plan, n, jpg), json.loads(meta)


def iter_split(shards_dir: str | Path, split: str, role: str) -> Iterator[tuple[str, Image.Image, dict]]:
    """Stream ``(key, RGB image, metadata)`` of one split/role in id order (descriptor extraction)."""
    for plan in split_shards(shards_dir, split, role):
        yield from stream_shard(plan)


# --------------------------------------------------------------------------- which shards a step encodes


def shards_of(rows: pl.DataFrame) -> list[str]:
    """Names of the shards holding the images of shard-index ``rows``, in name order."""
    return sorted(rows["shard"].unique().to_list())


def release_images(index: pl.DataFrame, splits: Sequence[str] | None) -> pl.DataFrame:
    """The shard-index rows a release indexes: database images (of ``splits``; None = all), by id."""
    rows = index.filter(pl.col("role") == "database")
    if splits is not None:
        rows = rows.filter(pl.col("split").is_in(list(splits)))
    return rows.sort("id")


def evaluation_shards(layout: Layout) -> list[str]:
    """The shards ``vpr.steps.evaluate.evaluate_head`` encodes (the test split's): what a flow maps its
    encode tasks over."""
    return shards_of(ShardReader(layout.shards_dir, ("test",)).index)


def release_shards(cfg: Config, layout: Layout) -> list[str]:
    """The shards ``vpr.steps.index.build_release`` encodes: what a flow maps its encode tasks over."""
    splits = cfg.index.splits
    return shards_of(release_images(ShardReader(layout.shards_dir, splits).index, splits))
