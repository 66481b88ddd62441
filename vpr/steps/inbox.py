"""The inbox of new imagery: what is waiting, whether each file is usable, and the quarantine for the rest.

A file is checked exactly like ingest checks one (``vpr.steps.catalog``: readable, not empty, an image,
fully decodable, at most ``ingest.max_pixels``). Its position comes from a datasets_vg file name or,
for an ordinary photo, from EXIF GPS (lat/lon → UTM), in which case it gets the datasets_vg name
built from that position. Bad files are moved to ``inbox/quarantine/`` with a reason beside them,
never deleted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from vpr.foundations.atomic import write_text_atomic
from vpr.foundations.config import Config
from vpr.foundations.geo import format_name, latlon_to_utm
from vpr.foundations.imageio import REASON_LINK, decode_facts, exif_gps, strict_pillow
from vpr.foundations.layout import Layout
from vpr.steps.catalog import (
    REASON_BAD_NAME,
    catalog_zone,
    name_fields,
    other_zone_reason,
    printable_path,
    read_candidate,
)

QUARANTINE = "quarantine"
ROLE = "database"  # new imagery is always database imagery (what locate searches)

REASON_ALREADY_INDEXED = "already indexed"
REASON_DUPLICATE_NAME = "duplicate name in batch"
REASON_NO_POSITION = "no position"  # full: "no position: not a datasets_vg name (...) and no EXIF GPS"


def utc_now() -> str:
    """Now, as the ISO-8601 UTC timestamp the re-index records carry."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def scan_inbox(inbox: Path) -> list[str]:
    """Entries under the inbox (relative posix paths, sorted), skipping hidden ones and the quarantine.

    Folders are walked; a link to a folder is not followed but listed, so it is quarantined with its
    reason like any other entry that is not a regular file.
    """
    if not inbox.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(inbox):
        rel_dir = Path(dirpath).relative_to(inbox)
        visible = [d for d in dirnames if not d.startswith(".") and not (rel_dir == Path(".") and d == QUARANTINE)]
        linked = {d for d in visible if os.path.islink(os.path.join(dirpath, d))}
        dirnames[:] = sorted(set(visible) - linked)
        found += [(rel_dir / f).as_posix() for f in [*filenames, *linked] if not f.startswith(".")]
    return sorted(found)


# --------------------------------------------------------------------------- names from EXIF GPS


def _note(original: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(original).stem)[:64]


def name_from_exif(original: str, pos: dict) -> str:
    """The datasets_vg name of a photo at an EXIF position (note field = the original file stem)."""
    east, north, zone, letter = latlon_to_utm(pos["lat"], pos["lon"])
    ext = Path(original).suffix.lstrip(".").lower() or "jpg"
    return format_name(
        east,
        north,
        utm_zone=zone,
        utm_letter=letter,
        lat=pos["lat"],
        lon=pos["lon"],
        heading=pos["heading"],
        timestamp=pos["timestamp"],
        note=_note(original),
        ext=ext,
    )


# --------------------------------------------------------------------------- validation


def check_file(inbox: Path, rel: str, split: str, max_pixels: int, max_bytes: int) -> dict:
    """A catalog row (``reason`` None) for the file's place in the data tree, or a reject ``reason``.

    The same checks as ingest's ``inspect_file``; only the name may come from EXIF GPS instead.
    """
    base = {"inbox": rel, "split": split, "role": ROLE}
    if os.path.islink(inbox / rel):  # accepted files are moved: the link would move, not its bytes
        return {**base, "reason": f"{REASON_LINK} (inbox files are moved into the data tree: copy the file in)"}
    data = read_candidate(inbox / rel, max_bytes, inbox)
    if isinstance(data, str):
        return {**base, "reason": data}
    name, source = Path(rel).name, "name"
    fields = name_fields(name)
    with strict_pillow(max_pixels):
        facts = decode_facts(data, max_pixels)
    if isinstance(facts, str):
        return {**base, "reason": facts}
    if isinstance(fields, str) and not fields.startswith(REASON_BAD_NAME):  # a datasets_vg name, impossible place
        return {**base, "reason": fields}
    if isinstance(fields, str):  # not a datasets_vg name: an ordinary photo needs EXIF GPS
        pos = exif_gps(data)
        if pos is None:
            why = fields[len(REASON_BAD_NAME) + 2 :] if fields.startswith(REASON_BAD_NAME) else fields
            return {**base, "reason": f"{REASON_NO_POSITION}: not a datasets_vg name ({why}) and no EXIF GPS"}
        name, source = name_from_exif(rel, pos), "exif"
        fields = name_fields(name)
        if isinstance(fields, str):  # pragma: no cover - format_name always parses
            return {**base, "reason": fields}
    path = f"images/{split}/{ROLE}/{name}"
    return {
        **base,
        "path": path,
        "source": source,
        **fields,
        **facts,
        "sha256": hashlib.sha256(data).hexdigest(),
        "reason": None,
    }


def quarantine(inbox: Path, rel: str, reason: str) -> Path:
    """Move a rejected file to ``inbox/quarantine/`` (never overwriting) with a ``.reason.txt`` beside it.

    The file keeps its base name only (it lands directly in the quarantine folder, whatever folders or
    ``..`` parts ``rel`` has), spelled as printable UTF-8 when the original bytes are not.
    """
    qdir = inbox / QUARANTINE
    qdir.mkdir(parents=True, exist_ok=True)
    name = printable_path(Path(rel).name)
    if name in ("", ".", ".."):
        name = "unnamed"
    target = qdir / name
    n = 1
    while target.exists() or target.with_name(target.name + ".reason.txt").exists():
        target = qdir / f"{Path(name).stem}.{n}{Path(name).suffix}"
        n += 1
    write_text_atomic(
        target.with_name(target.name + ".reason.txt"), f"{reason}\nfrom inbox/{printable_path(rel)} at {utc_now()}\n"
    )
    move_file(inbox / rel, target)
    return target


def move_file(src: Path, dst: Path) -> None:
    """Rename (atomic on one file system); across devices copy to a temp name, rename, then delete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)
        src.unlink()


def validate_inbox(cfg: Config, layout: Layout, catalog: pl.DataFrame) -> tuple[list[dict], list[dict]]:
    """Check every inbox file against the catalog; quarantine the bad ones; (accepted rows, rejected)."""
    inbox, split = layout.inbox, cfg.orchestration.reindex_split
    rejected: list[dict] = []
    known = set(catalog["path"].to_list())
    zone = catalog_zone(catalog["utm_zone"].to_list())
    accepted, seen = [], set()
    for rel in scan_inbox(inbox):
        row = check_file(inbox, rel, split, cfg.ingest.max_pixels, cfg.ingest.max_file_bytes)
        reason = row["reason"]
        if reason is None:
            if row["path"] in known or (layout.data / row["path"]).exists():
                reason = f"{REASON_ALREADY_INDEXED}: {row['path']} is in the data tree"
            elif row["path"] in seen:
                reason = f"{REASON_DUPLICATE_NAME}: another inbox file becomes {row['path']}"
            else:
                reason = other_zone_reason(row["utm_zone"], zone)
        if reason is not None:
            target = quarantine(inbox, rel, reason)
            rejected.append(
                {
                    "inbox": printable_path(rel),
                    "reason": reason,
                    "quarantined": target.relative_to(layout.inbox).as_posix(),
                }
            )
            continue
        seen.add(row["path"])
        accepted.append(row)
    return accepted, rejected
