"""vpr: visual place recognition as a reproducible data pipeline.

The library is in layers, one folder each, importing downward only: ``vpr.foundations`` (config, the
head registry, layout, I/O), ``vpr.shared`` (models, shards, retrieval, releases), ``vpr.steps`` (one
module per pipeline step), then ``vpr.pipeline`` (the step table) and ``vpr.cli``. The usual entry
points are importable from here, loaded on first use (importing ``vpr`` stays cheap).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_ENTRY_POINTS = {
    "load_config": "vpr.foundations.config",
    "Layout": "vpr.foundations.layout",
    "head_names": "vpr.foundations.registry",
    "register": "vpr.foundations.registry",
    "HeadSpec": "vpr.foundations.registry",
    "build_model": "vpr.shared.models",
    "load_release": "vpr.shared.release",
    "ingest": "vpr.steps.catalog",
    "write_shards": "vpr.steps.shards",
    "mine_all": "vpr.steps.mining",
    "train_head": "vpr.steps.train",
    "evaluate_head": "vpr.steps.evaluate",
    "build_release": "vpr.steps.index",
    "locate": "vpr.steps.locate",
    "run_reindex": "vpr.steps.reindex",
    "write_report": "vpr.steps.report",
    "run_step": "vpr.pipeline",
    "STEPS": "vpr.pipeline",
}

__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'vpr' has no attribute {name!r}")
