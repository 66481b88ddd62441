"""ImageNet weights for the backbone, the way torchvision gets them, without ever hanging offline.

The URL, the cache and the hash rule are torchvision's: ``ResNet18_Weights.IMAGENET1K_V1.url``, cached
as ``$TORCH_HOME/hub/checkpoints/<file name>``, and the file name's ``-<hex>.`` part must prefix the
SHA-256 of what was downloaded (``torch.hub.HASH_REGEX``). What differs is the network: torch.hub's
download has no timeout (a silent firewall or a stuck DNS hangs it), so here the host is resolved and
connected under ``CONNECT_TIMEOUT_S`` first, every read has ``READ_TIMEOUT_S``, the size is bounded,
and a failure of any kind is a ``WeightsUnavailable`` with the reason (the backbone then warns and
starts from random init). ``VPR_IMAGENET_URL`` points the download elsewhere (a mirror; the tests).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch
from filelock import FileLock
from torchvision.models import ResNet18_Weights

logger = logging.getLogger(__name__)

URL_ENV = "VPR_IMAGENET_URL"
CONNECT_TIMEOUT_S = 2.0  # name lookup + TCP connect, together
READ_TIMEOUT_S = 30.0  # per read once connected
MAX_BYTES = 256 * 2**20  # ResNet-18's file is 44.7 MiB
_CHUNK = 2**20


class WeightsUnavailable(Exception):
    """The ImageNet weights could not be had (offline, unreachable, refused by the hash check...)."""


def imagenet_url() -> str:
    """Where the weights come from: ``$VPR_IMAGENET_URL`` or torchvision's URL."""
    return os.environ.get(URL_ENV) or ResNet18_Weights.IMAGENET1K_V1.url


def cached_path(url: str | None = None) -> Path:
    """torchvision's cache file for ``url``: ``<torch.hub.get_dir()>/checkpoints/<file name>``."""
    name = Path(urlparse(url or imagenet_url()).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def expected_hash_prefix(url: str) -> str | None:
    """The SHA-256 prefix the file name promises (torch.hub's rule), None when it carries none."""
    match = torch.hub.HASH_REGEX.search(Path(urlparse(url).path).name)
    return match.group(1) if match else None


def _connectable(host: str, port: int, timeout: float) -> None:
    """Resolve and connect within ``timeout`` seconds (name lookup in a thread: it has no timeout)."""
    found: dict = {}

    def lookup() -> None:
        try:
            found["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            found["error"] = exc

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise WeightsUnavailable(f"no answer resolving {host} within {timeout:g} s")
    if "error" in found:
        raise WeightsUnavailable(f"cannot resolve {host}: {found['error']}")
    family, kind, proto, _, address = found["addrs"][0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            raise WeightsUnavailable(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from None


def fetch_imagenet(
    url: str | None = None, *, connect_timeout: float = CONNECT_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S
) -> Path:
    """The cached weights file, downloaded first when missing; ``WeightsUnavailable`` on any failure.

    The download goes to a temporary name beside the cache file and is renamed only after the hash
    check, under a file lock (two processes starting at once download once).
    """
    url = url or imagenet_url()
    dst = cached_path(url)
    if dst.is_file():
        return dst
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise WeightsUnavailable(f"not an http(s) URL: {url}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if dst.is_file():
            return dst
        _connectable(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), connect_timeout)
        logger.info("downloading ImageNet weights %s → %s", url, dst)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
        try:
            digest = _download(url, tmp, read_timeout)
            prefix = expected_hash_prefix(url)
            if prefix and not digest.startswith(prefix):
                raise WeightsUnavailable(
                    f"hash check failed for {url}: sha256 {digest[:16]}… does not start with {prefix}"
                )
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    return dst


def _download(url: str, target: Path, read_timeout: float) -> str:
    """Stream ``url`` into ``target`` (bounded size, per-read timeout); its SHA-256 hex digest."""
    sha = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "vpr (torch.hub compatible)"})
    try:
        with urllib.request.urlopen(request, timeout=read_timeout) as response, open(target, "wb") as out:
            total = 0
            while chunk := response.read(_CHUNK):
                total += len(chunk)
                if total > MAX_BYTES:
                    raise WeightsUnavailable(f"{url} is larger than {MAX_BYTES} bytes: not ResNet-18 weights")
                sha.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError) as exc:  # HTTP errors, resets, read timeouts
        raise WeightsUnavailable(f"download of {url} failed: {getattr(exc, 'reason', None) or exc}") from None
    return sha.hexdigest()


def describe_imagenet() -> dict:
    """Where ``model.weights: imagenet`` takes its weights from (``vpr weights``)."""
    url = imagenet_url()
    path = cached_path(url)
    return {
        "url": url,
        "url_from": f"${URL_ENV}" if os.environ.get(URL_ENV) else "torchvision ResNet18_Weights.IMAGENET1K_V1",
        "cache": str(path),
        "cached": path.is_file(),
        "sha256_prefix": expected_hash_prefix(url),
    }


def describe(setting: str) -> str:
    """Where the backbone's weights come from under ``model.weights: setting`` (``vpr weights``)."""
    info = describe_imagenet()
    if setting == "none":
        source = "random init (model.weights: none)"
    elif setting != "imagenet":
        source = f"local file {setting}"
    else:
        source = f"ImageNet, {'cached' if info['cached'] else 'not cached yet: downloaded on first use'}"
    return (
        f"model.weights: {setting}\nsource:        {source}\n"
        f"imagenet url:  {info['url']} ({info['url_from']})\nimagenet file: {info['cache']}"
    )
