"""What stands between the network and the service: bounds on clients, hosts, origins and decode memory.

- ``BodyGuard`` (ASGI): a body over ``api.max_request_mb`` is a 413, read no further; a body that stalls
  (no byte for ``api.body_idle_s``) or is still arriving after ``api.body_timeout_s`` is a 408 and the
  connection is closed (the spooled upload goes with it); a client that hangs up mid-upload is one log line.
- ``HostGuard`` (ASGI): only the allowed ``Host`` names are answered (DNS rebinding: a page on an attacker's
  name that resolves to 127.0.0.1 gets a 400), and a POST from another origin (``Origin``,
  ``Sec-Fetch-Site``) gets a 403; clients that send no ``Origin`` (curl, scripts) are same-origin.
- ``DecodeBudget``: the pixels being decoded at once, over all requests, stay under a budget; a request
  that would go over it is told to come back (503 + ``Retry-After``) instead of piling up memory.
- ``uvicorn_config``: uvicorn with a deadline on request headers (a half-sent header is closed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpr.foundations.config import ApiConfig

if TYPE_CHECKING:  # uvicorn is imported where a server is built (``vpr api`` starts fast without it)
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

_LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class _BodyRefused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await response({"type": "http"}, _no_receive, send)


class BodyGuard:
    """ASGI middleware: the request body is bounded in size and in time (see the module docstring)."""

    def __init__(self, app: ASGIApp, limit: int, idle_s: float, timeout_s: float) -> None:
        self.app, self.limit, self.idle_s, self.timeout_s = app, limit, idle_s, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _reply(send, 413, self._too_large())
        seen, refused, started = 0, None, False
        deadline = time.monotonic() + self.timeout_s

        async def guarded() -> Message:
            nonlocal seen, refused
            wait = min(self.idle_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                what = f"no body byte for {self.idle_s:g} s (api.body_idle_s)"
                if wait < self.idle_s:
                    what = f"body still arriving after {self.timeout_s:g} s (api.body_timeout_s)"
                refused = _BodyRefused(408, f"request timed out: {what}")
                raise refused from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = _BodyRefused(413, self._too_large())
                    raise refused
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded, watched)
        except ClientDisconnect:  # an aborted upload: nobody to answer, nothing to trace
            logger.warning("%s %s: client gone before its body was read", scope["method"], scope["path"])
        except Exception:
            if refused is None or started:  # the parser may wrap our signal in its own error
                raise
            await _reply(send, refused.status, refused.detail, {"Connection": "close"})

    def _too_large(self) -> str:
        return f"request body over {self.limit / 2**20:g} MB (api.max_request_mb)"


def allowed_hosts(api: ApiConfig) -> frozenset[str]:
    """The bound host, the loopback names and ``api.allowed_hosts`` (lower case, IPv6 without brackets)."""
    return frozenset(h.strip("[]").lower() for h in (api.host, *_LOOPBACK, *api.allowed_hosts))


def _host_name(value: str) -> str | None:
    try:
        return urlsplit(f"//{value}").hostname  # "[::1]:8000" → "::1"; lower case
    except ValueError:
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """ASGI middleware: the ``Host`` must be allowed; a POST must come from this origin (or none)."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str], any_ip: bool = False) -> None:
        self.app, self.hosts, self.any_ip = app, frozenset(hosts), any_ip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        name = _host_name(host)
        if not ("*" in self.hosts or name in self.hosts or (self.any_ip and name is not None and _is_ip(name))):
            return await _reply(send, 400, f"host {host!r} is not served here (api.allowed_hosts)")
        if scope["method"] not in _SAFE_METHODS:
            problem = _cross_origin(headers, host)
            if problem:
                return await _reply(send, 403, f"cross-origin request refused: {problem}")
        await self.app(scope, receive, send)


def _cross_origin(headers: dict[str, str], host: str) -> str | None:
    site = headers.get("sec-fetch-site")
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site is {site}"
    origin = headers.get("origin")
    if origin is None:
        return None  # not a browser's cross-origin write (curl, scripts, the CLI)
    parts = urlsplit(origin)
    if origin == "null" or parts.netloc.lower() != host.lower():
        return f"Origin {origin} is not {host}"
    return None


def return_large_buffers_to_the_os(threshold: int = 4 * 2**20) -> None:
    """Fix glibc's mmap threshold: a decoded raster's blocks (Pillow: 16 MB) are then mapped and unmapped
    instead of kept in each decode thread's heap arena after the first large free (measured: the
    service held gigabytes after a pixel-bomb burst without this). No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class DecodeBusy(Exception):
    """The decode budget is spent by other requests: come back shortly (HTTP 503 + Retry-After)."""


class DecodeBudget:
    """Pixels being decoded at once, over all requests; a decode that would exceed it is refused.

    Memory per decode grows with the decoded pixels (≈ 4–5 bytes per pixel for a large PNG: the raster,
    reduced at once; ``vpr.steps.locate``), so bounding their sum bounds the service's decode memory however
    many requests arrive. One image up to ``locate.max_pixels`` always fits an idle service. Small
    decodes (under 1/64 of the budget: ordinary photos, JPEGs decoded at their drafted size) are always
    admitted, so bombs cannot starve normal requests; their sum stays bounded by the decode threads
    (``api.decode_threads`` × 1/64 of the budget more: 4 × 1/64 by default).
    """

    def __init__(self, pixels: int) -> None:
        self.pixels, self.in_use, self.small = pixels, 0, pixels // 64
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Reserve ``pixels`` while the block runs; ``DecodeBusy`` at once when they do not fit."""
        with self._lock:
            if pixels > self.small and self.in_use and self.in_use + pixels > self.pixels:
                raise DecodeBusy(
                    f"decode budget busy ({self.in_use} of {self.pixels} pixels being decoded, this image "
                    f"needs {pixels}; api.decode_budget_mpx): retry shortly"
                )
            self.in_use += pixels
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= pixels


def header_deadline_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request headers are not complete within
    ``header_timeout_s`` of its opening (or of its previous response): half-sent headers hold nothing."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a whole request line and headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request's headers get the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                logger.info("closing a connection whose request headers took over %g s", header_timeout_s)
                self.transport.close()

    return HeaderDeadline


def uvicorn_config(app, api: ApiConfig, **kwargs) -> uvicorn.Config:
    """uvicorn's settings for the service: h11 with the header deadline, the keep-alive bound."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=header_deadline_protocol(api.header_timeout_s),
        timeout_keep_alive=api.keep_alive_s,
        h11_max_incomplete_event_size=api.max_header_kb * 1024,
        **kwargs,
    )
