"""The HTTP service: a FastAPI app over one classifier (a .pt checkpoint, or an exported .onnx or .torchscript).

The model is loaded once, when the app is created, and only read afterwards, so one request cannot change what
another sees. A body over the limit gets 413 before it is read whole, and what is not a decodable image 415.
Decoding and predicting run on a fixed pool of worker threads behind a bounded queue (InferencePool), which bounds
the server's memory and keeps the forward passes from competing for the cores; a request that finds the queue
full gets 503 with Retry-After at once instead of waiting without end. The review page's app shares `page_app`.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile

from .. import __version__
from ..config import available_cores
from ..data.images import decode_image, photo_size
from ..decision import POSITIVE, check_threshold, decide
from ..errors import ImageError, StopsignError
from ..inference.base import familiarity_marks
from ..inference.load import load_classifier, resolve_model_path

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
MAX_BATCH_FILES = 32
MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries and part headers around the image bytes
DEFAULT_WORKERS = 2  # images decoded and classified at once: one decodes while the other runs the network
DEFAULT_QUEUE = 8  # requests waiting for a worker before the next one gets 503
RETRY_AFTER_S = 1
METRIC_KEYS = {"metrics.json": ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "baseline", "verdict",
                                 "macro_f1", "roc_auc", "per_class", "confusion"),
               "summary.json": ("best_val_acc", "best_epoch", "started", "completed")}


class BodyLimit:
    """ASGI middleware: a request body over its route's limit (`limits`, else `default`) gets 413, worded by
    `describe(size)`, as soon as it is known to be too big: from its declared length, or as a chunked body arrives."""

    def __init__(self, app, default: int, describe, limits: dict[str, int] | None = None):
        self.app, self.default, self.describe, self.limits = app, default, describe, limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await JSONResponse({"detail": self.describe(int(declared))}, status_code=413)(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, self.describe(received))
            return message

        return await self.app(scope, counted_receive, send)


def page_app(title: str, description: str, page: str, **body_limit) -> FastAPI:
    """A FastAPI app that serves static/`page` at / and holds request bodies to `body_limit` (BodyLimit's
    arguments): what the prediction service and the review page share."""
    app = FastAPI(title=title, version=__version__, description=description)
    app.add_middleware(BodyLimit, **body_limit)
    html = resources.files("stopsign.deploy").joinpath("static", page).read_text(encoding="utf-8")
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(lambda: HTMLResponse(html))
    return app


class InferencePool:
    """A fixed number of worker threads for the CPU work of requests (decode and predict), and a bounded queue.

    `submit` answers 503 when `workers` jobs run and `queue` more wait; `refuse_if_full` says so before an upload
    is read. A slot is given back when its job ends, not when its request does, so a client that hangs up cannot
    let more work in than the bound. Each worker gives the network its share of the cores (`threads`)."""

    def __init__(self, workers: int = DEFAULT_WORKERS, queue: int = DEFAULT_QUEUE):
        if workers < 1 or queue < 0:
            raise StopsignError(f"the inference pool needs 1 worker or more and a queue of 0 or more, got "
                                f"{workers} and {queue}")
        self.workers, self.queue = workers, queue
        self.threads = max(1, available_cores() // workers)
        self.taken, self.lock = 0, threading.Lock()
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="stopsign-inference",
                                           initializer=limit_torch_threads, initargs=(self.threads,))

    def refuse_if_full(self) -> None:
        if self.taken >= self.workers + self.queue:
            raise HTTPException(503, f"the server is busy: {self.workers} images are being classified and "
                                     f"{self.queue} more wait; retry in {RETRY_AFTER_S} s",
                                headers={"Retry-After": str(RETRY_AFTER_S)})

    async def submit(self, function, *args):
        with self.lock:
            self.refuse_if_full()
            self.taken += 1
        try:
            future = self.executor.submit(function, *args)
        except BaseException:
            self.give_back()
            raise
        future.add_done_callback(self.give_back)
        return await asyncio.wrap_future(future)

    def give_back(self, *_) -> None:
        with self.lock:
            self.taken -= 1


def limit_torch_threads(threads: int) -> None:
    """PyTorch's intra-op threads on this worker thread, where a .pt or .torchscript model loaded torch: by
    default each calling thread runs a team as large as the machine, so two workers would run twice as many
    threads as cores. An .onnx server never imports torch, and onnxruntime's session keeps one pool."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def check_port(host: str, port: int) -> None:
    """Bind `host:port` as uvicorn will (SO_REUSEADDR) and let it go: a port in use is one line with the fix,
    before the model loads and before anything says it is serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            fix = {errno.EADDRINUSE: f"port {port} is in use by another program. Fix: stop it, or serve on another "
                                     "port with --port N (e.g. --port 8001)",
                   errno.EACCES: f"port {port} needs administrator rights. Fix: a port from 1024 up, e.g. --port 8000",
                   errno.EADDRNOTAVAIL: f"{host} is not an address of this machine. Fix: --host 127.0.0.1 (this "
                                        "machine only) or --host 0.0.0.0 (every interface)"}
            reason = fix.get(error.errno, f"{error.strerror or error}. Fix: check --host and --port")
            raise StopsignError(f"cannot serve on {host}:{port}: {reason}") from None


def too_large(size: int, limit: int) -> str:
    return (f"upload too large: {size} bytes; the limit is {limit} bytes per image "
            "(start the server with a larger --max-upload-mb)")


class UploadClassifier:
    """Uploaded bytes to answers, as the pool's workers run it (CPU work): each upload decoded within the limits,
    classified, and its probabilities turned into a label at the threshold."""

    def __init__(self, classifier, threshold: float | None, max_upload_bytes: int, decoded: int):
        self.classifier, self.names, self.threshold = classifier, classifier.class_names, threshold
        self.max_upload_bytes, self.decoded = max_upload_bytes, decoded

    def decode(self, data: bytes, name: str):
        """The upload decoded (reduced to what the model's input needs) and the photo's upright size."""
        if len(data) > self.max_upload_bytes:
            raise HTTPException(413, f"{name}: {too_large(len(data), self.max_upload_bytes)}")
        try:
            return decode_image(data, draft=(self.decoded, self.decoded)), photo_size(io.BytesIO(data))
        except ImageError as error:
            raise HTTPException(415, f"{name}: {error}") from None

    def answers(self, decoded: list, explain: bool = False) -> list[dict]:
        """Each decoded image's label, probabilities and threshold, and its similarity to the nearest training
        photo and whether it is unlike them (None each where the model cannot tell: an exported file); with
        `explain`, where the model looked: the box in the photo's pixels and the winning region's score."""
        images = [image for image, _ in decoded]
        similarity, unfamiliar = familiarity_marks(self.classifier.image_match(images), len(images))
        if explain:
            probabilities, looked = self.classifier.image_explanations(images, [size for _, size in decoded])
        else:
            probabilities, looked = self.classifier.image_probabilities(images), [None] * len(images)
        return [{"label": self.names[int(decide(row[None], self.threshold)[0])],
                 "probabilities": {n: float(p) for n, p in zip(self.names, row)}, "threshold": self.threshold,
                 "similarity": nearest, "unfamiliar": unlike} | (explained.to_dict() if explained else {})
                for row, nearest, unlike, explained in zip(probabilities, similarity, unfamiliar, looked)]

    def one(self, name: str, data: bytes, explain: bool = False) -> dict:
        return self.answers([self.decode(data, name)], explain)[0]

    def many(self, uploads: list[tuple[str, bytes]], explain: bool = False) -> list[dict]:
        rows, decoded = [], []
        for name, data in uploads:
            try:
                decoded.append(self.decode(data, name))
                rows.append({"filename": name})
            except HTTPException as error:  # one bad file in a batch costs its own row only
                rows.append({"filename": name, "label": None, "error": error.detail, "status": error.status_code})
        good = [row for row in rows if "error" not in row]
        for row, answer in zip(good, self.answers(decoded, explain) if decoded else []):
            row |= answer
        return rows


def upload_body(description: str, field: str, many: bool) -> dict:
    """The OpenAPI request body of a route that reads its upload by hand, so /docs offers a file picker."""
    binary = {"type": "string", "format": "binary"}
    part = {"type": "array", "items": binary} if many else binary
    content = {"multipart/form-data": {"schema": {"type": "object", "properties": {field: part},
                                                  "required": [field]}}}
    if not many:
        content["application/octet-stream"] = {"schema": binary}
    return {"requestBody": {"description": description, "required": True, "content": content}}


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def form_uploads(request: Request, field: str, most: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files in multipart field `field`, at most `most`."""
    form = await request.form(max_files=most)
    return [(upload.filename or ("file" if most == 1 else f"file {i}"), await upload.read())
            for i, upload in enumerate(form.getlist(field)) if isinstance(upload, UploadFile)]


def create_app(model_path: str | Path, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               threshold: float | None = None, device: str | None = "auto", workers: int = DEFAULT_WORKERS,
               queue: int = DEFAULT_QUEUE) -> FastAPI:
    """The app serving the classifier at `model_path` (.pt, .onnx, .torchscript or a run folder), loaded once,
    here. `threshold` (two classes): answer the second class when its probability is >= it, as `predict` does
    (None: the model's own, argmax for a model without one).
    `workers` images are decoded and classified at once, `queue` more requests wait, and the next gets 503."""
    model_path = resolve_model_path(model_path)
    classifier = load_classifier(model_path, device=device)
    names = classifier.class_names
    threshold_from = "--threshold" if threshold is not None else "the model's, chosen out of fold in training"
    threshold = classifier.threshold if threshold is None else threshold
    if threshold is not None:
        check_threshold(threshold, len(names))  # refuse a bad threshold now
    pool = InferencePool(workers, queue)
    info = model_info(classifier, model_path) | {
        "max_upload_bytes": max_upload_bytes, "max_batch_files": MAX_BATCH_FILES, "threshold": threshold,
        "threshold_from": threshold_from if threshold is not None else None,
        "positive": names[POSITIVE] if threshold is not None else None, "workers": workers, "queue": queue,
        "explains": classifier.explains}
    # One prediction now loads a checkpoint's backbone (it loads lazily) and warms the kernels, so the
    # first request is as fast as the rest; on a worker, so that it runs with the threads the workers use.
    size = classifier.preprocessing["size"]
    pool.executor.submit(classifier.image_probabilities, [Image.new("RGB", (size, size))]).result()
    classify = UploadClassifier(classifier, threshold, max_upload_bytes, classifier.decode_side)

    app = page_app("stopsign", f"Image classification with {model_path.name} ({', '.join(names)}).", "index.html",
                   default=MULTIPART_SLACK, describe=lambda size: too_large(size, max_upload_bytes),
                   limits={"/predict": max_upload_bytes + MULTIPART_SLACK,
                           "/predict/batch": MAX_BATCH_FILES * (max_upload_bytes + MULTIPART_SLACK)})
    app.state.classifier = classifier

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_path.name}

    @app.get("/model")
    def model() -> dict:
        return info

    def explaining(explain: bool) -> bool:
        if explain and not classifier.explains:
            raise HTTPException(422, f"{model_path.name} cannot explain: it gives no region scores (its pooling "
                                     "is not regions, or it was exported before they were); serve the run's best.pt")
        return explain

    @app.post("/predict", openapi_extra=upload_body("one image file", "file", many=False))
    async def predict(request: Request, explain: bool = False) -> dict:
        """explain=true: the answer also says where the model looked (box, region_score)."""
        started = time.perf_counter()
        pool.refuse_if_full()  # before the upload is read and parsed
        explaining(explain)
        uploads = await form_uploads(request, "file", 1) if is_form(request) else [("body", await request.body())]
        if not uploads:
            raise HTTPException(422, "send the image in the multipart field 'file', or as the raw body")
        result = await pool.submit(classify.one, *uploads[0], explain)
        return result | {"latency_ms": round(1000 * (time.perf_counter() - started), 2)}

    @app.post("/predict/batch", openapi_extra=upload_body("image files", "files", many=True))
    async def predict_batch(request: Request, explain: bool = False) -> dict:
        started = time.perf_counter()
        pool.refuse_if_full()
        explaining(explain)
        if not is_form(request):
            raise HTTPException(422, "send the images as multipart/form-data in the field 'files'")
        uploads = await form_uploads(request, "files", MAX_BATCH_FILES)
        if not uploads:
            raise HTTPException(422, "send one or more images in the multipart field 'files'")
        results = await pool.submit(classify.many, uploads, explain)
        return {"results": results, "latency_ms": round(1000 * (time.perf_counter() - started), 2)}

    log.debug("serving %s (%s): %s", model_path, info["format"], ", ".join(names))
    return app


def model_info(classifier, model_path: Path) -> dict:
    """What /model shows: the classifier, and the headline metrics of its run when the run folder has them."""
    info = {"model": model_path.name, "format": {".onnx": "onnx", ".torchscript": "torchscript"}.get(model_path.suffix.lower(), "checkpoint"),
            "backbone": classifier.backbone_name, "class_names": classifier.class_names,
            "preprocessing": classifier.preprocessing, "unfamiliar_below": classifier.unfamiliar_below,
            "metrics": {}}
    for file_name, keys in METRIC_KEYS.items():
        try:
            saved = json.loads((model_path.parent / file_name).read_text())
        except (OSError, ValueError):
            continue  # a model file outside a run folder has no metrics; that is fine
        info["metrics"] |= {key: saved[key] for key in keys if key in saved}
    return info


def run_app(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve an app from create_app() or create_review_app() with uvicorn until interrupted; a port that cannot
    be bound is a StopsignError naming it and the fix."""
    import uvicorn

    check_port(host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
