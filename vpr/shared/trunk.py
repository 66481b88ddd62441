"""The frozen-trunk cache: the early layers' output of the training images, each computed once, when first needed.

With ``model.freeze_early_layers`` the layers before ``layer3`` are a fixed function of the image
(no gradient, BatchNorm in eval mode), yet they cost about 70 % of a forward pass. Caching each image's
maps makes mining refreshes, training steps and validation run ``layer3`` + head only, and gives a
resumed run exactly the features of an uninterrupted one.

Nothing is encoded up front: an image's maps are computed the first time a refresh, a step or the
validation asks for them, so a short run pays only for the images it touches (one epoch of the demo
touches about a third of the train/val images) and the cache never makes a run slower than running
without it. Every forward has the same batch size, so an image's bits do not depend on which images
were asked for with it, nor on the order in which heads or ranks asked.

Every head of a run starts from the same trunk (``build_model`` draws the backbone from the seed
alone; CRN copies NetVLAD's, whose frozen layers never change), so the cache is content-addressed
and kept on disk: its key hashes the trunk's weights, the exact bytes of every image (shard, offset,
size, CRC) and the input size. Under ``artifacts/trunk-cache/<key>/`` each batch of newly encoded
images is one immutable segment, written atomically with the CRC-32 of its maps; the heads (threads,
processes or torchrun ranks) read each other's segments memory-mapped, and encode under the key's file
lock, so two heads never encode the same image. A damaged segment is set aside with a warning naming it
and its images are encoded again; past ``MAX_SEGMENTS`` segments the smallest are merged. Maps are
stored in bfloat16: half the memory and disk of float32, rounding the training input to 8 bits of
mantissa (measured effect: README).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import torch
from filelock import FileLock, Timeout

from vpr.foundations.atomic import atomic_path
from vpr.shared.descriptors import autocast, stack_images
from vpr.shared.models import VPRModel
from vpr.shared.shardio import ShardReader

logger = logging.getLogger(__name__)

STORAGE = torch.bfloat16
KEEP = 2  # cache folders kept (the newest); older ones are removed when a cache is opened
MAX_SEGMENTS = 16  # more segments than this in a cache folder: the smallest are merged
MERGE_BYTES = 512 * 2**20  # at most this much is merged at once (read into memory)
FORMAT = 3  # bump when the file layout or the encoding changes (3: segments, encoded on first use)
LOCK = ".lock"


class TrunkCache:
    """Trunk maps of ``ids`` (sorted, unique), looked up by image id, encoded on first use; float32 out.

    ``folder`` None keeps the maps in memory only (one process).
    """

    def __init__(
        self,
        model: VPRModel,
        reader: ShardReader,
        ids: np.ndarray,
        transform,
        device: torch.device,
        *,
        batch_size: int,
        folder: Path | None = None,
        bf16: bool = False,
    ) -> None:
        self.model, self.reader, self.ids, self.transform = model, reader, np.unique(ids), transform
        self.device, self.batch_size, self.folder, self.bf16 = device, batch_size, folder, bf16
        self.segments: list[torch.Tensor] = []  # maps, bfloat16 on the CPU (memory-mapped when on disk)
        self.files: list[Path | None] = []  # each segment's file (None: in memory)
        self.segment_of = np.full(len(self.ids), -1, dtype=np.int64)  # per id: its segment, -1 not yet
        self.row_of = np.zeros(len(self.ids), dtype=np.int64)  # per id: its row in that segment
        self.seen: set[str] = set()  # segment files adopted (or set aside) by this process
        self.encoded = 0  # images this process encoded
        self.encode_seconds = 0.0  # and the time it took (train.py books it as the "trunk cache" phase)
        if folder is not None:
            with self._lock():
                self._adopt_segments()

    @staticmethod
    def estimate_bytes(n_images: int, height: int, width: int) -> int:
        """Memory of the cache when every image is cached: 128 channels at stride 8, bfloat16."""
        return n_images * 128 * math.ceil(height / 8) * math.ceil(width / 8) * STORAGE.itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        if not self.segments:
            raise RuntimeError("no maps cached yet: the shape is known after the first get()")
        return tuple(self.segments[-1].shape[1:])

    @property
    def cached(self) -> int:
        """Images whose maps are cached (by any process sharing the folder, as far as this one has read)."""
        return int(np.count_nonzero(self.segment_of >= 0))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        flat = np.asarray(ids).ravel()
        rows = np.searchsorted(self.ids, flat)
        if np.any(rows >= len(self.ids)) or np.any(self.ids[np.minimum(rows, len(self.ids) - 1)] != flat):
            raise KeyError("image id not in the trunk cache")
        return rows

    def ensure(self, ids: np.ndarray) -> None:
        """Encode the maps of ``ids`` not cached yet (one segment), reading other processes' first."""
        self._ensure_rows(np.unique(self.rows(ids)))

    def _ensure_rows(self, rows: np.ndarray) -> None:
        if np.all(self.segment_of[rows] >= 0):
            return
        if self.folder is None:
            self._add(rows, self._encode(rows))
            return
        with self._lock():
            self._adopt_segments()
            missing = rows[self.segment_of[rows] < 0]
            if len(missing):
                features = self._encode(missing)
                path = self._write_segment(missing, features)
                self._adopt(path, missing)
                if len(self._segment_files()) > MAX_SEGMENTS:
                    self._merge_smallest()

    def get(self, ids: np.ndarray) -> torch.Tensor:
        """The maps of ``ids`` (any shape of ids: rows in ``ravel`` order), float32 on the cache's device."""
        rows = self.rows(ids)
        self._ensure_rows(np.unique(rows))
        return self._gather(rows).to(self.device).float()

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        """The stored (bfloat16, CPU) maps of cached ``rows``."""
        out = torch.empty((len(rows), *self.shape), dtype=STORAGE)
        segment = self.segment_of[rows]
        for s in np.unique(segment):
            at = np.flatnonzero(segment == s)
            out[torch.from_numpy(at)] = self.segments[s][torch.from_numpy(self.row_of[rows[at]])]
        return out

    @torch.inference_mode()
    def descriptors(self, ids: np.ndarray, batch_size: int) -> np.ndarray:
        self.ensure(ids)
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(ids), batch_size):
            with autocast(self.device, self.bf16):
                out.append(self.model.forward_from_trunk(self.get(ids[i : i + batch_size])).float().cpu().numpy())
        self.model.train(was_training)
        return np.concatenate(out) if out else np.empty((0, self.model.descriptor_dim), np.float32)

    # ------------------------------------------------------------------ encoding and segments

    def _encode(self, rows: np.ndarray) -> torch.Tensor:
        """Trunk maps of the images at ``rows`` in row order, computed in float32, stored bf16.

        Images are read by random access (a refresh asks for a scattered few: streaming whole shards would
        parse every tar header to decode a tenth of them). Every forward has exactly ``batch_size`` images
        (the last padded by repeating one): oneDNN picks its kernels by batch size, and at small inputs a
        batch of one differs from larger ones in the last bits (measured here), so this keeps an image's
        maps independent of which images were asked for with it.
        """
        t0 = time.perf_counter()
        ids = self.ids[rows]
        features: torch.Tensor | None = None
        model, size = self.model, self.batch_size
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(ids), size):
                part = ids[start : start + size]
                batch = stack_images([self.transform(self.reader.load(int(i))) for i in part])
                batch = torch.cat([batch, batch[-1:].expand(size - len(part), *batch.shape[1:])])
                out = model.backbone.trunk(batch.to(self.device))[: len(part)].to(STORAGE).cpu()
                if features is None:
                    features = torch.empty((len(ids), *out.shape[1:]), dtype=STORAGE)
                features[start : start + len(part)] = out
        model.train(was_training)
        if features is None:
            raise ValueError("no images to cache")
        self.encoded += len(ids)
        self.encode_seconds += time.perf_counter() - t0
        return features

    def _add(self, rows: np.ndarray, features: torch.Tensor, path: Path | None = None) -> None:
        """Take a segment's rows not cached yet (a merged segment repeats rows this process has)."""
        new = self.segment_of[rows] < 0
        self.segments.append(features)
        self.files.append(path)
        self.segment_of[rows[new]] = len(self.segments) - 1
        self.row_of[rows[new]] = np.flatnonzero(new)

    def _lock(self) -> FileLock:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(self.folder / LOCK)

    def _segment_files(self) -> list[Path]:
        assert self.folder is not None
        return sorted(self.folder.glob("seg-*.pt"))

    def _write_segment(self, rows: np.ndarray, features: torch.Tensor, number: int | None = None) -> Path:
        assert self.folder is not None
        files = self._segment_files()
        if number is None:
            number = int(files[-1].stem[4:]) + 1 if files else 1
        path = self.folder / f"seg-{number:06d}.pt"
        with atomic_path(path) as tmp:
            stored = {"ids": torch.from_numpy(self.ids[rows]), "features": features}
            torch.save({**stored, "crc32": torch.tensor(crc32_of(features))}, tmp)
        return path

    def _adopt_segments(self) -> None:
        """Read the segments other processes wrote since the last look (checked: a damaged one is set aside)."""
        for path in self._segment_files():
            if path.name in self.seen:
                continue
            self.seen.add(path.name)
            loaded = _load_segment(path)
            if loaded is None:
                continue
            ids, features = loaded
            rows = np.searchsorted(self.ids, ids)
            if np.any(rows >= len(self.ids)) or np.any(self.ids[np.minimum(rows, len(self.ids) - 1)] != ids):
                _set_aside(path, "other images")
                continue
            self._add(rows, features, path)

    def _adopt(self, path: Path, rows: np.ndarray) -> None:
        """Take the segment this process just wrote, memory-mapped (page cache, not process memory)."""
        self.seen.add(path.name)
        self._add(rows, torch.load(path, mmap=True, weights_only=True)["features"], path)

    def _merge_smallest(self) -> None:
        """The smallest segments, up to ``MERGE_BYTES`` together, as one (written first, then the old ones
        removed: other readers keep their mappings). Bounds the number of files and the memory a merge takes."""
        on_disk = [(s, f) for s, f in enumerate(self.files) if f is not None and f.exists()]
        on_disk.sort(key=lambda sf: self.segments[sf[0]].nbytes)
        chosen, total = [], 0
        for s, f in on_disk:
            if total + self.segments[s].nbytes > MERGE_BYTES and len(chosen) >= 2:
                break
            chosen.append((s, f))
            total += self.segments[s].nbytes
        if len(chosen) < 2:
            return
        rows = np.flatnonzero(np.isin(self.segment_of, [s for s, _ in chosen]))
        number = int(self._segment_files()[-1].stem[4:]) + 1
        path = self._write_segment(rows, self._gather(rows), number=number)
        for s, f in chosen:
            f.unlink(missing_ok=True)
            self.segments[s], self.files[s] = self.segments[s][:0], None  # unmapped once unreferenced
        self.segment_of[rows] = -1
        self._adopt(path, rows)
        logger.info("trunk cache: %d segments merged into %s", len(chosen), path)


def _load_segment(path: Path) -> tuple[np.ndarray, torch.Tensor] | None:
    """A segment's ids and maps (memory-mapped), or None after a warning when it is unusable."""
    try:
        stored = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        features, ids = stored["features"], stored["ids"].numpy()
        if features.dtype != STORAGE or len(features) != len(ids):
            problem = "not a trunk cache segment"
        elif "crc32" not in stored or int(stored["crc32"]) != crc32_of(features):
            problem = "its maps' CRC-32 does not match: damaged"
        else:
            return ids, features
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, its images are encoded again
        problem = str(exc)
    _set_aside(path, problem)
    return None


def _set_aside(path: Path, problem: str) -> None:
    logger.warning("trunk cache %s unusable (%s): its images are encoded again", path, problem)
    path.replace(path.with_name(path.name + ".damaged"))


def crc32_of(features: torch.Tensor, chunk_rows: int = 256) -> int:
    """CRC-32 of the maps' bytes, read in bounded pieces (a mapped file is not loaded whole)."""
    crc = 0
    flat = features.reshape(len(features), -1)
    for start in range(0, len(flat), chunk_rows):
        crc = zlib.crc32(flat[start : start + chunk_rows].contiguous().view(torch.uint8).numpy(), crc)
    return crc


def cache_key(model: VPRModel, reader: ShardReader, ids: np.ndarray, size: tuple[int, int]) -> str:
    """Hash of what the cached maps are a function of: trunk weights, image bytes, input size."""
    digest = hashlib.sha256(f"format {FORMAT} size {size} storage {STORAGE}".encode())
    for name, tensor in sorted(model.backbone.trunk_state().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    rows = reader.index.filter(pl.col("id").is_in(ids.tolist())).sort("id")
    if len(rows) != len(ids):
        raise KeyError("image id not in the shards")
    for column in ("id", "offset", "size", "crc32"):
        digest.update(rows[column].to_numpy().astype("<i8").tobytes())
    digest.update("\n".join(rows["shard"].to_list()).encode())
    return digest.hexdigest()[:32]


def open_trunk_cache(
    model: VPRModel,
    reader: ShardReader,
    ids: np.ndarray,
    transform,
    device: torch.device,
    *,
    size: tuple[int, int],
    batch_size: int,
    folder: Path | None,
    bf16: bool = False,
) -> TrunkCache:
    """The cache for ``ids``, in ``folder/<key>/`` (what other heads cached there is used); ``folder`` None
    keeps it in memory only. Nothing is encoded here: images are encoded when first asked for."""
    ids = np.unique(ids)
    if folder is None:
        return TrunkCache(model, reader, ids, transform, device, batch_size=batch_size, bf16=bf16)
    key = cache_key(model, reader, ids, size)
    own = folder / key
    own.mkdir(parents=True, exist_ok=True)
    os.utime(own)  # the newest is kept by _prune
    cache = TrunkCache(model, reader, ids, transform, device, batch_size=batch_size, folder=own, bf16=bf16)
    logger.debug("trunk cache %s: %d of %d images cached", own, cache.cached, len(ids))
    _prune(folder, keep=own)
    return cache


def _prune(folder: Path, keep: Path) -> None:
    """Remove all but the newest ``KEEP`` cache folders, and files of earlier formats; a folder whose lock
    is held (a run encoding into it) stays. Mapped segments of a removed folder stay readable."""
    for old in folder.glob("*.pt"):  # format 2: one file per key
        old.unlink(missing_ok=True)
    for lock in folder.glob(".*.lock"):  # and its lock, unless a run of that format holds it
        try:
            with FileLock(lock, timeout=0):
                lock.unlink(missing_ok=True)
        except Timeout:
            pass
    caches = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in caches if p != keep][KEEP - 1 :]:
        try:
            with FileLock(old / LOCK, timeout=0):
                shutil.rmtree(old, ignore_errors=True)
        except Timeout:
            pass
