"""Prefect flows: ``train-all`` (the study pipeline) and ``reindex`` (scheduled inbox pick-up).

The flows load on first use (``from flows import train_all``), not when the package is imported: ``python
-m flows.train_all`` would otherwise find its own module imported already and warn (runpy's RuntimeWarning).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"reindex": "flows.reindex", "train_all": "flows.train_all", "train_all_steps": "flows.train_all"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'flows' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # importing flows.train_all bound the module to that name: the flow wins, as it did
    return value
