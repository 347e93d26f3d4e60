"""The local HTTP service (DESIGN §7): `python -m backend serve`, the /v1 API, and its guard.

    GET    /v1/health              version, device, GPU, loaded model, free memory, queue (no token)
    GET    /v1/openapi.json        this API's OpenAPI schema (no token)
    POST   /v1/jobs                multipart: file `bundle` (zip of the bundle folder) + optional `preset`,
                                   `engine`, `texture_size`, `target_faces` -> 202 {"id", "state": "queued"}
    GET    /v1/jobs/{id}           {"id", "state", "stage", "progress", "message", "timings", ...}
    GET    /v1/jobs/{id}/result    the GLB (model/gltf-binary)
    GET    /v1/jobs/{id}/preview   a small PNG render of the result
    DELETE /v1/jobs/{id}           cancel (a finished job: delete its files)

Every route but health and the schema needs `Authorization: Bearer <token>`, the token being the
contents of the token file (made with owner-only permissions when it does not exist). The guard
checks the token, the request's content type and its declared size before a byte of the body is read,
and counts the body as it arrives. Every refusal is a 4xx with `{"detail": "<one sentence>"}`.
The upload is unpacked and validated (`uploads.py`) in a scratch folder that is removed whatever
happens, so a refused request leaves nothing on disk; only then is a job queued (`jobs.py`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .device import device_report, pick_device
from .errors import InputError
from .export import check_export_arguments
from .jobs import JobRequest, JobStore, QueueFull, Reconstructor, State
from .presets import PRESETS, get_preset
from .reconstruct import ENGINES
from .uploads import MIB, UploadLimits, unpack_bundle, validate_bundle

log = logging.getLogger(__name__)

API = "/v1"
PUBLIC_PATHS = (f"{API}/health", f"{API}/openapi.json")
# What a client may call the zip part: browsers and HTTP libraries disagree, and many send no type.
ZIP_CONTENT_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip", "application/octet-stream")
T = TypeVar("T")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


@dataclass
class ServiceConfig:
    """Everything `serve` is told on its command line."""

    host: str = "127.0.0.1"
    port: int = 0
    work_dir: Path | None = None  # default: default_work_dir()
    token_file: Path | None = None  # default: <work_dir>/token
    log_file: Path | None = None  # default: <work_dir>/service.log
    checkpoint: Path | None = None
    device: str = "auto"
    preset: str | None = None  # for requests that name none; default: standard on a GPU, else cpu
    max_queue: int = 8
    keep_fetched_s: float = 300.0
    max_age_s: float = 24 * 3600.0
    preview_size: int = 128
    limits: UploadLimits = field(default_factory=UploadLimits)


def default_work_dir() -> Path:
    """A per-user cache folder that survives restarts (so unfinished jobs can be reported after one)."""
    base = os.environ.get("LOCALAPPDATA") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lsrm-blender" / "service"


# ---------------------------------------------------------------------------------------------
# Schema of the answers


class Health(BaseModel):
    version: str
    device: str
    gpu: str | None = Field(description="GPU name, null on the CPU")
    model: str | None = Field(description="checkpoint file of the feed-forward model, null when none is loaded")
    free_memory_bytes: int | None
    total_memory_bytes: int | None
    queue_length: int = Field(description="jobs waiting (the running one not counted)")
    max_queue: int
    running: str | None = Field(description="id of the running job")
    default_preset: str
    presets: list[str]
    engines: list[str]


class JobCreated(BaseModel):
    id: str
    state: str = Field(description="always 'queued'")


class JobStatus(BaseModel):
    id: str
    state: State
    stage: str = Field(description="what the job is doing now, e.g. 'coarse', 'bake'")
    progress: float = Field(ge=0.0, le=1.0, description="0..1 over the whole job")
    message: str = Field(description="one sentence for the user; for a failed job, what went wrong")
    preset: str
    engine: str | None
    texture_size: int | None
    target_faces: int | None
    created_at: float = Field(description="seconds since the epoch")
    started_at: float | None
    finished_at: float | None
    fetched_at: float | None
    timings: dict[str, float] = Field(description="seconds per stage, plus 'queued' and 'total'")
    warnings: list[str]
    result: str | None = Field(description="path of the GLB once done")
    preview: str | None = Field(description="path of the preview PNG once done")
    bundle: str
    queue_position: int | None = None


class Problem(BaseModel):
    detail: str = Field(description="one sentence: what is wrong and what to do about it")


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem} for code in codes}


def _file_responses(media_type: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {media_type: {}}}, **_problems(401, 404, 409)}


# ---------------------------------------------------------------------------------------------
# The guard: token, content type and size, before the body is read


def token_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries the token (compared in constant time)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class _Guard:
    """ASGI middleware that refuses unauthenticated, wrongly typed and oversized requests early."""

    def __init__(self, app: ASGIApp, token: str, max_request_bytes: int) -> None:
        self.app, self.token, self.max_bytes = app, token, max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, detail, extra = refusal
            log.warning("%s %s refused: %s", scope["method"], scope["path"], detail)
            await JSONResponse({"detail": detail}, status, headers=extra)(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a body without Content-Length (chunked) is cut off here
                raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, dict[str, str]] | None:
        if scope["path"] not in PUBLIC_PATHS:
            header = headers.get("authorization", "").strip()
            if not header:
                detail = "this request needs the service's token; send the header 'Authorization: Bearer <token>'."
                return 401, detail, {"WWW-Authenticate": "Bearer"}
            if not token_matches(header, self.token):
                detail = "the token is wrong; send the contents of the service's token file as 'Bearer <token>'."
                return 401, detail, {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        if scope["method"] == "POST" and scope["path"] == f"{API}/jobs":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "multipart/form-data":
                detail = (
                    f"the request is sent as '{kind or 'no content type'}'; send multipart/form-data with the zipped "
                    "bundle in the file field 'bundle'."
                )
                return 415, detail, {}
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return 400, "the Content-Length header is not a number; send a valid HTTP request.", {}
        if int(length) > self.max_bytes:
            return 413, self._too_large(), {}
        return None

    def _too_large(self) -> str:
        return (
            f"the request is larger than the limit of {self.max_bytes / MIB:g} MiB; send fewer or smaller images "
            "(or start the service with a larger --max-request-mb)."
        )


# ---------------------------------------------------------------------------------------------
# The app

_bearer = HTTPBearer(auto_error=False, description="the contents of the service's token file")


def _authorised(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    # The guard has already refused these; this keeps the routes safe if the app is served without it.
    header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
    if not token_matches(header, request.app.state.token):
        raise HTTPException(401, "this request needs the service's token.", {"WWW-Authenticate": "Bearer"})


def _store(request: Request) -> JobStore:
    return request.app.state.store


Store = Annotated[JobStore, Depends(_store)]


def create_app(
    config: ServiceConfig,
    token: str,
    device: torch.device,
    runner: Reconstructor,
    on_ready: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The FastAPI app; its lifespan opens the job store on `config.work_dir` (recovering old jobs)."""
    default_preset = config.preset or ("standard" if device.type == "cuda" else "cpu")
    get_preset(default_preset)
    limits = config.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = JobStore(
            config.work_dir,
            runner,
            max_queue=config.max_queue,
            keep_fetched_s=config.keep_fetched_s,
            max_age_s=config.max_age_s,
        )
        on_ready()
        yield
        app.state.store.close()

    app = FastAPI(
        title="LSRM for Blender backend",
        version=__version__,
        description="Reconstruct relightable 3D assets from posed views: submit a bundle, poll, fetch the GLB.",
        openapi_url=f"{API}/openapi.json",
        docs_url=None,  # the interactive page loads scripts from a CDN; the schema is enough
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.token = token
    app.add_middleware(_Guard, token=token, max_request_bytes=limits.request_bytes)
    secured = [Depends(_authorised)]

    def job_route(method: str, path: str, **options: Any) -> Callable:
        """A route under /v1/jobs that needs the token."""
        return app.api_route(f"{API}/jobs{path}", methods=[method], dependencies=secured, tags=["jobs"], **options)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError) -> JSONResponse:
        log.warning("%s %s refused: %s", request.method, request.url.path, error)
        detail = str(error).rstrip()
        return JSONResponse({"detail": detail if detail.endswith(".") else detail + "."}, 422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        detail = _validation_sentence(error.errors())
        log.warning("%s %s refused: %s", request.method, request.url.path, detail)
        return JSONResponse({"detail": detail}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = _http_sentence(error.status_code, str(error.detail))
        return JSONResponse({"detail": detail}, error.status_code, headers=error.headers)

    @app.get(f"{API}/health", response_model=Health, tags=["service"])
    def health() -> dict[str, Any]:
        """What the service runs on and how busy it is. Needs no token."""
        report = device_report(device)
        return {
            "version": __version__,
            "device": report["device"],
            "gpu": report["gpu"],
            "model": runner.model_name,
            "free_memory_bytes": report["free_memory_bytes"],
            "total_memory_bytes": report["total_memory_bytes"],
            **app.state.store.counts(),
            "max_queue": config.max_queue,
            "default_preset": default_preset,
            "presets": list(PRESETS),
            "engines": list(ENGINES),
        }

    @job_route("POST", "", status_code=202, response_model=JobCreated, responses=_problems(401, 413, 415, 422, 429))
    def submit(
        jobs: Store,
        bundle: Annotated[UploadFile, File(description="zip of the bundle folder (transforms.json + images)")],
        preset: Annotated[str | None, Form(description=f"one of {', '.join(PRESETS)}")] = None,
        engine: Annotated[str | None, Form(description=f"one of {', '.join(ENGINES)}; default: the preset's")] = None,
        texture_size: Annotated[int | None, Form(description="texture width and height, a power of two")] = None,
        target_faces: Annotated[int | None, Form(description="faces of the simplified mesh; 0 keeps all")] = None,
    ) -> dict[str, Any]:
        """Queue a reconstruction of a zipped bundle. Everything is checked before the job is queued."""
        clock = time.perf_counter()
        try:
            jobs.check_room()
        except QueueFull as full:
            raise HTTPException(429, str(full), {"Retry-After": "10"}) from None
        request = _job_request(preset or default_preset, engine, texture_size, target_faces)
        if request.engine not in (None, "refine") and runner.model_name is None:
            raise InputError(
                f"engine '{request.engine}' needs the feed-forward model, and this service runs without one; "
                "use engine 'refine', or start the service with --checkpoint."
            )
        kind = (bundle.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if kind not in ZIP_CONTENT_TYPES:
            raise HTTPException(
                415, f"the file field 'bundle' is sent as '{kind}'; send the bundle folder as a zip (application/zip)."
            )
        with jobs.incoming() as folder:
            root = unpack_bundle(bundle.file, folder / "input" / _bundle_name(bundle.filename), limits)
            validate_bundle(root, limits)
            timings = {"upload checks": time.perf_counter() - clock}
            try:
                job = jobs.submit(folder, root, request, timings)
            except QueueFull as full:
                raise HTTPException(429, str(full), {"Retry-After": "10"}) from None
        return {"id": job.id, "state": State.QUEUED.value}  # the worker may already have taken it

    @job_route("GET", "/{job_id}", response_model=JobStatus, responses=_problems(401, 404))
    def job_status(job_id: str, jobs: Store) -> dict[str, Any]:
        """The job's state, stage, progress 0..1, message, timings and warnings."""
        return _found(jobs.status(job_id), job_id)

    def finished_file(jobs: JobStore, job_id: str, what: str) -> Path:
        job = _found(jobs.get(job_id), job_id)
        if job.state in (State.QUEUED, State.RUNNING):
            detail = f"job {job_id} is {job.state.value} ({job.stage}, {job.progress:.0%}); fetch its {what} when its "
            raise HTTPException(409, detail + "state is 'done'.")
        if job.state != State.DONE:
            raise HTTPException(409, f"job {job_id} is {job.state.value}, so it has no {what}: {job.message}")
        path = job.result if what == "result" else job.preview
        if not path.is_file():
            raise HTTPException(404, f"job {job_id} has no {what} file (it was removed); submit the bundle again.")
        return path

    @job_route("GET", "/{job_id}/result", response_class=FileResponse, responses=_file_responses("model/gltf-binary"))
    def result(job_id: str, jobs: Store) -> FileResponse:
        """The relightable asset as a GLB, in the bundle's world frame. Its files go a while after this."""
        path = finished_file(jobs, job_id, "result")
        return FileResponse(
            path,
            media_type="model/gltf-binary",
            filename=f"{job_id}.glb",
            background=BackgroundTask(jobs.mark_fetched, job_id),
        )

    @job_route("GET", "/{job_id}/preview", response_class=FileResponse, responses=_file_responses("image/png"))
    def preview(job_id: str, jobs: Store) -> FileResponse:
        """A small RGBA render of the result from the first input camera."""
        return FileResponse(finished_file(jobs, job_id, "preview"), media_type="image/png")

    @job_route("DELETE", "/{job_id}", response_model=JobStatus, responses=_problems(401, 404))
    def cancel(job_id: str, jobs: Store) -> dict[str, Any]:
        """Cancel a queued or running job (it stops at the engine's next step); delete a finished one's files."""
        return _found(jobs.cancel(job_id), job_id)

    return app


def _job_request(preset: str, engine: str | None, texture_size: int | None, target_faces: int | None) -> JobRequest:
    """The job's settings, checked as `reconstruct` would check them (InputError: a 422)."""
    chosen = get_preset(preset)
    if engine is not None and engine not in ENGINES:
        raise InputError(f"unknown engine '{engine}'; use one of {', '.join(ENGINES)}.")
    check_export_arguments(
        Path("result.glb"),
        chosen.resolution,
        chosen.texture_size if texture_size is None else texture_size,
        chosen.target_faces if target_faces is None else target_faces,
    )
    return JobRequest(preset, engine, texture_size, target_faces)


def _bundle_name(filename: str | None) -> str:
    """A safe folder name from the uploaded file's name (it becomes the asset's name), else 'bundle'."""
    stem = Path((filename or "").replace("\\", "/")).name.removesuffix(".zip").removesuffix(".ZIP")
    return stem if _SAFE_NAME.fullmatch(stem) and stem not in (".", "..") else "bundle"


def _found(value: T | None, job_id: str) -> T:
    """The job (or its status) looked up, or a 404 that says so."""
    if value is None:
        shown = job_id if _SAFE_NAME.fullmatch(job_id) else "(that id)"
        detail = f"there is no job {shown} (never submitted, or its files expired); check the id or submit again."
        raise HTTPException(404, detail)
    return value


def _validation_sentence(errors: list[dict[str, Any]]) -> str:
    """One sentence for FastAPI's first validation error (a missing or mistyped form field)."""
    first = errors[0] if errors else {}
    name = str(first.get("loc", ("", "request"))[-1])
    kind = str(first.get("type", ""))
    if name == "bundle":
        return "the file field 'bundle' is missing or not a file; send the zipped bundle folder as that field."
    if kind == "missing":
        return f"field '{name}' is missing; add it to the request."
    if kind.startswith("int"):
        return f"field '{name}' must be a whole number; fix it and resend the request."
    return f"field '{name}' is not valid ({first.get('msg', 'unreadable')}); fix it and resend the request."


def _http_sentence(status: int, detail: str) -> str:
    """Starlette's own short details ('Not Found') turned into sentences that say what to do."""
    if status == 404 and detail == "Not Found":
        return f"there is no such endpoint; the API is described at {API}/openapi.json."
    if status == 405:
        return f"this endpoint does not take that method; the API is described at {API}/openapi.json."
    if status == 400 and "parsing the body" in detail:
        return "the request body is not valid multipart/form-data; send the zipped bundle as the file field 'bundle'."
    return detail


# ---------------------------------------------------------------------------------------------
# serve


def serve(config: ServiceConfig) -> None:
    """Run the service until interrupted; prints one JSON line (url, port, token_file, pid) when it is ready."""
    config = replace(config, work_dir=Path(config.work_dir or default_work_dir()).resolve())
    loopback = _is_loopback(config.host)
    if not loopback and config.token_file is None:
        raise InputError(
            f"--host {config.host} is reachable from other machines, so give the token explicitly with --token-file "
            "(a file holding a long random string, or a path where one will be made)."
        )
    device = pick_device(config.device)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    _log_to(config.log_file or config.work_dir / "service.log")
    token_file = config.token_file or config.work_dir / "token"
    token = read_or_create_token(token_file)
    runner = Reconstructor(device, config.limits, config.checkpoint, config.preview_size)
    if config.checkpoint is not None and not config.checkpoint.is_file():
        raise InputError(f"checkpoint '{config.checkpoint}' does not exist; give the path of a .safetensors file.")
    listener = _listen(config.host, config.port)
    port = listener.getsockname()[1]
    shown_host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{shown_host}:{port}"
    if not loopback:
        log.warning(
            "serving on %s, reachable from other machines: anyone with the token can submit jobs, and HTTP is not "
            "encrypted; prefer an SSH tunnel to 127.0.0.1 or a TLS proxy.",
            url,
        )

    def ready() -> None:
        line = {"url": url, "port": port, "token_file": str(token_file.resolve()), "pid": os.getpid()}
        print(json.dumps(line), flush=True)
        log.info("serving %s on %s (device %s, work dir %s)", API, url, device, config.work_dir)

    import uvicorn

    with _work_dir_lock(config.work_dir):
        app = create_app(config, token, device, runner, ready)
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10))
        server.run(sockets=[listener])


def read_or_create_token(path: Path) -> str:
    """The token in `path`; when the file does not exist, a new random one written with owner-only permissions."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < 16:
            raise InputError(
                f"token file '{path}' holds fewer than 16 characters; put a long random string in it or delete it "
                "so that one is made."
            ) from None
        if os.name == "posix" and path.stat().st_mode & 0o077:
            log.warning("token file %s can be read by other users; chmod 600 it", path)
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(token + "\n")
    return token


def _is_loopback(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as error:
        raise InputError(f"--host {host} cannot be resolved ({error}); give an IP address or a host name.") from None
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the app starts so that port 0 can be reported."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    if os.name == "posix":  # on Windows this option lets two processes share a port: never wanted
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise InputError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or --host.") from None
    listener.listen(64)
    return listener


@contextmanager
def _work_dir_lock(work_dir: Path) -> Iterator[None]:
    """One service per work folder: a second would mark the first one's running job as failed."""
    handle = open(work_dir / "service.lock", "a+")  # held open for the service's lifetime
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise InputError(
            f"another service already uses the work folder '{work_dir}'; stop it or give another --work-dir."
        ) from None
    try:
        yield
    finally:
        handle.close()  # closing releases the lock (and the OS releases it if the process dies)


def _log_to(path: Path) -> None:
    """Log the backend's and uvicorn's messages to a file and to stderr (stdout carries only the ready line)."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr), logging.FileHandler(path, encoding="utf-8")]
    for handler in handlers:
        handler.setFormatter(formatter)
    for name in ("backend", "uvicorn"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.handlers[:] = handlers
        logger.propagate = False
