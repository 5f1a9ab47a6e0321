"""The jobs of ``brats-ensemble serve``: a bounded queue and one worker that runs one case at a time.

A job is one uploaded case. It lives in a private folder that the server makes (``case/`` the uploads under names
the server chose, ``output/`` the results), is owned by the client (token) that submitted it, and is known by a
random 128-bit id. The worker runs it with the very function ``brats-ensemble predict`` runs
(:func:`BraTSEnsembleLib.cli.predict_case`, with ``predict``'s own parsed defaults), so a served case is read, checked,
segmented and written exactly as on the command line; its progress events are those of ``--progress json``.

No web framework here (see :mod:`BraTSEnsembleLib.server` for the HTTP side).
"""
from __future__ import annotations

import argparse
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import BraTSEnsembleError, Cancelled
from .modelset import ModelSet
from .pipeline import ProgressEvent

LOG = logging.getLogger("brats_ensemble.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED_STATES = frozenset({DONE, FAILED, CANCELLED})
#: What a finished job offers for download, by kind: the ``predict`` outputs (see pipeline.output_paths).
RESULT_KINDS: tuple[str, ...] = ("labels", "statistics", "disagreement", "entropy")
#: The message of a cancelled job: the CLI's own words for a cancelled ``predict``.
CANCELLED_MESSAGE = "cancelled; no result of the unfinished case was written"
INTERNAL_ERROR = "internal error while segmenting this case; the server's log has the details"
#: At most this many progress events are kept per job (a run reports a few dozen).
MAX_EVENTS = 10_000


class QueueFull(Exception):
    """No room for another job (queued and uploading jobs together reach the limit)."""


@dataclass
class Job:
    """One uploaded case: who owns it, where its files are, its state and progress events."""

    id: str
    owner: str
    folder: Path
    model_set: str = ""
    case_id: str = ""
    save_uncertainty: bool = False
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    fraction: float = 0.0
    message: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def case_dir(self) -> Path:
        return self.folder / "case"

    @property
    def out_dir(self) -> Path:
        return self.folder / "output"

    def public(self, text: str) -> str:
        """``text`` without the server's paths of this job: messages name the uploaded file (``ID-t1c.nii.gz``),
        never where the server keeps it."""
        for folder, name in ((self.case_dir, "the upload"), (self.out_dir, "the result"), (self.folder, "the job")):
            text = text.replace(f"{folder}/", "").replace(str(folder), name)
        return text

    def emit(self, event: ProgressEvent) -> None:
        """Record one progress event (messages made public)."""
        record = {**event.as_dict(), "message": self.public(event.message)}
        self.fraction = max(self.fraction, float(record["fraction"])) if event.event != "error" else self.fraction
        self.message = record["message"]
        if len(self.events) < MAX_EVENTS:
            self.events.append(record)

    def describe(self, position: int | None = None) -> dict[str, Any]:
        """The job as the API shows it to its owner."""
        record: dict[str, Any] = {
            "id": self.id, "state": self.state, "case_id": self.case_id, "model_set": self.model_set,
            "save_uncertainty": self.save_uncertainty, "fraction": round(self.fraction, 4), "message": self.message,
            "error": self.error, "created": self.created, "started": self.started, "finished": self.finished,
            "events": len(self.events), "files": sorted(self.files),
        }
        if self.state == QUEUED and position is not None:
            record["queue_position"] = position
        if self.cancel_requested.is_set() and self.state == RUNNING:
            record["state"] = "cancelling"
        return record


#: ``run(job, model_set, progress, cancel) -> {kind: path}``: segments one job's case (see :func:`predict_runner`).
Runner = Callable[[Job, ModelSet, Callable[[ProgressEvent], None], Callable[[], bool]], dict[str, Path]]


def predict_arguments(job: Job, model_set: ModelSet) -> argparse.Namespace:
    """The arguments ``brats-ensemble predict CASE -o OUT --model-set M`` would have for this job, parsed by the
    CLI's own parser, so that every option keeps the command line's default."""
    from .cli import build_parser

    argv = ["predict", str(job.case_dir), "-o", str(job.out_dir), "--model-set", str(model_set.manifest),
            "--progress", "json"]
    if job.save_uncertainty:
        argv.append("--save-uncertainty")
    return build_parser().parse_args(argv)


def predict_runner(device: Any) -> Runner:
    """A runner that does what ``predict`` does with one case folder: :func:`BraTSEnsembleLib.cli.predict_case`."""
    from .cli import predict_case

    def run(job: Job, model_set: ModelSet, progress: Callable[[ProgressEvent], None],
            cancel: Callable[[], bool]) -> dict[str, Path]:
        _, paths = predict_case(job.case_dir, model_set, device, predict_arguments(job, model_set), progress, cancel)
        return paths

    return run


class JobQueue:
    """Jobs by id, a bounded queue of waiting jobs, and the worker thread that runs them one at a time.

    ``max_waiting`` bounds the jobs that are queued or still uploading (a slot is reserved before an upload is
    read, so disk use is bounded too). Finished jobs are deleted ``result_ttl`` seconds after they finished, or
    when their owner deletes them.
    """

    def __init__(self, model_sets: dict[str, ModelSet], runner: Runner, work_dir: Path, max_waiting: int = 8,
                 result_ttl: float = 3600.0) -> None:
        self.model_sets = model_sets
        self.runner = runner
        self.work_dir = Path(work_dir)
        self.max_waiting = max_waiting
        self.result_ttl = result_ttl
        self._jobs: dict[str, Job] = {}
        self._waiting: deque[Job] = deque()
        self._reserved = 0
        self._running: Job | None = None
        self._lock = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="brats-ensemble-worker", daemon=True)

    # --- life cycle

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job, drop the queue, wait for the worker, delete every job's files."""
        with self._lock:
            self._stopping = True
            for job in [*self._waiting, *([self._running] if self._running else [])]:
                job.cancel_requested.set()
            self._lock.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)
        with self._lock:
            for job in list(self._jobs.values()):
                shutil.rmtree(job.folder, ignore_errors=True)
            self._jobs.clear()
            self._waiting.clear()

    # --- submitting

    def reserve(self) -> None:
        """Reserve a place for a job about to be uploaded; raises QueueFull when there is none."""
        with self._lock:
            self._expire()
            if self._stopping or len(self._waiting) + self._reserved >= self.max_waiting:
                raise QueueFull(f"the server's queue is full ({self.max_waiting} case(s) waiting); try again later")
            self._reserved += 1

    def release(self) -> None:
        """Give back a reservation whose upload was refused."""
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def new_job(self, owner: str) -> Job:
        """A job with a fresh random id and an empty private folder (``case/`` and ``output/``); not queued yet."""
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=self.work_dir))
        (folder / "case").mkdir()
        (folder / "output").mkdir()
        return Job(id=secrets.token_hex(16), owner=owner, folder=folder)

    def enqueue(self, job: Job) -> int:
        """Queue a job whose place was reserved; returns its position (1 = next)."""
        with self._lock:
            self._reserved = max(0, self._reserved - 1)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._lock.notify_all()
            return len(self._waiting)

    # --- the owner's view

    def get(self, owner: str, job_id: str) -> Job | None:
        """The job when it exists and belongs to ``owner`` (another client's job is as unknown as a missing one)."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
            return job if job is not None and secrets.compare_digest(job.owner, owner) else None

    def of_owner(self, owner: str) -> list[Job]:
        with self._lock:
            self._expire()
            return sorted((j for j in self._jobs.values() if j.owner == owner), key=lambda j: j.created)

    def position(self, job: Job) -> int | None:
        """1-based place in the queue of a waiting job."""
        with self._lock:
            return next((i + 1 for i, j in enumerate(self._waiting) if j is job), None)

    def cancel_or_delete(self, job: Job) -> str:
        """A waiting job is cancelled and deleted; a running one is asked to stop (it is deleted when it has);
        a finished one is deleted with its files. Returns what happened: 'cancelled', 'cancelling', 'deleted'."""
        with self._lock:
            if job.state == QUEUED:
                self._waiting.remove(job)
                job.state, job.finished = CANCELLED, time.time()
                job.emit(ProgressEvent("error", job.case_id, 1.0, CANCELLED_MESSAGE))
                self._delete(job)
                return "cancelled"
            if job.state == RUNNING:
                job.cancel_requested.set()
                return "cancelling"
            self._delete(job)
            return "deleted"

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": len(self._waiting), "running": int(self._running is not None)}

    # --- inside

    def _delete(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def _expire(self) -> None:
        now = time.time()
        for job in [j for j in self._jobs.values() if j.state in FINISHED_STATES]:
            if job.finished is not None and now - job.finished > self.result_ttl:
                LOG.info("job %s: expired, files deleted", job.id[:8])
                self._delete(job)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait(timeout=60)
                    self._expire()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                job.state, job.started = RUNNING, time.time()
                self._running = job
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None
                    job.finished = time.time()
                    if job.state != DONE:
                        shutil.rmtree(job.folder, ignore_errors=True)  # nothing half-written stays
                        if job.cancel_requested.is_set() and job.state == CANCELLED:
                            self._jobs.pop(job.id, None)  # the owner asked for it to go

    def _run(self, job: Job) -> None:
        model_set = self.model_sets[job.model_set]
        LOG.info("job %s (%s): %s with %s", job.id[:8], job.owner, job.case_id, job.model_set)
        try:
            paths = self.runner(job, model_set, job.emit, job.cancel_requested.is_set)
        except Cancelled:
            job.state = CANCELLED
            job.emit(ProgressEvent("error", job.case_id, 1.0, CANCELLED_MESSAGE))
            LOG.info("job %s: cancelled", job.id[:8])
            return
        except BraTSEnsembleError as exc:
            job.state, job.error = FAILED, job.public(str(exc))
            job.emit(ProgressEvent("error", "", 1.0, str(exc)))
            LOG.info("job %s: failed: %s", job.id[:8], exc)
            return
        except Exception:  # a bug or an environment failure: the log has the traceback, the client a sentence
            LOG.exception("job %s: failed", job.id[:8])
            job.state, job.error = FAILED, INTERNAL_ERROR
            job.emit(ProgressEvent("error", "", 1.0, INTERNAL_ERROR))
            return
        job.files = {kind: path for kind, path in paths.items() if kind in RESULT_KINDS}
        if job.cancel_requested.is_set():  # asked to stop after the last check: the result is not delivered
            job.state = CANCELLED
            job.emit(ProgressEvent("error", job.case_id, 1.0, CANCELLED_MESSAGE))
            return
        job.state = DONE
        job.emit(ProgressEvent("finished", paths["statistics"].stem, 1.0, "1 case done"))
        LOG.info("job %s: done", job.id[:8])
