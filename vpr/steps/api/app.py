"""The localisation service: FastAPI routes over the live release (``vpr api``; the OpenAPI schema at
/openapi.json — no /docs or /redoc pages, which would load scripts from public CDNs).

- ``POST /v1/locate``: multipart field ``images`` (one or more files), query ``top_k``, optional GPS
  prior ``lat``, ``lon``, ``radius_m``. Each image is answered like ``vpr locate --json`` (an unreadable
  file, a decompression bomb or a non-image gets its own error entry; the others are answered), plus
  the release version that answered.
- ``GET /v1/health``, ``GET /v1/map`` (database positions for the page), ``GET /v1/images/{id}``
  (a database image, read from the shards).
- ``GET /``: the page (``page.html``): drop a photo, see the estimate and matches on a locally drawn map.

A locate request's event loop work is the multipart body and the JSON answer: its images are decoded in
the batcher's decode threads (``api.decode_threads``), encoded and searched with concurrent requests'
(``vpr.steps.api.batcher``), and answered with the matches each gets searched alone.

Limits: the request body (``api.max_request_mb``: 413, never read past; ``api.body_idle_s`` and
``api.body_timeout_s``: 408), images per request (``api.max_images``: 413), ``top_k``
(``api.max_top_k``: 422), per-image file size and pixels (``locate.*``: a per-image error), pixels
decoded at once over all requests (``api.decode_budget_mpx``: 503 + Retry-After), the ``Host`` header
(``api.allowed_hosts``: 400) and cross-origin POSTs (403): ``vpr.steps.api.guards``.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from vpr.foundations.config import ApiConfig, LocateConfig
from vpr.shared.release import ReleaseError
from vpr.steps.api.batcher import MicroBatcher, Search
from vpr.steps.api.guards import (
    WILDCARD_HOSTS,
    BodyGuard,
    DecodeBudget,
    DecodeBusy,
    HostGuard,
    allowed_hosts,
    return_large_buffers_to_the_os,
)
from vpr.steps.api.live import LiveRelease
from vpr.steps.locate import Answering, LocateInputError, decode_cost, prepare_bytes, search_k

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


def _prepare(data: bytes, *, img: dict, limits: LocateConfig, budget: DecodeBudget):
    if len(data) > limits.max_file_bytes:
        raise LocateInputError(f"file is over {limits.max_file_mb:g} MB (locate.max_file_mb); not read")
    height, width = img["height"], img["width"]
    with budget.hold(decode_cost(data, height, width, limits.max_pixels)):
        return prepare_bytes(data, height, width, img.get("jpeg_quality", 90), limits.max_pixels)


def create_app(live: LiveRelease, api: ApiConfig, limits: LocateConfig, *, watch: bool = True) -> FastAPI:
    """The service over ``live``; with ``watch`` the release pointer is polled every ``api.poll_s``."""
    batcher = MicroBatcher(api.batch_images, api.batch_wait_ms / 1000, api.decode_threads)
    return_large_buffers_to_the_os()
    budget = DecodeBudget(max(api.decode_budget_pixels, limits.max_pixels))  # one allowed image always fits

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if watch:
            live.start(api.poll_s)
        yield
        live.stop()
        batcher.close()

    app = FastAPI(title="vpr", summary="Where was this photo taken?", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyGuard, limit=api.max_request_bytes, idle_s=api.body_idle_s, timeout_s=api.body_timeout_s)
    app.add_middleware(HostGuard, hosts=allowed_hosts(api), any_ip=api.host in WILDCARD_HOSTS)  # outermost
    app.state.live, app.state.batcher, app.state.decode_budget = live, batcher, budget

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/v1/health")
    def health() -> dict:
        served = live.current()
        return {
            "status": "ok",
            "version": served.version,
            "head": served.release.manifest.get("head"),
            "database_size": int(served.release.index.ntotal),
            "device": str(served.release.device),
            "swaps": live.swaps,
            "max_images": api.max_images,  # clients split larger batches (``vpr locate --api``)
            "max_request_mb": api.max_request_mb,
        }

    @app.get("/v1/map")
    def positions() -> dict:
        return live.current().positions()

    @app.get("/v1/images/{image_id}", responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
    def image(image_id: int) -> Response:
        data = live.current().thumbnail(image_id)
        if data is None:
            raise HTTPException(404, f"image {image_id} is not in the served release")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/v1/locate")
    async def locate(
        request: Request,
        top_k: int = Query(5, ge=1, le=api.max_top_k),
        lat: float | None = Query(None, ge=-90, le=90, allow_inf_nan=False),
        lon: float | None = Query(None, ge=-180, le=180, allow_inf_nan=False),
        radius_m: float | None = Query(None, gt=0, allow_inf_nan=False),
    ) -> dict:
        served = live.current()  # this request's release, to its end (hot swap: vpr.steps.api.live)
        release = served.release
        if (lat is None) != (lon is None) or (radius_m is not None and lat is None):
            raise HTTPException(422, "a GPS prior needs lat and lon (and optionally radius_m)")
        allowed = None
        if lat is not None:
            try:
                allowed = release.ids_within(lat, lon, radius_m or 100.0)
            except ReleaseError as exc:
                raise HTTPException(422, str(exc)) from None
        try:
            form = await request.form(max_files=api.max_images, max_fields=16)
        except StarletteHTTPException as exc:  # starlette's multipart limits say 400; too many files is a size problem
            if "Too many files" in str(exc.detail):
                raise HTTPException(413, f"at most {api.max_images} images per request (api.max_images)") from None
            raise
        try:
            uploads = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
            if not uploads:
                raise HTTPException(422, "no images: send one or more files in the multipart field 'images'")
            if len(uploads) > api.max_images:
                raise HTTPException(413, f"at most {api.max_images} images per request (api.max_images)")
            limit = limits.max_file_bytes + 1  # one byte more tells "over the limit" without reading on
            files = [(u.filename or f"image{i}", await u.read(limit)) for i, u in enumerate(uploads)]
        finally:
            await form.close()  # the spooled upload files
        prepare = partial(_prepare, img=release.manifest["image"], limits=limits, budget=budget)
        decode = partial(Answering.prepare, files, prepare)  # in the batcher's decode threads, never on this loop
        try:
            batch, found = await asyncio.wrap_future(
                batcher.submit_decoded(release, decode, Search(search_k(release, top_k), allowed))
            )
        except DecodeBusy as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
        prior = None if lat is None else {"lat": lat, "lon": lon, "radius_m": radius_m or 100.0}
        empty = None
        if prior is not None and not np.size(allowed):
            empty = f"no database image within {prior['radius_m']:g} m of {lat:g}, {lon:g} (the GPS prior)"
        results = batch.fill(release, found.distances, found.ids, empty_reason=empty) if batch.ready else batch.results
        return {
            "version": served.version,
            "head": release.manifest.get("head"),
            "prior": prior,
            "candidates": None if allowed is None else int(np.size(allowed)),
            "results": results,
        }

    return app
