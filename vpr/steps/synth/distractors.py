"""Moving distractors: vehicles on the road and pedestrians on the sidewalk, new for every capture.

They are 3-D rectangles projected by the capture's camera over the rendered facade view.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vpr.steps.synth.conditions import Condition
from vpr.steps.synth.helpers import RGB, jitter
from vpr.steps.synth.plan import CAR_COLOURS, SIGN_COLOURS
from vpr.steps.synth.render import HFOV_DEG, Camera, shader


def _quad(cam: Camera, y: float, x0: float, z0: float, x1: float, z1: float) -> list[tuple[float, float]] | None:
    """Image polygon of an upright rectangle at depth plane ``y``; None if it reaches behind the camera."""
    pts = [cam.project((x, y, z)) for x, z in ((x0, z0), (x1, z0), (x1, z1), (x0, z1))]
    if any(p[2] <= 0.5 for p in pts):
        return None
    return [(p[0], p[1]) for p in pts]


@dataclass(frozen=True)
class _Scene:
    """What every distractor is drawn with: the image, the capture's camera, RNG and shader, and its condition."""

    draw: ImageDraw.ImageDraw
    cam: Camera
    rng: np.random.Generator
    shade: Callable[[RGB], RGB]
    cond: Condition

    def disc(self, centre: tuple[float, float, float], radius: float, fill: RGB) -> None:
        """A disc of ``radius`` metres facing the camera (a wheel, a lamp, a head)."""
        u, v, depth = self.cam.project(centre)
        r = self.cam.focal * radius / depth
        self.draw.ellipse([u - r, v - r, u + r, v + r], fill=fill)


def _draw_vehicle(scene: _Scene, x: float, y: float) -> None:
    cam, draw, rng, shade = scene.cam, scene.draw, scene.rng, scene.shade
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
        cabin = [
            cam.project((xx, y, zz))
            for xx, zz in (
                (x + 0.22 * length, body_top),
                (x + 0.8 * length, body_top),
                (x + 0.68 * length, body_top + 0.55),
                (x + 0.32 * length, body_top + 0.55),
            )
        ]
        draw.polygon([(p[0], p[1]) for p in cabin], fill=glass)
    for wx in (x + 0.18 * length, x + 0.82 * length):
        scene.disc((wx, y - 0.1, 0.35), 0.35, shade((20, 20, 22)))
    if scene.cond.lamps_on:
        for lx in (x + 0.05, x + length - 0.05):
            scene.disc((lx, y - 0.1, 0.75), 0.15, (255, 230, 180) if lx > x + 1 else (230, 40, 30))


def _draw_pedestrian(scene: _Scene, x: float, y: float) -> None:
    cam, draw, rng, shade = scene.cam, scene.draw, scene.rng, scene.shade
    h = float(rng.uniform(1.55, 1.9))
    legs = _quad(cam, y, x - 0.15, 0.0, x + 0.15, h * 0.48)
    torso = _quad(cam, y, x - 0.25, h * 0.47, x + 0.25, h * 0.85)
    if legs is None or torso is None:
        return
    draw.polygon(legs, fill=shade(jitter(rng, (50, 50, 70), 40)))
    draw.polygon(torso, fill=shade(CAR_COLOURS[int(rng.integers(0, len(CAR_COLOURS)))]))
    scene.disc((x, y, h * 0.92), 0.11, shade(jitter(rng, (200, 160, 130), 50)))
    if scene.cond.rain > 0 and rng.random() < 0.6:
        u, v, depth = cam.project((x, y, h + 0.15))
        r = cam.focal * 0.55 / depth
        draw.pieslice(
            [u - r, v - r * 0.7, u + r, v + r * 0.7],
            180,
            360,
            fill=shade(SIGN_COLOURS[int(rng.integers(0, len(SIGN_COLOURS)))]),
        )


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
    scene = _Scene(ImageDraw.Draw(image), cam, rng, shader(cond), cond)
    for y, kind, x in sorted(items, key=lambda item: -item[0]):  # farthest (closest to facade) first
        (_draw_vehicle if kind == "vehicle" else _draw_pedestrian)(scene, x, y)
