"""The HTTP service on a real uvicorn server: answers, per-image errors, GPS prior, limits, hot swap."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from PIL import Image

from tests.apikit import running
from tests.test_evaluate import build_micro_release
from vpr.foundations.config import ApiConfig, LocateConfig
from vpr.shared.shardio import ShardReader
from vpr.steps.api.app import create_app
from vpr.steps.api.batcher import MicroBatcher
from vpr.steps.api.live import LiveRelease
from vpr.steps.index import add_to_release, load_release

API = ApiConfig(max_images=3, max_request_mb=2, max_top_k=10, poll_s=0.1, batch_wait_ms=20)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro-api")
    cfg, layout = build_micro_release(root)
    return root, cfg, layout


@pytest.fixture
def service(micro):
    root, cfg, layout = micro
    live = LiveRelease(layout.release_dir("avg"), shards_dir=layout.shards_dir)
    with running(create_app(live, API, LocateConfig())) as url:
        yield url, live


def _db_rows(layout) -> pl.DataFrame:
    return ShardReader(layout.shards_dir).index.filter(pl.col("role") == "database").sort("id")


def _file(root: Path, row: dict) -> tuple[str, bytes, str]:
    return (Path(row["path"]).name, (root / "data" / row["path"]).read_bytes(), "image/jpeg")


def _jpeg_bomb(jpeg: bytes) -> bytes:
    """A small JPEG whose header claims 60,000 × 60,000 pixels (3.6 gigapixels; its data holds far fewer)."""
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60_000).to_bytes(2, "big") * 2
    return bytes(data)


def test_a_known_database_image_comes_first_with_the_release_version(micro, service):
    root, cfg, layout = micro
    url, live = service
    row = _db_rows(layout).row(3, named=True)
    r = httpx.post(f"{url}/v1/locate", params={"top_k": 3}, files=[("images", _file(root, row))], timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == live.current().version and body["head"] == "avg"
    (result,) = body["results"]
    assert result["ok"] and result["matches"][0]["id"] == row["id"] and len(result["matches"]) == 3
    assert result["matches"][0]["distance"] < 1e-3 and result["estimate"]["utm_east"] == pytest.approx(
        row["utm_east"], abs=3
    )
    health = httpx.get(f"{url}/v1/health").json()
    assert health["version"] == body["version"] and health["database_size"] == live.current().release.index.ntotal
    # the thumbnail of a match is the shard's own JPEG; an id outside the release is a 404
    thumb = httpx.get(f"{url}/v1/images/{row['id']}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content == ShardReader(layout.shards_dir).read_jpeg(row["id"])
    assert httpx.get(f"{url}/v1/images/123456789").status_code == 404
    assert httpx.get(f"{url}/v1/map").json()["count"] == health["database_size"]
    assert httpx.get(f"{url}/docs").status_code == 404 and "/v1/locate" in httpx.get(f"{url}/openapi.json").text


def test_a_broken_file_among_good_ones_fails_alone(micro, service):
    root, cfg, layout = micro
    url, _ = service
    row = _db_rows(layout).row(0, named=True)
    files = [
        ("images", ("junk.jpg", b"\xff\xd8\xff not really a jpeg", "image/jpeg")),
        ("images", _file(root, row)),
        ("images", ("bomb.jpg", _jpeg_bomb(_file(root, row)[1]), "image/jpeg")),
    ]
    r = httpx.post(f"{url}/v1/locate", files=files, timeout=60)
    assert r.status_code == 200, r.text
    junk, good, bomb = r.json()["results"]
    assert not junk["ok"] and "image" in junk["error"]
    assert good["ok"] and good["matches"][0]["id"] == row["id"]
    assert not bomb["ok"] and "pixels" in bomb["error"] and "before decoding" in bomb["error"]


def test_the_gps_prior_excludes_far_candidates(micro, service):
    root, cfg, layout = micro
    url, _ = service
    rows = _db_rows(layout)
    far, near = rows.row(0, named=True), rows.filter(pl.col("lat") > rows["lat"].min() + 0.002).row(0, named=True)
    prior = {"lat": near["lat"], "lon": near["lon"], "radius_m": 30, "top_k": 10}
    r = httpx.post(f"{url}/v1/locate", params=prior, files=[("images", _file(root, far))], timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    (result,) = body["results"]
    assert body["prior"]["radius_m"] == 30 and 0 < body["candidates"] < rows.height
    assert far["id"] not in [m["id"] for m in result["matches"]]  # the image itself is too far from the prior
    assert len(result["matches"]) == body["candidates"]
    assert all(abs(m["lat"] - near["lat"]) < 30 / 111_000 for m in result["matches"])
    without = httpx.post(f"{url}/v1/locate", files=[("images", _file(root, far))], timeout=60).json()
    assert without["results"][0]["matches"][0]["id"] == far["id"] and without["candidates"] is None


def test_oversize_and_malformed_requests_get_413_or_422_and_the_service_lives_on(micro, service):
    root, cfg, layout = micro
    url, _ = service
    one = _file(root, _db_rows(layout).row(0, named=True))
    too_many = httpx.post(f"{url}/v1/locate", files=[("images", one)] * 4, timeout=60)
    assert too_many.status_code == 413 and "at most 3 images" in too_many.json()["detail"]
    huge = httpx.post(f"{url}/v1/locate", files=[("images", ("big.jpg", b"\0" * (3 * 2**20), "image/jpeg"))])
    assert huge.status_code == 413 and "api.max_request_mb" in huge.json()["detail"]

    def chunked():  # no Content-Length: the limit is counted while reading
        yield b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\n'
        for _ in range(48):
            yield b"\0" * 65536

    streamed = httpx.post(
        f"{url}/v1/locate", content=chunked(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert streamed.status_code == 413
    for params in ({"top_k": 0}, {"top_k": 11}, {"lat": 40.0}, {"lat": 91, "lon": 0}):
        assert httpx.post(f"{url}/v1/locate", params=params, files=[("images", one)]).status_code == 422, params
    assert httpx.post(f"{url}/v1/locate", data={"other": "x"}).status_code == 422
    assert httpx.post(f"{url}/v1/locate", files=[("images", one)], timeout=60).status_code == 200


def test_a_release_published_mid_test_is_served_and_no_request_fails_across_the_swap(micro, service):
    root, cfg, layout = micro
    url, live = service
    rows = _db_rows(layout)
    row = rows.row(1, named=True)
    before = live.current().version
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                r = http.post(f"{url}/v1/locate", files=[("images", _file(root, row))])
                answers.append((r.status_code, r.json().get("version", "") if r.status_code == 200 else r.text))

    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(client)
        while len(answers) < 6:
            threading.Event().wait(0.05)
        release = load_release(layout.release_dir("avg"))
        query = ShardReader(layout.shards_dir).index.filter(pl.col("role") == "queries").sort("id").head(1)
        desc = release.encode(ShardReader(layout.shards_dir), query["id"].to_list())
        after = add_to_release(release, query["id"].to_list(), desc, query).name
        seen = len(answers)
        while not any(v == after for _, v in answers[seen:]) and len(answers) < seen + 500:
            threading.Event().wait(0.05)
        for _ in range(6):  # a few more on the new release
            threading.Event().wait(0.05)
        stop.set()
    assert all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [v for _, v in answers]
    assert before in versions and after in versions and set(versions) == {before, after}
    assert live.swaps >= 1 and live.current().version == after
    assert httpx.get(f"{url}/v1/health").json()["database_size"] == rows.height + 1


def test_the_micro_batcher_encodes_concurrent_jobs_together_per_release(micro):
    root, cfg, layout = micro
    release = load_release(layout.release_dir("avg"))
    other = load_release(layout.release_dir("avg"))  # another loaded object: never batched with the first
    reader = ShardReader(layout.shards_dir)
    images = [reader.load(int(i)) for i in _db_rows(layout)["id"].head(5)]
    batcher = MicroBatcher(max_images=8, wait_s=1.0)
    try:
        jobs = [(release, images[:2]), (release, images[2:3]), (other, images[3:])]
        futures = [batcher.submit(r, ims) for r, ims in jobs]
        got = [f.result(timeout=60).descriptors for f in futures]
        assert batcher.batches == 2 and batcher.images == 5
        expected = release.encode_images(images)
        np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-5)
        assert batcher.submit(release, []).result().descriptors.shape == (0, release.model.descriptor_dim)
    finally:
        batcher.close()


def _same(got, want, where: str = "") -> None:
    """Equal JSON, floats to 1e-4 (the model's float rounding differs with the batch it encodes; the search,
    ranking and everything else must not: ``tests/test_search_alone.py`` holds the search to the bit)."""
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4), where
    else:
        assert got == want, where


def test_concurrent_requests_are_encoded_and_searched_together_and_answered_as_alone(micro):
    """The batcher encodes and searches concurrent requests' images together (decoded off the event loop);
    every answer is the one the same request gets on its own."""
    root, cfg, layout = micro
    rows = _db_rows(layout)
    photos = [_file(root, rows.row(i, named=True)) for i in range(0, 12, 2)]
    near = rows.row(3, named=True)
    prior = {"lat": near["lat"], "lon": near["lon"], "radius_m": 40, "top_k": 4}
    requests = [({"top_k": 4}, [p]) for p in photos[:4]]  # one image each
    requests += [({"top_k": 4}, photos[4:6]), (prior, photos[:1])]  # two images; a GPS prior
    images = sum(len(files) for _, files in requests)
    live = LiveRelease(layout.release_dir("avg"), shards_dir=layout.shards_dir)

    def post(url: str, params: dict, files: list) -> dict:
        r = httpx.post(f"{url}/v1/locate", params=params, files=[("images", f) for f in files], timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    alone_api = API.model_copy(update={"batch_wait_ms": 0})
    with running(create_app(live, alone_api, LocateConfig(), watch=False), alone_api) as url:
        alone = [post(url, params, files) for params, files in requests]  # one at a time: a batch each
    together_api = API.model_copy(update={"batch_images": images, "batch_wait_ms": 10_000})  # full: all at once
    app = create_app(live, together_api, LocateConfig(), watch=False)
    with running(app, together_api) as url, ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: post(url, *r), requests))
        batcher = app.state.batcher
    for got, want in zip(together, alone):  # the same answer: matches, ranks, ids exactly; numbers to rounding
        _same(got, want)
    assert all(res["ok"] for body in together for res in body["results"])
    assert batcher.images == images and batcher.batches < len(requests) and batcher.searches < len(requests)


def test_a_release_that_fails_to_load_leaves_the_served_one_answering(micro, tmp_path):
    root, cfg, layout = micro
    live = LiveRelease(layout.release_dir("avg"), shards_dir=layout.shards_dir)
    version = live.current().version
    pointer = layout.release_dir("avg") / "CURRENT"
    saved = pointer.read_text()
    try:
        pointer.write_text("v999999\n")  # names a version that does not exist
        assert live.refresh() is False and live.current().version == version
        pointer.write_text("garbage\n")
        assert live.refresh() is False and live.current().version == version
    finally:
        pointer.write_text(saved)
    assert Image.open(io.BytesIO(live.current().thumbnail(int(_db_rows(layout)["id"][0])))).size


def test_vpr_locate_api_asks_the_service_without_loading_torch(micro, service, tmp_path):
    root, cfg, layout = micro
    url, _ = service
    row = _db_rows(layout).row(4, named=True)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff broken")
    params = tmp_path / "params.yaml"
    params.write_text(cfg.model_dump_json())  # JSON is YAML
    args = ["locate", "--api", url, "--json", "-k", "2", str(root / "data" / row["path"]), str(broken)]
    args += [str(tmp_path / "missing.jpg"), "--params", str(params)]
    probe = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from vpr.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        "print(json.dumps({'code': r.exit_code, 'out': r.stdout, 'torch': 'torch' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["torch"] is False and report["code"] == 1  # one image failed: exit status 1, like locate
    good, bad, missing = json.loads(report["out"])
    assert good["ok"] and good["matches"][0]["id"] == row["id"] and len(good["matches"]) == 2
    assert not bad["ok"] and not missing["ok"] and "image" in bad["error"]
    # nobody listening: a clear error, fast (connect bounded by 2 s)
    down = subprocess.run(
        [sys.executable, "-m", "vpr.cli", "locate", "--api", "http://127.0.0.1:9", "--params", str(params), args[6]],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and "no answer from http://127.0.0.1:9" in down.stderr


def test_vpr_locate_api_splits_more_images_than_one_request_may_hold(micro, service):
    from vpr.steps.api.client import locate_remote

    root, cfg, layout = micro
    url, _ = service
    rows = [_db_rows(layout).row(i, named=True) for i in range(API.max_images + 3)]
    answers = locate_remote(url, [root / "data" / r["path"] for r in rows], 1, LocateConfig())
    assert [a["matches"][0]["id"] for a in answers] == [r["id"] for r in rows]  # every one, in order
