"""The client of ``brats-ensemble serve``: send a case's volumes, follow its progress, fetch the results.

Standard library only (http.client), so the Slicer module needs no new package for it; no slicer import either.
:class:`RemoteRun` has the interface of :class:`BraTSEnsembleLib.process.CliProcess` (``poll``, ``state``,
``running``, ``succeeded``, ``cancel``, ``wait``, ``failure_message``), and leaves the same files in its output
folder as ``brats-ensemble predict`` does (``<id>.nii.gz``, ``<id>.json``, the uncertainty maps when asked), so the
module imports a remote result exactly as a local one.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import quote, urlencode, urlsplit

from .process import ProgressEvent, ProgressState, follow_run, parse_progress_line

TOKEN_ENV = "BRATS_ENSEMBLE_TOKEN"
#: Seconds the server may hold an events request open while nothing happens (long poll).
EVENTS_WAIT = 2.0
#: Requests refused with 429 (too many) are retried after the server's Retry-After, at most this many times.
MAX_RETRIES = 8
CHUNK = 1024 * 1024
FINISHED = frozenset({"done", "failed", "cancelled"})
LOG = logging.getLogger("BraTSEnsemble.remote")


class RemoteError(Exception):
    """The server could not be reached, or refused; the message says why and what to check."""


def _error_text(body: bytes) -> str | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return str(data["error"]) if isinstance(data, dict) and "error" in data else None


class ServerClient:
    """Requests to one server (``http://host:port`` or ``https://host/prefix`` behind a TLS proxy) with a token."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0,
                 environ: Mapping[str, str] | None = None) -> None:
        parts = urlsplit(str(url).strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"server URL {url!r}: give it as http://HOST:PORT or https://HOST[:PORT][/PATH]")
        if parts.query or parts.fragment or parts.username:
            raise RemoteError(f"server URL {url!r}: no user, query or fragment; the token goes in the token field")
        token = (token or "").strip() or (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip()
        if not token:
            raise RemoteError(f"no token for the server {url}: give the token that `brats-ensemble serve` printed "
                              f"(or set {TOKEN_ENV})")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self.timeout = timeout

    # --- plumbing

    def _connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout or self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout or self.timeout)

    def _unreachable(self, exc: BaseException) -> RemoteError:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return RemoteError(f"cannot reach the server at {self.url} ({reason}). Check the URL, that `brats-ensemble "
                           "serve` runs there, and the network (VPN, firewall, proxy).")

    def _refusal(self, status: int, reason: str, body: bytes) -> RemoteError:
        said = _error_text(body) or f"HTTP {status} {reason}".strip()
        if status == 401:
            return RemoteError(f"the server at {self.url} did not accept the token ({said}). Check the token "
                               "(printed by `brats-ensemble serve` when it started, or in its --token-file).")
        if status == 413:
            return RemoteError(f"the server at {self.url} refused the upload as too large: {said}")
        if status in (429, 503):
            return RemoteError(f"the server at {self.url} is busy: {said}")
        return RemoteError(f"the server at {self.url} refused: {said}")

    def request(self, method: str, path: str, *, body: Iterator[bytes] | bytes | None = None,
                headers: Mapping[str, str] | None = None, expect: tuple[int, ...] = (200,),
                timeout: float | None = None, sink: Callable[[Iterator[bytes]], None] | None = None,
                body_factory: Callable[[], tuple[Iterator[bytes], int]] | None = None) -> tuple[int, bytes]:
        """One request; (status, body). ``body_factory`` makes a streamed body and its length (an upload);
        ``sink`` takes the answer's body in chunks (a download). 429 answers are retried after Retry-After."""
        for attempt in range(MAX_RETRIES + 1):
            connection = self._connection(timeout)
            try:
                all_headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                               **(headers or {})}
                response = self._exchange(connection, method, self._prefix + path, body, body_factory, all_headers)
                if response.status == 429 and attempt < MAX_RETRIES:
                    wait = response.getheader("Retry-After", "1")
                    response.read()
                    time.sleep(min(30.0, max(0.5, float(wait) if wait.replace(".", "", 1).isdigit() else 1.0)))
                    continue
                if response.status not in expect:
                    raise self._refusal(response.status, response.reason, response.read(64 * 1024))
                if sink is not None:
                    sink(iter(lambda: response.read(CHUNK), b""))
                    return response.status, b""
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from exc
            finally:
                connection.close()
        raise RemoteError(f"the server at {self.url} kept answering 'too many requests'")  # pragma: no cover

    @staticmethod
    def _exchange(connection: http.client.HTTPConnection, method: str, path: str, body: Any,
                  body_factory: Callable[[], tuple[Iterator[bytes], int]] | None,
                  headers: Mapping[str, str]) -> http.client.HTTPResponse:
        if body_factory is None:
            connection.request(method, path, body=body, headers=dict(headers))
            return connection.getresponse()
        chunks, length = body_factory()
        connection.putrequest(method, path)
        for key, value in {**headers, "Content-Length": str(length)}.items():
            connection.putheader(key, value)
        connection.endheaders()
        try:
            for chunk in chunks:
                connection.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (a refusal) and closed: read that answer
        return connection.getresponse()

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        _status, body = self.request(method, path, **kwargs)
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RemoteError(f"{self.url}{path}: the answer is not JSON; is this a brats-ensemble server?") from exc
        if not isinstance(data, dict):
            raise RemoteError(f"{self.url}{path}: unexpected answer")
        return data

    # --- the API

    def info(self) -> dict[str, Any]:
        """``GET /``: the served model sets (name, members, roles, fingerprint), the limits, the device."""
        data = self._json("GET", "/")
        if data.get("service") != "brats-ensemble" or not isinstance(data.get("model_sets"), list):
            raise RemoteError(f"{self.url} answers, but not as a brats-ensemble server")
        return data

    def submit(self, files: Mapping[str, str | Path], case_id: str, model_set: str | None = None,
               save_uncertainty: bool = False) -> dict[str, Any]:
        """``POST /jobs``: upload one NIfTI file per role (streamed from disk) and the options; the queued job."""
        fields = {"case_id": case_id, "save_uncertainty": "true" if save_uncertainty else "false"}
        if model_set:
            fields["model_set"] = model_set
        boundary = uuid.uuid4().hex

        def body() -> tuple[Iterator[bytes], int]:
            return multipart_body(boundary, fields, {role: Path(p) for role, p in files.items()})

        return self._json("POST", "/jobs", body_factory=body, expect=(202,), timeout=max(self.timeout, 600.0),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/jobs/{quote(job_id)}")

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/jobs").get("jobs", []))

    def events(self, job_id: str, since: int = 0, wait: float = EVENTS_WAIT) -> dict[str, Any]:
        """``GET /jobs/ID/events``: the events from number ``since`` on (waiting up to ``wait`` s for one)."""
        query = urlencode({"since": since, "wait": wait})
        return self._json("GET", f"/jobs/{quote(job_id)}/events?{query}", timeout=self.timeout + wait)

    def download(self, job_id: str, kind: str, target: str | Path) -> Path:
        """``GET /jobs/ID/files/KIND`` into ``target`` (written under a temporary name, renamed when complete)."""
        target = Path(target)
        partial = target.with_name(f".{target.name}.partial")

        def write(chunks: Iterator[bytes]) -> None:
            with partial.open("wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)

        try:
            self.request("GET", f"/jobs/{quote(job_id)}/files/{quote(kind)}", sink=write,
                         timeout=max(self.timeout, 600.0))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def delete(self, job_id: str) -> dict[str, Any]:
        """``DELETE /jobs/ID``: cancel a queued or running job, or delete a finished one and its files."""
        return self._json("DELETE", f"/jobs/{quote(job_id)}")


def multipart_body(boundary: str, fields: Mapping[str, str],
                   files: Mapping[str, Path]) -> tuple[Iterator[bytes], int]:
    """A multipart/form-data body streamed from the files, and its exact length."""
    dash = f"--{boundary}\r\n".encode()
    pieces: list[bytes | Path] = []
    for name, value in fields.items():
        pieces += [dash + f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                   + str(value).encode() + b"\r\n"]
    for name, path in files.items():
        pieces += [dash + (f'Content-Disposition: form-data; name="{name}"; filename="{name}{_ending(path)}"\r\n'
                           "Content-Type: application/octet-stream\r\n\r\n").encode(), path, b"\r\n"]
    pieces.append(f"--{boundary}--\r\n".encode())
    length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in pieces)

    def chunks() -> Iterator[bytes]:
        for piece in pieces:
            if isinstance(piece, Path):
                with piece.open("rb") as handle:
                    yield from iter(lambda: handle.read(CHUNK), b"")
            else:
                yield piece

    return chunks(), length


def _ending(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"


class RemoteRun:
    """One case segmented on a server, followed from a background thread; the interface of ``CliProcess``.

    Steps: ``GET /`` (is the model set served, are the files within the limits), ``POST /jobs``, events until the
    job ends, then the results downloaded into ``out_dir`` under the names ``predict`` uses, and the job deleted on
    the server. :meth:`cancel` deletes the job on the server (which stops it between models).
    """

    def __init__(self, client: ServerClient, files: Mapping[str, str | Path], case_id: str, out_dir: str | Path,
                 model_set: str | None = None, save_uncertainty: bool = False) -> None:
        self.client = client
        self.files = {role: Path(p) for role, p in files.items()}
        self.case_id, self.out_dir = case_id, Path(out_dir)
        self.model_set, self.save_uncertainty = model_set, save_uncertainty
        self.state = ProgressState()
        self.cancelled = False
        self.job_id: str | None = None
        self.error: str | None = None
        self.outputs: dict[str, Path] = {}
        self._queue: "queue.Queue[ProgressEvent | str]" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="brats-ensemble-remote", daemon=True)
        self._thread.start()

    # --- the background thread

    def _follow(self) -> None:
        try:
            self._status(f"connecting to {self.client.url}")
            self._check(self.client.info())
            self._status(f"uploading {len(self.files)} volume(s) to {self.client.url}")
            job = self.client.submit(self.files, self.case_id, self.model_set, self.save_uncertainty)
            self.job_id = job["id"]
            if self._stop.is_set():
                return
            answer = self._follow_events()
            if answer["state"] != "done":
                if not self._stop.is_set():
                    self.error = answer.get("error") or f"the server's job ended as {answer['state']}"
                return
            kinds = ["labels", "statistics"] + (["disagreement", "entropy"] if self.save_uncertainty else [])
            for kind in kinds:
                if self._stop.is_set():
                    return
                self.outputs[kind] = self.client.download(self.job_id, kind, self.out_dir / self._file_name(kind))
        except RemoteError as exc:
            if not self._stop.is_set():
                self.error = str(exc)
        except Exception as exc:  # a bug here must still end the run with a message, not hang the panel
            LOG.exception("remote run failed")
            self.error = f"unexpected error while talking to {self.client.url}: {type(exc).__name__}: {exc}"
        finally:
            if self.job_id is not None:  # results fetched, job failed or cancelled: free the server either way
                try:
                    self.client.delete(self.job_id)
                except RemoteError as exc:
                    if "no such job" not in str(exc):
                        LOG.warning("could not delete job %s on %s: %s", self.job_id, self.client.url, exc)

    def _check(self, info: Mapping[str, Any]) -> None:
        names = [m.get("name") for m in info.get("model_sets", [])]
        if self.model_set and self.model_set not in names:
            raise RemoteError(f"the server at {self.client.url} does not serve the model set {self.model_set!r}; it "
                              f"serves {', '.join(map(str, names)) or 'none'}")
        limits = info.get("limits", {})
        if not self.files:
            raise RemoteError("no volume to send")
        largest = max(self.files.items(), key=lambda kv: kv[1].stat().st_size)
        if isinstance(limits.get("max_file_bytes"), int) and largest[1].stat().st_size > limits["max_file_bytes"]:
            raise RemoteError(f"{largest[0]}: the exported volume has {largest[1].stat().st_size} bytes; the server "
                              f"at {self.client.url} takes at most {limits['max_file_bytes']} per file")

    def _follow_events(self) -> dict[str, Any]:
        since = 0
        last_position = None
        while True:
            if self._stop.is_set():
                return {"state": "cancelled"}
            answer = self.client.events(self.job_id, since)
            for record in answer.get("events", []):
                event = parse_progress_line(json.dumps(record))
                if event is not None:
                    self._queue.put(event)
            since = int(answer.get("next", since))
            if answer.get("state") in FINISHED and not answer.get("events"):
                return answer
            if answer.get("state") == "queued":
                position = self.client.job(self.job_id).get("queue_position")
                if position != last_position:
                    self._status(f"waiting in the server's queue (place {position})")
                    last_position = position

    def _status(self, text: str) -> None:
        self._queue.put(text)

    def _file_name(self, kind: str) -> str:
        return {"labels": f"{self.case_id}.nii.gz", "statistics": f"{self.case_id}.json"}.get(
            kind, f"{self.case_id}_{kind}.nii.gz")

    # --- what the module calls (CliProcess's interface)

    def poll(self) -> list[ProgressEvent]:
        """The progress events that arrived since the last call (``state`` updated); never blocks."""
        events = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return events
            if isinstance(item, ProgressEvent):
                self.state.update(item)
                events.append(item)
            else:
                self.state.status = item

    @property
    def running(self) -> bool:
        return self._thread.is_alive() or not self._queue.empty()

    @property
    def returncode(self) -> int | None:
        if self._thread.is_alive():
            return None
        return 0 if self.succeeded else 1

    @property
    def succeeded(self) -> bool:
        return (not self._thread.is_alive() and not self.cancelled and self.error is None
                and "statistics" in self.outputs)

    def failure_message(self) -> str:
        self.poll()
        if self.cancelled:
            return "cancelled"
        return self.error or "the remote run did not finish"

    def wait(self, timeout: float | None = None, interval: float = 0.1,
             callback: Callable[[ProgressEvent], None] | None = None) -> int:
        """Block until done (console use); ``callback(event)`` for each progress event."""
        follow_run(self, timeout, interval, callback, f"the server did not finish within {timeout} s; the job was "
                   "cancelled")
        return int(self.returncode or 0)

    def cancel(self) -> None:
        """Stop following, and cancel (or delete) the job on the server; safe to call more than once."""
        self.cancelled = True
        self._stop.set()
        job_id = self.job_id
        if job_id is not None:
            try:
                self.client.delete(job_id)
            except RemoteError as exc:
                if "no such job" not in str(exc):
                    LOG.warning("could not cancel job %s on %s: %s", job_id, self.client.url, exc)
        # Not waiting for an upload in progress (the panel would freeze): the thread stops by itself and deletes
        # a job it submitted after this point.
        self._thread.join(timeout=EVENTS_WAIT + 1)
        self.poll()
