"""Shared helpers of the flows: where the project is and which params it runs with."""

from __future__ import annotations

from pathlib import Path

from vpr.foundations.config import Config, load_config


def resolve(params: str, root: str) -> tuple[Config, Path, Path]:
    """(config, absolute root, absolute params path); a relative ``params`` is relative to ``root``."""
    root_path = Path(root).expanduser().resolve()
    params_path = Path(params).expanduser()
    if not params_path.is_absolute():
        params_path = root_path / params_path
    return load_config(params_path), root_path, params_path
