"""Geography: datasets_vg file names and UTM / WGS84 conversions.

The datasets_vg convention stores the capture position in the file NAME:
``@UTM_east@UTM_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg``.
Only the first two fields are required; any other may be empty. Parent folders may contain ``@``,
so parsing always looks at the base name alone.

What a name must get right is its position: UTM east/north finite and inside UTM's range, and lat/lon,
when given, inside ±90°/±180° (``PositionError`` otherwise). An optional field that does not parse
(zone, letter, lat, lon, heading) is left empty with a warning, as tools that read only the
coordinates would: the image is still usable.
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


class PositionError(NameError_):
    """A name whose coordinates parse but cannot be a place on Earth (or in one UTM zone)."""


# UTM's range: eastings within a zone stay well inside 0..1,000 km, northings 0..10,000 km (south: false northing)
EAST_RANGE = (0.0, 1_000_000.0)
NORTH_RANGE = (0.0, 10_000_000.0)
UTM_LETTERS = frozenset("CDEFGHJKLMNPQRSTUVWX")


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
    warnings: tuple[tuple[str, str], ...] = ()  # (field, why) for each optional field left empty


def _optional_float(text: str) -> float | None:
    """An optional number field: None when empty; ``ValueError`` when it is not a finite number."""
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def _optional_zone(text: str) -> int | None:
    if text == "":
        return None
    try:
        zone = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a zone number") from None
    if not 1 <= zone <= 60:
        raise ValueError(f"zone {zone} outside 1..60")
    return zone


def _optional_letter(text: str) -> str | None:
    if text == "":
        return None
    if text.upper() not in UTM_LETTERS:
        raise ValueError(f"{text!r} is not a UTM latitude band (C..X)")
    return text.upper()


def check_position(east: float, north: float, lat: float | None = None, lon: float | None = None) -> None:
    """``PositionError`` unless the coordinates can be a place: finite, in UTM's range, lat/lon in range."""
    if not (math.isfinite(east) and math.isfinite(north)):
        raise PositionError("UTM east/north are not finite")
    if not (EAST_RANGE[0] <= east <= EAST_RANGE[1] and NORTH_RANGE[0] <= north <= NORTH_RANGE[1]):
        raise PositionError(
            f"UTM east/north {east:g}/{north:g} outside {EAST_RANGE[1]:,.0f} m / {NORTH_RANGE[1]:,.0f} m"
        )
    if lat is not None and not -90.0 <= lat <= 90.0:
        raise PositionError(f"latitude {lat:g} outside ±90")
    if lon is not None and not -180.0 <= lon <= 180.0:
        raise PositionError(f"longitude {lon:g} outside ±180")


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
    warnings: list[tuple[str, str]] = []

    def optional(field: str, parse, text: str):
        try:
            return parse(text)
        except ValueError as exc:
            warnings.append((field, str(exc)))
            return None

    zone = optional("utm_zone", _optional_zone, fields[2])
    letter = optional("utm_letter", _optional_letter, fields[3])
    lat = optional("lat", _optional_float, fields[4])
    lon = optional("lon", _optional_float, fields[5])
    heading = optional("heading", _optional_float, fields[8])
    check_position(east, north, lat, lon)
    return GeoName(
        utm_east=east,
        utm_north=north,
        utm_zone=zone,
        utm_letter=letter,
        lat=lat,
        lon=lon,
        pano_id=fields[6] or None,
        heading=heading,
        timestamp=fields[12] or None,
        note=fields[13] or None,
        warnings=tuple(warnings),
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
