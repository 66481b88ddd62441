"""A head is declared once (vpr/foundations/registry.py): everything else reads the registry, and DVC's lists agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn
from typer.testing import CliRunner

from vpr.foundations.config import ConfigError, ModelConfig, parse_config
from vpr.foundations.registry import HeadSpec, head_names, head_spec, register, registered
from vpr.shared.models.functional import l2n

REPO = Path(__file__).resolve().parents[1]


class MaxHead(nn.Module):
    """A head no module of ``vpr`` knows: max pooling of L2-normalised local features, a learned
    per-channel scale, L2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim
        self.scale = nn.Parameter(torch.ones(dim))

    @classmethod
    def from_config(cls, cfg: ModelConfig, dim: int) -> MaxHead:
        return cls(dim)

    def forward(self, x: Tensor) -> Tensor:
        return l2n(l2n(x, dim=1).amax(dim=(2, 3)) * self.scale, dim=1)


THROWAWAY = HeadSpec("throwaway", f"{__name__}:MaxHead", "max pooling (a test's throwaway head)")


def test_dvc_train_keys_params_heads_and_the_registry_agree():
    """DVC needs literal lists: train.foreach in dvc.yaml and train.heads in params.yaml. Each lists the
    registry's heads in its order, and a head's foreach value is the model it starts from."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    foreach = stages["train"]["foreach"]
    assert list(foreach) == list(head_names()) == params["train"]["heads"]
    for name, starts in foreach.items():
        spec = head_spec(name)
        expected = f"${{paths.artifacts}}/models/{spec.starts_from}" if spec.starts_from else "vpr/shared/models"
        assert starts == expected, name
    profile = yaml.safe_load((REPO / "profiles/cpu.yaml").read_text())
    assert set(profile["train"]["per_head"]) == set(params["train"]["per_head"])


def test_unknown_heads_fail_where_they_are_named():
    with pytest.raises(ConfigError, match="unknown head 'crn3'"):
        parse_config({"train": {"heads": ["avg", "crn3"]}})
    with pytest.raises(ConfigError, match="unknown head 'vlad'"):
        parse_config({"index": {"head": "vlad"}})
    with pytest.raises(ValueError, match="already registered"):
        register(HeadSpec("crn", "vpr.shared.models.heads.crn:CRNHead", "again"))
    with pytest.raises(ValueError, match="not registered before it"):
        register(HeadSpec("late", "x:Y", "starts from a head declared later", starts_from="later"))
    with pytest.raises(ValueError, match="identifier"):
        register(HeadSpec("a@b", "x:Y", "a name that would break stage names"))


def test_the_cli_lists_the_registry():
    from vpr.cli import app

    result = CliRunner().invoke(app, ["train", "--help"])
    assert all(name in result.output for name in head_names())
    result = CliRunner().invoke(app, ["evaluate", "--head", "crn3"])
    assert result.exit_code == 1 and "unknown head 'crn3'" in result.output


def test_a_throwaway_head_trains_and_evaluates_through_the_registry_alone(micro_template, tmp_path):
    """Declaring a head (its module + one entry) is all it takes: config, training, the checkpoint,
    evaluation and the released model accept it; no other file of vpr names it."""
    import shutil

    from vpr.foundations.layout import Layout
    from vpr.shared.checkpoints import load_model
    from vpr.steps.evaluate import evaluate_head
    from vpr.steps.train import train_head

    root = tmp_path / "project"
    shutil.copytree(micro_template, root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    budget = {"heads": ["avg", "throwaway"], "epochs": 1, "per_head": {"throwaway": {"epochs": 2}}}
    raw["train"] = {**raw["train"], **budget}
    with pytest.raises(ConfigError, match="throwaway"):
        parse_config(raw)
    with registered(THROWAWAY):
        cfg = parse_config(raw)
        layout = Layout.from_config(cfg, root)
        summary = train_head("throwaway", cfg, layout)
        assert summary["epochs"] == 2 and summary["head"] == "throwaway"
        model, _ = load_model(layout.checkpoint("throwaway"), "cpu")
        assert isinstance(model.head, MaxHead) and model.descriptor_dim == 256
        metrics = evaluate_head("throwaway", cfg, layout)
        assert json.loads(layout.metrics_file("throwaway").read_text()) == metrics
        assert 0.0 <= metrics["recall@1"] <= metrics["recall@20"] <= 100.0
    assert "throwaway" not in head_names()
    assert not any("throwaway" in p.read_text() for p in (REPO / "vpr").rglob("*.py"))
