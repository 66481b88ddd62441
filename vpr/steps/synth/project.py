"""A micro project from the synthetic city: real synth, ingest, shards and mining at tiny sizes.

What the tests and the benchmarks build their projects from (``build_micro_project``; the benchmarks
pass larger sizes): a params.yaml with every key spelled out (so DVC resolves ``dvc.yaml`` from it), the
rendered city in ``data/`` and, when asked, the catalog, shards and mining tables.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vpr.foundations.config import Config, parse_config
from vpr.foundations.layout import SPLITS, Layout

MICRO_PARAMS: dict = {
    "synth": {
        "seed": 0,
        "height": 48,
        "width": 64,
        "train": {"database": 24, "queries": 16},
        "val": {"database": 12, "queries": 8},
        "test": {"database": 12, "queries": 8},
    },
    "ingest": {"workers": 1},
    "shards": {"height": 48, "width": 64, "samples_per_shard": 16},
    "model": {"weights": "none", "netvlad_clusters": 4, "gem_dim": 32, "kmeans_descriptors": 200},
    "train": {
        "epochs": 2,
        "queries_per_epoch": 8,
        "batch_queries": 2,
        "negatives": 3,
        "refresh_every": 8,
        "negative_sample": 12,
        "patience": 5,
        "lr": 0.001,
    },
    "evaluate": {"batch_size": 16},
}


def write_params(root: Path, overrides: dict | None = None) -> Config:
    raw = yaml.safe_load(yaml.safe_dump(MICRO_PARAMS))
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    cfg = parse_config(raw)
    # the full config, so DVC can resolve every ${...} of dvc.yaml from this params.yaml
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return cfg


def build_micro_project(root: Path, overrides: dict | None = None, *, prepare: bool = True) -> tuple[Config, Layout]:
    """params.yaml + data/ (synthetic) and, with ``prepare``, catalog, shards and mining tables.

    ``overrides`` replaces keys of ``MICRO_PARAMS`` section by section (``{"train": {"epochs": 1}}``).
    """
    from vpr.steps.catalog import ingest
    from vpr.steps.synth import generate_city

    root.mkdir(parents=True, exist_ok=True)
    cfg = write_params(root, overrides)
    layout = Layout.from_config(cfg, root)
    generate_city(layout.data, cfg.synth)
    if prepare:
        ingest(layout.data, layout.catalog_dir, cfg.ingest)
        shard_and_mine(cfg, layout)
    return cfg, layout


def shard_and_mine(cfg: Config, layout: Layout, splits: tuple[str, ...] = SPLITS, workers: int | None = None) -> None:
    """What the shard@{split} and mine@{split} stages write, for each of ``splits``."""
    from vpr.steps.mining import mine_all
    from vpr.steps.shards import write_shards

    for split in splits:
        write_shards(layout.catalog(split), layout.data, layout.split_shards(split), cfg.shards, workers=workers)
        mine_all(layout.catalog(split), layout.mining_dir, cfg.mining, (split,))
