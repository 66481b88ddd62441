"""Capture conditions: illumination and weather (day, overcast, dusk, night, fog, rain; winter in a winter town).

Each condition is drawn from the capture's own RNG; the renderer only reads the resulting ``Condition``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from vpr.steps.synth.helpers import RGB, jitter


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


Range = tuple[float, float]
SHADOWS = ("none", "partial", "full")


@dataclass(frozen=True)
class _Recipe:
    """How a condition is drawn from the capture's RNG; a ``Range`` is one uniform draw."""

    brightness: Range
    tint: tuple[float, float, float] | Range  # per-channel multipliers of the brightness, or a range each is drawn from
    gamma: float
    saturation: float
    exposure: float
    noise: float
    clouds: float  # Poisson mean of the number of clouds; 0: none
    sky: tuple[RGB, RGB]  # (top, bottom)
    sky_jitter: tuple[float, float] | None  # jitter amounts of (top, bottom); None keeps the sky as it is
    shadow_p: tuple[float, float, float] | None  # probabilities of SHADOWS; None: always "none"
    lit_windows: float | Range
    lamps_on: bool
    fog: float | Range
    rain: float | Range


def _value(rng: np.random.Generator, value: float | Range) -> float:
    return float(rng.uniform(*value)) if isinstance(value, tuple) else value


def _draw(name: str, recipe: _Recipe, rng: np.random.Generator) -> Condition:
    """One capture's condition; the draws follow the order of ``Condition``'s fields (renders depend on it)."""
    b = float(rng.uniform(*recipe.brightness))
    tint = rng.uniform(*recipe.tint, 3) if len(recipe.tint) == 2 else recipe.tint
    red, green, blue = (b * float(t) for t in tint)
    top, bottom = recipe.sky
    if recipe.sky_jitter is not None:
        top, bottom = jitter(rng, top, recipe.sky_jitter[0]), jitter(rng, bottom, recipe.sky_jitter[1])
    shadow = "none" if recipe.shadow_p is None else str(rng.choice(SHADOWS, p=recipe.shadow_p))
    return Condition(
        name,
        (red, green, blue),
        recipe.gamma,
        recipe.saturation,
        top,
        bottom,
        shadow,
        _value(rng, recipe.lit_windows),
        recipe.lamps_on,
        _value(rng, recipe.fog),
        _value(rng, recipe.rain),
        recipe.exposure,
        recipe.noise,
        int(rng.poisson(recipe.clouds)) if recipe.clouds else 0,
    )


# fmt: off
_RECIPES = {
    #                   brightness    tint               gamma saturation exposure noise clouds
    #   sky (top, bottom)                   sky jitter shadows          lit windows  lamps  fog          rain
    "day":      _Recipe((0.95, 1.1),  (0.96, 1.04),      1.0,  1.0,       1.0,     2.0,  3,
        ((80, 130, 205), (175, 205, 235)),  (15, 10),  (0.3, 0.5, 0.2), 0.0,         False, 0.0,         0.0),
    "overcast": _Recipe((0.75, 0.9),  (1.0, 1.01, 1.05), 1.0,  0.6,       1.0,     3.0,  0,
        ((180, 184, 190), (210, 212, 215)), (10, 8),   None,            0.0,         False, 0.05,        0.0),
    "dusk":     _Recipe((0.55, 0.8),  (1.0, 0.75, 0.7),  1.25, 0.8,       1.2,     4.0,  1,
        ((60, 55, 115), (245, 150, 90)),    (15, 15),  None,            (0.2, 0.45), True,  0.0,         0.0),
    "night":    _Recipe((0.2, 0.32),  (1.0, 1.05, 1.5),  1.4,  0.6,       1.6,     6.0,  0,
        ((8, 10, 28), (35, 35, 60)),        (6, 10),   None,            (0.35, 0.6), True,  0.0,         0.0),
    "fog":      _Recipe((0.85, 0.95), (1.0, 1.0, 1.02),  1.0,  0.6,       1.0,     3.0,  0,
        ((205, 207, 210), (210, 212, 214)), None,      None,            0.0,         False, (0.4, 0.65), 0.0),
    "rain":     _Recipe((0.55, 0.7),  (1.0, 1.02, 1.1),  1.1,  0.7,       1.1,     4.0,  0,
        ((110, 115, 125), (150, 155, 160)), (10, 10),  None,            (0.0, 0.15), False, 0.15,        (0.5, 1.0)),
    "winter":   _Recipe((1.0, 1.15),  (0.9, 0.97, 1.1),  0.9,  0.5,       1.05,    2.5,  1,
        ((165, 180, 200), (220, 226, 234)), (10, 6),   (0.5, 0.4, 0.1), 0.0,         False, 0.1,         0.0),
}
# fmt: on
CONDITIONS: dict[str, Callable[[np.random.Generator], Condition]] = {
    name: partial(_draw, name, recipe) for name, recipe in _RECIPES.items()
}
HOURS = {
    "winter": (10, 14),
    "day": (9, 16),
    "overcast": (9, 17),
    "dusk": (19, 20),
    "night": (21, 23),
    "fog": (6, 8),
    "rain": (8, 18),
}
