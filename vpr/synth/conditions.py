"""Capture conditions: illumination and weather (day, overcast, dusk, night, fog, rain).

Each condition is drawn from the capture's own RNG; the renderer only reads the resulting ``Condition``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vpr.synth.helpers import RGB, jitter


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
    return Condition(
        "day",
        illum,
        1.0,
        1.0,
        jitter(rng, (80, 130, 205), 15),
        jitter(rng, (175, 205, 235), 10),
        str(rng.choice(["none", "partial", "full"], p=[0.3, 0.5, 0.2])),
        0.0,
        False,
        0.0,
        0.0,
        1.0,
        2.0,
        int(rng.poisson(3)),
    )


def _overcast(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.75, 0.9))
    return Condition(
        "overcast",
        (b, b * 1.01, b * 1.05),
        1.0,
        0.6,
        jitter(rng, (180, 184, 190), 10),
        jitter(rng, (210, 212, 215), 8),
        "none",
        0.0,
        False,
        0.05,
        0.0,
        1.0,
        3.0,
        0,
    )


def _dusk(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.55, 0.8))
    return Condition(
        "dusk",
        (b, b * 0.75, b * 0.7),
        1.25,
        0.8,
        jitter(rng, (60, 55, 115), 15),
        jitter(rng, (245, 150, 90), 15),
        "none",
        float(rng.uniform(0.2, 0.45)),
        True,
        0.0,
        0.0,
        1.2,
        4.0,
        int(rng.poisson(1)),
    )


def _night(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.2, 0.32))
    return Condition(
        "night",
        (b, b * 1.05, b * 1.5),
        1.4,
        0.6,
        jitter(rng, (8, 10, 28), 6),
        jitter(rng, (35, 35, 60), 10),
        "none",
        float(rng.uniform(0.35, 0.6)),
        True,
        0.0,
        0.0,
        1.6,
        6.0,
        0,
    )


def _fog(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.85, 0.95))
    return Condition(
        "fog",
        (b, b, b * 1.02),
        1.0,
        0.6,
        (205, 207, 210),
        (210, 212, 214),
        "none",
        0.0,
        False,
        float(rng.uniform(0.4, 0.65)),
        0.0,
        1.0,
        3.0,
        0,
    )


def _rain(rng: np.random.Generator) -> Condition:
    b = float(rng.uniform(0.55, 0.7))
    return Condition(
        "rain",
        (b, b * 1.02, b * 1.1),
        1.1,
        0.7,
        jitter(rng, (110, 115, 125), 10),
        jitter(rng, (150, 155, 160), 10),
        "none",
        float(rng.uniform(0.0, 0.15)),
        False,
        0.15,
        float(rng.uniform(0.5, 1.0)),
        1.1,
        4.0,
        0,
    )


CONDITIONS: dict[str, Callable[[np.random.Generator], Condition]] = {
    "day": _day,
    "overcast": _overcast,
    "dusk": _dusk,
    "night": _night,
    "fog": _fog,
    "rain": _rain,
}
HOURS = {"day": (9, 16), "overcast": (9, 17), "dusk": (19, 20), "night": (21, 23), "fog": (6, 8), "rain": (8, 18)}
