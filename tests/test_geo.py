import math

import pytest

from vpr.foundations.geo import NameError_, format_name, latlon_to_utm, parse_name, utm_to_latlon


def test_fifteen_field_name():
    g = parse_name("@0584291.21@4476924.92@17@T@040.43870@-080.00613@004702@00@@@@@@pitch1_yaw1@.jpg")
    assert (g.utm_east, g.utm_north, g.utm_zone, g.utm_letter) == (584291.21, 4476924.92, 17, "T")
    assert g.lat == pytest.approx(40.4387) and g.lon == pytest.approx(-80.00613)
    assert g.pano_id == "004702" and g.note == "pitch1_yaw1" and g.heading is None


def test_two_field_name():
    g = parse_name("@584291.2@4476924.9@.jpg")
    assert (g.utm_east, g.utm_north) == (584291.2, 4476924.9)
    assert g.utm_zone is None and g.lat is None


def test_parent_folder_with_at_signs_is_ignored():
    g = parse_name("/data/we@ird@1@2@/images/test/queries/@10.5@20.5@.jpg")
    assert (g.utm_east, g.utm_north) == (10.5, 20.5)


@pytest.mark.parametrize(
    "name,reason",
    [
        ("photo.jpg", "convention"),
        ("@12@.jpg", "fewer than two"),
        ("@abc@1@.jpg", "not numbers"),
        ("@nan@1@.jpg", "not finite"),
        ("@1@inf@.jpg", "not finite"),
        ("@1@2@x@@@@@@@@@@@@@@@@@.jpg", "fields"),
    ],
)
def test_bad_names_raise_with_reason(name, reason):
    with pytest.raises(NameError_, match=reason):
        parse_name(name)


def test_format_roundtrip_and_utm_conversion():
    east, north, zone, letter = latlon_to_utm(40.4387, -80.00613)
    name = format_name(
        east,
        north,
        utm_zone=zone,
        utm_letter=letter,
        lat=40.4387,
        lon=-80.00613,
        heading=90.0,
        timestamp="20260101",
        pano_id="p1",
    )
    assert len(name[1:-5].split("@")) == 14
    g = parse_name(name)
    assert math.isclose(g.utm_east, east, abs_tol=0.01) and g.heading == 90.0
    lat, lon = utm_to_latlon(g.utm_east, g.utm_north, zone, letter)
    assert lat == pytest.approx(40.4387, abs=1e-5) and lon == pytest.approx(-80.00613, abs=1e-5)
