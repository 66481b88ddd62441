"""Descriptors kept on disk, one file per (model, shard): encoded once, read back in bounded pieces.

Evaluation, indexing and re-indexing never hold a whole database's descriptors in one array: each
shard's descriptors go to their own ``.npy`` (float32 or float16) under ``artifacts/descriptors/``,
named by a content address — the model's weights, the transform, the batch size, device and
precision, the storage dtype, and the shard's samples (keys and CRC-32s from the shard index). So:

- an unchanged shard is never encoded twice, whoever asks (evaluate, index, a Prefect task on a Dask
  worker), and a changed model or shard gets a new file instead of a stale one;
- the per-shard encodes are independent, so they run as a map over shards on any task runner;
- readers open one shard file at a time (``DescriptorSet.chunks``), so memory follows the chunk size
  (``resources.memory_gb``), not the database size.

Batches never span two shards (``vpr.shared.descriptors.ShardStream``), so the bits of a shard's descriptors
are the same whether it is encoded alone or as part of a whole split. Files are written atomically; a
sidecar ``.json`` keeps the encode time per image so ``ms_per_image`` survives a cache hit, and the
entry's size and SHA-256: an entry is checked before it is used (once per process and file version), and
a damaged one (truncated, overwritten) is set aside with a warning naming it and encoded again, never
indexed. The folder is a cache: deleting it costs re-encoding, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from vpr.foundations.atomic import atomic_path, write_text_atomic
from vpr.foundations.config import Config
from vpr.foundations.digest import file_record, file_sha256
from vpr.foundations.layout import Layout
from vpr.shared.checkpoints import load_model, untrained_model
from vpr.shared.descriptors import autocast, eval_transform, image_batches, resolve_device
from vpr.shared.shardio import ShardError, ShardPlan, ShardReader, shard_plans
from vpr.shared.shardnet import RemoteShards, remote_shards

log = logging.getLogger(__name__)

STORE_FORMAT = 1  # bump when the encoding changes in a way the key does not capture
DTYPES = {"float32": np.float32, "float16": np.float16}
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of entries whose hash matched here


class DamagedEntry(ValueError):
    """A store entry whose bytes are not the ones its sidecar recorded (the message names the file)."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes): the same weights, the same key."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def plan_fingerprint(plan: ShardPlan) -> str:
    """What a shard holds, from its index rows: each image's bytes (CRC-32, end offset) in tar order.
    Not ids or sample keys: the descriptors are a function of the images alone."""
    h = hashlib.sha256()
    for crc, end in zip(plan.crcs, plan.ends):
        h.update(f"{crc}|{end};".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Encoder:
    """A model and everything else that decides the bits of its descriptors."""

    model: torch.nn.Module
    transform: Callable
    transform_spec: str  # e.g. "120x160@1.0": the transform as text, for the key
    device: torch.device
    batch_size: int = 32
    dtype: str = "float32"
    fingerprint: str = ""

    @classmethod
    def of(cls, model, transform, transform_spec: str, device, batch_size: int = 32, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"descriptor dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return cls(model, transform, transform_spec, device, batch_size, dtype, model_fingerprint(model))

    def key(self, plan: ShardPlan) -> str:
        bf16 = self.device.type == "cuda"  # autocast(device): bf16 on CUDA only
        parts = [
            f"format={STORE_FORMAT}",
            f"model={self.fingerprint}",
            f"transform={self.transform_spec}",
            f"batch={self.batch_size}",
            f"device={self.device.type}",
            f"bf16={bf16}",
            f"dtype={self.dtype}",
            f"shard={plan_fingerprint(plan)}",
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class DescriptorStore:
    """A folder of content-addressed descriptor files: ``{key[:2]}/{key}.npy`` (+ ``.json`` sidecar)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def info(self, key: str) -> dict | None:
        """The sidecar of a complete, intact entry (written last), or None when the entry is absent.

        A damaged entry (its bytes do not match the sidecar's size and SHA-256, or an unreadable
        sidecar) is moved aside with a warning naming it, and counts as absent: it is encoded again.
        """
        side = self.path(key).with_suffix(".json")
        if not side.is_file() or not self.path(key).is_file():
            return None
        try:
            info = json.loads(side.read_text())
            self.verify(key, info)
        except (DamagedEntry, ValueError, KeyError, TypeError) as exc:
            log.warning("descriptor store: %s; encoding it again", exc)
            self._set_aside(key)
            return None
        return info

    def verify(self, key: str, info: dict) -> None:
        """Raise ``DamagedEntry`` unless the entry's bytes are the ones its sidecar recorded."""
        path = self.path(key)
        stat = path.stat()
        seen = (str(path), stat.st_size, stat.st_mtime_ns)
        if seen in _VERIFIED:
            return
        if "sha256" not in info or stat.st_size != info.get("bytes"):
            raise DamagedEntry(f"{path}: {stat.st_size} bytes, its sidecar recorded {info.get('bytes')}")
        if file_sha256(path) != info["sha256"]:
            raise DamagedEntry(f"{path}: its SHA-256 is not the one its sidecar recorded (overwritten?)")
        _VERIFIED.add(seen)

    def _set_aside(self, key: str) -> None:
        """Rename a damaged entry to ``*.damaged`` (kept for inspection; the next save replaces the entry)."""
        for part in (self.path(key).with_suffix(".json"), self.path(key)):
            if part.is_file():
                part.replace(part.with_name(part.name + ".damaged"))

    def save(self, key: str, descriptors: np.ndarray, info: dict) -> Path:
        """Write descriptors then their sidecar (with the file's size and SHA-256), each atomically: an
        entry counts once its sidecar exists."""
        target = self.path(key)
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, descriptors, allow_pickle=False)
            info = {**info, **file_record(tmp)}
        write_text_atomic(target.with_suffix(".json"), json.dumps(info, sort_keys=True) + "\n")
        stat = target.stat()
        _VERIFIED.add((str(target), stat.st_size, stat.st_mtime_ns))
        return target

    def load(self, key: str, rows: int, dim: int | None = None) -> np.ndarray:
        """A memory-mapped entry, checked to hold ``rows`` descriptors (of ``dim`` when given)."""
        path = self.path(key)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DamagedEntry(f"descriptor file {path} cannot be read: {exc}") from None
        if array.ndim != 2 or array.shape[0] != rows or (dim is not None and array.shape[1] != dim):
            raise DamagedEntry(f"descriptor file {path} holds {array.shape}, expected {rows} rows")
        return array


@dataclass(frozen=True)
class ShardDescriptors:
    """Where one shard's descriptors are: the shard's image ids (in file order) and the entry's key."""

    shard: str
    ids: np.ndarray
    key: str
    encoded: bool  # False: found in the store (nothing was computed)
    seconds: float  # encode time after the first batch (warm-up excluded)
    timed_images: int


def encode_shard(encoder: Encoder, plan: ShardPlan, store: DescriptorStore) -> ShardDescriptors:
    """Every sample of one shard → one store entry (skipped when the entry exists already)."""
    key = encoder.key(plan)
    ids = np.asarray(plan.ids, dtype=np.int64)
    info = store.info(key)
    if info is not None:
        return ShardDescriptors(str(plan.url), ids, key, False, info["seconds"], info["timed_images"])
    out, info = encode_plan(encoder, plan)
    store.save(key, out, info)
    log.debug("encoded %s: %d images", plan.url, len(ids))
    return ShardDescriptors(str(plan.url), ids, key, True, info["seconds"], info["timed_images"])


@torch.inference_mode()
def encode_plan(encoder: Encoder, plan: ShardPlan) -> tuple[np.ndarray, dict]:
    """One shard's descriptors (rows in the plan's order) and the sidecar facts of its store entry;
    nothing is written (``encode_shard`` stores them; a detached worker sends them back)."""
    ids = np.asarray(plan.ids, dtype=np.int64)
    model = encoder.model
    was_training = model.training
    model.eval()
    out = np.empty((len(ids), model.descriptor_dim), dtype=DTYPES[encoder.dtype])
    timed, start, t0 = 0, time.perf_counter(), None
    for positions, batch in image_batches(
        [plan], ids, encoder.transform, device=encoder.device, batch_size=encoder.batch_size
    ):
        with autocast(encoder.device):
            out[positions] = encoder.model(batch).float().cpu().numpy()
        if t0 is None:  # the first batch warms up (allocations, kernels): not timed
            t0 = time.perf_counter()
        else:
            timed += len(positions)
    end = time.perf_counter()
    if timed == 0:  # one batch only: its time, warm-up included, is all there is
        seconds, timed = end - start, len(ids)
    else:
        seconds = end - t0
    model.train(was_training)
    return out, {"shard": str(plan.url), "rows": len(ids), "seconds": seconds, "timed_images": timed}


class DescriptorSet:
    """Descriptors of many shards, read one shard file at a time (never all at once)."""

    def __init__(self, store: DescriptorStore, parts: Sequence[ShardDescriptors], dim: int) -> None:
        self.store, self.parts, self.dim = store, list(parts), dim
        self.ids = np.concatenate([p.ids for p in self.parts]) if self.parts else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def encoded(self) -> int:
        """How many shards were encoded (not found in the store) to build this set."""
        return sum(p.encoded for p in self.parts)

    def part(self, n: int) -> np.ndarray:
        p = self.parts[n]
        return self.store.load(p.key, len(p.ids), self.dim)

    def chunks(self, max_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 block)`` over the whole set, each block at most ``max_rows`` rows."""
        start = 0
        for n in range(len(self.parts)):
            array = self.part(n)
            for s in range(0, len(array), max(1, max_rows)):
                yield start + s, np.ascontiguousarray(array[s : s + max_rows], dtype=np.float32)
            start += len(array)
            del array  # unmapped: its pages leave this process's memory

    def gather(self, ids: Sequence[int]) -> np.ndarray:
        """float32 descriptors of ``ids`` (in that order), reading only the shards that hold them."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        pos = np.searchsorted(self.ids[order], ids)
        if len(ids) and (pos.max() >= len(self.ids) or not np.array_equal(self.ids[order[pos]], ids)):
            raise KeyError("some ids are not in this descriptor set")
        rows = order[pos]
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        bounds = np.cumsum([0] + [len(p.ids) for p in self.parts])
        for n in range(len(self.parts)):
            mine = np.flatnonzero((rows >= bounds[n]) & (rows < bounds[n + 1]))
            if len(mine):
                out[mine] = self.part(n)[rows[mine] - bounds[n]]
        return out


def ms_per_image(*sets: DescriptorSet) -> float | None:
    """Encode time per image over descriptor sets (each shard's warm-up batch excluded)."""
    timed = sum(p.timed_images for s in sets for p in s.parts)
    return 1000.0 * sum(p.seconds for s in sets for p in s.parts) / timed if timed else None


def encoder_for(model: torch.nn.Module, cfg: Config, device: torch.device) -> Encoder:
    """The encoder of every stored descriptor: shard size × ``train.image_scale``, ``evaluate.batch_size``."""
    spec = f"{cfg.shards.height}x{cfg.shards.width}@{cfg.train.image_scale}"
    transform = eval_transform(cfg.shards, cfg.train.image_scale)
    return Encoder.of(model, transform, spec, device, cfg.evaluate.batch_size, cfg.evaluate.descriptor_dtype)


def encode_plans(encoder: Encoder, plans: Sequence[ShardPlan], store: DescriptorStore) -> DescriptorSet:
    """Each shard's entry, encoded here where missing (the serial path; flows map ``encode_shard``)."""
    parts = [encode_shard(encoder, plan, store) for plan in plans]
    return DescriptorSet(store, parts, encoder.model.descriptor_dim)


def plans_for(reader: ShardReader, ids: Sequence[int], url: RemoteShards | str | None = None) -> list[ShardPlan]:
    """The shards holding ``ids`` (whole shards: every sample of each is encoded), streamed from the
    local shard folder or, with ``url`` (``remote_shards(resources)``), from that remote source."""
    wanted = np.unique(np.asarray(ids, dtype=np.int64))
    rows = reader.index.filter(pl.col("id").is_in(wanted.tolist()))
    if rows.height != len(wanted):
        missing = sorted(set(wanted.tolist()) - set(rows["id"].to_list()))
        raise ShardError(f"image id(s) not in the shard index of {reader.shards_dir}: {missing[:5]}")
    holding = set(rows["shard"].unique().to_list())
    if url is None:
        local = {reader.shards_dir / name for name in holding}
        return [p for p in reader.plans() if p.url in local]
    return shard_plans(reader.index.filter(pl.col("shard").is_in(list(holding))), url)


def head_model(head: str, cfg: Config, layout: Layout, device: torch.device, *, untrained: bool = False):
    """The model a stage encodes with: ``head``'s trained checkpoint, or the untrained baseline."""
    if untrained:
        return untrained_model(head, cfg.model, cfg.train.seed, device)
    return load_model(layout.checkpoint(head), device)[0]


def encode_named_shards(
    head: str, cfg: Config, layout: Layout, shards: Sequence[str], *, untrained: bool = False
) -> list[ShardDescriptors]:
    """Encode the shards named ``shards`` (relative to the shard root, e.g. ``test/test-database-000000.tar``)
    with ``head``'s model into the store: what one Prefect task runs, on any worker."""
    device = resolve_device(cfg.train.device)
    encoder = encoder_for(head_model(head, cfg, layout, device, untrained=untrained), cfg, device)
    reader = ShardReader(layout.shards_dir)
    rows = reader.index.filter(pl.col("shard").is_in(list(shards)))
    unknown = sorted(set(shards) - set(rows["shard"].unique().to_list()))
    if unknown:
        raise ShardError(f"no shard {unknown[0]} in the shard index of {layout.shards_dir}")
    plans = shard_plans(rows, remote_shards(cfg.resources) or layout.shards_dir)
    store = DescriptorStore(layout.descriptors_dir)
    return [encode_shard(encoder, plan, store) for plan in plans]
