"""Named parameter profiles: ``profiles/NAME.yaml`` overlays on the typed defaults.

``vpr profile paper`` switches ``params.yaml`` to the study's full-resolution GPU settings in one
command; ``vpr profile cpu`` returns to the CPU demo. The result is validated before it is written
(atomically), so a profile can never leave a malformed ``params.yaml`` behind.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vpr.foundations.atomic import write_text_atomic
from vpr.foundations.config import Config, ConfigError, parse_config


def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def available(profiles_dir: str | Path = "profiles") -> list[str]:
    return sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))


def apply_profile(name: str, params: str | Path = "params.yaml", profiles_dir: str | Path = "profiles") -> Config:
    """Write ``params`` = typed defaults + ``profiles/NAME.yaml``; returns the new config."""
    source = Path(profiles_dir) / f"{name}.yaml"
    if not source.exists():
        raise ConfigError(f"unknown profile {name!r}; available: {', '.join(available(profiles_dir)) or 'none'}")
    overlay = yaml.safe_load(source.read_text()) or {}
    cfg = parse_config(_merge(Config().model_dump(mode="json"), overlay))
    header = f"# Written by `vpr profile {name}` from {source.as_posix()}; edit freely or re-apply a profile.\n"
    write_text_atomic(params, header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return cfg
