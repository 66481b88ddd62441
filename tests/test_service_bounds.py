"""The service against hostile clients, on a real uvicorn server: pixel bombs, slow and half-sent
requests, foreign Host names and cross-origin writes, aborted uploads, odd priors."""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import polars as pl
import pytest
from PIL import Image

from tests.apikit import running
from tests.test_evaluate import build_micro_release
from vpr.foundations.config import ApiConfig, LocateConfig
from vpr.shared.shardio import ShardReader
from vpr.steps.api.app import create_app
from vpr.steps.api.live import LiveRelease

BOUND = 10.0  # seconds a test waits for the server to act on a bound configured far below it


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro-bounds")
    cfg, layout = build_micro_release(root)
    row = ShardReader(layout.shards_dir).index.filter(pl.col("role") == "database").sort("id").row(0, named=True)
    photo = (Path(row["path"]).name, (root / "data" / row["path"]).read_bytes(), "image/jpeg")
    return layout, photo


@contextmanager
def serving(micro, api: ApiConfig, limits: LocateConfig | None = None):
    layout, _ = micro
    live = LiveRelease(layout.release_dir("avg"), shards_dir=layout.shards_dir)
    with running(create_app(live, api, limits or LocateConfig(), watch=False), api) as url:
        yield url


def _png_bomb(side: int) -> bytes:
    """A few kB of PNG that decode to side × side RGB pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_pixel_bomb_burst_is_told_to_retry_while_normal_requests_are_answered(micro):
    _, photo = micro
    side = 2500  # 6.25 Mpx each; the budget holds one such decode (plus small ones), not two
    api = ApiConfig(max_images=4, decode_budget_mpx=7)
    bomb = ("bomb.png", _png_bomb(side), "image/png")
    with serving(micro, api, LocateConfig(max_pixels=side * side)) as url:

        def bombs(_) -> httpx.Response:
            return httpx.post(f"{url}/v1/locate", files=[("images", bomb)] * 4, timeout=120)

        def normal(_) -> httpx.Response:
            return httpx.post(f"{url}/v1/locate", files=[("images", photo)], timeout=120)

        refused = []
        for _ in range(5):  # each burst overlaps decodes many times over; a few bursts make it certain
            with ThreadPoolExecutor(12) as pool:
                burst = [pool.submit(bombs, i) for i in range(8)]
                normals = [pool.submit(normal, i) for i in range(4)]
                answers = [f.result() for f in burst]
                for f in normals:
                    r = f.result()
                    assert r.status_code == 200 and r.json()["results"][0]["ok"], r.text
            assert {r.status_code for r in answers} <= {200, 503}
            refused += [r for r in answers if r.status_code == 503]
            if refused:
                break
        assert refused, "no bomb request was refused: decodes are not bounded"
        assert all(r.headers.get("retry-after") == "1" for r in refused)
        assert "api.decode_budget_mpx" in refused[0].json()["detail"]
        after = httpx.post(f"{url}/v1/locate", files=[("images", bomb)], timeout=120)
        assert after.status_code == 200 and after.json()["results"][0]["ok"]  # an idle service decodes one


def _spooled_files() -> set[str]:
    """This process's open temporary files (the service runs in it: uploads spooled to disk)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/tmp/") and target.endswith("(deleted)"):
            found.add(target)
    return found


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails if it has not within BOUND)."""
    sock.settimeout(BOUND)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {BOUND} s; got {received[:80]!r}")
    return received


def test_half_sent_headers_and_stalled_uploads_are_closed_and_leave_no_temp_file(micro):
    api = ApiConfig(header_timeout_s=0.5, body_idle_s=0.5, body_timeout_s=3, max_request_mb=8)
    with serving(micro, api) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        before = _spooled_files()
        with socket.create_connection((host, port)) as half:
            half.sendall(b"POST /v1/locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multi")
            assert _closed_by_server(half) == b""
        boundary = b"b0undary"
        head = b'--b0undary\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
        with socket.create_connection((host, port)) as stalled:
            stalled.sendall(
                b"POST /v1/locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6000000\r\n"
                b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n" + head + b"\0" * 3_000_000
            )  # past the 1 MB that stays in memory: spooled to a temporary file, then nothing more
            reply = _closed_by_server(stalled)
        assert reply.startswith(b"HTTP/1.1 408") and b"api.body_idle_s" in reply
        deadline = time.monotonic() + BOUND
        while _spooled_files() - before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _spooled_files() - before, "a stalled upload's temporary file is still open"
        assert httpx.get(f"{url}/v1/health").status_code == 200


def test_only_allowed_hosts_and_same_origin_writes_are_served_and_docs_load_nothing_remote(micro):
    _, photo = micro
    with serving(micro, ApiConfig(allowed_hosts=["vpr.lan"])) as url:
        port = urlsplit(url).port
        for host in ("127.0.0.1", "localhost", "[::1]", "vpr.lan", "VPR.lan"):
            r = httpx.get(f"{url}/v1/map", headers={"Host": f"{host}:{port}"})
            assert r.status_code == 200, (host, r.text)
        for host in (f"evil.example:{port}", "rebind.attacker.test", ""):
            r = httpx.get(f"{url}/v1/map", headers={"Host": host})
            assert r.status_code == 400 and "api.allowed_hosts" in r.json()["detail"], host
        same = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
        for headers in ({}, same):  # curl sends no Origin; the page sends its own
            r = httpx.post(f"{url}/v1/locate", files=[("images", photo)], headers=headers, timeout=60)
            assert r.status_code == 200, (headers, r.text)
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            r = httpx.post(f"{url}/v1/locate", files=[("images", photo)], headers=headers, timeout=60)
            assert r.status_code == 403 and "cross-origin" in r.json()["detail"], headers
        assert httpx.get(f"{url}/docs").status_code == 404 and httpx.get(f"{url}/redoc").status_code == 404
        assert "/v1/locate" in httpx.get(f"{url}/openapi.json").json()["paths"]
        assert "https://" not in httpx.get(url).text  # the page loads nothing from elsewhere


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_an_aborted_upload_is_one_log_line_and_odd_priors_are_refused_or_explained(micro):
    _, photo = micro
    records = _Records()
    watched = [logging.getLogger(name) for name in ("uvicorn.error", "vpr.steps.api.guards")]
    try:
        with serving(micro, ApiConfig()) as url:
            for logger in watched:  # after uvicorn's own logging setup, which drops the handlers it finds
                logger.addHandler(records)
            host, port = urlsplit(url).hostname, urlsplit(url).port
            with socket.create_connection((host, port)) as aborted:
                aborted.sendall(
                    b"POST /v1/locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500000\r\n"
                    b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n"
                    b'Content-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\n' + b"\0" * 1000
                )
                time.sleep(0.3)
            deadline = time.monotonic() + BOUND
            while not any("client gone" in r.getMessage() for r in records.records) and time.monotonic() < deadline:
                time.sleep(0.1)
            for params in ({"radius_m": "inf"}, {"radius_m": "nan"}, {"radius_m": -5}, {"lat": "nan", "lon": 0}):
                full = {"lat": 40.0, "lon": -80.0, **params}
                r = httpx.post(f"{url}/v1/locate", params=full, files=[("images", photo)], timeout=60)
                assert r.status_code == 422, (params, r.text)
            r = httpx.post(f"{url}/v1/locate", params={"lat": 10.5, "lon": 20.0}, files=[("images", photo)])
            assert r.status_code == 200 and r.json()["candidates"] == 0
            (result,) = r.json()["results"]
            assert result["ok"] and result["matches"] == [] and result["estimate"] is None
            assert result["reason"] == "no database image within 100 m of 10.5, 20 (the GPS prior)"
    finally:
        for logger in watched:
            logger.removeHandler(records)
    gone = [r for r in records.records if "client gone" in r.getMessage()]
    assert len(gone) == 1 and "POST /v1/locate" in gone[0].getMessage()
    assert not [r for r in records.records if r.exc_info], "a traceback was logged"
