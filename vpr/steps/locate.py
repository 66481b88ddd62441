"""Where was this photo taken? Retrieve the nearest database images of a release and vote on a position.

Each image is prepared exactly like a database image was when it was sharded (upright, RGB, resized
to the shard size, JPEG round trip at the shard quality), so a photo that *is* a database image gets
the very descriptor stored in the index (distance ≈ 0). Every file is checked on its own: unreadable,
not an image, truncated, or larger than ``locate.max_pixels`` (refused from the header, before any
pixel is decoded — decompression bombs) gives an ``{"ok": false, "error": ...}`` entry, and the other
images are still answered.

Position estimate: the best match's position, refined by the distance-weighted mean (weights
1/(distance + ε)) of the top-K matches lying within the agreement radius (the release's
``test_positive_m``) of it. Confidence in [0, 1] = agreement × margin, where agreement is the weight
share of the agreeing matches among all top-K, and margin is ``1 − d_best / d_first_disagreeing``
(1 when every match agrees). A query that is a database image scores ≈ 1; a photo whose matches
scatter over the city, or whose best match is barely nearer than a far-away one, scores near 0.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from vpr.foundations.imageio import (
    UnreadableFile,
    decode_rgb,
    draft,
    encode_jpeg,
    pixel_format_problem,
    read_image_file,
    shard_rendition,
    strict_decoding,
    strict_pillow,
)
from vpr.shared.release import Release, load_release

T = TypeVar("T")

_EPS = 1e-6


class LocateInputError(ValueError):
    """One input image cannot be used (the message says why)."""


def prepare_image(
    path: str | Path, height: int, width: int, quality: int, max_pixels: int, max_bytes: int = 64 * 2**20
) -> Image.Image:
    """File → RGB image at the shard size, via the same steps as ``vpr.steps.shards.encode_image``.

    Raises ``LocateInputError`` for an unreadable file, a non-image, a truncated image, or one whose
    header announces more than ``max_pixels`` pixels (checked before decoding).
    """
    path = Path(path)
    try:
        data = read_image_file(path, max_bytes)
    except UnreadableFile as exc:
        raise LocateInputError(str(exc)) from None
    except OSError as exc:
        raise LocateInputError(f"cannot read file: {exc.strerror or exc}") from None
    return prepare_bytes(data, height, width, quality, max_pixels)


def prepare_bytes(data: bytes, height: int, width: int, quality: int, max_pixels: int) -> Image.Image:
    """Encoded image bytes (a file's, an upload's) → RGB image at the shard size; see ``prepare_image``."""
    if not data:
        raise LocateInputError("file is empty")
    with strict_pillow(None):  # the header, with Pillow's own guard off: the check below refuses with the real size
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise LocateInputError(
                f"image has more than {max_pixels} pixels (decompression bomb guard); refused before decoding"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise LocateInputError("not an image Pillow can read") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise LocateInputError(
                f"image is {w}×{h} = {w * h} pixels, over the limit of {max_pixels} "
                "(locate.max_pixels); refused before decoding"
            )
        problem = pixel_format_problem(im)  # from the header's mode: before decoding, and before
        if problem:  # shard_rendition sets the JPEG draft (a loaded image decodes at full size)
            raise LocateInputError(f"{problem} ({im.mode}: 32-bit integer or float samples)")
        try:
            with strict_decoding():  # the pixels: beside other requests' decodes, not one at a time
                upright = shard_rendition(_reduced(im, width, height), width, height)
        except Exception as exc:  # noqa: BLE001 - truncated data, broken codecs, zlib errors...
            raise LocateInputError(f"truncated or corrupt image: {exc}") from None
        return decode_rgb(encode_jpeg(upright, quality))  # the JPEG round trip the shards went through


_REDUCE_GAP = 8  # a reduced image keeps at least 8× the shard size: the bilinear resize from it looks the same


def _reduced(im: Image.Image, width: int, height: int) -> Image.Image:
    """A large non-JPEG image decoded once and box-reduced right away (the JPEG decoder drafts instead),
    so the conversions and the EXIF transpose copy a small image, not the full raster (memory: ~4 bytes
    per pixel instead of ~11). Smaller images, and modes ``reduce`` lacks, are returned as they are."""
    factor = min(im.width, im.height) // (max(width, height) * _REDUCE_GAP)
    if im.format == "JPEG" or factor < 2 or im.mode not in ("L", "LA", "RGB", "RGBA"):
        return im
    im.load()
    small = im.reduce(factor)
    small.info = dict(im.info)  # the EXIF orientation travels with it
    return small


def decode_cost(data: bytes, height: int, width: int, max_pixels: int) -> int:
    """Pixels that decoding ``data`` for the shard size will hold, read from the header alone: a JPEG's
    drafted size (its decoder downscales by up to 8), any other format's full size; 0 for bytes that
    ``prepare_bytes`` refuses before decoding (not an image, over ``max_pixels``)."""
    with strict_pillow(None):
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    return 0
                draft(im, width, height)
                return im.width * im.height
        except Exception:  # noqa: BLE001 - prepare_bytes names the problem
            return 0


def estimate_position(
    east: np.ndarray, north: np.ndarray, distances: np.ndarray, radius_m: float
) -> tuple[float, float, np.ndarray, float]:
    """(east, north, mask of agreeing matches, confidence) from ranked matches (see module docstring)."""
    agree = np.hypot(east - east[0], north - north[0]) <= radius_m
    weights = 1.0 / (distances + _EPS)
    e = float(np.sum(weights[agree] * east[agree]) / np.sum(weights[agree]))
    n = float(np.sum(weights[agree] * north[agree]) / np.sum(weights[agree]))
    agreement = float(np.sum(weights[agree]) / np.sum(weights))
    disagree = np.flatnonzero(~agree)
    margin = 1.0 if len(disagree) == 0 else 1.0 - float(distances[0]) / max(float(distances[disagree[0]]), _EPS)
    return e, n, agree, float(np.clip(agreement * margin, 0.0, 1.0))


def _weighted(values: Sequence, weights: np.ndarray) -> float | None:
    if any(v is None for v in values) or len(values) == 0:
        return None
    return float(np.sum(weights * np.asarray(values, dtype=np.float64)) / np.sum(weights))


def _none_if_nan(value):
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def answer(
    release: Release, distances: np.ndarray, ids: np.ndarray, radius_m: float, empty_reason: str | None = None
) -> dict:
    """One image's answer from its ranked (distances, ids): matches, estimate, confidence.

    No match at all (a GPS prior around no database image) is still ``ok`` — the image was read and
    searched — with ``estimate`` None, confidence 0 and a ``reason`` saying why nothing was found."""
    keep = ids >= 0
    distances, ids = distances[keep], ids[keep]
    by_id = release.rows(ids)
    matches = []
    for rank, (d, i) in enumerate(zip(distances.tolist(), ids.tolist()), start=1):
        r = by_id[i]
        matches.append(
            {
                "rank": rank,
                "id": int(i),
                "path": r["path"],
                "split": r["split"],
                "utm_east": r["utm_east"],
                "utm_north": r["utm_north"],
                "lat": _none_if_nan(r["lat"]),
                "lon": _none_if_nan(r["lon"]),
                "distance": float(d),
            }
        )
    if not matches:
        reason = empty_reason or "no database image matched"
        return {"ok": True, "matches": [], "estimate": None, "confidence": 0.0, "reason": reason}
    east = np.array([m["utm_east"] for m in matches])
    north = np.array([m["utm_north"] for m in matches])
    e, n, agree, confidence = estimate_position(east, north, distances.astype(np.float64), radius_m)
    w = 1.0 / (distances[agree].astype(np.float64) + _EPS)
    agreeing = [m for m, a in zip(matches, agree) if a]
    estimate = {
        "utm_east": e,
        "utm_north": n,
        "lat": _weighted([m["lat"] for m in agreeing], w),
        "lon": _weighted([m["lon"] for m in agreeing], w),
        "support": int(agree.sum()),
        "radius_m": radius_m,
    }
    return {"ok": True, "matches": matches, "estimate": estimate, "confidence": confidence}


@dataclass
class Answering:
    """The answer path ``vpr locate`` and ``vpr api`` share: prepare each input (a bad one gets its own
    error entry), encode the good ones together (directly, or through the service's batcher), search
    the release once, and answer each in its input's place."""

    results: list[dict]
    ready: list[tuple[int, Image.Image]]

    @classmethod
    def prepare(cls, inputs: Iterable[tuple[str, T]], prepare: Callable[[T], Image.Image]) -> Answering:
        """``inputs`` are (name, what ``prepare`` turns into the shard rendition of the image)."""
        results: list[dict] = []
        ready: list[tuple[int, Image.Image]] = []
        for name, item in inputs:
            try:
                prepared = prepare(item)
            except LocateInputError as exc:
                results.append({"image": name, "ok": False, "error": str(exc)})
                continue
            results.append({"image": name})
            ready.append((len(results) - 1, prepared))
        return cls(results, ready)

    @property
    def images(self) -> list[Image.Image]:
        return [im for _, im in self.ready]

    def answer(
        self,
        release: Release,
        descriptors: np.ndarray | None,
        top_k: int,
        *,
        allowed: np.ndarray | None = None,
        radius_m: float | None = None,
        empty_reason: str | None = None,
    ) -> list[dict]:
        """Search ``descriptors`` (one row per ready image; None when none is ready) and fill the answers;
        ``empty_reason`` is what an answer without matches says (see ``answer``)."""
        if self.ready:
            distances, ids = release.search(descriptors, search_k(release, top_k), allowed)
            self.fill(release, distances, ids, radius_m=radius_m, empty_reason=empty_reason)
        return self.results

    def fill(
        self,
        release: Release,
        distances: np.ndarray,
        ids: np.ndarray,
        *,
        radius_m: float | None = None,
        empty_reason: str | None = None,
    ) -> list[dict]:
        """The answers from the ready images' ranked matches (one row each, as ``Release.search`` gives,
        with ``search_k`` columns): what ``answer`` does after its search (the service searches batched)."""
        radius = float(radius_m if radius_m is not None else release.manifest.get("test_positive_m", 25.0))
        for (slot, _), d, i in zip(self.ready, distances, ids):
            self.results[slot].update(answer(release, d, i, radius, empty_reason))
        return self.results


def search_k(release: Release, top_k: int) -> int:
    """How many matches a ``top_k`` request searches for: at least one, at most the indexed images."""
    return max(1, min(top_k, release.index.ntotal))


def locate(
    images: Sequence[str | Path],
    release_dir: str | Path,
    top_k: int = 5,
    *,
    max_pixels: int = 100_000_000,
    max_bytes: int = 64 * 2**20,
    device: str = "cpu",
    batch_size: int = 32,
    release: Release | None = None,
    radius_m: float | None = None,
) -> list[dict]:
    """Answer each image in order: ``{"image", "ok": True, "matches", "estimate", "confidence"}`` or
    ``{"image", "ok": False, "error"}``.

    ``matches``: the top-``top_k`` database images (rank, id, path, split, utm_east, utm_north, lat,
    lon — None when unknown — and L2 descriptor distance). ``estimate``: utm_east/utm_north (and
    lat/lon when all agreeing matches have them), ``support`` (agreeing matches) and ``radius_m``.
    ``release`` skips loading (a long-lived server keeps one); ``radius_m`` defaults to the release's
    ``test_positive_m``.
    """
    if top_k <= 0:
        raise ValueError("top_k must be positive")
    release = release or load_release(release_dir, device)
    img = release.manifest["image"]

    def prepare(path: str | Path) -> Image.Image:
        return prepare_image(path, img["height"], img["width"], img.get("jpeg_quality", 90), max_pixels, max_bytes)

    batch = Answering.prepare(((str(p), p) for p in images), prepare)
    desc = release.encode_images(batch.images, batch_size=batch_size) if batch.ready else None
    return batch.answer(release, desc, top_k, radius_m=radius_m)
