"""Check a datasets_vg tree before a run: what ingest would accept and reject (and why), the splits'
sizes, the queries that can never be matched, and what the run will cost, with nothing written.

The counts are ingest's own (``catalog.inspect_tree`` runs the same per-file checks) and mining's own
(``mining.mine_split`` with the configured thresholds). The costs are measured, not guessed: the time
of this very inspection (what ``vpr ingest`` will take), and a sample of images encoded exactly as
``vpr shard`` does, extrapolated to the whole tree (its disk and time).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from vpr.foundations.config import Config
from vpr.foundations.layout import SPLITS
from vpr.foundations.tables import text_table
from vpr.steps.catalog import inspect_tree, summary_text
from vpr.steps.mining import mine_split
from vpr.steps.shards import encode_image

TAR_OVERHEAD_BYTES = 3 * 512 + 512  # per sample: two tar headers, the JSON record (< 512 B) and padding


@dataclass
class CheckReport:
    """Everything ``vpr check`` found (``to_dict`` for ``--json``)."""

    root: str
    accepted: int
    rejected: dict[str, int]  # reason → count
    warnings: dict[str, int]  # optional name field → count
    sizes: dict[str, dict[str, int]]  # split → role → images
    unmatched: dict[str, int]  # split → queries with no positive within the threshold
    ingest_s: float
    shard_bytes: int
    shard_s: float
    sample: int
    summary: str = field(repr=False, default="")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "summary"}


def _unmatched(catalog: pl.DataFrame, cfg: Config) -> dict[str, int]:
    """Queries per split that no database image is near enough to: dropped from training (train, hard
    positives within ``train_positive_m``) or never a hit (val/test, within ``test_positive_m``)."""
    out = {}
    for split in SPLITS:
        queries = catalog.filter((pl.col("split") == split) & (pl.col("role") == "queries")).height
        if queries == 0 or catalog.filter((pl.col("split") == split) & (pl.col("role") == "database")).height == 0:
            out[split] = queries
            continue
        table = mine_split(catalog, split, cfg.mining)
        out[split] = (
            queries - table.height
            if split == "train"
            else table.filter(pl.col("soft_positives").list.len() == 0).height
        )
    return out


def _shard_cost(root: Path, catalog: pl.DataFrame, cfg: Config, sample: int) -> tuple[int, float, int]:
    """(bytes, seconds, images sampled) for sharding the catalog, from evenly spaced samples encoded as
    ``vpr shard`` does and scaled to the whole catalog (seconds divided by the CPUs ``vpr shard`` uses)."""
    if catalog.height == 0:
        return 0, 0.0, 0
    rows = catalog.sort("path").gather_every(max(1, catalog.height // sample)).head(sample).to_dicts()
    t0 = time.perf_counter()
    sizes = [
        len(encode_image(root / r["path"], root, r, cfg.shards.height, cfg.shards.width, cfg.shards.jpeg_quality))
        for r in rows
    ]
    per_image = (time.perf_counter() - t0) / len(rows)
    mean = sum(sizes) / len(sizes) + TAR_OVERHEAD_BYTES
    return int(mean * catalog.height), per_image * catalog.height / (os.cpu_count() or 1), len(rows)


def check_tree(root: str | Path, cfg: Config, sample: int = 32) -> CheckReport:
    """Inspect ``root`` as ingest would, mine it as mining would, and measure the sharding cost."""
    root = Path(root)
    t0 = time.perf_counter()
    catalog, rejected, warnings, _ = inspect_tree(root, cfg.ingest)
    ingest_s = time.perf_counter() - t0
    sizes = {s: {r: 0 for r in ("database", "queries")} for s in SPLITS}
    for (split, role), n in Counter(zip(catalog["split"], catalog["role"])).items():
        sizes[split][role] = n
    shard_bytes, shard_s, sampled = _shard_cost(root, catalog, cfg, sample)
    return CheckReport(
        root=str(root),
        accepted=catalog.height,
        rejected=dict(sorted(Counter(rejected["reason"]).items())),
        warnings=dict(sorted(Counter(warnings["field"]).items())),
        sizes=sizes,
        unmatched=_unmatched(catalog, cfg),
        ingest_s=ingest_s,
        shard_bytes=shard_bytes,
        shard_s=shard_s,
        sample=sampled,
        summary=summary_text(catalog, rejected, warnings),
    )


def render(report: CheckReport, cfg: Config) -> str:
    """The report as text: ingest's summary, a per-split table, the costs."""
    table = text_table(
        [
            {
                "split": split,
                "database": n["database"],
                "queries": n["queries"],
                "without a positive": report.unmatched[split],
            }
            for split, n in report.sizes.items()
        ]
    )
    m = cfg.mining
    return "\n".join(
        [
            f"check {report.root} (nothing written)",
            report.summary,
            "",
            table,
            f"(train: no database image within {m.train_positive_m:g} m, dropped from training; "
            f"val/test: none within {m.test_positive_m:g} m, never a hit)",
            "",
            f"ingest: {report.ingest_s:.1f} s (measured: this check decoded every image as ingest will)",
            f"shards: {report.shard_bytes / 2**20:.1f} MiB, about {report.shard_s:.1f} s on {os.cpu_count()} "
            f"CPU(s) at {cfg.shards.height}×{cfg.shards.width} (from {report.sample} images encoded now)",
        ]
    )
