"""The driver: render every capture (facade view, distractors, weather) and write the datasets_vg tree.

Rendering runs in-process or in a forked worker pool; each image depends only on its own capture and
keyed RNG, so the files are identical whatever the number of workers.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vpr.foundations.atomic import write_bytes_atomic
from vpr.foundations.config import SynthConfig
from vpr.foundations.layout import ROLES, SPLITS, TEST_SETS_DIR
from vpr.foundations.procs import fork_is_safe, worker_pool
from vpr.steps.synth.captures import Capture, camera_utm, plan_captures
from vpr.steps.synth.distractors import draw_distractors
from vpr.steps.synth.helpers import keyed_rng
from vpr.steps.synth.plan import Street, Style, make_styles, plan_city
from vpr.steps.synth.render import HFOV_DEG, Camera, render_facade_view
from vpr.steps.synth.weather import apply_weather

JPEG_QUALITY = 90
SUPERSAMPLE = 2  # render at 2x and downsample: cheap anti-aliasing
SERIAL_BELOW = 48  # render in-process below this many images (tests, tiny cities)


def render_capture(
    cap: Capture, street: Street, styles: tuple[Style, ...], seed: int, width: int, height: int, distractors: bool
) -> Image.Image:
    """The image of one capture, deterministic in (seed, split, role, index)."""
    rng = keyed_rng(seed, 3, SPLITS.index(cap.split), ROLES.index(cap.role), cap.index)
    facade = street.facades[cap.side]
    x = -cap.offset if cap.side == 0 else cap.offset
    distance = facade.distance - cap.lateral if cap.side == 0 else facade.distance + cap.lateral
    ss = SUPERSAMPLE
    focal = cap.focal_scale * (width * ss / 2) / math.tan(math.radians(HFOV_DEG / 2))
    cam = Camera.looking_at_facade(
        x, max(distance, 4.0), cap.cam_height, cap.yaw, cap.pitch, cap.roll, focal, width * ss, height * ss
    )
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


_WORKER: dict = {}


def _init_worker(state: dict) -> None:
    _WORKER.update(state)


def _render_and_write(cap: Capture) -> str:
    s = _WORKER
    image = render_capture(
        cap, s["city"][cap.split][cap.street], s["styles"], s["seed"], s["width"], s["height"], s["distractors"]
    )
    write_bytes_atomic(Path(s["root"]) / "images" / cap.split / cap.role / cap.name, encode_jpeg(image))
    return cap.name


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
    # fork, or one process: spawn would re-import the caller's ``__main__`` (scripts without a main guard)
    pool = worker_pool(workers, _init_worker, (state,), start_method="fork") if fork_is_safe() else None
    if pool is None:
        _init_worker(state)
        for cap in jobs:
            _render_and_write(cap)
        return
    with pool:
        for _ in pool.map(_render_and_write, jobs, chunksize=8):
            pass


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Drop images of an earlier, different generation so the tree matches the config exactly."""
    for path in folder.glob("*.jpg"):
        if path.name not in keep:
            path.unlink()


def _queries_without_match(captures: list[Capture], streets: tuple[Street, ...], radius: float) -> int:
    def xy(role: str) -> np.ndarray:
        return np.array([camera_utm(streets[c.street], c.offset, c.lateral) for c in captures if c.role == role])

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
    splits = [s for s in SPLITS if s in cfg.splits]
    captures = {(split, role): plan_captures(cfg, split, role, city[split]) for split in splits for role in ROLES}
    jobs = [cap for caps in captures.values() for cap in caps]
    for split, role in captures:
        (root / "images" / split / role).mkdir(parents=True, exist_ok=True)
    state = {
        "city": city,
        "styles": styles,
        "seed": cfg.seed,
        "width": cfg.width,
        "height": cfg.height,
        "distractors": cfg.distractors,
        "root": str(root),
    }
    _render_all(jobs, state, _workers(len(jobs), workers))
    for (split, role), caps in captures.items():
        _remove_stale(root / "images" / split / role, {c.name for c in caps})
    counts = {split: {role: len(captures[split, role]) for role in ROLES} for split in splits}
    unmatched = {
        split: _queries_without_match(captures[split, "database"] + captures[split, "queries"], city[split], 25.0)
        for split in splits
    }
    summary = {"out_root": str(root), "counts": counts, "images": len(jobs), "queries_without_db_within_25m": unmatched}
    for name in cfg.test_sets:  # the towns tested on apart from the city (evaluate.test_sets)
        summary.setdefault("test_sets", {})[name] = generate_city(root / TEST_SETS_DIR / name, cfg.town(name), workers)
    return summary
