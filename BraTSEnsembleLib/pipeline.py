"""The one entry that the command line, the Slicer module and the Python console call: :func:`segment_case`.

case → each member's probabilities (one member in memory at a time) → weighted fusion → labels → postprocessing →
statistics. Progress is reported as :class:`ProgressEvent` objects; a ``cancel`` callable is checked between steps.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .case import Case, StagedFiles, write_csv, write_json, write_label_map, write_scalar_map
from .demo.guard import demo_warnings
from .ensemble import ARGMAX, StreamingEnsemble, fused_labels, fusion_space
from .errors import Cancelled, DeviceError, OutputError
from .hounsfield import ct_warnings
from .lesions import LESION_COLUMNS, class_statistics, lesion_rows
from .limits import check_model_grids
from .members.base import StepReporter
from .modelset import ModelSet
from .postprocess import apply_steps
from .results import commit_case_files, output_paths
from .roles import ensure_roles_available
from .timing import StageTimes, member_timing, rounded_seconds
from .uncertainty import AGREEMENT_REGIONS, VoteCounter, member_agreement, normalised_entropy, summarise


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. ``fraction`` is the share of the case done (0–1)."""

    # case-start, warning, member-start, member-step, member-done, postprocess, written, case-skipped, error, finished
    event: str
    case: str
    fraction: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event, "case": self.case, "fraction": round(self.fraction, 4), "message": self.message}


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


@dataclass
class Result:
    """Labels (uint8, z·y·x) on the reference grid — canonical BraTS 2023 values, or for models with their own label
    set the values of their dataset.json — statistics, per-lesion tables and provenance."""

    case_id: str
    labels: np.ndarray
    reference: sitk.Image
    statistics: dict[str, dict]
    provenance: dict[str, Any] = field(default_factory=dict)
    #: per-voxel uncertainty maps (float32, z·y·x): 'disagreement' and 'entropy' (see :mod:`.uncertainty`)
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)
    #: per reported region (or class), its lesions (see :mod:`BraTSEnsembleLib.lesions`)
    lesions: dict[str, list] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The statistics JSON: case id, regions (classes), their lesions, and how they were made."""
        return {"case_id": self.case_id, "regions": self.statistics, "lesions": self.lesions, **self.provenance}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda'/'cuda:N' fail clearly when there is no usable GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU. Use "
                "--device cpu (slower) or install a CUDA build of torch that matches your driver."
            )
        return torch.device(name)
    raise DeviceError(f"unknown device {name!r}; use auto, cpu or cuda")


def check_roles(case: Case, model_set: ModelSet) -> None:
    """Raise InputError when a member needs a sequence the case lacks (checked before any member runs)."""
    for member in model_set.members:
        ensure_roles_available(member.roles, case.roles, f"model {member.name}", case.description)


def segment_case(case: Case, model_set: ModelSet, device: str | torch.device = "auto",
                 progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> Result:
    """Segment one case with a model set. Raises Cancelled when ``cancel()`` turns true between steps."""
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    emit = progress or (lambda event: None)
    n = len(model_set.members)

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise Cancelled(f"case {case.case_id}: cancelled")

    check_roles(case, model_set)
    # the grid each member resamples the case to, against the memory budget (unusual spacings)
    check_model_grids(model_set.members, case.shape_zyx, case.spacing_zyx, case.description)
    started = time.perf_counter()
    # a demo set on anything but the shipped phantom; inputs that run without error but may give a wrong answer
    warnings = demo_warnings(model_set, case.images) + ct_warnings(case)
    emit(ProgressEvent("case-start", case.case_id, 0.0, f"{n} model(s) on {torch_device}"))
    for warning in warnings:
        emit(ProgressEvent("warning", case.case_id, 0.0, warning))
    ensemble = StreamingEnsemble(space=fusion_space(model_set.members))
    votes = VoteCounter()
    member_labels: list[np.ndarray] = []
    class_weights = model_set.class_weights or [None] * n
    label_rule = model_set.resolved_label_rule
    # a member votes with the set's rule where it can; a region member cannot take argmax (its region rule then)
    member_rule = None if label_rule == ARGMAX else label_rule
    times, member_times = StageTimes(), []  # per stage for the case; per member its own split
    for index, (member, weight) in enumerate(zip(model_set.members, model_set.weights)):
        check_cancel()
        done = index / n * 0.95
        emit(ProgressEvent("member-start", case.case_id, done, f"model {index + 1}/{n}: {member.name}"))

        own_times = StageTimes()
        with own_times.current(), own_times.stage("member"):
            probabilities = member.predict(case, torch_device,
                                           _member_reporter(emit, case.case_id, index, n, member.name))
        member_times.append(member_timing(member.name, own_times, times))
        with times.stage("uncertainty"):
            own_labels = fused_labels(probabilities, member_rule)
            votes.add(own_labels)
            member_labels.append(own_labels)  # uint8, one per member: for its agreement with the final labels
        if probabilities.grid_shape != case.shape_zyx:
            raise RuntimeError(f"{member.name} returned a grid {probabilities.grid_shape}, case is {case.shape_zyx}")
        with times.stage("fusion"):
            ensemble.add(probabilities, weight, class_weights[index])
        del probabilities
        emit(ProgressEvent("member-done", case.case_id, (index + 1) / n * 0.95, f"model {index + 1}/{n} done"))
    check_cancel()
    with times.stage("fusion"):
        fused = ensemble.probabilities()  # the weighted mean, computed once for the labels and the entropy
        raw_labels = fused_labels(fused, label_rule)
    emit(ProgressEvent("postprocess", case.case_id, 0.96,
                       ", ".join(map(str, model_set.postprocess)) or "no postprocessing"))
    with times.stage("postprocessing"):
        labels, records = apply_steps(raw_labels, model_set.postprocess)
    label_set = model_set.label_set
    with times.stage("statistics"):
        statistics, lesions = class_statistics(labels, case.reference, label_set, model_set.min_lesion_volume_mm3)
    with times.stage("uncertainty"):
        maps = {"disagreement": votes.disagreement(raw_labels), "entropy": normalised_entropy(fused)}
        uncertainty = summarise(maps, labels, list(statistics), label_set.mask)
        agreement = _agreement_records(model_set, member_labels, labels)
    provenance = {
        **model_set.describe(),
        "postprocess_details": records,
        "uncertainty": uncertainty,
        "member_agreement": agreement,
        "device": str(torch_device),
        "inputs": {role: case.source(role) for role in case.roles},
        "software": {"brats_ensemble": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "seconds": round(time.perf_counter() - started, 2),
        "timing": {"stages": {"reading": rounded_seconds(case.read_seconds), **times.rounded(), "writing": None},
                   "members": member_times},
        "warnings": warnings,
    }
    return Result(case.case_id, labels, case.reference, statistics, provenance, maps, lesions)


def _member_reporter(emit: ProgressCallback, case_id: str, index: int, n: int, name: str) -> StepReporter:
    """The ``report(step, fraction)`` handed to member ``index`` of ``n``: each step becomes a member-step event whose
    fraction of the case moves through the member's share (0.95 / n) as the member's own fraction (0–1) does; it
    never goes back (a step without a fraction keeps the last one)."""
    done = [0.0]

    def report(step: str, fraction: float | None = None) -> None:
        if fraction is not None and math.isfinite(fraction):
            done[0] = max(done[0], min(1.0, float(fraction)))
        emit(ProgressEvent("member-step", case_id, (index + done[0]) / n * 0.95,
                           f"model {index + 1}/{n}: {name}: {step}"))

    return report


def _agreement_records(model_set: ModelSet, member_labels: list[np.ndarray],
                       labels: np.ndarray) -> list[dict[str, Any]]:
    """``[{"member": name, "dice": {"WT": …, "TC": …, "ET": …}}]``: each member's own labels against the final ones
    (a list, in member order, because names given with ``--model`` need not be unique); per class for models with
    their own label set."""
    label_set = model_set.label_set
    regions = AGREEMENT_REGIONS if label_set.is_brats else label_set.names
    records = []
    for member, own in zip(model_set.members, member_labels):
        scores = member_agreement({member.name: own}, labels, regions, label_set.mask)[member.name]
        records.append({"member": member.name, "dice": {r: round(v, 4) for r, v in scores.items()}})
    return records


def check_outputs_free(out_dir: str | Path, case_id: str, overwrite: bool) -> None:
    """Refuse to run when results of this case exist and ``overwrite`` is not set (before any work is done)."""
    existing = [p for p in output_paths(out_dir, case_id).values() if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]}: exists already. Choose another output folder or pass --overwrite.")


def write_result(result: Result, out_dir: str | Path, overwrite: bool = False,
                 save_uncertainty: bool = False) -> dict[str, Path]:
    """Write the label map (and the uncertainty maps when asked), then the statistics JSON: its presence marks the
    case as complete.

    All files are first written under temporary names (and the images read back, see
    :func:`BraTSEnsembleLib.case.write_array_image`); only when every one is complete are they renamed into place,
    the JSON last, under a commit record that lets the next run recognise what a killed run left
    (:func:`BraTSEnsembleLib.results.commit_case_files`). A failed write (disk full, file-size limit, permissions)
    raises OutputError naming the file and leaves no file of this case behind, neither a final name nor a
    temporary file.
    """
    check_outputs_free(out_dir, result.case_id, overwrite)
    paths = output_paths(out_dir, result.case_id)
    with StagedFiles() as staged:
        started = time.perf_counter()
        written = {"labels": write_label_map(result.labels, result.reference, paths["labels"], staged)}
        if save_uncertainty:
            for name, values in result.uncertainty.items():
                written[name] = write_scalar_map(values, result.reference, paths[name], staged)
        written["lesions"] = write_csv(lesion_rows(result.lesions), paths["lesions"], LESION_COLUMNS, staged)
        _note_writing_seconds(result, time.perf_counter() - started)  # the maps and the table; not the JSON itself
        files = {f"{kind}_file": path.name for kind, path in written.items()}
        written["statistics"] = write_json({**result.summary(), **files}, paths["statistics"], staged)
        # Reached with --overwrite (or nothing there): the earlier JSON goes first, so that the case never looks
        # done with a mix of old and new files, and no uncertainty map of an earlier run stays beside new labels.
        earlier = [paths["statistics"], *(paths[name] for name in result.uncertainty if name not in written)]
        commit_case_files(staged, out_dir, result.case_id, remove=earlier)  # labels, maps, then the JSON
    return written


def _note_writing_seconds(result: Result, seconds: float) -> None:
    """Put the time spent writing (and reading back) the label map, the uncertainty maps and the lesion table into
    the provenance's ``timing`` (when :func:`segment_case` made one)."""
    stages = result.provenance.get("timing", {}).get("stages")
    if isinstance(stages, dict):
        stages["writing"] = rounded_seconds(seconds)
