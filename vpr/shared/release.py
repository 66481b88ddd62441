"""A release as served: the live version's model, FAISS index and id table, loaded together.

``load_release`` opens the live version of ``artifacts/release/{head}`` (its base index plus each
delta segment's vectors; retried when a writer prunes it mid-open); ``Release`` encodes images exactly
as the release's own descriptors were computed and searches them, optionally within a GPS radius.
``open_for_append`` opens the model and manifest alone, which is what re-indexing needs. How versions
are written and switched: ``vpr.shared.versions``; how a release is built and extended: ``vpr.steps.index``.

Every open checks each file against the manifest's size and SHA-256 (once per open; a mismatch is a
one-line ``ReleaseError`` naming the file). The model is checked after its weights-only load (which
runs no code), so a forged checkpoint is still reported as such. A version written before manifests
recorded their files loads unchecked, with a one-line warning saying to re-run ``vpr index``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import torch
from PIL import Image

from vpr.shared.checkpoints import CheckpointError, load_model
from vpr.shared.descriptors import autocast, extract, image_transform, resolve_device
from vpr.shared.models import VPRModel
from vpr.shared.retrieval import flat_vectors, search_alone
from vpr.shared.shardio import INDEX_SCHEMA, ShardReader
from vpr.shared.versions import (
    MODEL_FILE,
    REBUILD,
    ReleaseError,
    check_model,
    check_segments,
    current_version,
    held,
    read_manifest,
    recorded,
    segments,
)

logger = logging.getLogger(__name__)

ID_SCHEMA: dict[str, pl.DataType] = {
    k: INDEX_SCHEMA[k] for k in ("id", "path", "split", "role", "utm_east", "utm_north", "lat", "lon")
}


@dataclass
class Release:
    """One loaded release version (everything in memory; its files may be replaced afterwards)."""

    path: Path  # the version folder
    manifest: dict
    model: VPRModel
    index: faiss.Index
    ids: pl.DataFrame  # ID_SCHEMA, one row per indexed vector
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    digest: str = ""  # the SHA-256 of its manifest: which release this is (a name can be reused)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # lookups built once

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
        """Descriptors of RGB images already at the shard size (see ``vpr.steps.locate.prepare_image``)."""
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

        Each row gets the answer it gets searched alone, however many rows come together (the service
        searches the queries of concurrent requests in one call): an exact index is searched for all rows
        at once and scored with FAISS's one-row kernel (``vpr.shared.retrieval.search_alone``), any other
        kind in FAISS calls of fewer rows × dimensions than ``faiss.cvar.distance_compute_blas_threshold``
        (where FAISS scores each row on its own; from there on it switches to a BLAS product for all rows,
        whose last bits differ). ``allowed``: only these image ids are candidates (FAISS's id selector,
        or the exact search's candidate positions).
        """
        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        flat = self._flat()
        if flat is not None:
            vectors, id_map = flat
            candidates = None
            if allowed is not None:
                candidates = np.flatnonzero(np.isin(id_map, np.asarray(allowed, dtype=np.int64)))
            sq, pos = search_alone(vectors, x, k, candidates)
            ids = np.where(pos >= 0, id_map[pos], -1)
            return np.sqrt(np.maximum(sq, 0)), ids
        params = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            params = _search_params(self.index, selector)
        rows = max(1, (faiss.cvar.distance_compute_blas_threshold - 1) // max(1, self.index.d))
        parts = [self.index.search(x[i : i + rows], k, params=params) for i in range(0, len(x), rows)]
        if not parts:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        sq, ids = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return np.sqrt(np.maximum(sq, 0)), ids

    def _flat(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(stored vectors, id of each) of an exact index, read once per loaded index; None for other
        kinds."""
        key = ("flat", self.index.ntotal)
        if key not in self._cache:
            found = flat_vectors(self.index)
            if found is not None:
                vectors, id_map = found
                found = (vectors, np.arange(len(vectors), dtype=np.int64) if id_map is None else id_map)
            self._cache[key] = found
        return self._cache[key]

    def rows(self, ids: Sequence[int] | np.ndarray) -> dict[int, dict]:
        """The id table's rows (``ID_SCHEMA`` fields, Python values as polars gives them) of these image
        ids, by id; ids not indexed are left out. Columns are read out once per loaded release."""
        if "columns" not in self._cache:
            order = np.argsort(self.ids["id"].to_numpy(), kind="stable")
            columns = {name: _values(col) for name, col in self.ids.to_dict().items()}
            self._cache["columns"] = (self.ids["id"].to_numpy()[order], order, columns)
        sorted_ids, order, columns = self._cache["columns"]
        wanted = np.asarray(ids, dtype=np.int64)
        if not len(sorted_ids) or not len(wanted):
            return {}
        at = np.searchsorted(sorted_ids, wanted).clip(max=len(sorted_ids) - 1)
        at = order[at[sorted_ids[at] == wanted]]
        picked = {name: values[at].tolist() for name, values in columns.items()}
        return {row["id"]: row for row in (dict(zip(picked, values)) for values in zip(*picked.values()))}

    def ids_within(self, lat: float, lon: float, radius_m: float) -> np.ndarray:
        """Ids of the indexed images within ``radius_m`` of (lat, lon) (great-circle distance)."""
        rows = self.ids.filter(pl.col("lat").is_not_nan() & pl.col("lon").is_not_nan())
        if rows.is_empty():
            raise ReleaseError("this release has no latitude/longitude for its images: a GPS prior cannot apply")
        metres = haversine_m(lat, lon, rows["lat"].to_numpy(), rows["lon"].to_numpy())
        return rows["id"].to_numpy()[metres <= radius_m]


def _values(col: pl.Series) -> np.ndarray:
    """A column's values to pick rows from: numbers as numpy, anything else (or with nulls) as Python objects."""
    return col.to_numpy() if col.dtype.is_numeric() and not col.null_count() else np.array(col.to_list(), dtype=object)


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


def _read(path: Path, reader: Callable[[Path], object]):
    """``reader(path)``; a file that is there but unreadable is a one-line ``ReleaseError`` naming it."""
    try:
        return reader(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy, polars, faiss and torch each raise their own
        if not path.exists():  # faiss says RuntimeError for a vanished file: a pruned version
            raise FileNotFoundError(path) from None
        if isinstance(exc, (ReleaseError, CheckpointError)):  # one line naming the file already
            raise ReleaseError(str(exc)) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReleaseError(f"{path}: unreadable ({reason}); {REBUILD}") from None


def _unchecked(version: Path, manifest: dict) -> None:
    if not recorded(manifest):
        logger.warning("%s: its manifest records no file sizes or hashes: loaded unchecked (%s)", version, REBUILD)


def load_version(version: Path, device: torch.device) -> Release:
    """One version folder, whatever ``CURRENT`` says (``load_release`` opens the live one), its files checked."""
    manifest, digest = read_manifest(version)
    _unchecked(version, manifest)
    check_segments(version, manifest)
    index, tables = None, []
    for seg in segments(manifest):  # the base index, then each delta's vectors added to it
        tables.append(_read(version / seg["ids"], pl.read_parquet))
        if seg["kind"] == "base":
            index = _read(version / seg["index"], lambda p: faiss.read_index(str(p)))
        else:
            vectors = _read(version / seg["vectors"], lambda p: np.load(p, allow_pickle=False))
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), tables[-1]["id"].to_numpy())
    ids = pl.concat([t.cast(ID_SCHEMA) for t in tables])  # type: ignore[arg-type]
    model = _read(version / MODEL_FILE, lambda p: load_model(p, device)[0])
    check_model(version, manifest)
    if index is None or index.ntotal != ids.height or index.d != model.descriptor_dim:
        raise ReleaseError(
            f"{version}: index holds {index.ntotal if index else 0}×{index.d if index else 0}, id table "
            f"{ids.height} rows, model gives {model.descriptor_dim}-d descriptors"
        )
    return Release(path=version, manifest=manifest, model=model, index=index, ids=ids, device=device, digest=digest)


def load_release(release_dir: str | Path, device: torch.device | str = "cpu") -> Release:
    """Load the live version of a release (``ReleaseError`` if there is none)."""
    release_dir = Path(release_dir)
    device = resolve_device(device) if isinstance(device, str) else device
    for attempt in range(3):
        version = current_version(release_dir)
        if version is None:
            raise ReleaseError(f"no release in {release_dir} (build one with `vpr index --head ...`)")
        try:
            return load_version(version, device)
        except (FileNotFoundError, RuntimeError):  # faiss.read_index says RuntimeError for a vanished file
            # pruned while it was being opened: a writer switched to a newer version, so open that one;
            # if the version is still the live one, the error is real
            if attempt == 2 or current_version(release_dir) == version:
                raise
    raise AssertionError("unreachable")


@dataclass
class ReleaseModel:
    """The live version's manifest and model without its index: what appending needs (``open_for_append``)."""

    path: Path
    manifest: dict
    model: VPRModel
    device: torch.device

    release_dir = Release.release_dir
    version = Release.version
    transform = Release.transform
    encode = Release.encode
    encode_images = Release.encode_images

    def held(self, ids: Sequence[int]) -> np.ndarray:
        """Which of ``ids`` the version indexes already (only overlapping segments' id columns are read)."""
        return held(self.path, self.manifest, ids)


def open_for_append(release_dir: str | Path, device: torch.device | str = "cpu") -> ReleaseModel:
    """The live version's model and manifest, never its index: re-indexing costs what the batch costs
    (the base segment's files are checked by size, the deltas and the model by hash)."""
    release_dir = Path(release_dir)
    device = resolve_device(device) if isinstance(device, str) else device
    version = current_version(release_dir)
    if version is None:
        raise ReleaseError(f"no release in {release_dir} (build one with `vpr index --head ...`)")
    manifest, _ = read_manifest(version)
    _unchecked(version, manifest)
    check_segments(version, manifest, base=False)  # sizes, and the deltas' hashes: appending reads them
    model = _read(version / MODEL_FILE, lambda p: load_model(p, device)[0])
    check_model(version, manifest)
    return ReleaseModel(version, manifest, model, device)
