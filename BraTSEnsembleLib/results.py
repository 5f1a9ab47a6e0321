"""Results on disk: what made them (fingerprints), who is making them (per-case locks), when they are complete (the
JSON, renamed last, with a commit record for a run killed halfway), and which files of a folder are results.

Shared by ``predict``, ``batch`` and any other driver (a cluster driver, a server) that writes results into an
output folder that several processes may use at once. Layout of an output folder::

    <id>.nii.gz, <id>.json, [<id>_disagreement.nii.gz, <id>_entropy.nii.gz]   a case's results; done = JSON exists
    statistics.csv                                                           the cohort table (batch)
    .brats-ensemble/<id>.lock                                                a case being computed (pid, host)
    .brats-ensemble/<id>.commit.json                                         a case being renamed into place

See docs/batch.md for the rules; the functions here are small so that each driver can combine them.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .case import StagedFiles, write_csv, write_json
from .downloads import file_sha256
from .errors import ModelError, OutputError

#: Hidden folder inside an output folder: locks and commit records (it also marks the folder as an output folder).
STATE_DIR_NAME = ".brats-ensemble"
#: Version of the fingerprint's layout: a result with another version is not taken as done (it names the change).
FINGERPRINT_VERSION = 1
#: A JSON larger than this is not read as a result (results are a few kB; a huge file is someone else's).
MAX_RESULT_BYTES = 16 * 1024 * 1024
#: Test hook (tests only): the process stops itself (SIGSTOP) right after renaming the file of this name into place,
#: so that a test can kill it exactly between two renames.
TEST_STOP_AFTER_ENV = "BRATS_ENSEMBLE_TEST_STOP_AFTER"
#: Keys of a member's or the set's description that do not change labels (names, where the files lie: the files
#: enter the fingerprint by their content).
_NOT_LABEL_MEMBER_KEYS = frozenset({"name", "path", "url", "sha256"})
_NOT_LABEL_SET_KEYS = frozenset({"model_set", "recipe"})


# ----------------------------------------------------------------------------------------------------------------
# Names


def output_paths(out_dir: str | Path, case_id: str) -> dict[str, Path]:
    """Where a case's results go: ``<id>.nii.gz`` (labels), ``<id>.json`` (statistics), ``<id>_lesions.csv`` (one
    row per lesion) and, when asked for, the uncertainty maps ``<id>_disagreement.nii.gz`` and
    ``<id>_entropy.nii.gz``."""
    out = Path(out_dir)
    return {"labels": out / f"{case_id}.nii.gz", "statistics": out / f"{case_id}.json",
            "lesions": out / f"{case_id}_lesions.csv",
            "disagreement": out / f"{case_id}_disagreement.nii.gz", "entropy": out / f"{case_id}_entropy.nii.gz"}


def case_file_names(case_id: str) -> list[str]:
    """Every file name a case's results may have in the output folder (its lock and commit record are named
    after the id too, in the state folder)."""
    return [p.name for p in output_paths(".", case_id).values()]


def state_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / STATE_DIR_NAME


def lock_path(out_dir: str | Path, case_id: str) -> Path:
    return state_dir(out_dir) / f"{case_id}.lock"


def commit_record_path(out_dir: str | Path, case_id: str) -> Path:
    return state_dir(out_dir) / f"{case_id}.commit.json"


def is_output_folder(folder: str | Path) -> bool:
    """True for a folder this tool has written results into: it holds the hidden state folder, a
    ``statistics.csv`` or a result JSON."""
    folder = Path(folder)
    if (folder / STATE_DIR_NAME).is_dir() or (folder / "statistics.csv").is_file():
        return True
    return any(load_result(path)[0] is not None for path in folder.glob("*.json") if not path.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def input_fingerprint(files: Mapping[str, str | Path]) -> dict[str, str]:
    """``{role: SHA-256 of the file}``: the case's images by content (a moved folder keeps its fingerprint; a
    re-exported or edited image does not)."""
    return {role: file_sha256(Path(path)) for role, path in sorted(files.items())}


def member_files(member: Any) -> dict[str, Path]:
    """``{name: path}`` of every file a member reads to make its probabilities, named relative to its folder.

    nnU-Net v2 / U-Mamba: dataset.json, plans.json and the checkpoint of each fold used; MedNeXt: plans.pkl and
    each fold's checkpoint with its ``.model.pkl``; TorchScript / MONAI: the network file. A member class may say
    it itself with a ``fingerprint_files()`` method; anything else: every file under its folder.
    """
    custom = getattr(member, "fingerprint_files", None)
    if callable(custom):
        return {str(k): Path(v) for k, v in custom().items()}
    if hasattr(member, "checkpoints") and hasattr(member, "plans_path"):  # MedNeXt (an nnU-Net v1 folder)
        root = Path(member.model_dir)
        files = {"plans.pkl": Path(member.plans_path)}
        for checkpoint in member.checkpoints.values():
            for path in (Path(checkpoint), Path(checkpoint).with_name(Path(checkpoint).name + ".pkl")):
                if path.is_file():
                    files[path.relative_to(root).as_posix()] = path
        return files
    if hasattr(member, "model_dir") and hasattr(member, "checkpoint_name"):  # nnU-Net v2, U-Mamba
        root = Path(member.model_dir)
        names = ["dataset.json", "plans.json", *(f"fold_{f}/{member.checkpoint_name}" for f in member.folds)]
        return {name: root / name for name in names}
    path = getattr(member, "path", None)
    if path is not None and Path(path).is_file():  # TorchScript / MONAI network file
        return {Path(path).name: Path(path)}
    root = Path(member.describe()["path"])
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def model_set_fingerprint(model_set: Any) -> dict[str, Any]:
    """What the model set contributes to a result: every setting that changes labels (fusion, label rule,
    postprocessing; per member its framework, folds, checkpoint, mirroring, tile step, channels, weight, class
    weights …, from ``ModelSet.describe()`` without names and paths) and the SHA-256 of each member file.

    Each file is hashed once, however many members use it: call this once per run, not per case. The manifest
    enters through what it sets; its name, description and where the model folders lie do not change labels.
    """
    description = model_set.describe()
    hashes: dict[Path, str] = {}
    members = []
    for member, record in zip(model_set.members, description["members"]):
        files = {}
        for name, path in sorted(member_files(member).items()):
            key = Path(path).resolve()
            if key not in hashes:
                try:
                    hashes[key] = file_sha256(key)
                except OSError as exc:
                    raise ModelError(f"{key}: cannot be read ({exc.strerror or exc}); the model's files must be "
                                     "readable. Check the file and its permissions, or copy the model again.") from exc
            files[name] = hashes[key]
        settings = {k: v for k, v in record.items() if k not in _NOT_LABEL_MEMBER_KEYS}
        members.append({**settings, "files": files})
    return {**{k: v for k, v in description.items() if k not in _NOT_LABEL_SET_KEYS and k != "members"},
            "members": members}


def case_fingerprint(inputs: Mapping[str, str], models: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint recorded in a result's JSON: the inputs' and the models' parts with one digest over both
    (``sha256``) and one over the models part alone (``models_sha256``, to tell results of different model sets
    apart in a cohort table)."""
    body = {"version": FINGERPRINT_VERSION, "inputs": dict(inputs), "models": dict(models)}
    return {"version": FINGERPRINT_VERSION, "sha256": _digest(body), "models_sha256": _digest(dict(models)),
            "inputs": dict(inputs), "models": dict(models)}


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a SHA-256
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _changes(where: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in [*old, *(k for k in new if k not in old)]:
            if key not in new:
                found.append(f"{where}{key}: {_short(old[key])} → not set")
            elif key not in old:
                found.append(f"{where}{key}: not set → {_short(new[key])}")
            else:
                found += _changes(f"{where}{key}.", old[key], new[key])
        return found
    if old != new:
        return [f"{where.rstrip('.')}: {_short(old)} → {_short(new)}"]
    return []


def fingerprint_differences(recorded: Any, current: Mapping[str, Any]) -> list[str]:
    """What differs between a result's recorded fingerprint and this run's, in words (empty: the same)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return ["the result has no fingerprint (made by an earlier version of brats-ensemble)"]
    if recorded.get("version") != current["version"]:
        return [f"fingerprint format {recorded.get('version')} → {current['version']} (made by another version "
                "of brats-ensemble)"]
    if recorded["sha256"] == current["sha256"]:
        return []
    found = []
    old_inputs, new_inputs = recorded.get("inputs"), current["inputs"]
    if old_inputs != new_inputs:
        if isinstance(old_inputs, dict) and set(old_inputs) == set(new_inputs):
            roles = [r for r in new_inputs if old_inputs[r] != new_inputs[r]]
            if sorted(map(str, old_inputs.values())) == sorted(new_inputs.values()):
                found.append(f"input image(s) {', '.join(roles)}: the same files for other sequences "
                             "(--channel-names or the file names changed)")
            else:
                found.append(f"input image(s) {', '.join(roles)}: other content (another patient, or the images "
                             "changed)")
        else:
            found.append(f"input sequences {sorted(old_inputs or [])} → {sorted(new_inputs)}")
    old_models, new_models = recorded.get("models"), current["models"]
    if not isinstance(old_models, dict):
        return found + ["models: not recorded"]
    old_members, new_members = old_models.get("members"), new_models["members"]
    if not isinstance(old_members, list) or len(old_members) != len(new_members):
        found.append(f"models: {len(old_members) if isinstance(old_members, list) else '?'} → "
                     f"{len(new_members)} member(s)")
    else:
        for index, (old, new) in enumerate(zip(old_members, new_members)):
            found += _changes(f"member {index + 1} ", old, new)
    set_old = {k: v for k, v in old_models.items() if k != "members"}
    set_new = {k: v for k, v in new_models.items() if k != "members"}
    found += _changes("", set_old, set_new)
    return [line.replace(" files.", " file ") for line in found] or ["fingerprint digest differs"]


# ----------------------------------------------------------------------------------------------------------------
# Reading results


def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None), or (None, the reason it cannot be read) — never an exception."""
    try:
        size = path.stat().st_size
        if size > MAX_RESULT_BYTES:
            return None, f"{size} bytes, too large for a result"
        return json.loads(path.read_bytes().decode("utf-8")), None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"not readable as JSON ({type(exc).__name__})"


def result_problem(data: Any, path: Path) -> str | None:
    """Why ``data`` (read from ``path``) is not a complete result of this version of the tool; None when it is."""
    if not isinstance(data, dict) or data.get("case_id") != path.stem or not isinstance(data.get("regions"), dict):
        return "not a result of brats-ensemble"
    for region, values in data["regions"].items():
        if not isinstance(values, dict) or not all(
                isinstance(values.get(k), (int, float)) and not isinstance(values.get(k), bool)
                and math.isfinite(values[k]) for k in ("voxels", "volume_ml", "lesions")):
            return f"region {region!r} has no voxels/volume_ml/lesions"
    fingerprint = data.get("fingerprint")
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("sha256"), str):
        return "made by an earlier version of brats-ensemble (no fingerprint)"
    return None


def load_result(path: Path) -> tuple[dict | None, str | None]:
    """(result, None) for a complete result of this tool at ``path``, else (None, why not)."""
    data, problem = read_json_file(path)
    if problem is None:
        problem = result_problem(data, path)
    return (data, None) if problem is None else (None, problem)


@dataclass(frozen=True)
class CompletedResults:
    """The complete results of an output folder, and the ``.json`` files that are not (with the reason)."""

    results: dict[str, dict]
    ignored: list[tuple[Path, str]]


def completed_results(out_dir: str | Path) -> CompletedResults:
    """Every ``<id>.json`` of the folder that is a complete result of this tool (hidden and temporary files, other
    JSON and results of earlier versions are listed in ``ignored``, never raised)."""
    results: dict[str, dict] = {}
    ignored: list[tuple[Path, str]] = []
    folder = Path(out_dir)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        data, problem = load_result(path)
        if data is None:
            ignored.append((path, problem or "not a result"))
        else:
            results[data["case_id"]] = data
    return CompletedResults(results, ignored)


def write_statistics_table(out_dir: str | Path, name: str = "statistics.csv") -> tuple[Path | None, CompletedResults]:
    """``statistics.csv``: one row per complete result in the folder (none: no file, and an earlier one is left
    as it is). Returns the path and what was read, so that the caller can report the files left out."""
    from .stats import cohort_columns, cohort_rows

    found = completed_results(out_dir)
    if not found.results:
        return None, found
    rows = cohort_rows({case_id: data["regions"] for case_id, data in found.results.items()})
    return write_csv(rows, Path(out_dir) / name, cohort_columns(rows)), found


def model_sets_in(found: CompletedResults) -> int:
    """How many different model parts (model set and options) the complete results were made with."""
    return len({data["fingerprint"].get("models_sha256") for data in found.results.values()})


# ----------------------------------------------------------------------------------------------------------------
# Locks: one per case, created exclusively; a lock of a dead process on this host is taken over


@dataclass(frozen=True)
class LockOwner:
    """Who holds a case's lock: the process (id, host, start time) and the fingerprint it computes."""

    pid: int
    host: str
    started: str | None
    fingerprint: str
    token: str

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux: clock ticks since boot), to tell a reused process id apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def process_alive(pid: int, started: str | None = None) -> bool:
    """True when the process ``pid`` on this host runs (and, when ``started`` is known, is the same process)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    if _zombie(pid):
        return False
    now = _process_start(pid)
    return started is None or now is None or now == started


def _this_process(fingerprint: str) -> LockOwner:
    return LockOwner(os.getpid(), socket.gethostname(), _process_start(os.getpid()), fingerprint, uuid.uuid4().hex)


def read_lock(path: Path) -> LockOwner | None:
    """The owner recorded in a lock file; None when there is no lock. An unreadable lock reads as an owner with
    pid 0 (it is taken over, as a dead one, once it is older than a minute)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockOwner(int(data["pid"]), str(data["host"]), data.get("started"), str(data["fingerprint"]),
                         str(data["token"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return LockOwner(0, "?", None, "", "unreadable")


def lock_is_stale(owner: LockOwner, path: Path) -> bool:
    """A lock whose process is gone: a dead process on this host, or an unreadable lock older than a minute.
    Locks of other hosts are never taken as stale (their processes cannot be seen from here)."""
    if owner.token == "unreadable":
        try:
            return time.time() - path.stat().st_mtime > 60
        except OSError:
            return False
    return owner.host == socket.gethostname() and not process_alive(owner.pid, owner.started)


@contextlib.contextmanager
def _serialised(folder: Path) -> Iterator[None]:
    """One process at a time (per state folder) in the block: taking over a stale lock is read, check, delete,
    create; two processes doing it at once could both believe they hold the lock. POSIX: an flock on the folder
    itself (released by the kernel if the process dies), or — where a folder cannot be locked (NFS emulates flock
    with byte-range locks, which need a file open for writing) — on a file ``takeover`` in it; Windows: a byte
    lock on that file."""
    if os.name == "nt":
        import msvcrt

        with open(folder / "takeover", "a+b") as handle:
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            yield  # closing the file releases the lock
        return
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = os.open(folder / "takeover", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` only if it does not exist; a reader never sees it half-written (the content
    is written to a temporary file first and hard-linked; without hard links: O_EXCL and a write)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class CaseLock:
    """A held case lock; :meth:`release` (or leaving the ``with`` block) deletes it if it is still this one, and
    the state folder and the output folders that taking it created, when they are empty (a refused case leaves no
    folder behind)."""

    def __init__(self, path: Path, owner: LockOwner, created: Sequence[Path] = ()) -> None:
        self.path, self.owner, self.created = path, owner, list(created)

    def release(self) -> None:
        current = read_lock(self.path)
        if current is not None and current.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        for folder in [self.path.parent, *self.created]:
            try:
                folder.rmdir()  # only when empty: another process's lock or a result keeps it
            except OSError:
                break

    def __enter__(self) -> "CaseLock":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones this call created below ``folder``'s
    state folder, deepest first (the output folder and the folders above it that did not exist)."""
    missing = []
    probe = folder.parent
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot be created ({exc.strerror or exc}). Choose an output folder you "
                          "can write to.") from exc
    return missing


def try_lock_case(out_dir: str | Path, case_id: str, fingerprint: str) -> CaseLock | None:
    """Take the case's lock (``.brats-ensemble/<id>.lock``, created exclusively, holding this process's id, host
    and ``fingerprint``), taking over a stale one; None while another live process holds it."""
    path = lock_path(out_dir, case_id)
    owner = _this_process(fingerprint)
    text = json.dumps({"pid": owner.pid, "host": owner.host, "started": owner.started,
                       "fingerprint": fingerprint, "token": owner.token, "since": time.time()})
    created: list[Path] = []
    for _ in range(10):
        created = _make_folders(path.parent) or created
        try:
            if _create_exclusive(path, text):
                return CaseLock(path, owner, created)
        except FileNotFoundError:
            continue  # another process removed the empty state folder meanwhile
        except OSError as exc:
            raise OutputError(f"{path}: cannot be created ({exc.strerror or exc}). Choose an output folder you can "
                              "write to.") from exc
        holder = read_lock(path)
        if holder is None:
            continue  # released meanwhile
        if not lock_is_stale(holder, path):
            return None
        with _serialised(path.parent):
            again = read_lock(path)
            if again is not None and again.token == holder.token and lock_is_stale(again, path):
                path.unlink(missing_ok=True)
    return None


def lock_owner(out_dir: str | Path, case_id: str) -> LockOwner | None:
    """The live owner of the case's lock; None when nobody (or only a dead process) holds it."""
    path = lock_path(out_dir, case_id)
    owner = read_lock(path)
    return None if owner is None or lock_is_stale(owner, path) else owner


# ----------------------------------------------------------------------------------------------------------------
# Completion: a case is done exactly when its JSON exists


def _stop_for_test(path: Path) -> None:
    if os.environ.get(TEST_STOP_AFTER_ENV) == path.name and hasattr(signal, "SIGSTOP"):
        os.kill(os.getpid(), signal.SIGSTOP)


def commit_case_files(staged: StagedFiles, out_dir: str | Path, case_id: str,
                      remove: Sequence[Path] = ()) -> list[Path]:
    """Put a case's staged files in place, the JSON last, and delete ``remove`` (an earlier result's JSON and
    maps, with ``--overwrite``) first.

    Before anything is renamed, a commit record (``.brats-ensemble/<id>.commit.json``) lists the SHA-256 of every
    file that may lie under the case's names while this runs (the new files and the ones they replace). A process
    killed halfway leaves the record; the next run (:func:`recover_interrupted`) deletes exactly the files that
    match it. Only the record's owner may call this (hold the case's lock).
    """
    out = Path(out_dir)
    accepted: dict[str, list[str]] = {}
    for tmp, final in staged.pending:
        accepted.setdefault(final.name, []).append(file_sha256(tmp))
    for name in case_file_names(case_id):
        digest = _content_hash(out / name) if (out / name).is_file() else None
        if digest is not None:
            accepted.setdefault(name, []).append(digest)
    record = commit_record_path(out, case_id)
    write_json({"case_id": case_id, "pid": os.getpid(), "host": socket.gethostname(), "files": accepted}, record)
    # From here until the record is deleted, an interruption leaves files that the record explains (a failure or
    # a cancel rolls the renames back; only a killed process leaves a half-renamed set).
    for path in sorted(remove, key=lambda p: p.suffix != ".json"):  # the JSON first: no longer done
        path.unlink(missing_ok=True)
    done = staged.commit(on_renamed=_stop_for_test)
    record.unlink(missing_ok=True)
    return done


def _content_hash(path: Path) -> str | None:
    """SHA-256 of a file, None when it cannot be read (then it matches no record: it is left alone)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _temporary_files(out_dir: Path, case_id: str) -> list[Path]:
    """Temporary files that :class:`~BraTSEnsembleLib.case.StagedFiles` makes for the case's names."""
    found = []
    for name in case_file_names(case_id):
        found += [p for p in out_dir.glob(f".{glob.escape(name)}.*.partial*") if p.is_file()]
    return found


def recover_interrupted(out_dir: str | Path, case_id: str) -> list[Path]:
    """Delete what an interrupted run of this tool left of the case (hold its lock): its temporary files, and —
    when a commit record is there and the JSON is not — the files under the case's names whose content the record
    lists. A file under those names that the record does not list is left alone (it is not ours). Returns the
    deleted files."""
    out = Path(out_dir)
    removed = _temporary_files(out, case_id)
    record_path = commit_record_path(out, case_id)
    if record_path.is_file():
        record, _ = read_json_file(record_path)
        files = record.get("files") if isinstance(record, dict) else None
        if isinstance(files, dict) and not output_paths(out, case_id)["statistics"].exists():
            for name in case_file_names(case_id):
                path = out / name
                hashes = files.get(name)
                if isinstance(hashes, list) and path.is_file() and _content_hash(path) in hashes:
                    removed.append(path)
        removed.append(record_path)
    for path in removed:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"{path}: left by an interrupted run, cannot be deleted ({exc.strerror or exc}). "
                              "Delete it, or choose another output folder.") from exc
    return [p for p in removed if p != record_path]


def interrupted_files(out_dir: str | Path, case_id: str) -> list[Path]:
    """Files under the case's result names that a commit record shows an interrupted run of this tool left (they
    are replaced by the next run); empty without a record or when the JSON exists."""
    out = Path(out_dir)
    record, _ = read_json_file(commit_record_path(out, case_id))
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or output_paths(out, case_id)["statistics"].exists():
        return []
    return [out / name for name in case_file_names(case_id)
            if (out / name).is_file() and isinstance(files.get(name), list)
            and _content_hash(out / name) in files[name]]


# ----------------------------------------------------------------------------------------------------------------
# Where a case stands in an output folder

NEW, DONE, STALE, FOREIGN = "new", "done", "stale", "foreign"


@dataclass(frozen=True)
class CaseState:
    """Where a case stands: ``new`` (nothing of it, or only what an interrupted run left), ``done`` (a complete
    result with this fingerprint), ``stale`` (a complete result made otherwise: ``problems`` says how) or
    ``foreign`` (files under its names that are not a complete result of this tool). ``json_stamp`` identifies
    the JSON file that was there (to tell a result written meanwhile by another process)."""

    status: str
    problems: tuple[str, ...] = ()
    json_stamp: tuple[int, int, int] | None = None
    result: dict | None = None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_ino, status.st_mtime_ns, status.st_size)


def case_state(out_dir: str | Path, case_id: str, fingerprint: Mapping[str, Any],
               save_uncertainty: bool = False) -> CaseState:
    """Where the case stands in ``out_dir`` for a run with ``fingerprint`` (see :class:`CaseState`)."""
    paths = output_paths(out_dir, case_id)
    json_path = paths["statistics"]
    stamp = _stamp(json_path)
    if stamp is not None:
        data, problem = load_result(json_path)
        if data is None:
            return CaseState(FOREIGN, (f"{json_path}: is not a complete result of this version of brats-ensemble "
                                       f"({problem})",), stamp)
        differences = fingerprint_differences(data["fingerprint"], fingerprint)
        missing = [name for key, name in data.items() if key.endswith("_file") and isinstance(name, str)
                   and not (Path(out_dir) / Path(name).name).is_file()]
        if missing:
            differences.append(f"its file(s) {', '.join(missing)} are missing")
        if save_uncertainty and not data.get("disagreement_file"):
            differences.append("it was made without --save-uncertainty (no uncertainty maps)")
        return CaseState(STALE if differences else DONE, tuple(differences), stamp, data)
    present = [p for key, p in paths.items() if key != "statistics" and p.exists()]
    unexplained = [p for p in present if p not in interrupted_files(out_dir, case_id)]
    if unexplained:
        return CaseState(FOREIGN, (f"{unexplained[0]}: exists, but {json_path.name} does not: it is not a complete "
                                   "result of a run of this tool",))
    return CaseState(NEW)
