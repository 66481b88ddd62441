"""Rendering a facade: the pinhole camera, the illumination shader and the facade texture.

The visible part of a facade is drawn as a texture in metres (``Canvas``) and warped into the camera
image through the plane-to-image homography.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from vpr.steps.synth.conditions import Condition
from vpr.steps.synth.helpers import RGB, jitter, to_rgb
from vpr.steps.synth.plan import Building, Facade, Sign, Style

HFOV_DEG = 75.0


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
    def looking_at_facade(
        cls,
        x: float,
        distance: float,
        height: float,
        yaw: float,
        pitch: float,
        roll: float,
        focal: float,
        width: int,
        height_px: int,
    ) -> Camera:
        p, y, r = math.radians(pitch), math.radians(yaw), math.radians(roll)
        forward = np.array([math.sin(y) * math.cos(p), math.cos(y) * math.cos(p), math.sin(p)])
        right0 = np.array([math.cos(y), -math.sin(y), 0.0])
        up0 = np.cross(right0, forward)
        right = math.cos(r) * right0 + math.sin(r) * up0
        up = np.cross(right, forward)
        return cls(np.array([x, -distance, height]), right, up, forward, focal, width / 2, height_px / 2)

    def pixel_rays(self) -> np.ndarray:
        """3x3 matrix mapping homogeneous pixels (u, v, 1) to world ray directions."""
        return np.stack(
            [self.right, -self.up, self.focal * self.forward - self.cx * self.right + self.cy * self.up], axis=1
        )

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
        return (
            self.cx + self.focal * float(v @ self.right) / depth,
            self.cy - self.focal * float(v @ self.up) / depth,
            depth,
        )


def shader(cond: Condition) -> Callable[[RGB], RGB]:
    """Colour under the capture's illumination (gamma, saturation, tinted light)."""
    cache: dict[RGB, RGB] = {}

    def shade(rgb: RGB) -> RGB:
        if rgb not in cache:
            c = (np.asarray(rgb, dtype=np.float64) / 255.0) ** cond.gamma
            grey = float(c.mean())
            c = grey + (c - grey) * cond.saturation
            c = np.clip(c * np.asarray(cond.illum) * 255.0, 0, 255)
            cache[rgb] = to_rgb(c)
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


def _draw_windows(
    cv: Canvas, b: Building, s: Style, shade: Callable[[RGB], RGB], windows: list[tuple[float, float, float, float]]
) -> None:
    cols = max(1, int((b.width - 1.0) // s.win_pitch))
    first = b.x0 + (b.width - cols * s.win_pitch) / 2 + s.win_pitch / 2
    win_h = min(s.win_h, s.floor_h - 1.2)
    for floor in range(1, b.floors):
        z0 = b.ground_h + (floor - 1) * s.floor_h + 0.9
        for c in range(cols):
            xc = first + c * s.win_pitch
            if s.shutters:
                cv.rect(xc - s.win_w / 2 - 0.45, z0, xc + s.win_w / 2 + 0.45, z0 + win_h, shade(s.shutter))
            cv.rect(xc - s.win_w / 2 - 0.1, z0 - 0.1, xc + s.win_w / 2 + 0.1, z0 + win_h + 0.1, shade(s.trim))
            cv.rect(xc - s.win_w / 2, z0, xc + s.win_w / 2, z0 + win_h, shade(s.glass))
            windows.append((xc - s.win_w / 2, z0, xc + s.win_w / 2, z0 + win_h))
        if floor in b.balconies:
            cv.rect(first - s.win_w, z0 - 0.2, first + (cols - 1) * s.win_pitch + s.win_w, z0 + 0.6, shade(s.trim))


def _draw_ground_floor(
    cv: Canvas, b: Building, s: Style, shade: Callable[[RGB], RGB], windows: list[tuple[float, float, float, float]]
) -> None:
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
        cv.poly(
            [(b.x0 + 0.3, z), (b.x0 + b.width - 0.3, z), (b.x0 + b.width, z - 0.8), (b.x0, z - 0.8)], shade(b.awning)
        )


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
        dark = to_rgb(c * 0.85 for c in b.wall)
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
            cv.rect(x, sign.z0 + sign.h * 0.2, x + sign.w * 0.7 / n * size, sign.z0 + sign.h * 0.8, shade(sign.fg))


def _draw_building(
    cv: Canvas, b: Building, s: Style, shade: Callable[[RGB], RGB], windows: list[tuple[float, float, float, float]]
) -> None:
    _draw_roof(cv, b, s, shade)
    cv.rect(b.x0, 0.0, b.x0 + b.width, b.height, shade(b.wall))
    if s.roof == "cornice":
        cv.rect(b.x0 - 0.3, b.height - 0.6, b.x0 + b.width + 0.3, b.height, shade(s.trim))
    _draw_pattern(cv, b, s, shade)
    _draw_windows(cv, b, s, shade, windows)
    _draw_ground_floor(cv, b, s, shade, windows)
    for sign in b.signs:
        _draw_sign(cv, sign, shade)


def _draw_trees_and_lamps(cv: Canvas, facade: Facade, x0: float, x1: float, shade: Callable[[RGB], RGB]) -> None:
    for x in facade.lamps:
        if x0 - 2 < x < x1 + 2:
            cv.rect(x - 0.08, 0.0, x + 0.08, 6.0, shade((50, 52, 55)))
            cv.rect(x - 0.08, 5.9, x + 1.0, 6.05, shade((50, 52, 55)))
    for x, r, colour in facade.trees:
        if x0 - 2 * r < x < x1 + 2 * r:
            cv.rect(x - 0.15, 0.0, x + 0.15, 3.0, shade((90, 65, 45)))
            cv.ellipse(x, 4.2, r, r * 1.1, shade(colour))
            cv.ellipse(x - r * 0.5, 3.8, r * 0.7, r * 0.7, shade(to_rgb(c * 0.85 for c in colour)))


def _solid_mask(size: tuple[int, int], cv: Canvas, facade: Facade, x0: float, x1: float, zmin: float) -> Image.Image:
    mask = Image.new("L", size, 0)
    mc = Canvas(mask, cv.x0, cv.z1, cv.ppm)
    mc.rect(x0, zmin, x1, 0.0, 255)
    for b in facade.buildings:
        if b.x0 < x1 and b.x0 + b.width > x0:
            mc.rect(b.x0, 0.0, b.x0 + b.width, b.height, 255)
    return mask


def _apply_shadow(
    tex: Image.Image,
    cv: Canvas,
    facade: Facade,
    box: tuple[float, float, float, float],
    rng: np.random.Generator,
    mode: str,
) -> Image.Image:
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


def _draw_emissive(
    cv: Canvas,
    facade: Facade,
    windows: list[tuple[float, float, float, float]],
    cond: Condition,
    rng: np.random.Generator,
    x0: float,
    x1: float,
) -> None:
    for wx0, wz0, wx1, wz1 in windows:
        if rng.random() < cond.lit_windows:
            cv.rect(wx0, wz0, wx1, wz1, jitter(rng, (250, 210, 130), 25))
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


def render_facade_view(
    facade: Facade,
    styles: tuple[Style, ...],
    cam: Camera,
    width: int,
    height: int,
    cond: Condition,
    rng: np.random.Generator,
) -> Image.Image:
    """Draw the visible part of the facade as a texture and warp it into the camera."""
    x0, x1, zmin, zmax = visible_box(cam, width, height)
    ppm = min(cam.focal / -cam.centre[1], 4000 / max(x1 - x0, zmax - zmin))
    size = (max(2, int((x1 - x0) * ppm)), max(2, int((zmax - zmin) * ppm)))
    tex = _sky(size[0], size[1], cond.sky_top, cond.sky_bottom)
    cv = Canvas(tex, x0, zmax, ppm)
    shade = shader(cond)
    for _ in range(cond.clouds):
        cv.ellipse(
            float(rng.uniform(x0, x1)),
            float(rng.uniform(14, 30)),
            float(rng.uniform(3, 9)),
            float(rng.uniform(1, 2.5)),
            jitter(rng, (240, 242, 245), 8),
        )
    haze = to_rgb(0.5 * a + 0.5 * b for a, b in zip(shade((110, 115, 125)), cond.sky_bottom))
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
    return tex.transform(
        (width, height), Image.PERSPECTIVE, tuple(to_tex.ravel()[:8]), Image.BILINEAR, fillcolor=cond.sky_top
    )
