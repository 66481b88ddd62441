"""Where each pipeline step writes its outputs. One place, so Prefect and DVC agree on paths.

All paths are relative to the project root (the folder holding ``params.yaml``) unless an
absolute ``root`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpr.foundations.config import Config

SPLITS = ("train", "val", "test")
ROLES = ("database", "queries")
ID_STRIDE = 10**9  # image ids of split k are k·ID_STRIDE + n: each split numbers its images on its own


def first_id(split: str) -> int:
    """The id of a split's first image: ids never depend on another split's contents."""
    return SPLITS.index(split) * ID_STRIDE


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

    # training
    models_dir = _below("artifacts", "models")

    def checkpoint(self, head: str) -> Path:
        return self.models_dir / head / "model.pt"

    def last_checkpoint(self, head: str) -> Path:
        """Every epoch's state (model, optimiser, history) for ``--resume``."""
        return self.models_dir / head / "last.pt"

    descriptors_dir = _below("artifacts", "descriptors", "descriptors per (model, shard): vpr.shared.descstore")
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
