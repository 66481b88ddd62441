"""Appending re-indexed images to a catalog table: one new part per batch, the table's base untouched.

The new rows go to ``SPLIT.parts/`` beside ``SPLIT.parquet`` (``vpr.foundations.parts``), so an append
costs the size of its batch, not of the catalog; ``read_catalog`` returns what ``vpr ingest`` would write
for the same images (rows sorted by path, the same columns and types).

``duplicate_of`` of a new row is ``mark_duplicates``' answer over every split's catalog, for which only the
existing rows' ``sha256`` (and, for the matches, ``path`` and ``split``) are read. Rows already cataloged
are never rewritten, and a new row cannot change their ``duplicate_of``, with one exception that is
settled in their favour: a new image whose path sorts before an existing copy of its bytes in the same
or a later split (ingest would make the new image the original) is marked as the copy of the
cataloged image instead; the next ``vpr ingest`` re-derives the order by split and path.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from vpr.foundations.layout import SPLITS
from vpr.foundations.parts import append_part, scan_table
from vpr.steps.catalog import CATALOG_SCHEMA, ROW_SCHEMA, catalog_file


def _catalogs_beside(catalog_path: Path) -> list[Path]:
    """The table appended to and the other splits' tables in its folder: where a copy could be."""
    return [catalog_path] + [
        f for f in (catalog_file(catalog_path.parent, s) for s in SPLITS) if f != catalog_path and f.exists()
    ]


def mark_appended(new: pl.DataFrame, existing: pl.DataFrame) -> pl.DataFrame:
    """``new`` (``ROW_SCHEMA``) with ``duplicate_of``: the first image with the same bytes among the
    ``existing`` rows (``path``, ``split``, ``sha256``) by split then path, else among the new rows."""
    rank = pl.col("split").replace_strict({s: i for i, s in enumerate(SPLITS)}, default=len(SPLITS))
    both = pl.concat(
        [
            existing.select("path", "split", "sha256").with_columns(pl.lit(0).alias("_new")),
            new.select("path", "split", "sha256").with_columns(pl.lit(1).alias("_new")),
        ]
    )
    first = pl.col("path").sort_by(pl.col("_new"), rank, pl.col("path")).first().over("sha256")
    marks = both.with_columns(pl.when(pl.col("path") != first).then(first).otherwise(None).alias("duplicate_of"))
    marks = marks.filter(pl.col("_new") == 1).select("path", "duplicate_of")
    return new.join(marks, on="path", how="left", maintain_order="left").select(list(CATALOG_SCHEMA))


def append_to_catalog(catalog_path: str | Path, rows: list[dict]) -> Path:
    """Add validated rows to a catalog table as one new part (an atomic file), its base left as it is.

    Rows whose path is already cataloged are skipped, so a retried append adds each image once. Returns
    the part written (``catalog_path`` when nothing was new). The caller serialises appends.
    """
    catalog_path = Path(catalog_path)
    if not catalog_path.exists():
        raise FileNotFoundError(catalog_path)
    paths = [r["path"] for r in rows]
    have = set(scan_table(catalog_path).select("path").filter(pl.col("path").is_in(paths)).collect()["path"])
    new = [r for r in rows if r["path"] not in have]
    if not new:
        return catalog_path
    table = pl.DataFrame([{k: r.get(k) for k in ROW_SCHEMA} for r in new], schema=ROW_SCHEMA)
    table = table.unique(subset="path", keep="first", maintain_order=True).sort("path")
    hashes = table["sha256"].drop_nulls().unique().to_list()
    existing = pl.concat(
        [
            scan_table(f).select("path", "split", "sha256").filter(pl.col("sha256").is_in(hashes))
            for f in _catalogs_beside(catalog_path)
        ]
    ).collect()
    return append_part(catalog_path, mark_appended(table, existing), key="path")
