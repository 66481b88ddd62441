"""Appending re-indexed images to a catalog table: one new part per batch, the table's base untouched.

The new rows go to ``SPLIT.parts/`` beside ``SPLIT.parquet`` (``vpr.foundations.parts``), so an append
costs the size of its batch, not of the catalog; ``read_catalog`` returns what ``vpr ingest`` would write
for the same images (rows sorted by path, the same columns and types).

``duplicate_of`` is ``mark_duplicates``' answer over every split's catalog, for which only the existing
rows with the batch's bytes are read (``sha256`` first, by predicate). A new image can become the
original of a cataloged copy in its own table (a copy of a query re-indexed into the database sorts
before it): that row is written again in the part with its new ``duplicate_of``, and readers keep the
last row of a path (the part's). Other splits' tables are never written: a new image in an earlier split
than a copy of its bytes (re-indexing into train or val) leaves that copy's mark as it was until the
next ``vpr ingest``, as before parts.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from vpr.foundations.layout import SPLITS
from vpr.foundations.parts import append_part, scan_table
from vpr.steps.catalog import CATALOG_SCHEMA, ROW_SCHEMA, catalog_file, mark_duplicates


def _catalogs_beside(catalog_path: Path) -> list[Path]:
    """The table appended to and the other splits' tables in its folder: where a copy could be."""
    return [catalog_path] + [
        f for f in (catalog_file(catalog_path.parent, s) for s in SPLITS) if f != catalog_path and f.exists()
    ]


def _with_hashes(path: Path, hashes: list[str], columns: list[str]) -> pl.LazyFrame:
    """The current rows (the last of each path) of one table whose bytes are among ``hashes``."""
    rows = scan_table(path).filter(pl.col("sha256").is_in(hashes)).select(columns)
    return rows.unique(subset="path", keep="last", maintain_order=True)


def mark_appended(new: pl.DataFrame, own: pl.DataFrame, others: pl.DataFrame) -> pl.DataFrame:
    """The rows a part holds: ``new`` (``ROW_SCHEMA``) with ``duplicate_of``, and those of ``own`` (the
    table's current rows with the same bytes) whose ``duplicate_of`` the new rows change; ``others``
    (``path``, ``split``, ``sha256``): the other splits' rows with the same bytes."""
    cols = ["path", "split", "sha256"]
    group = pl.concat([others.select(cols), own.select(cols), new.select(cols)])
    marks = mark_duplicates(group).select("path", "duplicate_of")
    changed = (
        own.rename({"duplicate_of": "was"})
        .join(marks, on="path", how="left", maintain_order="left")
        .filter(pl.col("duplicate_of").ne_missing(pl.col("was")))
    )
    marked = new.join(marks, on="path", how="left", maintain_order="left")
    both = pl.concat([changed.select(list(CATALOG_SCHEMA)), marked.select(list(CATALOG_SCHEMA))])
    return both.sort("path")


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
    own = _with_hashes(catalog_path, hashes, list(CATALOG_SCHEMA)).collect()
    others = [_with_hashes(f, hashes, ["path", "split", "sha256"]) for f in _catalogs_beside(catalog_path)[1:]]
    other = pl.concat(others).collect() if others else own.select("path", "split", "sha256").clear()
    return append_part(catalog_path, mark_appended(table, own, other), key="path", keep="last")
