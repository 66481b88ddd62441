"""Micro-batching: images of concurrent requests encoded together, one model pass per batch.

A request hands its prepared images to ``submit`` and waits on a future. One worker thread takes the
first waiting job, lets others join for at most ``wait_s`` (or until ``max_images`` images are
gathered), groups the jobs by the release they started with (a swap in the middle never mixes two
models in one pass) and encodes each group in one call. A failure fails only the jobs of its batch.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vpr.shared.release import Release


@dataclass
class _Job:
    release: Release
    images: list[Image.Image]
    future: Future = field(default_factory=Future)


class MicroBatcher:
    def __init__(self, max_images: int = 32, wait_s: float = 0.005) -> None:
        self.max_images, self.wait_s = max_images, wait_s
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()
        self.batches = 0  # model passes so far (how much batching happened: tests, load test)
        self.images = 0

    def submit(self, release: Release, images: list[Image.Image]) -> Future:
        """A future of the images' descriptors (N×dim float32), encoded with ``release``'s model."""
        job = _Job(release, images)
        if not images:
            job.future.set_result(np.empty((0, release.model.descriptor_dim), np.float32))
        else:
            self._jobs.put(job)
        return job.future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, count, deadline = [first], len(first.images), time.monotonic() + self.wait_s
        while count < self.max_images:
            try:
                job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            count += len(job.images)
        return jobs, False

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._jobs.get()
            if first is None:
                return
            jobs, closing = self._gather(first)
            by_release: dict[int, list[_Job]] = {}
            for job in jobs:
                by_release.setdefault(id(job.release), []).append(job)
            for group in by_release.values():
                self._encode(group)

    def _encode(self, group: list[_Job]) -> None:
        images = [im for job in group for im in job.images]
        try:
            desc = group[0].release.encode_images(images, batch_size=max(1, self.max_images))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests, the worker lives on
            for job in group:
                job.future.set_exception(exc)
            return
        self.batches += 1
        self.images += len(images)
        start = 0
        for job in group:
            job.future.set_result(desc[start : start + len(job.images)])
            start += len(job.images)
