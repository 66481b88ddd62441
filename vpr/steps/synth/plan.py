"""The city plan: facade styles, buildings, signs, facades and streets, one district per split.

Pure geometry and colour in street/facade coordinates (metres); nothing here renders. The layout is
drawn from RNGs keyed by (seed, split, street), so it is the same whatever renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vpr.foundations.config import SynthConfig
from vpr.foundations.layout import SPLITS
from vpr.steps.synth.helpers import RGB, jitter, keyed_rng

CITY_ORIGIN = (584000.0, 4477000.0)  # south-west corner of the city (UTM zone 17T: Pittsburgh area)
DISTRICT_GAP_M = 1000.0
POSITIONS_PER_STREET = 40  # database capture positions per street (x place_spacing_m)
STREET_MARGIN_M = 80.0  # facades extend this far past the street ends
GAP_POSITIONS = 12  # a rare stretch with no database capture (construction): queries there have no match
GAP_PROBABILITY = 0.3

# fmt: off
WALLS: tuple[RGB, ...] = (
    (160, 72, 58), (205, 180, 140), (232, 222, 200), (150, 150, 148), (120, 90, 70),
    (170, 190, 205), (240, 238, 230), (95, 120, 100), (200, 140, 100), (110, 110, 125),
)
SIGN_COLOURS: tuple[RGB, ...] = (
    (200, 30, 30), (30, 90, 200), (240, 200, 20), (20, 150, 70), (240, 120, 20),
    (130, 40, 150), (250, 250, 250), (20, 20, 20), (0, 160, 170), (220, 60, 140),
)
CAR_COLOURS: tuple[RGB, ...] = (
    (200, 200, 205), (30, 30, 35), (150, 20, 25), (20, 50, 120),
    (230, 230, 230), (90, 95, 100), (220, 180, 30), (40, 90, 60),
)
# fmt: on
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
    rng = keyed_rng(seed, 7, 0)
    styles = []
    for k in range(count):
        wall = WALLS[(k * 3 + int(rng.integers(0, len(WALLS)))) % len(WALLS)]
        styles.append(
            Style(
                wall=jitter(rng, wall, 12),
                trim=jitter(rng, (235, 230, 215) if rng.random() < 0.6 else (60, 55, 50), 20),
                glass=jitter(rng, (70, 85, 105), 25),
                shutter=jitter(rng, SIGN_COLOURS[int(rng.integers(0, len(SIGN_COLOURS)))], 30),
                roof_colour=jitter(rng, (70, 60, 60), 25),
                floor_h=float(rng.uniform(3.0, 3.8)),
                win_w=float(rng.uniform(0.8, 1.6)),
                win_h=float(rng.uniform(1.3, 2.0)),
                win_pitch=float(rng.uniform(2.0, 3.2)),
                roof=ROOFS[k % len(ROOFS)] if k < len(ROOFS) else ROOFS[int(rng.integers(0, len(ROOFS)))],
                ground=GROUNDS[int(rng.integers(0, len(GROUNDS)))],
                pattern=PATTERNS[int(rng.integers(0, len(PATTERNS)))],
                shutters=bool(rng.random() < 0.35),
            )
        )
    return tuple(styles)


def _make_signs(
    rng: np.random.Generator, x0: float, width: float, style: Style, ground_h: float, height: float
) -> tuple[Sign, ...]:
    def bars() -> tuple[float, ...]:
        return tuple(float(v) for v in rng.uniform(0.2, 1.0, int(rng.integers(2, 7))))

    def colours() -> tuple[RGB, RGB]:
        i, j = rng.choice(len(SIGN_COLOURS), 2, replace=False)
        return SIGN_COLOURS[int(i)], SIGN_COLOURS[int(j)]

    signs = []
    if style.ground == "shop" and rng.random() < 0.55:
        w = float(rng.uniform(0.4, 0.9)) * width
        bg, fg = colours()
        signs.append(Sign("band", x0 + float(rng.uniform(0, width - w)), ground_h - 1.0, w, 0.8, bg, fg, bars()))
    if rng.random() < 0.12:
        bg, fg = colours()
        signs.append(
            Sign(
                "blade",
                x0 + float(rng.uniform(0.3, width - 1.2)),
                ground_h + 0.4,
                0.8,
                float(rng.uniform(1.8, 3.5)),
                bg,
                fg,
                bars(),
            )
        )
    if rng.random() < 0.06:
        w = float(rng.uniform(0.5, 0.9)) * width
        bg, fg = colours()
        signs.append(
            Sign("billboard", x0 + (width - w) / 2, height + 1.0, w, float(rng.uniform(2.5, 4.0)), bg, fg, bars())
        )
    return tuple(signs)


def _make_building(rng: np.random.Generator, x0: float, styles: tuple[Style, ...]) -> Building:
    style_id = int(rng.integers(0, len(styles)))
    style = styles[style_id]
    width = float(rng.choice([6.0, 8.0, 10.0, 12.0, 15.0, 18.0], p=[0.15, 0.25, 0.25, 0.15, 0.12, 0.08]))
    width += float(rng.uniform(-0.5, 0.5))
    floors = int(rng.choice([2, 3, 4, 5, 6], p=[0.2, 0.3, 0.25, 0.15, 0.1]))
    ground_h = 4.2 if style.ground == "shop" else style.floor_h
    height = ground_h + (floors - 1) * style.floor_h + 0.5
    floors_with_balcony = tuple(int(f) for f in range(1, floors) if rng.random() < 0.15)
    return Building(
        x0=x0,
        width=width,
        floors=floors,
        style=style_id,
        wall=jitter(rng, style.wall, 10),
        door=jitter(rng, SIGN_COLOURS[int(rng.integers(0, len(SIGN_COLOURS)))], 40),
        door_at=float(rng.uniform(0.15, 0.85)),
        ground_h=ground_h,
        height=height,
        signs=_make_signs(rng, x0, width, style, ground_h, height),
        awning=jitter(rng, SIGN_COLOURS[int(rng.integers(0, len(SIGN_COLOURS)))], 20)
        if style.ground == "shop" and rng.random() < 0.3
        else None,
        balconies=floors_with_balcony,
    )


def make_facade(
    rng: np.random.Generator, styles: tuple[Style, ...], x_from: float, x_to: float, distance: float, lamp_phase: float
) -> Facade:
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
    trees = tuple(
        (float(rng.uniform(x_from, x_to)), float(rng.uniform(1.4, 2.6)), jitter(rng, (60, 110, 50), 25))
        for _ in range(n_trees)
    )
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


def plan_split(
    cfg: SynthConfig, split: str, styles: tuple[Style, ...], origin: tuple[float, float]
) -> tuple[tuple[Street, ...], float]:
    """Streets of one split's district, one per grid cell so that no two streets share places.

    Returns the streets and the district's east-west extent (metres) from ``origin``.
    """
    split_id = SPLITS.index(split)
    sizes = _street_sizes(math.ceil(getattr(cfg, split).database / 2))
    rngs = [keyed_rng(cfg.seed, 1, split_id, k) for k in range(len(sizes))]
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
        right = make_facade(
            rng,
            styles,
            -length - STREET_MARGIN_M,
            STREET_MARGIN_M,
            float(rng.uniform(11, 15)),
            float(rng.uniform(0, 30)),
        )
        left = make_facade(
            rng,
            styles,
            -STREET_MARGIN_M,
            length + STREET_MARGIN_M,
            float(rng.uniform(11, 15)),
            float(rng.uniform(0, 30)),
        )
        streets.append(
            Street(centre_e - ue * length / 2, centre_n - un * length / 2, azimuth, length, offs, (right, left))
        )
    return tuple(streets), cols * cell


def plan_city(cfg: SynthConfig, styles: tuple[Style, ...]) -> dict[str, tuple[Street, ...]]:
    """One district per split, side by side from west to east with a gap, so splits never share places."""
    city, east = {}, CITY_ORIGIN[0]
    north = CITY_ORIGIN[1] + 1000.0 * cfg.offset_km  # a test town lies apart from the city
    for split in SPLITS:
        city[split], extent = plan_split(cfg, split, styles, (east, north))
        east += extent + DISTRICT_GAP_M
    return city
