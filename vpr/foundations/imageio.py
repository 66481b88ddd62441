"""Image I/O shared by every step: strict decoding, the shard-size rendition, JPEG encoding, EXIF.

One implementation of each, so ingest, sharding, re-indexing and locate agree on what an image is:

- ``strict_pillow``: truncated data is an error and Pillow's bomb guard sits at our limit;
  ``strict_decoding``: the same strictness for the pixels of an image opened under it, without its lock;
- ``decode_facts``: open and fully decode bytes once → size/format, or the reason they are unusable;
- ``shard_rendition``: upright (EXIF orientation), RGB, resized to the shard size — what the shards
  store and what a query photo is turned into before it is described;
- ``exif_gps``: position, heading and time from a photo's EXIF GPS block, read by Pillow's named tags.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

# Reject reasons of decoding: exact strings, asserted by tests and grouped in ingest's summary.
REASON_NOT_IMAGE = "not an image"
REASON_TRUNCATED = "truncated image"
REASON_TOO_MANY_PIXELS = "too many pixels"
REASON_NOT_REGULAR = "not a regular file"  # FIFO, device, socket, directory: never opened for reading
REASON_TOO_LARGE = "file too large"
REASON_PIXEL_FORMAT = "unsupported pixel format"  # 32-bit integer or float samples: no agreed 8-bit range
REASON_OUTSIDE_ROOT = "link outside the root"  # a symbolic link (of the file or a folder) leading out of the tree
REASON_LINK = "symbolic link"  # where files are moved (the inbox), a link would move, not its bytes

# 16-bit grey: scaled to 8 bits (Pillow's own convert("RGB") clips at 255 and turns them white)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# EXIF orientations that rotate by 90°/270°: stored width and height are swapped on display.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

_PILLOW_GLOBALS = threading.Lock()


@contextmanager
def strict_pillow(max_pixels: int | None) -> Iterator[None]:
    """Never accept truncated data; put Pillow's own bomb guard at our limit (None: off).

    Pillow keeps both settings in module globals, so they are set under a lock and restored after.
    """
    with _PILLOW_GLOBALS:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def strict_decoding() -> Iterator[None]:
    """For decoding pixels of an image opened under ``strict_pillow``: truncated data stays an error.

    Without the lock while the process keeps Pillow's default (truncated images refused; ``strict_pillow``
    only ever restores it), so many images decode at once — a large one never holds up the others; under
    ``strict_pillow``'s lock where something changed that default for good."""
    with _PILLOW_GLOBALS:  # read where no strict_pillow block has it changed
        lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    if lenient:
        with strict_pillow(None):
            yield
    else:
        yield


class UnreadableFile(OSError):
    """A path that must not be read: ``reason`` is one of the REASON_* strings above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


def contained(path: str | Path, root: str | Path) -> Path:
    """``path`` with every link resolved, provided it stays inside ``root``; ``UnreadableFile`` otherwise.

    The rule for links in a data tree: one that resolves inside the root is followed (a dataset may link
    queries to database files), one that leads outside is refused, so no outside bytes enter the shards.
    """
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != top and top not in real.parents:
        raise UnreadableFile(REASON_OUTSIDE_ROOT, f"resolves to {real}")
    return real


def read_image_file(path: str | Path, max_bytes: int, root: str | Path | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``UnreadableFile`` otherwise.

    Opened non-blocking (a FIFO never blocks the open), checked with ``fstat`` on the open descriptor
    (a device, a FIFO or a directory is refused; a link is judged by what it points to), and read
    with a bound, so a sparse or growing file never fills memory. With ``root``, a path that resolves
    outside it is refused (``contained``) and the resolved path is opened without following links.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if root is not None:
        if not os.path.lexists(path):
            raise FileNotFoundError(path)
        path = contained(path, root)
        flags |= getattr(os, "O_NOFOLLOW", 0)  # a link swapped in after the check is not followed
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(REASON_NOT_REGULAR)
        if st.st_size > max_bytes:
            raise UnreadableFile(REASON_TOO_LARGE, f"{st.st_size} bytes, over the limit of {max_bytes}")
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew while being read
            raise UnreadableFile(REASON_TOO_LARGE, f"over the limit of {max_bytes} bytes")
        return data
    finally:
        os.close(fd)


def orientation(im: Image.Image) -> int | None:
    """The EXIF orientation tag (1..8), None when absent or unreadable."""
    try:
        return im.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unusable
        return None


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after applying the EXIF orientation, read from the header only."""
    width, height = im.size
    if orientation(im) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def decode_facts(data: bytes, max_pixels: int) -> dict | str:
    """Open and fully decode image bytes: ``{width, height, format}`` on success, a reject reason otherwise.

    Call under ``strict_pillow``. The pixel limit is checked from the header, before any pixel is decoded.
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return REASON_TOO_MANY_PIXELS
    except Exception:  # noqa: BLE001 - UnidentifiedImageError and friends: not an image we can read
        return REASON_NOT_IMAGE
    with im:
        width, height = im.size
        if width * height > max_pixels:
            return REASON_TOO_MANY_PIXELS
        try:
            im.load()
        except Exception:  # noqa: BLE001 - OSError "image file is truncated", SyntaxError, zlib...
            return REASON_TRUNCATED
        if pixel_format_problem(im):
            return REASON_PIXEL_FORMAT
        width, height = displayed_size(im)
        return {"width": width, "height": height, "format": im.format}


def draft(im: Image.Image, width: int, height: int) -> None:
    """Let the JPEG decoder downscale by 1/2..1/8 while staying at least the target size (speed)."""
    if im.format != "JPEG":
        return
    size = (height, width) if orientation(im) in _TRANSPOSING_ORIENTATIONS else (width, height)
    im.draft("RGB", size)


def _sixteen_bit(im: Image.Image) -> bool:
    # a 16-bit grey PNG opens as I;16 or, in some Pillow versions, as 32-bit "I" holding 0..65535
    return im.mode in _SIXTEEN_BIT_MODES or (im.mode == "I" and im.format == "PNG")


def pixel_format_problem(im: Image.Image) -> str | None:
    """None when ``to_rgb8`` renders the image faithfully; ``REASON_PIXEL_FORMAT`` when no 8-bit
    rendering can be trusted (32-bit integer or float samples: their range is not in the file)."""
    if im.mode in ("I", "F") and not _sixteen_bit(im):
        return REASON_PIXEL_FORMAT
    return None


def to_rgb8(im: Image.Image, sixteen_bit: bool | None = None) -> Image.Image:
    """RGB with 8 bits per sample; 16-bit grey scaled by 1/257 (65535 → 255), never clipped to white."""
    if sixteen_bit if sixteen_bit is not None else _sixteen_bit(im):
        grey = np.asarray(im, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    if pixel_format_problem(im):
        raise ValueError(f"{REASON_PIXEL_FORMAT}: mode {im.mode}")
    return im.convert("RGB")


def shard_rendition(im: Image.Image, width: int, height: int) -> Image.Image:
    """An opened image → upright RGB of exactly ``width``×``height`` (the shards' rendition)."""
    draft(im, width, height)
    sixteen = _sixteen_bit(im)  # before exif_transpose, whose copy has no format
    upright = to_rgb8(ImageOps.exif_transpose(im), sixteen)
    return upright.resize((width, height), Image.Resampling.BILINEAR)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    """JPEG bytes of an RGB image (deterministic for the same pixels and quality)."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes → RGB image (raises Pillow's ``OSError`` on damaged data)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


# --------------------------------------------------------------------------- EXIF GPS


def _rational(value) -> float:
    try:
        return float(value)
    except (TypeError, ZeroDivisionError, ValueError):
        num, den = value
        return float(num) / float(den)


def _dms(value, ref: str | None) -> float:
    d, m, s = (_rational(v) for v in value)
    deg = d + m / 60.0 + s / 3600.0
    return -deg if (ref or "").strip().upper() in ("S", "W") else deg


def exif_gps(data: bytes) -> dict | None:
    """lat, lon (WGS84), heading and timestamp from a photo's EXIF GPS block; None without a usable fix.

    A fix outside UTM's latitude band (−80°..84°) or with non-finite values is no fix.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            exif = im.getexif()
            gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
            sub = exif.get_ifd(ExifTags.IFD.Exif)
    except Exception:  # noqa: BLE001 - no EXIF, broken EXIF: no position
        return None
    G = ExifTags.GPS
    if not gps or G.GPSLatitude not in gps or G.GPSLongitude not in gps:
        return None
    try:
        lat = _dms(gps[G.GPSLatitude], gps.get(G.GPSLatitudeRef))
        lon = _dms(gps[G.GPSLongitude], gps.get(G.GPSLongitudeRef))
    except Exception:  # noqa: BLE001 - malformed rationals
        return None
    if not (math.isfinite(lat) and math.isfinite(lon) and -80.0 <= lat <= 84.0 and -180.0 <= lon <= 180.0):
        return None
    heading = None
    if G.GPSImgDirection in gps:
        try:
            heading = _rational(gps[G.GPSImgDirection]) % 360.0
        except Exception:  # noqa: BLE001
            heading = None
    stamp = sub.get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    timestamp = re.sub(r"[^0-9]", "", str(stamp))[:14] if stamp else ""
    return {"lat": lat, "lon": lon, "heading": heading, "timestamp": timestamp}
