"""``vpr check`` gives, before anything is written, the numbers ingest and mining then find: on the
micro city and on a deliberately damaged copy."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import polars as pl
from typer.testing import CliRunner

from tests.faults.conftest import snapshot
from vpr.cli import app
from vpr.foundations.config import load_config
from vpr.foundations.layout import SPLITS, Layout
from vpr.steps.catalog import ingest
from vpr.steps.check import check_tree
from vpr.steps.mining import mine_split


def _found_by_ingest(data, tmp_path, cfg):
    result = ingest(data, tmp_path / "catalog", cfg.ingest)
    catalog = result.catalog
    unmatched = {}
    for split in SPLITS:
        queries = catalog.filter((pl.col("split") == split) & (pl.col("role") == "queries")).height
        table = mine_split(catalog, split, cfg.mining)
        unmatched[split] = (
            queries - table.height if split == "train" else int((table["soft_positives"].list.len() == 0).sum())
        )
    return result, unmatched


def test_check_on_the_micro_city_predicts_ingest_and_mining(micro_template, tmp_path):
    cfg = load_config(micro_template / "params.yaml")
    data = Layout.from_config(cfg, micro_template).data
    before = snapshot(micro_template)
    report = check_tree(data, cfg)
    assert snapshot(micro_template) == before  # nothing written
    result, unmatched = _found_by_ingest(data, tmp_path, cfg)
    assert report.accepted == result.accepted and report.rejected == {}
    sizes = Counter(zip(result.catalog["split"], result.catalog["role"]))
    assert {(s, r): n for s, roles in report.sizes.items() for r, n in roles.items() if n} == dict(sizes)
    assert report.unmatched == unmatched
    assert report.shard_bytes > 0 and report.sample > 0


def test_check_on_a_damaged_copy_gives_ingests_rejections(micro_template, tmp_path):
    cfg = load_config(micro_template / "params.yaml")
    data = tmp_path / "data"
    shutil.copytree(Layout.from_config(cfg, micro_template).data, data)
    db = sorted((data / "images/test/database").iterdir())
    db[0].write_bytes(db[0].read_bytes()[:200])  # truncated
    shutil.copy(db[1], db[1].with_name("holiday.jpg"))  # no position in the name
    (data / "images/test/database/empty@1@2@.jpg").write_bytes(b"")
    for q in sorted((data / "images/val/queries").iterdir())[:3]:
        q.unlink()
    report = check_tree(data, cfg)
    result, unmatched = _found_by_ingest(data, tmp_path, cfg)
    assert report.accepted == result.accepted
    assert report.rejected == dict(Counter(result.rejected_table["reason"])) and sum(report.rejected.values()) == 3
    assert report.unmatched == unmatched

    out = CliRunner().invoke(app, ["check", str(data), "--json", "-p", str(micro_template / "params.yaml")])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["rejected"] == report.rejected
    text = CliRunner().invoke(app, ["check", str(data), "-p", str(micro_template / "params.yaml")])
    assert "nothing written" in text.output and "without a positive" in text.output
    missing = CliRunner().invoke(app, ["check", str(tmp_path / "nowhere"), "-p", str(micro_template / "params.yaml")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
