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


def test_captures_planned_in_ranges_equal_the_whole_plan():
    from vpr.steps.synth import make_styles, plan_captures, plan_city

    city = plan_city(MICRO, make_styles(MICRO.seed, MICRO.facade_styles))
    for role in ROLES:
        whole = plan_captures(MICRO, "test", role, city["test"])
        parts = [
            c
            for start in range(0, len(whole), 3)
            for c in plan_captures(MICRO, "test", role, city["test"], range(start, min(start + 3, len(whole))))
        ]
        assert parts == whole and len(whole) > 3


def test_imap_bounded_pulls_items_only_as_results_are_read():
    from concurrent.futures import ThreadPoolExecutor

    from vpr.foundations.procs import imap_bounded

    pulled, ahead = [0], []

    def items():
        for k in range(5000):
            pulled[0] += 1
            yield k

    with ThreadPoolExecutor(2) as pool:
        out = []
        for value in imap_bounded(pool, lambda k: k * k, items(), in_flight=4):
            out.append(value)
            ahead.append(pulled[0] - len(out))
    assert out == [k * k for k in range(5000)]
    assert max(ahead) <= 4


# Run in a fresh interpreter: the worker pool forks, which is only safe in a process without other
# threads (a test session has Prefect's). Counts what the parent pulls against what comes back.
_STREAMING = """
import json, sys
from vpr.foundations.config import SynthConfig
from vpr.steps.synth import city

city.CHUNK = 1
tasks, render_all = city._tasks, city._render_all
pulled, done, ahead = [0], [0], []

def counting_tasks(*args):
    for task in tasks(*args):
        pulled[0] += 1
        ahead.append(pulled[0] - done[0])
        yield task

def counting_render_all(*args):
    for result in render_all(*args):
        done[0] += 1
        yield result

city._tasks, city._render_all = counting_tasks, counting_render_all
summary = city.generate_city(sys.argv[1], SynthConfig.model_validate_json(sys.argv[2]), workers=2)
print(json.dumps({"pulled": pulled[0], "done": done[0], "images": summary["images"], "ahead": max(ahead),
                  "bound": city.IN_FLIGHT * 2 + 1}))
"""


def test_rendering_streams_with_a_bounded_number_of_tasks_held(micro_city, tmp_path):
    """The parent pulls a range of captures only as a rendered one comes back: however many images,
    at most IN_FLIGHT tasks per worker are outstanding (here 90 one-image tasks, at most 5 held)."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(repo), os.environ.get("PYTHONPATH"))))}
    cmd = [sys.executable, "-c", _STREAMING, str(tmp_path), MICRO.model_dump_json()]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["pulled"] == counts["done"] == counts["images"] == 90, counts
    assert counts["ahead"] <= counts["bound"], counts
    assert digests(tmp_path) == digests(micro_city)  # the same bytes, whatever the chunking


def test_dead_temporaries_are_swept_once_per_folder_and_live_ones_kept(tmp_path):
    """Images are written without a folder listing each (that made N writes O(N²)); generate_city sweeps
    each folder once instead: a killed writer's temporary goes, a live writer's (locked) stays."""
    import fcntl
    import os

    small = MICRO.model_copy(update={"splits": ["test"]})
    folder = tmp_path / "images" / "test" / "database"
    folder.mkdir(parents=True)
    dead = folder / ".@0584000.00@4477000.00@.jpg.99999999.deadbeef.tmp"
    live = folder / ".@0584000.00@4477000.00@.jpg.4194000.abcd1234.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"busy")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        generate_city(tmp_path, small)
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)
