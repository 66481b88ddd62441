"""The synthetic city: deterministic bytes, datasets_vg names and layout, any resolution."""

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from vpr.foundations.config import SplitSize, SynthConfig
from vpr.foundations.geo import FIELDS, parse_name
from vpr.foundations.layout import ROLES, SPLITS
from vpr.steps.synth import generate_city

MICRO = SynthConfig(
    seed=3,
    height=48,
    width=64,
    train=SplitSize(database=20, queries=10),
    val=SplitSize(database=20, queries=10),
    test=SplitSize(database=20, queries=10),
)


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def micro_city(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("city")
    generate_city(root, MICRO)
    return root


def test_same_config_gives_identical_bytes(micro_city, tmp_path):
    generate_city(tmp_path, MICRO, workers=2)  # process count must not matter either
    assert digests(tmp_path) == digests(micro_city)


def test_other_seed_changes_images(micro_city, tmp_path):
    generate_city(tmp_path, MICRO.model_copy(update={"seed": 4}))
    ours, theirs = digests(micro_city), digests(tmp_path)
    assert len(theirs) == len(ours)
    assert set(ours.values()).isdisjoint(theirs.values())


def test_layout_counts_and_names(micro_city):
    for split in SPLITS:
        for role in ROLES:
            folder = micro_city / "images" / split / role
            files = sorted(folder.glob("*.jpg"))
            assert len(files) == getattr(getattr(MICRO, split), role)
            for path in files:
                assert len(path.name.split("@")[1:-1]) == len(FIELDS)  # every field present, some empty
                geo = parse_name(path)
                assert (geo.utm_zone, geo.utm_letter) == (17, "T")
                assert 39.5 < geo.lat < 41.5 and -81.0 < geo.lon < -79.0
                assert 0.0 <= geo.heading < 360.0 and geo.timestamp and geo.pano_id
    assert not list(micro_city.rglob("*.tmp"))


def test_images_have_configured_size(micro_city):
    with Image.open(next((micro_city / "images" / "test" / "queries").glob("*.jpg"))) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (64, 48), "RGB")


def test_splits_do_not_share_places(micro_city):
    def positions(split):
        paths = (micro_city / "images" / split).rglob("*.jpg")
        return [(g.utm_east, g.utm_north) for g in map(parse_name, paths)]

    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        nearest = min(((e1 - e2) ** 2 + (n1 - n2) ** 2) ** 0.5 for e1, n1 in positions(a) for e2, n2 in positions(b))
        assert nearest > 100.0


def test_queries_mostly_near_database(micro_city):
    for split in SPLITS:
        db = [parse_name(p) for p in (micro_city / "images" / split / "database").glob("*.jpg")]
        queries = [parse_name(p) for p in (micro_city / "images" / split / "queries").glob("*.jpg")]
        near = sum(
            min(((q.utm_east - d.utm_east) ** 2 + (q.utm_north - d.utm_north) ** 2) ** 0.5 for d in db) <= 25.0
            for q in queries
        )
        assert near >= 0.8 * len(queries)


def test_stale_images_are_removed(tmp_path):
    small = MICRO.model_copy(update={"test": SplitSize(database=4, queries=2)})
    generate_city(tmp_path, MICRO)
    generate_city(tmp_path, small)
    assert len(list((tmp_path / "images" / "test" / "database").glob("*.jpg"))) == 4


def test_full_resolution_renders(tmp_path):
    tiny = SplitSize(database=1, queries=1)
    cfg = SynthConfig(height=480, width=640, train=tiny, val=tiny, test=tiny)
    summary = generate_city(tmp_path, cfg)
    assert summary["counts"]["test"] == {"database": 1, "queries": 1}
    for path in (tmp_path / "images").rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.size == (640, 480)
