"""ImageNet weights for the backbone, the way torchvision gets them, without ever hanging offline.

The URL, the cache and the hash rule are torchvision's: ``ResNet18_Weights.IMAGENET1K_V1.url``, cached
as ``$TORCH_HOME/hub/checkpoints/<file name>``, and the file name's ``-<hex>.`` part must prefix the
SHA-256 of what was downloaded (``torch.hub.HASH_REGEX``). What differs is the network: torch.hub's
download has no timeout (a silent firewall or a stuck DNS hangs it), so here the host is resolved and
connected under ``CONNECT_TIMEOUT_S`` first, every read has ``READ_TIMEOUT_S``, the whole download a
deadline and a low-speed limit, the size is bounded, the cache lock is waited for a bounded time, and
the cached file's hash is re-checked on use (a corrupt one is moved aside and fetched again),
and a failure of any kind is a ``WeightsUnavailable`` with the reason (the backbone then warns and
starts from random init). ``VPR_IMAGENET_URL`` points the download elsewhere (a mirror; the tests).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from filelock import FileLock, Timeout

from vpr.foundations.atomic import write_text_atomic
from vpr.foundations.digest import file_sha256

logger = logging.getLogger(__name__)

URL_ENV = "VPR_IMAGENET_URL"
CONNECT_TIMEOUT_S = 2.0  # name lookup + TCP connect, together
READ_TIMEOUT_S = 30.0  # per read once connected
MAX_BYTES = 256 * 2**20  # ResNet-18's file is 44.7 MiB
DEADLINE_S = 600.0  # the whole download (44.7 MiB: 76 KiB/s at least)
MIN_BYTES_PER_S = 16 * 2**10  # ... and cut when slower than this over SPEED_WINDOW_S (a drip never ends)
SPEED_WINDOW_S = 30.0
LOCK_TIMEOUT_S = DEADLINE_S + 60.0  # a waiter outlasts a live download, not a frozen one
SIDECAR_SUFFIX = ".sha256.json"  # the cached file's size, mtime and SHA-256: hashed once, checked on use
_CHUNK = 2**20
# torchvision's ``ResNet18_Weights.IMAGENET1K_V1.url``, written out: importing torchvision for one string
# cost every model build ~2 s (BENCHMARKS.md); tests/test_resnet.py checks it against torchvision's
TORCHVISION_RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


class WeightsUnavailable(Exception):
    """The ImageNet weights could not be had (offline, unreachable, refused by the hash check...)."""


def imagenet_url() -> str:
    """Where the weights come from: ``$VPR_IMAGENET_URL`` or torchvision's URL."""
    return os.environ.get(URL_ENV) or TORCHVISION_RESNET18_URL


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


def cached_digest(path: Path) -> str:
    """SHA-256 of a cached file, hashed once per (size, mtime) and remembered in ``<file>.sha256.json``."""
    stat = path.stat()
    memo_path = path.with_name(path.name + SIDECAR_SUFFIX)
    try:
        memo = json.loads(memo_path.read_text())
        if memo["size"] == stat.st_size and memo["mtime_ns"] == stat.st_mtime_ns:
            return str(memo["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = file_sha256(path)
    memo = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    write_text_atomic(memo_path, json.dumps(memo))
    return digest


def _cache_ok(dst: Path, url: str, *, move_aside: bool) -> bool:
    """Whether the cached file is there and still has the SHA-256 its name promises (a file corrupted in
    the cache would otherwise fail every build). With ``move_aside`` a bad one is renamed ``*.corrupt``."""
    if not dst.is_file():
        return False
    prefix = expected_hash_prefix(url)
    if not prefix or cached_digest(dst).startswith(prefix):
        return True
    if move_aside:
        bad = dst.with_name(dst.name + ".corrupt")
        os.replace(dst, bad)
        warnings.warn(
            f"cached ImageNet weights {dst} fail their hash check (sha256 prefix {prefix}); moved to {bad}",
            stacklevel=3,
        )
    return False


def _remove_dead_partials(dst: Path) -> None:
    """Remove the ``.partial`` files of downloads that died: called under the lock, so none is alive
    (the lock, not a PID, decides: PIDs repeat across containers sharing a cache)."""
    for leftover in dst.parent.glob(f".{dst.name}.*.partial"):
        leftover.unlink(missing_ok=True)


def fetch_imagenet(
    url: str | None = None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
    deadline_s: float | None = None,
    lock_timeout_s: float | None = None,
) -> Path:
    """The cached weights file, downloaded first when missing or corrupt; ``WeightsUnavailable`` on any failure.

    The download goes to a temporary name beside the cache file and is renamed only after the hash
    check, under a file lock (two processes starting at once download once); a process that waits for
    the lock longer than ``lock_timeout_s`` gives up (the backbone then starts from random init).
    """
    url = url or imagenet_url()
    deadline_s = DEADLINE_S if deadline_s is None else deadline_s
    lock_timeout_s = LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s
    dst = cached_path(url)
    if _cache_ok(dst, url, move_aside=False):
        return dst
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise WeightsUnavailable(f"not an http(s) URL: {url}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dst) + ".lock", timeout=lock_timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise WeightsUnavailable(
            f"another process has held {lock.lock_file} for over {lock_timeout_s:g} s (downloading {dst.name})"
        ) from None
    try:
        if _cache_ok(dst, url, move_aside=True):
            return dst
        _remove_dead_partials(dst)
        _connectable(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), connect_timeout)
        logger.info("downloading ImageNet weights %s → %s", url, dst)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        try:
            digest = _download(url, tmp, read_timeout, deadline_s)
            prefix = expected_hash_prefix(url)
            if prefix and not digest.startswith(prefix):
                raise WeightsUnavailable(
                    f"hash check failed for {url}: sha256 {digest[:16]}… does not start with {prefix}"
                )
            os.replace(tmp, dst)
            cached_digest(dst)  # remembered now, so using the file never hashes it again
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        lock.release()
    return dst


def _download(url: str, target: Path, read_timeout: float, deadline_s: float) -> str:
    """Stream ``url`` into ``target`` (bounded size, per-read timeout, an overall deadline and a low-speed
    limit: ``MIN_BYTES_PER_S`` over ``SPEED_WINDOW_S``); its SHA-256 hex digest."""
    sha = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "vpr (torch.hub compatible)"})
    start = time.monotonic()
    since, then, total = start, 0, 0
    try:
        with urllib.request.urlopen(request, timeout=read_timeout) as response, open(target, "wb") as out:
            while chunk := response.read1(_CHUNK):  # one socket read: a drip cannot hide inside a big read
                total += len(chunk)
                if total > MAX_BYTES:
                    raise WeightsUnavailable(f"{url} is larger than {MAX_BYTES} bytes: not ResNet-18 weights")
                sha.update(chunk)
                out.write(chunk)
                now = time.monotonic()
                if now - start > deadline_s:
                    raise WeightsUnavailable(f"download of {url} not done within {deadline_s:g} s ({total} bytes)")
                if now - since >= SPEED_WINDOW_S:
                    if (total - then) / (now - since) < MIN_BYTES_PER_S:
                        raise WeightsUnavailable(
                            f"download of {url} too slow: {(total - then) / (now - since):.0f} bytes/s over "
                            f"{now - since:.0f} s (at least {MIN_BYTES_PER_S:g} needed)"
                        )
                    since, then = now, total
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # HTTP errors, resets, timeouts
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
