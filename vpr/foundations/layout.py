"""Where each pipeline step writes its outputs. One place, so Prefect and DVC agree on paths.

All paths are relative to the project root (the folder holding ``params.yaml``) unless an
absolute ``root`` is given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vpr.foundations.config import Config

SPLITS = ("train", "val", "test")
ROLES = ("database", "queries")
TEST_SETS_DIR = (
    "test-sets"  # <data>/test-sets/<name>: extra test sets; their outputs under <artifacts>/test-sets/<name>
)
ID_BITS = 50  # image ids of split k lie in [k·2⁵⁰, (k+1)·2⁵⁰): below 2⁵³, exact in JSON and JavaScript
ID_STRIDE = 2**ID_BITS


def first_id(split: str) -> int:
    """The smallest id of a split's range: ids never depend on another split's contents."""
    return SPLITS.index(split) * ID_STRIDE


def image_id(split: str, path: str, attempt: int = 0) -> int:
    """An image's id, a function of its split and data path alone (``images/<split>/<role>/<name>``): the
    same at ingest, re-index and every rebuild, whatever else is added or removed. ``attempt`` > 0 gives
    the next candidate when two paths collide (about 1 in 2·10⁹ pairs)."""
    text = path if attempt == 0 else f"{path}#{attempt}"
    digest = hashlib.sha256(text.encode()).digest()
    return first_id(split) + int.from_bytes(digest[:8], "big") % ID_STRIDE


def assign_ids(split: str, paths: Sequence[str], taken: Collection[int] = ()) -> list[int]:
    """Ids of ``paths`` of one split (``image_id``), distinct from each other and from ``taken``: a
    collision moves the later path (in path order) to its next candidate."""
    used, out = set(taken), {}
    for path in sorted(paths):
        attempt = 0
        while (candidate := image_id(split, path, attempt)) in used:
            attempt += 1
        used.add(candidate)
        out[path] = candidate
    return [out[p] for p in paths]


def _below(base: str, name: str, doc: str | None = None) -> property:
    """A read-only path: ``name`` inside the layout's path ``base`` (a field or another such path)."""

    def path(layout: Layout) -> Path:
        return getattr(layout, base) / name

    return property(path, doc=doc)


@dataclass(frozen=True)
class Layout:
    root: Path
    data: Path
    artifacts: Path
    metrics: Path
    reports: Path
    inbox: Path
    trained: Path | None = None  # where the models come from, when not ``artifacts`` (a test set's layout)

    @classmethod
    def from_config(cls, cfg: Config, root: str | Path = ".") -> Layout:
        root = Path(root)
        p = cfg.paths
        return cls(root, root / p.data, root / p.artifacts, root / p.metrics, root / p.reports, root / p.inbox)

    # ingest: one catalog table per split, so a change to one split's images leaves the others' bytes alone
    catalog_dir = _below("artifacts", "catalog")
    rejected = _below("catalog_dir", "rejected.parquet")

    def catalog(self, split: str) -> Path:
        return self.catalog_dir / f"{split}.parquet"

    # shards: one folder per split (its tars + index.parquet: image → shard file, member offsets)
    shards_dir = _below("artifacts", "shards")

    def split_shards(self, split: str) -> Path:
        return self.shards_dir / split

    # mining
    mining_dir = _below("artifacts", "mining")

    def mining(self, split: str) -> Path:
        return self.mining_dir / f"{split}.parquet"

    def test_set(self, name: str) -> Layout:
        """The layout of extra test set ``name``: its images, catalog, shards, mining, predictions and
        metrics in folders of their own; the models (and the descriptor store) are the project's."""
        return replace(
            self,
            data=self.data / TEST_SETS_DIR / name,
            artifacts=self.artifacts / TEST_SETS_DIR / name,
            metrics=self.metrics / TEST_SETS_DIR / name,
            trained=self.trained or self.artifacts,
        )

    # training
    @property
    def models_dir(self) -> Path:
        return (self.trained or self.artifacts) / "models"

    def checkpoint(self, head: str) -> Path:
        return self.models_dir / head / "model.pt"

    def last_checkpoint(self, head: str) -> Path:
        """Every epoch's state (model, optimiser, history) for ``--resume``."""
        return self.models_dir / head / "last.pt"

    @property
    def descriptors_dir(self) -> Path:
        """Descriptors per (model, shard): ``vpr.shared.descstore`` (content-addressed, so test sets share it)."""
        return (self.trained or self.artifacts) / "descriptors"

    trunk_cache_dir = _below("artifacts", "trunk-cache", "frozen-trunk maps shared by the heads (vpr.shared.trunk)")

    def live_dir(self, head: str) -> Path:
        """dvclive folder of the training history (``metrics.json``, per-epoch ``plots/metrics/*.tsv``)."""
        return self.artifacts / "live" / head

    # evaluation
    def metrics_file(self, head: str) -> Path:
        return self.metrics / f"{head}.json"

    def predictions(self, head: str) -> Path:
        return self.artifacts / "predictions" / f"{head}.parquet"

    # release (index + id table + model) used by locate and reindex
    def release_dir(self, head: str) -> Path:
        return self.artifacts / "release" / head
