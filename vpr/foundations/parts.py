"""Appendable Parquet tables: a base file plus one small file per appended batch, read as one table.

``NAME.parquet`` is the base; ``NAME.parts/NNNNNN.parquet`` hold the batches appended since, numbered in
append order. An append writes its batch only (one atomic file), so its cost does not grow with the
table; readers take the base and its live parts together (``read_table``), one row per key (``key``:
the first or the last row of a key wins, as the table's appends mean it). When more than ``MAX_PARTS``
parts pile up, ``append_part`` folds them into a new base (``compact``).

Crash safety: the base records in its Parquet metadata (``vpr.parts_from``) the first part number it does
not contain; readers skip every part below it. A new base (a compaction, or a full rebuild through
``write_base``) is written first, with ``parts_from`` past every part it folds or supersedes, and the parts
below that number are removed after it is durable. A crash in between leaves parts that readers skip
and the next write of the base removes: at every moment each row is read exactly once. A base without
the key (written before parts existed) has no folded parts. Parts are numbered on from ``parts_from``
and never reuse a number, so a new part is never mistaken for a folded one.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from vpr.foundations.atomic import atomic_path, fsync_dir, write_parquet_atomic, write_text_atomic

MAX_PARTS = 16  # more parts than this after an append: they are folded into the base
PARTS_FROM = "vpr.parts_from"  # the base's Parquet metadata key: the first part number it does not contain
MARKER = "README.txt"  # keeps a folder that must exist (a DVC dependency) non-empty
_PART = re.compile(r"^(\d{6,})\.parquet$")


def parts_dir(base: str | Path) -> Path:
    """Where the batches appended to ``base`` go: ``NAME.parts`` beside ``NAME.parquet``."""
    base = Path(base)
    return base.with_name(f"{base.stem}.parts")


def parts_from(base: str | Path) -> int:
    """The first part number ``base`` does not contain (0: none folded); reads the file's footer only."""
    return int(pl.read_parquet_metadata(base).get(PARTS_FROM, "0"))


def _numbered(base: Path) -> list[tuple[int, Path]]:
    folder = parts_dir(base)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / m.group(0)) for m in map(_PART.match, (p.name for p in folder.iterdir())) if m]
    return sorted(found)


def live_parts(base: str | Path) -> list[Path]:
    """The parts of ``base`` that it does not contain yet, in append order."""
    base = Path(base)
    start = parts_from(base)
    return [p for n, p in _numbered(base) if n >= start]


def _combine(tables: list[pl.DataFrame], key: str, keep: str) -> pl.DataFrame:
    if len(tables) == 1:
        return tables[0]  # the base alone: as it was written (ordered by ``key``)
    both = pl.concat(tables, how="diagonal_relaxed")
    return both.unique(subset=key, keep=keep, maintain_order=True).sort(key)  # type: ignore[arg-type]


def read_table(base: str | Path, key: str, keep: str = "first", columns: list[str] | None = None) -> pl.DataFrame:
    """``base`` and its live parts as one table sorted by ``key``, one row per ``key`` (``keep``: which).

    A part that a concurrent compaction folded and removed between the listing and its read is no
    error: the read starts again from the new base.
    """
    base = Path(base)
    for attempt in range(5):
        try:
            tables = [pl.read_parquet(base, columns=columns)]
            tables += [pl.read_parquet(p, columns=columns) for p in live_parts(base)]
            return _combine(tables, key, keep)
        except FileNotFoundError:
            if attempt == 4 or not base.exists():
                raise
    raise AssertionError("unreachable")


def scan_table(base: str | Path) -> pl.LazyFrame:
    """``base`` and its live parts as one lazy frame, unordered and not de-duplicated: for the writer's
    own look-ups (which paths or hashes exist), under the lock that keeps compactions out."""
    base = Path(base)
    return pl.concat([pl.scan_parquet(p) for p in [base, *live_parts(base)]], how="diagonal_relaxed")


def _next_number(base: Path) -> int:
    start = parts_from(base) if base.exists() else 0
    return max([start, *(n + 1 for n, _ in _numbered(base))])


def _remove_folded(base: Path, upto: int) -> None:
    """Remove the parts numbered below ``upto`` (the base on disk already holds or supersedes them)."""
    folded = [p for n, p in _numbered(base) if n < upto]
    for p in folded:
        p.unlink(missing_ok=True)
    if folded:
        fsync_dir(parts_dir(base))


def _keep_dir(base: Path) -> None:
    folder = parts_dir(base)
    if not (folder / MARKER).exists():
        text = f"Batches appended to ../{base.name}, read together with it (vpr.foundations.parts).\n"
        write_text_atomic(folder / MARKER, text)


def base_metadata(base: str | Path) -> dict[str, str] | None:
    """The metadata of a new base that supersedes every part of ``base`` on disk (None: no key needed), for
    a writer staging the base itself; it calls ``remove_superseded`` once the base is in place."""
    start = _next_number(Path(base))
    return {PARTS_FROM: str(start)} if start else None


def remove_superseded(base: str | Path) -> None:
    """Remove the parts the base on disk does not read (after ``write_base`` or a staged base's switch)."""
    base = Path(base)
    fsync_dir(base.parent)  # the base's rename is durable before the parts go
    _remove_folded(base, parts_from(base))


def _write(table: pl.DataFrame, base: Path, upto: int) -> None:
    with atomic_path(base) as tmp:
        table.write_parquet(tmp, metadata={PARTS_FROM: str(upto)} if upto else None)
    remove_superseded(base)


def write_base(table: pl.DataFrame, base: str | Path, *, keep_dir: bool = False) -> Path:
    """Replace the whole table (a full rebuild): the new base first, then the parts it supersedes go.

    ``keep_dir``: the parts folder always exists, holding at least ``MARKER`` (a DVC dependency)."""
    base = Path(base)
    _write(table, base, _next_number(base))
    if keep_dir:
        _keep_dir(base)
    return base


def compact(base: str | Path, key: str, keep: str = "first") -> Path:
    """Fold the live parts into a new base (``read_table``'s table); a no-op without parts."""
    base = Path(base)
    start = parts_from(base)
    live = [(n, p) for n, p in _numbered(base) if n >= start]
    if not live:
        return base
    tables = [pl.read_parquet(base), *(pl.read_parquet(p) for _, p in live)]
    _write(_combine(tables, key, keep), base, live[-1][0] + 1)
    return base


def append_part(
    base: str | Path, batch: pl.DataFrame, key: str, keep: str = "first", max_parts: int = MAX_PARTS
) -> Path:
    """Write ``batch`` as the next part of ``base`` (one atomic file); fold the parts into the base when
    there are more than ``max_parts``. The caller serialises appends (one writer at a time)."""
    base = Path(base)
    if not base.exists():
        raise FileNotFoundError(base)
    folder = parts_dir(base)
    part = write_parquet_atomic(batch, folder / f"{_next_number(base):06d}.parquet")
    fsync_dir(folder)
    if len(live_parts(base)) > max_parts:
        compact(base, key, keep)
    return part
