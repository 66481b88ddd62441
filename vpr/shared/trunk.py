"""The frozen-trunk cache: the early layers' output for every training image, computed once per run.

With ``model.freeze_early_layers`` the layers before ``layer3`` are a fixed function of the image
(no gradient, BatchNorm in eval mode), yet they cost about 70 % of a forward pass. Encoding each
train/val image once makes mining refreshes and training steps run ``layer3`` + head only, and
gives a resumed run exactly the features of an uninterrupted one.

Every head of a run starts from the same trunk (``build_model`` draws the backbone from the seed
alone; CRN copies NetVLAD's, whose frozen layers never change), so the cache is content-addressed
and kept on disk: its key hashes the trunk's weights, the exact bytes of every image (shard, offset,
size, CRC) and the input size. The first head of a run builds it; the others, and a resumed or
repeated run, load it (memory-mapped). It is stored in bfloat16: half the memory and disk of
float32, rounding the training input to 8 bits of mantissa (measured effect: README). The file carries
the CRC-32 of its maps, checked on every load: a damaged file (overwritten bytes would train on garbage)
is rebuilt with a warning naming it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import torch
from filelock import FileLock, Timeout

from vpr.foundations.atomic import atomic_path
from vpr.shared.descriptors import autocast, image_batches
from vpr.shared.models import VPRModel
from vpr.shared.shardio import ShardReader

logger = logging.getLogger(__name__)

STORAGE = torch.bfloat16
KEEP = 2  # cache files kept in the folder (the newest); older ones are removed after a build
FORMAT = 2  # bump when the file layout or the encoding changes (2: the maps' CRC-32 is stored)


class TrunkCache:
    """Trunk maps of ``ids`` (sorted, unique), looked up by image id; float32 on the way out."""

    def __init__(self, model: VPRModel, ids: np.ndarray, features: torch.Tensor, bf16: bool = False) -> None:
        self.model, self.ids, self.features, self.bf16 = model, ids, features, bf16

    @staticmethod
    def estimate_bytes(n_images: int, height: int, width: int) -> int:
        """Memory of the cache: 128 channels at stride 8, bfloat16."""
        return n_images * 128 * math.ceil(height / 8) * math.ceil(width / 8) * STORAGE.itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def get(self, ids: np.ndarray) -> torch.Tensor:
        flat = np.asarray(ids).ravel()
        rows = np.searchsorted(self.ids, flat)
        if np.any(rows >= len(self.ids)) or np.any(self.ids[np.minimum(rows, len(self.ids) - 1)] != flat):
            raise KeyError("image id not in the trunk cache")
        return self.features[torch.from_numpy(rows)].float()

    @torch.inference_mode()
    def descriptors(self, ids: np.ndarray, batch_size: int) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        device = self.features.device
        out = []
        for i in range(0, len(ids), batch_size):
            with autocast(device, self.bf16):
                out.append(self.model.forward_from_trunk(self.get(ids[i : i + batch_size])).float().cpu().numpy())
        self.model.train(was_training)
        return np.concatenate(out) if out else np.empty((0, self.model.descriptor_dim), np.float32)


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


def _encode(model: VPRModel, reader: ShardReader, ids: np.ndarray, transform, device, batch_size: int) -> torch.Tensor:
    """Trunk maps of ``ids`` in id order, computed in float32 (the same bits on any CPU), stored bf16."""
    features: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for positions, batch in image_batches(reader, ids, transform, device=device, batch_size=batch_size):
            out = model.backbone.trunk(batch).to(STORAGE)
            if features is None:
                features = torch.empty((len(ids), *out.shape[1:]), dtype=STORAGE, device=out.device)
            features[torch.from_numpy(positions).to(out.device)] = out
    model.train(was_training)
    if features is None:
        raise ValueError("no images to cache")
    return features


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
    """The cache for ``ids``: loaded from ``folder`` when built before, else built (and stored there).

    One builder at a time per key (a file lock): a second head started meanwhile waits and loads.
    ``folder`` None keeps it in memory only.
    """
    ids = np.unique(ids)
    if folder is None:
        return TrunkCache(model, ids, _encode(model, reader, ids, transform, device, batch_size), bf16)
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(model, reader, ids, size)
    path = folder / f"{key}.pt"
    with FileLock(folder / f".{key}.lock"):
        features = _load(path, ids) if path.exists() else None
        if features is not None:
            logger.info("trunk cache: %d images loaded from %s", len(ids), path)
            return TrunkCache(model, ids, features.to(device), bf16)
        features = _encode(model, reader, ids, transform, device, batch_size)
        with atomic_path(path) as tmp:
            stored = {"ids": torch.from_numpy(ids), "features": features.cpu()}
            torch.save({**stored, "crc32": torch.tensor(crc32_of(stored["features"]))}, tmp)
        logger.info("trunk cache: %d images encoded → %s", len(ids), path)
    _prune(folder, keep=path)
    return TrunkCache(model, ids, features, bf16)


def _load(path: Path, ids: np.ndarray) -> torch.Tensor | None:
    """The stored maps (memory-mapped), or None after a warning when the file is unusable."""
    try:
        stored = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        features, stored_ids = stored["features"], stored["ids"]
        ok = torch.equal(stored_ids, torch.from_numpy(ids)) and features.dtype == STORAGE
        if not ok or len(features) != len(ids):
            problem = "other images"
        elif "crc32" not in stored or int(stored["crc32"]) != crc32_of(features):
            problem = "its maps' CRC-32 does not match: damaged"
        else:
            return features
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it is rebuilt
        problem = str(exc)
    logger.warning("trunk cache %s unusable (%s): building it again", path, problem)
    return None


def crc32_of(features: torch.Tensor, chunk_rows: int = 256) -> int:
    """CRC-32 of the maps' bytes, read in bounded pieces (a mapped file is not loaded whole)."""
    crc = 0
    flat = features.reshape(len(features), -1)
    for start in range(0, len(flat), chunk_rows):
        crc = zlib.crc32(flat[start : start + chunk_rows].contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _prune(folder: Path, keep: Path) -> None:
    """Remove all but the newest ``KEEP`` cache files (one being read stays readable: it is mapped),
    with their lock files, so neither piles up."""
    files = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in files if p != keep][KEEP - 1 :]:
        old.unlink(missing_ok=True)
    kept = {p.stem for p in folder.glob("*.pt")}
    for lock in folder.glob(".*.lock"):
        if lock.name[1 : -len(".lock")] in kept:
            continue
        try:
            with FileLock(lock, timeout=0):  # held: a build of that key is at work, its lock stays
                lock.unlink(missing_ok=True)
        except Timeout:
            pass
