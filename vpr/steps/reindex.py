"""Re-indexing: new imagery dropped into the inbox joins the shards, the catalog and the live release.

Pure logic (no Prefect): the scheduled ``reindex`` flow and ``vpr reindex`` both call ``run_reindex``.

What a run does, for files directly or indirectly under ``inbox/`` (hidden files and ``inbox/quarantine``
are skipped — copy a file in under a hidden name, then rename it, so a half-copied file is never read):

1. **Validate** (``vpr.steps.inbox``) each file (symbolic links are quarantined: files are moved, a link
   would move, not its bytes) exactly like ingest (``vpr.steps.catalog``: readable, not empty, an image, fully
   decodable, at most ``ingest.max_pixels``). Its position comes from a datasets_vg file name or, for an
   ordinary photo, from EXIF GPS (lat/lon → UTM), in which case the file gets the datasets_vg name built
   from that position (``@E@N@zone@letter@lat@lon@@@heading@@@@timestamp@note@.jpg``, note = original
   name). Bad files are **quarantined**, never deleted: moved to ``inbox/quarantine/`` with a
   ``<name>.reason.txt`` beside them. A name already in the data tree or catalog is quarantined too
   ("already indexed"), as is a second file with the same name in one batch, and a UTM zone number
   that differs from the catalog's (distances across zones are meaningless).
2. **Plan** the batch: new image ids continue after the shard index's last id (existing ids never
   change), new sample keys continue per split/role, and new shard files continue the numbering
   (``test-database-000004.tar``...); a tail shard with room is carried into the first new tar
   (``vpr.steps.batch.plan_batch``) and deleted at the next batch. The plan is written to
   ``artifacts/reindex/pending.json`` before anything else.
3. **Write new shards** (existing tar files are never rewritten). Nothing references them yet.
4. **Extract and add** descriptors with each live release's own model to its FAISS index under the new
   ids (``vpr.steps.index.add_to_release``: a new release version switched in atomically; ids already present
   are skipped). This switch is the commit point that ``locate`` sees. A live version whose files fail
   their check (``vpr.shared.versions``) gets nothing added: the run stops with the damaged file named,
   the batch stays pending, and the run after a ``vpr index`` adds it.
5. **Append** the rows to the shard index, then to the catalog (each one new file beside the table's
   base, ``vpr.foundations.parts``: the cost of the batch, not of the table; read back, the catalog is
   sorted by path with duplicates marked, as ``vpr ingest`` would write it), and
   **move** the files from the inbox to ``data/images/<reindex_split>/database/``.
6. Remove the plan, append the batch to ``artifacts/reindex/history.jsonl``.

Atomicity: a crash before step 4 leaves the previous release, shard index and catalog untouched
(new tar files are unreferenced); a crash anywhere leaves ``pending.json``, and the next run resumes
that exact plan (same ids, same shard names, each step skipped if already done) before looking at
new files. A file of the pending batch removed before that resume is dropped from the batch (the rest
is re-planned) while no release holds the batch yet; once one does, the batch finishes from its
shards and the lost file stays served from its shard copy, uncataloged, until the next rebuild.
Idempotence: an empty inbox with no pending plan writes nothing. Concurrent runs are
serialised by an exclusive file lock (the flow adds a Prefect concurrency limit on top).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from vpr.foundations.atomic import write_text_atomic
from vpr.foundations.config import Config
from vpr.foundations.datalock import DataBusy, data_lock
from vpr.foundations.layout import Layout
from vpr.shared.shardio import read_index
from vpr.shared.versions import ReleaseError
from vpr.steps.batch import ReindexError as ReindexError  # the error of every re-index step
from vpr.steps.batch import (
    index_has,
    plan_batch,
    plan_state,
    read_batch_images,
    remove_unreferenced_tars,
    vanished,
    write_batch_shards,
)
from vpr.steps.catalog import REASON_OTHER_ZONE as REASON_OTHER_ZONE  # the catalog's reason, re-checked per batch
from vpr.steps.catalog import IngestError, leaks, printable_path, read_catalog
from vpr.steps.catalogappend import append_to_catalog
from vpr.steps.inbox import QUARANTINE, move_file, scan_inbox, utc_now, validate_inbox
from vpr.steps.shards import append_to_index

logger = logging.getLogger(__name__)

PENDING = "pending.json"
HISTORY = "history.jsonl"

REASON_VANISHED = "vanished"  # a file of an interrupted batch was removed before the batch was published


@dataclass
class ReindexResult:
    """What one run did (also the flow's summary artifact)."""

    batch: str | None = None
    resumed: bool = False
    added: list[dict] = field(default_factory=list)  # id, path (in data/), source ("name"|"exif"), inbox
    rejected: list[dict] = field(default_factory=list)  # inbox, reason, quarantined (path)
    releases: dict[str, str] = field(default_factory=dict)  # head → live version after the run
    note: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.added)

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "resumed": self.resumed,
            "added": self.added,
            "rejected": self.rejected,
            "releases": self.releases,
            "note": self.note,
        }


def reached(step: str) -> None:
    """Called after each step of a batch (``shards-written``, ``release-switched``, ``shard-index-written``,
    ``catalog-written``, ``files-moved``); tests replace it to simulate a crash at that point."""


# --------------------------------------------------------------------------- paths


def work_dir(layout: Layout) -> Path:
    return layout.artifacts / "reindex"


def quarantine_dir(layout: Layout) -> Path:
    return layout.inbox / QUARANTINE


@contextmanager
def reindex_lock(layout: Layout) -> Iterator[None]:
    """Exclusive lock: one re-index at a time on this project, whatever started it.

    A blocking ``flock`` rather than ``filelock`` (which polls): a waiting run sleeps in the kernel, where
    ``/proc/locks`` shows it waiting (the concurrency fault test relies on that).
    """
    folder = work_dir(layout)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- planning


def _catalog(layout: Layout) -> pl.DataFrame:
    try:
        return read_catalog(layout.catalog_dir)
    except IngestError as exc:
        raise ReindexError(f"{exc} (run train-all or `vpr ingest` first)") from None


def _split_index(layout: Layout, split: str) -> pl.DataFrame:
    """The shard index of the split that re-indexing extends (its own folder, its own ids)."""
    return read_index(layout.split_shards(split))


def _release_dirs(cfg: Config, layout: Layout) -> list[Path]:
    """Every release with a live version (the configured head's first); at least that one must exist."""
    from vpr.steps.index import current_version

    root = layout.release_dir(cfg.index.head).parent
    dirs = [layout.release_dir(cfg.index.head)]
    if root.is_dir():
        dirs += sorted(p for p in root.iterdir() if p.is_dir() and p not in dirs and not p.name.startswith("."))
    live = [d for d in dirs if current_version(d) is not None]
    if layout.release_dir(cfg.index.head) not in live:
        raise ReindexError(
            f"no release in {layout.release_dir(cfg.index.head)} to extend "
            "(run train-all or `vpr index` first); inbox files are left where they are"
        )
    return live


# --------------------------------------------------------------------------- applying a plan


def _published(cfg: Config, layout: Layout, plan: dict) -> bool:
    """Whether a live release already holds any of the batch's ids (then it can only be finished)."""
    from vpr.shared.versions import MANIFEST_FILE, held
    from vpr.steps.index import current_version

    ids = [it["id"] for it in plan["items"]]
    for release_dir in _release_dirs(cfg, layout):
        version = current_version(release_dir)
        if version is not None and held(version, json.loads((version / MANIFEST_FILE).read_text()), ids).any():
            return True
    return False


def _roll_back_vanished(plan: dict, cfg: Config, layout: Layout, result: ReindexResult) -> dict | None:
    """A pending batch that is not yet published and lost source files: drop them and re-plan the rest.

    Nothing of the batch is visible yet (its tars are unreferenced, no release holds its ids), so the
    lost files are recorded as rejected, the rest gets a fresh plan, and re-indexing carries on.
    Returns the plan to apply (None when nothing is left), or ``plan`` itself when nothing vanished.
    """
    gone = [it for it in plan["items"] if vanished(layout, it)]
    if not gone or _published(cfg, layout, plan):
        return plan
    for it in gone:
        reason = f"{REASON_VANISHED}: inbox/{printable_path(it['inbox'])} was removed before it was indexed"
        result.rejected.append({"inbox": printable_path(it["inbox"]), "reason": reason, "quarantined": None})
    logger.warning("reindex: %d file(s) of pending batch %s vanished; re-planning the rest", len(gone), plan["batch"])
    index = _split_index(layout, plan["split"])
    _discard(plan, layout, index)
    gone_ids = {it["id"] for it in gone}
    left = [
        {**it["row"], "inbox": it["inbox"], "source": it["source"]} for it in plan["items"] if it["id"] not in gone_ids
    ]
    if not left:
        return None
    fresh = plan_batch(left, index, plan["split"], cfg.shards.samples_per_shard)
    write_text_atomic(work_dir(layout) / PENDING, json.dumps(fresh, indent=1, default=str))
    return fresh


def _add_to_releases(cfg: Config, layout: Layout, rows: list[dict], result: ReindexResult) -> None:
    from vpr.steps.index import add_to_release, open_for_append

    images = read_batch_images(layout, rows)
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    meta = pl.DataFrame(rows).select("id", "path", "split", "role", "utm_east", "utm_north", "lat", "lon")
    for release_dir in _release_dirs(cfg, layout):
        release = open_for_append(release_dir, cfg.train.device)  # model + manifest: not the index
        if (
            release.manifest.get("splits") is not None
            and cfg.orchestration.reindex_split not in release.manifest["splits"]
        ):
            result.releases[release_dir.name] = release.version  # this release does not index that split
            continue
        fresh = ~release.held(ids)
        if fresh.any():
            desc = release.encode_images([im for im, f in zip(images, fresh) if f], batch_size=cfg.evaluate.batch_size)
            version = add_to_release(release, ids[fresh], desc, meta)
        else:
            version = release.path
        result.releases[release_dir.name] = Path(version).name


def _move_files(layout: Layout, plan: dict) -> None:
    for it in plan["items"]:
        src, dst = layout.inbox / it["inbox"], layout.data / it["row"]["path"]
        if src.exists() and not dst.exists():
            move_file(src, dst)
        elif src.exists():  # moved before a crash, the inbox copy remained (cross-device move)
            if hashlib.sha256(src.read_bytes()).hexdigest() == it["row"]["sha256"]:
                src.unlink()
        # neither: vanished after the batch was published; it is served from its shard copy (``_apply``)


def _discard(plan: dict, layout: Layout, index: pl.DataFrame) -> None:
    """Drop a plan the shard index has moved away from (e.g. a full re-shard): unreferenced tars go."""
    referenced = set(index["shard"].unique().to_list())
    for name in {it["shard"] for it in plan["items"]} - referenced:
        (layout.split_shards(plan["split"]) / name).unlink(missing_ok=True)
    (work_dir(layout) / PENDING).unlink(missing_ok=True)


def _apply(plan: dict, cfg: Config, layout: Layout, result: ReindexResult) -> None:
    shards = layout.split_shards(plan["split"])
    index = read_index(shards)
    if plan_state(index, plan) == "applied":
        rows = index.filter(pl.col("id").is_in([it["id"] for it in plan["items"]])).sort("shard", "offset").to_dicts()
    else:
        rows = write_batch_shards(plan, layout, cfg)
    reached("shards-written")
    new_ids = {it["id"] for it in plan["items"]}
    _add_to_releases(cfg, layout, [r for r in rows if r["id"] in new_ids], result)
    reached("release-switched")
    if not index_has(read_index(shards), plan):
        append_to_index(shards, rows)
    reached("shard-index-written")
    lost = [it for it in plan["items"] if vanished(layout, it)]
    if lost:  # published already: served from the shard copy, but no file for the catalog to name
        logger.warning(
            "reindex: %d file(s) of batch %s vanished after it was published (e.g. inbox/%s): they stay in "
            "the release and shards until the next rebuild, and are not cataloged",
            len(lost),
            plan["batch"],
            printable_path(lost[0]["inbox"]),
        )
    lost_ids = {it["id"] for it in lost}
    kept = [it for it in plan["items"] if it["id"] not in lost_ids]
    append_to_catalog(layout.catalog(plan["split"]), [it["row"] for it in kept])
    reached("catalog-written")
    _move_files(layout, plan)
    reached("files-moved")
    paths = [it["row"]["path"] for it in plan["items"]]
    everything = _catalog(layout)  # duplicate_of as recorded, across splits: a copy of a train or val image is leakage
    duplicate_of = dict(everything.filter(pl.col("path").is_in(paths)).select("path", "duplicate_of").iter_rows())
    leaked = {row["path"]: row["duplicate_of"] for row in leaks(everything).iter_rows(named=True)}
    for it in plan["items"]:
        if it["row"]["path"] in leaked:
            it["warnings"] = [*it.get("warnings", []), f"leakage: same bytes as {leaked[it['row']['path']]}"]
    result.added = [
        {
            "id": it["id"],
            "path": it["row"]["path"],
            "source": it["source"],
            "inbox": printable_path(it["inbox"]),
            "utm_east": it["row"]["utm_east"],
            "utm_north": it["row"]["utm_north"],
            "duplicate_of": duplicate_of.get(it["row"]["path"]),
            "warnings": it.get("warnings", []),  # optional name fields left empty
        }
        for it in plan["items"]
    ]


def _log(layout: Layout, result: ReindexResult) -> None:
    line = json.dumps({"finished": utc_now(), **result.to_dict()}, default=str)
    with open(work_dir(layout) / HISTORY, "a") as fh:
        fh.write(line + "\n")


# --------------------------------------------------------------------------- entry point


def run_reindex(cfg: Config, layout: Layout) -> ReindexResult:
    """Resume a pending batch if there is one, else validate the inbox and add a new batch.

    Returns what was added and rejected. With nothing pending and an empty inbox, nothing is written.
    """
    if cfg.index.splits is not None and cfg.orchestration.reindex_split not in cfg.index.splits:
        raise ReindexError(
            f"orchestration.reindex_split={cfg.orchestration.reindex_split!r} is not among "
            f"index.splits={cfg.index.splits}: a rebuilt release would drop the new images"
        )
    result = ReindexResult()
    pending_path = work_dir(layout) / PENDING
    layout.inbox.mkdir(parents=True, exist_ok=True)  # where new imagery goes: there from the first run on
    if not pending_path.exists() and not scan_inbox(layout.inbox):
        result.note = f"inbox empty: nothing to do (drop images into {layout.inbox})"
        return result
    try:
        with reindex_lock(layout), data_lock(layout.artifacts, "re-index", wait=False):
            return _run_locked(cfg, layout, result, pending_path)
    except ReleaseError as exc:  # a live version whose files fail their check: nothing is published on it
        raise ReindexError(f"{exc}; the batch stays pending and is added by the next run") from None
    except DataBusy as exc:  # a pipeline run is computing from the catalog: the inbox waits for the next run
        result.note = f"not now: {exc}; the inbox is left for the next run"
        logger.warning("reindex: %s", result.note)
        return result


def _run_locked(cfg: Config, layout: Layout, result: ReindexResult, pending_path: Path) -> ReindexResult:
    """``run_reindex`` with both locks held."""
    plan = json.loads(pending_path.read_text()) if pending_path.exists() else None
    if plan is not None and plan_state(_split_index(layout, plan["split"]), plan) == "stale":
        logger.warning("reindex: pending batch %s no longer fits the shard index; re-planning", plan["batch"])
        _discard(plan, layout, _split_index(layout, plan["split"]))
        plan = None
    if plan is None:
        _release_dirs(cfg, layout)  # fail before touching the inbox when there is no release
        split = cfg.orchestration.reindex_split
        remove_unreferenced_tars(layout.split_shards(split), _split_index(layout, split))  # carried tails
        accepted, rejected = validate_inbox(cfg, layout, _catalog(layout))
        result.rejected += rejected
        if not accepted:
            result.note = "no usable new images" if result.rejected else "inbox empty: nothing to do"
            if result.rejected:
                _log(layout, result)
            return result
        plan = plan_batch(accepted, _split_index(layout, split), split, cfg.shards.samples_per_shard)
        write_text_atomic(pending_path, json.dumps(plan, indent=1, default=str))
    else:
        result.resumed = True
        plan = _roll_back_vanished(plan, cfg, layout, result)
        if plan is None:  # _discard removed the plan
            result.note = "pending batch rolled back: all of its files vanished"
            _log(layout, result)
            return result
    result.batch = plan["batch"]
    _apply(plan, cfg, layout, result)
    pending_path.unlink()
    result.note = f"added {len(result.added)} image(s)" + (" (resumed batch)" if result.resumed else "")
    dups = [a for a in result.added if a["duplicate_of"]]
    if dups:
        result.note += (
            f"; {len(dups)} with the same bytes as an image already cataloged (kept; e.g. "
            f"{dups[0]['path']} == {dups[0]['duplicate_of']})"
        )
    leaked = [a for a in result.added if any(w.startswith("leakage:") for w in a["warnings"])]
    if leaked:
        result.note += f"; {len(leaked)} leak(s): the bytes of a train or val image (see the warnings column)"
    _log(layout, result)
    return result
