"""``vpr locate --api URL``: the same answers from a running service, without loading torch or a model.

A one-shot ``vpr locate`` spends nearly all of a one-image call starting up (imports, model, index:
BENCHMARKS.md, "`vpr locate`"); asking the service costs an HTTP round trip. Files are read like everywhere else
(regular files only, bounded by ``locate.max_file_mb``); an unreadable one gets its own error entry
without being sent. Connecting is bounded by 2 s, each read by 120 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vpr.foundations.config import LocateConfig
from vpr.foundations.imageio import UnreadableFile, read_image_file


class ApiError(RuntimeError):
    """The service did not answer, or refused the request (the message says why)."""


def locate_remote(url: str, images: Sequence[Path], top_k: int, limits: LocateConfig) -> list[dict]:
    """Per image, what ``vpr locate --json`` gives, answered by the service at ``url``.

    Any number of images: they go in requests within the service's limits (``/v1/health`` says them),
    read one request's worth at a time.
    """
    import httpx

    base = url.rstrip("/")
    timeout = httpx.Timeout(120.0, connect=2.0)
    with httpx.Client(timeout=timeout) as http:
        health = _answer(http, "GET", f"{base}/v1/health", url)
        per_request = int(health.get("max_images", 1))
        byte_budget = int(float(health.get("max_request_mb", 1.0)) * 2**20 * 0.9)  # room for the multipart framing
        results: list[dict] = []
        batch: list[tuple[int, tuple]] = []
        size = 0

        def send() -> None:
            answers = _answer(
                http, "POST", f"{base}/v1/locate", url, params={"top_k": top_k}, files=[f for _, f in batch]
            )
            for (slot, _), answer in zip(batch, answers["results"]):
                results[slot].update({k: v for k, v in answer.items() if k != "image"})
            batch.clear()

        for path in images:
            try:
                data = read_image_file(Path(path), limits.max_file_bytes)
            except (UnreadableFile, OSError) as exc:
                results.append({"image": str(path), "ok": False, "error": str(exc)})
                continue
            if batch and (len(batch) == per_request or size + len(data) > byte_budget):
                send()
                size = 0
            results.append({"image": str(path)})
            batch.append((len(results) - 1, ("images", (Path(path).name, data, "application/octet-stream"))))
            size += len(data)
        if batch:
            send()
    return results


def _answer(http, method: str, where: str, url: str, **kwargs) -> dict:
    import httpx

    try:
        r = http.request(method, where, **kwargs)
    except httpx.HTTPError as exc:
        raise ApiError(f"no answer from {url}: {exc}") from None
    if r.status_code != 200:
        detail = r.json().get("detail") if "json" in r.headers.get("content-type", "") else r.text[:200]
        raise ApiError(f"{url} refused the request ({r.status_code}): {detail}")
    return r.json()
