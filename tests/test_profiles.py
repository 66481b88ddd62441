from pathlib import Path

import pytest

from vpr.foundations.config import ConfigError, load_config
from vpr.foundations.profiles import apply_profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def test_paper_profile_is_valid_and_switchable(tmp_path):
    params = tmp_path / "params.yaml"
    cfg = apply_profile("paper", params, PROFILES)
    assert (cfg.shards.height, cfg.shards.width) == (480, 640)
    assert load_config(params) == cfg
    back = apply_profile("cpu", params, PROFILES)
    assert back.shards.height == 120 and back.train.device == "auto"


def test_unknown_profile_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="paper"):
        apply_profile("nope", tmp_path / "params.yaml", PROFILES)


def test_cpu_profile_equals_the_shipped_params(tmp_path):
    shipped = load_config(PROFILES.parent / "params.yaml")

    restored = apply_profile("cpu", tmp_path / "params.yaml", PROFILES)
    assert restored == shipped, "params.yaml and the cpu profile (typed defaults + profiles/cpu.yaml) drifted apart"
    assert shipped.train.for_head("netvlad").epochs > shipped.train.epochs  # the demo's budget per head
