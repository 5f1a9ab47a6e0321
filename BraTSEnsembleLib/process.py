"""The ``brats-ensemble`` process as the Slicer module runs it: the command line, the JSON-lines progress it prints,
a runner that reads it without blocking and cancels by killing the whole process tree, and the small pure helpers
behind the module's input checks (case id, duplicate volumes, grids) and its dependency install.

Pure Python (no slicer/qt/vtk), so the module's logic is tested outside Slicer.
"""
from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .roles import BRATS2021_SUFFIXES, BRATS2023_SUFFIXES, BRATS_ROLES

CLI_MODULE = "BraTSEnsembleLib.cli"
CONSOLE_SCRIPT = "brats-ensemble"
DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu")
POSTPROCESS_RULES: tuple[str, ...] = ("none", "ratio-adaptive", "min-size", "et-to-netc")
CHECKPOINTS: tuple[str, ...] = ("final", "best")
PROGRESS_EVENTS: frozenset[str] = frozenset({
    "case-start", "member-start", "member-step", "member-done", "postprocess", "written", "case-skipped",
    "case-waiting", "error", "finished",
})
INPUT_ENDING = ".nii.gz"


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _folds_args(folds: str | int | Iterable[int | str] | None) -> list[str]:
    if folds is None:
        return []
    if isinstance(folds, str):
        items = folds.replace(",", " ").split()
    elif isinstance(folds, int):
        items = [str(folds)]
    else:
        items = [str(f).strip() for f in folds]
    if not items:
        return []
    if items == ["all"]:
        return ["--folds", "all"]
    if not all(re.fullmatch(r"\d+", item) for item in items):
        raise ValueError(f"folds must be 'all' or fold numbers such as '0 1 2', got {folds!r}")
    return ["--folds", *[str(int(item)) for item in items]]


def _postprocess_arg(postprocess: str | Sequence[str] | None) -> list[str]:
    if postprocess is None or postprocess == "" or postprocess == "default":
        return []
    rules = [r.strip() for r in (postprocess.split(",") if isinstance(postprocess, str) else postprocess)]
    rules = [r for r in rules if r]
    unknown = [r for r in rules if r not in POSTPROCESS_RULES]
    if unknown:
        raise ValueError(f"unknown postprocessing rule(s) {unknown}; choose from {', '.join(POSTPROCESS_RULES)}")
    if "none" in rules and len(rules) > 1:
        raise ValueError("postprocessing 'none' cannot be combined with other rules")
    return ["--postprocess", ",".join(rules)] if rules else []


def build_predict_command(
    case_dir: str | Path,
    out_dir: str | Path,
    models: str | Path | Sequence[str | Path],
    *,
    python: str | None = None,
    weights: Sequence[float] | None = None,
    device: str = "auto",
    postprocess: str | Sequence[str] | None = None,
    folds: str | int | Iterable[int | str] | None = None,
    checkpoint: str | None = None,
    mirroring: bool = True,
    tile_step: float | None = None,
    overwrite: bool = True,
    progress: bool = True,
    save_uncertainty: bool = False,
    trust: Sequence[str | Path] = (),
) -> list[str]:
    """The ``brats-ensemble predict`` argument list.

    ``python`` given: ``[python, -m, BraTSEnsembleLib.cli, predict, …]`` (what Slicer runs with PythonSlicer);
    otherwise the ``brats-ensemble`` console script. ``postprocess`` None/'default' and ``folds`` None leave the
    CLI's defaults. A single ``.json`` entry is a model-set manifest (``--model-set``): the manifest then decides
    weights, folds, checkpoint, mirroring, tile step and postprocessing, so those options are not passed.
    ``save_uncertainty`` adds ``--save-uncertainty`` (the maps :func:`uncertainty_map_path` names). ``trust`` adds
    ``--trust-checkpoint FILE`` for each file the user confirmed (e.g. a TorchScript file of the model list).
    Raises ValueError for values the CLI would refuse.
    """
    return _command("predict", case_dir, out_dir, models, python=python, weights=weights, device=device,
                    postprocess=postprocess, folds=folds, checkpoint=checkpoint, mirroring=mirroring,
                    tile_step=tile_step, overwrite=overwrite, progress=progress, save_uncertainty=save_uncertainty,
                    trust=trust)


def build_batch_command(cohort_dir: str | Path, out_dir: str | Path, models: str | Path | Sequence[str | Path],
                        *, overwrite: bool = False, **options: Any) -> list[str]:
    """The ``brats-ensemble batch`` argument list: every case folder under ``cohort_dir``, with the options of
    :func:`build_predict_command`. ``overwrite`` is off by default: the command line then resumes (a case whose
    result has the same fingerprint is skipped) and never replaces a result made from other inputs or models."""
    return _command("batch", cohort_dir, out_dir, models, overwrite=overwrite, **options)


def _command(subcommand: str, input_dir: str | Path, out_dir: str | Path,
             models: str | Path | Sequence[str | Path], *, python: str | None = None,
             weights: Sequence[float] | None = None, device: str = "auto",
             postprocess: str | Sequence[str] | None = None, folds: str | int | Iterable[int | str] | None = None,
             checkpoint: str | None = None, mirroring: bool = True, tile_step: float | None = None,
             overwrite: bool = True, progress: bool = True, save_uncertainty: bool = False,
             trust: Sequence[str | Path] = ()) -> list[str]:
    model_list = [models] if isinstance(models, (str, Path)) else list(models)
    model_list = [str(m) for m in model_list if str(m).strip()]
    if not model_list:
        raise ValueError("no model given: choose a model set (manifest or nnU-Net results folder)")
    if weights is not None and len(weights) not in (0, len(model_list)):
        raise ValueError(f"{len(weights)} weight(s) for {len(model_list)} model(s); give one weight per model")
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(device)):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    if checkpoint is not None and checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if tile_step is not None and not (0.0 < float(tile_step) <= 1.0):
        raise ValueError(f"tile step must be in (0, 1], got {tile_step}")
    args = [python, "-m", CLI_MODULE] if python else [CONSOLE_SCRIPT]
    args += [subcommand, str(input_dir), "-o", str(out_dir)]
    manifests = [m for m in model_list if m.lower().endswith(".json")]
    if manifests:
        if len(model_list) != 1:
            raise ValueError("a model-set manifest (.json) already lists its members: choose one manifest, or "
                             "results folders only")
        if weights:
            raise ValueError("weights of a model-set manifest are set in the manifest, not in the panel")
        return (args + ["--model-set", manifests[0], "--device", device] + _trust_args(trust)
                + _output_options(progress, overwrite, save_uncertainty))
    for model in model_list:
        args += ["--model", model]
    for weight in weights or []:
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"model weights must be finite and not negative, got {weight}")
        args += ["--weight", f"{w:g}"]
    args += ["--device", device]
    args += _postprocess_arg(postprocess)
    args += _folds_args(folds)
    if checkpoint is not None:
        args += ["--checkpoint", checkpoint]
    if not mirroring:
        args.append("--no-mirroring")
    if tile_step is not None:
        args += ["--tile-step", f"{float(tile_step):g}"]
    return args + _trust_args(trust) + _output_options(progress, overwrite, save_uncertainty)


def _trust_args(trust: Sequence[str | Path]) -> list[str]:
    """``--trust-checkpoint FILE`` for each file the user trusts (see :mod:`BraTSEnsembleLib.trust`)."""
    return [item for path in trust for item in ("--trust-checkpoint", str(path))]


def _output_options(progress: bool, overwrite: bool, save_uncertainty: bool = False) -> list[str]:
    """JSON-lines progress (what the module reads), replacing the results of an earlier run in the temp folder, and
    the uncertainty maps."""
    return ((["--progress", "json"] if progress else []) + (["--overwrite"] if overwrite else [])
            + (["--save-uncertainty"] if save_uncertainty else []))


# ----------------------------------------------------------------------------------------------------------------
# Progress


@dataclass(frozen=True)
class ProgressEvent:
    """One line of the CLI's ``--progress json`` output."""

    event: str
    case: str = ""
    fraction: float | None = None
    message: str = ""


def parse_progress_line(line: str | bytes) -> ProgressEvent | None:
    """Parse one stdout line; None for lines that are not a progress event (blank, log text, broken JSON).

    A line is an event when it is a JSON object whose ``event`` is a known event name; ``fraction`` is clamped to
    [0, 1] (None when missing or not a number), ``case``/``message`` become strings.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("event") not in PROGRESS_EVENTS:
        return None
    fraction = data.get("fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
        fraction = None
    else:
        fraction = min(1.0, max(0.0, float(fraction)))
    case = data.get("case")
    message = data.get("message")
    return ProgressEvent(
        event=str(data["event"]),
        case="" if case is None else str(case),
        fraction=fraction,
        message="" if message is None else str(message),
    )


@dataclass
class ProgressState:
    """What the module shows: overall fraction, a one-line status, and the errors/outputs reported so far."""

    fraction: float = 0.0
    status: str = ""
    member: str = ""
    errors: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    finished: bool = False

    def update(self, event: ProgressEvent) -> None:
        """Fold one event into the state (fractions never go backwards)."""
        if event.fraction is not None:
            self.fraction = max(self.fraction, event.fraction)
        if event.event == "member-start":
            self.member = event.message
        if event.event == "error":
            self.errors.append(event.message or "unknown error")
        elif event.event == "written":
            self.written.append(event.message)
        elif event.event == "case-skipped":
            self.skipped.append(event.case)
        elif event.event == "finished":
            self.finished = True
            self.fraction = 1.0
        if event.event == "member-step" and self.member and event.message \
                and not event.message.startswith(self.member):
            self.status = f"{self.member}: {event.message}"
        elif event.message:
            self.status = event.message

    @property
    def percent(self) -> int:
        return int(round(100 * self.fraction))


def error_message(returncode: int | None, stderr_lines: Sequence[str], state: ProgressState | None = None) -> str:
    """A readable reason for a failed run: the CLI's ``error: …`` lines first, then progress errors, then the tail
    of stderr (a traceback) — never just an exit code when there is more to say."""
    reported = [line.strip()[len("error:"):].strip() for line in stderr_lines if line.strip().startswith("error:")]
    if not reported and state is not None:
        reported = list(state.errors)
    if reported:
        return "\n".join(dict.fromkeys(reported))
    tail = [line.rstrip() for line in stderr_lines if line.strip()][-15:]
    if returncode is not None and returncode < 0:
        head = f"brats-ensemble was stopped by signal {-returncode}"
    else:
        head = f"brats-ensemble failed with exit code {returncode}"
    return head + (":\n" + "\n".join(tail) if tail else " and printed no error message")


# ----------------------------------------------------------------------------------------------------------------
# Running it


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill a process started by :class:`CliProcess` and every process it started.

    POSIX: the process leads its own session, so its group (nnU-Net's preprocessing/export workers included) is
    killed with SIGKILL, even when the leader has already exited. Windows: ``taskkill /T`` kills the tree.
    """
    if os.name == "nt":
        if proc.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.kill()


def follow_run(run: Any, timeout: float | None, interval: float, callback: Any, timeout_message: str) -> None:
    """Poll ``run`` (a local :class:`CliProcess` or a server's run: ``running``, ``poll()``, ``cancel()``) until it
    is done, passing each progress event to ``callback``; past ``timeout`` seconds cancel it and raise TimeoutError."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    while run.running:
        for event in run.poll():
            if callback is not None:
                callback(event)
        if deadline is not None and time.monotonic() > deadline:
            run.cancel()
            raise TimeoutError(timeout_message)
        time.sleep(interval)
    for event in run.poll():
        if callback is not None:
            callback(event)


class CliProcess:
    """The CLI in its own process group, stdout/stderr read by threads so that ``poll()`` never blocks.

    The Slicer module calls :meth:`poll` from a QTimer; the console API calls :meth:`wait`.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None):
        self.args = [str(a) for a in args]
        self.state = ProgressState()
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.cancelled = False
        self._queue: "queue.Queue[tuple[str, str | None]]" = queue.Queue()
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None, cwd=str(cwd) if cwd else None,
            text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        self._open = 2
        self._readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                         for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        try:
            for line in stream:
                self._queue.put((name, line.rstrip("\r\n")))
        finally:
            self._queue.put((name, None))

    def poll(self) -> list[ProgressEvent]:
        """Take the output read so far; return its progress events (state, stdout_lines, stderr_lines updated)."""
        events = []
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open -= 1
            elif name == "out":
                self.stdout_lines.append(line)
                event = parse_progress_line(line)
                if event is not None:
                    self.state.update(event)
                    events.append(event)
            else:
                self.stderr_lines.append(line)
        return events

    @property
    def running(self) -> bool:
        """True until the process has exited and all its output has been taken by :meth:`poll`."""
        return self.proc.poll() is None or self._open > 0 or not self._queue.empty()

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None, interval: float = 0.1, callback=None) -> int:
        """Block until done (console/batch use); ``callback(event)`` for each progress event."""
        follow_run(self, timeout, interval, callback, f"brats-ensemble did not finish within {timeout} s; it was "
                   "stopped")
        return int(self.proc.returncode)

    def cancel(self) -> None:
        """Kill the process tree and drain the output; safe to call more than once."""
        self.cancelled = True
        kill_process_tree(self.proc)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            pass
        for reader in self._readers:  # the pipes close when the whole group is gone: drain them completely
            reader.join(timeout=10)
        self.poll()

    @property
    def succeeded(self) -> bool:
        return not self.cancelled and self.proc.poll() == 0

    def failure_message(self) -> str:
        self.poll()
        return error_message(self.proc.poll(), self.stderr_lines, self.state)


def cli_environment(base: Mapping[str, str], library_parent: str | Path) -> dict[str, str]:
    """Environment for the CLI: ``base`` with ``library_parent`` (the folder holding ``BraTSEnsembleLib``) first on
    PYTHONPATH, unbuffered output, and UTF-8 I/O so progress lines arrive as they are printed."""
    env = dict(base)
    paths = [str(library_parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def python_executable(which=None) -> str:
    """The Python that runs the CLI: PythonSlicer inside Slicer (on PATH there), else this interpreter."""
    import shutil

    found = (which or shutil.which)("PythonSlicer")
    return found or sys.executable


# ----------------------------------------------------------------------------------------------------------------
# Inputs: case id, file names, duplicate volumes, grids


def _strip_role_suffix(name: str, other_roles: Iterable[str] = ()) -> str:
    lowered = name.lower()
    others = [f"{separator}{role}" for role in other_roles if role not in BRATS_ROLES for separator in "-_"]
    for suffix in sorted(list(BRATS2023_SUFFIXES) + list(BRATS2021_SUFFIXES) + others, key=len, reverse=True):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def sanitize_case_id(text: str) -> str:
    """A file-name-safe case id: letters, digits, '-', '_' and '.'; other runs become '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._-")
    return cleaned[:80]


def case_id_from_names(names: Mapping[str, str] | Iterable[str], fallback: str = "BraTSCase") -> str:
    """Case id for the volumes' names: 'BraTS-GLI-00001-000-t1c' → 'BraTS-GLI-00001-000'.

    The T1c name wins (results are on its grid); a BraTS/2021 role suffix is stripped, and with names by role the
    suffix of any other role given ('CTPhantom-00001-ct' as ``ct`` → 'CTPhantom-00001'). Names without one
    ('AX T1 POST GAD') give ``fallback`` (the module passes the patient's name when it knows it).
    """
    other_roles: list[str] = []
    if isinstance(names, Mapping):
        ordered = [names[r] for r in ("t1c", *BRATS_ROLES) if names.get(r)] + [v for v in names.values() if v]
        other_roles = [str(r) for r in names]
    else:
        ordered = [n for n in names if n]
    for name in ordered:
        stem = _strip_role_suffix(name, other_roles)
        if stem != name:
            case_id = sanitize_case_id(stem)
            if case_id:
                return case_id
    return sanitize_case_id(fallback) or "BraTSCase"


#: A role name other than BraTS's that may become part of a file name: lower-case letters and digits, starting with
#: a letter (what :func:`BraTSEnsembleLib.roles.channel_role` makes of a channel name such as "CT" or "ADC").
_GENERIC_ROLE = re.compile(r"[a-z][a-z0-9]{0,31}")
#: Suffixes the command line reads as something other than an image role (segmentations are skipped).
_NOT_IMAGE_ROLES = frozenset({"seg", "label", "labels", "mask"})


def input_file_name(case_id: str, role: str) -> str:
    """File name the module exports a role's volume to, as the command line reads it: BraTS 2023 naming
    (``<id>-t1c.nii.gz``) for the BraTS roles, ``<id>-<role>.nii.gz`` for another role a model names
    (``<id>-ct.nii.gz``). Refused (ValueError): a role that is not a plain lower-case name, one the library would
    read as another role ("flair" is t2f), or one read as a segmentation ("seg", "mask")."""
    from .roles import channel_role

    if role not in BRATS_ROLES:
        if (not isinstance(role, str) or not _GENERIC_ROLE.fullmatch(role) or role in _NOT_IMAGE_ROLES
                or channel_role(role) != role):
            raise ValueError(f"unusable role {role!r}: a role is t1n, t1c, t2w, t2f or a lower-case name of letters "
                             "and digits that names no BraTS sequence (such as ct or adc)")
    if not case_id or sanitize_case_id(case_id) != case_id:
        raise ValueError(f"unusable case id {case_id!r}: letters, digits, '.', '-' and '_' only")
    return f"{case_id}-{role}{INPUT_ENDING}"


def duplicate_roles(volume_ids: Mapping[str, str | None]) -> list[tuple[str, ...]]:
    """Groups of roles that were given the same volume (by node ID), e.g. ``[('t1n', 't1c')]``."""
    by_id: dict[str, list[str]] = {}
    for role, node_id in volume_ids.items():
        if node_id:
            by_id.setdefault(node_id, []).append(role)
    return [tuple(roles) for roles in by_id.values() if len(roles) > 1]


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid: size (i, j, k), spacing (mm), origin and 3×3 direction (row-major), any one frame."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def grid_differences(grid: Grid, reference: Grid, spacing_rtol: float = 1e-4, origin_atol: float = 1e-3,
                     direction_atol: float = 1e-4) -> list[str]:
    """What differs between two grids ('size', 'spacing', 'origin', 'direction'); tolerances as in case.py."""
    problems = []
    if tuple(grid.size) != tuple(reference.size):
        problems.append("size")
    if any(abs(a - b) > spacing_rtol * abs(b) for a, b in zip(grid.spacing, reference.spacing)):
        problems.append("spacing")
    if any(abs(a - b) > origin_atol for a, b in zip(grid.origin, reference.origin)):
        problems.append("origin")
    if any(abs(a - b) > direction_atol for a, b in zip(grid.direction, reference.direction)):
        problems.append("direction")
    return problems


def reference_role(roles: Iterable[str]) -> str | None:
    """The role whose grid the others must share and the result is placed on: t1c when given (the BraTS convention),
    else the first role in the order a case is read (BraTS roles first, then others as given: ``ct`` for a CT
    model). None when there is none."""
    ordered = sorted(dict.fromkeys(roles), key=lambda r: (BRATS_ROLES + (r,)).index(r))
    return "t1c" if "t1c" in ordered else (ordered[0] if ordered else None)


def grid_mismatches(grids: Mapping[str, Grid], reference_role: str = "t1c") -> dict[str, list[str]]:
    """Roles whose grid differs from the reference role's grid: ``{role: [what differs]}``."""
    if reference_role not in grids:
        return {}
    ref = grids[reference_role]
    out = {}
    for role, grid in grids.items():
        if role != reference_role:
            diff = grid_differences(grid, ref)
            if diff:
                out[role] = diff
    return out


@dataclass
class AutoAssignment:
    """Result of auto-assigning roles to volumes: ``assigned`` {role: node id}, names that suggest no role, and
    roles that more than one volume suggests (left for the user)."""

    assigned: dict[str, str]
    unmatched: list[str]
    ambiguous: dict[str, list[str]]

    def summary(self) -> str:
        parts = []
        if self.ambiguous:
            parts.append("; ".join(f"{role}: several candidates ({', '.join(names)})"
                                   for role, names in sorted(self.ambiguous.items())))
        missing = [r for r in BRATS_ROLES if r not in self.assigned]
        if missing:
            parts.append(f"not assigned: {', '.join(missing)}")
        if self.unmatched:
            parts.append(f"names matching no sequence: {', '.join(self.unmatched)}")
        return ". ".join(parts)


def auto_assign_volumes(names_by_id: Mapping[str, str]) -> AutoAssignment:
    """Assign the BraTS roles to volumes from their names (Slicer node names, DICOM series descriptions).

    Uses :func:`BraTSEnsembleLib.roles.assign_roles`; a role two volumes suggest is not guessed.
    """
    from .roles import assign_roles, role_from_text

    names = list(names_by_id.values())
    by_role = assign_roles(names)
    ids_by_name: dict[str, list[str]] = {}
    for node_id, name in names_by_id.items():
        ids_by_name.setdefault(name, []).append(node_id)
    assigned = {}
    for role, name in by_role.items():
        if role in BRATS_ROLES and len(ids_by_name[name]) == 1:
            assigned[role] = ids_by_name[name][0]
    candidates: dict[str, list[str]] = {}
    unmatched = []
    for name in names:
        role = role_from_text(name)
        if role is None:
            unmatched.append(name)
        elif role in BRATS_ROLES:
            candidates.setdefault(role, []).append(name)
    ambiguous = {role: found for role, found in candidates.items() if role not in assigned and len(found) > 1}
    ordered = {role: assigned[role] for role in BRATS_ROLES if role in assigned}
    return AutoAssignment(ordered, unmatched, ambiguous)


def find_demo(library_dir: str | Path, environ: Mapping[str, str] | None = None) -> tuple[Path, Path] | None:
    """The demo case folder and demo model set for the Slicer self-test, or None when they are not installed.

    Looked for, in order: environment variables ``BRATSENSEMBLE_DEMO_CASE`` and ``BRATSENSEMBLE_DEMO_MODELS``;
    the functions ``demo_case_folder()`` / ``demo_model_set()`` of ``BraTSEnsembleLib.demo`` when it has them;
    folders ``demo/case`` and ``demo/models`` beside the library files.
    """
    environ = os.environ if environ is None else environ
    case, models = environ.get("BRATSENSEMBLE_DEMO_CASE"), environ.get("BRATSENSEMBLE_DEMO_MODELS")
    if case and models and Path(case).is_dir() and Path(models).exists():
        return Path(case), Path(models)
    try:
        from . import demo

        case_fn, models_fn = getattr(demo, "demo_case_folder", None), getattr(demo, "demo_model_set", None)
        if callable(case_fn) and callable(models_fn):
            found_case, found_models = case_fn(), models_fn()
            if found_case and found_models and Path(found_case).is_dir() and Path(found_models).exists():
                return Path(found_case), Path(found_models)
    except Exception:  # a broken or half-installed demo package must not break the self-test's skip
        pass
    base = Path(library_dir) / "demo"
    if (base / "case").is_dir() and (base / "models").exists():
        return base / "case", base / "models"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Dependencies inside Slicer

#: Imports the module needs inside Slicer's Python (module name → pip package name), checked before the first run.
#: The CLI needs them all, and Slicer's own process imports most of them too: ``finishSegmentation`` reads the label
#: map (``case.read_image`` checks NIfTI voxels with nibabel) to write the ``.seg.nrrd``, and "Add from recipe"
#: imports the model-set code (scipy through the MedNeXt member).
REQUIRED_IMPORTS: dict[str, str] = {
    "torch": "torch", "nnunetv2": "nnunetv2", "cc3d": "connected-components-3d", "slicerio": "slicerio",
    "SimpleITK": "SimpleITK", "numpy": "numpy", "monai": "monai", "nibabel": "nibabel", "scipy": "scipy",
    "tqdm": "tqdm",
}

#: The oldest Python the library runs on (pyproject.toml ``requires-python``; nnunetv2 2.8 and monai 1.6 need it too)
#: and the oldest Slicer release that ships such a Python (Slicer 5.6 and 5.8 ship Python 3.9; 5.10 ships 3.12).
MINIMUM_PYTHON: tuple[int, int] = (3, 10)
MINIMUM_SLICER = "5.10"


def missing_imports(find_spec=None) -> list[str]:
    """Pip names of the :data:`REQUIRED_IMPORTS` that this Python cannot import."""
    import importlib.util

    find = find_spec or importlib.util.find_spec
    return [pip_name for module, pip_name in REQUIRED_IMPORTS.items() if find(module) is None]


def python_version_problem(version_info: Sequence[int] | None = None) -> str | None:
    """None when this Python can run the library, else what to do: the dependency installer asks this first, because
    on an older Slicer ``pip install`` would fail deep inside a package's metadata with no useful message."""
    version = tuple(version_info or sys.version_info)[:2]
    if version >= MINIMUM_PYTHON:
        return None
    have = ".".join(str(v) for v in version)
    need = ".".join(str(v) for v in MINIMUM_PYTHON)
    return (f"BraTS Ensemble needs 3D Slicer {MINIMUM_SLICER} or later: its Python packages (nnunetv2, monai) need "
            f"Python {need} or later, and this Slicer runs Python {have}. Install Slicer {MINIMUM_SLICER} or later "
            "from download.slicer.org, then install the BraTSEnsemble extension there; nothing was installed.")


# Packages that Slicer ships or installs its own way; never let pip replace them.
SLICER_PROVIDED: tuple[str, ...] = ("numpy", "simpleitk", "torch", "torchvision", "requests", "vtk")


def _requirement_name(line: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def requirements_to_install(requirements_text: str) -> list[str]:
    """The library's requirements (requirements.txt text) minus comments and the packages Slicer provides."""
    out = []
    for raw in requirements_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if _requirement_name(line) in SLICER_PROVIDED:
            continue
        out.append(line)
    return out


def project_dependencies(pyproject_text: str) -> list[str]:
    """``[project] dependencies`` of a pyproject.toml (the library's requirements, pins included)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11 (Slicer 5.6): the dependencies array is simple enough to read
        match = re.search(r"^dependencies\s*=\s*\[(.*?)\]", pyproject_text, re.S | re.M)
        if not match:
            raise ValueError("pyproject.toml has no [project] dependencies")
        return re.findall(r'"([^"]+)"', re.sub(r"#[^\n]*", "", match.group(1)))
    data = tomllib.loads(pyproject_text)
    try:
        return list(data["project"]["dependencies"])
    except KeyError as exc:
        raise ValueError("pyproject.toml has no [project] dependencies") from exc


def constraints_for_installed(installed: Mapping[str, str | None]) -> str:
    """A pip constraints file pinning what Slicer already has (``numpy==…``), so installing the requirements can
    never replace Slicer's numpy/SimpleITK/torch: pip then fails with a clear conflict instead."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()) if version)


# ----------------------------------------------------------------------------------------------------------------
# Batch outputs (no scene)


def list_case_folders(folder: str | Path) -> list[Path]:
    """Case folders under ``folder``: its sub-folders holding image files, or the folder itself if it holds them."""
    from .case import strip_image_ending

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")

    def has_images(path: Path) -> bool:
        return any(entry.is_file() and strip_image_ending(entry.name) is not None for entry in path.iterdir())

    if has_images(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and has_images(p))


#: The uncertainty maps ``predict --save-uncertainty`` writes (see :mod:`BraTSEnsembleLib.uncertainty`), and the one
#: the module shows: the normalised entropy of the fused probabilities, which (unlike the members' disagreement) is
#: informative for a single model too.
UNCERTAINTY_MAPS: tuple[str, ...] = ("disagreement", "entropy")
SHOWN_UNCERTAINTY_MAP = "entropy"


def uncertainty_map_path(out_dir: str | Path, case_id: str, kind: str = SHOWN_UNCERTAINTY_MAP) -> Path:
    """Where ``predict --save-uncertainty`` writes an uncertainty map: ``OUT_DIR/<id>_<kind>.nii.gz`` (float32,
    0 … 1, on the input grid)."""
    if kind not in UNCERTAINTY_MAPS:
        raise ValueError(f"unknown uncertainty map {kind!r}; choose one of {', '.join(UNCERTAINTY_MAPS)}")
    return Path(out_dir) / f"{case_id}_{kind}.nii.gz"


def finalize_case_outputs(out_dir: str | Path, case_id: str, include_derived: bool = False,
                          uncertainty: bool = False) -> dict[str, Path]:
    """After ``predict``: write ``<id>.seg.nrrd`` and ``<id>-statistics.csv`` beside the CLI's ``<id>.nii.gz`` and
    ``<id>.json``. Returns the paths by kind ('labels', 'json', 'segmentation', 'csv', 'lesions' (the CLI's
    per-lesion table, when there); with ``uncertainty``, also 'uncertainty': the map to show, which must have been
    asked for with ``--save-uncertainty``). For a model with its own label set (the JSON's ``label_set``), the
    segments are its classes."""
    from .labelsets import LabelSet
    from .segmentation import label_file_to_seg_nrrd, write_statistics_csv

    out_dir = Path(out_dir)
    labels = out_dir / f"{case_id}.nii.gz"
    stats_json = out_dir / f"{case_id}.json"
    expected = [labels, stats_json] + ([uncertainty_map_path(out_dir, case_id)] if uncertainty else [])
    for path in expected:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: brats-ensemble did not write it")
    summary = json.loads(stats_json.read_text(encoding="utf-8"))
    # A model with its own label set (e.g. one class "metastasis"): its classes become the segments.
    label_set = LabelSet.from_json(summary.get("label_set") if isinstance(summary, dict) else None, str(stats_json))
    seg = label_file_to_seg_nrrd(labels, out_dir / f"{case_id}.seg.nrrd", include_derived=include_derived,
                                 label_set=label_set)
    csv_path = write_statistics_csv(summary, out_dir / f"{case_id}-statistics.csv")
    outputs = {"labels": labels, "json": stats_json, "segmentation": seg, "csv": csv_path}
    lesions_csv = out_dir / f"{case_id}_lesions.csv"  # one row per lesion (brats-ensemble writes it)
    if lesions_csv.is_file():
        outputs["lesions"] = lesions_csv
    if uncertainty:
        outputs["uncertainty"] = uncertainty_map_path(out_dir, case_id)
    return outputs
