"""Ingest: validate a datasets_vg tree once and record every usable image in a catalog table.

Every image is opened and fully decoded exactly once here, so later steps (sharding, training) never
meet an unreadable file. Files that cannot be used are not fatal: they are listed with a reason in
``rejected.parquet`` and counted in a summary on stderr. The run fails only when there is nothing
to work with (missing root, no ``images/<split>/<role>`` folders, zero usable images).

Everything under ``ROOT/images`` is either cataloged or rejected: entries outside the split/role folders
are listed as stray; a symbolic link (of a file or a folder) that resolves outside ``ROOT`` is refused,
one that stays inside is followed. The shard step applies the same rule when it reads the files again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from vpr.foundations.atomic import write_parquet_atomic
from vpr.foundations.config import IngestConfig
from vpr.foundations.geo import NameError_, PositionError, parse_name
from vpr.foundations.imageio import REASON_NOT_IMAGE as REASON_NOT_IMAGE  # decoding's reasons are ingest's reasons too
from vpr.foundations.imageio import REASON_NOT_REGULAR as REASON_NOT_REGULAR
from vpr.foundations.imageio import REASON_TOO_LARGE as REASON_TOO_LARGE
from vpr.foundations.imageio import REASON_TOO_MANY_PIXELS as REASON_TOO_MANY_PIXELS
from vpr.foundations.imageio import REASON_TRUNCATED as REASON_TRUNCATED
from vpr.foundations.imageio import UnreadableFile, decode_facts, read_image_file, strict_pillow
from vpr.foundations.layout import ROLES, SPLITS
from vpr.foundations.parts import read_table, write_base
from vpr.foundations.procs import worker_pool
from vpr.foundations.progress import step_progress

logger = logging.getLogger(__name__)

# Reject reasons: exact strings, asserted by tests and grouped in the summary.
REASON_EMPTY = "empty file"
REASON_UNREADABLE = "unreadable file"  # the file vanished or cannot be read (permissions, I/O error)
REASON_BAD_NAME = "bad name"  # full reason: "bad name: <why>" (see ``bad_name_reason``)
REASON_BAD_POSITION = "bad position"  # full: "bad position: <why>" (not finite, out of range)
REASON_OTHER_ZONE = "other UTM zone"  # full: "other UTM zone: zone Z is not the catalog's (...)"
REASON_STRAY = "not in an images/<split>/<role> folder"  # full: "...: splits ..., roles ..."

REJECTED_FILE = "rejected.parquet"
WARNINGS_FILE = "warnings.parquet"  # kept images with an optional name field left empty


def catalog_file(out_dir: str | Path, split: str) -> Path:
    """One table per split (``train.parquet``...): a split's table changes only when its images do.

    Its base file, that is: re-indexing appends its batches beside it, in ``train.parts/`` (``read_split_catalog``)."""
    return Path(out_dir) / f"{split}.parquet"


CATALOG_SCHEMA: dict[str, pl.DataType] = {
    "path": pl.String,
    "split": pl.String,
    "role": pl.String,
    "utm_east": pl.Float64,
    "utm_north": pl.Float64,
    "utm_zone": pl.Int32,
    "utm_letter": pl.String,
    "lat": pl.Float64,
    "lon": pl.Float64,
    "heading": pl.Float64,
    "timestamp": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "format": pl.String,
    "sha256": pl.String,
    "duplicate_of": pl.String,
}
# What a validated image contributes; ``duplicate_of`` is derived over the whole catalog (``mark_duplicates``).
ROW_SCHEMA: dict[str, pl.DataType] = {k: v for k, v in CATALOG_SCHEMA.items() if k != "duplicate_of"}
REJECTED_SCHEMA: dict[str, pl.DataType] = {"path": pl.String, "reason": pl.String}
WARNINGS_SCHEMA: dict[str, pl.DataType] = {"path": pl.String, "field": pl.String, "warning": pl.String}


class IngestError(Exception):
    """The input tree cannot produce a catalog at all (the CLI exits non-zero)."""


@dataclass(frozen=True)
class IngestResult:
    """What ``ingest`` wrote: counts plus the two tables (already on disk)."""

    accepted: int
    rejected: int
    catalog: pl.DataFrame
    rejected_table: pl.DataFrame
    warnings_table: pl.DataFrame


@dataclass(frozen=True)
class _Candidate:
    path: str  # relative to ROOT, posix
    split: str
    role: str


def printable_path(path: str) -> str:
    """``path`` as valid UTF-8 text for tables and messages: undecodable bytes (which the OS hands over
    as surrogate escapes) are spelled ``\\xNN``. Only for reporting; never used to open a file."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def bad_name_reason(why: str) -> str:
    """The reject reason for a file name that ``parse_name`` refused."""
    return f"{REASON_BAD_NAME}: {why}"


# --------------------------------------------------------------------------- discovery


def find_candidates(root: Path) -> list[_Candidate]:
    """Every entry directly under ``ROOT/images/<split>/<role>/``, sorted by relative path.

    Not only regular files: a FIFO, a device link, a dangling link or a stray folder is a candidate too,
    so that it is rejected with its reason instead of vanishing from the count.
    """
    if not root.exists():
        raise IngestError(f"dataset root does not exist: {root}")
    if not root.is_dir():
        raise IngestError(f"dataset root is not a folder: {root}")
    role_dirs = [(s, r, root / "images" / s / r) for s in SPLITS for r in ROLES]
    role_dirs = [(s, r, d) for s, r, d in role_dirs if d.is_dir()]
    if not role_dirs:
        raise IngestError(
            f"{root} has no images/<split>/<role> folders (expected e.g. {root / 'images/train/database'}"
            f"; splits {', '.join(SPLITS)}; roles {', '.join(ROLES)})"
        )
    found = [
        _Candidate(f.relative_to(root).as_posix(), split, role)
        for split, role, folder in role_dirs
        for f in folder.iterdir()
    ]
    return sorted(found, key=lambda c: c.path)


def stray_entries(root: Path) -> list[dict]:
    """Rejected rows for what sits under ``ROOT/images`` outside every ``<split>/<role>`` folder.

    One row per stray entry (a folder counts once, its contents are not walked), so that everything
    under ``images/`` is either cataloged or rejected. Entries beside ``images/`` are not the dataset's.
    """
    images = root / "images"
    if not images.is_dir():
        return []
    why = f"{REASON_STRAY}: splits {', '.join(SPLITS)}, roles {', '.join(ROLES)}"
    rows = []
    for entry in images.iterdir():
        if entry.name not in SPLITS or not entry.is_dir():
            rows.append(entry)
            continue
        rows += [sub for sub in entry.iterdir() if sub.name not in ROLES or not sub.is_dir()]
    return sorted(
        ({"path": printable_path(p.relative_to(root).as_posix()), "reason": why} for p in rows),
        key=lambda r: r["path"],
    )


# --------------------------------------------------------------------------- per-image check


def name_fields(path: str) -> dict | str:
    """Geo fields from the base file name (``warnings``: optional fields left empty), or the reject reason."""
    try:
        geo = parse_name(path)
    except PositionError as exc:
        return f"{REASON_BAD_POSITION}: {exc}"
    except NameError_ as exc:
        return bad_name_reason(str(exc))
    return {
        "utm_east": geo.utm_east,
        "utm_north": geo.utm_north,
        "utm_zone": geo.utm_zone,
        "utm_letter": geo.utm_letter,
        "lat": geo.lat,
        "lon": geo.lon,
        "heading": geo.heading,
        "timestamp": geo.timestamp,
        "warnings": [f"{field}: {why}" for field, why in geo.warnings],
    }


def catalog_zone(zones: Sequence[int | None]) -> int | None:
    """The UTM zone a catalog is in: the most common one given (the smallest on a tie), None without any."""
    counts = Counter(z for z in zones if z is not None)
    return min(counts, key=lambda z: (-counts[z], z)) if counts else None


def other_zone_reason(zone: int | None, catalog: int | None) -> str | None:
    """The reject reason for an image outside the catalog's zone (distances by raw easting across
    zones are meaningless); None when it fits or either zone is unknown."""
    if zone is None or catalog is None or zone == catalog:
        return None
    return f"{REASON_OTHER_ZONE}: zone {zone} is not the catalog's ({catalog})"


def read_candidate(path: Path, max_bytes: int, root: Path) -> bytes | str:
    """A candidate's bytes, or the reason it cannot be used as they are (ingest and re-index alike).

    ``root`` is the tree the file must stay inside: a link that leads out of it is refused.
    """
    try:
        data = read_image_file(path, max_bytes, root=root)
    except UnreadableFile as exc:
        return exc.reason
    except OSError:
        return REASON_UNREADABLE
    return data if data else REASON_EMPTY


def inspect_file(root: Path, cand: _Candidate, max_pixels: int, max_bytes: int) -> dict:
    """One catalog row (``reason`` is None) or one rejected row (``reason`` set) for a file.

    A name that is not valid UTF-8 (or holds a path separator or control character) is rejected as a
    bad name and listed under its printable spelling; accepted paths are always plain relative paths.
    """
    base = {"path": printable_path(cand.path), "split": cand.split, "role": cand.role}
    data = read_candidate(root / cand.path, max_bytes, root)
    if isinstance(data, str):
        return {**base, "reason": data}
    name = name_fields(cand.path)
    if isinstance(name, str):
        return {**base, "reason": name}
    facts = decode_facts(data, max_pixels)
    if isinstance(facts, str):
        return {**base, "reason": facts}
    return {**base, **name, **facts, "sha256": hashlib.sha256(data).hexdigest(), "reason": None}


def _inspect_chunk(root: str, chunk: Sequence[_Candidate], max_pixels: int, max_bytes: int) -> list[dict]:
    """Worker entry point: inspect a chunk of files under strict Pillow settings."""
    with strict_pillow(max_pixels):
        return [inspect_file(Path(root), c, max_pixels, max_bytes) for c in chunk]


# --------------------------------------------------------------------------- parallel driver


def _chunks(items: Sequence[_Candidate], workers: int) -> list[Sequence[_Candidate]]:
    size = max(1, min(64, math.ceil(len(items) / (workers * 4))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _inspect_all(root: Path, cands: list[_Candidate], cfg: IngestConfig) -> list[dict]:
    """Inspect every candidate (in a process pool when ``workers`` > 1); rows sorted by path."""
    rows: list[dict] = []
    chunks = _chunks(cands, cfg.workers)
    with step_progress("ingest") as bar:
        task = bar.add_task("ingest", total=len(cands))
        if cfg.workers == 1:
            for chunk in chunks:
                rows += _inspect_chunk(str(root), chunk, cfg.max_pixels, cfg.max_file_bytes)
                bar.advance(task, len(chunk))
        else:
            with worker_pool(cfg.workers) as pool:
                futures = [
                    pool.submit(_inspect_chunk, str(root), c, cfg.max_pixels, cfg.max_file_bytes) for c in chunks
                ]
                for fut in as_completed(futures):
                    done = fut.result()
                    rows += done
                    bar.advance(task, len(done))
    return sorted(rows, key=lambda r: r["path"])


# --------------------------------------------------------------------------- tables and output


def mark_duplicates(catalog: pl.DataFrame) -> pl.DataFrame:
    """``duplicate_of`` = the first image with the same content, splits in pipeline order (train, val,
    test) and then by path; null for originals.

    So a copy only ever points at an earlier split or its own: images added to the test split never
    change the train or val catalog (their stages stay cached), and a test or val image with the bytes of
    a training image is marked on the later split's row, where ``leaks`` finds it.
    """
    rank = pl.col("split").replace_strict({s: i for i, s in enumerate(SPLITS)}, default=len(SPLITS))
    first = pl.col("path").sort_by(rank, pl.col("path")).first().over("sha256")
    return catalog.with_columns(pl.when(pl.col("path") != first).then(first).otherwise(None).alias("duplicate_of"))


def leaks(catalog: pl.DataFrame) -> pl.DataFrame:
    """Rows whose bytes are an image of another (earlier) split: a test image identical to a training or
    validation image measures memory, not recognition."""
    split_of = pl.col("duplicate_of").str.split("/").list.get(1, null_on_oob=True)
    return catalog.filter(pl.col("duplicate_of").is_not_null() & (split_of != pl.col("split")))


def _one_zone(rows: list[dict]) -> list[dict]:
    """Reject accepted rows whose UTM zone is not the catalog's (``catalog_zone`` of all accepted rows)."""
    zone = catalog_zone([r["utm_zone"] for r in rows if r["reason"] is None])
    out = []
    for r in rows:
        why = other_zone_reason(r.get("utm_zone"), zone) if r["reason"] is None else None
        out.append(r if why is None else {"path": r["path"], "split": r["split"], "role": r["role"], "reason": why})
    return out


def _tables(rows: list[dict]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    good = [{k: r.get(k) for k in ROW_SCHEMA} for r in rows if r["reason"] is None]
    bad = [{"path": r["path"], "reason": r["reason"]} for r in rows if r["reason"] is not None]
    warned = [
        {"path": r["path"], "field": w.split(": ", 1)[0], "warning": w.split(": ", 1)[-1]}
        for r in rows
        if r["reason"] is None
        for w in r.get("warnings") or ()
    ]
    schema = ROW_SCHEMA
    catalog = mark_duplicates(pl.DataFrame(good, schema=schema).sort("path"))
    rejected = pl.DataFrame(bad, schema=REJECTED_SCHEMA).sort("path")
    warnings = pl.DataFrame(warned, schema=WARNINGS_SCHEMA).sort("path", "field")
    return catalog.select(list(CATALOG_SCHEMA)), rejected, warnings


def summary_text(catalog: pl.DataFrame, rejected: pl.DataFrame, warnings: pl.DataFrame) -> str:
    lines = [f"ingest: {catalog.height} accepted, {rejected.height} rejected"]
    for reason, count in sorted(Counter(rejected["reason"].to_list()).items()):
        lines.append(f"  rejected {count:>6} × {reason}")
    for field, count in sorted(Counter(warnings["field"].to_list()).items()):
        lines.append(f"  warning  {count:>6} × {field} did not parse (left empty, image kept; see {WARNINGS_FILE})")
    dups = catalog.filter(pl.col("duplicate_of").is_not_null())
    if dups.height:
        example = dups.row(0, named=True)
        lines.append(
            f"  duplicates: {dups.height} image(s) have the same bytes as another "
            f"(kept; e.g. {example['path']} == {example['duplicate_of']})"
        )
    leaked = leaks(catalog)
    if leaked.height:
        example = leaked.row(0, named=True)
        lines.append(
            f"  leakage: {leaked.height} image(s) have the same bytes as an image of an earlier split "
            f"(e.g. {example['path']} == {example['duplicate_of']}): remove one copy"
        )
    return "\n".join(lines)


def inspect_tree(root: str | Path, cfg: IngestConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, int]:
    """What ingest would make of ``ROOT``, writing nothing: (catalog, rejected, warnings, entries found)."""
    root = Path(root)
    cands = find_candidates(root)
    rows = _inspect_all(root, cands, cfg) + [{**r, "split": None, "role": None} for r in stray_entries(root)]
    return *_tables(_one_zone(sorted(rows, key=lambda r: r["path"]))), len(cands)


def ingest(root: str | Path, out_dir: str | Path, cfg: IngestConfig) -> IngestResult:
    """Decode every image under ``ROOT/images/<split>/<role>`` once; write catalog + rejected list."""
    root, out_dir = Path(root), Path(out_dir)
    catalog, rejected, warnings, found = inspect_tree(root, cfg)
    summary = summary_text(catalog, rejected, warnings)
    (logger.warning if leaks(catalog).height else logger.info)(summary)
    if catalog.height == 0:
        raise IngestError(f"no usable images under {root / 'images'} ({found} file(s) found, all rejected)")
    for split in SPLITS:  # every split's file, empty when it has no images: stages can depend on each
        write_base(catalog.filter(pl.col("split") == split), catalog_file(out_dir, split), keep_dir=True)
    write_parquet_atomic(rejected, out_dir / REJECTED_FILE)
    write_parquet_atomic(warnings, out_dir / WARNINGS_FILE)
    return IngestResult(catalog.height, rejected.height, catalog, rejected, warnings)


def read_split_catalog(path: str | Path) -> pl.DataFrame:
    """One catalog table: its base file and the batches re-indexing appended (``vpr.foundations.parts``;
    a part may hold a cataloged row again, with the ``duplicate_of`` a new image gave it: the last wins)."""
    return read_table(path, key="path", keep="last")


def read_catalog(out_dir: str | Path, splits: Sequence[str] = SPLITS) -> pl.DataFrame:
    """The catalog of ``splits`` (default: all) as one table sorted by path."""
    files = [catalog_file(out_dir, s) for s in splits]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise IngestError(f"catalog not found: {missing[0]} (run `vpr ingest` first)")
    return pl.concat([read_split_catalog(f) for f in files]).sort("path")
