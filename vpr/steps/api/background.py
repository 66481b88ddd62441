"""The service in a background thread: a real uvicorn server on a free loopback port.

For tests and benchmarks that talk to ``vpr api`` over HTTP from the same process, and for embedding
the service beside other work; ``vpr api`` itself runs uvicorn in the foreground (``vpr.steps.api.serve``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from vpr.foundations.config import ApiConfig
from vpr.steps.api.guards import uvicorn_config


@contextmanager
def running(app, api: ApiConfig | None = None) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a port the OS picks) with ``api``'s connection bounds (default: the
    defaults); yields the base URL; stops it afterwards."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, api or ApiConfig(), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the service did not start")
        time.sleep(0.05)
    try:
        httpx.get(f"{url}/v1/health", timeout=10).raise_for_status()
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
