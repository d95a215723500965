"""The FastAPI application: routes, errors, limits, auth, the work queue and metrics.

Every route that touches the model runs its work on a thread pool (:class:`WorkQueue`), never on the event loop;
at most ``max_queue`` jobs run or wait, more get 503 at once. Errors are JSON ``{"error": {"status", "field",
"message"}}`` with a 4xx status naming the field that was wrong; an unexpected failure is a 500 with a generic
message (logged on the server, never a traceback to the client).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsam_rt import MedSAM, __version__
from medsam_rt.core.masks import LabelOverflowError
from medsam_rt.errors import EmbeddingMismatchError, InvalidBoxError, InvalidImageError, MedSAMError
from medsam_rt.io.formats import InvalidSliceError, InvalidWindowError
from medsam_rt.io.results import OutputFormatError, SliceResult
from medsam_rt.tools.serve.codec import LABEL_FORMATS, coco_rle, label_file, labels_png_b64, png_bytes
from medsam_rt.tools.serve.config import ServeConfig
from medsam_rt.tools.serve.metrics import Metrics
from medsam_rt.tools.serve.store import ImageEntry, ImageStore

log = logging.getLogger("medsam_rt.tools.serve")

STATIC = Path(__file__).parent / "static"
#: where the page's onnxruntime-web files are looked for (``$MEDSAM_RT_SERVE_VENDOR`` overrides it, e.g. to test the
#: page's fallback to the server's decoder); they are served from ``/static/vendor/`` either way
VENDOR = Path(os.environ.get("MEDSAM_RT_SERVE_VENDOR", STATIC / "vendor"))
#: the vendored onnxruntime-web files the page needs (``make -C web`` copies them)
VENDOR_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs")
#: headers that make the page cross-origin isolated, so onnxruntime-web may use WASM threads
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}

#: which request field each library error is about
_ERROR_FIELDS: tuple[tuple[type[Exception], str], ...] = (
    (InvalidBoxError, "boxes"),
    (LabelOverflowError, "boxes"),
    (InvalidSliceError, "slice"),
    (InvalidWindowError, "window"),
    (InvalidImageError, "file"),
    (OutputFormatError, "format"),
)


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``; ``field`` names the request field at fault."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


def _error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"status": status, "field": field, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- request and response bodies -------------------------------------------------------------------------------


class ImageInfo(BaseModel):
    id: str = Field(description="the image's id in this server (random hex)")
    width: int
    height: int
    slices: int = Field(description="number of slices (1 for 2-D images)")
    slice: int = Field(description="the slice embedded at upload")
    kind: str = Field(description="'image', 'dicom' or 'nifti'")
    name: str = Field(description="the uploaded file's base name")
    window: list[float] | None = Field(description="value range mapped to 0..255, or null for 8-bit images")
    ms: dict[str, float] = Field(default_factory=dict, description="server time of the upload's steps")


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    boxes: list[Annotated[list[float], Field(min_length=4, max_length=4)]] = Field(
        min_length=1, description="boxes x0, y0, x1, y1 in the slice's pixels (0 <= x0 < x1 <= W, y likewise)"
    )
    slice: int | None = Field(default=None, description="slice index (default: the middle slice)")
    rle: bool = Field(default=False, description="also return each mask as COCO uncompressed RLE")


class SegmentResponse(BaseModel):
    slice: int
    width: int
    height: int
    scores: list[float] = Field(description="the decoder's IoU estimate per box")
    areas: list[int] = Field(description="mask pixels per box")
    labels_png: str = Field(
        description="base64 PNG label image: 0 background, k for box k (8-bit up to 255 boxes, 16-bit above); "
        "overlaps go to the box with the highest upscaled logit"
    )
    rle: list[dict[str, Any]] | None = Field(default=None, description="COCO RLE per box when asked")
    ms: dict[str, float] = Field(description="server time: queue, embed (0 when cached), decode, labels, total")


class LabelsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    boxes: dict[str, list[Annotated[list[float], Field(min_length=4, max_length=4)]]] = Field(
        min_length=1, description="slice index (as a string) -> boxes on that slice"
    )
    format: Literal["png", "nii", "nii.gz", "npz"] = Field(
        default="png", description="png (one slice), nii/nii.gz (label volume in the source's geometry), npz"
    )


# -- the work queue ---------------------------------------------------------------------------------------------


class WorkQueue:
    """Runs blocking model work on ``workers`` threads; at most ``limit`` jobs running or waiting."""

    def __init__(self, workers: int, limit: int, metrics: Metrics) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medsam-serve")
        self.limit = limit
        self.depth = 0
        self._metrics = metrics

    async def run(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """``fn()``'s result and the seconds it waited for a worker. Raises ApiError 503 when full."""
        if self.depth >= self.limit:
            self._metrics.count("rejected_busy")
            raise ApiError(
                503,
                None,
                f"server busy: {self.depth} jobs queued (limit {self.limit}); retry later",
                headers={"Retry-After": "1"},
            )
        self.depth += 1  # only the event loop thread touches depth
        queued = time.perf_counter()
        started: list[float] = []

        def job() -> Any:
            started.append(time.perf_counter())
            return fn()

        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, job)
        finally:
            self.depth -= 1
        return result, (started[0] - queued if started else 0.0)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- middleware -------------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request whose body exceeds ``limit`` bytes gets 413 (by Content-Length at once, or as
    soon as the streamed body passes it)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, "body", f"request body exceeds the server's limit of {self.limit} bytes")
        if declared is not None:
            try:
                if int(declared) > self.limit:
                    return await too_large(scope, receive, send)
            except ValueError:
                return await _error(400, "Content-Length", "Content-Length is not a number")(scope, receive, send)
        seen = 0
        started = exceeded = False

        async def limited_receive() -> dict:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if exceeded:  # the app caught _TooLarge (e.g. its form parser) and answers: answer 413 instead
                if not started:
                    started = True
                    await too_large(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


class RequestMetrics:
    """ASGI middleware: counts each request by method, route template and status, with its latency."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            self.metrics.request(scope["method"], path, status[0], time.perf_counter() - t0)


class _Isolated:
    """ASGI wrapper adding :data:`ISOLATION` headers (the WASM worker threads' scripts need them too)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.extra = [(k.lower().encode(), v.encode()) for k, v in ISOLATION.items()]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


# -- the application ------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _browser_decoder(model_dir: Path) -> dict[str, Any] | None:
    """The fp32 decoder graph the page runs in the browser: path, size and sha256 (checked against the manifest),
    or ``None`` when the directory has none."""
    raw = json.loads((model_dir / "manifest.json").read_text())
    entry = raw.get("graphs", {}).get("decoder", {}).get("fp32")
    if not entry:
        return None
    path = model_dir / entry["file"]
    if not path.is_file() or _sha256(path) != entry.get("sha256"):
        log.warning("%s does not match its manifest entry: the in-browser decoder is off", path.name)
        return None
    return {"path": path, "bytes": path.stat().st_size, "sha256": entry["sha256"]}


def _vendor_ready() -> bool:
    return all((VENDOR / name).is_file() for name in VENDOR_FILES)


def create_app(config: ServeConfig, model: MedSAM | None = None) -> FastAPI:
    """The application for ``config``; ``model``: an already loaded model to serve (else loaded here).

    Raises:
        ModelDirError, ProviderUnavailableError, PrecisionCheckError: from :meth:`MedSAM.load`.
    """
    model_dir = Path(config.model_dir)
    if model is None:
        model = MedSAM.load(
            model_dir,
            device=config.device,
            precision=config.precision,
            threads=config.threads,
            cache=config.cache_bytes if config.cache_bytes > 0 else False,
        )
    metrics = Metrics()
    store = ImageStore(config.max_images, config.idle_timeout_s)
    queue = WorkQueue(config.workers, config.max_queue, metrics)
    decoder = _browser_decoder(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    recipe = model.preprocessing.to_dict()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweep() -> None:
            while True:
                await asyncio.sleep(min(30.0, max(0.2, config.idle_timeout_s / 4)))
                store.expire()

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            queue.shutdown()

    app = FastAPI(
        title="medsam-rt serve",
        version=__version__,
        description="Interactive MedSAM segmentation: upload an image once (it is embedded once per slice), then "
        'segment boxes on it as often as needed. Errors are JSON `{"error": {"status", "field", '
        '"message"}}`. With `--token`, every /v1 route and /metrics needs `Authorization: Bearer <token>`.',
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.model, app.state.store, app.state.metrics, app.state.queue = model, store, metrics, queue

    # -- errors ------------------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.field, exc.message, exc.headers)

    @app.exception_handler(MedSAMError)
    async def _library_error(request: Request, exc: MedSAMError) -> JSONResponse:
        field = next((f for cls, f in _ERROR_FIELDS if isinstance(exc, cls)), None)
        status = 409 if isinstance(exc, EmbeddingMismatchError) else 400
        return _error(status, field, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form", "header")]
            if err.get("type") == "json_invalid":
                loc = ["body"]  # its loc is a character position
            problems.append({"field": ".".join(loc) or "body", "message": str(err.get("msg", "invalid"))})
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        response = _error(422, first["field"].split(".")[0], f"{first['field']}: {first['message']}")
        body = json.loads(response.body)
        body["error"]["problems"] = problems
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        field = "path" if exc.status_code in (404, 405) else None
        return _error(exc.status_code, field, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, None, f"internal error ({type(exc).__name__}); see the server log")

    # -- auth --------------------------------------------------------------------------------------------------

    def require_token(request: Request) -> None:
        if config.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.token.encode()):
            metrics.count("rejected_auth")
            raise ApiError(
                401,
                "Authorization",
                "missing or wrong bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    auth = [Depends(require_token)]

    def entry_of(image_id: str) -> ImageEntry:
        entry = store.get(image_id)
        if entry is None:
            raise ApiError(404, "id", f"no image {image_id!r} on this server (never uploaded, deleted or expired)")
        return entry

    def embed_slice(entry: ImageEntry, k: int) -> tuple[Any, float]:
        """The slice's embedding through the model's cache, and the seconds it took (about 0 when cached)."""
        t0 = time.perf_counter()
        emb = model.embed(store.display(entry, k))
        seconds = time.perf_counter() - t0
        metrics.stage("embed", seconds)
        return emb, seconds

    # -- routes ------------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={**ISOLATION, "Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/healthz", tags=["server"], summary="liveness: 200 when the model is loaded")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "images": len(store), "queue": queue.depth}

    @app.get("/metrics", tags=["server"], dependencies=auth, summary="Prometheus metrics (text format)")
    async def metrics_text() -> Response:
        stats = model.cache.stats() if model.cache is not None else None
        extra = [
            ("images", "gauge", "images held", float(len(store))),
            ("queue_depth", "gauge", "model jobs running or waiting", float(queue.depth)),
            ("images_expired_total", "counter", "images dropped for idleness", float(store.expired)),
            ("images_evicted_total", "counter", "images dropped for room (max_images)", float(store.evicted)),
        ]
        if stats is not None:
            extra += [
                ("embedding_cache_hits_total", "counter", "embedding cache hits", float(stats.hits)),
                (
                    "embedding_cache_misses_total",
                    "counter",
                    "embedding cache misses (encoder runs)",
                    float(stats.misses),
                ),
                ("embedding_cache_evictions_total", "counter", "embeddings evicted", float(stats.evictions)),
                ("embedding_cache_entries", "gauge", "embeddings held", float(stats.entries)),
                ("embedding_cache_bytes", "gauge", "bytes of embeddings held", float(stats.bytes)),
            ]
        return Response(metrics.render(extra), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/model", tags=["model"], dependencies=auth, summary="the served model and the server's limits")
    async def model_info() -> dict[str, Any]:
        return {
            "model_id": model.model_id,
            "model": manifest.get("model", {}),
            "precision": model.precision,
            "device": model.device,
            "precisions": manifest.get("precisions", []),
            "preprocessing": recipe,
            "browser_decoder": None
            if decoder is None
            else {
                "url": "/v1/model/decoder.onnx",
                "precision": "fp32",
                "bytes": decoder["bytes"],
                "sha256": decoder["sha256"],
                "vendor_ready": _vendor_ready(),
            },
            "limits": {
                "max_upload_bytes": config.max_upload_bytes,
                "max_boxes": config.max_boxes,
                "max_images": config.max_images,
                "idle_timeout_s": config.idle_timeout_s,
                "max_queue": config.max_queue,
                "workers": config.workers,
            },
            "auth": config.token is not None,
            "version": __version__,
        }

    @app.get(
        "/v1/model/decoder.onnx",
        tags=["model"],
        dependencies=auth,
        summary="the fp32 decoder graph, for a client that runs the decoder itself",
    )
    async def decoder_graph() -> FileResponse:
        if decoder is None:
            raise ApiError(404, "path", "this model directory has no fp32 decoder matching its manifest")
        return FileResponse(
            decoder["path"], media_type="application/octet-stream", headers={"Cache-Control": "max-age=3600"}
        )

    def info_of(entry: ImageEntry, k: int, **extra: Any) -> ImageInfo:
        """An image's description (upload's answer and ``GET /v1/images/{id}``), slice ``k`` current."""
        h, w = entry.size
        window = None if entry.value_range is None else [float(v) for v in entry.value_range]
        return ImageInfo(
            id=entry.id, width=w, height=h, slices=entry.slices, slice=k, kind=entry.scan.kind, name=entry.name,
            window=window, **extra,
        )  # fmt: skip

    @app.post(
        "/v1/images",
        tags=["images"],
        dependencies=auth,
        response_model=ImageInfo,
        summary="upload an image or volume (PNG/JPEG/TIFF/DICOM/NIfTI); it is embedded once per slice",
    )
    async def upload(
        file: Annotated[UploadFile, File(description="the image file (multipart field 'file')")],
        window: Annotated[str, Form(description="auto, file, percentile, minmax, a CT preset or LEVEL,WIDTH")] = "auto",
        slice: Annotated[int | None, Form(description="slice to embed now (default: the middle one)")] = None,
    ) -> ImageInfo:
        data = await file.read()

        def work() -> tuple[ImageEntry, int, dict[str, float]]:
            t0 = time.perf_counter()
            entry = store.add(data, file.filename, window)
            t1 = time.perf_counter()
            try:
                k = entry.check_slice(slice)
                _, embed_s = embed_slice(entry, k)
            except BaseException:
                store.delete(entry.id)
                raise
            return entry, k, {"read": (t1 - t0) * 1e3, "embed": embed_s * 1e3}

        (entry, k, ms), waited = await queue.run(work)
        return info_of(entry, k, ms={"queue": waited * 1e3, **ms})

    @app.get(
        "/v1/images/{image_id}",
        tags=["images"],
        dependencies=auth,
        response_model=ImageInfo,
        summary="an uploaded image's size, slices and window",
    )
    async def image_info(image_id: str) -> ImageInfo:
        e = entry_of(image_id)
        return info_of(e, e.check_slice(None))

    @app.delete("/v1/images/{image_id}", tags=["images"], dependencies=auth, summary="forget an image")
    async def delete_image(image_id: str) -> dict[str, Any]:
        if not store.delete(image_id):
            raise ApiError(404, "id", f"no image {image_id!r} on this server (never uploaded, deleted or expired)")
        return {"id": image_id, "deleted": True}

    @app.get(
        "/v1/images/{image_id}/slices/{k}.png",
        tags=["images"],
        dependencies=auth,
        summary="slice k as the 8-bit PNG the model embeds (what the page shows)",
    )
    async def slice_png(image_id: str, k: int) -> Response:
        entry = entry_of(image_id)
        k = entry.check_slice(k)
        data, _ = await queue.run(lambda: png_bytes(store.display(entry, k)))
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    @app.get(
        "/v1/images/{image_id}/embedding",
        tags=["images"],
        dependencies=auth,
        summary="the slice's image embedding, raw little-endian, for a client that runs the decoder itself",
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "C-order array; its shape, dtype and the recipe's sizes are in the "
                "X-MedSAM-Embedding header (JSON)",
            }
        },
    )
    async def embedding(
        image_id: str,
        slice: Annotated[int | None, Query(description="slice index (default: the middle one)")] = None,
        dtype: Annotated[Literal["float32", "float16"], Query(description="element type sent")] = "float32",
    ) -> Response:
        entry = entry_of(image_id)
        k = entry.check_slice(slice)

        def work() -> tuple[Any, bytes]:
            emb, _ = embed_slice(entry, k)
            return emb, np.asarray(emb.embeddings).astype("<f4" if dtype == "float32" else "<f2").tobytes()

        (emb, data), _ = await queue.run(work)
        meta = {
            "shape": list(np.asarray(emb.embeddings).shape),
            "dtype": dtype,
            "slice": k,
            "original_size": list(emb.original_size),
            "resized_size": list(emb.resized_size),
            "pad_size": list(model.preprocessing.pad_size),
            "low_res_size": [256, 256],
            "postprocess": recipe["postprocess"],
            "mask_threshold": recipe["mask_threshold"],
            "box_scale": recipe["box_scale"],
            "box_round": recipe["box_round"],
            "size": recipe["size"],
            "model_id": model.model_id,
        }
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"X-MedSAM-Embedding": json.dumps(meta), "Cache-Control": "private, max-age=600"},
        )

    @app.post(
        "/v1/images/{image_id}/segment",
        tags=["images"],
        dependencies=auth,
        response_model=SegmentResponse,
        response_model_exclude_none=True,
        summary="masks for boxes on one slice",
    )
    async def segment(image_id: str, body: SegmentRequest) -> SegmentResponse:
        entry = entry_of(image_id)
        k = entry.check_slice(body.slice)
        if len(body.boxes) > config.max_boxes:
            raise ApiError(400, "boxes", f"{len(body.boxes)} boxes; this server takes at most {config.max_boxes}")
        boxes = np.array(body.boxes, np.float64)

        def work() -> tuple[Any, ...]:
            t0 = time.perf_counter()
            emb, embed_s = embed_slice(entry, k)
            t1 = time.perf_counter()
            res = model.segment(emb, boxes)
            t2 = time.perf_counter()
            labels = labels_png_b64(res.label_image())
            t3 = time.perf_counter()
            rle = [coco_rle(c, res.crops.image_size) for c in res.crops] if body.rle else None
            t4 = time.perf_counter()
            metrics.stage("segment", t2 - t1)
            metrics.stage("labels", t3 - t2)
            ms = {"embed": embed_s * 1e3, "decode": (t2 - t1) * 1e3, "labels": (t3 - t2) * 1e3}
            if rle is not None:
                ms["rle"] = (t4 - t3) * 1e3
            ms["total"] = (t4 - t0) * 1e3
            return res.scores, res.crops.areas(), labels, rle, ms

        (scores, areas, labels, rle, ms), waited = await queue.run(work)
        h, w = entry.size
        return SegmentResponse(
            slice=k,
            width=w,
            height=h,
            scores=[float(s) for s in scores],
            areas=[int(a) for a in areas],
            labels_png=labels,
            rle=rle,
            ms={"queue": waited * 1e3, **ms},
        )

    @app.post(
        "/v1/images/{image_id}/labels",
        tags=["images"],
        dependencies=auth,
        summary="a label file of boxes on one or more slices (PNG, NIfTI label volume, npz crops)",
        responses={200: {"content": {"application/octet-stream": {}, "image/png": {}}}},
    )
    async def labels(image_id: str, body: LabelsRequest) -> Response:
        entry = entry_of(image_id)
        per_slice: dict[int, np.ndarray] = {}
        for key, boxes in body.boxes.items():
            try:
                k = int(key)
            except ValueError:
                raise ApiError(422, "boxes", f"boxes keys are slice indices; got {key!r}") from None
            per_slice[entry.check_slice(k)] = np.array(boxes, np.float64).reshape(-1, 4)
        total = sum(len(b) for b in per_slice.values())
        if total > config.max_boxes:
            raise ApiError(400, "boxes", f"{total} boxes; this server takes at most {config.max_boxes}")

        def work() -> bytes:
            results = []
            for k in sorted(per_slice):
                emb, _ = embed_slice(entry, k)
                if len(per_slice[k]):
                    res = model.segment(emb, per_slice[k])
                    results.append(SliceResult(k, res.boxes, res.crops, res.scores))
            if not results:
                raise ApiError(400, "boxes", "no boxes on any slice")
            return label_file(entry, results, body.format)

        data, _ = await queue.run(work)
        stem = entry.name.split(".")[0] or "labels"
        media = "image/png" if body.format == "png" else "application/octet-stream"
        filename = f"{stem}-labels{LABEL_FORMATS[body.format]}"
        return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    app.mount("/static", _Isolated(StaticFiles(directory=STATIC, check_dir=False)), name="static")
    # outermost first: metrics see every request, including those the body limit refuses
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def run(config: ServeConfig) -> None:
    """Load the model, then serve until interrupted."""
    import uvicorn

    app = create_app(config)
    log.warning(
        "medsam-rt serve: %s on http://%s:%d/ (%s, %s)",
        config.model_dir,
        config.host,
        config.port,
        app.state.model.device,
        app.state.model.precision,
    )
    uvicorn.run(
        app, host=config.host, port=config.port, log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
