"""``vpr locate --api URL``: the same answers from a running service, without loading torch or a model.

A one-shot ``vpr locate`` spends ~99 % of a one-image call starting up (imports, model, index:
BENCHMARKS.md); asking the service costs an HTTP round trip. Files are read like everywhere else
(regular files only, bounded by ``locate.max_file_mb``); an unreadable one gets its own error entry
without being sent. Connecting is bounded by 2 s, each read by 120 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vpr.config import LocateConfig
from vpr.imageio import UnreadableFile, read_image_file


class ApiError(RuntimeError):
    """The service did not answer, or refused the request (the message says why)."""


def locate_remote(url: str, images: Sequence[Path], top_k: int, limits: LocateConfig) -> list[dict]:
    """Per image, what ``vpr locate --json`` gives, answered by the service at ``url``."""
    import httpx

    results: list[dict] = []
    files = []
    for path in images:
        try:
            data = read_image_file(Path(path), limits.max_file_bytes)
        except (UnreadableFile, OSError) as exc:
            results.append({"image": str(path), "ok": False, "error": str(exc)})
            continue
        results.append({"image": str(path)})
        files.append((len(results) - 1, ("images", (Path(path).name, data, "application/octet-stream"))))
    if not files:
        return results
    try:
        r = httpx.post(
            f"{url.rstrip('/')}/v1/locate",
            params={"top_k": top_k},
            files=[f for _, f in files],
            timeout=httpx.Timeout(120.0, connect=2.0),
        )
    except httpx.HTTPError as exc:
        raise ApiError(f"no answer from {url}: {exc}") from None
    if r.status_code != 200:
        detail = r.json().get("detail") if "json" in r.headers.get("content-type", "") else r.text[:200]
        raise ApiError(f"{url} refused the request ({r.status_code}): {detail}")
    for (slot, _), answer in zip(files, r.json()["results"]):
        results[slot].update({k: v for k, v in answer.items() if k != "image"})
    return results
