"""``brats-ensemble batch COHORT -o OUT --cluster auto|ADDRESS``: a cohort on a Ray cluster (docs/cluster.md).

One worker (a Ray actor) per GPU, or per ``--cpus-per-worker`` CPU cores where the cluster has no GPU, loads the
model set once and segments case after case. The driver (this process) plans the run as local ``batch`` does
(:mod:`.cohort`, :mod:`.results`), claims each case under its lock, sends the bytes of the case's files to a free
worker and writes every result itself with :func:`.pipeline.write_result`: the output folder need not be shared,
and the files are the ones local ``batch`` writes.

Faults: a worker that dies inside a case (process killed, node lost) costs that case a new attempt on another
worker (Ray restarts the lost one); a case that fails for a reason of its own is reported once and the rest go on;
Ctrl-C or SIGTERM kills the run's workers, releases its locks and writes nothing more. Ray is imported only when a
cluster is used (``pip install brats-ensemble[cluster]``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import SimpleITK as sitk

from .case import Case, case_from_files, check_distinct_files, in_role_order
from .cohort import BUSY, SKIP, PlannedCase, claim_case, result_provenance
from .errors import BraTSEnsembleError, InputError
from .limits import Limits, current_limits, use_limits
from .pipeline import ProgressEvent, Result, resolve_device, segment_case, write_result
from .results import CaseLock, case_fingerprint, fingerprint_differences, model_set_fingerprint, output_paths, \
    process_alive

#: ``--cluster auto``: a Ray instance on this machine, started for the run and stopped at its end.
AUTO = "auto"
#: CPU cores (torch threads) of one worker where the cluster has no GPU, unless --cpus-per-worker says otherwise
#: (and at most the largest node's).
DEFAULT_CPUS_PER_WORKER = 4
#: Workers that may die inside one case before the case counts as failed (it may kill every worker it is sent to,
#: e.g. by needing more memory than a worker has).
MAX_ATTEMPTS = 3
#: How often Ray restarts one lost worker (a new process, on the same node or, if it is gone, on another one).
WORKER_RESTARTS = 3
#: Seconds between two looks at cases that another process computes, and the longest wait for a worker's answer.
WAIT_SECONDS = 1.0
#: Seconds to wait for a cluster's address to answer before the run stops with an error.
CONNECT_TIMEOUT_S = 10.0
#: Cases are sent as the bytes of their files when every file is NIfTI (self-contained; the worker reads them with
#: the reader local runs use); a case in other formats (.mhd, .nrrd may name further files) is read here and sent
#: as images.
BYTES_ENDINGS = (".nii", ".nii.gz")
#: A case whose files are larger than this together is not sent (a BraTS case is about 11 MB of .nii.gz).
MAX_CASE_BYTES = 2 * 1024**3
#: Test hook (tests only): a worker creates this file (with its process id) when it is inside a case, and stops
#: itself (SIGSTOP), so that a test can kill it there; only the first worker that creates the file stops.
TEST_WORKER_STOP_ENV = "BRATS_ENSEMBLE_TEST_WORKER_STOP"
#: Names of a Result's uncertainty maps (pipeline.segment_case); write_result needs the names even when the maps
#: are not written (with --overwrite it removes an earlier run's maps).
UNCERTAINTY_MAPS = ("disagreement", "entropy")


class ClusterError(BraTSEnsembleError):
    """The cluster cannot run the cohort: Ray missing, no cluster at the address, no worker, a worker with other
    models."""


# ----------------------------------------------------------------------------------------------------------------
# Command-line options


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """``--cluster``, ``--cpus-per-worker`` and ``--workers`` of ``batch``."""
    group = parser.add_argument_group("cluster (needs `pip install brats-ensemble[cluster]`, see docs/cluster.md)")
    group.add_argument("--cluster", metavar="auto|ADDRESS",
                       help="run the cohort on Ray: auto starts a Ray instance on this machine for the run; "
                            "HOST:PORT (printed by `ray start --head`) or ray://HOST:PORT joins a running cluster")
    group.add_argument("--cpus-per-worker", type=_positive_int, metavar="N",
                       help="where the cluster has no GPU (or with --device cpu): one worker per N CPU cores of "
                            f"each node (default {DEFAULT_CPUS_PER_WORKER}, at most the largest node's cores)")
    group.add_argument("--workers", type=_positive_int, metavar="N",
                       help="at most N workers (default: one per GPU, else one per --cpus-per-worker cores)")


def check_cluster_options(args: argparse.Namespace) -> None:
    """Refuse --workers / --cpus-per-worker without --cluster (they would silently do nothing)."""
    given = [name for name, value in (("--workers", getattr(args, "workers", None)),
                                      ("--cpus-per-worker", getattr(args, "cpus_per_worker", None))) if value]
    if getattr(args, "cluster", None) is None and given:
        raise ClusterError(f"{', '.join(given)} only apply to a run on a cluster: add --cluster auto (a Ray "
                           "instance on this machine) or --cluster ADDRESS, or leave them out.")


# ----------------------------------------------------------------------------------------------------------------
# What travels: a case to a worker, a result back


@dataclass
class CasePayload:
    """One case as the driver sends it: ``files`` (role → (path as the driver names it, the file's bytes)) when
    every file is NIfTI, else ``case`` (the images as read by the driver)."""

    case_id: str
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    case: Case | None = None

    @property
    def size(self) -> int:
        return sum(len(data) for _, data in self.files.values())


def read_payload(case: PlannedCase) -> CasePayload:
    """Read a case's files for a worker. The bytes sent must be the bytes the run fingerprinted: a file changed
    since the run started is refused (its result would record another image's fingerprint)."""
    files = in_role_order(case.spec.files)
    if not all(str(path).lower().endswith(BYTES_ENDINGS) for path in files.values()):
        return CasePayload(case.case_id, case=case_from_files(case.case_id, files))
    check_distinct_files(files)
    sizes = {}
    for role, path in files.items():
        try:
            sizes[role] = Path(path).stat().st_size
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc.strerror or exc}). Check the file and its "
                             "permissions.") from exc
    if sum(sizes.values()) > MAX_CASE_BYTES:
        raise InputError(f"{case.spec.folder}: its files hold {sum(sizes.values()) / 1024**3:.1f} GiB, more than a "
                         f"case sent to a worker may ({MAX_CASE_BYTES / 1024**3:.0f} GiB); check that they are "
                         "the case's images, or segment it with a local `batch`.")
    contents = {}
    for role, path in files.items():
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc.strerror or exc}). Check the file and its "
                             "permissions.") from exc
        if hashlib.sha256(data).hexdigest() != case.fingerprint["inputs"].get(role):
            raise InputError(f"{path}: changed while this run was going on (its content is not the one the run "
                             "fingerprinted at its start). Rerun when the cohort's files no longer change.")
        contents[role] = (str(path), data)
    return CasePayload(case.case_id, contents)


def _geometry(image: sitk.Image) -> tuple[tuple, tuple, tuple, tuple]:
    return image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def _reference_image(geometry: Sequence[Sequence[float]]) -> sitk.Image:
    """An image with a result's grid (size, origin, spacing, direction): all that writing the result takes from
    the case's reference image (write_array_image copies its information)."""
    size, origin, spacing, direction = geometry
    image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple(direction))
    return image


# ----------------------------------------------------------------------------------------------------------------
# The worker (a Ray actor; the class itself needs no Ray)


#: Temporary folders of the case files a worker reads: ``<tmp>/brats-ensemble-case-<pid>-XXXX``.
CASE_FOLDER_PREFIX = "brats-ensemble-case-"


def _remove_folders_of_dead_workers() -> None:
    """A worker killed while it read a case leaves that case's temporary folder; the next worker on the node
    removes it."""
    for folder in Path(tempfile.gettempdir()).glob(CASE_FOLDER_PREFIX + "*"):
        pid = folder.name[len(CASE_FOLDER_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _one_worker_at_a_time() -> Iterator[None]:
    """The workers of one node build their model sets one after the other, so that the first downloads a
    manifest's archives into the node's cache and the others find them there (two processes downloading the same
    archive would write into the same partial file). An flock in the cache folder; none where it cannot be had."""
    from .downloads import default_cache_dir

    handle = None
    try:
        import fcntl

        folder = default_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".cluster-worker.lock", "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
    except (ImportError, OSError):  # Windows, or a cache folder that cannot be written: a download would say so
        pass
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the flock


class CaseWorker:
    """Loads the model set once (``model_factory()``, on this node: the same model paths, or the manifest's urls
    downloaded into this node's cache) and checks that its model files are the driver's (``models``, the models
    part of the run's fingerprint); then segments the cases it is sent. Problems are returned, never raised, so
    that the driver tells a case's own failure from a lost worker."""

    def __init__(self, model_factory: Callable[[], Any], models: Mapping[str, Any], device: str,
                 threads: int | None, cwd: str, stop_marker: str | None = None,
                 limits: Limits | None = None) -> None:
        self.limits = limits or Limits()  # the driver's --memory-budget / --allow-unusual-spacing
        self.info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "error": None}
        self.stop_marker = stop_marker
        self.model_set: Any = None
        self.device: Any = None
        try:
            _remove_folders_of_dead_workers()
            if cwd and os.path.isdir(cwd):
                os.chdir(cwd)  # model paths given relative to the driver's working folder
            if threads:
                import torch

                torch.set_num_threads(threads)
            self.device = resolve_device(device)
            with _one_worker_at_a_time():
                self.model_set = model_factory()
            own = model_set_fingerprint(self.model_set)
            if own != dict(models):
                differences = fingerprint_differences(case_fingerprint({}, models), case_fingerprint({}, own))
                self.info["error"] = ("its model set differs from the driver's: " + "; ".join(differences[:3]) +
                                      ". Every node needs the same model files (at the same paths, or the "
                                      "manifest's url and sha256).")
            self.info["device"] = str(self.device)
        except Exception as exc:  # reported to the driver, which stops the run naming this worker
            self.info["error"] = str(exc) if isinstance(exc, BraTSEnsembleError) else f"{type(exc).__name__}: {exc}"
            if cwd and not os.path.isdir(cwd):
                self.info["error"] += (f" (relative paths are taken from the driver's working folder {cwd}, which "
                                       "this node does not have: give absolute paths)")

    def ready(self) -> dict[str, Any]:
        """Who and where this worker is, and why it cannot work (``error``), if so."""
        return dict(self.info)

    def segment(self, payload: CasePayload, save_uncertainty: bool) -> dict[str, Any]:
        """Every field of the case's :class:`Result` but its reference image (``geometry`` instead), or ``{"error":
        message}`` for a case that cannot be segmented (bad input). All fields travel, so that the driver writes
        what a local run writes (the uncertainty maps only when they are asked for)."""
        try:
            with use_limits(self.limits):
                case = self._read(payload)
                self._stop_for_test()
                result = segment_case(case, self.model_set, self.device)
        except BraTSEnsembleError as exc:
            return {"error": str(exc)}
        maps = {name: result.uncertainty.get(name) for name in UNCERTAINTY_MAPS} if save_uncertainty else {}
        answer = {f.name: getattr(result, f.name) for f in fields(Result) if f.name != "reference"}
        return {**answer, "uncertainty": maps, "geometry": _geometry(result.reference)}

    def _read(self, payload: CasePayload) -> Case:
        """The case, read from its files' bytes by the reader local runs use (files written under their own names
        into a temporary folder, removed once read); messages and the recorded sources name the driver's paths."""
        if payload.case is not None:
            return payload.case
        folder = Path(tempfile.mkdtemp(prefix=f"{CASE_FOLDER_PREFIX}{os.getpid()}-"))
        try:
            local = {}
            for role, (original, data) in payload.files.items():
                local[role] = folder / Path(original).name
                local[role].write_bytes(data)
            try:
                case = case_from_files(payload.case_id, local)
            except InputError as exc:
                message = str(exc)
                for role, (original, _) in sorted(payload.files.items(), key=lambda kv: -len(str(local[kv[0]]))):
                    message = message.replace(str(local[role]), original)
                raise InputError(message) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        case.sources = {role: original for role, (original, _) in payload.files.items()}
        return case

    def _stop_for_test(self) -> None:
        if not self.stop_marker:
            return
        try:
            fd = os.open(self.stop_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode("ascii"))
        os.close(fd)
        os.kill(os.getpid(), signal.SIGSTOP)


# ----------------------------------------------------------------------------------------------------------------
# The cluster: connecting, and how many workers of which kind


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ClusterError("--cluster needs Ray: pip install 'brats-ensemble[cluster]' (on this machine and on "
                           "every node of the cluster, in the same version).") from exc
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    text = address.removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    """Fail fast (instead of Ray's minutes of retries) when nothing answers at the address. In HOST:PORT, Ray
    replaces 127.0.0.1/localhost with this machine's network address: the address Ray will use is the one tried."""
    parsed = _host_port(address)
    if parsed is None:
        raise ClusterError(f"--cluster {address}: not an address; give auto, HOST:PORT (as `ray start --head` "
                           "prints it) or ray://HOST:PORT.")
    host, port = parsed
    target = f"{host}:{port}"
    if not address.startswith("ray://"):
        with contextlib.suppress(Exception):
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address) or target
    target_host, _, target_port = target.rpartition(":")
    try:
        socket.create_connection((target_host.strip("[]"), int(target_port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        via = f" (Ray connects to {target} for it)" if target != f"{host}:{port}" else ""
        raise ClusterError(f"--cluster {address}: no Ray cluster answers there{via}: {exc.strerror or exc}. Start "
                           "one with `ray start --head` (it prints the address to give), or use --cluster auto for a "
                           "Ray instance on this machine.") from exc


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """Ray, connected to the cluster at ``address`` (``auto``: a Ray instance started here for the run), and
    disconnected (the instance stopped) at the end. The process's SIGINT/SIGTERM handlers stay as they were."""
    ray = import_ray()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR,
                               "namespace": "brats-ensemble"}
    try:
        if address == AUTO:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a cluster started here sends no usage data
            ray.init(address="local", include_dashboard=False, **options)
        else:
            _check_reachable(address)
            ray.init(address=address, **options)
    except ClusterError:
        raise
    except BaseException as exc:  # a half-started instance is stopped again, also on Ctrl-C
        with contextlib.suppress(Exception):
            ray.shutdown()
        if not isinstance(exc, Exception):
            raise
        lines = str(exc).strip().splitlines()
        raise ClusterError(f"--cluster {address}: Ray could not {'start' if address == AUTO else 'connect'} "
                           f"({type(exc).__name__}: {lines[0] if lines else ''}). Check that this machine has the "
                           "cluster's Ray and Python versions.") from exc
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)  # ray.init replaces SIGTERM's; ours turns it into a cancel
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM only set the returned event while the driver's loop runs (restored after). Raised
    asynchronously, a KeyboardInterrupt could land inside a Ray call and leave Ray's client unable to stop the
    workers (a run that then hangs on Ctrl-C); the loop checks the event at least once a second instead."""
    stop = threading.Event()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in handlers:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class WorkerLayout:
    """How many workers, and what each asks of the cluster: one GPU, or ``num_cpus`` cores used as torch
    threads."""

    count: int
    num_cpus: int
    num_gpus: int
    threads: int | None

    def describe(self) -> str:
        each = "one GPU each" if self.num_gpus else f"{self.num_cpus} CPU core(s) each"
        return f"{self.count} worker(s), {each}"


def worker_layout(nodes: Sequence[Mapping[str, Any]], device: str, cpus_per_worker: int | None = None,
                  max_workers: int | None = None) -> WorkerLayout:
    """One worker per GPU of the cluster's live nodes (``device`` auto or cuda), else one per ``cpus_per_worker``
    cores of each node (``device`` cpu, or no GPU), at most ``max_workers``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ClusterError(f"--device {device}: on a cluster use auto, cpu or cuda (each worker is given its own "
                           "GPU, which it sees as cuda).")
    resources = [node.get("Resources") or {} for node in nodes if node.get("Alive")]
    gpus = sum(int(r.get("GPU", 0)) for r in resources)
    if device == "cuda" and gpus == 0:
        raise ClusterError("--device cuda: the Ray cluster has no GPU. Use --device cpu or auto, or add GPU nodes "
                           "(`ray start --address … --num-gpus N`).")
    if device != "cpu" and gpus > 0:
        layout = WorkerLayout(gpus, 0, 1, None)
    else:
        cpus = [int(r.get("CPU", 0)) for r in resources]
        largest = max(cpus, default=0)
        if largest < 1:
            raise ClusterError("the Ray cluster has no CPU for a worker (no worker node connected, or every node "
                               "started with --num-cpus 0).")
        per = cpus_per_worker or min(DEFAULT_CPUS_PER_WORKER, largest)
        count = sum(c // per for c in cpus)
        if count == 0:
            raise ClusterError(f"--cpus-per-worker {per}: no node of the Ray cluster has {per} CPU cores (the "
                               f"largest has {largest}); pass --cpus-per-worker {largest} or less.")
        layout = WorkerLayout(count, per, 0, per)
    count = min(layout.count, max_workers) if max_workers else layout.count
    return WorkerLayout(count, layout.num_cpus, layout.num_gpus, layout.threads)


# ----------------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class _Task:
    """A claimed case (its lock held by this process) on its way to a worker."""

    case: PlannedCase
    lock: CaseLock
    replace: bool
    attempt: int = 1
    lost_on: set[int] = field(default_factory=set)


@dataclass
class _Worker:
    index: int
    actor: Any
    ref: Any = None  # the pending call: ready() while starting, segment() while busy
    task: _Task | None = None
    info: dict[str, Any] = field(default_factory=dict)
    state: str = "starting"  # starting | idle | busy | gone

    @property
    def name(self) -> str:
        return f"worker {self.index}" + (f" on {self.info['host']}" if self.info.get("host") else "")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


class ClusterRun:
    """One cohort on a cluster: the driver's loop. ``run()`` returns what :func:`cli.segment_planned` returns."""

    def __init__(self, planned: Sequence[PlannedCase], model_set: Any, model_factory: Callable[[], Any],
                 args: argparse.Namespace, progress: Callable[[ProgressEvent], None]) -> None:
        self.args, self.progress, self.model_factory = args, progress, model_factory
        self.out_dir: Path = args.output
        self.description = model_set.describe()  # model paths as this machine names them, as local batch records
        self.models = planned[0].fingerprint["models"] if planned else {}
        self.todo: deque[PlannedCase] = deque(planned)
        self.waiting: list[PlannedCase] = []
        self.announced: set[str] = set()
        self.ready: deque[_Task] = deque()
        self.workers: list[_Worker] = []
        self.results: dict[str, dict[str, Path]] = {}
        self.failures: list[str] = []
        self.ray: Any = None
        self.started_at = 0.0
        self.looked = 0.0  # when cases that another process computes were last looked at

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> tuple[dict[str, dict[str, Path]], list[str]]:
        """The loop; Ctrl-C and SIGTERM stop it between two steps (see :func:`_stop_requests`)."""
        with contextlib.ExitStack() as stack:
            stop = stack.enter_context(_stop_requests())
            stack.callback(self._release_all)
            while self.todo or self.waiting or self.ready or self._in_flight():
                if stop.is_set():
                    raise KeyboardInterrupt  # here, outside any Ray call: Ray's client stays usable to stop
                if self.ray is None:  # joined (or started) only when a case needs computing
                    task = self._claim_next()
                    if task is None:
                        if self.waiting:
                            time.sleep(WAIT_SECONDS)
                        continue
                    self.ready.append(task)
                    self.ray = stack.enter_context(ray_session(self.args.cluster))
                    stack.callback(self._stop_workers)
                    self._start_workers()
                self._dispatch()
                self._collect()
        return self.results, self.failures

    def _in_flight(self) -> bool:
        return any(worker.task is not None for worker in self.workers)

    def _claim_next(self) -> _Task | None:
        """The next case to compute (its lock taken), skipping done cases and setting aside busy ones."""
        if not self.todo and self.waiting and time.monotonic() - self.looked >= WAIT_SECONDS:
            self.looked = time.monotonic()
            self.todo.extend(self.waiting)
            self.waiting.clear()
        while self.todo:
            case = self.todo.popleft()
            try:
                claim = claim_case(self.out_dir, case, self.args.overwrite, self.args.save_uncertainty)
            except BraTSEnsembleError as exc:
                self._fail(case, exc)
                continue
            if claim.action == SKIP:
                self.progress(ProgressEvent("case-skipped", case.case_id, 1.0, claim.message))
                self.results[case.case_id] = {k: p for k, p in output_paths(self.out_dir, case.case_id).items()
                                              if p.is_file()}
            elif claim.action == BUSY:
                self.waiting.append(case)
                if case.case_id not in self.announced:
                    self.announced.add(case.case_id)
                    self.progress(ProgressEvent("case-waiting", case.case_id, 0.0, f"waiting: {claim.message}"))
            else:
                assert claim.lock is not None
                return _Task(case, claim.lock, claim.replace)
        return None

    def _fail(self, case: PlannedCase, exc: BaseException) -> None:
        self.failures.append(f"{case.spec.folder.name}: {exc}")
        self.progress(ProgressEvent("error", case.case_id, 1.0, str(exc)))
        print(f"error: {exc}", file=sys.stderr, flush=True)

    # -- workers --------------------------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        ray = self.ray
        layout = worker_layout(ray.nodes(), self.args.device, self.args.cpus_per_worker, self.args.workers)
        remote = ray.remote(max_restarts=WORKER_RESTARTS, max_task_retries=0)(CaseWorker)
        stop_marker = os.environ.get(TEST_WORKER_STOP_ENV)
        for index in range(1, layout.count + 1):
            actor = remote.options(num_cpus=layout.num_cpus, num_gpus=layout.num_gpus,
                                   scheduling_strategy="SPREAD").remote(
                self.model_factory, self.models, self.args.device, layout.threads, os.getcwd(), stop_marker,
                current_limits())
            self.workers.append(_Worker(index, actor, actor.ready.remote()))
        where = "a Ray instance on this machine" if self.args.cluster == AUTO else f"the Ray cluster at " \
            f"{self.args.cluster}"
        _note(f"running on {where}: {layout.describe()}")
        self.started_at = time.monotonic()

    def _stop_workers(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                self.ray.kill(worker.actor, no_restart=True)

    def _release_all(self) -> None:
        """Locks of cases not finished (a cancel, an error of the cluster): released, nothing was written."""
        for task in [*self.ready, *(w.task for w in self.workers if w.task is not None)]:
            task.lock.release()
        self.ready.clear()

    def _live(self) -> list[_Worker]:
        return [worker for worker in self.workers if worker.state != "gone"]

    def _dispatch(self) -> None:
        """Give every idle worker a case: first the cases whose worker was lost (on another worker when one is
        live), then new claims."""
        for worker in [w for w in self.workers if w.state == "idle"]:
            task = self._task_for(worker)
            while task is not None and not self._send(worker, task):
                task = self._task_for(worker)
        if not self._live():
            raise ClusterError("every worker of the cluster was lost (see the notes above); "
                               f"{len(self.ready) + len(self.todo) + len(self.waiting)} case(s) not done. "
                               "Rerun to compute them (done cases are kept).")

    def _task_for(self, worker: _Worker) -> _Task | None:
        others = [w for w in self._live() if w is not worker]
        for task in list(self.ready):
            if worker.index not in task.lost_on or not others:
                self.ready.remove(task)
                return task
        return self._claim_next()  # a case lost on this worker waits for another one

    def _send(self, worker: _Worker, task: _Task) -> bool:
        try:
            payload = read_payload(task.case)
        except BraTSEnsembleError as exc:
            task.lock.release()
            self._fail(task.case, exc)
            return False
        worker.task, worker.state = task, "busy"
        worker.ref = worker.actor.segment.remote(payload, self.args.save_uncertainty)
        again = f", attempt {task.attempt}" if task.attempt > 1 else ""
        self.progress(ProgressEvent("case-start", task.case.case_id, 0.0, f"{worker.name}{again}"))
        return True

    def _collect(self) -> None:
        """Wait (at most WAIT_SECONDS) for a worker's answer and handle every answer there is."""
        pending = {worker.ref: worker for worker in self.workers if worker.ref is not None}
        if not pending:
            time.sleep(WAIT_SECONDS if self.waiting else 0.05)
            return
        done, _ = self.ray.wait(list(pending), num_returns=1, timeout=WAIT_SECONDS)
        for ref in done:
            worker = pending[ref]
            worker.ref = None
            if worker.state == "starting":
                self._on_ready(worker, ref)
            else:
                self._on_result(worker, ref)
        if not any(w.state in ("idle", "busy") for w in self.workers) and self.started_at and \
                time.monotonic() - self.started_at > 60:
            self.started_at = 0.0
            _note("no worker has started after a minute; the cluster's CPUs/GPUs may be taken by another job")

    def _on_ready(self, worker: _Worker, ref: Any) -> None:
        exceptions = self.ray.exceptions
        try:
            info = self.ray.get(ref)
        except exceptions.ActorUnavailableError:
            worker.ref = worker.actor.ready.remote()  # restarting: ask again
            return
        except exceptions.RayActorError as exc:
            worker.state = "gone"
            _note(f"{worker.name} could not be started again ({_first_line(exc)}); "
                  f"{len(self._live())} worker(s) left")
            return
        worker.info = info
        if info.get("error"):
            raise ClusterError(f"{worker.name} (process {info.get('pid')}) cannot work: {info['error']}")
        worker.state = "idle"

    def _on_result(self, worker: _Worker, ref: Any) -> None:
        task, worker.task = worker.task, None
        assert task is not None
        try:
            self._handle_result(worker, task, ref)
        except BaseException:  # a cancel or an error of the cluster while this case was handled
            task.lock.release()
            raise

    def _handle_result(self, worker: _Worker, task: _Task, ref: Any) -> None:
        exceptions = self.ray.exceptions
        try:
            answer = self.ray.get(ref)
        except (exceptions.RayActorError, exceptions.ObjectLostError) as exc:
            self._lost(worker, task, exc)
            return
        except exceptions.RayTaskError as exc:  # not a user's problem: a bug or a crash in a library
            worker.state = "idle"
            task.lock.release()
            self._fail(task.case, ClusterError(f"{task.case.spec.folder}: {worker.name} failed on this case: "
                                               f"{_first_line(exc.cause if exc.cause is not None else exc)}"))
            return
        worker.state = "idle"
        self._dispatch()  # the worker gets its next case before this one is written
        if "error" in answer:
            task.lock.release()
            self._fail(task.case, InputError(answer["error"]))
            return
        try:
            with task.lock:
                paths = self._write(task, answer)
        except BraTSEnsembleError as exc:
            self._fail(task.case, exc)
            return
        self.results[task.case.case_id] = paths
        self.progress(ProgressEvent("written", task.case.case_id, 1.0,
                                    f"{paths['labels']} and {paths['statistics'].name}"))

    def _lost(self, worker: _Worker, task: _Task, exc: BaseException) -> None:
        """The worker died inside the case (process killed, node lost): the case goes to another worker, and Ray
        starts the worker again (``ready()`` answers when it is back)."""
        task.lost_on.add(worker.index)
        task.attempt += 1
        reason = _first_line(exc)
        if task.attempt > MAX_ATTEMPTS:
            task.lock.release()
            self._fail(task.case, ClusterError(
                f"{task.case.spec.folder}: {MAX_ATTEMPTS} workers were lost while computing this case (the last: "
                f"{worker.name}, {reason}). The case may need more memory than a worker has: give the workers more "
                "(fewer workers per node, --cpus-per-worker) or segment it with a local `batch`."))
        else:
            self.ready.appendleft(task)
            self.progress(ProgressEvent("case-retry", task.case.case_id, 0.0,
                                        f"{worker.name} was lost during the case; it goes to another worker"))
        _note(f"{worker.name} was lost during case {task.case.case_id} ({reason})")
        worker.state = "starting"
        worker.ref = worker.actor.ready.remote()

    def _write(self, task: _Task, answer: dict[str, Any]) -> dict[str, Path]:
        """The worker's result written as local batch writes it; the model set as this machine describes it (its
        paths), the case's fingerprint, folder and id source from the plan."""
        provenance = dict(answer["provenance"])
        provenance.update(self.description)
        provenance.update(result_provenance(task.case))
        maps = answer["uncertainty"] or dict.fromkeys(UNCERTAINTY_MAPS)  # names only: see UNCERTAINTY_MAPS
        result = Result(**{f.name: answer[f.name] for f in fields(Result) if f.name != "reference"},
                        reference=_reference_image(answer["geometry"]))
        result.case_id, result.provenance, result.uncertainty = task.case.case_id, provenance, maps
        return write_result(result, self.out_dir, overwrite=task.replace, save_uncertainty=self.args.save_uncertainty)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def run_on_cluster(planned: Sequence[PlannedCase], model_set: Any, model_factory: Callable[[], Any],
                   args: argparse.Namespace, progress: Callable[[ProgressEvent], None]
                   ) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """Compute every planned case not done yet on the cluster ``args.cluster`` (see :class:`ClusterRun`); the
    cluster is joined (or started) only when a case needs computing. ``model_factory()`` builds the model set on a
    worker (it must be picklable: a module-level function, or a partial of one)."""
    return ClusterRun(planned, model_set, model_factory, args, progress).run()
