"""The descriptor heads, declared once: one entry per head, read by config, CLI, training, DVC checks and report.

An entry names the head's module (loaded by name, as hloc loads its extractors, so this file imports no
torch), says how training starts the head (k-means centroids from data, another head's kept weights)
and what the study reported for it. Adding a head is its module under ``vpr/shared/models/heads/`` plus one
entry here; ``tests/test_registry.py`` checks that ``dvc.yaml``'s ``train.foreach`` keys agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class StudyFigures:
    """What the authors' report measured for a head (Pitts30k-test; extraction on a Tesla K80)."""

    recall: dict[int, float] = field(default_factory=dict)  # Recall@N in percent
    ms_per_image: float | None = None


@dataclass(frozen=True)
class HeadSpec:
    """One descriptor head.

    ``module`` is ``"package.module:Class"``; the class is an ``nn.Module`` with
    ``from_config(cfg: ModelConfig, dim: int)`` and an ``out_dim``. ``init="kmeans"`` means training
    first calls ``head.init_from_descriptors`` on local features sampled from training images;
    ``starts_from`` names a head whose trained checkpoint (backbone and ``head.start_from(state)``)
    this one starts from, so it trains after that head. ``mask`` heads have ``context_mask(features)``
    (drawn in the report). ``vlad`` heads are held to the study's 20-point gain over the baseline.
    """

    name: str
    module: str
    summary: str
    init: Literal["random", "kmeans"] = "random"
    starts_from: str | None = None
    mask: bool = False
    vlad: bool = False
    study: StudyFigures = StudyFigures()

    def load(self) -> Any:
        """The head's class, imported by name."""
        module, _, attr = self.module.partition(":")
        return getattr(importlib.import_module(module), attr)


_HEADS: dict[str, HeadSpec] = {}


def register(spec: HeadSpec) -> HeadSpec:
    """Add a head (a name may be declared once; what it starts from must be declared before it)."""
    if spec.name in _HEADS:
        raise ValueError(f"head {spec.name!r} is already registered")
    if not spec.name.isidentifier() or "@" in spec.name:
        raise ValueError(f"head name {spec.name!r} must be an identifier (it names files and DVC stages)")
    if spec.starts_from is not None and spec.starts_from not in _HEADS:
        raise ValueError(f"head {spec.name!r} starts from {spec.starts_from!r}, which is not registered before it")
    _HEADS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a head (a test that adds one for a while)."""
    if any(s.starts_from == name for s in _HEADS.values()):
        raise ValueError(f"another head starts from {name!r}")
    _HEADS.pop(name)


@contextmanager
def registered(spec: HeadSpec) -> Iterator[HeadSpec]:
    """A head that exists only inside the ``with`` block."""
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.name)


def head_names() -> tuple[str, ...]:
    """Every registered head, in declaration order (a head comes after the one it starts from)."""
    return tuple(_HEADS)


def head_spec(name: str) -> HeadSpec:
    """The entry of ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return _HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; expected one of {', '.join(_HEADS)}") from None


def check_head(name: str) -> str:
    """Pydantic validator: ``name`` if registered."""
    head_spec(name)
    return name


# --------------------------------------------------------------------------- the study's heads

register(
    HeadSpec(
        "avg",
        "vpr.shared.models.heads.avg:AvgHead",
        "L2 per location, global average pool, L2 (the base line)",
        study=StudyFigures({1: 60.1}, 15.8),
    )
)
register(
    HeadSpec(
        "gem",
        "vpr.shared.models.heads.gem:GeMHead",
        "GeM pooling (fixed p) + linear whitening",
        study=StudyFigures({1: 71.6}, 15.8),
    )
)
register(
    HeadSpec(
        "netvlad",
        "vpr.shared.models.heads.netvlad:NetVLADHead",
        "NetVLAD, centroids from k-means",
        init="kmeans",
        vlad=True,
        study=StudyFigures({1: 79.1}, 20.6),
    )
)
register(
    HeadSpec(
        "crn",
        "vpr.shared.models.heads.crn:CRNHead",
        "NetVLAD re-weighted by a context mask (half-resolution 3/5/7 filters)",
        starts_from="netvlad",
        mask=True,
        vlad=True,
        study=StudyFigures({1: 81.7, 5: 90.7, 10: 93.4, 20: 95.3}, 21.5),
    )
)
register(
    HeadSpec(
        "crn2",
        "vpr.shared.models.heads.crn2:CRN2Head",
        "CRN with stacked dilated 3x3 filters at full resolution (fewer parameters)",
        starts_from="netvlad",
        mask=True,
        vlad=True,
        study=StudyFigures({1: 81.8, 5: 90.7, 10: 93.2, 20: 95.2}, 28.5),
    )
)

# the study's base line: this head as built, with no VPR training (its metrics are ``avg-untrained``)
BASELINE_HEAD = "avg"


def baseline_name(head: str = BASELINE_HEAD) -> str:
    """Metrics/predictions name of an untrained head (``avg`` → ``avg-untrained``)."""
    return f"{head}-untrained"
