import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vpr.foundations.config import ConfigError, load_config, parse_config
from vpr.foundations.registry import head_names

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert tuple(cfg.train.heads) == head_names()
    assert cfg.mining.train_positive_m == 10 and cfg.mining.test_positive_m == 25


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"mining": {"train_positive_m": -5}}, "mining.train_positive_m"),
        ({"train": {"heads": ["avg", "vit"]}}, "train.heads.1"),
        ({"mining": {"train_positive_m": 30, "test_positive_m": 25}}, "train_positive_m must not exceed"),
    ],
)
def test_bad_params_name_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value)


def test_cli_rejects_bad_params_before_work(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"shards": {"height": "tall"}}))
    out = tmp_path / "city"
    proc = subprocess.run(
        [sys.executable, "-m", "vpr.cli", "synth", str(out), "--params", str(params)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "shards.height" in proc.stderr
    assert not out.exists()


def test_checkpoint_selection_must_be_a_computed_recall():
    assert parse_config({"train": {"select_by": 10}}).train.select_by == 10
    with pytest.raises(ConfigError, match=r"train.select_by=3 is not among evaluate.recall_at"):
        parse_config({"train": {"select_by": 3}})
    with pytest.raises(ConfigError, match="train.select_by"):
        parse_config({"train": {"select_by": 20}, "evaluate": {"recall_at": [1, 5]}})
