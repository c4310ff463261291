"""`fer serve`: the emotion classifier over HTTP, with a web page.

`POST /predict` takes one image as the raw body (any image type) or several as a multipart
upload (a batch: all their faces in one model call) and answers every face found: box, emotion,
probabilities by class name, and the model (source, registered version). `GET /health`,
`GET /model` (classes, input, model card when there is one), `GET /` (the page: upload or
webcam, boxes and labels drawn, a probability chart per face).

Limits (params `serve.*`, `predict.*`): request bytes (413), images per request (413), pixels
per image (413, from the header before decoding), request time (503). A non-image is 415, an
empty body 400; errors are JSON `{"error": ...}` and never carry a traceback (it is logged
here). Binds 127.0.0.1 unless told otherwise. It uses `fer predict`'s own functions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from fer_pipeline.artifacts.answers import (
    ErrorAnswer,
    Health,
    ModelDescription,
    ModelInfo,
    ReleaseCard,
    ServeAnswer,
    UploadAnswer,
)
from fer_pipeline.params import PredictParams, ServeParams
from fer_pipeline.predict import (
    Classifier,
    ImageError,
    classify_prepared,
    decode_bytes,
    prepare,
)

log = logging.getLogger(__name__)


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def status_of(error: str) -> int:
    """HTTP status for an image's problem (ImageError text)."""
    if error.startswith("empty"):
        return 400
    if "too large" in error:
        return 413
    return 415


def create_app(clf: Classifier, serve: ServeParams | None = None,
               limits: PredictParams | None = None, card: ReleaseCard | None = None):
    # FastAPI reads the handlers' annotations (strings here): Request must be a module name.
    serve = serve or ServeParams()
    limits = limits or PredictParams()
    model_lock = threading.Lock()     # one model call at a time (2 cores; TF sessions)
    model_info = ModelInfo(source=clf.source, version=clf.version, classes=clf.classes,
                           tta=clf.tta, temperature=clf.temperature,
                           min_confidence=clf.min_confidence)
    app = FastAPI(title="fer-pipeline", description=__doc__.splitlines()[0], docs_url="/docs")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(ErrorAnswer(error=exc.message).to_data(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("error while answering %s %s", request.method, request.url.path)
        return JSONResponse(ErrorAnswer(error="internal error (logged by the server)").to_data(),
                            status_code=500)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return Health(status="ok", model=model_info).to_data()

    @app.get("/model")
    def model() -> dict[str, Any]:
        return ModelDescription(
            **model_info.to_data(), input="an image; faces found with OpenCV's Haar cascade, "
            "cropped to 48x48 grayscale (a 48x48 image is taken as a face crop)", card=card
        ).to_data()

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("fer_pipeline.web").joinpath("index.html").read_text()

    @app.post("/predict")
    async def predict(request: Request):
        images = await _images(request, serve)
        try:
            results = await asyncio.wait_for(
                run_in_threadpool(_classify, clf, images, limits, model_lock), serve.timeout_s)
        except TimeoutError:
            raise RequestError(503, f"timed out after {serve.timeout_s:g} s (serve.timeout_s)") \
                from None
        if all(not r.ok for r in results):
            first = results[0].error or "no image could be used"
            return JSONResponse(ServeAnswer(error=first, model=model_info, results=results)
                                .to_data(), status_code=status_of(first))
        return ServeAnswer(model=model_info, results=results).to_data()

    return app


def _classify(clf: Classifier, images: list[tuple[str, bytes]], limits: PredictParams,
              lock: threading.Lock) -> list[UploadAnswer]:
    chunk = [prepare(name, lambda data=data: decode_bytes(data, limits), True, limits.roll_angles)
             for name, data in images]
    with lock:
        results = classify_prepared(clf, chunk)
    return [UploadAnswer.of(r) for r in results]


async def _images(request, serve: ServeParams) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request, within the limits."""
    limit = int(serve.max_request_mb * 1e6)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request too large: {int(declared) / 1e6:.1f} MB > "
                                f"serve.max_request_mb {serve.max_request_mb:g}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise RequestError(413, f"request too large: over serve.max_request_mb "
                                    f"{serve.max_request_mb:g}")
    request._body = bytes(body)      # Starlette reads a form from the cached body
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        # Starlette's own caps (1 MB per part by default) would refuse a phone photo: ours apply.
        form = await request.form(max_files=1000, max_fields=1000, max_part_size=limit)
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items()
                 if hasattr(v, "read")]
        if not files:
            raise RequestError(400, "multipart request without a file (field `file`)")
    else:
        files = [("body", bytes(body))]
    if len(files) > serve.max_images:
        raise RequestError(413, f"{len(files)} images > serve.max_images {serve.max_images}")
    if len(files) == 1 and not files[0][1]:
        raise RequestError(400, "empty body: send an image (raw bytes or multipart `file`)")
    return files


def run(clf: Classifier, serve: ServeParams, limits: PredictParams,
        card: ReleaseCard | None = None) -> None:
    import uvicorn

    app = create_app(clf, serve, limits, card)
    print(f"fer serve: {clf.source}" + (f" (v{clf.version})" if clf.version else "")
          + f" on http://{serve.host}:{serve.port}/ (page), POST /predict", flush=True)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="info")


__all__ = ["ImageError", "create_app", "run", "status_of"]
