"""``brats-ensemble evaluate``: find ground truths and predictions in the layouts BraTS and this tool use, pair them,
score every case with :mod:`.metrics`, and write per-case and summary tables that say, quantity by quantity, how
each number relates to the official evaluation code (:func:`quantity_notes`). docs/evaluation.md is the user guide.

Layouts (either folder may use any of them, mixed):

- flat: ``<id>.nii.gz``, ``<id>-seg.nii.gz`` (BraTS 2023+), ``<id>_seg.nii.gz`` (BraTS 2020/21), ``.nii`` too;
- case folders: ``<id>/<id>-seg.nii.gz`` or ``<id>/<id>_seg.nii.gz``; predictions also ``<id>/<id>.nii.gz``.

Ignored: the images of a case (``-t1n``/``-t1c``/``-t2w``/``-t2f``, ``_t1``/``_t1ce``/``_t2``/``_flair``, nnU-Net
``_0000`` …), this tool's uncertainty maps (``<id>_disagreement``, ``<id>_entropy``), hidden and temporary files.
Predictions are paired with ground truths by exact case id.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import labels as _labels
from . import metrics as M
from .case import StagedFiles, check_output_folder, read_image, write_json
from .errors import InputError, OutputError
from .roles import BRATS2021_SUFFIXES, BRATS2023_SUFFIXES

LABEL_MAP_ENDINGS = (".nii.gz", ".nii")
SEGMENTATION_SUFFIXES = ("-seg", "_seg")
#: This tool's uncertainty maps (``pipeline.output_paths``): written beside its label maps, never label maps.
UNCERTAINTY_SUFFIXES = ("_disagreement", "_entropy")
_IMAGE_SUFFIXES = tuple(BRATS2023_SUFFIXES) + tuple(BRATS2021_SUFFIXES)
_NNUNET_CHANNEL = re.compile(r".+_\d{4}$")
#: Names shown in an error that lists cases (the rest is counted).
MAX_NAMES_SHOWN = 5
LAYOUT_HINT = ("flat <id>.nii.gz, <id>-seg.nii.gz or <id>_seg.nii.gz files, or case folders <id>/<id>-seg.nii.gz "
               "(BraTS 2023+) or <id>/<id>_seg.nii.gz (BraTS 2020/21)")

# ----------------------------------------------------------------------------------------------------------------
# What each output number is, per protocol: the official name and whether it equals the official value
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantityNote:
    """How one output quantity relates to the official code: its name there (empty when the official output has no
    such number), whether the values are equal (``yes``, ``yes, except …``, ``only …``, ``no``, ``not in the
    official output``) and the rule followed here."""

    official: str
    equals_official: str
    rule: str


_NOT_OFFICIAL = "not in the official output"
_VOLUMES = {
    "pred_volume_mm3": QuantityNote("", _NOT_OFFICIAL, "Volume of the predicted region in mm³ (voxels × voxel "
                                    "volume); 0 for a missing prediction."),
}
_NOTES_2023: dict[str, QuantityNote] = {
    "lesion_dice": QuantityNote("LesionWise_Score_Dice", "yes", "Sum of the Dice of every ground-truth lesion above "
                                "the volume threshold (missed: 0) over their number plus the false positives; 1 when "
                                "there is neither."),
    "lesion_hd95": QuantityNote("LesionWise_Score_HD95", "yes", "As lesion_dice with HD95 in mm (DeepMind surface "
                                "elements); a missed lesion and a false positive count 374; 0 when there is neither."),
    "lesion_nsd_1": QuantityNote("", _NOT_OFFICIAL, "NSD at 1 mm per lesion with the brats2024 conventions (missed "
                                 "lesion or false positive 0; neither 1): the 2023 code computes no NSD."),
    "tp": QuantityNote("Num_TP", "yes", "Ground-truth lesions above the threshold with a prediction touching their "
                       "dilation."),
    "fn": QuantityNote("Num_FN", "yes", "Ground-truth lesions above the threshold that no prediction touches."),
    "fp": QuantityNote("Num_FP", "yes", "Predicted lesions touching no dilated ground-truth lesion (any size)."),
    "legacy_dice": QuantityNote("Legacy_Dice", "yes", "Whole-region Dice; 1 when both are empty."),
    "legacy_hd95": QuantityNote("Legacy_HD95", "yes", "Whole-region HD95 in mm (DeepMind surface elements); 374 when "
                                "one is empty, 0 when both are."),
    "legacy_nsd_1": QuantityNote("", _NOT_OFFICIAL, "Whole-region NSD at 1 mm (nnU-Net's definition, as brats2024); "
                                 "0 when one is empty, 1 when both are."),
    "gt_volume_mm3": QuantityNote("GT_Complete_Volume", "yes", "Volume of the ground-truth region in mm³."),
    **_VOLUMES,
}
_NOTES_2024: dict[str, QuantityNote] = {
    **_NOTES_2023,
    "lesion_hd95": QuantityNote("LesionWise_Score_HD95", "yes", "As lesion_dice with HD95 in mm (DeepMind surface "
                                "elements); a missed lesion and a false positive count 337; 0 when there is neither."),
    "lesion_nsd_0.5": QuantityNote("LesionWise_Score_NSD @ 0.5", "yes", "As lesion_dice with NSD at 0.5 mm (missed "
                                   "lesion or false positive 0)."),
    "lesion_nsd_1": QuantityNote("LesionWise_Score_NSD @ 1.0", "yes", "As lesion_dice with NSD at 1 mm (missed "
                                 "lesion or false positive 0)."),
    "legacy_hd95": QuantityNote("Legacy_HD95", "yes", "Whole-region HD95 in mm, computed as metrics_GLI.py does on "
                                "the lesion-numbered maps; 337 when one is empty, 0 when both are."),
    "legacy_nsd_0.5": QuantityNote("Legacy NSD @ 0.5", "yes", "Whole-region NSD at 0.5 mm; 0 when one is empty, 1 "
                                   "when both are."),
    "legacy_nsd_1": QuantityNote("Legacy NSD @ 1.0", "yes", "Whole-region NSD at 1 mm; 0 when one is empty, 1 when "
                                 "both are."),
}
_SPACING_BUG = ("off 1 mm isotropic voxels panoptica pairs SimpleITK's z·y·x array with its x·y·z spacing; "
                "here each axis gets its own spacing")
_NOTES_2025: dict[str, QuantityNote] = {
    "lesion_dice": QuantityNote("lesionwise_dsc_mean", "yes", "Mean DSC over the matched lesion pairs (one-to-one "
                                "matching on DSC); 0 when nothing is matched; NaN when neither has a lesion (left out "
                                "of the means); 0 for a missing prediction."),
    "lesion_hd95": QuantityNote("lesionwise_hd95_mean", "only at 1 mm isotropic spacing and when a lesion is matched",
                                "Mean HD95 (mm) over the matched pairs (95th percentile of the pooled border "
                                "distances). When nothing is matched: 373 here, inf in the official output (which "
                                f"makes its mean inf); {_SPACING_BUG}. NaN when neither has a lesion; 373 for a "
                                "missing prediction."),
    "lesion_nsd_1": QuantityNote("lesionwise_nsd_mean", "only at 1 mm isotropic spacing",
                                 "Mean NSD over the matched pairs at a 1 mm tolerance (official: the smallest voxel "
                                 f"spacing); {_SPACING_BUG}. 0 when nothing is matched; NaN when neither has a "
                                 "lesion; 0 for a missing prediction."),
    "f1": QuantityNote("all_instance_f1", "yes", "TP / (TP + ½FP + ½FN) (panoptica's rq); 0 when nothing is "
                       "matched; NaN when neither has a lesion; 0 for a missing prediction."),
    "tp": QuantityNote("all_instance_tp", "yes", "Matched pairs of 26-connected instances (one-to-one, DSC > 1e-6); "
                       "0 for a missing prediction."),
    "fn": QuantityNote("all_instance_fn", "yes, except for a missing prediction",
                       "Unmatched ground-truth instances. For a missing prediction: the number of ground-truth "
                       "lesions here, 0 in the official output (its fill value for every number)."),
    "fp": QuantityNote("all_instance_fp", "yes", "Unmatched predicted instances; 0 for a missing prediction."),
    "legacy_dice": QuantityNote("global_dsc", "yes", "Whole-region DSC; NaN when both are empty; 0 for a missing "
                                "prediction."),
    "legacy_hd95": QuantityNote("global_hd95", "only at 1 mm isotropic spacing, when the masks overlap or one is "
                                "empty", "Whole-region HD95 in mm at the files' spacing. Official: in voxels "
                                "(panoptica gives its global metrics no spacing) and 373 whenever the masks do not "
                                "overlap, even when both are non-empty (here the true HD95). 373 when one is empty "
                                "and for a missing prediction; NaN when both are empty."),
    "legacy_nsd_1": QuantityNote("global_nsd", "no, except when a mask is empty", "Whole-region NSD at a 1 mm "
                                 "tolerance at the files' spacing. Official: a 0.5-voxel tolerance (no spacing given) "
                                 "and 0 whenever the masks do not overlap. 0 when one is empty and for a missing "
                                 "prediction; NaN when both are empty."),
    "gt_volume_mm3": QuantityNote("", _NOT_OFFICIAL, "Volume of the ground-truth region in mm³."),
    **_VOLUMES,
}
_MET_LESION_RULE = ("Over the large ground-truth lesions (≥ 27 mm³; missed: DSC/NSD 0, HD95 373) and every false "
                    "positive (0, 0, 373); NaN when the ground truth has no large lesion (false positives then count "
                    "only in the F1s); 0 (HD95 373) for a missing prediction.")
_NOTES_2025_MET: dict[str, QuantityNote] = {
    **_NOTES_2025,
    "lesion_dice": QuantityNote("lesionwise_dsc_mean", "yes", "Mean DSC " + _MET_LESION_RULE),
    "lesion_hd95": QuantityNote("lesionwise_hd95_mean", "only at 1 mm isotropic spacing", "Mean HD95 (mm) "
                                + _MET_LESION_RULE + f" Off 1 mm: {_SPACING_BUG}."),
    "lesion_nsd_1": QuantityNote("lesionwise_nsd_mean", "only at 1 mm isotropic spacing", "Mean NSD at 1 mm "
                                 "(official: the smallest voxel spacing) " + _MET_LESION_RULE),
    **{f"{size}_{count}": QuantityNote(
        f"{size}_instance_{count}", "yes, except fn for a missing prediction",
        f"Detection among the {size} ground-truth lesions ({'≥' if size == 'large' else '<'} 27 mm³): a matched "
        "lesion is detected when its DSC ≥ 0.2; FP counts every unmatched prediction; F1 = 2TP / (2TP + FP + FN); "
        f"NaN when there is no {size} lesion. Missing prediction: F1 0, FN the number of {size} lesions (official 0).")
       for size in ("large", "small") for count in ("tp", "fn", "fp", "f1")},
}

#: What the official code is, per protocol.
OFFICIAL_CODE = {
    "brats2023": "rachitsaluja/BraTS-2023-Metrics metrics.py get_LesionWiseResults (columns of its CSV)",
    "brats2024": "rachitsaluja/BraTS-2024-Metrics metrics_GLI.py (columns of its CSV)",
    "brats2025": "brats-evaluation 0.0.10 (BraTS/BraTS_evaluation over panoptica): brats-evaluate --config <task> "
                 "then brats-parse-metrics seg (MET: mets --vol_threshold 27 --overlap_threshold 0.2, as brats-infra "
                 "ranks it); columns <name>_<region in lower case>",
}
MISSING_PREDICTION_RULE = {
    "brats2023": "The official script scores one pair of files and defines nothing for a missing file: scored as an "
                 "empty prediction (what the official script gives for an empty file).",
    "brats2024": "The official script scores one pair of files and defines nothing for a missing file: scored as an "
                 "empty prediction (what the official script gives for an empty file).",
    "brats2025": "As brats-parse-metrics fills a missing subject: every HD95 373, every other score 0; lesion counts: "
                 "TP 0, FP 0, FN the number of ground-truth lesions (official: 0).",
}
#: The same, in a few words (the command's warning).
MISSING_PREDICTION_SCORED_AS = {
    "brats2023": "an empty prediction", "brats2024": "an empty prediction",
    "brats2025": "brats-evaluation's parser scores them (HD95 373, every other score 0)",
}
SUMMARY_RULE = ("mean, median and standard deviation (n − 1) over the cases where the value is a number (NaN left "
                "out, as pandas does in brats-parse-metrics' mean/std/median rows); n counts them.")


def quantity_notes(protocol: str, task: str) -> dict[str, QuantityNote]:
    """The note of every quantity ``protocol``'s ``task`` outputs (see :class:`QuantityNote`)."""
    official = M.resolve_task(protocol, task)
    if protocol == "brats2023":
        return dict(_NOTES_2023)
    if protocol == "brats2024":
        return dict(_NOTES_2024)
    return dict(_NOTES_2025_MET if official.name == "MET" else _NOTES_2025)


# ----------------------------------------------------------------------------------------------------------------
# Finding label maps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LabelMaps:
    """Label maps found in a folder by case id, and what was passed over (for the report)."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)  # kind → count

    def ignore(self, kind: str) -> None:
        name = {"plain": "other NIfTI file", "segmentation": "segmentation of the other folder"}.get(kind, kind)
        self.ignored[name] = self.ignored.get(name, 0) + 1

    def add(self, case_id: str, path: Path) -> None:
        if case_id in self.files:
            raise InputError(f"{self.files[case_id]} and {path}: two label maps for case {case_id!r} in "
                             f"{self.folder}. Keep one of them.")
        self.files[case_id] = path


def _label_map_stem(name: str) -> str | None:
    lower = name.lower()
    for ending in LABEL_MAP_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)]
    return None


def _classify(stem: str) -> tuple[str, str]:
    """(kind, case id) of a NIfTI file name stem: kind 'segmentation' (``-seg``/``_seg``), 'uncertainty map',
    'image' (a sequence of a case) or 'plain' (``<id>``)."""
    lower = stem.lower()
    for suffix in SEGMENTATION_SUFFIXES:
        if lower.endswith(suffix):
            return "segmentation", stem[: -len(suffix)]
    if lower.endswith(UNCERTAINTY_SUFFIXES):
        return "uncertainty map", stem
    if lower.endswith(_IMAGE_SUFFIXES) or _NNUNET_CHANNEL.fullmatch(stem):
        return "image", stem
    return "plain", stem


def find_label_maps(folder: Path, role: str, kinds: Sequence[str] = ("segmentation", "plain")) -> LabelMaps:
    """Label maps in ``folder`` (flat files or case folders one level down) by case id.

    ``role`` ('ground truth' or 'prediction') words the errors. Flat files of the ``kinds`` taken: ``segmentation``
    (``<id>-seg``/``<id>_seg``) and ``plain`` (``<id>``). In a case folder: ``-seg``/``_seg`` files and, for
    predictions, ``<folder name>`` itself (``<id>/<id>.nii.gz``); anything else there (the case's images) is not a
    label map. Two label maps of one case, or two in one case folder, are refused.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder. Give the folder of {role} label maps ({LAYOUT_HINT}).")
    found = LabelMaps(folder)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            _add_case_folder(entry, role, kinds, found)
            continue
        stem = _label_map_stem(entry.name)
        if stem is None or not entry.is_file():
            continue
        kind, case_id = _classify(stem)
        if kind in kinds:
            found.add(case_id, entry)
        else:
            found.ignore(kind)
    return found


def _add_case_folder(case_dir: Path, role: str, kinds: Sequence[str], found: LabelMaps) -> None:
    candidates: list[tuple[str, Path]] = []
    for entry in sorted(case_dir.iterdir()):
        stem = _label_map_stem(entry.name)
        if stem is None or entry.name.startswith(".") or not entry.is_file():
            continue
        kind, case_id = _classify(stem)
        if (kind == "segmentation" and kind in kinds) or (
                kind == "plain" and kind in kinds and role == "prediction" and stem == case_dir.name):
            candidates.append((case_id, entry))
        else:
            found.ignore(kind)
    if len(candidates) > 1:
        raise InputError(f"{case_dir}: more than one {role} label map ({', '.join(p.name for _, p in candidates)}). "
                         "Keep one label map per case folder.")
    for case_id, path in candidates:
        found.add(case_id, path)


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_NAMES_SHOWN])
    return shown + (f" and {len(items) - MAX_NAMES_SHOWN} more" if len(items) > MAX_NAMES_SHOWN else "")


def pair_cases(pred_dir: Path, gt_dir: Path) -> tuple[LabelMaps, LabelMaps]:
    """Find ground truths and predictions; refuse predictions without ground truth and folders without either.

    When both folders are one, ground truths are its ``-seg``/``_seg`` files and predictions its plain ``<id>``
    files.
    """
    same = pred_dir.exists() and gt_dir.exists() and pred_dir.resolve() == gt_dir.resolve()
    gts = find_label_maps(gt_dir, "ground truth", ("segmentation",) if same else ("segmentation", "plain"))
    preds = find_label_maps(pred_dir, "prediction", ("plain",) if same else ("segmentation", "plain"))
    if same:  # each side passed over the other's files: not worth a word
        gts.ignored.pop("other NIfTI file", None)
        preds.ignored.pop("segmentation of the other folder", None)
    if not gts.files:
        raise InputError(f"{gt_dir}: no ground-truth label map found. Give a folder of {LAYOUT_HINT}.")
    if not preds.files:
        raise InputError(f"{pred_dir}: no prediction found. Give the folder of predicted label maps: <id>.nii.gz "
                         "files (as predict and batch write them) or case folders <id>/<id>.nii.gz.")
    orphans = sorted(set(preds.files) - set(gts.files))
    if orphans:
        raise InputError(f"{pred_dir}: {len(orphans)} prediction(s) without ground truth in {gt_dir}: "
                         f"{_names(orphans)}. Predictions are paired by case id: give the folder holding their "
                         "ground truth, or move these predictions out.")
    return preds, gts


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def read_label_map(path: Path, convention: str, protocol: str, task: str):
    """(image, array indexed x·y·z, spacing x·y·z) of a label map, its values checked against the task's labels."""
    import SimpleITK as sitk

    image = read_image(path)  # refuses truncated NIfTI files, which ITK's reader silently fills with zeros
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: not a 3-D label map ({image.GetDimension()}-D, "
                         f"{image.GetNumberOfComponentsPerPixel()} value(s) per voxel). Give the label map: one "
                         "whole-number label per voxel of the 3-D volume.")
    array = sitk.GetArrayFromImage(image)
    try:
        if convention == "brats2021":
            shown = M.unexpected_values(array, sorted(_labels.BRATS2021_TO_CANONICAL))
            if shown is not None:
                raise InputError(f"{path}: label values {shown} are not BraTS 2020/21 labels (allowed: "
                                 f"{sorted(_labels.BRATS2021_TO_CANONICAL)}). Leave --labels brats2021 out for a "
                                 "BraTS 2023+ label map (3 = ET); other values mean the file is not a label map (a "
                                 "probability or intensity image?), so export the labels again.")
            array = _labels.brats2021_to_canonical(array.astype(np.int64))
        M.check_label_values(array, protocol, task, str(path))
    except ValueError as exc:
        raise InputError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    # (z, y, x) → (x, y, z), the index order of the official (nibabel) scripts, with spacing (x, y, z); copied once
    # into that order (every mask and component labelling below would otherwise copy the strided view again), as
    # uint8 (the values were checked: 0–4)
    return image, np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.uint8), tuple(image.GetSpacing())


def check_geometry(pred_path: Path, pred_img, gt_path: Path, gt_img, tolerance: float = 1e-4) -> None:
    """Refuse a prediction that does not lie on its ground truth's grid (size, spacing, origin, direction)."""
    problems = []
    if pred_img.GetSize() != gt_img.GetSize():
        problems.append(f"size {pred_img.GetSize()} vs {gt_img.GetSize()}")
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        a, b = np.array(getattr(pred_img, what)()), np.array(getattr(gt_img, what)())
        if a.shape != b.shape or not np.allclose(a, b, atol=tolerance):
            problems.append(f"{what[3:].lower()} {tuple(a.round(5).tolist())} vs {tuple(b.round(5).tolist())}")
    if problems:
        raise InputError(f"{pred_path} and {gt_path} differ in geometry: " + "; ".join(problems) + ". A prediction "
                         "must lie on its ground truth's grid: check that both belong to the same case, or resample "
                         "the prediction onto the ground truth (nearest neighbour).")


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------

TABLE_NAMES = ("per_case.csv", "summary.csv", "summary.json")


def _all_region_names() -> list[str]:
    names: dict[str, None] = {}
    for tasks in M.TASKS.values():
        for task in tasks.values():
            names.update(dict.fromkeys(task.regions))
    return list(names)


def output_files(out_dir: Path) -> list[Path]:
    """Every file an evaluation may write in ``out_dir`` (the tables and a box plot per region of any task)."""
    return [out_dir / name for name in TABLE_NAMES] + [out_dir / f"boxplot_{r}.png" for r in _all_region_names()]


def check_outputs_free(out_dir: Path, overwrite: bool) -> None:
    """Before any work: refuse an unusable output folder, and earlier results unless ``overwrite``."""
    check_output_folder(out_dir)
    if overwrite:
        return
    for path in output_files(out_dir):
        if path.exists():
            raise OutputError(f"{path}: exists already (an earlier evaluation). Pass --overwrite to replace the "
                              "evaluation in that folder, or choose another output folder.")


def summarise(rows: list[dict], metric_names: Iterable[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per region and metric: mean, median, std (n − 1) and n over the values that are numbers (see SUMMARY_RULE)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for region in dict.fromkeys(r["region"] for r in rows):
        summary[region] = {}
        for metric in metric_names:
            values = np.array([r[metric] for r in rows if r["region"] == region], dtype=float)
            values = values[~np.isnan(values)]
            summary[region][metric] = {
                "mean": float(values.mean()) if len(values) else math.nan,
                "median": float(np.median(values)) if len(values) else math.nan,
                "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                "n": int(len(values)),
            }
    return summary


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value


def _csv_writer(rows: list[list[Any]]):
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)
    return write


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path, protocol: str = "brats2023",
                     task: str = "GLI", labels: str = "canonical", overwrite: bool = False) -> dict:
    """Score every ground truth in ``gt_dir`` against its prediction in ``pred_dir`` and write the tables.

    Layouts: see the module docstring. Refused before any work (InputError / OutputError naming the file and the
    fix): an unknown protocol or task, ``labels='brats2021'`` for a task not in the glioma labels, earlier results
    in ``out_dir`` unless ``overwrite``, predictions without ground truth, folders without label maps. While
    scoring: label values outside the task's set, predictions off their ground truth's grid. A ground truth without
    prediction is scored by :func:`metrics.missing_prediction_scores` and listed under ``missing``.

    Writes ``per_case.csv`` (one row per case and region), ``summary.csv`` (mean, median, std, n per region and
    metric, with each quantity's official name and whether it equals the official value), ``summary.json`` (the
    same, the notes in full, the cases and what was ignored) and ``boxplot_<region>.png``, all renamed into place
    together at the end; with ``overwrite``, box plots of regions this run does not score are removed. Returns the
    content of summary.json with ``files`` added.
    """
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    try:
        official = M.resolve_task(protocol, task)
    except ValueError as exc:
        raise InputError(f"--task/--protocol: {exc}") from None
    if labels not in ("canonical", "brats2021"):
        raise InputError(f"--labels must be 'canonical' or 'brats2021', not {labels!r}")
    if labels == "brats2021" and not official.glioma_labels:
        raise InputError(f"--labels brats2021 converts the glioma labels of BraTS 2020/21 (4 = ET); task "
                         f"{official.name} has labels of its own ({dict(official.regions)}). Leave --labels out.")
    check_outputs_free(out_dir, overwrite)
    preds, gts = pair_cases(pred_dir, gt_dir)

    rows: list[dict] = []
    missing: list[str] = []
    for case, gt_path in sorted(gts.files.items()):
        gt_img, gt_arr, spacing = read_label_map(gt_path, labels, protocol, official.name)
        if case in preds.files:
            pred_img, pred_arr, _ = read_label_map(preds.files[case], labels, protocol, official.name)
            check_geometry(preds.files[case], pred_img, gt_path, gt_img)
            scores = M.lesion_wise_scores(pred_arr, gt_arr, spacing, protocol, official.name)
        else:
            missing.append(case)
            scores = M.missing_prediction_scores(gt_arr, spacing, protocol, official.name)
        for region, metrics in scores.items():
            rows.append({"case": case, "region": region, "missing_prediction": int(case not in preds.files),
                         **metrics})

    notes = quantity_notes(protocol, official.name)
    metric_names = [k for k in rows[0] if k not in ("case", "region", "missing_prediction")]
    summary = summarise(rows, metric_names)
    report = {
        "protocol": protocol, "task": official.name,
        "regions": {region: list(values) for region, values in official.regions.items()},
        "official_code": OFFICIAL_CODE[protocol],
        "quantities": {m: {"official": notes[m].official, "equals_official": notes[m].equals_official,
                           "rule": notes[m].rule} for m in metric_names},
        "missing_prediction_rule": MISSING_PREDICTION_RULE[protocol],
        "summary_rule": SUMMARY_RULE,
        "cases": sorted(gts.files), "missing": missing,
        "ignored": {"ground truth folder": gts.ignored, "prediction folder": preds.ignored},
        "summary": summary,
    }
    files = _write_outputs(out_dir, rows, metric_names, report, protocol, overwrite)
    return {**report, "files": files}


def _write_outputs(out_dir: Path, rows: list[dict], metric_names: list[str], report: dict, protocol: str,
                   overwrite: bool) -> dict:
    per_case_rows = [["case", "region", "missing_prediction", *metric_names]]
    per_case_rows += [[r["case"], r["region"], r["missing_prediction"], *(r[m] for m in metric_names)] for r in rows]
    summary_rows = [["region", "metric", "mean", "median", "std", "n", "official", "equals_official"]]
    for region, metrics in report["summary"].items():
        for metric, stats in metrics.items():
            note = report["quantities"][metric]
            summary_rows.append([region, metric, stats["mean"], stats["median"], stats["std"], stats["n"],
                                 note["official"], note["equals_official"]])
    regions = list(report["summary"])
    with StagedFiles() as staged:
        per_case = staged.stage(out_dir / "per_case.csv", _csv_writer(per_case_rows))
        plots = [staged.stage(out_dir / f"boxplot_{region}.png",
                              _box_plot_writer(region, [r for r in rows if r["region"] == region], protocol))
                 for region in regions]
        summary_csv = staged.stage(out_dir / "summary.csv", _csv_writer(summary_rows))
        summary_json = write_json(_json_number(report), out_dir / "summary.json", staged)
        staged.commit()
    if overwrite:  # box plots of an earlier evaluation's other regions would read as this one's
        for path in output_files(out_dir):
            if path.name.startswith("boxplot_") and path not in plots:
                path.unlink(missing_ok=True)
    return {"per_case": per_case, "summary": summary_csv, "summary_json": summary_json, "plots": plots}


def _box_plot_writer(region: str, rows: list[dict], protocol: str):
    """Box plot of one region's per-case scores: overlap scores (0–1) left, HD95 (mm) right. No pyplot state."""
    def write(path: Path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        overlap = [m for m in rows[0] if m.startswith(("lesion_dice", "lesion_nsd", "legacy_dice", "legacy_nsd", "f1"))]
        distance = [m for m in rows[0] if m.endswith("hd95")]
        fig = Figure(figsize=(4 + 0.9 * len(overlap), 4.5))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(overlap), 1), max(len(distance), 1)]})
        for ax, names, ylabel in ((ax1, overlap, "score"), (ax2, distance, "HD95 (mm)")):
            data = [[v for v in (float(r[m]) for r in rows) if not math.isnan(v)] for m in names]
            ax.boxplot(data, showmeans=True)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
        ax1.set_ylim(-0.05, 1.05)
        fig.suptitle(f"{region} — {protocol}, {len(rows)} cases")
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
    return write
