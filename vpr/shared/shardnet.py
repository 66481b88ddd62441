"""Remote shards (``resources.shards_url``): a tar streamed over http(s), or out of a ``pipe:`` command,
read as untrusted input.

The shard index is local (DVC versions it), so nothing the server says is believed: every tar header is
checked against the index before a byte of its member is read (a header claiming 8 GiB is refused, not
buffered), reading stops at the tar's end-of-archive block (a Content-Length beyond what the index
promises is refused up front, never waited for), and every transfer runs under a deadline and a
low-speed limit (curl's ``--max-time`` and ``--speed-limit``/``--speed-time``): a stalled or dripping
server fails in bounded time. A watchdog closes the connection (or kills the command) at the deadline,
so not even a blocked read outlives it.
"""

from __future__ import annotations

import http.client
import logging
import os
import selectors
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from vpr.foundations.config import ResourcesConfig

logger = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
MAX_META_BYTES = 64 * 2**10  # a sample's .json (its catalog row) is a few hundred bytes
CONNECT_TIMEOUT_S = 5.0  # a host that does not answer fails fast
MAX_REDIRECTS = 5
_CHUNK = 2**20


class TransferError(Exception):
    """A remote shard did not arrive within its limits, or is not what the shard index says it is."""


@dataclass(frozen=True)
class RemoteShards:
    """Where shards are streamed from (a base URL or ``pipe:`` command) and the limits of every transfer."""

    base: str
    deadline_s: float = 600.0
    min_bytes_per_s: float = 1024.0
    window_s: float = 30.0
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    allow_pipe: bool = False

    def __post_init__(self) -> None:
        if self.base.startswith("pipe:") and not self.allow_pipe:
            raise TransferError(
                f"shards_url {self.base!r} runs a shell command; set resources.allow_pipe: true to allow it"
            )
        if not self.base.startswith(("pipe:", "http://", "https://")):
            raise TransferError(f"shards_url {self.base!r}: only http(s):// URLs and pipe: commands are streamed")

    def location(self, shard: str) -> str:
        """The URL (or command) of ``shard``, a name relative to the shard root."""
        return f"{self.base.rstrip('/')}/{shard}"


def remote_shards(resources: ResourcesConfig) -> RemoteShards | None:
    """The remote source ``resources`` configures (None: the local shard folder); a ``pipe:`` is logged."""
    if not resources.shards_url:
        return None
    if resources.shards_url.startswith("pipe:") and resources.allow_pipe:
        command = resources.shards_url[5:]
        logger.warning("resources.allow_pipe: streaming shards by running the shell command %r", command)
    return RemoteShards(
        resources.shards_url,
        deadline_s=resources.shards_deadline_s,
        min_bytes_per_s=resources.shards_min_bytes_per_s,
        window_s=resources.shards_speed_window_s,
        allow_pipe=resources.allow_pipe,
    )


class Transfer:
    """One shard's bytes under a deadline and a low-speed limit, never more than ``max_bytes`` of them."""

    def __init__(self, url: str, limits: RemoteShards, max_bytes: int) -> None:
        self.url, self.limits, self.max_bytes = url, limits, max_bytes
        self.total = 0
        self._start = time.monotonic()
        self._mark = (self._start, 0)  # the low-speed window: since when, from how many bytes
        self._expired = False
        self._sock: socket.socket | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._proc: subprocess.Popen | None = None
        self._timer = threading.Timer(limits.deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        try:
            self._open_pipe(url[5:]) if url.startswith("pipe:") else self._open_http(url)
        except BaseException:
            self.close()
            raise

    def _expire(self) -> None:
        """The deadline: unblock whatever read is waiting (the reader then reports it)."""
        self._expired = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._proc is not None:
            self._proc.kill()

    def _fail(self, what: str) -> TransferError:
        if self._expired or time.monotonic() - self._start >= self.limits.deadline_s:
            what = f"not read within the deadline of {self.limits.deadline_s:g} s (resources.shards_deadline_s)"
        return TransferError(f"shard {self.url}: {what}; {self.total} bytes read")

    def _open_http(self, url: str) -> None:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            self._conn = kind(parts.hostname or "", parts.port, timeout=self.limits.connect_timeout_s)
            try:
                self._conn.connect()
                self._sock = self._conn.sock
                self._sock.settimeout(self._wait())
                self._conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers={
                    "User-Agent": "vpr", "Accept-Encoding": "identity"})  # fmt: skip
                self._resp = self._conn.getresponse()
            except OSError as exc:
                raise self._fail(f"cannot fetch ({exc or 'timed out'})") from None
            status = self._resp.status
            if status in (301, 302, 303, 307, 308) and self._resp.getheader("Location"):
                url = urljoin(url, self._resp.getheader("Location"))
                self._conn.close()
                continue
            if status != 200:
                raise self._fail(f"HTTP {status} {self._resp.reason}")
            length = self._resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise self._fail(
                    f"the server announces {int(length)} bytes, the shard index promises at most "
                    f"{self.max_bytes}: refused"
                )
            return
        raise self._fail(f"more than {MAX_REDIRECTS} redirects")

    def _open_pipe(self, command: str) -> None:
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(command, shell=True, bufsize=0, stdout=subprocess.PIPE, stderr=self._stderr)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._proc.stdout, selectors.EVENT_READ)

    def _wait(self) -> float:
        """How long one read may block: the rest of the deadline, and no longer than the speed window."""
        left = self.limits.deadline_s - (time.monotonic() - self._start)
        if left <= 0:
            raise self._fail("")
        return min(left, self.limits.window_s) if self.limits.min_bytes_per_s > 0 else left

    def _check_speed(self) -> None:
        since, then = self._mark
        now = time.monotonic()
        if now - since < self.limits.window_s:
            return
        speed = (self.total - then) / (now - since)
        if speed < self.limits.min_bytes_per_s:
            raise self._fail(
                f"too slow: {speed:.0f} bytes/s over {now - since:.0f} s, under the limit of "
                f"{self.limits.min_bytes_per_s:g} (resources.shards_min_bytes_per_s)"
            )
        self._mark = (now, self.total)

    def _read_some(self, n: int) -> bytes:
        wait = self._wait()
        try:
            if self._proc is not None:
                if not self._selector.select(wait):
                    raise TimeoutError
                return os.read(self._proc.stdout.fileno(), n) if self._proc.stdout else b""
            assert self._sock is not None and self._resp is not None
            self._sock.settimeout(wait)
            return self._resp.read1(n)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, TimeoutError) and not self._expired and self.limits.min_bytes_per_s > 0:
                raise self._fail(
                    f"stalled: no data for {wait:g} s (resources.shards_min_bytes_per_s: "
                    f"{self.limits.min_bytes_per_s:g} over resources.shards_speed_window_s)"
                ) from None
            raise self._fail(f"read failed ({exc or 'timed out'})") from None

    def read_exact(self, n: int) -> bytes:
        """The next ``n`` bytes; ``TransferError`` when the stream ends first or breaks a limit."""
        if self.total + n > self.max_bytes:
            raise self._fail(f"more than the {self.max_bytes} bytes the shard index promises")
        parts, got = [], 0
        while got < n:
            chunk = self._read_some(min(n - got, _CHUNK))
            if not chunk:
                if self._expired:
                    raise self._fail("")
                raise self._fail(f"ends early (truncated): {n - got} more bytes expected{self._said()}")
            parts.append(chunk)
            got += len(chunk)
            self.total += len(chunk)
            self._check_speed()
        return b"".join(parts)

    def _said(self) -> str:
        """What a ``pipe:`` command wrote on stderr (its last line), to explain why it stopped."""
        if self._proc is None:
            return ""
        self._stderr.seek(0)
        lines = self._stderr.read()[-2000:].decode(errors="replace").strip().splitlines()
        return f" (the command said: {lines[-1]})" if lines else ""

    def close(self) -> None:
        """Stop reading (whatever the server still has to send), end the command, stop the watchdog."""
        self._timer.cancel()
        if self._resp is not None:
            self._resp.close()
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stdout:
                self._proc.stdout.close()
            self._stderr.close()

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def promised_bytes(ends: list[int]) -> int:
    """The most a shard can be, by its index: the last jpg, one .json of at most ``MAX_META_BYTES``, the
    end-of-archive blocks, padded to tar's record size."""
    last = -(-max(ends, default=0) // BLOCK) * BLOCK
    size = last + BLOCK + MAX_META_BYTES + 2 * BLOCK
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def tar_samples(transfer: Transfer, keys: list[str], offsets: list[int], sizes: list[int]) -> Iterator[dict]:
    """The samples of a streamed tar as WebDataset groups them (``__key__`` and one entry per member),
    each member's header checked against the index (key, name, size, offset) before its data is read."""
    where, sample, n = f"shard {transfer.url}", None, -1
    while True:
        header = transfer.read_exact(BLOCK)
        if header.count(0) == BLOCK:  # end of archive: stop here, whatever follows
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise TransferError(f"{where}: corrupt tar header at byte {transfer.total - BLOCK} ({exc})") from None
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise TransferError(f"{where}: member {info.name} is not a plain file (tar type {info.type!r}): refused")
        key, _, ext = info.name.partition(".")
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            n += 1
            if n >= len(keys) or key != keys[n]:
                expected = keys[n] if n < len(keys) else "end of shard"
                raise TransferError(f"{where}: unexpected sample {key} (index expects {expected})")
            sample = {"__key__": key}
        if ext in sample:
            raise TransferError(f"{where}: sample {key} has member .{ext} twice: refused")
        if ext == "jpg" and (info.size != sizes[n] or transfer.total != offsets[n]):
            raise TransferError(
                f"{where}: member {info.name} claims {info.size} bytes at byte {transfer.total}, the shard "
                f"index says {sizes[n]} at {offsets[n]}: refused before reading it"
            )
        if ext == "json" and info.size > MAX_META_BYTES:
            raise TransferError(
                f"{where}: member {info.name} claims {info.size} bytes, more than a sample's metadata "
                f"({MAX_META_BYTES}): refused before reading it"
            )
        if ext not in ("jpg", "json"):
            raise TransferError(
                f"{where}: sample {key} has unexpected member .{ext}; only .jpg and .json are allowed "
                "(refused, nothing was read)"
            )
        sample[ext] = transfer.read_exact(-(-info.size // BLOCK) * BLOCK)[: info.size]
    if sample is not None:
        yield sample
