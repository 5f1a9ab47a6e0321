"""Cohorts: which sub-folders are cases, each case's id (unique within a run), and whether each case is to be
computed, skipped (done with the same fingerprint) or refused — decided for the whole cohort before any work.

Case ids: a case's id comes from its file names (``<id>-t1c.nii.gz``, ``<id>_0000.nii.gz`` …) unless another case
folder of the run gives the same id (two patients exported as ``img_0000.nii.gz`` …, copies of one case): then
each of those cases takes its folder's name. Two cases that would still write the same files (compared without
regard to letter case, as macOS and Windows file systems do) are refused, naming both folders.

Used by the command line (``predict``, ``batch``) and meant for any other driver of cohorts (a cluster driver, a
server): see docs/batch.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .case import strip_image_ending
from .errors import BraTSEnsembleError, InputError, OutputError
from .results import (DONE, FOREIGN, NEW, STALE, CaseLock, CaseState, LockOwner, case_fingerprint, case_file_names,
                      case_state, completed_results, input_fingerprint, is_output_folder, lock_owner, lock_path,
                      recover_interrupted, try_lock_case)

ID_FROM_FILES, ID_FROM_FOLDER = "file names", "folder name"


@dataclass(frozen=True)
class CaseSpec:
    """One case of a run: its folder, its id (unique within the run) and where the id came from, its files."""

    folder: Path
    case_id: str
    files: Mapping[str, Path]
    id_from: str = ID_FROM_FILES
    file_id: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Finding cases


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def find_case_folders(cohort_dir: Path, output_dir: Path | None = None) -> list[Path]:
    """Sub-folders of a cohort folder that may be cases, sorted: not hidden, not the output folder (nor a folder on
    the way to it), not a folder holding results of this tool. A cohort without any is an InputError."""
    if not cohort_dir.is_dir():
        raise InputError(f"{cohort_dir}: not a folder. Give a folder that holds one sub-folder per case.")
    output = output_dir.expanduser().resolve() if output_dir is not None else None
    folders = []
    for path in sorted(cohort_dir.iterdir()):
        if not path.is_dir() or path.name.startswith("."):
            continue
        if output is not None and _inside(output, path.resolve()):
            _check_not_a_case_folder(path, output, output_dir)
            continue  # the output folder, or a folder that holds it
        if is_output_folder(path):
            continue  # results of an earlier run with another output folder
        folders.append(path)
    if not folders:
        raise InputError(f"{cohort_dir}: holds no case folders (one sub-folder per case, e.g. BraTS-GLI-00001-000/)")
    return folders


def _check_not_a_case_folder(folder: Path, output: Path, given: Path) -> None:
    """Refuse an output folder that is (or lies inside) a case folder: that case would silently not be segmented.
    A folder with image files directly in it is a case folder unless it holds results of this tool."""
    images = [p.name for p in folder.iterdir() if p.is_file() and strip_image_ending(p.name) is not None]
    if images and not (folder.resolve() == output and is_output_folder(folder)):
        raise InputError(f"{given}: the output folder is {'' if folder.resolve() == output else 'inside '}the case "
                         f"folder {folder} (it holds {images[0]}); choose an output folder outside the case folders, "
                         "e.g. COHORT_DIR/results.")


def assign_case_ids(found: Sequence[tuple[Path, str, Mapping[str, Path]]]) -> list[CaseSpec]:
    """Case ids for ``(folder, id from the file names, files)`` of each case of a run: the file names' id, or the
    folder's name where several folders give the same one. Raises InputError, naming both folders, when two cases
    would still write the same files."""
    counts: dict[str, int] = {}
    for _, file_id, _ in found:
        counts[file_id.casefold()] = counts.get(file_id.casefold(), 0) + 1
    cases = [CaseSpec(folder, folder.name, dict(files), ID_FROM_FOLDER, file_id)
             if counts[file_id.casefold()] > 1 else CaseSpec(folder, file_id, dict(files), ID_FROM_FILES, file_id)
             for folder, file_id, files in found]
    check_distinct_outputs(cases)
    return cases


def check_distinct_outputs(cases: Sequence[CaseSpec]) -> None:
    """Refuse two cases that would write a file of the same name (ignoring letter case)."""
    owners: dict[str, CaseSpec] = {}
    for case in cases:
        for name in case_file_names(case.case_id):
            first = owners.setdefault(name.casefold(), case)
            if first is not case:
                raise InputError(
                    f"{first.folder} and {case.folder}: both would be written as {name} (case ids "
                    f"{first.case_id!r} from their {first.id_from}, {case.case_id!r} from their {case.id_from}). "
                    "Rename one of the folders (or its files), or segment them into different output folders.")


def discover_cases(folders: Sequence[Path], discover: Callable[[Path], tuple[str, dict[str, Path]]]
                   ) -> tuple[list[CaseSpec], dict[Path, BraTSEnsembleError]]:
    """Cases of the folders (``discover(folder)`` gives the file names' id and the files by role) with their ids,
    and the folders whose files cannot be used (with the error)."""
    found, failures = [], {}
    for folder in folders:
        try:
            file_id, files = discover(folder)
        except BraTSEnsembleError as exc:
            failures[folder] = exc
            continue
        found.append((folder, file_id, files))
    return assign_case_ids(found), failures


# ----------------------------------------------------------------------------------------------------------------
# Deciding, before any work, what happens to each case


@dataclass
class PlannedCase:
    """A case with the fingerprint this run would give it and where it stood when the run started."""

    spec: CaseSpec
    fingerprint: dict[str, Any]
    state: CaseState = field(default_factory=lambda: CaseState(NEW))

    @property
    def case_id(self) -> str:
        return self.spec.case_id


def plan_cases(cases: Sequence[CaseSpec], models: Mapping[str, Any], out_dir: Path, save_uncertainty: bool = False
               ) -> tuple[list[PlannedCase], dict[Path, BraTSEnsembleError]]:
    """Fingerprint every case (its input files' content and ``models``, see
    :func:`~BraTSEnsembleLib.results.model_set_fingerprint`) and read where it stands in ``out_dir``. Returns the
    planned cases and the case folders whose files cannot be read (with the error)."""
    planned, unreadable = [], {}
    for case in cases:
        try:
            inputs = input_fingerprint(case.files)
        except OSError as exc:
            unreadable[case.folder] = InputError(f"{exc.filename or case.folder}: cannot be read "
                                                 f"({exc.strerror or exc}). Check the file and its permissions.")
            continue
        fingerprint = case_fingerprint(inputs, models)
        planned.append(PlannedCase(case, fingerprint, case_state(out_dir, case.case_id, fingerprint,
                                                                  save_uncertainty)))
    return planned, unreadable


def stale_fix(problems: Sequence[str]) -> str:
    """The fix for a result made otherwise: for other images (another patient under this id?) another output
    folder first; for other models or options the options of that run first."""
    if any("other content" in problem for problem in problems):
        return ("If this is another patient, choose another output folder; to recompute the case with these images, "
                "pass --overwrite.")
    return "Rerun with the options of that run, pass --overwrite to recompute, or choose another output folder."


def _other_settings_message(out_dir: Path, case: PlannedCase, owner: LockOwner) -> str:
    return (f"{out_dir}: case {case.case_id} is being computed by {owner.describe()} with other inputs, models or "
            "options. Let that run finish and rerun with its options, or choose another output folder.")


def check_before_work(out_dir: Path, planned: Sequence[PlannedCase], overwrite: bool) -> None:
    """Refuse the run, before any work, when a case's earlier result was made otherwise (stale), files under a
    case's names are not a complete result of this tool (foreign) — both unless ``overwrite`` —, another live run
    computes a case with other settings, or an earlier result of one of the run's case folders lies under another
    id. The message names the case, what differs and the fix; further cases are named after it."""
    problems: list[tuple[str, str]] = []  # (case id, message)
    for case in planned:
        owner = lock_owner(out_dir, case.case_id)
        if owner is not None and owner.fingerprint != case.fingerprint["sha256"]:
            problems.append((case.case_id, _other_settings_message(out_dir, case, owner)))
        elif owner is not None or overwrite or case.state.status in (NEW, DONE):
            continue
        elif case.state.status == STALE:
            problems.append((case.case_id, f"{out_dir / (case.case_id + '.json')}: case {case.case_id} "
                             f"({case.spec.folder}) was made otherwise: {'; '.join(case.state.problems)}. "
                             f"{stale_fix(case.state.problems)}"))
        elif case.state.status == FOREIGN:
            problems.append((case.case_id, f"{case.state.problems[0]} (case {case.case_id}, {case.spec.folder}). "
                             "Move it away, pass --overwrite to replace it, or choose another output folder."))
    problems += _results_under_other_ids(out_dir, planned)
    if problems:
        others = [case_id for case_id, _ in problems[1:]]
        more = (f" ({len(others)} more case(s): {', '.join(others[:5])}{', …' if len(others) > 5 else ''})"
                if others else "")
        raise OutputError(problems[0][1] + more)


def _results_under_other_ids(out_dir: Path, planned: Sequence[PlannedCase]) -> list[tuple[str, str]]:
    """Earlier results whose recorded case folder is a folder of this run that now gets another id (e.g. a
    patient added whose files give the same id): kept, they would count the patient twice in statistics.csv."""
    by_folder = {str(case.spec.folder.resolve()): case for case in planned}
    ids = {case.case_id for case in planned}
    problems = []
    for case_id, data in completed_results(out_dir).results.items():
        case = by_folder.get(str(data.get("case_folder")))
        if case is None or case_id == case.case_id or case_id in ids:
            continue
        names = [n for n in case_file_names(case_id) if (out_dir / n).exists()]
        problems.append((case.case_id,
            f"{out_dir / (case_id + '.json')}: an earlier result of {case.spec.folder}, which this run names "
            f"{case.case_id} (from its {case.spec.id_from}). Remove or move {', '.join(names)} (or choose another "
            "output folder); kept, the case would be counted twice in statistics.csv."))
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Claiming a case


RUN, SKIP, BUSY = "run", "skip", "busy"


@dataclass
class Claim:
    """What to do with a case now: ``run`` it (``lock`` held: compute, write, then release), ``skip`` it (done;
    ``message`` says by whom) or wait while it is ``busy`` (``owner`` computes it)."""

    action: str
    message: str = ""
    lock: CaseLock | None = None
    owner: LockOwner | None = None
    replace: bool = False


def _may_replace(case: PlannedCase, state: CaseState, overwrite: bool) -> bool:
    """--overwrite replaces what was there when the run started, not a result another run wrote meanwhile."""
    return overwrite and state.json_stamp == case.state.json_stamp


def claim_case(out_dir: Path, case: PlannedCase, overwrite: bool = False, save_uncertainty: bool = False) -> Claim:
    """Skip a case done with this fingerprint, wait for one that a live process computes, else take its lock,
    delete what an interrupted run left, and run it. Raises OutputError when a result or lock of other settings
    appeared since the run started (another run on the same folder)."""
    state = case_state(out_dir, case.case_id, case.fingerprint, save_uncertainty)
    if state.status == DONE and not _may_replace(case, state, overwrite):
        return Claim(SKIP, _done_message(case, state))
    lock = try_lock_case(out_dir, case.case_id, case.fingerprint["sha256"])
    if lock is None:
        owner = lock_owner(out_dir, case.case_id)
        if owner is not None and owner.fingerprint != case.fingerprint["sha256"]:
            raise OutputError(_other_settings_message(out_dir, case, owner))
        where = lock_path(out_dir, case.case_id)
        return Claim(BUSY, f"computed by {owner.describe()} (lock {where}; if that process is gone, delete the "
                     "lock file)" if owner else f"locked ({where})", owner=owner)
    try:
        recover_interrupted(out_dir, case.case_id)
        state = case_state(out_dir, case.case_id, case.fingerprint, save_uncertainty)
        replace_ok = _may_replace(case, state, overwrite)
        if state.status == DONE and not replace_ok:
            lock.release()
            return Claim(SKIP, _done_message(case, state))
        if state.status in (STALE, FOREIGN) and not replace_ok:
            raise OutputError(f"{out_dir / (case.case_id + '.json')}: case {case.case_id} ({case.spec.folder}) was "
                              f"written meanwhile by another run with other settings: "
                              f"{'; '.join(state.problems)}. {stale_fix(state.problems)}")
        return Claim(RUN, lock=lock, replace=state.status != NEW)
    except BaseException:
        lock.release()
        raise


def _done_message(case: PlannedCase, state: CaseState) -> str:
    if state.json_stamp == case.state.json_stamp:
        return "done already"
    return "done by another run on this output folder"


def result_provenance(case: PlannedCase) -> dict[str, Any]:
    """What a result's JSON records about its case beyond the statistics: the fingerprint, the case folder and
    where the id came from (see docs/batch.md)."""
    return {"fingerprint": case.fingerprint, "case_folder": str(case.spec.folder.resolve()),
            "case_id_from": case.spec.id_from}


def with_case_id(case: Any, case_id: str) -> Any:
    """A :class:`~BraTSEnsembleLib.case.Case` under the run's id (the folder's name where the files' is shared)."""
    return case if case.case_id == case_id else replace(case, case_id=case_id)
