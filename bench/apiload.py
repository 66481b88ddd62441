"""The load generator of bench/api.py, in a process of its own: clients never share the server's GIL.

``concurrency`` client threads, each on one keep-alive HTTP/1.1 connection, post one photo per request
to ``URL/v1/locate`` until ``requests`` are sent or ``seconds`` have passed; prints one JSON line: the
requests, failures, latencies (s), wall time, the clients' CPU seconds, and with ``--versions``
(monotonic time, release version) per answer (``time.monotonic`` is the machine's clock: comparable
with the server process's). A failure is anything but a 200 whose image is answered ``ok``.

The clients are lean on purpose — they share the machine's cores with the server they measure: each
request is built once (multipart body and headers, as ``curl -F`` sends them) and written to a plain
socket; a response is read by its ``Content-Length`` and parsed with ``json``. (httpx, which
bench/api.py used before, costs about as much CPU per request as the server's own HTTP handling.)
Standard library only: it starts in a fraction of a second, without torch.

    python bench/apiload.py URL PHOTOS.pickle --concurrency 32 --requests 400 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import pickle
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

BOUNDARY = "vpr-bench-apiload"


def locate_request(host: str, port: int, name: str, data: bytes) -> bytes:
    """The bytes of ``POST /v1/locate`` with one image in the multipart field ``images``."""
    part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
    body = (part + "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST /v1/locate HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: vpr-apiload\r\nAccept: */*\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive connection: ``ask`` sends a request's bytes and returns (status, body); reconnects
    when the server has closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.sock, self.buf = host, port, None, b""

    def ask(self, request: bytes) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.sock is None:
                self.sock, self.buf = socket.create_connection((self.host, self.port), timeout=120), b""
            try:
                self.sock.sendall(request)
                return self._response()
            except (ConnectionError, EOFError):  # closed while idle (keep-alive timeout): once more, anew
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _read(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def _response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._read()
        body, self.buf = self.buf[:length], self.buf[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), body

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def run(url: str, photos: list[tuple[str, bytes]], concurrency: int, requests: int, seconds: float, versions: bool):
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    built = [locate_request(host, port, name, data) for name, data in photos]
    latencies: list[float] = []
    failures: list[str] = []
    answered: list[tuple[float, str]] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    cpu = [0.0]

    def client() -> None:
        conn, cpu0 = Connection(host, port), time.thread_time()
        try:
            while time.monotonic() < deadline:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                t0 = time.perf_counter()
                try:
                    status, body = conn.ask(built[n % len(built)])
                except OSError as exc:
                    status, body = 0, str(exc).encode()
                done = time.perf_counter()
                answer = json.loads(body) if status == 200 else None
                with lock:
                    latencies.append(done - t0)
                    if answer is None or not answer["results"][0]["ok"]:
                        failures.append(f"{status} {body[:100]!r}")
                    elif versions:
                        answered.append((time.monotonic(), answer["version"]))
        finally:
            conn.close()
            with lock:
                cpu[0] += time.thread_time() - cpu0

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "failures": failures, "wall": wall, "cpu_s": cpu[0], "versions": answered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("photos", type=Path, help="pickled list of (name, JPEG bytes)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--versions", action="store_true")
    args = parser.parse_args()
    photos = pickle.loads(args.photos.read_bytes())
    print(json.dumps(run(args.url, photos, args.concurrency, args.requests, args.seconds, args.versions)))


if __name__ == "__main__":
    main()
