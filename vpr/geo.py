"""Geography: datasets_vg file names and UTM / WGS84 conversions.

The datasets_vg convention stores the capture position in the file NAME:
``@UTM_east@UTM_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg``.
Only the first two fields are required; any other may be empty. Parent folders may contain ``@``,
so parsing always looks at the base name alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePath

import utm

# fmt: off
FIELDS = (
    "utm_east", "utm_north", "utm_zone", "utm_letter", "lat", "lon", "pano_id",
    "tile", "heading", "pitch", "roll", "height", "timestamp", "note",
)
# fmt: on


class NameError_(ValueError):
    """A file name that does not follow the datasets_vg convention."""


@dataclass(frozen=True)
class GeoName:
    """Position and capture metadata parsed from a datasets_vg file name."""

    utm_east: float
    utm_north: float
    utm_zone: int | None = None
    utm_letter: str | None = None
    lat: float | None = None
    lon: float | None = None
    pano_id: str | None = None
    heading: float | None = None
    timestamp: str | None = None
    note: str | None = None


def _optional_float(text: str) -> float | None:
    if text == "":
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _check_characters(name: str) -> None:
    """Names from untrusted folders: valid UTF-8, no path separator of any platform, no control characters."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive from the OS as surrogate escapes
        raise NameError_("name is not valid UTF-8") from None
    if "\\" in name or "/" in name:
        raise NameError_("name contains a path separator")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise NameError_("name contains control characters")


def parse_name(path: str | PurePath) -> GeoName:
    """Parse a datasets_vg name (``@E@N@...@.ext``); raises ``NameError_`` with the reason."""
    name = PurePath(path).name
    _check_characters(name)
    stem, dot, _ext = name.rpartition(".")
    if not dot:
        stem = name
    if not stem.startswith("@") or not stem.endswith("@") or len(stem) < 3:
        raise NameError_("name does not follow @UTM_east@UTM_north@...@ convention")
    fields = stem[1:-1].split("@")
    if len(fields) < 2:
        raise NameError_("name has fewer than two @-separated fields")
    if len(fields) > len(FIELDS):
        raise NameError_(f"name has {len(fields)} fields, at most {len(FIELDS)} allowed")
    fields += [""] * (len(FIELDS) - len(fields))
    try:
        east, north = float(fields[0]), float(fields[1])
    except ValueError:
        raise NameError_("UTM east/north are not numbers") from None
    if not (math.isfinite(east) and math.isfinite(north)):
        raise NameError_("UTM east/north are not finite")
    try:
        zone = int(fields[2]) if fields[2] else None
        lat, lon = _optional_float(fields[4]), _optional_float(fields[5])
        heading = _optional_float(fields[8])
    except ValueError as exc:
        raise NameError_(f"malformed optional field: {exc}") from None
    return GeoName(
        utm_east=east,
        utm_north=north,
        utm_zone=zone,
        utm_letter=fields[3] or None,
        lat=lat,
        lon=lon,
        pano_id=fields[6] or None,
        heading=heading,
        timestamp=fields[12] or None,
        note=fields[13] or None,
    )


def format_name(
    utm_east: float,
    utm_north: float,
    *,
    utm_zone: int | None = None,
    utm_letter: str | None = None,
    lat: float | None = None,
    lon: float | None = None,
    pano_id: str = "",
    heading: float | None = None,
    timestamp: str = "",
    note: str = "",
    ext: str = "jpg",
) -> str:
    """Build a 15-field datasets_vg file name."""
    parts = [
        f"{utm_east:.2f}",
        f"{utm_north:.2f}",
        "" if utm_zone is None else str(utm_zone),
        utm_letter or "",
        "" if lat is None else f"{lat:.6f}",
        "" if lon is None else f"{lon:.6f}",
        pano_id,
        "",
        "" if heading is None else f"{heading:.1f}",
        "",
        "",
        "",
        timestamp,
        note,
    ]
    return "@" + "@".join(parts) + "@." + ext


def latlon_to_utm(lat: float, lon: float) -> tuple[float, float, int, str]:
    """WGS84 → (east, north, zone number, zone letter)."""
    east, north, zone, letter = utm.from_latlon(lat, lon)
    return float(east), float(north), int(zone), str(letter)


def utm_to_latlon(east: float, north: float, zone: int, letter: str) -> tuple[float, float]:
    """UTM → WGS84 (lat, lon)."""
    lat, lon = utm.to_latlon(east, north, zone, letter)
    return float(lat), float(lon)
