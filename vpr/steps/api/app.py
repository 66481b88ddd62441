"""The localisation service: FastAPI routes over the live release (``vpr api``; OpenAPI docs at /docs).

- ``POST /v1/locate``: multipart field ``images`` (one or more files), query ``top_k``, optional GPS
  prior ``lat``, ``lon``, ``radius_m``. Each image is answered like ``vpr locate --json`` (an unreadable
  file, a decompression bomb or a non-image gets its own error entry; the others are answered), plus
  the release version that answered.
- ``GET /v1/health``, ``GET /v1/map`` (database positions for the page), ``GET /v1/images/{id}``
  (a database image, read from the shards).
- ``GET /``: the page (``page.html``): drop a photo, see the estimate and matches on a locally drawn map.

Limits: the request body (``api.max_request_mb``: 413, never read past), images per request
(``api.max_images``: 413), ``top_k`` (``api.max_top_k``: 422), per-image file size and pixels
(``locate.*``: a per-image error).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpr.foundations.config import ApiConfig, LocateConfig
from vpr.shared.release import ReleaseError
from vpr.steps.api.batcher import MicroBatcher
from vpr.steps.api.live import LiveRelease
from vpr.steps.locate import Answering, LocateInputError, prepare_bytes

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413, read no further."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0
        too_large = False

        async def counted() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)
        except Exception:
            if too_large:  # the parser wrapped our signal in its own error
                return await self._refuse(send)
            raise

    async def _refuse(self, send: Send) -> None:
        mb = self.limit / 2**20
        await JSONResponse({"detail": f"request body over {mb:g} MB (api.max_request_mb)"}, status_code=413)(
            {"type": "http"}, _no_receive, send
        )


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _prepare(data: bytes, *, img: dict, limits: LocateConfig):
    if len(data) > limits.max_file_bytes:
        raise LocateInputError(f"file is over {limits.max_file_mb:g} MB (locate.max_file_mb); not read")
    return prepare_bytes(data, img["height"], img["width"], img.get("jpeg_quality", 90), limits.max_pixels)


def create_app(live: LiveRelease, api: ApiConfig, limits: LocateConfig, *, watch: bool = True) -> FastAPI:
    """The service over ``live``; with ``watch`` the release pointer is polled every ``api.poll_s``."""
    batcher = MicroBatcher(api.batch_images, api.batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if watch:
            live.start(api.poll_s)
        yield
        live.stop()
        batcher.close()

    app = FastAPI(title="vpr", summary="Where was this photo taken?", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=api.max_request_bytes)
    app.state.live, app.state.batcher = live, batcher

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
        lat: float | None = Query(None, ge=-90, le=90),
        lon: float | None = Query(None, ge=-180, le=180),
        radius_m: float | None = Query(None, gt=0),
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
        img = release.manifest["image"]
        batch = await asyncio.to_thread(Answering.prepare, files, partial(_prepare, img=img, limits=limits))
        desc = await asyncio.wrap_future(batcher.submit(release, batch.images)) if batch.ready else None
        results = await asyncio.to_thread(batch.answer, release, desc, top_k, allowed=allowed)
        prior = None if lat is None else {"lat": lat, "lon": lon, "radius_m": radius_m or 100.0}
        return {
            "version": served.version,
            "head": release.manifest.get("head"),
            "prior": prior,
            "candidates": None if allowed is None else int(np.size(allowed)),
            "results": results,
        }

    return app
