"""Releases: the FAISS index of the database, its id → metadata table and the model, served together.

A release is what ``vpr locate`` answers from and what re-indexing extends. On disk::

    artifacts/release/{head}/
        CURRENT                 one line: the name of the live version (switched atomically)
        v000001/                an immutable, complete version
            index.faiss         faiss.IndexIDMap2 over the chosen index; ids = shard image ids (int64)
            ids.parquet         id, path, split, role, utm_east, utm_north, lat, lon
            model.pt            the checkpoint the descriptors were computed with
            release.json        manifest: head, version, count, dim, index kind, image size, parent...
        v000002/ ...

Writers build a new version in a hidden temporary folder beside the others, rename it to its final
name (atomic on one file system), then replace ``CURRENT`` atomically. A crash at any point leaves the
previous ``CURRENT`` and its complete version serving; a half-written folder is never named by
``CURRENT`` and is removed by the next writer. Writers hold an exclusive lock
(``artifacts/release/.{head}.lock``), so concurrent writers queue; readers take no lock. After a
switch, only the live and the previous version are kept (a reader that loaded the previous one a
moment ago still finds its files; ``load_release`` retries if its version vanishes mid-load).

Which images: every database image (role ``database``) of the shard index, of all splits by default
(``index.splits`` narrows it). Evaluation uses the test split alone, but a release exists to answer
"where was this taken?", so it searches every geo-tagged database image we have; images that
re-indexing appends to the shards are database images too, so a full rebuild keeps them.

Public API (for ``vpr locate`` and the scheduled re-index flow):

- ``build_release(head, cfg, layout) -> Path``: extract and index the database from scratch.
- ``load_release(release_dir) -> Release``: the live version (model, index, ids table, manifest).
- ``Release.encode(reader, ids)`` / ``Release.encode_images(images)``: descriptors computed exactly
  as the release's own (same model, size, scale).
- ``Release.search(descriptors, k)``: (L2 distances, ids), each Q×k (id −1 where fewer than k).
- ``add_to_release(release, new_ids, descriptors, metadata) -> Path``: a new version with the new
  vectors appended under their ids, switched in atomically; ids already present are skipped, so a
  retried run adds each image exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch
from filelock import FileLock
from PIL import Image

from vpr.atomic import fsync_dir, write_text_atomic
from vpr.checkpoints import load_model
from vpr.config import Config, IndexConfig
from vpr.descriptors import autocast, eval_transform, extract, image_transform, resolve_device
from vpr.layout import Layout
from vpr.models import VPRModel
from vpr.retrieval import make_index
from vpr.shardio import INDEX_SCHEMA, ShardReader

CURRENT = "CURRENT"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MODEL_FILE = "model.pt"
MANIFEST_FILE = "release.json"
_VERSION = re.compile(r"^v(\d{6})$")

ID_SCHEMA: dict[str, pl.DataType] = {
    k: INDEX_SCHEMA[k] for k in ("id", "path", "split", "role", "utm_east", "utm_north", "lat", "lon")
}


class ReleaseError(Exception):
    """No release, or a release whose files disagree with each other."""


@dataclass
class Release:
    """One loaded release version (everything in memory; its files may be replaced afterwards)."""

    path: Path  # the version folder
    manifest: dict
    model: VPRModel
    index: faiss.Index
    ids: pl.DataFrame  # ID_SCHEMA, one row per indexed vector
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def release_dir(self) -> Path:
        return self.path.parent

    @property
    def version(self) -> str:
        return self.path.name

    @property
    def transform(self):
        img = self.manifest["image"]
        return image_transform(img["height"], img["width"], img["scale"])

    def encode(self, reader: ShardReader, ids: Sequence[int], *, batch_size: int = 32, workers: int = 0) -> np.ndarray:
        """Descriptors (N×dim float32) of shard images ``ids``, computed as the release's own."""
        return extract(
            self.model, reader, ids, self.transform, device=self.device, batch_size=batch_size, workers=workers
        )

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image], *, batch_size: int = 32) -> np.ndarray:
        """Descriptors of RGB images already at the shard size (see ``vpr.locate.prepare_image``)."""
        out = np.empty((len(images), self.model.descriptor_dim), dtype=np.float32)
        tf = self.transform
        for start in range(0, len(images), batch_size):
            batch = torch.stack([tf(im) for im in images[start : start + batch_size]]).to(self.device)
            with autocast(self.device):
                out[start : start + len(batch)] = self.model(batch).float().cpu().numpy()
        return out

    def search(
        self, descriptors: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(L2 distances, image ids), each Q×k; rows are padded with id −1 when fewer images qualify.

        ``allowed``: only these image ids are candidates (FAISS's id selector, inside the search).
        """
        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        if allowed is None:
            sq, ids = self.index.search(x, k)
        else:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            sq, ids = self.index.search(x, k, params=_search_params(self.index, selector))
        return np.sqrt(np.maximum(sq, 0)), ids

    def ids_within(self, lat: float, lon: float, radius_m: float) -> np.ndarray:
        """Ids of the indexed images within ``radius_m`` of (lat, lon) (great-circle distance)."""
        rows = self.ids.filter(pl.col("lat").is_not_nan() & pl.col("lon").is_not_nan())
        if rows.is_empty():
            raise ReleaseError("this release has no latitude/longitude for its images: a GPS prior cannot apply")
        metres = haversine_m(lat, lon, rows["lat"].to_numpy(), rows["lon"].to_numpy())
        return rows["id"].to_numpy()[metres <= radius_m]


def haversine_m(lat: float, lon: float, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
    """Great-circle distances in metres from one point to many (mean Earth radius)."""
    p1, p2 = np.radians(lat), np.radians(lats)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lons - lon) / 2) ** 2
    return 2 * 6_371_008.8 * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def _search_params(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying ``selector`` and the index's own nprobe / efSearch (else reset to defaults)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    return faiss.SearchParameters(sel=selector)


# --------------------------------------------------------------------------- versions on disk


def _versions(release_dir: Path) -> list[str]:
    if not release_dir.is_dir():
        return []
    return sorted(p.name for p in release_dir.iterdir() if p.is_dir() and _VERSION.match(p.name))


def current_version(release_dir: str | Path) -> Path | None:
    """The live version folder, or None when no release was ever switched in."""
    release_dir = Path(release_dir)
    pointer = release_dir / CURRENT
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not _VERSION.match(name):
        raise ReleaseError(f"{pointer} names {name!r}, not a version folder")
    return release_dir / name


def _lock_path(release_dir: Path) -> Path:
    return release_dir.parent / f".{release_dir.name}.lock"


@contextmanager
def release_lock(release_dir: str | Path) -> Iterator[None]:
    """Exclusive writer lock for one release folder (blocks until the other writer is done)."""
    release_dir = Path(release_dir)
    release_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock_path(release_dir)):
        yield


def _commit_version(release_dir: Path, build: Callable[[Path, int], None]) -> Path:
    """Build a version in a temp folder via ``build(tmp_folder, version_number)``, rename, switch, prune.

    Must be called with the release lock held.
    """
    release_dir.mkdir(parents=True, exist_ok=True)
    previous = current_version(release_dir)
    _prune(release_dir, _live_pair(release_dir, previous))  # what a killed writer left: before building more
    existing = _versions(release_dir)
    number = (int(existing[-1][1:]) + 1) if existing else 1
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
    _prune(release_dir, {name} | ({previous.name} if previous is not None else set()))
    return release_dir / name


def _live_pair(release_dir: Path, live: Path | None) -> set[str]:
    """The live version and the one before it (kept for readers still opening it); empty without one."""
    if live is None:
        return set()
    older = [v for v in _versions(release_dir) if v < live.name]
    return {live.name, *older[-1:]}


def _prune(release_dir: Path, keep: set[str]) -> None:
    """Drop every version but the live and the previous one, and temp folders of crashed writers."""
    for p in release_dir.iterdir():
        if p.is_dir() and ((_VERSION.match(p.name) and p.name not in keep) or p.name.startswith(".tmp-")):
            shutil.rmtree(p, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # versions share the (immutable) checkpoint
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- building


def new_index(kind: str, dim: int, train_vectors: np.ndarray, params: IndexConfig) -> faiss.IndexIDMap2:
    """An ``IndexIDMap2`` over an index of ``kind``, trained on ``train_vectors`` when the kind needs it."""
    inner = make_index(kind, dim, len(train_vectors), params)
    if not inner.is_trained:
        inner.train(np.ascontiguousarray(train_vectors, dtype=np.float32))
    return faiss.IndexIDMap2(inner)


def release_images(index: pl.DataFrame, splits: Sequence[str] | None) -> pl.DataFrame:
    """The shard-index rows a release indexes: database images (of ``splits``; None = all), by id."""
    rows = index.filter(pl.col("role") == "database")
    if splits is not None:
        rows = rows.filter(pl.col("split").is_in(list(splits)))
    return rows.sort("id")


def _metadata(rows: pl.DataFrame) -> pl.DataFrame:
    cols = {c: (rows[c] if c in rows.columns else pl.Series(c, [None] * rows.height)) for c in ID_SCHEMA}
    return pl.DataFrame(cols).cast(ID_SCHEMA)  # type: ignore[arg-type]


def _write_version(folder: Path, *, index: faiss.Index, ids: pl.DataFrame, manifest: dict, checkpoint: Path) -> None:
    faiss.write_index(index, str(folder / INDEX_FILE))
    ids.write_parquet(folder / IDS_FILE)
    _link_or_copy(checkpoint, folder / MODEL_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def build_release(head: str, cfg: Config, layout: Layout) -> Path:
    """Index every database image (``index.splits``) with the trained ``head``; returns the version path.

    Descriptors are extracted like evaluation's (shard size × ``train.image_scale``, batched,
    inference mode, bf16 on CUDA), added to ``IndexIDMap2(index.kind)`` under their shard ids, and
    the new version is switched in atomically (see the module docstring).
    """
    checkpoint = layout.checkpoint(head)
    device = resolve_device(cfg.train.device)
    model, ckpt = load_model(checkpoint, device)
    if ckpt.get("head", head) != head:
        raise ReleaseError(f"{checkpoint} holds head {ckpt.get('head')!r}, not {head!r}")
    reader = ShardReader(layout.shards_dir, cfg.index.splits)
    rows = release_images(reader.index, cfg.index.splits)
    if rows.height == 0:
        raise ReleaseError(f"no database images to index (splits: {cfg.index.splits or 'all'})")
    ids = rows["id"].to_numpy().astype(np.int64)
    t0 = time.perf_counter()
    desc = extract(
        model,
        reader,
        ids,
        eval_transform(cfg.shards, cfg.train.image_scale),
        device=device,
        batch_size=cfg.evaluate.batch_size,
        workers=cfg.train.workers,
    )
    seconds = time.perf_counter() - t0
    index = new_index(cfg.index.kind, desc.shape[1], desc, cfg.index)
    index.add_with_ids(desc, ids)
    release_dir = layout.release_dir(head)

    def build(folder: Path, number: int) -> None:
        manifest = {
            "head": head,
            "version": number,
            "parent": None,
            "created": _now(),
            "count": int(index.ntotal),
            "added": int(index.ntotal),
            "descriptor_dim": int(desc.shape[1]),
            "index_kind": cfg.index.kind,
            "image": {
                "height": cfg.shards.height,
                "width": cfg.shards.width,
                "scale": cfg.train.image_scale,
                "jpeg_quality": cfg.shards.jpeg_quality,
            },
            "splits": cfg.index.splits,
            "test_positive_m": cfg.mining.test_positive_m,
            "checkpoint_epoch": ckpt.get("epoch"),
            "extract_ms_per_image": 1000.0 * seconds / len(ids),
        }
        _write_version(folder, index=index, ids=_metadata(rows), manifest=manifest, checkpoint=checkpoint)

    with release_lock(release_dir):
        return _commit_version(release_dir, build)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- loading


def _load_version(version: Path, device: torch.device) -> Release:
    manifest = json.loads((version / MANIFEST_FILE).read_text())
    index = faiss.read_index(str(version / INDEX_FILE))
    ids = pl.read_parquet(version / IDS_FILE)
    model, _ = load_model(version / MODEL_FILE, device)
    if index.ntotal != ids.height or index.d != model.descriptor_dim:
        raise ReleaseError(
            f"{version}: index holds {index.ntotal}×{index.d}, id table {ids.height} rows, "
            f"model gives {model.descriptor_dim}-d descriptors"
        )
    return Release(path=version, manifest=manifest, model=model, index=index, ids=ids, device=device)


def load_release(release_dir: str | Path, device: torch.device | str = "cpu") -> Release:
    """Load the live version of a release (``ReleaseError`` if there is none)."""
    release_dir = Path(release_dir)
    device = resolve_device(device) if isinstance(device, str) else device
    for attempt in range(3):
        version = current_version(release_dir)
        if version is None:
            raise ReleaseError(f"no release in {release_dir} (build one with `vpr index --head ...`)")
        try:
            return _load_version(version, device)
        except (FileNotFoundError, RuntimeError):  # faiss.read_index says RuntimeError for a vanished file
            # pruned while it was being opened: a writer switched to a newer version, so open that one;
            # if the version is still the live one, the error is real
            if attempt == 2 or current_version(release_dir) == version:
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- appending


def add_to_release(release: Release, new_ids: Sequence[int], descriptors: np.ndarray, metadata: pl.DataFrame) -> Path:
    """Append vectors under their ids as a new version, switch to it atomically, return its path.

    ``descriptors`` (N×dim) must come from ``release.encode`` (the same model); ``metadata`` needs an
    ``id`` column covering ``new_ids`` plus any of ``path, split, role, utm_east, utm_north, lat, lon``.
    Under the writer lock the additions are applied to the *live* version (which may be newer than
    ``release`` if another writer ran in between); ids already indexed there are skipped. With nothing
    left to add, nothing is written and the live version's path is returned.
    """
    new_ids = np.asarray(new_ids, dtype=np.int64)
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2 or len(descriptors) != len(new_ids):
        raise ValueError(f"{len(new_ids)} ids for descriptors of shape {descriptors.shape}")
    if len(np.unique(new_ids)) != len(new_ids):
        raise ValueError("new_ids contains duplicates")
    if descriptors.shape[1] != release.index.d:
        raise ValueError(f"descriptors are {descriptors.shape[1]}-d, the release index {release.index.d}-d")
    meta = metadata.filter(pl.col("id").is_in(new_ids.tolist()))
    missing = set(new_ids.tolist()) - set(meta["id"].to_list())
    if missing:
        raise ValueError(f"metadata lacks {len(missing)} of the new ids, e.g. {min(missing)}")
    release_dir = release.release_dir
    with release_lock(release_dir):
        live = current_version(release_dir)
        base = release if live == release.path else _load_version(live, release.device)
        if base.manifest.get("head") != release.manifest.get("head"):
            raise ReleaseError(f"live version {live} is for another head")
        fresh = ~np.isin(new_ids, base.ids["id"].to_numpy())
        if not fresh.any():
            return base.path
        index = faiss.deserialize_index(faiss.serialize_index(base.index))  # never mutate the loaded one
        index.add_with_ids(descriptors[fresh], new_ids[fresh])
        rows = _metadata(meta.filter(pl.col("id").is_in(new_ids[fresh].tolist())).sort("id"))
        ids = pl.concat([base.ids.cast(ID_SCHEMA), rows])  # type: ignore[arg-type]

        def build(folder: Path, number: int) -> None:
            manifest = {
                **base.manifest,
                "version": number,
                "parent": base.version,
                "created": _now(),
                "count": int(index.ntotal),
                "added": int(fresh.sum()),
            }
            _write_version(folder, index=index, ids=ids, manifest=manifest, checkpoint=base.path / MODEL_FILE)

        return _commit_version(release_dir, build)
