"""BraTS evaluation: lesion-wise and whole-volume ("legacy") scores as the official BraTS evaluations define them.

Three protocols, each re-implemented from the organisers' public code (no code copied; constants cited):

``brats2023`` — rachitsaluja/BraTS-2023-Metrics, ``metrics.py`` (formerly ``eval.py``):
    regions WT {1,2,3}, TC {1,3}, ET {3} (``get_TissueWiseSeg``); 26-connected components (cc3d); ground-truth
    lesions whose dilations touch are merged (``get_GTseg_combinedByDilation``: binary dilation with
    ``generate_binary_structure(3, 2)``, ``dil_factor`` iterations, then 26-connected components of the dilated
    mask); every predicted component that touches the *dilated* GT lesion is pooled and scored against the
    *undilated* lesion (``get_LesionWiseScores``); a missed GT lesion scores Dice 0 / HD95 374, each unmatched
    predicted component adds Dice 0 / HD95 374 to the sum and 1 to the denominator; GT lesions of volume
    ≤ threshold (mm³: voxel count × voxel volume) are left out, false positives count at any size; an empty
    denominator gives Dice 1 / HD95 0 (``get_LesionWiseResults``). Dilation / threshold per task
    (``get_LesionWiseResults``): GLI 3/50, SSA 3/50, MEN 1/50, PED 3/50, MET 1/2. Legacy HD95 ``inf`` → 374.
    The 2023 code computes no NSD; the NSD @ 1 mm reported here for 2023 is an addition that follows the 2024
    conventions.

``brats2024`` — rachitsaluja/BraTS-2024-Metrics, ``metrics_GLI.py`` (task GLI only):
    regions WT {1,2,3} (RC excluded), TC {1,3}, NETC {1}, SNFH {2}, ET {3}, RC {4}; dilation 3, or 5 for NETC
    and RC (the code tests ``"SFNH"``, a typo, so SNFH keeps 3); thresholds ET 10, others 20 (``save_tmp_files``,
    ``get_LesionWiseResults``). Predicted components are merged by dilation like the GT and merged predicted
    lesions of ≤ threshold *voxels* are removed before anything is scored (the legacy scores included). The
    legacy HD95 is computed, as the official code does, on the lesion-numbered maps rather than binary masks
    (:func:`hd95_label_maps_2024`), which shifts it slightly when a region has several lesions.
    For NETC, SNFH, ET and RC, lesions of one tissue that touch (18-neighbourhood) lesions of the other tissues
    are relabelled (``combine_lesions_tissues`` / ``get_touching_labels`` / ``relabel_nifti_image``), in GT and
    prediction alike. Penalty HD95 337. NSD at 0.5 mm and 1.0 mm (``normalized_surface_dice``, nnU-Net's
    implementation over medpy's ``__surface_distances``: erosion borders, connectivity 1): a missed lesion or a
    false positive scores 0, both empty 1.

``brats2025`` — brats-evaluation 0.0.10 (BraTS/BraTS_evaluation: ``configs/config_<task>.yaml``,
    ``metrics_parser.py``) over BrainLesion/panoptica 2.1: 26-connected instances (cc3d), one-to-one maximum
    bipartite matching on DSC (``MaxBipartiteMatching``, ``matching_threshold`` 1e-6;
    ``scipy.optimize.linear_sum_assignment`` on cost 1 − DSC), no dilation, no size threshold. Lesion-wise DSC,
    HD95 and NSD are means over matched pairs only (panoptica ``sq_*``); FP and FN enter only the F1
    (``rq`` = TP / (TP + ½FP + ½FN)). Zero TP: DSC/NSD 0 (HD95 ``inf`` there, 373 here); no instances at all:
    NaN, as in the official output. Panoptica's HD95 is ``np.percentile`` of the pooled two-way distances
    between erosion borders (connectivity 1); its NSD tolerance is the smallest voxel spacing, here fixed at
    1 mm. Whole-region scores: see ``evaluation.quantity_notes`` for where they follow a better-defined rule than
    panoptica's (which ignores the spacing there). Tasks and regions: the bundled configs (:data:`TASKS`); MET's
    lesion-wise scores follow ``parse_mets_results`` with brats-infra's thresholds (27 mm³, DSC 0.2). A missing
    prediction: :func:`missing_prediction_scores`.

HD95 of ``brats2023``/``brats2024`` is DeepMind's surface-distance (both repositories vendor
``surface_distance/metrics.py``: ``compute_surface_distances`` + ``compute_robust_hausdorff(…, 95)``): surface
elements sit on the corners between voxels (2×2×2 neighbourhood codes), each weighted by the area of its
marching-cubes triangles, and the 95th percentile is area-weighted, per direction, the larger of the two taken.
Its per-code triangle table is rebuilt here with scikit-image's Lorensen marching cubes on each 2×2×2
configuration with at most four voxels set (the complement for more): that reproduces the vendored
``lookup_tables.neighbour_code_to_normals`` surface areas for all 256 codes (checked at three spacings).

Array convention: ``spacing`` is given per array axis. The official scripts read NIfTI with nibabel, i.e. arrays
indexed (x, y, z) with ``header.get_zooms()``; for bit-identical results (surfel weights and lesion numbering
depend on axis order) pass arrays the same way — from SimpleITK, ``GetArrayViewFromImage(img).transpose(2, 1, 0)``
with ``img.GetSpacing()`` — as ``evaluation.evaluate_folders`` does.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

PROTOCOLS = ("brats2023", "brats2024", "brats2025")

#: HD95 given to a missed lesion / false positive / empty-vs-non-empty volume.
HD95_PENALTY = {"brats2023": 374.0, "brats2024": 337.0, "brats2025": 373.0}

#: brats2023 ``get_LesionWiseResults``: task → (dilation iterations, lesion volume threshold in mm³).
TASKS_2023: dict[str, tuple[int, float]] = {
    "GLI": (3, 50.0), "SSA": (3, 50.0), "MEN": (1, 50.0), "PED": (3, 50.0), "MET": (1, 2.0),
}
REGIONS_2023: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
REGIONS_2024: dict[str, tuple[int, ...]] = {
    "WT": (1, 2, 3), "TC": (1, 3), "NETC": (1,), "SNFH": (2,), "ET": (3,), "RC": (4,),
}
REGIONS_2025_GOAT: dict[str, tuple[int, ...]] = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
REGIONS_2025_GLI: dict[str, tuple[int, ...]] = {
    "SNFH": (2,), "ET": (3,), "NETC": (1,), "RC": (4,), "TC": (1, 3), "WT": (1, 2, 3),
}
#: config_ped.yaml: the paediatric labels are 1 ET, 2 NETC, 3 CC (cystic component), 4 ED (oedema).
REGIONS_2025_PED: dict[str, tuple[int, ...]] = {
    "ET": (1,), "NETC": (2,), "CC": (3,), "ED": (4,), "TC": (1, 2, 3), "WT": (1, 2, 3, 4),
}
#: config_MenRT.yaml: one gross tumour volume label.
REGIONS_2025_MENRT: dict[str, tuple[int, ...]] = {"GTV": (1,)}
#: brats2024 metrics_GLI.py: NETC and RC dilate 5 (the ``"SFNH"`` typo leaves SNFH at 3), the rest 3.
DILATION_2024 = {"WT": 3, "TC": 3, "NETC": 5, "SNFH": 3, "ET": 3, "RC": 5}
#: brats2024 metrics_GLI.py: ET 10, all others 20 (voxels for removing predictions, mm³ for GT lesions).
THRESHOLD_2024 = {"WT": 20.0, "TC": 20.0, "NETC": 20.0, "SNFH": 20.0, "ET": 10.0, "RC": 20.0}
#: brats2024 combine_lesions_tissues: tissue → the tissues whose touching lesions relabel it, in order.
_COMBINE_ORDER_2024 = {
    "NETC": ("ET", "RC"), "ET": ("NETC", "RC"), "RC": ("ET", "NETC"), "SNFH": ("ET", "RC", "NETC"),
}
MATCHING_THRESHOLD_2025 = 1e-6

_STRUCT_18 = ndimage.generate_binary_structure(3, 2)
_STRUCT_6 = ndimage.generate_binary_structure(3, 1)


#: brats-infra ``evaluation/segmentation/score.py``: the 2025 MET ranking runs ``brats-parse-metrics mets
#: --vol_threshold 27 --overlap_threshold 0.2`` (reference lesions of ≥ 27 mm³ are "large"; a matched lesion is
#: detected when its DSC ≥ 0.2). brats-parse-metrics' own defaults (20, 0.1) are not what the challenge used.
MET_VOLUME_THRESHOLD_2025 = 27.0
MET_OVERLAP_THRESHOLD_2025 = 0.2
#: Values shown in an error about label values (a float intensity image has millions of distinct values).
MAX_VALUES_SHOWN = 5


@dataclass(frozen=True)
class Task:
    """An official task of a protocol: its name as the official code spells it, the regions it scores (name →
    label values in the files), and whether its labels follow the glioma convention (1 NETC, 2 SNFH, 3 ET, 4 RC),
    which ``--labels brats2021`` converts from."""

    name: str
    regions: dict[str, tuple[int, ...]]
    glioma_labels: bool = True
    aliases: tuple[str, ...] = ()


#: Per protocol, its official tasks. 2023: ``get_LesionWiseResults`` (one region set, per-task dilation and
#: threshold); 2024: ``metrics_GLI.py`` only (the other 2024 scripts use other labels and penalties and are not
#: reproduced); 2025: the configs bundled with brats-evaluation 0.0.10 (``configs/config_<name>.yaml``).
TASKS: dict[str, dict[str, Task]] = {
    "brats2023": {name: Task(name, REGIONS_2023) for name in TASKS_2023},
    "brats2024": {"GLI": Task("GLI", REGIONS_2024)},
    "brats2025": {
        "GoAT": Task("GoAT", REGIONS_2025_GOAT),
        "GLI": Task("GLI", REGIONS_2025_GLI),
        "MET": Task("MET", {"ET": (3,), "RC": (4,), "TC": (1, 3), "WT": (1, 2, 3)}, aliases=("mets",)),
        "PED": Task("PED", REGIONS_2025_PED, glioma_labels=False),
        "MenPre": Task("MenPre", REGIONS_2025_GOAT),
        "MenRT": Task("MenRT", REGIONS_2025_MENRT, glioma_labels=False),
    },
}


def _task_key(name: str) -> str:
    """Lower case without ``-``/``_`` and without a leading ``BraTS`` (the 2023 script's ``BraTS-GLI``, brats-infra's
    ``BraTS-GoAT``)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    return key[len("brats"):] if key.startswith("brats") and len(key) > len("brats") else key


def resolve_task(protocol: str, task: str) -> Task:
    """The official ``task`` of ``protocol`` (case-insensitive; ``-``/``_`` and a ``BraTS`` prefix ignored; the
    official config names such as ``mets`` accepted). Raises ValueError listing the valid tasks — a typo never falls
    back to another task."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    tasks = TASKS[protocol]
    key = _task_key(task)
    for official in tasks.values():
        if key in {_task_key(official.name), *map(_task_key, official.aliases)}:
            return official
    if protocol == "brats2024":
        raise ValueError(f"brats2024 is reproduced for task GLI only (its other tasks' scripts use other labels and "
                         f"penalties), not {task!r}. Use --task GLI, or --protocol brats2023 or brats2025 for "
                         "another task.")
    raise ValueError(f"{protocol} has no task {task!r}; its tasks are {', '.join(tasks)}.")


def protocol_regions(protocol: str, task: str = "GLI") -> dict[str, tuple[int, ...]]:
    """Regions (name → label values) that ``protocol`` scores for ``task``."""
    return dict(resolve_task(protocol, task).regions)


def allowed_labels(protocol: str, task: str = "GLI") -> tuple[int, ...]:
    """Label values a label map may hold under ``protocol`` (0 plus the labels of its regions)."""
    values = {0}
    for region_labels in protocol_regions(protocol, task).values():
        values.update(region_labels)
    return tuple(sorted(values))


def _check_protocol(protocol: str, task: str) -> None:
    resolve_task(protocol, task)


def _format_value(value: float) -> str:
    return f"{value:g}"


def _distinct_values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values; for integer arrays of a small range by counting (a sort of 40 M voxels takes
    seconds)."""
    if array.size and (array.dtype.kind in "ui" or array.dtype == bool):
        low, high = int(array.min()), int(array.max())
        if high - low < 1 << 16:
            shifted = array.ravel() if low == 0 else array.ravel().astype(np.int64) - low
            return np.nonzero(np.bincount(shifted, minlength=high - low + 1))[0] + low
    return np.unique(array)


def unexpected_values(array: np.ndarray, allowed: Sequence[int]) -> str | None:
    """``"[v1, …, v5] and N other values"`` of the values of ``array`` not in ``allowed`` (None when all are):
    at most :data:`MAX_VALUES_SHOWN` shown, the rest counted."""
    present = _distinct_values(np.asarray(array))
    bad = present[~np.isin(present, allowed)]
    if bad.size == 0:
        return None
    shown = ", ".join(_format_value(v) for v in bad[:MAX_VALUES_SHOWN].tolist())
    more = f" and {bad.size - MAX_VALUES_SHOWN} other values" if bad.size > MAX_VALUES_SHOWN else ""
    return f"[{shown}]{more}"


def check_label_values(array: np.ndarray, protocol: str, task: str = "GLI", name: str = "label map") -> None:
    """Raise ValueError naming ``name`` and the first offending values (at most :data:`MAX_VALUES_SHOWN`, and how
    many more) when ``array`` holds labels outside the set of ``protocol``'s ``task``."""
    allowed = allowed_labels(protocol, task)
    shown = unexpected_values(array, allowed)
    if shown is None:
        return
    official = resolve_task(protocol, task)
    if official.glioma_labels:
        fix = ("Give a BraTS label map of whole-number labels: one in the BraTS 2020/21 convention (4 = ET) needs "
               "--labels brats2021; other values mean the file is not a BraTS label map (a probability or intensity "
               "image?), so export the labels again.")
    else:
        fix = (f"Give a label map in task {official.name}'s labels; other values mean the file is not a label map "
               "of this task (another task's, or a probability or intensity image?), so export the labels again.")
    raise ValueError(f"{name}: label values {shown} are not valid for protocol {protocol!r} task "
                     f"{official.name} (allowed: {list(allowed)}). {fix}")


# --------------------------------------------------------------------------------------------------------------
# Surface distances
# --------------------------------------------------------------------------------------------------------------

def _corner_volume(code: int) -> np.ndarray:
    """2×2×2 configuration of a neighbour code; bit 7 − (4i + 2j + k) is the voxel at offset (i, j, k)."""
    cube = np.zeros((2, 2, 2), dtype=np.float64)
    for i in range(2):
        for j in range(2):
            for k in range(2):
                cube[i, j, k] = (code >> (7 - (4 * i + 2 * j + k))) & 1
    return cube


@functools.lru_cache(maxsize=1)
def _triangle_area_vectors() -> tuple[np.ndarray, ...]:
    """Per neighbour code, the (n, 3) area vectors (cross product / 2) of its marching-cubes triangles in voxel units.

    Lorensen marching cubes (scikit-image) on the configuration with at most four voxels set, its complement
    otherwise; vertices at edge midpoints. This reproduces the areas of DeepMind's ``neighbour_code_to_normals``.
    """
    from skimage import measure  # scikit-image: a dependency of nnunetv2

    vectors: list[np.ndarray] = []
    for code in range(256):
        if code in (0, 255):
            vectors.append(np.zeros((0, 3)))
            continue
        source = code if bin(code).count("1") <= 4 else 255 - code
        verts, faces, _, _ = measure.marching_cubes(_corner_volume(source), 0.5, method="lorensen",
                                                    allow_degenerate=True)
        tri = verts.astype(np.float64)[faces]
        vectors.append(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]) / 2.0)
    return tuple(vectors)


@functools.lru_cache(maxsize=32)
def surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Surface area (mm²) of the surface element of each of the 256 neighbour codes at ``spacing``."""
    s0, s1, s2 = (float(s) for s in spacing)
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    table = np.zeros(256)
    for code, vecs in enumerate(_triangle_area_vectors()):
        if len(vecs):
            table[code] = float(np.sum(np.linalg.norm(vecs * scale, axis=1)))
    return table


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.nonzero(np.any(mask, axis=other))[0]
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def _grow(box: Sequence[slice], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union(boxes: Iterable[Sequence[slice] | None]) -> tuple[slice, ...] | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Codes of every voxel corner of a mask (shape + 1); outside the array counts as background."""
    padded = np.pad(mask.astype(np.uint8), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.int32)
    for i in range(2):
        for j in range(2):
            for k in range(2):
                codes += padded[i:i + n0, j:j + n1, k:k + n2].astype(np.int32) << (7 - (4 * i + 2 * j + k))
    return codes


@dataclass
class SurfelDistances:
    """Distances (mm) from each surface element of one mask to the other surface, with the elements' areas (mm²)."""

    gt_to_pred: np.ndarray
    gt_areas: np.ndarray
    pred_to_gt: np.ndarray
    pred_areas: np.ndarray


def surfel_distances(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> SurfelDistances:
    """Surface-element distances as DeepMind's ``compute_surface_distances`` defines them (see module docstring)."""
    gt = np.asarray(gt).astype(bool)
    pred = np.asarray(pred).astype(bool)
    box = _bbox(gt | pred)
    empty = np.zeros(0)
    if box is None:
        return SurfelDistances(empty, empty, empty, empty)
    return _distances_between_codes(_neighbour_codes(gt[box]), _neighbour_codes(pred[box]), spacing)


def _distances_between_codes(codes_gt: np.ndarray, codes_pred: np.ndarray,
                             spacing: Sequence[float]) -> SurfelDistances:
    """Surface elements of two corner-code volumes and the distance of each to the other surface (mm)."""
    border_gt = (codes_gt != 0) & (codes_gt != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)
    sampling = tuple(float(s) for s in spacing)
    dist_to_gt = (ndimage.distance_transform_edt(~border_gt, sampling=sampling) if border_gt.any()
                  else np.full(border_gt.shape, np.inf))
    dist_to_pred = (ndimage.distance_transform_edt(~border_pred, sampling=sampling) if border_pred.any()
                    else np.full(border_pred.shape, np.inf))
    areas = surfel_area_table(sampling)
    return SurfelDistances(dist_to_pred[border_gt], areas[codes_gt[border_gt]],
                           dist_to_gt[border_pred], areas[codes_pred[border_pred]])


def _weighted_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    if len(distances) == 0:
        return math.inf
    order = np.lexsort((areas, distances))  # sorted by distance, ties by area, as sorted(zip(d, a)) does
    d, a = distances[order], areas[order]
    cumulative = np.cumsum(a) / np.sum(a)
    idx = int(np.searchsorted(cumulative, percent / 100.0))
    return float(d[min(idx, len(d) - 1)])


def robust_hausdorff(sd: SurfelDistances, percent: float = 95.0) -> float:
    """Area-weighted ``percent``-th percentile Hausdorff distance (``compute_robust_hausdorff``); inf if a side is empty."""
    return max(_weighted_percentile(sd.gt_to_pred, sd.gt_areas, percent),
               _weighted_percentile(sd.pred_to_gt, sd.pred_areas, percent))


def hd95_surfels(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 (mm) of brats2023/brats2024 (DeepMind surface elements); inf when one mask is empty."""
    return robust_hausdorff(surfel_distances(gt, pred, spacing), 95.0)


_CODE_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])


def _label_map_codes(values: np.ndarray) -> np.ndarray:
    """Neighbour codes of a *label map* fed to the surface code unbinarised: the label values, wrapped to uint8, are
    weighted by the code kernel and summed in uint8 (scipy ``correlate`` with uint8 output), so codes wrap mod 256."""
    crop = np.zeros(tuple(s + 1 for s in values.shape), dtype=np.uint8)
    crop[:-1, :-1, :-1] = values.astype(np.int64).astype(np.uint8)
    return ndimage.correlate(crop, _CODE_KERNEL, mode="constant", cval=0)


def hd95_label_maps_2024(gt_lesions: np.ndarray, pred_lesions: np.ndarray, spacing: Sequence[float]) -> float:
    """Legacy HD95 of brats2024 ``metrics_GLI.py``, which passes the lesion-numbered maps (not binary masks) to
    ``compute_surface_distances``: lesion numbers above 1 change the neighbour codes, hence the surface elements and
    their weights. Reproduced here so that the legacy HD95 equals the official one; inf when one map is empty."""
    gt_lesions = np.asarray(gt_lesions)
    pred_lesions = np.asarray(pred_lesions)
    box = _bbox((gt_lesions != 0) | (pred_lesions != 0))
    if box is None:
        return math.inf
    sd = _distances_between_codes(_label_map_codes(gt_lesions[box]), _label_map_codes(pred_lesions[box]), spacing)
    return robust_hausdorff(sd, 95.0)


def _erosion_border(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask, structure=_STRUCT_6, iterations=1)


def border_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(distances from a's border voxels to b's border, b's to a's), borders = mask minus its 6-connected erosion.

    medpy's ``__surface_distances`` (used by the 2024 NSD and by panoptica). Both masks must be non-empty.
    The arrays are cropped to the union's bounding box plus one voxel, which changes nothing.
    """
    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    box = _grow(_bbox(a | b), 1, a.shape)
    a, b = a[box], b[box]
    border_a, border_b = _erosion_border(a), _erosion_border(b)
    sampling = tuple(float(s) for s in spacing)
    a_to_b = ndimage.distance_transform_edt(~border_b, sampling=sampling)[border_a]
    b_to_a = ndimage.distance_transform_edt(~border_a, sampling=sampling)[border_b]
    return a_to_b, b_to_a


def _nsd_from_distances(a_to_b: np.ndarray, b_to_a: np.ndarray, tolerance: float, eps: float) -> float:
    tp_a = np.sum(a_to_b <= tolerance) / len(a_to_b)
    tp_b = np.sum(b_to_a <= tolerance) / len(b_to_a)
    fp = np.sum(a_to_b > tolerance) / len(a_to_b)
    fn = np.sum(b_to_a > tolerance) / len(b_to_a)
    return float((tp_a + tp_b) / (tp_a + tp_b + fp + fn + eps))


def normalized_surface_dice(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                            tolerances: Sequence[float] = (1.0,), eps: float = 1e-8) -> dict[float, float]:
    """NSD per tolerance (mm) with the brats2024 conventions: one mask empty → 0, both empty → 1.

    Otherwise nnU-Net's ``normalized_surface_dice`` as vendored in ``metrics_GLI.py`` (``eps`` 1e-8; panoptica uses
    ``sys.float_info.min``).
    """
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return {t: 1.0 for t in tolerances}
    if not has_pred or not has_gt:
        return {t: 0.0 for t in tolerances}
    a_to_b, b_to_a = border_distances(pred, gt, spacing)
    return {t: _nsd_from_distances(a_to_b, b_to_a, t, eps) for t in tolerances}


def dice(pred: np.ndarray, gt: np.ndarray, empty: float = 1.0) -> float:
    """Dice coefficient of two masks; ``empty`` when both are empty."""
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return empty
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


# --------------------------------------------------------------------------------------------------------------
# Lesion labelling (brats2023 / brats2024)
# --------------------------------------------------------------------------------------------------------------

def _components(mask: np.ndarray) -> np.ndarray:
    import cc3d

    return cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=26).astype(np.int64)


def merge_by_dilation(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Label the lesions of ``mask``: voxels take the number of the 26-connected component of the dilated mask they lie in.

    Dilation: ``generate_binary_structure(3, 2)``, ``iterations`` times (``get_GTseg_combinedByDilation`` /
    ``get_Predseg_combinedByDilation``). Components are numbered in C-order scan of the array as given, which is
    what cc3d does on scipy's (C-ordered) dilation output in the official scripts.
    """
    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int64)
    dilated = ndimage.binary_dilation(mask, structure=_STRUCT_18, iterations=iterations)
    return np.where(mask, _components(dilated), 0)


def _remove_small(lesions: np.ndarray, max_voxels: float) -> np.ndarray:
    """Drop lesions of ≤ ``max_voxels`` voxels (brats2024 ``save_tmp_files``), keeping the other numbers."""
    ids, counts = np.unique(lesions, return_counts=True)
    drop = ids[(counts <= max_voxels) & (ids != 0)]
    if len(drop) == 0:
        return lesions
    return np.where(np.isin(lesions, drop), 0, lesions)


def _touching_pairs(a: np.ndarray, b: np.ndarray) -> set[tuple[int, int]]:
    """(label in a, label in b) pairs whose lesions touch: b overlaps a's lesion dilated once (18-neighbourhood)."""
    pairs: set[tuple[int, int]] = set()
    if not a.any() or not b.any():
        return pairs
    for label, box in enumerate(ndimage.find_objects(a), start=1):
        if box is None:
            continue
        box = _grow(box, 1, a.shape)
        grown = ndimage.binary_dilation(a[box] == label, structure=_STRUCT_18)
        for other in np.unique(b[box][grown]).tolist():
            if other:
                pairs.add((label, int(other)))
    return pairs


def _relabel_touching(a: np.ndarray, pairs: set[tuple[int, int]]) -> np.ndarray:
    """brats2024 ``relabel_nifti_image``: each lesion of ``a`` takes a new number shared with all lesions whose
    smallest touching partner is the same (new numbers start above ``a.max()``, in order of the partners)."""
    sorted_pairs = sorted(pairs)
    next_label = int(a.max()) + 1
    new_for_partner: dict[int, int] = {}
    for _, partner in sorted_pairs:
        if partner not in new_for_partner:
            new_for_partner[partner] = next_label
            next_label += 1
    mapping: dict[int, int] = {}
    for label, partner in sorted_pairs:
        mapping.setdefault(label, new_for_partner[partner])
    out = a.copy()
    for label, new in mapping.items():
        out[a == label] = new
    return out


def _consecutive(a: np.ndarray) -> np.ndarray:
    """Renumber labels 1..n in increasing order of their values (``reorder_labels_nifti``)."""
    ids = np.unique(a)
    ids = ids[ids != 0]
    out = np.zeros_like(a)
    for new, old in enumerate(ids.tolist(), start=1):
        out[a == old] = new
    return out


def _combine_tissues_2024(lesions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """brats2024 ``combine_lesions_tissues`` followed by ``reorder_labels_nifti`` for NETC, SNFH, ET and RC.

    Every step reads the per-tissue lesion maps before combination (the official loop runs twice over the same
    uncombined inputs, so once is the same); a relabelling is applied only when more than one pair touches.
    """
    out = dict(lesions)
    for tissue, partners in _COMBINE_ORDER_2024.items():
        current = lesions[tissue]
        for partner in partners:
            pairs = _touching_pairs(current, lesions[partner])
            if len(pairs) > 1:
                current = _relabel_touching(current, pairs)
        out[tissue] = _consecutive(current)
    return out


@dataclass
class _LesionRecord:
    volume_mm3: float
    matched: bool
    dice: float
    hd95: float  # inf when missed
    nsd: dict[float, float]


def _score_gt_lesions(pred_lesions: np.ndarray, gt_lesions: np.ndarray, spacing: Sequence[float], dilation: int,
                      nsd_tolerances: Sequence[float]) -> tuple[list[_LesionRecord], int]:
    """Per GT lesion, pool every predicted lesion touching its dilation and score the pool (``get_LesionWiseScores``).

    Returns the records and the number of predicted lesions that touch no dilated GT lesion (false positives).
    """
    voxel_volume = float(np.prod(spacing))
    pred_boxes = ndimage.find_objects(pred_lesions) if pred_lesions.any() else []
    matched: set[int] = set()
    records: list[_LesionRecord] = []
    shape = gt_lesions.shape
    for label, gt_box in enumerate(ndimage.find_objects(gt_lesions) if gt_lesions.any() else [], start=1):
        if gt_box is None:
            continue
        search = _grow(gt_box, dilation, shape)
        lesion_in_search = gt_lesions[search] == label
        grown = ndimage.binary_dilation(lesion_in_search, structure=_STRUCT_18, iterations=dilation)
        ids = np.unique(pred_lesions[search][grown])
        ids = ids[ids != 0]
        matched.update(int(i) for i in ids)
        volume = int(lesion_in_search.sum()) * voxel_volume
        if len(ids) == 0:
            records.append(_LesionRecord(volume, False, 0.0, math.inf, {t: 0.0 for t in nsd_tolerances}))
            continue
        box = _grow(_union([gt_box] + [pred_boxes[i - 1] for i in ids.tolist()]), 1, shape)
        gt_mask = gt_lesions[box] == label
        pred_mask = np.isin(pred_lesions[box], ids)
        records.append(_LesionRecord(volume, True, dice(pred_mask, gt_mask), hd95_surfels(gt_mask, pred_mask, spacing),
                                     normalized_surface_dice(pred_mask, gt_mask, spacing, nsd_tolerances)))
    present = np.unique(pred_lesions)
    false_positives = sum(1 for p in present.tolist() if p != 0 and p not in matched)
    return records, false_positives


def _aggregate(records: list[_LesionRecord], false_positives: int, threshold_mm3: float, penalty: float,
               nsd_tolerances: Sequence[float]) -> dict[str, float]:
    """Lesion-wise scores and counts from per-lesion records (``get_LesionWiseResults``)."""
    kept = [r for r in records if r.volume_mm3 > threshold_mm3]
    denominator = len(kept) + false_positives
    out: dict[str, float] = {}
    if denominator:
        out["lesion_dice"] = sum(r.dice for r in kept) / denominator
        out["lesion_hd95"] = (sum(penalty if math.isinf(r.hd95) else r.hd95 for r in kept)
                              + false_positives * penalty) / denominator
        for t in nsd_tolerances:
            out[f"lesion_nsd_{t:g}"] = sum(r.nsd[t] for r in kept) / denominator
    else:  # 0/0 → NaN in the official code, then Dice/NSD 1 and HD95 0
        out["lesion_dice"] = 1.0
        out["lesion_hd95"] = 0.0
        for t in nsd_tolerances:
            out[f"lesion_nsd_{t:g}"] = 1.0
    out["tp"] = sum(1 for r in kept if r.matched)
    out["fn"] = sum(1 for r in kept if not r.matched)
    out["fp"] = false_positives
    return out


def _legacy(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float], penalty: float,
            nsd_tolerances: Sequence[float], hd_inputs: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Whole-volume Dice, HD95 (surfels; both empty 0, inf → penalty) and NSD of one region.

    ``hd_inputs``: (gt, pred) lesion maps whose HD95 is taken the brats2024 way (:func:`hd95_label_maps_2024`).
    """
    both_empty = not pred_mask.any() and not gt_mask.any()
    if both_empty:
        hd = 0.0
    elif hd_inputs is not None:
        hd = hd95_label_maps_2024(hd_inputs[0], hd_inputs[1], spacing)
    else:
        hd = hd95_surfels(gt_mask, pred_mask, spacing)
    out = {"legacy_dice": dice(pred_mask, gt_mask, empty=1.0), "legacy_hd95": penalty if math.isinf(hd) else hd}
    for t, value in normalized_surface_dice(pred_mask, gt_mask, spacing, nsd_tolerances).items():
        out[f"legacy_nsd_{t:g}"] = value
    voxel_volume = float(np.prod(spacing))
    out["gt_volume_mm3"] = float(gt_mask.sum()) * voxel_volume
    out["pred_volume_mm3"] = float(pred_mask.sum()) * voxel_volume
    return out


def _scores_2023(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], task: str) -> dict[str, dict]:
    dilation, threshold = TASKS_2023[resolve_task("brats2023", task).name]
    penalty = HD95_PENALTY["brats2023"]
    tolerances = (1.0,)
    result: dict[str, dict] = {}
    for region, region_labels in REGIONS_2023.items():
        pred_mask = np.isin(pred, region_labels)
        gt_mask = np.isin(gt, region_labels)
        records, fps = _score_gt_lesions(_components(pred_mask) if pred_mask.any() else np.zeros(pred.shape, np.int64),
                                         merge_by_dilation(gt_mask, dilation), spacing, dilation, tolerances)
        result[region] = {**_aggregate(records, fps, threshold, penalty, tolerances),
                          **_legacy(pred_mask, gt_mask, spacing, penalty, tolerances)}
    return result


def _scores_2024(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> dict[str, dict]:
    penalty = HD95_PENALTY["brats2024"]
    tolerances = (0.5, 1.0)
    gt_lesions, pred_lesions = {}, {}
    for region, region_labels in REGIONS_2024.items():
        dilation = DILATION_2024[region]
        gt_lesions[region] = merge_by_dilation(np.isin(gt, region_labels), dilation)
        pred_lesions[region] = _remove_small(merge_by_dilation(np.isin(pred, region_labels), dilation),
                                             THRESHOLD_2024[region])
    gt_lesions = _combine_tissues_2024(gt_lesions)
    pred_lesions = _combine_tissues_2024(pred_lesions)
    result: dict[str, dict] = {}
    for region in REGIONS_2024:
        records, fps = _score_gt_lesions(pred_lesions[region], gt_lesions[region], spacing, DILATION_2024[region],
                                         tolerances)
        result[region] = {**_aggregate(records, fps, THRESHOLD_2024[region], penalty, tolerances),
                          **_legacy(pred_lesions[region] > 0, gt_lesions[region] > 0, spacing, penalty, tolerances,
                                   hd_inputs=(gt_lesions[region], pred_lesions[region]))}
    return result


# --------------------------------------------------------------------------------------------------------------
# brats2025 (panoptica)
# --------------------------------------------------------------------------------------------------------------

def _panoptica_surface_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                               tolerance: float = 1.0) -> tuple[float, float]:
    """(HD95, NSD) of two non-empty masks as panoptica computes them (pooled np.percentile; erosion borders)."""
    sd_ref, sd_pred = border_distances(ref, pred, spacing)
    hd95 = float(np.percentile(np.hstack((sd_ref, sd_pred)), 95))
    return hd95, _nsd_from_distances(sd_ref, sd_pred, tolerance, sys.float_info.min)


@dataclass
class _Matching2025:
    """One region's instances and their one-to-one matching (panoptica ``MaxBipartiteMatching`` on DSC)."""

    n_ref: int
    n_pred: int
    ref_volumes_mm3: list[float]           # per reference instance, in instance order
    matched: dict[int, tuple[float, float, float]]  # reference instance → (DSC, HD95, NSD) of its matched pair


def _match_2025(ref_inst: np.ndarray, pred_inst: np.ndarray, spacing: tuple[float, ...]) -> _Matching2025:
    from scipy.optimize import linear_sum_assignment

    n_ref, n_pred = int(ref_inst.max()), int(pred_inst.max())
    ref_sizes = np.bincount(ref_inst.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_inst.ravel(), minlength=n_pred + 1)
    ref_boxes = ndimage.find_objects(ref_inst) if n_ref else []
    pred_boxes = ndimage.find_objects(pred_inst) if n_pred else []
    cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
    overlap = (ref_inst > 0) & (pred_inst > 0)
    if overlap.any():
        pair_keys = ref_inst[overlap].astype(np.int64) * (n_pred + 1) + pred_inst[overlap]
        keys, inter = np.unique(pair_keys, return_counts=True)
        for key, n in zip(keys.tolist(), inter.tolist()):
            r, p = divmod(key, n_pred + 1)
            dsc = 2.0 * n / (ref_sizes[r] + pred_sizes[p])
            if dsc >= MATCHING_THRESHOLD_2025:
                cost[r - 1, p - 1] = 1.0 - dsc
    matched: dict[int, tuple[float, float, float]] = {}
    if n_ref and n_pred:
        rows, cols = linear_sum_assignment(cost)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if cost[r, c] >= 1.0:
                continue
            box = _grow(_union([ref_boxes[r], pred_boxes[c]]), 1, ref_inst.shape)
            ref_m, pred_m = ref_inst[box] == r + 1, pred_inst[box] == c + 1
            matched[r + 1] = (dice(pred_m, ref_m), *_panoptica_surface_metrics(ref_m, pred_m, spacing))
    voxel_volume = float(np.prod(spacing))
    return _Matching2025(n_ref, n_pred, [float(v) * voxel_volume for v in ref_sizes[1:].tolist()], matched)


def _lesion_scores_2025(m: _Matching2025, penalty: float) -> dict[str, float]:
    """brats-parse-metrics ``seg``: means over matched pairs (``sq_*``), F1 = ``rq``; the edge cases and where they
    differ from the official output: ``evaluation.quantity_notes``."""
    tp = len(m.matched)
    fp, fn = m.n_pred - tp, m.n_ref - tp
    if tp:
        dscs, hds, nsds = zip(*m.matched.values())
        return {"lesion_dice": float(np.mean(dscs)), "lesion_hd95": float(np.mean(hds)),
                "lesion_nsd_1": float(np.mean(nsds)), "f1": tp / (tp + 0.5 * fp + 0.5 * fn)}
    if m.n_ref == 0 and m.n_pred == 0:  # panoptica's "no instances": NaN, as the official output has it
        return {"lesion_dice": math.nan, "lesion_hd95": math.nan, "lesion_nsd_1": math.nan, "f1": math.nan}
    # nothing matched: DSC/NSD 0 and F1 0 as official; HD95 inf there, the penalty here
    return {"lesion_dice": 0.0, "lesion_hd95": penalty, "lesion_nsd_1": 0.0, "f1": 0.0}


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def _lesion_scores_2025_met(m: _Matching2025, penalty: float) -> dict[str, float]:
    """brats-parse-metrics ``mets`` with brats-infra's thresholds: lesion-wise means over the *large* reference
    lesions (≥ :data:`MET_VOLUME_THRESHOLD_2025` mm³; a missed one scores DSC/NSD 0 and HD95 ``penalty``) and every
    false positive (0, 0, ``penalty``); NaN when the reference has no large lesion. Detection counts and F1 apart for
    large and small reference lesions (a matched lesion counts as detected when its DSC ≥
    :data:`MET_OVERLAP_THRESHOLD_2025`); false positives count in both."""
    dscs: list[float] = []
    hds: list[float] = []
    nsds: list[float] = []
    large = {"tp": 0, "fn": 0}
    small = {"tp": 0, "fn": 0}
    n_large = n_small = 0
    for lesion, volume in enumerate(m.ref_volumes_mm3, start=1):
        is_large = volume >= MET_VOLUME_THRESHOLD_2025
        counts = large if is_large else small
        n_large, n_small = n_large + is_large, n_small + (not is_large)
        if lesion in m.matched:
            dsc, hd, nsd = m.matched[lesion]
            counts["tp" if dsc >= MET_OVERLAP_THRESHOLD_2025 else "fn"] += 1
            if is_large:
                dscs.append(dsc)
                hds.append(hd)
                nsds.append(nsd)
        else:
            counts["fn"] += 1
            if is_large:
                dscs.append(0.0)
                hds.append(penalty)
                nsds.append(0.0)
    fp = m.n_pred - len(m.matched)
    dscs += [0.0] * fp
    hds += [penalty] * fp
    nsds += [0.0] * fp
    out: dict[str, float] = {}
    if n_large:
        out.update(lesion_dice=float(np.mean(dscs)), lesion_hd95=float(np.mean(hds)), lesion_nsd_1=float(np.mean(nsds)))
    else:
        out.update(lesion_dice=math.nan, lesion_hd95=math.nan, lesion_nsd_1=math.nan)
    tp = len(m.matched)
    out["f1"] = tp / (tp + 0.5 * fp + 0.5 * (m.n_ref - tp)) if m.n_ref or m.n_pred else math.nan
    for name, counts, present in (("large", large, n_large), ("small", small, n_small)):
        if present:
            out.update({f"{name}_tp": counts["tp"], f"{name}_fn": counts["fn"], f"{name}_fp": fp,
                        f"{name}_f1": _f1(counts["tp"], fp, counts["fn"])})
        else:
            out.update({f"{name}_tp": math.nan, f"{name}_fn": math.nan, f"{name}_fp": math.nan,
                        f"{name}_f1": math.nan})
    return out


def _global_scores_2025(gt_mask: np.ndarray, pred_mask: np.ndarray, spacing: tuple[float, ...],
                        penalty: float) -> dict[str, float]:
    """Whole-region DSC, HD95 and NSD @ 1 mm at the given spacing; how they relate to panoptica's ``global_*``
    (computed in voxels): ``evaluation.quantity_notes``."""
    has_gt, has_pred = bool(gt_mask.any()), bool(pred_mask.any())
    if not has_gt and not has_pred:  # NaN in the official output
        return {"legacy_dice": math.nan, "legacy_hd95": math.nan, "legacy_nsd_1": math.nan}
    if not has_gt or not has_pred:
        return {"legacy_dice": 0.0, "legacy_hd95": penalty, "legacy_nsd_1": 0.0}
    hd, nsd = _panoptica_surface_metrics(gt_mask, pred_mask, spacing)
    return {"legacy_dice": dice(pred_mask, gt_mask), "legacy_hd95": hd, "legacy_nsd_1": nsd}


def _instances(mask: np.ndarray) -> np.ndarray:
    return _components(mask) if mask.any() else np.zeros(mask.shape, np.int64)


def _scores_2025(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], task: str) -> dict[str, dict]:
    official = resolve_task("brats2025", task)
    penalty = HD95_PENALTY["brats2025"]
    voxel_volume = float(np.prod(spacing))
    result: dict[str, dict] = {}
    for region, region_labels in official.regions.items():
        pred_mask = np.isin(pred, region_labels)
        gt_mask = np.isin(gt, region_labels)
        matching = _match_2025(_instances(gt_mask), _instances(pred_mask), spacing)
        if official.name == "MET":
            lesion = _lesion_scores_2025_met(matching, penalty)
        else:
            lesion = _lesion_scores_2025(matching, penalty)
        tp = len(matching.matched)
        result[region] = {**lesion, "tp": tp, "fn": matching.n_ref - tp, "fp": matching.n_pred - tp,
                          **_global_scores_2025(gt_mask, pred_mask, spacing, penalty),
                          "gt_volume_mm3": float(gt_mask.sum()) * voxel_volume,
                          "pred_volume_mm3": float(pred_mask.sum()) * voxel_volume}
    return result


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------

def lesion_wise_scores(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float],
                       protocol: str = "brats2023", task: str = "GLI") -> dict[str, dict]:
    """Score one case: ``{region: {metric: value}}`` under ``protocol`` ('brats2023', 'brats2024', 'brats2025').

    ``pred`` and ``gt`` are label maps of equal shape in the task's labels (canonical 1 NETC, 2 SNFH, 3 ET, 4 RC but
    for brats2025 PED and MenRT), ``spacing`` the voxel size in mm per array axis (see the module docstring for the
    axis order that matches the official scripts). Metrics per region: ``lesion_dice``, ``lesion_hd95`` (mm),
    ``lesion_nsd_1`` (NSD at 1 mm; 2024 also ``lesion_nsd_0.5``), ``tp``/``fn``/``fp`` (lesion counts),
    ``legacy_dice``, ``legacy_hd95``, ``legacy_nsd_1`` (2024 also ``legacy_nsd_0.5``), ``gt_volume_mm3``,
    ``pred_volume_mm3``; brats2025 adds ``f1``, and for MET ``large_*``/``small_*`` detection counts and F1.
    Raises ValueError for unknown protocols/tasks, shape mismatches and label values outside the task's set.
    """
    _check_protocol(protocol, task)
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be 3-D arrays of one shape")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, not {spacing}")
    pred, gt = _crop_to_labels(pred, gt)
    check_label_values(pred, protocol, task, "prediction")
    check_label_values(gt, protocol, task, "ground truth")
    if protocol == "brats2023":
        return _scores_2023(pred, gt, spacing, task)
    if protocol == "brats2024":
        return _scores_2024(pred, gt, spacing)
    return _scores_2025(pred, gt, spacing, task)


#: Background kept around the labelled voxels by :func:`_crop_to_labels`: more than the largest dilation (5) plus
#: the one-voxel growth of the touching test, so that no dilation, erosion or surface reaches the crop's edge.
CROP_MARGIN = 8


def _crop_to_labels(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays cropped to the box of their non-zero voxels plus :data:`CROP_MARGIN` (one voxel when both are
    empty). Every score is unchanged — outside the box both are background, components keep their scan order —
    while a tumour in a 512×512×176 volume is scored in a fraction of the time and memory."""
    box = _bbox((pred != 0) | (gt != 0))
    if box is None:
        return pred[:1, :1, :1], gt[:1, :1, :1]
    box = _grow(box, CROP_MARGIN, gt.shape)
    return np.ascontiguousarray(pred[box]), np.ascontiguousarray(gt[box])


#: Lesion counts among the metrics (the rest are scores or volumes).
COUNT_METRICS = ("tp", "fn", "fp", "large_tp", "large_fn", "large_fp", "small_tp", "small_fn", "small_fp")


def missing_prediction_scores(gt: np.ndarray, spacing: tuple[float, float, float], protocol: str = "brats2023",
                              task: str = "GLI") -> dict[str, dict]:
    """Scores of a case whose ground truth has no prediction file, as :func:`lesion_wise_scores` returns them.

    brats2025: as brats-parse-metrics fills a missing subject (``_handle_missing_data``): every HD95 373 and every
    other score 0, whatever the ground truth holds. Its fill value 0 for the lesion counts is not followed: here a
    missing prediction detects nothing (TP 0, FP 0) and misses every ground-truth lesion (FN = their number).
    brats2023/brats2024: the official scripts score one pair of files and define nothing for a missing file; the
    case is scored as an empty prediction (what they give for an empty file).
    """
    scores = lesion_wise_scores(np.zeros_like(np.asarray(gt)), gt, spacing, protocol, task)
    if protocol != "brats2025":
        return scores
    penalty = HD95_PENALTY["brats2025"]
    for metrics in scores.values():
        for key, value in metrics.items():
            if key.endswith("_mm3"):
                continue
            if key in COUNT_METRICS:
                metrics[key] = 0 if math.isnan(value) else value
            else:
                metrics[key] = penalty if "hd95" in key else 0.0
    return scores
