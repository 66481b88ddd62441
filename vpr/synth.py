"""A deterministic synthetic city for visual place recognition, written as a datasets_vg tree.

Why synthetic: the pipeline must train, evaluate and be tested on machines without internet, so it
needs imagery with the properties that make VPR hard:

* perceptual aliasing: buildings come in a few shared facade styles (palette, window grid, door,
  ground floor, roof line), so different places look alike;
* distinctiveness that survives appearance change: each place still has its own arrangement of
  building widths, heights and styles, shop signs, awnings, trees and a distant skyline;
* viewpoint change: camera position (metres), lateral lane offset (scale), heading, pitch, roll and
  focal-length jitter, rendered physically through a plane-to-image homography;
* appearance change: the database is captured by day, queries by day, overcast, dusk, night, fog or
  rain (illumination, sky, cast shadows, lit windows, haze, rain streaks, sensor noise);
* moving distractors (vehicles, pedestrians) that differ between captures.

Geometry: each split owns a separate district (disjoint UTM areas, a kilometre apart), made of
straight streets lined with facades on both sides. A camera on the street looks sideways at one
facade (heading = street azimuth ± 90° plus jitter). The facade is a plane drawn as a texture in
metres and warped into the camera image; distractors are 3-D rectangles projected by the same camera.

Determinism: the city layout comes from RNGs seeded by (seed, split, street) and every image draws
from its own RNG seeded by (seed, split, role, index), so the files are byte-identical whatever the
number of worker processes.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from vpr.atomic import write_bytes_atomic
from vpr.config import SynthConfig
from vpr.geo import format_name, utm_to_latlon
from vpr.layout import ROLES, SPLITS

RGB = tuple[int, int, int]

UTM_ZONE, UTM_LETTER = 17, "T"
CITY_ORIGIN = (584000.0, 4477000.0)  # south-west corner of the city (UTM zone 17T: Pittsburgh area)
DISTRICT_GAP_M = 1000.0
JPEG_QUALITY = 90
HFOV_DEG = 75.0
SUPERSAMPLE = 2  # render at 2x and downsample: cheap anti-aliasing
POSITIONS_PER_STREET = 40  # database capture positions per street (x place_spacing_m)
STREET_MARGIN_M = 80.0  # facades extend this far past the street ends
GAP_POSITIONS = 12  # a rare stretch with no database capture (construction): queries there have no match
GAP_PROBABILITY = 0.3
SERIAL_BELOW = 48  # render in-process below this many images (tests, tiny cities)

QUERY_CONDITIONS = ("day", "overcast", "dusk", "night", "fog", "rain")
QUERY_WEIGHTS = (0.20, 0.20, 0.18, 0.12, 0.15, 0.15)


# --------------------------------------------------------------------------------------------------
# random streams


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent RNG per (seed, keys): order of generation never matters."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, *keys]))


def _rgb(values: Iterable[float]) -> RGB:
    r, g, b = (int(np.clip(v, 0, 255)) for v in values)
    return r, g, b


def _jitter(rng: np.random.Generator, colour: Iterable[float], amount: float) -> RGB:
    return _rgb([c + rng.uniform(-amount, amount) for c in colour])


# --------------------------------------------------------------------------------------------------
# the city: styles, buildings, facades, streets

WALLS: tuple[RGB, ...] = (
    (160, 72, 58), (205, 180, 140), (232, 222, 200), (150, 150, 148), (120, 90, 70),
    (170, 190, 205), (240, 238, 230), (95, 120, 100), (200, 140, 100), (110, 110, 125),
)
SIGN_COLOURS: tuple[RGB, ...] = (
    (200, 30, 30), (30, 90, 200), (240, 200, 20), (20, 150, 70), (240, 120, 20), (130, 40, 150),
    (250, 250, 250), (20, 20, 20), (0, 160, 170), (220, 60, 140),
)
CAR_COLOURS: tuple[RGB, ...] = (
    (200, 200, 205), (30, 30, 35), (150, 20, 25), (20, 50, 120), (230, 230, 230), (90, 95, 100),
    (220, 180, 30), (40, 90, 60),
)
ROOFS = ("flat", "cornice", "gable", "mansard", "stepped")
GROUNDS = ("shop", "plain", "arcade")
PATTERNS = ("plain", "bands", "pilasters", "brick")


@dataclass(frozen=True)
class Style:
    """A facade style shared by many buildings (the source of perceptual aliasing)."""

    wall: RGB
    trim: RGB
    glass: RGB
    shutter: RGB
    roof_colour: RGB
    floor_h: float
    win_w: float
    win_h: float
    win_pitch: float
    roof: str
    ground: str
    pattern: str
    shutters: bool


@dataclass(frozen=True)
class Sign:
    """A shop sign, blade sign or rooftop billboard: strong, lighting-robust place identity."""

    kind: str
    x0: float
    z0: float
    w: float
    h: float
    bg: RGB
    fg: RGB
    bars: tuple[float, ...]


@dataclass(frozen=True)
class Building:
    x0: float
    width: float
    floors: int
    style: int
    wall: RGB
    door: RGB
    door_at: float
    ground_h: float
    height: float
    signs: tuple[Sign, ...]
    awning: RGB | None
    balconies: tuple[int, ...]


@dataclass(frozen=True)
class Facade:
    """One side of a street, in its own frame: x (metres) grows to the right of the viewer."""

    buildings: tuple[Building, ...]
    skyline: tuple[tuple[float, float, float], ...]  # (x0, x1, height) of distant blocks
    trees: tuple[tuple[float, float, RGB], ...]  # (x, canopy radius, colour)
    lamps: tuple[float, ...]
    distance: float  # from the street centre line to the facade


@dataclass(frozen=True)
class Street:
    start_e: float
    start_n: float
    azimuth: float  # degrees clockwise from north, direction of travel
    length: float
    db_offsets: tuple[float, ...]  # along-street positions of database captures
    facades: tuple[Facade, Facade]  # (right, left) of the direction of travel


def make_styles(seed: int, count: int) -> tuple[Style, ...]:
    """The city's facade styles, shared by all splits (a learned model must generalise across them)."""
    rng = _rng(seed, 7, 0)
    styles = []
    for k in range(count):
        wall = WALLS[(k * 3 + int(rng.integers(0, len(WALLS)))) % len(WALLS)]
        styles.append(Style(
            wall=_jitter(rng, wall, 12),
            trim=_jitter(rng, (235, 230, 215) if rng.random() < 0.6 else (60, 55, 50), 20),
            glass=_jitter(rng, (70, 85, 105), 25),
            shutter=_jitter(rng, SIGN_COLOURS[int(rng.integers(0, len(SIGN_COLOURS)))], 30),
            roof_colour=_jitter(rng, (70, 60, 60), 25),
            floor_h=float(rng.uniform(3.0, 3.8)),
            win_w=float(rng.uniform(0.8, 1.6)),
            win_h=float(rng.uniform(1.3, 2.0)),
            win_pitch=float(rng.uniform(2.0, 3.2)),
            roof=ROOFS[k % len(ROOFS)] if k < len(ROOFS) else ROOFS[int(rng.integers(0, len(ROOFS)))],
            ground=GROUNDS[int(rng.integers(0, len(GROUNDS)))],
            pattern=PATTERNS[int(rng.integers(0, len(PATTERNS)))],
            shutters=bool(rng.random() < 0.35),
        ))
    return tuple(styles)


def _make_signs(rng: np.random.Generator, x0: float, width: float, style: Style, ground_h: float,
                height: float) -> tuple[Sign, ...]:
    def bars() -> tuple[float, ...]:
        return tuple(float(v) for v in rng.uniform(0.2, 1.0, int(rng.integers(2, 7))))

    def colours() -> tuple[RGB, RGB]:
        i, j = rng.choice(len(SIGN_COLOURS), 2, replace=False)
        return SIGN_COLOURS[int(i)], SIGN_COLOURS[int(j)]

    signs = []
    if style.ground == "shop" and rng.random() < 0.55:
        w = float(rng.uniform(0.4, 0.9)) * width
        bg, fg = colours()
        signs.append(Sign("band", x0 + float(rng.uniform(0, width - w)), ground_h - 1.0, w, 0.8, bg, fg,
                          bars()))
    if rng.random() < 0.12:
        bg, fg = colours()
        signs.append(Sign("blade", x0 + float(rng.uniform(0.3, width - 1.2)), ground_h + 0.4, 0.8,
                          float(rng.uniform(1.8, 3.5)), bg, fg, bars()))
    if rng.random() < 0.06:
        w = float(rng.uniform(0.5, 0.9)) * width
        bg, fg = colours()
        signs.append(Sign("billboard", x0 + (width - w) / 2, height + 1.0, w, float(rng.uniform(2.5, 4.0)),
                          bg, fg, bars()))
    return tuple(signs)


def _make_building(rng: np.random.Generator, x0: float, styles: tuple[Style, ...]) -> Building:
    style_id = int(rng.integers(0, len(styles)))
    style = styles[style_id]
    width = float(rng.choice([6.0, 8.0, 10.0, 12.0, 15.0, 18.0], p=[.15, .25, .25, .15, .12, .08]))
    width += float(rng.uniform(-0.5, 0.5))
    floors = int(rng.choice([2, 3, 4, 5, 6], p=[0.2, 0.3, 0.25, 0.15, 0.1]))
    ground_h = 4.2 if style.ground == "shop" else style.floor_h
    height = ground_h + (floors - 1) * style.floor_h + 0.5
    floors_with_balcony = tuple(int(f) for f in range(1, floors) if rng.random() < 0.15)
    return Building(
        x0=x0, width=width, floors=floors, style=style_id,
        wall=_jitter(rng, style.wall, 10),
        door=_jitter(rng, SIGN_COLOURS[int(rng.integers(0, len(SIGN_COLOURS)))], 40),
        door_at=float(rng.uniform(0.15, 0.85)),
        ground_h=ground_h, height=height,
        signs=_make_signs(rng, x0, width, style, ground_h, height),
        awning=_jitter(rng, SIGN_COLOURS[int(rng.integers(0, len(SIGN_COLOURS)))], 20)
        if style.ground == "shop" and rng.random() < 0.3 else None,
        balconies=floors_with_balcony,
    )


def make_facade(rng: np.random.Generator, styles: tuple[Style, ...], x_from: float, x_to: float,
                distance: float, lamp_phase: float) -> Facade:
    """A row of buildings covering [x_from, x_to], with occasional alleys, trees and a skyline."""
    buildings, x = [], x_from
    while x < x_to:
        b = _make_building(rng, x, styles)
        buildings.append(b)
        x += b.width + (float(rng.uniform(2.0, 6.0)) if rng.random() < 0.12 else 0.0)
    skyline, x = [], x_from
    while x < x_to:
        w = float(rng.uniform(10, 40))
        skyline.append((x, x + w, float(rng.uniform(14, 40))))
        x += w + float(rng.uniform(0, 15))
    n_trees = int(rng.poisson((x_to - x_from) / 45))
    trees = tuple((float(rng.uniform(x_from, x_to)), float(rng.uniform(1.4, 2.6)),
                   _jitter(rng, (60, 110, 50), 25)) for _ in range(n_trees))
    lamps = tuple(float(v) for v in np.arange(x_from + lamp_phase, x_to, 30.0))
    return Facade(tuple(buildings), tuple(skyline), trees, lamps, distance)


def _street_sizes(n_positions: int) -> list[int]:
    n_streets = max(1, round(n_positions / POSITIONS_PER_STREET))
    base, extra = divmod(n_positions, n_streets)
    return [base + (1 if k < extra else 0) for k in range(n_streets)]


def _db_offsets(rng: np.random.Generator, n: int, spacing: float) -> tuple[float, ...]:
    """Database positions every ``spacing`` metres, rarely with one stretch left uncaptured."""
    slots = list(range(n))
    if n >= 30 and rng.random() < GAP_PROBABILITY:
        start = int(rng.integers(5, n - 5))
        slots = [k if k < start else k + GAP_POSITIONS for k in slots]
    return tuple(k * spacing for k in slots)


def plan_split(cfg: SynthConfig, split: str, styles: tuple[Style, ...],
               origin: tuple[float, float]) -> tuple[tuple[Street, ...], float]:
    """Streets of one split's district, one per grid cell so that no two streets share places.

    Returns the streets and the district's east-west extent (metres) from ``origin``.
    """
    split_id = SPLITS.index(split)
    sizes = _street_sizes(math.ceil(getattr(cfg, split).database / 2))
    rngs = [_rng(cfg.seed, 1, split_id, k) for k in range(len(sizes))]
    offsets = [_db_offsets(r, n, cfg.place_spacing_m) for r, n in zip(rngs, sizes)]
    lengths = [max(o[-1], cfg.place_spacing_m) for o in offsets]
    cell = max(lengths) + 200.0  # >= 160 m between streets of neighbouring cells
    cols = math.ceil(math.sqrt(len(sizes)))
    streets = []
    for k, (rng, offs, length) in enumerate(zip(rngs, offsets, lengths)):
        azimuth = float(rng.uniform(0, 180))
        centre_e = origin[0] + (k % cols + 0.5) * cell + float(rng.uniform(-20, 20))
        centre_n = origin[1] + (k // cols + 0.5) * cell + float(rng.uniform(-20, 20))
        ue, un = math.sin(math.radians(azimuth)), math.cos(math.radians(azimuth))
        right = make_facade(rng, styles, -length - STREET_MARGIN_M, STREET_MARGIN_M,
                            float(rng.uniform(11, 15)), float(rng.uniform(0, 30)))
        left = make_facade(rng, styles, -STREET_MARGIN_M, length + STREET_MARGIN_M,
                           float(rng.uniform(11, 15)), float(rng.uniform(0, 30)))
        streets.append(Street(centre_e - ue * length / 2, centre_n - un * length / 2, azimuth, length,
                              offs, (right, left)))
    return tuple(streets), cols * cell


def plan_city(cfg: SynthConfig, styles: tuple[Style, ...]) -> dict[str, tuple[Street, ...]]:
    """One district per split, side by side from west to east with a gap, so splits never share places."""
    city, east = {}, CITY_ORIGIN[0]
    for split in SPLITS:
        city[split], extent = plan_split(cfg, split, styles, (east, CITY_ORIGIN[1]))
        east += extent + DISTRICT_GAP_M
    return city


# --------------------------------------------------------------------------------------------------
# captures: where each image is taken and under which conditions


@dataclass(frozen=True)
class Condition:
    """Illumination and weather of one capture."""

    name: str
    illum: tuple[float, float, float]
    gamma: float
    saturation: float
    sky_top: RGB
    sky_bottom: RGB
    shadow: str  # "none", "partial", "full"
    lit_windows: float
    lamps_on: bool
    fog: float
    rain: float
    exposure: float
    noise: float
    clouds: int


def _day(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.95, 1.1))
    red, green, blue = (b * float(t) for t in rng.uniform(0.96, 1.04, 3))
    illum = (red, green, blue)
    return Condition("day", illum, 1.0, 1.0,
                     _jitter(rng, (80, 130, 205), 15), _jitter(rng, (175, 205, 235), 10),
                     str(rng.choice(["none", "partial", "full"], p=[0.3, 0.5, 0.2])), 0.0, False,
                     0.0, 0.0, 1.0, 2.0, int(rng.poisson(3)))


def _overcast(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.75, 0.9))
    return Condition("overcast", (b, b * 1.01, b * 1.05), 1.0, 0.6, _jitter(rng, (180, 184, 190), 10),
                     _jitter(rng, (210, 212, 215), 8), "none", 0.0, False, 0.05, 0.0, 1.0, 3.0, 0)


def _dusk(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.55, 0.8))
    return Condition("dusk", (b, b * 0.75, b * 0.7), 1.25, 0.8, _jitter(rng, (60, 55, 115), 15),
                     _jitter(rng, (245, 150, 90), 15), "none", float(rng.uniform(0.2, 0.45)), True,
                     0.0, 0.0, 1.2, 4.0, int(rng.poisson(1)))


def _night(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.2, 0.32))
    return Condition("night", (b, b * 1.05, b * 1.5), 1.4, 0.6, _jitter(rng, (8, 10, 28), 6),
                     _jitter(rng, (35, 35, 60), 10), "none", float(rng.uniform(0.35, 0.6)), True,
                     0.0, 0.0, 1.6, 6.0, 0)


def _fog(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.85, 0.95))
    return Condition("fog", (b, b, b * 1.02), 1.0, 0.6, (205, 207, 210), (210, 212, 214), "none", 0.0,
                     False, float(rng.uniform(0.4, 0.65)), 0.0, 1.0, 3.0, 0)


def _rain(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.55, 0.7))
    return Condition("rain", (b, b * 1.02, b * 1.1), 1.1, 0.7, _jitter(rng, (110, 115, 125), 10),
                     _jitter(rng, (150, 155, 160), 10), "none", float(rng.uniform(0.0, 0.15)), False,
                     0.15, float(rng.uniform(0.5, 1.0)), 1.1, 4.0, 0)


CONDITIONS: dict[str, Callable[[np.random.Generator], Condition]] = {
    "day": _day, "overcast": _overcast, "dusk": _dusk, "night": _night, "fog": _fog, "rain": _rain,
}
HOURS = {"day": (9, 16), "overcast": (9, 17), "dusk": (19, 20), "night": (21, 23), "fog": (6, 8),
         "rain": (8, 18)}


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


def _pose(rng: np.random.Generator, streets: tuple[Street, ...], role: str, index: int,
          spacing: float) -> tuple[int, int, float, float]:
    """(street, side, offset, lateral): database on a grid, both sides; queries anywhere."""
    if role == "database":
        position, side = divmod(index, 2)
        for street_id, street in enumerate(streets):
            if position < len(street.db_offsets):
                break
            position -= len(street.db_offsets)
        return (street_id, side, street.db_offsets[position] + float(rng.normal(0, 0.3)),
                float(rng.normal(0, 0.4)))
    lengths = np.array([s.length for s in streets])
    street_id = int(rng.choice(len(streets), p=lengths / lengths.sum()))
    offset = float(rng.uniform(-spacing, streets[street_id].length + spacing))
    return street_id, int(rng.integers(0, 2)), offset, float(rng.uniform(-3.0, 3.0))


def _timestamp(rng: np.random.Generator, role: str, condition: str) -> str:
    year = 2019 if role == "database" else 2021
    lo, hi = HOURS[condition]
    return (f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}T"
            f"{int(rng.integers(lo, hi + 1)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}")


def camera_utm(street: Street, offset: float, lateral: float) -> tuple[float, float]:
    """UTM east/north of a camera ``offset`` metres along ``street`` and ``lateral`` to its right."""
    a = math.radians(street.azimuth)
    return (street.start_e + offset * math.sin(a) + lateral * math.cos(a),
            street.start_n + offset * math.cos(a) - lateral * math.sin(a))


def plan_captures(cfg: SynthConfig, split: str, role: str, streets: tuple[Street, ...]) -> list[Capture]:
    """Every capture of one split/role, each drawn from its own (seed, split, role, index) RNG."""
    split_id, role_id = SPLITS.index(split), ROLES.index(role)
    query = role == "queries"
    captures = []
    for index in range(getattr(getattr(cfg, split), role)):
        rng = _rng(cfg.seed, 2, split_id, role_id, index)
        street_id, side, offset, lateral = _pose(rng, streets, role, index, cfg.place_spacing_m)
        kind = str(rng.choice(QUERY_CONDITIONS, p=QUERY_WEIGHTS)) if query else "day"
        condition = CONDITIONS[kind](rng)
        yaw = float(rng.uniform(-10, 10) if query else rng.normal(0, 1.5))
        street = streets[street_id]
        east, north = camera_utm(street, offset, lateral)
        lat, lon = utm_to_latlon(east, north, UTM_ZONE, UTM_LETTER)
        heading = round(street.azimuth + (90.0 if side == 0 else -90.0) + yaw, 1) % 360.0
        name = format_name(east, north, utm_zone=UTM_ZONE, utm_letter=UTM_LETTER, lat=lat, lon=lon,
                           pano_id=f"{split_id}{role_id}{index:06d}", heading=heading,
                           timestamp=_timestamp(rng, role, kind), note=kind)
        captures.append(Capture(
            split=split, role=role, index=index, street=street_id, side=side, offset=offset,
            lateral=lateral, cam_height=float(rng.uniform(2.2, 2.8)), yaw=yaw,
            pitch=float(rng.uniform(8, 16) if query else rng.uniform(10, 14)),
            roll=float(rng.normal(0, 1.0 if query else 0.3)),
            focal_scale=float(rng.uniform(0.9, 1.12) if query else rng.uniform(0.98, 1.02)),
            condition=condition, name=name))
    return captures


# --------------------------------------------------------------------------------------------------
# rendering: camera, facade texture, distractors, weather


@dataclass(frozen=True)
class Camera:
    """Pinhole camera in a facade frame: x right along the facade, y towards it (facade at y=0), z up."""

    centre: np.ndarray
    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray
    focal: float
    cx: float
    cy: float

    @classmethod
    def looking_at_facade(cls, x: float, distance: float, height: float, yaw: float, pitch: float,
                          roll: float, focal: float, width: int, height_px: int) -> "Camera":
        p, y, r = math.radians(pitch), math.radians(yaw), math.radians(roll)
        forward = np.array([math.sin(y) * math.cos(p), math.cos(y) * math.cos(p), math.sin(p)])
        right0 = np.array([math.cos(y), -math.sin(y), 0.0])
        up0 = np.cross(right0, forward)
        right = math.cos(r) * right0 + math.sin(r) * up0
        up = np.cross(right, forward)
        return cls(np.array([x, -distance, height]), right, up, forward, focal, width / 2, height_px / 2)

    def pixel_rays(self) -> np.ndarray:
        """3x3 matrix mapping homogeneous pixels (u, v, 1) to world ray directions."""
        return np.stack([self.right, -self.up,
                         self.focal * self.forward - self.cx * self.right + self.cy * self.up], axis=1)

    def facade_homography(self) -> np.ndarray:
        """3x3 matrix mapping pixels to homogeneous facade coordinates (x, z, 1)."""
        cxw, cyw, czw = self.centre
        d = -cyw
        to_plane = np.array([[d, cxw, 0.0], [0.0, czw, d], [0.0, 1.0, 0.0]])
        return to_plane @ self.pixel_rays()

    def project(self, point: tuple[float, float, float]) -> tuple[float, float, float]:
        """World point → (u, v, depth); depth <= 0 means behind the camera."""
        v = np.asarray(point) - self.centre
        depth = float(v @ self.forward)
        if depth <= 1e-3:
            return 0.0, 0.0, depth
        return (self.cx + self.focal * float(v @ self.right) / depth,
                self.cy - self.focal * float(v @ self.up) / depth, depth)


def _shader(cond: Condition) -> Callable[[RGB], RGB]:
    """Colour under the capture's illumination (gamma, saturation, tinted light)."""
    cache: dict[RGB, RGB] = {}

    def shade(rgb: RGB) -> RGB:
        if rgb not in cache:
            c = (np.asarray(rgb, dtype=np.float64) / 255.0) ** cond.gamma
            grey = float(c.mean())
            c = grey + (c - grey) * cond.saturation
            c = np.clip(c * np.asarray(cond.illum) * 255.0, 0, 255)
            cache[rgb] = _rgb(c)
        return cache[rgb]

    return shade


class Canvas:
    """ImageDraw in facade metres: x right, z up, origin of the texture at (x0, z1)."""

    def __init__(self, image: Image.Image, x0: float, z1: float, ppm: float) -> None:
        self.image, self.draw = image, ImageDraw.Draw(image)
        self.x0, self.z1, self.ppm = x0, z1, ppm

    def px(self, x: float, z: float) -> tuple[float, float]:
        return (x - self.x0) * self.ppm, (self.z1 - z) * self.ppm

    def rect(self, x0: float, z0: float, x1: float, z1: float, fill: RGB | int) -> None:
        (a, b), (c, d) = self.px(min(x0, x1), max(z0, z1)), self.px(max(x0, x1), min(z0, z1))
        if c >= a and d >= b:
            self.draw.rectangle([a, b, c, d], fill=fill)

    def poly(self, points: list[tuple[float, float]], fill: RGB | int) -> None:
        self.draw.polygon([self.px(x, z) for x, z in points], fill=fill)

    def ellipse(self, x: float, z: float, rx: float, rz: float, fill: RGB | int) -> None:
        (a, b), (c, d) = self.px(x - rx, z + rz), self.px(x + rx, z - rz)
        if c - a >= 1 and d - b >= 1:
            self.draw.ellipse([a, b, c, d], fill=fill)


def _sky(width: int, height: int, top: RGB, bottom: RGB) -> Image.Image:
    t = np.linspace(0.0, 1.0, max(height, 1))[:, None]
    column = (np.asarray(top) * (1 - t) + np.asarray(bottom) * t).astype(np.uint8)
    return Image.fromarray(column[:, None, :]).resize((width, height), Image.NEAREST)


def _draw_ground(cv: Canvas, x0: float, x1: float, zmin: float, shade: Callable[[RGB], RGB]) -> None:
    cv.rect(x0, zmin, x1, -1.1, shade((70, 70, 74)))
    cv.rect(x0, -1.1, x1, -0.95, shade((175, 175, 170)))
    cv.rect(x0, -0.95, x1, 0.0, shade((150, 148, 140)))


def _draw_windows(cv: Canvas, b: Building, s: Style, shade: Callable[[RGB], RGB],
                  windows: list[tuple[float, float, float, float]]) -> None:
    cols = max(1, int((b.width - 1.0) // s.win_pitch))
    first = b.x0 + (b.width - cols * s.win_pitch) / 2 + s.win_pitch / 2
    win_h = min(s.win_h, s.floor_h - 1.2)
    for floor in range(1, b.floors):
        z0 = b.ground_h + (floor - 1) * s.floor_h + 0.9
        for c in range(cols):
            xc = first + c * s.win_pitch
            if s.shutters:
                cv.rect(xc - s.win_w / 2 - 0.45, z0, xc + s.win_w / 2 + 0.45, z0 + win_h, shade(s.shutter))
            cv.rect(xc - s.win_w / 2 - 0.1, z0 - 0.1, xc + s.win_w / 2 + 0.1, z0 + win_h + 0.1,
                    shade(s.trim))
            cv.rect(xc - s.win_w / 2, z0, xc + s.win_w / 2, z0 + win_h, shade(s.glass))
            windows.append((xc - s.win_w / 2, z0, xc + s.win_w / 2, z0 + win_h))
        if floor in b.balconies:
            cv.rect(first - s.win_w, z0 - 0.2, first + (cols - 1) * s.win_pitch + s.win_w, z0 + 0.6,
                    shade(s.trim))


def _draw_ground_floor(cv: Canvas, b: Building, s: Style, shade: Callable[[RGB], RGB],
                       windows: list[tuple[float, float, float, float]]) -> None:
    door_x = b.x0 + b.door_at * b.width
    if s.ground == "shop":
        cv.rect(b.x0 + 0.4, 0.4, b.x0 + b.width - 0.4, b.ground_h - 1.2, shade(s.trim))
        cv.rect(b.x0 + 0.6, 0.6, b.x0 + b.width - 0.6, b.ground_h - 1.4, shade(s.glass))
        windows.append((b.x0 + 0.6, 0.6, b.x0 + b.width - 0.6, b.ground_h - 1.4))
        cv.rect(b.x0 + 0.2, b.ground_h - 1.1, b.x0 + b.width - 0.2, b.ground_h - 0.1, shade(s.trim))
    elif s.ground == "arcade":
        n = max(1, int(b.width // 3.0))
        step = b.width / n
        for k in range(n):
            xc = b.x0 + (k + 0.5) * step
            cv.rect(xc - step * 0.35, 0.0, xc + step * 0.35, b.ground_h - 1.2, shade((40, 38, 40)))
            cv.ellipse(xc, b.ground_h - 1.2, step * 0.35, 0.7, shade((40, 38, 40)))
    else:
        for xc in (b.x0 + 0.25 * b.width, b.x0 + 0.75 * b.width):
            if abs(xc - door_x) > 1.5:
                cv.rect(xc - s.win_w / 2, 1.0, xc + s.win_w / 2, 1.0 + s.win_h, shade(s.glass))
    cv.rect(door_x - 0.6, 0.0, door_x + 0.6, 2.3, shade(b.door))
    if b.awning is not None:
        z = b.ground_h - 1.2
        cv.poly([(b.x0 + 0.3, z), (b.x0 + b.width - 0.3, z), (b.x0 + b.width, z - 0.8), (b.x0, z - 0.8)],
                shade(b.awning))


def _draw_roof(cv: Canvas, b: Building, s: Style, shade: Callable[[RGB], RGB]) -> None:
    x0, x1, h = b.x0, b.x0 + b.width, b.height
    if s.roof == "cornice":
        cv.rect(x0 - 0.3, h - 0.6, x1 + 0.3, h, shade(s.trim))
    elif s.roof == "gable":
        cv.poly([(x0, h), (x1, h), ((x0 + x1) / 2, h + min(4.0, b.width * 0.3))], shade(s.roof_colour))
    elif s.roof == "mansard":
        cv.poly([(x0, h), (x1, h), (x1 - 1.2, h + 2.6), (x0 + 1.2, h + 2.6)], shade(s.roof_colour))
    elif s.roof == "stepped":
        cv.rect(x0 + b.width * 0.3, h, x1 - b.width * 0.3, h + 1.3, shade(b.wall))
        cv.rect(x0, h - 0.3, x1, h, shade(s.trim))
    else:
        cv.rect(x0, h - 0.35, x1, h, shade(s.trim))


def _draw_pattern(cv: Canvas, b: Building, s: Style, shade: Callable[[RGB], RGB]) -> None:
    x0, x1 = b.x0, b.x0 + b.width
    if s.pattern == "bands":
        for floor in range(1, b.floors):
            z = b.ground_h + (floor - 1) * s.floor_h
            cv.rect(x0, z - 0.15, x1, z + 0.15, shade(s.trim))
    elif s.pattern == "pilasters":
        cv.rect(x0, 0, x0 + 0.5, b.height, shade(s.trim))
        cv.rect(x1 - 0.5, 0, x1, b.height, shade(s.trim))
    elif s.pattern == "brick":
        dark = _rgb(c * 0.85 for c in b.wall)
        for z in np.arange(b.ground_h + 0.6, b.height - 0.5, 0.6):
            cv.rect(x0, float(z), x1, float(z) + 0.08, shade(dark))


def _draw_sign(cv: Canvas, sign: Sign, shade: Callable[[RGB], RGB]) -> None:
    if sign.kind == "billboard":
        for x in (sign.x0 + 0.3, sign.x0 + sign.w - 0.5):
            cv.rect(x, sign.z0 - 1.0, x + 0.2, sign.z0, shade((60, 60, 60)))
    cv.rect(sign.x0, sign.z0, sign.x0 + sign.w, sign.z0 + sign.h, shade(sign.bg))
    vertical = sign.kind == "blade"
    n = len(sign.bars)
    for k, size in enumerate(sign.bars):
        if vertical:
            z = sign.z0 + sign.h * (k + 0.2) / n
            cv.rect(sign.x0 + 0.15, z, sign.x0 + sign.w - 0.15, z + sign.h * 0.6 / n * size, shade(sign.fg))
        else:
            x = sign.x0 + sign.w * (k + 0.15) / n
            cv.rect(x, sign.z0 + sign.h * 0.2, x + sign.w * 0.7 / n * size, sign.z0 + sign.h * 0.8,
                    shade(sign.fg))


def _draw_building(cv: Canvas, b: Building, s: Style, shade: Callable[[RGB], RGB],
                   windows: list[tuple[float, float, float, float]]) -> None:
    _draw_roof(cv, b, s, shade)
    cv.rect(b.x0, 0.0, b.x0 + b.width, b.height, shade(b.wall))
    if s.roof == "cornice":
        cv.rect(b.x0 - 0.3, b.height - 0.6, b.x0 + b.width + 0.3, b.height, shade(s.trim))
    _draw_pattern(cv, b, s, shade)
    _draw_windows(cv, b, s, shade, windows)
    _draw_ground_floor(cv, b, s, shade, windows)
    for sign in b.signs:
        _draw_sign(cv, sign, shade)


def _draw_trees_and_lamps(cv: Canvas, facade: Facade, x0: float, x1: float,
                          shade: Callable[[RGB], RGB]) -> None:
    for x in facade.lamps:
        if x0 - 2 < x < x1 + 2:
            cv.rect(x - 0.08, 0.0, x + 0.08, 6.0, shade((50, 52, 55)))
            cv.rect(x - 0.08, 5.9, x + 1.0, 6.05, shade((50, 52, 55)))
    for x, r, colour in facade.trees:
        if x0 - 2 * r < x < x1 + 2 * r:
            cv.rect(x - 0.15, 0.0, x + 0.15, 3.0, shade((90, 65, 45)))
            cv.ellipse(x, 4.2, r, r * 1.1, shade(colour))
            cv.ellipse(x - r * 0.5, 3.8, r * 0.7, r * 0.7, shade(_rgb(c * 0.85 for c in colour)))


def _solid_mask(size: tuple[int, int], cv: Canvas, facade: Facade, x0: float, x1: float,
                zmin: float) -> Image.Image:
    mask = Image.new("L", size, 0)
    mc = Canvas(mask, cv.x0, cv.z1, cv.ppm)
    mc.rect(x0, zmin, x1, 0.0, 255)
    for b in facade.buildings:
        if b.x0 < x1 and b.x0 + b.width > x0:
            mc.rect(b.x0, 0.0, b.x0 + b.width, b.height, 255)
    return mask


def _apply_shadow(tex: Image.Image, cv: Canvas, facade: Facade, box: tuple[float, float, float, float],
                  rng: np.random.Generator, mode: str) -> Image.Image:
    """Darken the facade under a cast shadow from the buildings behind the camera."""
    x0, x1, zmin, _ = box
    shadow = Image.new("L", tex.size, 0)
    sc = Canvas(shadow, cv.x0, cv.z1, cv.ppm)
    if mode == "full":
        sc.rect(x0, zmin, x1, 60.0, 255)
    else:
        slope = float(rng.uniform(-0.4, 0.4))
        points, x = [(x0, zmin)], x0
        while x < x1:
            step = float(rng.uniform(4, 14))
            h = float(rng.uniform(2, 14))
            points += [(x, h + slope * (x - x0)), (x + step, h + slope * (x + step - x0))]
            x += step
        points.append((x, zmin))
        sc.poly(points, 255)
    mask = ImageChops.darker(shadow, _solid_mask(tex.size, cv, facade, x0, x1, zmin))
    dark = ImageChops.multiply(tex, Image.new("RGB", tex.size, (135, 145, 175)))
    return Image.composite(dark, tex, mask)


def _draw_emissive(cv: Canvas, facade: Facade, windows: list[tuple[float, float, float, float]],
                   cond: Condition, rng: np.random.Generator, x0: float, x1: float) -> None:
    for wx0, wz0, wx1, wz1 in windows:
        if rng.random() < cond.lit_windows:
            cv.rect(wx0, wz0, wx1, wz1, _jitter(rng, (250, 210, 130), 25))
    if cond.lamps_on:
        for x in facade.lamps:
            if x0 - 2 < x < x1 + 2:
                cv.ellipse(x + 0.9, 5.85, 0.35, 0.2, (255, 240, 190))


def visible_box(cam: Camera, width: int, height: int) -> tuple[float, float, float, float]:
    """Facade region (x0, x1, zmin, zmax) seen by the camera, from its corner rays."""
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], dtype=float).T
    h = cam.facade_homography() @ corners
    xs, zs = h[0] / h[2], h[1] / h[2]
    zmin, zmax = max(float(zs.min()) - 1, -200.0), min(float(zs.max()) + 1, 200.0)  # bounded if nearly parallel
    return float(xs.min()) - 1, float(xs.max()) + 1, zmin, zmax


def render_facade_view(facade: Facade, styles: tuple[Style, ...], cam: Camera, width: int, height: int,
                       cond: Condition, rng: np.random.Generator) -> Image.Image:
    """Draw the visible part of the facade as a texture and warp it into the camera."""
    x0, x1, zmin, zmax = visible_box(cam, width, height)
    ppm = min(cam.focal / -cam.centre[1], 4000 / max(x1 - x0, zmax - zmin))
    size = (max(2, int((x1 - x0) * ppm)), max(2, int((zmax - zmin) * ppm)))
    tex = _sky(size[0], size[1], cond.sky_top, cond.sky_bottom)
    cv = Canvas(tex, x0, zmax, ppm)
    shade = _shader(cond)
    for _ in range(cond.clouds):
        cv.ellipse(float(rng.uniform(x0, x1)), float(rng.uniform(14, 30)), float(rng.uniform(3, 9)),
                   float(rng.uniform(1, 2.5)), _jitter(rng, (240, 242, 245), 8))
    haze = _rgb(0.5 * a + 0.5 * b for a, b in zip(shade((110, 115, 125)), cond.sky_bottom))
    for sx0, sx1, sh in facade.skyline:
        if sx0 < x1 and sx1 > x0:
            cv.rect(sx0, 0.0, sx1, sh, haze)
    _draw_ground(cv, x0, x1, zmin, shade)
    windows: list[tuple[float, float, float, float]] = []
    for b in facade.buildings:
        if b.x0 < x1 + 1 and b.x0 + b.width > x0 - 1:
            _draw_building(cv, b, styles[b.style], shade, windows)
    _draw_trees_and_lamps(cv, facade, x0, x1, shade)
    if cond.shadow != "none":
        tex = _apply_shadow(tex, cv, facade, (x0, x1, zmin, zmax), rng, cond.shadow)
        cv = Canvas(tex, x0, zmax, ppm)
    _draw_emissive(cv, facade, windows, cond, rng, x0, x1)
    metres_to_tex = np.array([[ppm, 0.0, -x0 * ppm], [0.0, -ppm, zmax * ppm], [0.0, 0.0, 1.0]])
    to_tex = metres_to_tex @ cam.facade_homography()
    to_tex /= to_tex[2, 2]
    return tex.transform((width, height), Image.PERSPECTIVE, tuple(to_tex.ravel()[:8]), Image.BILINEAR,
                         fillcolor=cond.sky_top)


def _quad(cam: Camera, y: float, x0: float, z0: float, x1: float,
          z1: float) -> list[tuple[float, float]] | None:
    """Image polygon of an upright rectangle at depth plane ``y``; None if it reaches behind the camera."""
    pts = [cam.project((x, y, z)) for x, z in ((x0, z0), (x1, z0), (x1, z1), (x0, z1))]
    if any(p[2] <= 0.5 for p in pts):
        return None
    return [(p[0], p[1]) for p in pts]


def _draw_vehicle(draw: ImageDraw.ImageDraw, cam: Camera, x: float, y: float, rng: np.random.Generator,
                  shade: Callable[[RGB], RGB], cond: Condition) -> None:
    big = rng.random() < 0.08
    length = float(rng.uniform(8, 11) if big else rng.uniform(3.8, 4.8))
    body_top = float(rng.uniform(2.6, 3.1) if big else rng.uniform(0.95, 1.1))
    colour = shade(CAR_COLOURS[int(rng.integers(0, len(CAR_COLOURS)))])
    glass = shade((40, 50, 60))
    body = _quad(cam, y, x, 0.3, x + length, body_top)
    if body is None:
        return
    draw.polygon(body, fill=colour)
    if big:
        for k in range(int(length // 1.6)):
            q = _quad(cam, y, x + 0.4 + k * 1.6, body_top - 1.1, x + 1.6 + k * 1.6, body_top - 0.3)
            if q:
                draw.polygon(q, fill=glass)
    else:
        cabin = [cam.project((xx, y, zz)) for xx, zz in ((x + 0.22 * length, body_top),
                 (x + 0.8 * length, body_top), (x + 0.68 * length, body_top + 0.55),
                 (x + 0.32 * length, body_top + 0.55))]
        draw.polygon([(p[0], p[1]) for p in cabin], fill=glass)
    for wx in (x + 0.18 * length, x + 0.82 * length):
        u, v, depth = cam.project((wx, y - 0.1, 0.35))
        r = cam.focal * 0.35 / depth
        draw.ellipse([u - r, v - r, u + r, v + r], fill=shade((20, 20, 22)))
    if cond.lamps_on:
        for lx in (x + 0.05, x + length - 0.05):
            u, v, depth = cam.project((lx, y - 0.1, 0.75))
            r = cam.focal * 0.15 / depth
            draw.ellipse([u - r, v - r, u + r, v + r], fill=(255, 230, 180) if lx > x + 1 else (230, 40, 30))


def _draw_pedestrian(draw: ImageDraw.ImageDraw, cam: Camera, x: float, y: float, rng: np.random.Generator,
                     shade: Callable[[RGB], RGB], cond: Condition) -> None:
    h = float(rng.uniform(1.55, 1.9))
    legs = _quad(cam, y, x - 0.15, 0.0, x + 0.15, h * 0.48)
    torso = _quad(cam, y, x - 0.25, h * 0.47, x + 0.25, h * 0.85)
    if legs is None or torso is None:
        return
    draw.polygon(legs, fill=shade(_jitter(rng, (50, 50, 70), 40)))
    draw.polygon(torso, fill=shade(CAR_COLOURS[int(rng.integers(0, len(CAR_COLOURS)))]))
    u, v, depth = cam.project((x, y, h * 0.92))
    r = cam.focal * 0.11 / depth
    draw.ellipse([u - r, v - r, u + r, v + r], fill=shade(_jitter(rng, (200, 160, 130), 50)))
    if cond.rain > 0 and rng.random() < 0.6:
        u, v, depth = cam.project((x, y, h + 0.15))
        r = cam.focal * 0.55 / depth
        draw.pieslice([u - r, v - r * 0.7, u + r, v + r * 0.7], 180, 360,
                      fill=shade(SIGN_COLOURS[int(rng.integers(0, len(SIGN_COLOURS)))]))


def draw_distractors(image: Image.Image, cam: Camera, rng: np.random.Generator, cond: Condition) -> None:
    """Vehicles on the road and pedestrians on the sidewalk, new for every capture."""
    d = -float(cam.centre[1])
    half = math.tan(math.radians(HFOV_DEG / 2)) * 1.2
    items = []
    for _ in range(int(rng.poisson(1.3))):
        y = float(rng.uniform(-d + 4.5, -3.5)) if d > 8 else -3.5
        depth = y + d
        items.append((y, "vehicle", float(cam.centre[0] + rng.uniform(-half, half) * depth - 2.0)))
    for _ in range(int(rng.poisson(2.0))):
        y = float(rng.uniform(-2.8, -0.6))
        items.append((y, "pedestrian", float(cam.centre[0] + rng.uniform(-half, half) * (y + d))))
    draw, shade = ImageDraw.Draw(image), _shader(cond)
    for y, kind, x in sorted(items, key=lambda item: -item[0]):  # farthest (closest to facade) first
        (_draw_vehicle if kind == "vehicle" else _draw_pedestrian)(draw, cam, x, y, rng, shade, cond)


def _rain_streaks(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    layer = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(layer)
    w, h = image.size
    n = int(strength * 0.004 * w * h) + 1
    slant = float(rng.uniform(-0.25, 0.25))
    for x, y, length in zip(rng.uniform(0, w, n), rng.uniform(0, h, n), rng.uniform(0.04, 0.12, n) * h):
        draw.line([(x, y), (x + slant * length, y + length)], fill=int(rng.integers(90, 200)),
                  width=max(1, w // 320))
    streaks = Image.new("RGB", image.size, (210, 215, 225))
    return Image.composite(streaks, image, layer).filter(ImageFilter.GaussianBlur(w / 400))


def apply_weather(image: Image.Image, cond: Condition, rng: np.random.Generator) -> Image.Image:
    """Camera-level effects: rain streaks, haze, exposure and sensor noise."""
    if cond.rain > 0:
        image = _rain_streaks(image, rng, cond.rain)
    arr = np.asarray(image, dtype=np.float32)
    if cond.fog > 0:
        rows = np.linspace(1.0, 0.75, arr.shape[0], dtype=np.float32)[:, None, None]
        alpha = cond.fog * rows
        arr = arr * (1 - alpha) + np.float32(205.0) * alpha
    arr = arr * np.float32(cond.exposure) + rng.normal(0, cond.noise, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def render_capture(cap: Capture, street: Street, styles: tuple[Style, ...], seed: int, width: int,
                   height: int, distractors: bool) -> Image.Image:
    """The image of one capture, deterministic in (seed, split, role, index)."""
    rng = _rng(seed, 3, SPLITS.index(cap.split), ROLES.index(cap.role), cap.index)
    facade = street.facades[cap.side]
    x = -cap.offset if cap.side == 0 else cap.offset
    distance = facade.distance - cap.lateral if cap.side == 0 else facade.distance + cap.lateral
    ss = SUPERSAMPLE
    focal = cap.focal_scale * (width * ss / 2) / math.tan(math.radians(HFOV_DEG / 2))
    cam = Camera.looking_at_facade(x, max(distance, 4.0), cap.cam_height, cap.yaw, cap.pitch, cap.roll,
                                   focal, width * ss, height * ss)
    image = render_facade_view(facade, styles, cam, width * ss, height * ss, cap.condition, rng)
    if distractors:
        draw_distractors(image, cam, rng, cap.condition)
    image = image.reduce(ss)
    return apply_weather(image, cap.condition, rng)


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes with fixed settings and no metadata, so identical pixels give identical files."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# writing the tree

_WORKER: dict = {}


def _init_worker(state: dict) -> None:
    _WORKER.update(state)


def _render_and_write(cap: Capture) -> str:
    s = _WORKER
    image = render_capture(cap, s["city"][cap.split][cap.street], s["styles"], s["seed"], s["width"],
                           s["height"], s["distractors"])
    write_bytes_atomic(Path(s["root"]) / "images" / cap.split / cap.role / cap.name, encode_jpeg(image))
    return cap.name


def _fork_context() -> mp.context.BaseContext | None:
    """Fork only from a single-threaded process: forking beside other threads can deadlock, and
    spawn would re-import the caller's ``__main__`` (breaks scripts without a main guard)."""
    if threading.active_count() > 1 or "fork" not in mp.get_all_start_methods():
        return None
    return mp.get_context("fork")


def _workers(n_jobs: int, requested: int | None) -> int:
    if requested is not None:
        return max(1, requested)
    if n_jobs < SERIAL_BELOW:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _render_all(jobs: list[Capture], state: dict, workers: int) -> None:
    context = _fork_context() if workers > 1 else None
    if context is None:
        _init_worker(state)
        for cap in jobs:
            _render_and_write(cap)
        return
    with context.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
        for _ in pool.imap_unordered(_render_and_write, jobs, chunksize=8):
            pass


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Drop images of an earlier, different generation so the tree matches the config exactly."""
    for path in folder.glob("*.jpg"):
        if path.name not in keep:
            path.unlink()


def _queries_without_match(captures: list[Capture], streets: tuple[Street, ...], radius: float) -> int:
    def xy(role: str) -> np.ndarray:
        return np.array([camera_utm(streets[c.street], c.offset, c.lateral)
                         for c in captures if c.role == role])

    db, q = xy("database"), xy("queries")
    d2 = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    return int((d2.min(1) > radius * radius).sum())


def generate_city(out_root: str | Path, cfg: SynthConfig, workers: int | None = None) -> dict:
    """Render the synthetic city under ``out_root/images/{split}/{role}``; returns counts per split/role.

    ``workers``: processes to render with (default: one per CPU, serial for tiny cities or when the
    caller runs other threads). The files do not depend on it. Images of an earlier generation that
    this config does not produce are removed, so the tree always matches the config.
    """
    root = Path(out_root)
    styles = make_styles(cfg.seed, cfg.facade_styles)
    city = plan_city(cfg, styles)
    captures = {(split, role): plan_captures(cfg, split, role, city[split])
                for split in SPLITS for role in ROLES}
    jobs = [cap for caps in captures.values() for cap in caps]
    for split, role in captures:
        (root / "images" / split / role).mkdir(parents=True, exist_ok=True)
    state = {"city": city, "styles": styles, "seed": cfg.seed, "width": cfg.width, "height": cfg.height,
             "distractors": cfg.distractors, "root": str(root)}
    _render_all(jobs, state, _workers(len(jobs), workers))
    for (split, role), caps in captures.items():
        _remove_stale(root / "images" / split / role, {c.name for c in caps})
    counts = {split: {role: len(captures[split, role]) for role in ROLES} for split in SPLITS}
    unmatched = {split: _queries_without_match(captures[split, "database"] + captures[split, "queries"],
                                               city[split], 25.0) for split in SPLITS}
    return {"out_root": str(root), "counts": counts, "images": len(jobs),
            "queries_without_db_within_25m": unmatched}
