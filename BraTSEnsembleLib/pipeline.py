"""The one entry that the command line, the Slicer module and the Python console call: :func:`segment_case`.

case → each member's probabilities (one member in memory at a time) → weighted fusion → labels → postprocessing →
statistics. Progress is reported as :class:`ProgressEvent` objects; a ``cancel`` callable is checked between steps.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .case import Case, StagedFiles, write_json, write_label_map, write_scalar_map
from .ensemble import ARGMAX, StreamingEnsemble, fused_labels, fusion_space
from .errors import Cancelled, DeviceError, OutputError
from .hounsfield import ct_warnings
from .modelset import ModelSet
from .postprocess import apply_steps
from .roles import ensure_roles_available
from .stats import region_statistics
from .uncertainty import VoteCounter, member_agreement, normalised_entropy, summarise


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. ``fraction`` is the share of the case done (0–1)."""

    event: str  # case-start, warning, member-start, member-step, member-done, postprocess, written, case-skipped,
    #             error, finished
    case: str
    fraction: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event, "case": self.case, "fraction": round(self.fraction, 4), "message": self.message}


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


@dataclass
class Result:
    """Labels (uint8, z·y·x, canonical BraTS 2023 values) on the reference grid, statistics and provenance."""

    case_id: str
    labels: np.ndarray
    reference: sitk.Image
    statistics: dict[str, dict]
    provenance: dict[str, Any] = field(default_factory=dict)
    #: per-voxel uncertainty maps (float32, z·y·x): 'disagreement' and 'entropy' (see :mod:`.uncertainty`)
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The statistics JSON: case id, regions, and how they were made."""
        return {"case_id": self.case_id, "regions": self.statistics, **self.provenance}


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


def segment_case(case: Case, model_set: ModelSet, device: str | torch.device = "auto",
                 progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> Result:
    """Segment one case with a model set. Raises Cancelled when ``cancel()`` turns true between steps."""
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    emit = progress or (lambda event: None)
    n = len(model_set.members)

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise Cancelled(f"case {case.case_id}: cancelled")

    for member in model_set.members:  # every member's sequences are checked before any member runs
        ensure_roles_available(member.roles, case.roles, f"model {member.name}", case.description)
    started = time.perf_counter()
    emit(ProgressEvent("case-start", case.case_id, 0.0, f"{n} model(s) on {torch_device}"))
    input_warnings = ct_warnings(case)  # inputs that run without error but may give a wrong answer
    for message in input_warnings:
        emit(ProgressEvent("warning", case.case_id, 0.0, message))
    ensemble = StreamingEnsemble(space=fusion_space(model_set.members))
    votes = VoteCounter()
    member_labels: list[np.ndarray] = []
    class_weights = model_set.class_weights or [None] * n
    label_rule = model_set.resolved_label_rule
    # a member votes with the set's rule where it can; a region member cannot take argmax (its region rule then)
    member_rule = None if label_rule == ARGMAX else label_rule
    for index, (member, weight) in enumerate(zip(model_set.members, model_set.weights)):
        check_cancel()
        done = index / n * 0.95
        emit(ProgressEvent("member-start", case.case_id, done, f"model {index + 1}/{n}: {member.name}"))

        def report(step: str, _index: int = index, _member: Any = member) -> None:
            emit(ProgressEvent("member-step", case.case_id, _index / n * 0.95,
                               f"model {_index + 1}/{n}: {_member.name}: {step}"))

        probabilities = member.predict(case, torch_device, report)
        own_labels = fused_labels(probabilities, member_rule)
        votes.add(own_labels)
        member_labels.append(own_labels)  # uint8, one per member: for its agreement with the final labels
        if probabilities.grid_shape != case.shape_zyx:
            raise RuntimeError(f"{member.name} returned a grid {probabilities.grid_shape}, case is {case.shape_zyx}")
        ensemble.add(probabilities, weight, class_weights[index])
        del probabilities
        emit(ProgressEvent("member-done", case.case_id, (index + 1) / n * 0.95, f"model {index + 1}/{n} done"))
    check_cancel()
    fused = ensemble.probabilities()  # the weighted mean, computed once for the labels and the entropy
    raw_labels = fused_labels(fused, label_rule)
    emit(ProgressEvent("postprocess", case.case_id, 0.96,
                       ", ".join(map(str, model_set.postprocess)) or "no postprocessing"))
    labels, records = apply_steps(raw_labels, model_set.postprocess)
    statistics = region_statistics(labels, case.reference.GetSpacing())
    maps = {"disagreement": votes.disagreement(raw_labels), "entropy": normalised_entropy(fused)}
    provenance = {
        **model_set.describe(),
        "postprocess_details": records,
        "uncertainty": summarise(maps, labels, list(statistics)),
        "member_agreement": _agreement_records(model_set, member_labels, labels),
        "device": str(torch_device),
        "inputs": {role: case.source(role) for role in case.roles},
        **({"input_warnings": input_warnings} if input_warnings else {}),
        "software": {"brats_ensemble": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Result(case.case_id, labels, case.reference, statistics, provenance, maps)


def _agreement_records(model_set: ModelSet, member_labels: list[np.ndarray],
                       labels: np.ndarray) -> list[dict[str, Any]]:
    """``[{"member": name, "dice": {"WT": …, "TC": …, "ET": …}}]``: each member's own labels against the final ones
    (a list, in member order, because names given with ``--model`` need not be unique)."""
    records = []
    for member, own in zip(model_set.members, member_labels):
        scores = member_agreement({member.name: own}, labels)[member.name]
        records.append({"member": member.name, "dice": {r: round(v, 4) for r, v in scores.items()}})
    return records


def output_paths(out_dir: str | Path, case_id: str) -> dict[str, Path]:
    """Where a case's results go: ``<id>.nii.gz`` (labels), ``<id>.json`` (statistics) and, when asked for, the
    uncertainty maps ``<id>_disagreement.nii.gz`` and ``<id>_entropy.nii.gz``."""
    out = Path(out_dir)
    return {"labels": out / f"{case_id}.nii.gz", "statistics": out / f"{case_id}.json",
            "disagreement": out / f"{case_id}_disagreement.nii.gz", "entropy": out / f"{case_id}_entropy.nii.gz"}


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
    the JSON last. A failed write (disk full, file-size limit, permissions) raises OutputError naming the file and
    leaves no file of this case behind, neither a final name nor a temporary file.
    """
    check_outputs_free(out_dir, result.case_id, overwrite)
    paths = output_paths(out_dir, result.case_id)
    with StagedFiles() as staged:
        written = {"labels": write_label_map(result.labels, result.reference, paths["labels"], staged)}
        if save_uncertainty:
            for name, values in result.uncertainty.items():
                written[name] = write_scalar_map(values, result.reference, paths[name], staged)
        files = {f"{kind}_file": path.name for kind, path in written.items()}
        written["statistics"] = write_json({**result.summary(), **files}, paths["statistics"], staged)
        # Reached with --overwrite (or nothing there): the earlier JSON goes first, so that the case never looks
        # done with a mix of old and new files, and no uncertainty map of an earlier run stays beside new labels.
        paths["statistics"].unlink(missing_ok=True)
        for name in result.uncertainty:
            if name not in written:
                paths[name].unlink(missing_ok=True)
        staged.commit()  # labels, maps, then the JSON
    return written
