"""Camera-level weather: rain streaks, haze, exposure and sensor noise on the final image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vpr.steps.synth.conditions import Condition


def _rain_streaks(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    layer = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(layer)
    w, h = image.size
    n = int(strength * 0.004 * w * h) + 1
    slant = float(rng.uniform(-0.25, 0.25))
    for x, y, length in zip(rng.uniform(0, w, n), rng.uniform(0, h, n), rng.uniform(0.04, 0.12, n) * h):
        draw.line([(x, y), (x + slant * length, y + length)], fill=int(rng.integers(90, 200)), width=max(1, w // 320))
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
