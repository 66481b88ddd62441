"""ImageNet weights like torchvision's (URL, cache, hash rule), fetched from a real HTTP server on
127.0.0.1; a corrupted file is refused by the hash check; unreachable hosts fall back to random init
with a warning instead of hanging."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18
from typer.testing import CliRunner

from vpr.cli import app
from vpr.foundations.config import ModelConfig
from vpr.shared.models import build_backbone
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
    assert cached_path() == hub / name and sorted(p.name for p in hub.iterdir()) == [name, f"{name}.lock"]
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
