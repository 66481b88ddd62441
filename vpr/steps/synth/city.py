"""The driver: render every capture (facade view, distractors, weather) and write the datasets_vg tree.

Rendering runs in-process or in a forked worker pool; each image depends only on its own capture and
keyed RNG, so the files are identical whatever the number of workers. It streams: the parent hands out
ranges of capture indices (``CHUNK`` at a time, at most ``IN_FLIGHT`` per worker outstanding); a worker
plans, renders and writes its range and returns only the names and camera positions, so memory does not
grow with the number of images beyond those few bytes per image (the stale-file check and the summary).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from vpr.foundations.atomic import remove_dead_temporaries_in, write_bytes_atomic
from vpr.foundations.config import SynthConfig
from vpr.foundations.layout import ROLES, SPLITS, TEST_SETS_DIR
from vpr.foundations.procs import fork_is_safe, imap_bounded, worker_pool
from vpr.steps.synth.captures import Capture, StreetIndex, camera_utm, plan_captures
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


CHUNK = 16  # captures per task: a worker plans, renders and writes them, and returns their names
IN_FLIGHT = 2  # tasks submitted per worker and not yet collected: the parent's only per-image state

_WORKER: dict = {}


def _init_worker(state: dict) -> None:
    _WORKER.update(state)


def _tasks(cfg: SynthConfig, splits: list[str]) -> Iterator[tuple[str, str, int, int]]:
    """(split, role, start, stop) ranges of capture indices, produced lazily (nothing per image is planned here)."""
    for split in splits:
        for role in ROLES:
            count = getattr(getattr(cfg, split), role)
            for start in range(0, count, CHUNK):
                yield split, role, start, min(start + CHUNK, count)


def _render_task(task: tuple[str, str, int, int]) -> tuple[str, str, list[str], np.ndarray]:
    """Plan, render and write one range of captures; their names and camera UTM (for the summary)."""
    split, role, start, stop = task
    s = _WORKER
    index: StreetIndex = s["streets"][split]
    caps = plan_captures(s["cfg"], split, role, index, range(start, stop))
    folder = Path(s["root"]) / "images" / split / role
    for cap in caps:
        street = index.streets[cap.street]
        image = render_capture(cap, street, s["styles"], s["seed"], s["width"], s["height"], s["distractors"])
        write_bytes_atomic(folder / cap.name, encode_jpeg(image), sweep=False)  # generate_city swept the folder once
    xy = np.array([camera_utm(index.streets[c.street], c.offset, c.lateral) for c in caps], dtype=np.float64)
    return split, role, [c.name for c in caps], xy.reshape(-1, 2)


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


def _render_all(tasks: Iterator[tuple[str, str, int, int]], state: dict, workers: int) -> Iterator[tuple]:
    """Each task's result, in order, as it is rendered: tasks are pulled only as results are read, so
    at most ``IN_FLIGHT`` tasks per worker (and nothing else per image) are held at once."""
    # fork, or one process: spawn would re-import the caller's ``__main__`` (scripts without a main guard)
    pool = worker_pool(workers, _init_worker, (state,), start_method="fork") if fork_is_safe() else None
    if pool is None:
        _init_worker(state)
        yield from map(_render_task, tasks)
        return
    with pool:
        yield from imap_bounded(pool, _render_task, tasks, IN_FLIGHT * workers)


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Drop images of an earlier, different generation so the tree matches the config exactly."""
    for path in folder.glob("*.jpg"):
        if path.name not in keep:
            path.unlink()


def _queries_without_match(db_xy: np.ndarray, query_xy: np.ndarray, radius: float) -> int:
    """Queries with no database camera within ``radius`` metres (a KD-tree: no query x database matrix)."""
    if len(query_xy) == 0:
        return 0
    if len(db_xy) == 0:
        return len(query_xy)
    distance, _ = cKDTree(db_xy).query(query_xy, k=1)
    return int((distance > radius).sum())


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
    counts = {split: {role: getattr(getattr(cfg, split), role) for role in ROLES} for split in splits}
    for split in splits:
        for role in ROLES:
            (root / "images" / split / role).mkdir(parents=True, exist_ok=True)
            remove_dead_temporaries_in(root / "images" / split / role)  # once, not a folder listing per image
    state = {
        "cfg": cfg,
        "streets": {split: StreetIndex(city[split]) for split in splits},
        "styles": styles,
        "seed": cfg.seed,
        "width": cfg.width,
        "height": cfg.height,
        "distractors": cfg.distractors,
        "root": str(root),
    }
    total = sum(n for roles in counts.values() for n in roles.values())
    names: dict[tuple[str, str], set[str]] = {(split, role): set() for split in splits for role in ROLES}
    xy: dict[tuple[str, str], list[np.ndarray]] = {key: [] for key in names}
    for split, role, done, where in _render_all(_tasks(cfg, splits), state, _workers(total, workers)):
        names[split, role].update(done)
        xy[split, role].append(where)
    for (split, role), keep in names.items():
        _remove_stale(root / "images" / split / role, keep)
    stacked = {key: np.concatenate([np.empty((0, 2)), *parts]) for key, parts in xy.items()}
    unmatched = {
        split: _queries_without_match(stacked[split, "database"], stacked[split, "queries"], 25.0) for split in splits
    }
    summary = {"out_root": str(root), "counts": counts, "images": total, "queries_without_db_within_25m": unmatched}
    for name in cfg.test_sets:  # the towns tested on apart from the city (evaluate.test_sets)
        summary.setdefault("test_sets", {})[name] = generate_city(root / TEST_SETS_DIR / name, cfg.town(name), workers)
    return summary
