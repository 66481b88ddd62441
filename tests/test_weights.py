"""ImageNet weights like torchvision's (URL, cache, hash rule), fetched from a real HTTP server on
127.0.0.1; a corrupted file is refused by the hash check; unreachable hosts fall back to random init
with a warning instead of hanging."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from torchvision.models import resnet18
from typer.testing import CliRunner

from vpr.cli import app
from vpr.foundations.config import ModelConfig
from vpr.shared.models import build_backbone, weights
from vpr.shared.models.weights import URL_ENV, WeightsUnavailable, cached_path, fetch_imagenet

pytestmark = pytest.mark.timeout(120)  # a hang is the failure


@pytest.fixture
def served(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path/www``: (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torchvision's cache in a temporary TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _publish(www: Path, state: dict) -> str:
    """Save ``state`` under torch.hub's naming rule (``resnet18-<sha256 prefix>.pth``); its file name."""
    tmp = www / "upload.pth"
    torch.save(state, tmp)
    name = f"resnet18-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(www / name)
    return name


def test_download_fills_torchvisions_cache_and_the_backbone_loads_it(served, hub, monkeypatch):
    www, base = served
    torch.manual_seed(5)
    state = resnet18(weights=None).state_dict()
    name = _publish(www, state)
    monkeypatch.setenv(URL_ENV, f"{base}/{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        backbone = build_backbone(ModelConfig(weights="imagenet"))
    assert torch.equal(backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert cached_path() == hub / name
    assert sorted(p.name for p in hub.iterdir()) == [name, f"{name}.lock", f"{name}.sha256.json"]
    (www / name).unlink()  # cached now: the next build never asks the server
    assert torch.equal(build_backbone(ModelConfig(weights="imagenet")).conv1.weight, state["conv1.weight"])


def test_a_corrupted_download_is_refused_by_the_hash_check(served, hub, monkeypatch):
    www, base = served
    name = _publish(www, resnet18(weights=None).state_dict())
    with open(www / name, "r+b") as fh:  # one flipped byte: the name's hash prefix no longer matches
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv(URL_ENV, f"{base}/{name}")
    with pytest.warns(UserWarning, match="hash check failed.*using random init"):
        build_backbone(ModelConfig(weights="imagenet"))
    assert not (hub / name).exists() and not [p for p in hub.iterdir() if p.suffix == ".partial"]


def test_unresolvable_and_closed_hosts_fall_back_to_random_init(hub, monkeypatch):
    monkeypatch.setenv(URL_ENV, "http://weights.invalid/resnet18-f37072fd.pth")
    with pytest.warns(UserWarning, match="cannot resolve weights.invalid.*using random init"):
        build_backbone(ModelConfig(weights="imagenet"))
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WeightsUnavailable, match="cannot connect"):
        fetch_imagenet(f"http://127.0.0.1:{port}/resnet18-f37072fd.pth")


def test_a_server_that_never_answers_times_out(hub):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel does), never sends a byte
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/resnet18-f37072fd.pth"
        with pytest.raises(WeightsUnavailable, match="timed out"):
            fetch_imagenet(url, read_timeout=0.5)
    finally:
        listener.close()
    assert not hub.exists() or not [p for p in hub.iterdir() if p.suffix == ".partial"]


def test_vpr_weights_shows_the_source_and_fetches_on_request(served, hub, monkeypatch, tmp_path):
    www, base = served
    name = _publish(www, resnet18(weights=None).state_dict())
    monkeypatch.setenv(URL_ENV, f"{base}/{name}")
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  weights: imagenet\n")
    shown = CliRunner().invoke(app, ["weights", "-p", str(params)])
    assert shown.exit_code == 0 and "not cached yet" in shown.output and f"${URL_ENV}" in shown.output
    fetched = CliRunner().invoke(app, ["weights", "--fetch", "-p", str(params)])
    assert fetched.exit_code == 0, fetched.output
    assert (hub / name).is_file() and "ImageNet, cached" in CliRunner().invoke(
        app, ["weights", "-p", str(params)]
    ).output
    (hub / name).unlink()
    (www / name).unlink()
    missing = CliRunner().invoke(app, ["weights", "--fetch", "-p", str(params)])
    assert missing.exit_code == 1 and "cannot fetch the ImageNet weights" in missing.output


@pytest.fixture
def drip(tmp_path):
    """A real HTTP server on 127.0.0.1 that announces 40 MB and sends one byte every 0.2 s: its URL."""
    stop = threading.Event()

    class Drip(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(40 * 2**20))
            self.end_headers()
            try:
                while not stop.wait(0.2):
                    self.wfile.write(b"x")
                    self.wfile.flush()
            except OSError:  # the client hung up: what it should do
                pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/resnet18-f37072fd.pth"
    stop.set()
    server.shutdown()
    server.server_close()


def test_a_dripping_server_is_cut_by_the_speed_limit_and_the_deadline(drip, hub, monkeypatch):
    """Every read arrives within the read timeout, so only a speed limit or a deadline ends it."""
    monkeypatch.setattr(weights, "SPEED_WINDOW_S", 1.0)
    with pytest.raises(WeightsUnavailable, match="too slow: [0-9] bytes/s over 1 s"):
        fetch_imagenet(drip, read_timeout=5)
    monkeypatch.setattr(weights, "MIN_BYTES_PER_S", 0.0)
    with pytest.raises(WeightsUnavailable, match="not done within 1.5 s"):
        fetch_imagenet(drip, read_timeout=5, deadline_s=1.5)
    assert not [p for p in hub.iterdir() if p.name.endswith(".partial")]


def test_a_builder_waiting_on_a_held_lock_gives_up_and_falls_back(served, hub, monkeypatch):
    www, base = served
    name = _publish(www, resnet18(weights=None).state_dict())
    monkeypatch.setenv(URL_ENV, f"{base}/{name}")
    hub.mkdir(parents=True)
    monkeypatch.setattr(weights, "LOCK_TIMEOUT_S", 0.5)
    with FileLock(str(hub / f"{name}.lock")):  # another builder, frozen mid-download
        with pytest.warns(UserWarning, match="another process has held .* for over 0.5 s.*using random init"):
            build_backbone(ModelConfig(weights="imagenet"))
    assert not (hub / name).exists()


def test_leftover_partials_of_dead_downloads_are_removed(served, hub, monkeypatch):
    www, base = served
    name = _publish(www, resnet18(weights=None).state_dict())
    hub.mkdir(parents=True)
    # killed downloads: one named after a PID that may well be alive again (ours), one from an old scheme
    leftovers = [hub / f".{name}.{os.getpid()}.partial", hub / f".{name}.1.0badcafe.partial"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a download")
    fetch_imagenet(f"{base}/{name}")
    assert (hub / name).is_file() and not [p for p in leftovers if p.exists()]


def test_a_corrupt_cached_file_is_moved_aside_and_fetched_again_or_fallen_back_from(served, hub, monkeypatch):
    www, base = served
    torch.manual_seed(7)
    state = resnet18(weights=None).state_dict()
    name = _publish(www, state)
    monkeypatch.setenv(URL_ENV, f"{base}/{name}")
    hub.mkdir(parents=True)
    (hub / name).write_bytes(b"not a checkpoint at all")  # its name still carries the good hash
    with pytest.warns(UserWarning, match="fail their hash check") as caught:
        backbone = build_backbone(ModelConfig(weights="imagenet"))
    assert not [w for w in caught if "random init" in str(w.message)]
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])  # fetched again
    assert (hub / f"{name}.corrupt").read_bytes() == b"not a checkpoint at all"

    good = (hub / name).read_bytes()
    (hub / name).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # damaged in the cache, same size
    time.sleep(0.01)
    (www / name).unlink()  # and the server is gone
    with pytest.warns(UserWarning) as caught:
        build_backbone(ModelConfig(weights="imagenet"))
    messages = " | ".join(str(w.message) for w in caught)
    assert "fail their hash check" in messages and "using random init" in messages, messages
