"""Special files (FIFOs, devices, sparse giants, stray folders, dangling links) never hang or fill memory:
ingest, re-index and locate open only regular files of bounded size, and report every other entry."""

from __future__ import annotations

import os
import shutil

import pytest

from vpr.foundations.imageio import REASON_LINK, REASON_NOT_REGULAR, REASON_OUTSIDE_ROOT, REASON_TOO_LARGE
from vpr.steps.catalog import ingest
from vpr.steps.locate import locate

pytestmark = pytest.mark.timeout(120)  # a FIFO read would block forever: the timeout is the failure

NAME = "@{east:.2f}@{north:.2f}@{note}@.jpg"


def _specials(folder, like: str) -> dict[str, object]:
    """Entries named like datasets_vg images that are not images at all."""
    east, north = (float(v) for v in like.split("@")[1:3])
    names = {
        k: folder / NAME.format(east=east + i + 1, north=north, note=k)
        for i, k in enumerate(["fifo", "zero", "sparse", "folder", "dangling"])
    }
    os.mkfifo(names["fifo"])
    os.symlink("/dev/zero", names["zero"])
    with open(names["sparse"], "wb") as fh:
        fh.truncate(3 * 2**30)  # 3 GB of holes: costs no disk, but reading it whole would
    names["folder"].mkdir()
    os.symlink(folder / "no-such-file.jpg", names["dangling"])
    return names


def test_ingest_rejects_each_special_entry_with_a_reason(released, tmp_path):
    _, cfg, layout = released
    db = layout.data / "images/test/database"
    names = _specials(db, sorted(p.name for p in db.iterdir())[0])
    result = ingest(layout.data, tmp_path / "catalog", cfg.ingest)
    reasons = dict(result.rejected_table.select("path", "reason").iter_rows())
    got = {k: reasons.get(f"images/test/database/{p.name}") for k, p in names.items()}
    assert got == {
        "fifo": REASON_NOT_REGULAR,
        "zero": REASON_OUTSIDE_ROOT,  # a link to /dev/zero leads out of the data root
        "sparse": REASON_TOO_LARGE,
        "folder": REASON_NOT_REGULAR,
        "dangling": "unreadable file",
    }


def test_reindex_quarantines_a_fifo_and_adds_the_image_beside_it(released):
    from vpr.steps.reindex import run_reindex

    _, cfg, layout = released
    queries = sorted((layout.data / "images/test/queries").iterdir())
    layout.inbox.mkdir(exist_ok=True)
    shutil.copy(queries[0], layout.inbox / queries[0].name)
    names = _specials(layout.inbox, queries[1].name)
    result = run_reindex(cfg, layout)
    assert [a["inbox"] for a in result.added] == [queries[0].name]
    reasons = {r["inbox"]: r["reason"] for r in result.rejected}
    assert reasons[names["fifo"].name] == REASON_NOT_REGULAR and reasons[names["sparse"].name] == REASON_TOO_LARGE
    assert reasons[names["zero"].name].startswith(REASON_LINK)  # links are never moved into the data tree


def test_locate_answers_special_files_with_an_error_and_the_rest_normally(released):
    _, _, layout = released
    query = sorted((layout.data / "images/test/queries").iterdir())[0]
    folder = layout.root / "probe"
    folder.mkdir()
    names = _specials(folder, query.name)
    answers = locate([names["fifo"], names["zero"], names["sparse"], query], layout.release_dir("avg"), top_k=3)
    assert [a["ok"] for a in answers] == [False, False, False, True]
    assert REASON_NOT_REGULAR in answers[0]["error"] and REASON_TOO_LARGE in answers[2]["error"]
