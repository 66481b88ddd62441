"""One typed configuration, loaded once from ``params.yaml`` and passed down explicitly.

Every knob of the pipeline lives here (the sections: ``vpr.foundations.config.sections``). Unknown or
ill-typed keys fail at load time with a message that names the key (``train.lr``), before any work starts.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError, model_validator

from vpr.foundations.config.sections import (
    AblationConfig,
    ApiConfig,
    AugmentConfig,
    EvalConfig,
    Head,
    HeadBudget,
    IndexConfig,
    IngestConfig,
    LocateConfig,
    MiningConfig,
    ModelConfig,
    OrchestrationConfig,
    PathsConfig,
    ResourcesConfig,
    ShardConfig,
    SplitName,
    SplitSize,
    Strict,
    SynthConfig,
    TestSetName,
    TownConfig,
    TrainConfig,
)

__all__ = [
    "AblationConfig",
    "ApiConfig",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "EvalConfig",
    "Head",
    "HeadBudget",
    "IndexConfig",
    "IngestConfig",
    "LocateConfig",
    "MiningConfig",
    "ModelConfig",
    "OrchestrationConfig",
    "PathsConfig",
    "ResourcesConfig",
    "ShardConfig",
    "SplitName",
    "SplitSize",
    "SynthConfig",
    "TestSetName",
    "TownConfig",
    "TrainConfig",
    "load_config",
    "parse_config",
]


class Config(Strict):
    paths: PathsConfig = PathsConfig()
    resources: ResourcesConfig = ResourcesConfig()
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    shards: ShardConfig = ShardConfig()
    mining: MiningConfig = MiningConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    index: IndexConfig = IndexConfig()
    locate: LocateConfig = LocateConfig()
    api: ApiConfig = ApiConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    ablation: AblationConfig = AblationConfig()

    @model_validator(mode="after")
    def _selection_is_computed(self) -> Config:
        if self.train.select_by not in self.evaluate.recall_at:
            raise ValueError(
                f"train.select_by={self.train.select_by} is not among evaluate.recall_at={self.evaluate.recall_at}: "
                "the checkpoint is picked by a validation recall that is computed"
            )
        return self


class ConfigError(ValueError):
    """params.yaml is malformed; the message names each offending key."""


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {err['msg']}")
    return "; ".join(lines)


def parse_config(raw: dict | None) -> Config:
    """Validate a params mapping into a ``Config``; raises ``ConfigError`` naming the bad keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("params must be a mapping of sections")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid params: {_describe(exc)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (not last-wins)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} (line {key_node.start_mark.line + 1}): "
                "it is given twice and one value would be silently dropped"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(path: str | Path = "params.yaml") -> Config:
    """Load and validate ``params.yaml`` (missing file → defaults are NOT assumed: it's an error)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if raw is None:  # empty, comment-only or `~`: almost surely not what was meant, never "all defaults"
        raise ConfigError(f"{path} holds no settings (empty, comments only, or null); write `{{}}` for all defaults")
    return parse_config(raw)
