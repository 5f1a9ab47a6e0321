"""``brats-ensemble serve``: segment uploaded cases on this machine (its GPU) for clients elsewhere (the Slicer module).

FastAPI on uvicorn. The model sets are loaded once at start; each uploaded case becomes a job
(:mod:`BraTSEnsembleLib.jobs`) that is checked at once with the CLI's own reading functions (a bad case is refused
with the CLI's message, HTTP 422), queued, and run one at a time with the function ``brats-ensemble predict`` runs.

Safe by default: it listens on 127.0.0.1; every request needs a token (``Authorization: Bearer …``, compared in
constant time); uploads are bounded per file and per request while they stream in; requests per client and
minute are bounded; the queue is bounded; a job is visible only to the token that submitted it, under a random
128-bit id, and its files are deleted when the client deletes the job or ``--result-ttl`` after it finished; no
path is ever taken from a request (uploads are stored under names the server makes, in a private folder per job);
errors are JSON ``{"error": "…"}``, never a traceback. See docs/server.md for the API.
"""
import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

from . import __version__
from .errors import BraTSEnsembleError
from .jobs import (DONE, FINISHED_STATES, RESULT_KINDS, Job, JobQueue, QueueFull, Runner, predict_arguments,
                   predict_runner)
from .modelset import ModelSet
from .roles import BRATS_ROLES

LOG = logging.getLogger("brats_ensemble.server")

DEFAULT_PORT = 8765
TOKEN_ENV = "BRATS_ENSEMBLE_TOKEN"
MIN_TOKEN_LENGTH = 16
#: Form fields of a submitted case besides the sequences (one file per role, named by the role).
OPTION_FIELDS: tuple[str, ...] = ("model_set", "case_id", "save_uncertainty")
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
MAX_PARTS = 16
MAX_FIELD_BYTES = 1024
MAX_WAIT_SECONDS = 30.0
MIB = 1024 * 1024
#: Files whose bytes make up a model set's fingerprint (configuration and weights; not logs or validation output).
FINGERPRINT_SUFFIXES = (".json", ".pkl", ".pth", ".pt", ".ts", ".model", ".ckpt", ".safetensors", ".zip")


class ApiError(Exception):
    """An HTTP error answer: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


@dataclass(frozen=True)
class Limits:
    """What one client may send and how much the server keeps (defaults: ``brats-ensemble serve --help``)."""

    max_file_bytes: int = 512 * MIB
    max_request_bytes: int = 2048 * MIB
    #: declared voxel data of one uploaded image, uncompressed (a small .nii.gz can declare gigabytes)
    max_image_bytes: int = 2048 * MIB
    max_waiting: int = 8
    requests_per_minute: int = 240
    result_ttl_seconds: float = 3600.0

    def describe(self) -> dict[str, Any]:
        return {"max_file_bytes": self.max_file_bytes, "max_request_bytes": self.max_request_bytes,
                "max_image_bytes": self.max_image_bytes, "max_waiting_jobs": self.max_waiting,
                "requests_per_minute": self.requests_per_minute, "result_ttl_seconds": self.result_ttl_seconds}


# ----------------------------------------------------------------------------------------------------------------
# Tokens and request rate


class Tokens:
    """The accepted tokens, each a client of its own (``client-1``, ``client-2`` … in the order given).

    Only SHA-256 digests are kept; a presented token is compared with every one of them in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("no token")
        self._digests = [(hashlib.sha256(t.encode()).digest(), f"client-{i + 1}") for i, t in enumerate(tokens)]

    def identify(self, presented: str) -> str | None:
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        found = None
        for known, client in self._digests:
            if hmac.compare_digest(digest, known):
                found = client
        return found


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests in a burst, refilled at ``per_minute`` per minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when the request may pass, else the seconds until it would."""
        now = self.clock()
        level, last = self._buckets.get(key, (self.capacity, now))
        level = min(self.capacity, level + (now - last) * self.rate)
        if level < 1.0:
            self._buckets[key] = (level, now)
            return (1.0 - level) / self.rate
        self._buckets[key] = (level - 1.0, now)
        if len(self._buckets) > 10_000:  # forget full buckets (unknown addresses trying tokens)
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.capacity - 1}
        return 0.0


def bearer_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header value, else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict[str, Any],
                     headers: Mapping[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
           (b"cache-control", b"no-store")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class AccessControl:
    """ASGI middleware before any route: the token (401), then the client's request rate (429). Every answer gets
    ``Cache-Control: no-store``. The client's name is put in ``scope["state"]["client"]``."""

    def __init__(self, app: Any, tokens: Tokens, limiter: RateLimiter) -> None:
        self.app, self.tokens, self.limiter = app, tokens, limiter

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = bearer_token(headers.get("authorization"))
        client = self.tokens.identify(token) if token else None
        key = client or f"address:{(scope.get('client') or ('unknown',))[0]}"
        wait = self.limiter.take(key)
        if wait > 0:
            await _send_json(send, 429, {"error": f"too many requests; retry in {math.ceil(wait)} s (this server "
                                                  f"takes {int(self.limiter.capacity)} requests a minute per client)"},
                             {"retry-after": str(math.ceil(wait))})
            return
        if client is None:
            message = ("the token was not accepted" if token else
                       "this server needs a token: send the header 'Authorization: Bearer TOKEN'")
            await _send_json(send, 401, {"error": message + " (the token printed when the server started, or one "
                                                            "of its --token-file)"}, {"www-authenticate": "Bearer"})
            return
        scope.setdefault("state", {})["client"] = client

        async def send_no_store(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"cache-control", b"no-store")]
            await send(message)

        await self.app(scope, receive, send_no_store)


# ----------------------------------------------------------------------------------------------------------------
# Uploads


@dataclass
class Upload:
    """A received case: option fields (text) and one stored file per role."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


class _UploadReader:
    """Parses a multipart/form-data body chunk by chunk (python-multipart's streaming parser), writing each file
    part straight into the job's folder under a name the server makes and counting its bytes as they arrive."""

    def __init__(self, boundary: bytes, folder: Path, limits: Limits) -> None:
        from python_multipart import MultipartParser

        self.folder, self.limits = folder, limits
        self.upload = Upload()
        self.error: ApiError | None = None
        self._headers: dict[str, str] = {}
        self._field, self._value = b"", b""
        self._name: str | None = None
        self._file: Any = None
        self._text = bytearray()
        self._bytes = 0
        self._parts = 0
        self.ended = False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end})

    def fail(self, error: ApiError) -> None:
        if self.error is None:
            self.error = error
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def feed(self, chunk: bytes) -> None:
        if self.error is None:
            try:
                self.parser.write(chunk)
            except ApiError as exc:
                self.fail(exc)
            except Exception as exc:  # python-multipart's MultipartParseError and the like
                self.fail(ApiError(400, f"the upload is not valid multipart/form-data ({type(exc).__name__})"))

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ApiError(400, f"more than {MAX_PARTS} form fields; send one file per sequence and the options "
                                f"{', '.join(OPTION_FIELDS)}")
        self._headers, self._name, self._text, self._bytes = {}, None, bytearray(), 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        disposition, params = parse_options_header(self._headers.get("content-disposition", ""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise ApiError(400, "a form part has no name (Content-Disposition: form-data; name=…)")
        if name in BRATS_ROLES:
            if name in self.upload.files:
                raise ApiError(400, f"two files for {name}; send one file per sequence")
            path = self.folder / f"upload-{len(self.upload.files) + 1}"  # renamed once the case id is known
            self._file = path.open("xb")
            self.upload.files[name] = path
        elif name in OPTION_FIELDS:
            if name in self.upload.fields:
                raise ApiError(400, f"the option {name} is given twice")
        else:
            raise ApiError(400, f"unknown form field {name!r}: send the sequences as {', '.join(BRATS_ROLES)} (one "
                                f"NIfTI file each) and the options {', '.join(OPTION_FIELDS)}")
        self._name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        self._bytes += size
        if self._file is not None:
            if self._bytes > self.limits.max_file_bytes:
                raise ApiError(413, f"{self._name}: the file is larger than this server takes "
                                    f"({_size(self.limits.max_file_bytes)} per file, --max-file-mb)")
            self._file.write(data[start:end])
        else:
            if self._bytes > MAX_FIELD_BYTES:
                raise ApiError(400, f"the option {self._name} is longer than {MAX_FIELD_BYTES} bytes")
            self._text += data[start:end]

    def _part_end(self) -> None:
        if self._file is not None:
            self.close()
        elif self._name is not None:
            try:
                self.upload.fields[self._name] = self._text.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ApiError(400, f"the option {self._name} is not UTF-8 text") from None

    def _end(self) -> None:
        self.ended = True


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n} bytes"


async def receive_upload(request: Any, folder: Path, limits: Limits) -> Upload:
    """Read a multipart/form-data case into ``folder`` while it streams in, within the limits.

    The declared length (Content-Length) is checked before anything is read. A file over the per-file limit stops
    being stored at once; the rest of a body whose declared length is within the per-request limit is then read
    and dropped so that the client receives the 413 answer; no more than that limit is ever read.
    """
    from python_multipart.multipart import parse_options_header
    from starlette.requests import ClientDisconnect

    mime, params = parse_options_header(request.headers.get("content-type", ""))
    if mime != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(415, "send the case as multipart/form-data: one NIfTI file per sequence (form fields "
                            f"{', '.join(BRATS_ROLES)}) and the options {', '.join(OPTION_FIELDS)}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "the Content-Length header is not a number")
        if int(declared) > limits.max_request_bytes:
            raise ApiError(413, f"the upload is {_size(int(declared))}; this server takes at most "
                                f"{_size(limits.max_request_bytes)} per case (--max-request-mb)")
    reader = _UploadReader(params[b"boundary"], folder, limits)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_request_bytes:
                reader.fail(ApiError(413, f"the upload is larger than this server takes "
                                          f"({_size(limits.max_request_bytes)} per case, --max-request-mb)"))
                break
            reader.feed(chunk)
            if reader.error is not None and declared is None:
                break  # nothing tells how much more would come: answer now
    except ClientDisconnect:
        raise ApiError(400, "the upload was interrupted; send it again") from None
    finally:
        reader.close()
    if reader.error is not None:
        raise reader.error
    if not reader.ended:
        raise ApiError(400, "the upload ended before its last part; send it again")
    return reader.upload


def gzip_or_plain_name(path: Path) -> str:
    """``.nii.gz`` for a gzip file (its magic number), else ``.nii``: the ending the readers go by."""
    with path.open("rb") as handle:
        return ".nii.gz" if handle.read(2) == b"\x1f\x8b" else ".nii"


def declared_image_bytes(path: Path) -> int | None:
    """Bytes of voxel data that a NIfTI header declares (read without the voxels), None when no header is read
    (the case reader then says what is wrong with the file)."""
    try:
        import nibabel

        header = nibabel.load(str(path)).header
        shape = header.get_data_shape()
        return int(math.prod(int(s) for s in shape)) * header.get_data_dtype().itemsize
    except Exception:
        return None


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ApiError(400, f"the option {name} must be true or false, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# The service


def model_set_fingerprint(model_set: ModelSet) -> str:
    """``sha256:…`` over the manifest and every member's configuration and weight files (names and bytes), so that
    a client can tell two servers' sets apart and notice a changed one."""
    digest = hashlib.sha256()
    if model_set.manifest is not None and Path(model_set.manifest).is_file():
        digest.update(b"manifest\0" + Path(model_set.manifest).read_bytes())
    for member in model_set.members:
        where = str(member.describe().get("path") or "")
        root = Path(where)
        files = [] if not where else [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                       and p.name.lower().endswith(FINGERPRINT_SUFFIXES))
        digest.update(f"member\0{member.name}\0".encode())
        for path in files:
            digest.update(f"{path.relative_to(root) if path != root else path.name}\0".encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(MIB), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


def describe_model_set(model_set: ModelSet, fingerprint: str) -> dict[str, Any]:
    """A served set as ``GET /`` lists it: no server path."""
    record: dict[str, Any] = {"name": model_set.name, "roles": list(model_set.roles), "fingerprint": fingerprint,
                              "members": [{"name": m.name, "framework": m.describe().get("framework")}
                                          for m in model_set.members],
                              "postprocess": [str(s) for s in model_set.postprocess],
                              "label_rule": model_set.resolved_label_rule}
    if model_set.description:
        record["description"] = model_set.description
    return record


@dataclass
class Service:
    """What the app serves: the loaded model sets (the first is the default), the jobs, tokens and limits."""

    model_sets: dict[str, ModelSet]
    fingerprints: dict[str, str]
    queue: JobQueue
    tokens: Tokens
    limits: Limits
    device: str


def check_case(job: Job, model_set: ModelSet) -> None:
    """What ``predict`` checks before a model runs, on the uploaded case (raises the CLI's errors)."""
    from .cli import read_case
    from .pipeline import check_roles

    case = read_case(job.case_dir, model_set, predict_arguments(job, model_set))
    check_roles(case, model_set)


def _job_or_404(service: Service, client: str, job_id: str) -> Job:
    job = service.queue.get(client, job_id) if JOB_ID_PATTERN.fullmatch(job_id) else None
    if job is None:
        raise ApiError(404, "no such job for this token (it may have been deleted or expired)")
    return job


def _job_record(service: Service, job: Job) -> dict[str, Any]:
    return job.describe(service.queue.position(job))


async def submit_case(service: Service, request: Any, client: str) -> dict[str, Any]:
    """``POST /jobs``: receive, check and queue one case."""
    from starlette.concurrency import run_in_threadpool

    try:
        service.queue.reserve()
    except QueueFull as exc:
        raise ApiError(503, str(exc), {"retry-after": "30"}) from None
    job = service.queue.new_job(client)
    queued = False
    try:
        upload = await receive_upload(request, job.folder, service.limits)
        name = upload.fields.get("model_set") or next(iter(service.model_sets))
        if name not in service.model_sets:
            raise ApiError(400, f"unknown model set {name!r}; this server serves {', '.join(service.model_sets)}")
        case_id = upload.fields.get("case_id") or "case"
        if not CASE_ID_PATTERN.fullmatch(case_id):
            raise ApiError(400, f"case_id {case_id!r}: use 1-80 letters, digits, '.', '_' or '-', starting with a "
                                "letter or digit")
        job.model_set, job.case_id = name, case_id
        job.save_uncertainty = parse_bool(upload.fields.get("save_uncertainty", ""), "save_uncertainty")
        if not upload.files:
            raise ApiError(400, "no image uploaded: send one NIfTI file per sequence as the form fields "
                                f"{', '.join(service.model_sets[name].roles)}")
        for role, path in upload.files.items():
            target = job.case_dir / f"{case_id}-{role}{gzip_or_plain_name(path)}"
            path.rename(target)
            declared = declared_image_bytes(target)
            if declared is not None and declared > service.limits.max_image_bytes:
                raise ApiError(413, f"{target.name}: its header declares {_size(declared)} of voxels; this server "
                                    f"takes at most {_size(service.limits.max_image_bytes)} per image "
                                    "(--max-image-mb)")
        try:
            await run_in_threadpool(check_case, job, service.model_sets[name])
        except BraTSEnsembleError as exc:
            raise ApiError(422, job.public(str(exc))) from None
        position = service.queue.enqueue(job)
        queued = True
        LOG.info("job %s (%s): %s queued at %d", job.id[:8], client, case_id, position)
        return {**job.describe(position)}
    finally:
        if not queued:
            service.queue.release()
            shutil.rmtree(job.folder, ignore_errors=True)


def create_app(service: Service) -> Any:
    """The FastAPI application (wrapped in :class:`AccessControl`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(_app: Any):
        service.queue.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.queue.stop)
        shutil.rmtree(service.queue.work_dir, ignore_errors=True)

    app = FastAPI(title="brats-ensemble", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                             for e in exc.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        LOG.error("internal error", exc_info=exc)
        return JSONResponse({"error": "internal server error; the server's log has the details"}, status_code=500)

    def client_of(request: Request) -> str:
        return request.scope["state"]["client"]

    @app.get("/")
    async def index(request: Request) -> dict[str, Any]:
        return {"service": "brats-ensemble", "version": __version__, "device": service.device,
                "client": client_of(request),
                "model_sets": [describe_model_set(m, service.fingerprints[n]) for n, m in service.model_sets.items()],
                "limits": service.limits.describe(), "queue": service.queue.counts()}

    @app.post("/jobs", status_code=202)
    async def submit(request: Request) -> JSONResponse:
        record = await submit_case(service, request, client_of(request))
        return JSONResponse(record, status_code=202, headers={"location": f"/jobs/{record['id']}"})

    @app.get("/jobs")
    async def jobs(request: Request) -> dict[str, Any]:
        queue = service.queue
        return {"jobs": [_job_record(service, j) for j in queue.of_owner(client_of(request))]}

    @app.get("/jobs/{job_id}")
    async def job_status(job_id: str, request: Request) -> dict[str, Any]:
        return _job_record(service, _job_or_404(service, client_of(request), job_id))

    @app.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request, since: int = 0, wait: float = 0.0) -> dict[str, Any]:
        job = _job_or_404(service, client_of(request), job_id)
        if since < 0 or not math.isfinite(wait):
            raise ApiError(400, "since must be >= 0 and wait a number of seconds")
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT_SECONDS)
        while (len(job.events) <= since and job.state not in FINISHED_STATES and time.monotonic() < deadline
               and not await request.is_disconnected()):
            await asyncio.sleep(0.2)
        events = job.events[since:since + 1000]
        record = _job_record(service, job)
        return {"events": events, "next": since + len(events), "state": record["state"], "error": job.error}

    @app.get("/jobs/{job_id}/files/{kind}")
    async def job_file(job_id: str, kind: str, request: Request) -> Response:
        job = _job_or_404(service, client_of(request), job_id)
        if kind not in RESULT_KINDS:
            raise ApiError(404, f"unknown result {kind!r}; a job has {', '.join(RESULT_KINDS)}")
        if job.state != DONE:
            raise ApiError(409, f"the job is {job.describe()['state']}; its results are there when it is done")
        path = job.files.get(kind)
        if path is None or not path.is_file():
            raise ApiError(404, f"this job has no {kind} result (the uncertainty maps need save_uncertainty=true)")
        if kind == "statistics":  # the file names the uploads by the job's folder: show their names only
            text = await asyncio.get_running_loop().run_in_executor(None, path.read_text, "utf-8")
            return Response(job.public(text), media_type="application/json",
                            headers={"content-disposition": f'attachment; filename="{path.name}"'})
        return FileResponse(path, media_type="application/gzip", filename=path.name)

    @app.delete("/jobs/{job_id}")
    async def job_delete(job_id: str, request: Request) -> dict[str, Any]:
        job = _job_or_404(service, client_of(request), job_id)
        outcome = service.queue.cancel_or_delete(job)
        LOG.info("job %s: %s by its owner", job.id[:8], outcome)
        return {"id": job.id, "state": outcome}

    return AccessControl(app, service.tokens, RateLimiter(service.limits.requests_per_minute))


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brats-ensemble serve",
        description="Segment cases uploaded over HTTP with model sets loaded once (docs/server.md). Listens on "
                    "127.0.0.1 unless --host says otherwise; every request needs a token.")
    parser.add_argument("--model-set", action="append", required=True, type=Path, metavar="FILE",
                        help="model-set manifest to serve; repeat for several (the first is the default)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only). Anything else sends "
                             "tokens and images in clear text: put a TLS reverse proxy in front")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--token", action="append", default=[], metavar="T",
                        help="an accepted token (repeat for several clients; visible in `ps`: prefer --token-file or "
                             f"${TOKEN_ENV}). Default: one is generated and printed")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="accepted tokens, one per line (each line a client of its own; # starts a comment)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N; one job at a time "
                                                         "runs there (start one server per GPU)")
    parser.add_argument("--trust-checkpoint", action="append", default=[], metavar="PATH",
                        help="allow full unpickling of checkpoints under PATH (only for sources you trust)")
    parser.add_argument("--max-file-mb", type=float, default=512.0, help="largest uploaded file, MiB (default 512)")
    parser.add_argument("--max-request-mb", type=float, default=2048.0,
                        help="largest upload of one case, MiB (default 2048)")
    parser.add_argument("--max-image-mb", type=float, default=2048.0,
                        help="largest voxel data one image header may declare, uncompressed, MiB (default 2048)")
    parser.add_argument("--max-queue", type=int, default=8, help="cases waiting (queued or uploading) at most; "
                                                                 "more are refused with 503 (default 8)")
    parser.add_argument("--rate-limit", type=int, default=240,
                        help="requests per minute per client (token), as a burst refilled over the minute; more "
                             "are refused with 429 (default 240)")
    parser.add_argument("--result-ttl", type=float, default=3600.0,
                        help="seconds a finished job's results are kept when the client does not delete them "
                             "(default 3600)")
    return parser


class UsageError(Exception):
    """A problem with the serve options (exit status 2)."""


def read_tokens(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[list[str], bool]:
    """The accepted tokens from --token, --token-file and $BRATS_ENSEMBLE_TOKEN; (tokens, generated)."""
    tokens = list(args.token)
    if args.token_file is not None:
        try:
            mode = args.token_file.stat().st_mode
            text = args.token_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{args.token_file}: cannot be read ({exc.strerror or exc})") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            LOG.warning("%s: readable by other users; `chmod 600 %s`", args.token_file, args.token_file)
        tokens += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if environ.get(TOKEN_ENV, "").strip():
        tokens.append(environ[TOKEN_ENV].strip())
    for token in tokens:
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise UsageError(f"a token must be at least {MIN_TOKEN_LENGTH} characters without spaces; make one "
                             "with `python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")
    if len(set(tokens)) != len(tokens):
        raise UsageError("a token is given twice; give each client its own token")
    if tokens:
        return tokens, False
    return [secrets.token_urlsafe(32)], True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    """The warning printed when the server listens beyond this machine (no TLS of its own)."""
    if is_loopback(host):
        return None
    line = "!" * 100
    return (f"{line}\nWARNING: listening on {host}, beyond this machine, WITHOUT TLS: the token and the patients' "
            "images cross the network\nin clear text. Put a TLS reverse proxy (nginx, Caddy, Apache) in front and "
            "keep this server on 127.0.0.1,\nor use it only inside a network you trust (docs/server.md).\n"
            f"{line}")


def load_service(args: argparse.Namespace, tokens: list[str], runner: Runner | None = None) -> Service:
    """Load every model set once (as ``predict --model-set`` loads it), fingerprint it and make the job queue (in a
    private temporary folder)."""
    from .cli import _model_set, build_parser
    from .pipeline import resolve_device

    device = resolve_device(args.device)
    model_sets: dict[str, ModelSet] = {}
    trust = [option for path in args.trust_checkpoint for option in ("--trust-checkpoint", str(path))]
    for path in args.model_set:
        model_set = _model_set(build_parser().parse_args(["predict", ".", "-o", ".", "--model-set", str(path),
                                                          *trust]))
        other = [r for r in model_set.roles if r not in BRATS_ROLES]
        if other:
            raise UsageError(f"{path}: serve takes model sets on the BraTS sequences ({', '.join(BRATS_ROLES)}); "
                             f"this one needs {', '.join(other)}")
        name = str(model_set.name)
        if name in model_sets:
            raise UsageError(f"{path}: another served model set is named {name!r} too; give each manifest its "
                             "own \"name\"")
        model_sets[name] = model_set
    fingerprints = {name: model_set_fingerprint(m) for name, m in model_sets.items()}
    limits = Limits(max_file_bytes=int(args.max_file_mb * MIB), max_request_bytes=int(args.max_request_mb * MIB),
                    max_image_bytes=int(args.max_image_mb * MIB), max_waiting=args.max_queue,
                    requests_per_minute=args.rate_limit, result_ttl_seconds=args.result_ttl)
    work_dir = Path(tempfile.mkdtemp(prefix="brats-ensemble-serve-"))  # mode 0700
    queue = JobQueue(model_sets, runner or predict_runner(device), work_dir, limits.max_waiting,
                     limits.result_ttl_seconds)
    return Service(model_sets, fingerprints, queue, Tokens(tokens), limits, str(device))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        print(f"error: `brats-ensemble serve` needs {exc.name}, which is not installed. Install the server extra: "
              "pip install 'brats-ensemble[server]' (fastapi, uvicorn, python-multipart).", file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for value, option in ((args.max_file_mb, "--max-file-mb"), (args.max_request_mb, "--max-request-mb"),
                          (args.max_image_mb, "--max-image-mb"), (args.result_ttl, "--result-ttl")):
        if not (math.isfinite(value) and value > 0):
            print(f"error: {option} must be a positive number, got {value}", file=sys.stderr)
            return 2
    if args.max_queue < 1 or args.rate_limit < 1 or not 0 < args.port < 65536:
        print("error: --max-queue and --rate-limit must be at least 1 and --port in 1…65535", file=sys.stderr)
        return 2
    try:
        tokens, generated = read_tokens(args, os.environ if environ is None else environ)
        service = load_service(args, tokens)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BraTSEnsembleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    for name, model_set in service.model_sets.items():
        print(f"serving model set {name!r} ({len(model_set.members)} member(s), {service.fingerprints[name]}) on "
              f"{service.device}", file=sys.stderr)
    if generated:
        print(f"token (give it to the clients; a new one is made at each start unless --token-file or ${TOKEN_ENV} "
              f"is given): {tokens[0]}", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again: let that end here, so that
    # the jobs' files are deleted and the exit status is 0.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info", server_header=False,
                    timeout_graceful_shutdown=10)
    except KeyboardInterrupt:
        pass
    finally:
        service.queue.stop()
        shutil.rmtree(service.queue.work_dir, ignore_errors=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
