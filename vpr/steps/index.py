"""Building releases: the FAISS index of the database, its id → metadata table and the model, served together.

A release is what ``vpr locate`` answers from and what re-indexing extends. On disk::

    artifacts/release/{head}/
        CURRENT                 one line: the name of the live version (switched atomically)
        v000001/                an immutable, complete version
            index.faiss         faiss.IndexIDMap2 over the chosen index; ids = shard image ids (int64)
            ids.parquet         id, path, split, role, utm_east, utm_north, lat, lon
            model.pt            the release's own copy of the checkpoint the descriptors were computed with
            release.json        manifest: head, version, release_id, count, dim, index kind, image size,
                                parent, segments (each with its files' sizes and SHA-256), model (the same)...
        v000002/                after a re-index: v000001's files hard-linked, plus
            delta-000002.npy    the batch's vectors (added to the index when the version is loaded)
            delta-000002.parquet

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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import polars as pl

from vpr.foundations.config import Config, IndexConfig
from vpr.foundations.digest import file_record
from vpr.foundations.layout import Layout
from vpr.shared.checkpoints import load_model
from vpr.shared.descriptors import resolve_device
from vpr.shared.descstore import (
    DescriptorSet,
    DescriptorStore,
    encode_plans,
    encoder_for,
    ms_per_image,
    plans_for,
)
from vpr.shared.release import ID_SCHEMA, Release, ReleaseModel, haversine_m, load_release, open_for_append
from vpr.shared.retrieval import make_index, rows_within
from vpr.shared.shardio import ShardReader, release_images, release_shards
from vpr.shared.shardnet import remote_shards
from vpr.shared.versions import (
    CURRENT,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    MAX_DELTAS,
    MODEL_FILE,
    ReleaseError,
    base_segment,
    check_model,
    check_segments,
    commit_version,
    copy_private,
    current_version,
    delta_segment,
    held,
    link_or_copy,
    read_manifest,
    recorded,
    release_lock,
    seal,
    segment_files,
    segments,
)

__all__ = [  # the public API; on-disk names and the writer lock: vpr.shared.versions; loading: vpr.shared.release
    "CURRENT",
    "IDS_FILE",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "Release",
    "ReleaseError",
    "ReleaseModel",
    "add_to_release",
    "build_release",
    "current_version",
    "haversine_m",
    "ID_SCHEMA",
    "index_from_set",
    "load_release",
    "new_index",
    "open_for_append",
    "release_images",
    "release_lock",
    "release_shards",
]

# --------------------------------------------------------------------------- building

TRAIN_SAMPLE = 100_000  # vectors an approximate index is trained on (FAISS: 30-256 per IVF cell suffice)


def new_index(kind: str, dim: int, train_vectors: np.ndarray, params: IndexConfig) -> faiss.IndexIDMap2:
    """An ``IndexIDMap2`` over an index of ``kind``, trained on ``train_vectors`` when the kind needs it."""
    inner = make_index(kind, dim, len(train_vectors), params)
    if not inner.is_trained:
        inner.train(np.ascontiguousarray(train_vectors, dtype=np.float32))
    return faiss.IndexIDMap2(inner)


def index_from_set(descriptors: DescriptorSet, params: IndexConfig, kind: str, memory_gb: float) -> faiss.Index:
    """An index of a stored descriptor set, never holding the set in memory beside it: trained (when the
    kind needs it) on an evenly spaced sample, all vectors up to ``TRAIN_SAMPLE``; filled chunk by chunk."""
    n, dim = len(descriptors), descriptors.dim
    train = np.empty((0, dim), dtype=np.float32)
    if not make_index(kind, dim, max(1, n), params).is_trained:
        train = descriptors.gather(descriptors.ids[np.linspace(0, n - 1, min(n, TRAIN_SAMPLE)).astype(np.int64)])
    index = new_index(kind, dim, train, params)
    for first, chunk in descriptors.chunks(rows_within(memory_gb * 2**30, dim)):
        index.add_with_ids(chunk, descriptors.ids[first : first + len(chunk)])
    return index


def release_metadata(rows: pl.DataFrame) -> pl.DataFrame:
    """The release's id table (``ID_SCHEMA``) from shard-index rows; columns they lack are left empty."""
    cols = {c: (rows[c] if c in rows.columns else pl.Series(c, [None] * rows.height)) for c in ID_SCHEMA}
    return pl.DataFrame(cols).cast(ID_SCHEMA)  # type: ignore[arg-type]


def build_release(head: str, cfg: Config, layout: Layout) -> Path:
    """Index every database image (``index.splits``) with the trained ``head``; returns the version path.

    Descriptors come from the descriptor store (``vpr.shared.descstore``: encoded per shard like evaluation's,
    shards already encoded with this model are read back), are added to ``IndexIDMap2(index.kind)``
    under their shard ids chunk by chunk, and the new version is switched in atomically.
    """
    checkpoint = layout.checkpoint(head)
    device = resolve_device(cfg.train.device)
    trained = file_record(checkpoint) if checkpoint.exists() else None  # what the descriptors come from
    model, ckpt = load_model(checkpoint, device)
    if ckpt.get("head", head) != head:
        raise ReleaseError(f"{checkpoint} holds head {ckpt.get('head')!r}, not {head!r}")
    reader = ShardReader(layout.shards_dir, cfg.index.splits)
    rows = release_images(reader.index, cfg.index.splits)
    if rows.height == 0:
        raise ReleaseError(f"no database images to index (splits: {cfg.index.splits or 'all'})")
    plans = sorted(plans_for(reader, rows["id"], remote_shards(cfg.resources)), key=lambda p: p.ids[0])  # id order
    store = DescriptorStore(layout.descriptors_dir)
    descriptors = encode_plans(encoder_for(model, cfg, device), plans, store)
    index = index_from_set(descriptors, cfg.index, cfg.index.kind, cfg.resources.memory_gb)
    meta = release_metadata(rows.filter(pl.col("id").is_in(descriptors.ids.tolist())).sort("id"))
    release_dir = layout.release_dir(head)

    def build(folder: Path, number: int) -> None:
        manifest = {
            "head": head,
            "version": number,
            "parent": None,
            "created": _now(),
            "count": int(index.ntotal),
            "added": int(index.ntotal),
            "descriptor_dim": int(descriptors.dim),
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
            "extract_ms_per_image": ms_per_image(descriptors),
            "segments": [base_segment(index.ntotal, descriptors.ids)],
        }
        faiss.write_index(index, str(folder / INDEX_FILE))
        meta.write_parquet(folder / IDS_FILE)
        copy_private(checkpoint, folder / MODEL_FILE)  # never a link: training rewrites the checkpoint
        own = file_record(folder / MODEL_FILE)
        if trained is None or own["sha256"] != trained["sha256"]:
            raise ReleaseError(f"{checkpoint} changed while the release was built: run `vpr index` again")
        write_manifest(folder, {**manifest, "model": {"file": MODEL_FILE, **own}})

    with release_lock(release_dir):
        return commit_version(release_dir, build)


def write_manifest(folder: Path, manifest: dict) -> None:
    """A version's ``release.json``, sealed (``versions.seal``: a release id and every file's size and
    SHA-256); inside a version folder being built, so not atomic by itself."""
    (folder / MANIFEST_FILE).write_text(json.dumps(seal(folder, manifest), indent=2, sort_keys=True) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- appending


def add_to_release(
    release: Release | ReleaseModel, new_ids: Sequence[int], descriptors: np.ndarray, metadata: pl.DataFrame
) -> Path:
    """Append vectors under their ids as a new version, switch to it atomically, return its path.

    ``descriptors`` (N×dim) must come from ``release.encode`` (the same model); ``metadata`` needs an
    ``id`` column covering ``new_ids`` plus any of ``path, split, role, utm_east, utm_north, lat, lon``.
    Under the writer lock the additions are applied to the *live* version (which may be newer than
    ``release`` if another writer ran in between); ids already indexed there are skipped. With nothing
    left to add, nothing is written and the live version's path is returned. The new version links
    its parent's segments and writes one delta segment (``vpr.shared.versions``): the cost is the batch's,
    not the release's.
    """
    new_ids = np.asarray(new_ids, dtype=np.int64)
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2 or len(descriptors) != len(new_ids):
        raise ValueError(f"{len(new_ids)} ids for descriptors of shape {descriptors.shape}")
    if len(np.unique(new_ids)) != len(new_ids):
        raise ValueError("new_ids contains duplicates")
    dim = int(release.manifest["descriptor_dim"])
    if descriptors.shape[1] != dim:
        raise ValueError(f"descriptors are {descriptors.shape[1]}-d, the release index {dim}-d")
    meta = metadata.filter(pl.col("id").is_in(new_ids.tolist()))
    missing = set(new_ids.tolist()) - set(meta["id"].to_list())
    if missing:
        raise ValueError(f"metadata lacks {len(missing)} of the new ids, e.g. {min(missing)}")
    release_dir = release.release_dir
    with release_lock(release_dir):
        live = current_version(release_dir)
        manifest, _ = read_manifest(live)
        check_segments(live, manifest, base=False)  # what is linked into the new version: never a damaged file
        check_model(live, manifest)
        if manifest.get("head") != release.manifest.get("head"):
            raise ReleaseError(f"live version {live} is for another head")
        fresh = ~held(live, manifest, new_ids)
        if not fresh.any():
            return live
        order = np.argsort(new_ids[fresh], kind="stable")
        ids, vectors = new_ids[fresh][order], descriptors[fresh][order]
        rows = release_metadata(meta.filter(pl.col("id").is_in(ids.tolist())).sort("id"))

        def build(folder: Path, number: int) -> None:
            kept = segments(manifest)
            deltas = [s for s in kept if s["kind"] == "delta"]
            parts_v, parts_ids = [vectors], [rows]
            if len(deltas) >= MAX_DELTAS:  # merge the deltas into this one: the cost of the deltas, not the base
                kept = [s for s in kept if s["kind"] != "delta"]
                parts_v = [np.load(live / s["vectors"], allow_pickle=False) for s in deltas] + parts_v
                parts_ids = [pl.read_parquet(live / s["ids"]).cast(ID_SCHEMA) for s in deltas] + parts_ids
            for seg in kept:
                for name in segment_files(seg):
                    link_or_copy(live / name, folder / name)
            table = pl.concat(parts_ids)  # type: ignore[arg-type]
            delta = delta_segment(number, table["id"].to_numpy())
            np.save(folder / delta["vectors"], np.concatenate(parts_v), allow_pickle=False)
            table.write_parquet(folder / delta["ids"])
            if recorded(manifest):  # the release's own checked copy: shared with its parent
                link_or_copy(live / MODEL_FILE, folder / MODEL_FILE)
            else:  # an older version's model may still be a link to the checkpoint
                copy_private(live / MODEL_FILE, folder / MODEL_FILE)
            write_manifest(
                folder,
                {
                    **manifest,
                    "version": number,
                    "parent": live.name,
                    "created": _now(),
                    "count": int(manifest["count"]) + len(ids),
                    "added": len(ids),
                    "segments": [*kept, delta],
                },
            )

        return commit_version(release_dir, build)
