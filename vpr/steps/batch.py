"""One re-index batch: its plan (ids, keys, new shard files), its state against the shard index, and
writing its shards, from the inbox files or, after an interruption, from the tars already written.

``vpr.steps.reindex`` drives a batch through its steps; this module holds what a step needs about the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import polars as pl
from PIL import Image

from vpr.foundations.config import Config
from vpr.foundations.imageio import decode_rgb
from vpr.foundations.layout import Layout, assign_ids
from vpr.shared.shardio import read_index, verified_jpeg
from vpr.steps.catalog import ROW_SCHEMA
from vpr.steps.inbox import ROLE, utc_now
from vpr.steps.shards import read_tar_members, rows_in_tar, sample_key, shard_name, write_new_shards

_KEY_NUMBER = re.compile(r"_(\d+)$")
_SHARD_NUMBER = re.compile(r"-(\d{6})\.tar$")


class ReindexError(Exception):
    """The re-index cannot proceed (no release to extend, inconsistent state)."""


def _next_number(values: list[str], pattern: re.Pattern) -> int:
    numbers = [int(m.group(1)) for v in values if (m := pattern.search(v))]
    return max(numbers) + 1 if numbers else 0


def plan_batch(accepted: list[dict], index: pl.DataFrame, split: str, per_shard: int) -> dict:
    """Ids, sample keys and shard files for accepted rows (sorted by data path).

    A tail shard with room left is not extended in place (tars are never rewritten) but carried: its
    samples and the batch's first ones go into the next new tar, which replaces it in the index, so
    many small batches make as many tars as one ``vpr shard`` would (``carry`` in the plan).
    """
    accepted = sorted(accepted, key=lambda r: r["path"])
    same = index.filter((pl.col("split") == split) & (pl.col("role") == ROLE))
    ids = assign_ids(split, [r["path"] for r in accepted], taken=index["id"].to_list())  # index: this split's
    next_key = _next_number(same["key"].to_list(), _KEY_NUMBER)
    next_shard = _next_number(same["shard"].unique().to_list(), _SHARD_NUMBER)
    carry = None
    if same.height:
        tail = shard_name(split, ROLE, next_shard - 1)
        kept = same.filter(pl.col("shard") == tail).sort("offset")
        if 0 < kept.height < per_shard:
            carry = {"from": tail, "into": shard_name(split, ROLE, next_shard), "ids": kept["id"].to_list()}
    start = len(carry["ids"]) if carry else 0
    items = []
    for i, row in enumerate(accepted):
        items.append(
            {
                "id": ids[i],
                "key": sample_key(split, ROLE, next_key + i),
                "shard": shard_name(split, ROLE, next_shard + (start + i) // per_shard),
                "inbox": row["inbox"],
                "source": row["source"],
                "row": {k: row.get(k) for k in ROW_SCHEMA},
                "warnings": row.get("warnings") or [],
            }
        )
    digest = hashlib.sha256(json.dumps([(it["row"]["path"], it["row"]["sha256"]) for it in items]).encode())
    return {
        "batch": digest.hexdigest()[:16],
        "created": utc_now(),
        "split": split,
        "base_count": index.height,
        "carry": carry,
        "items": items,
    }


def index_has(index: pl.DataFrame, plan: dict) -> bool:
    ids = [it["id"] for it in plan["items"]]
    have = index.filter(pl.col("id").is_in(ids)).select("id", "path").sort("id")
    return have.rows() == sorted((it["id"], it["row"]["path"]) for it in plan["items"])


def plan_state(index: pl.DataFrame, plan: dict) -> str:
    """``applied`` (shard index holds the batch), ``pending`` (untouched since planning) or ``stale``."""
    if index_has(index, plan):
        return "applied"
    if index.height == plan["base_count"]:
        return "pending"
    return "stale"


def write_batch_shards(plan: dict, layout: Layout, cfg: Config) -> list[dict]:
    """Encode the batch into its new tar files; the shard-index rows (with byte ranges) they give,
    including the carried tail's samples at their new place (``plan_batch``).

    A tar already written by an interrupted run is read back instead of re-encoded, so a batch whose
    shards are durable finishes even if a source file has gone since.
    """
    shards = layout.split_shards(plan["split"])
    carried = _carried(plan, shards)
    by_shard: dict[str, list[dict]] = {}
    for it in plan["items"]:
        by_shard.setdefault(it["shard"], []).append(it)
    rows, samples = [], []
    for name, items in sorted(by_shard.items()):
        old = carried.get(name, [])
        written = rows_in_tar(shards / name, [*old, *items])
        if written is not None:
            rows += written
            continue
        samples += [(it["shard"], it["id"], it["key"], it["row"], *_source(layout, it)) for it in items]
    to_write = {sample[0] for sample in samples}
    prefix = {
        name: [(it["row"], it["key"], it["jpg"], it["meta"]) for it in old]
        for name, old in carried.items()
        if name in to_write
    }
    rows += write_new_shards(shards, samples, cfg.shards, carried=prefix)
    return sorted(rows, key=lambda r: r["id"])


def _carried(plan: dict, shards: Path) -> dict[str, list[dict]]:
    """The tail shard's samples that go first into the plan's ``carry.into`` tar: index row, key, the
    sample's stored JPEG and JSON (copied verbatim, checked against the index's CRC)."""
    carry = plan.get("carry")
    if not carry:
        return {}
    index = read_index(shards).filter(pl.col("id").is_in(carry["ids"])).sort("offset")
    if index.height != len(carry["ids"]) or set(index["shard"]) != {carry["from"]}:
        raise ReindexError(f"the tail shard {carry['from']} changed since batch {plan['batch']} was planned")
    members = read_tar_members(shards / carry["from"])
    out = []
    for r in index.to_dicts():
        where = f"shard {carry['from']}, image {r['id']}"
        jpg = verified_jpeg(members[f"{r['key']}.jpg"], r["size"], r["offset"], r["crc32"], where)
        out.append({"id": r["id"], "key": r["key"], "row": r, "jpg": jpg, "meta": members[f"{r['key']}.json"]})
    return {carry["into"]: out}


def remove_unreferenced_tars(shards: Path, index: pl.DataFrame) -> list[str]:
    """Delete tars the index no longer names (a tail carried into a new tar by an earlier batch).

    Run before a new batch, not right after the switch, so a reader that loaded the previous index
    finishes on the files it named.
    """
    named = set(index["shard"].unique().to_list())
    gone = sorted(p.name for p in shards.glob("*.tar") if p.name not in named)
    for name in gone:
        (shards / name).unlink(missing_ok=True)
    return gone


def _source(layout: Layout, item: dict) -> tuple[Path, Path]:
    """Where the batch file is now (and the tree it must stay in): still in the inbox, or already moved."""
    src = layout.inbox / item["inbox"]
    if src.exists():
        return src, layout.inbox
    dst = layout.data / item["row"]["path"]
    if dst.exists():
        return dst, layout.data
    raise ReindexError(f"inbox/{item['inbox']} of pending batch vanished before it reached {dst}")


def vanished(layout: Layout, item: dict) -> bool:
    return not (layout.inbox / item["inbox"]).exists() and not (layout.data / item["row"]["path"]).exists()


def read_batch_images(layout: Layout, rows: list[dict]) -> list[Image.Image]:
    """The batch images exactly as stored in the shards (what every database descriptor is made from)."""
    images = []
    for r in rows:
        tar = layout.split_shards(r["split"]) / r["shard"]
        with open(tar, "rb") as fh:
            data = os.pread(fh.fileno(), r["size"], r["offset"])
        where = f"shard {tar}, new image {r['id']}"
        images.append(decode_rgb(verified_jpeg(data, r["size"], r["offset"], r["crc32"], where)))
    return images
