"""Remote shards (``resources.shards_url``) are untrusted: a real HTTP server on 127.0.0.1 serves a tar
whose header claims 8 GiB, stalls, drips, or announces a huge Content-Length; each read ends quickly with
an error naming the shard (and the member), never buffering or waiting on what the server claims.
A ``pipe:`` source runs a shell command: refused unless ``resources.allow_pipe`` says yes, logged when used."""

from __future__ import annotations

import http.server
import io
import json
import logging
import resource
import tarfile
import threading

import polars as pl
import pytest
from PIL import Image
from pydantic import ValidationError

from vpr.foundations.config import ResourcesConfig
from vpr.shared.shardio import ShardError, checksum, shard_plans, stream_samples
from vpr.shared.shardnet import RemoteShards, remote_shards
from vpr.steps.shards import sample_key, write_tar

pytestmark = pytest.mark.timeout(120)  # a hang is the failure

SHARD = "test/test-database-000000.tar"
HUGE = 8 * 2**30 - 1  # the most a ustar size field holds


def _jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (shade, 40, 200 - shade)).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture
def shard(tmp_path):
    """A real 3-sample shard under ``tmp_path/www`` and its index rows: (tar bytes, index)."""
    samples = [(sample_key("test", "database", n), _jpeg(60 * n), json.dumps({"n": n}).encode()) for n in range(3)]
    path = tmp_path / "www" / SHARD
    path.parent.mkdir(parents=True)
    ranges = write_tar(path, samples)
    index = pl.DataFrame(
        {
            "id": list(range(3)),
            "key": [key for key, _, _ in samples],
            "shard": [SHARD] * 3,
            "offset": [offset for offset, _ in ranges],
            "size": [size for _, size in ranges],
            "crc32": [checksum(jpg) for _, jpg, _ in samples],
        }
    )
    return path.read_bytes(), index


def _with_huge_member(data: bytes, offset: int) -> bytes:
    """``data`` with the header before ``offset`` claiming an 8 GiB member (checksum fixed up)."""
    start = offset - tarfile.BLOCKSIZE
    header = bytearray(data[start:offset])
    header[124:136] = b"%011o\0" % HUGE
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:start] + bytes(header)


@pytest.fixture
def server(shard):
    """A real HTTP server on 127.0.0.1 that misbehaves as the first path element says; its base URL."""
    data, index = shard
    second = index.row(1, named=True)
    stop = threading.Event()

    class Misbehaving(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            how = self.path.strip("/").split("/")[0]
            body = _with_huge_member(data, second["offset"]) if how == "huge" else data
            self.send_response(200)
            if how != "huge":  # no length: "the rest of the connection", as a streaming server sends
                self.send_header("Content-Length", str(10**12 if how == "liar" else len(body)))
            self.end_headers()
            try:
                if how == "huge":  # the header, then "the 8 GiB": zeros for as long as anyone reads
                    self.wfile.write(body)
                    while not stop.is_set():
                        self.wfile.write(bytes(2**20))
                elif how == "stall":  # a few samples' worth, then nothing
                    self.wfile.write(body[: second["offset"] + 100])
                    self.wfile.flush()
                    stop.wait(60)
                elif how == "drip":  # one byte at a time, well under the speed limit
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if stop.wait(0.05):
                            return
                else:  # the whole tar; "liar" then keeps the connection open as if more were coming
                    self.wfile.write(body)
                    self.wfile.flush()
                    stop.wait(60) if how in ("liar", "silent") else None
            except OSError:  # the reader hung up: what it should do
                pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    stop.set()
    httpd.shutdown()
    httpd.server_close()


def _read(index: pl.DataFrame, remote: RemoteShards) -> list[tuple[int, bytes, bytes]]:
    (plan,) = shard_plans(index, remote)
    return list(stream_samples(plan))


def _limits(base: str, how: str) -> RemoteShards:
    return RemoteShards(f"{base}/{how}", deadline_s=20, min_bytes_per_s=50, window_s=1)


def test_a_remote_shard_streams_and_nothing_past_the_end_of_the_tar_is_waited_for(shard, server):
    data, index = shard
    for how in ("good", "silent"):  # "silent": the tar, then an open connection that never closes
        got = _read(index, _limits(server, how))
        assert [n for n, _, _ in got] == [0, 1, 2]
        assert [checksum(jpg) for _, jpg, _ in got] == index["crc32"].to_list()


def test_a_header_claiming_a_huge_member_is_refused_before_it_is_read(shard, server):
    data, index = shard
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ShardError) as err:
        _read(index, RemoteShards(f"{server}/huge", deadline_s=20, min_bytes_per_s=50, window_s=1))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    member = f"{index['key'][1]}.jpg"
    assert f"huge/{SHARD}" in str(err.value) and member in str(err.value), err.value
    assert f"claims {HUGE} bytes" in str(err.value) and "refused before reading it" in str(err.value)
    assert grown_mb < 100, grown_mb  # nothing of "the 8 GiB" was buffered


@pytest.mark.parametrize("how,reason", [("stall", "stalled: no data for 1 s"), ("drip", "too slow")])
def test_a_stalled_or_dripping_server_fails_within_the_limits(shard, server, how, reason):
    data, index = shard
    with pytest.raises(ShardError, match=reason) as err:
        _read(index, _limits(server, how))
    assert f"{how}/{SHARD}" in str(err.value)


def test_a_stalled_server_fails_at_the_deadline_without_a_speed_limit(shard, server):
    data, index = shard
    remote = RemoteShards(f"{server}/stall", deadline_s=2, min_bytes_per_s=0, window_s=1)
    with pytest.raises(ShardError, match=r"not read within the deadline of 2 s \(resources.shards_deadline_s\)"):
        _read(index, remote)


def test_a_content_length_beyond_what_the_index_promises_is_refused(shard, server):
    data, index = shard
    with pytest.raises(ShardError, match=r"announces 1000000000000 bytes, the shard index promises at most \d+"):
        _read(index, _limits(server, "liar"))


# --------------------------------------------------------------------------- pipe: needs an opt-in


def test_a_pipe_source_is_refused_without_allow_pipe(shard, tmp_path):
    data, index = shard
    command = f"pipe:cat {tmp_path / 'www'}"
    with pytest.raises(ValidationError, match="runs a shell command; set resources.allow_pipe: true"):
        ResourcesConfig(shards_url=command)
    with pytest.raises(ShardError, match="set resources.allow_pipe: true"):
        shard_plans(index, command)  # a bare URL string never runs a command either


def test_an_allowed_pipe_source_streams_and_is_logged(shard, tmp_path):
    data, index = shard
    command = f"cat {tmp_path / 'www'}"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("vpr.shared.shardnet")
    logger.addHandler(handler)
    try:
        remote = remote_shards(ResourcesConfig(shards_url=f"pipe:{command}", allow_pipe=True))
    finally:
        logger.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.WARNING] and command in records[0].getMessage()
    assert remote is not None
    assert [checksum(jpg) for _, jpg, _ in _read(index, remote)] == index["crc32"].to_list()
