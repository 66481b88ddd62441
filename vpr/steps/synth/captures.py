"""Captures: where each image is taken (pose on a street), when, under which condition, and its file name.

Every capture draws from its own RNG keyed by (seed, split, role, index), so captures can be planned
and rendered in any order or process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vpr.foundations.config import SynthConfig
from vpr.foundations.geo import format_name, utm_to_latlon
from vpr.foundations.layout import ROLES, SPLITS
from vpr.steps.synth.conditions import CONDITIONS, HOURS, Condition
from vpr.steps.synth.helpers import keyed_rng
from vpr.steps.synth.plan import Street

UTM_ZONE, UTM_LETTER = 17, "T"

QUERY_CONDITIONS = ("day", "overcast", "dusk", "night", "fog", "rain")
QUERY_WEIGHTS = (0.20, 0.20, 0.18, 0.12, 0.15, 0.15)


@dataclass(frozen=True)
class Capture:
    """One image to render: pose in the street frame, camera, condition and file name."""

    split: str
    role: str
    index: int
    street: int
    side: int  # 0: right facade, 1: left facade
    offset: float  # metres along the street
    lateral: float  # metres to the right of the centre line
    cam_height: float
    yaw: float
    pitch: float
    roll: float
    focal_scale: float
    condition: Condition
    name: str


class StreetIndex:
    """What ``_pose`` needs of the streets, computed once: the first database position of each street
    (bisected instead of walking the streets) and the street-length weights of the query draw."""

    def __init__(self, streets: tuple[Street, ...]) -> None:
        self.streets = streets
        self.db_starts = np.cumsum([0] + [len(s.db_offsets) for s in streets])
        lengths = np.array([s.length for s in streets])
        self.weights = lengths / lengths.sum()


def _pose(
    rng: np.random.Generator, index_: StreetIndex, role: str, index: int, spacing: float
) -> tuple[int, int, float, float]:
    """(street, side, offset, lateral): database on a grid, both sides; queries anywhere."""
    streets = index_.streets
    if role == "database":
        position, side = divmod(index, 2)
        # the street holding this position, bisected (walking the streets made planning O(N x streets))
        street_id = min(int(np.searchsorted(index_.db_starts, position, side="right")) - 1, len(streets) - 1)
        street = streets[street_id]
        position -= int(index_.db_starts[street_id])
        return (street_id, side, street.db_offsets[position] + float(rng.normal(0, 0.3)), float(rng.normal(0, 0.4)))
    street_id = int(rng.choice(len(streets), p=index_.weights))
    offset = float(rng.uniform(-spacing, streets[street_id].length + spacing))
    return street_id, int(rng.integers(0, 2)), offset, float(rng.uniform(-3.0, 3.0))


def _timestamp(rng: np.random.Generator, role: str, condition: str) -> str:
    year = 2019 if role == "database" else 2021
    lo, hi = HOURS[condition]
    return (
        f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}T"
        f"{int(rng.integers(lo, hi + 1)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    )


def camera_utm(street: Street, offset: float, lateral: float) -> tuple[float, float]:
    """UTM east/north of a camera ``offset`` metres along ``street`` and ``lateral`` to its right."""
    a = math.radians(street.azimuth)
    return (
        street.start_e + offset * math.sin(a) + lateral * math.cos(a),
        street.start_n + offset * math.cos(a) - lateral * math.sin(a),
    )


def plan_captures(
    cfg: SynthConfig,
    split: str,
    role: str,
    streets: tuple[Street, ...] | StreetIndex,
    indices: range | None = None,
) -> list[Capture]:
    """The captures ``indices`` (default: all) of one split/role, each from its own (seed, split, role,
    index) RNG, so any range can be planned on its own (the renderer plans a chunk at a time)."""
    split_id, role_id = SPLITS.index(split), ROLES.index(role)
    query = role == "queries"
    index_ = streets if isinstance(streets, StreetIndex) else StreetIndex(streets)
    streets = index_.streets
    captures = []
    for index in indices if indices is not None else range(getattr(getattr(cfg, split), role)):
        rng = keyed_rng(cfg.seed, 2, split_id, role_id, index)
        street_id, side, offset, lateral = _pose(rng, index_, role, index, cfg.place_spacing_m)
        kind = str(rng.choice(QUERY_CONDITIONS, p=QUERY_WEIGHTS)) if query else "day"
        if cfg.season == "winter" and kind == "day":  # the same draws, a colder, paler day
            kind = "winter"
        condition = CONDITIONS[kind](rng)
        yaw = float(rng.uniform(-10, 10) if query else rng.normal(0, 1.5))
        street = streets[street_id]
        east, north = camera_utm(street, offset, lateral)
        lat, lon = utm_to_latlon(east, north, UTM_ZONE, UTM_LETTER)
        heading = round(street.azimuth + (90.0 if side == 0 else -90.0) + yaw, 1) % 360.0
        name = format_name(
            east,
            north,
            utm_zone=UTM_ZONE,
            utm_letter=UTM_LETTER,
            lat=lat,
            lon=lon,
            pano_id=f"{split_id}{role_id}{index:06d}",
            heading=heading,
            timestamp=_timestamp(rng, role, kind),
            note=kind,
        )
        captures.append(
            Capture(
                split=split,
                role=role,
                index=index,
                street=street_id,
                side=side,
                offset=offset,
                lateral=lateral,
                cam_height=float(rng.uniform(2.2, 2.8)),
                yaw=yaw,
                pitch=float(rng.uniform(8, 16) if query else rng.uniform(10, 14)),
                roll=float(rng.normal(0, 1.0 if query else 0.3)),
                focal_scale=float(rng.uniform(0.9, 1.12) if query else rng.uniform(0.98, 1.02)),
                condition=condition,
                name=name,
            )
        )
    return captures
