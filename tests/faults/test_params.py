"""Case 5: a malformed params.yaml stops every command before any work, naming the key (exit code 2)."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from tests.faults.conftest import snapshot, vpr
from vpr.cli import app

pytestmark = pytest.mark.timeout(120)

BAD = {
    "unknown-key": ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key"),
    "unknown-section": ({"trian": {"lr": 0.1}}, "trian: unknown key"),
    "wrong-type": ({"shards": {"height": "tall"}}, "shards.height"),
    "negative-threshold": ({"mining": {"train_positive_m": -5.0}}, "mining.train_positive_m"),
    "unknown-head": ({"index": {"head": "vit"}}, "index.head"),
    "unknown-head-in-list": ({"train": {"heads": ["gem", "vit"]}}, "train.heads.1"),
    "no-heads": ({"train": {"heads": []}}, "train.heads"),
    "no-index-splits": ({"index": {"splits": []}}, "index.splits"),
    "infinite-lr": ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number"),
    "nan-margin": ({"train": {"margin": float("nan")}}, "train.margin"),
    "bool-as-int": ({"train": {"epochs": True}}, "train.epochs: Input should be a valid integer"),
    "string-as-int": ({"train": {"epochs": "3"}}, "train.epochs: Input should be a valid integer"),
    "huge-seed": ({"train": {"seed": 2**80}}, "train.seed"),
    "huge-resolution": ({"shards": {"height": 100_000}}, "shards.height"),
    # re-indexing would quarantine the data tree as "already indexed"
    "inbox-is-the-data": ({"paths": {"inbox": "data"}}, "paths.data (data) and paths.inbox (data) overlap"),
    "artifacts-inside-data": ({"paths": {"artifacts": "data/artifacts"}}, "overlap"),
    "cron-out-of-range": ({"orchestration": {"reindex_cron": "61 * * * *"}}, "orchestration.reindex_cron"),
    "cron-too-few-fields": ({"orchestration": {"reindex_cron": "*/15 *"}}, "needs 5 fields"),
}

COMMANDS = [
    ["synth", "city"],
    ["ingest", "data", "--out", "artifacts/catalog"],
    ["shard"],
    ["mine"],
    ["train", "--head", "gem"],
    ["evaluate", "--head", "avg", "--untrained"],
    ["index", "--head", "avg"],
    ["locate", "data/images/test/queries"],
    ["report"],
    ["reindex"],
    ["ablation", "thresholds", "--head", "avg"],
]


def _write_bad(root, change: dict) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("case", list(BAD))
def test_every_command_refuses_before_any_work(micro_project, monkeypatch, case):
    root, _, _ = micro_project
    change, message = BAD[case]
    _write_bad(root, change)
    (root / "inbox").mkdir()
    before = snapshot(root)
    monkeypatch.chdir(root)
    for command in COMMANDS:
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert message in result.output, (command, result.output)
        assert snapshot(root) == before, f"{command} changed files before refusing"
    assert not (root / "city").exists()


def test_a_key_given_twice_is_named_not_silently_dropped(micro_project, monkeypatch):
    root, _, _ = micro_project
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("\ntrain:\n", "\ntrain:\n  lr: 0.5\n", 1))
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["train", "--head", "gem"])
    assert result.exit_code == 2 and "duplicate key 'lr'" in result.output, result.output


def test_a_real_process_exits_2_naming_the_key_and_writes_nothing(micro_project):
    root, _, layout = micro_project
    _write_bad(root, {"train": {"epochs": "many"}})
    before = snapshot(root)
    proc = vpr(root, "train", "--head", "gem")
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(root) == before and not layout.models_dir.exists()


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "~\n"])
def test_an_empty_params_file_is_an_error_not_all_defaults(micro_project, monkeypatch, text):
    root, _, layout = micro_project
    (root / "params.yaml").write_text(text)
    before = snapshot(root)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["mine"])  # it once rewrote the mining tables with default thresholds
    assert result.exit_code == 2 and "holds no settings" in result.output, result.output
    assert snapshot(root) == before


def test_locate_top_k_zero_is_an_error_not_the_default(micro_project, monkeypatch):
    root, _, _ = micro_project
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["locate", "--top-k", "0", "data/images/test/queries"])
    assert result.exit_code == 1 and "--top-k must be positive" in result.output, result.output
