"""Micro-batching: the images of concurrent requests encoded and searched together, one model pass per batch.

A request hands its images to ``submit`` — already prepared, or as a ``decode`` function that a decode
thread runs first (``decoders`` at most at once: decoding never runs on the event loop, and how many
decodes hold memory at once is bounded here as well as by the decode budget) — and waits on one
future. The model thread takes the first waiting job, lets others join for at most ``wait_s`` (or
until ``max_images`` images are gathered), groups the jobs by the release they started with (a swap
in the middle never mixes two models in one pass) and encodes each group in one call; the search
thread then searches the group's descriptors, for jobs that ask (``Search``), in one call per
(top_k, GPS prior) — every job without a prior and with the same ``top_k`` together — while the model
thread goes on with the next batch (the model never waits for a search). Each row's matches are
those it gets searched alone (``Release.search``): batching changes no answer. A failure fails only
the jobs of its batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from vpr.shared.release import Release


@dataclass(frozen=True)
class Search:
    """What a job's images are searched for: their ``top_k`` matches, within ``allowed`` ids if given."""

    top_k: int
    allowed: np.ndarray | None = None


@dataclass
class Encoded:
    """A job's result: descriptors (N×dim float32) and, for a ``Search``, distances and ids (each N×top_k)."""

    descriptors: np.ndarray
    distances: np.ndarray | None = None
    ids: np.ndarray | None = None


class Decoded(Protocol):
    """What a ``decode`` function returns: at least the images to encode (``Answering`` in the service)."""

    @property
    def images(self) -> list[Image.Image]: ...


@dataclass
class _Job:
    release: Release
    images: list[Image.Image]
    search: Search | None
    future: Future = field(default_factory=Future)
    result: Encoded | None = None


class MicroBatcher:
    def __init__(self, max_images: int = 32, wait_s: float = 0.005, decoders: int = 4) -> None:
        self.max_images, self.wait_s = max_images, wait_s
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._encoded: queue.Queue[list[_Job] | None] = queue.Queue()
        self._decode = ThreadPoolExecutor(max(1, decoders), thread_name_prefix="decode")
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._searcher = threading.Thread(target=self._search_run, name="micro-batcher-search", daemon=True)
        self._thread.start()
        self._searcher.start()
        self.batches = 0  # model passes so far (how much batching happened: tests, load test)
        self.images = 0
        self.encode_s = 0.0  # seconds spent in model passes (the load test's "model busy")
        self.searches = 0  # search calls so far (one per release, top_k and prior in a batch)

    def submit(self, release: Release, images: list[Image.Image], search: Search | None = None) -> Future:
        """A future of the images' ``Encoded`` with ``release``'s model (and, with ``search``, their matches)."""
        job = _Job(release, images, search)
        self._enqueue(job)
        return job.future

    def submit_decoded(self, release: Release, decode: Callable[[], Decoded], search: Search | None = None) -> Future:
        """``decode()`` in a decode thread, then its ``images`` as ``submit``; a future of (what ``decode``
        returned, ``Encoded``). An exception of ``decode`` (``DecodeBusy``...) is the future's."""
        outer: Future = Future()

        def run() -> None:
            if not outer.set_running_or_notify_cancel():  # given up meanwhile: nothing to decode
                return
            try:
                decoded = decode()
            except Exception as exc:  # noqa: BLE001 - the request's to answer
                outer.set_exception(exc)
                return
            inner = self.submit(release, decoded.images, search)
            inner.add_done_callback(lambda done: _chain(done, outer, decoded))

        self._decode.submit(run)
        return outer

    def close(self) -> None:
        self._decode.shutdown(wait=True, cancel_futures=False)
        self._jobs.put(None)
        self._thread.join(timeout=10)
        self._searcher.join(timeout=10)

    def _enqueue(self, job: _Job) -> None:
        if job.images:
            self._jobs.put(job)
            return
        dim = job.release.model.descriptor_dim
        k = 0 if job.search is None else job.search.top_k
        empty = Encoded(np.empty((0, dim), np.float32))
        if job.search is not None:
            empty = Encoded(empty.descriptors, np.empty((0, k), np.float32), np.empty((0, k), np.int64))
        job.future.set_result(empty)

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
        """The model thread: gather, encode, hand each group to the search thread."""
        try:
            closing = False
            while not closing:
                first = self._jobs.get()
                if first is None:
                    return
                jobs, closing = self._gather(first)
                jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # cancelled: dropped
                by_release: dict[int, list[_Job]] = {}
                for job in jobs:
                    by_release.setdefault(id(job.release), []).append(job)
                for group in by_release.values():
                    try:
                        self._encode(group)
                    except Exception as exc:  # noqa: BLE001 - handed to the waiting requests, the worker lives on
                        _fail(group, exc)
                        continue
                    self._encoded.put(group)
        finally:
            self._encoded.put(None)

    def _search_run(self) -> None:
        """The search thread: search each encoded group, then answer its jobs."""
        while (group := self._encoded.get()) is not None:
            try:
                self._search(group)
            except Exception as exc:  # noqa: BLE001 - as above
                _fail(group, exc)
                continue
            for job in group:
                job.future.set_result(job.result)

    def _encode(self, group: list[_Job]) -> None:
        images = [im for job in group for im in job.images]
        started = time.perf_counter()
        desc = group[0].release.encode_images(images, batch_size=max(1, self.max_images))
        self.encode_s += time.perf_counter() - started
        self.batches += 1
        self.images += len(images)
        start = 0
        for job in group:
            job.result = Encoded(desc[start : start + len(job.images)])
            start += len(job.images)

    def _search(self, group: list[_Job]) -> None:
        release = group[0].release
        together: dict[tuple, tuple[Search, list[_Job]]] = {}  # no prior: by top_k; a prior: its own search
        for job in group:
            if job.search is not None:
                key = (job.search.top_k,) if job.search.allowed is None else (job.search.top_k, id(job))
                together.setdefault(key, (job.search, []))[1].append(job)
        for wanted, jobs in together.values():
            results = [job.result for job in jobs if job.result is not None]
            desc = np.concatenate([r.descriptors for r in results])
            distances, ids = release.search(desc, wanted.top_k, wanted.allowed)
            self.searches += 1
            start = 0
            for result in results:
                end = start + len(result.descriptors)
                result.distances, result.ids = distances[start:end], ids[start:end]
                start = end


def _fail(group: list[_Job], exc: Exception) -> None:
    for job in group:
        job.future.set_exception(exc)


def _chain(inner: Future, outer: Future, decoded: Decoded) -> None:
    exc = inner.exception()
    if exc is not None:
        outer.set_exception(exc)
    else:
        outer.set_result((decoded, inner.result()))
