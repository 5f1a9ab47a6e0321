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

``brats2025`` — BraTS/BraTS_evaluation (``configs/config_GoAT.yaml``, ``config_gli.yaml``,
    ``metrics_parser.py``) over BrainLesion/panoptica: 26-connected instances (cc3d), one-to-one maximum
    bipartite matching on DSC (``MaxBipartiteMatching``, ``matching_threshold`` 1e-6;
    ``scipy.optimize.linear_sum_assignment`` on cost 1 − DSC), no dilation, no size threshold. Lesion-wise DSC,
    HD95 and NSD are means over matched pairs only (panoptica ``sq_*``); FP and FN enter only the F1
    (``rq`` = TP / (TP + ½FP + ½FN)). Zero TP: DSC/NSD 0, HD95 ``inf``; no instances at all: NaN, reported as
    DSC/NSD 1 and HD95 0 (brats-infra ``score_panoptica.py`` fills NaN that way). HD95 ``inf`` → 373
    (``metrics_parser.py``). Panoptica's HD95 is ``np.percentile`` of the pooled two-way distances between
    erosion borders (connectivity 1); its NSD tolerance is the smallest voxel spacing (1 mm for BraTS data),
    here fixed at 1 mm. Regions: GoAT (default) ET {3}, TC {1,3}, WT {1,2,3}; task GLI adds NETC, SNFH, RC.

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
with ``img.GetSpacing()`` — as :func:`evaluate_folders` does.
"""
from __future__ import annotations

import csv
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from . import labels as _labels

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


def protocol_regions(protocol: str, task: str = "GLI") -> dict[str, tuple[int, ...]]:
    """Regions (name → canonical labels) that ``protocol`` scores for ``task``."""
    _check_protocol(protocol, task)
    if protocol == "brats2023":
        return dict(REGIONS_2023)
    if protocol == "brats2024":
        return dict(REGIONS_2024)
    return dict(REGIONS_2025_GLI if task.upper() == "GLI" else REGIONS_2025_GOAT)


def allowed_labels(protocol: str, task: str = "GLI") -> tuple[int, ...]:
    """Label values a label map may hold under ``protocol`` (0 plus the labels of its regions)."""
    values = {0}
    for region_labels in protocol_regions(protocol, task).values():
        values.update(region_labels)
    return tuple(sorted(values))


def _check_protocol(protocol: str, task: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "brats2023" and task.upper() not in TASKS_2023:
        raise ValueError(f"brats2023 has no task {task!r}; tasks: {', '.join(TASKS_2023)}")
    if protocol == "brats2024" and task.upper() != "GLI":
        raise ValueError(f"brats2024 is implemented for task GLI only (its other tasks use other labels and "
                         f"penalties), not {task!r}")


def check_label_values(array: np.ndarray, protocol: str, task: str = "GLI", name: str = "label map") -> None:
    """Raise ValueError naming ``name`` and the offending values when ``array`` holds labels outside the protocol's set."""
    allowed = allowed_labels(protocol, task)
    present = np.unique(array)
    bad = [v for v in present.tolist() if v not in allowed]
    if bad:
        shown = [int(v) if float(v).is_integer() else v for v in bad]
        raise ValueError(f"{name}: label values {shown} are not valid for protocol {protocol!r} "
                         f"(allowed: {list(allowed)}). Give a BraTS label map of whole-number labels: one in the "
                         "BraTS 2020/21 convention (4 = ET) needs --labels brats2021; other values mean the file is "
                         "not a BraTS label map (a probability or intensity image?), so export the labels again.")


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
    dilation, threshold = TASKS_2023[task.upper()]
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


def _scores_2025(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], task: str) -> dict[str, dict]:
    from scipy.optimize import linear_sum_assignment

    penalty = HD95_PENALTY["brats2025"]
    result: dict[str, dict] = {}
    for region, region_labels in protocol_regions("brats2025", task).items():
        pred_mask = np.isin(pred, region_labels)
        gt_mask = np.isin(gt, region_labels)
        ref_inst = _components(gt_mask) if gt_mask.any() else np.zeros(gt.shape, np.int64)
        pred_inst = _components(pred_mask) if pred_mask.any() else np.zeros(pred.shape, np.int64)
        n_ref, n_pred = int(ref_inst.max()), int(pred_inst.max())
        ref_boxes = ndimage.find_objects(ref_inst) if n_ref else []
        pred_boxes = ndimage.find_objects(pred_inst) if n_pred else []
        # DSC of every overlapping (ref, pred) pair
        cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
        overlap = (ref_inst > 0) & (pred_inst > 0)
        if overlap.any():
            pairs, inter = np.unique(np.stack([ref_inst[overlap], pred_inst[overlap]]), axis=1, return_counts=True)
            ref_sizes = np.bincount(ref_inst.ravel(), minlength=n_ref + 1)
            pred_sizes = np.bincount(pred_inst.ravel(), minlength=n_pred + 1)
            for (r, p), n in zip(pairs.T.tolist(), inter.tolist()):
                dsc = 2.0 * n / (ref_sizes[r] + pred_sizes[p])
                if dsc >= MATCHING_THRESHOLD_2025:
                    cost[r - 1, p - 1] = 1.0 - dsc
        matches: list[tuple[int, int]] = []
        if n_ref and n_pred:
            rows, cols = linear_sum_assignment(cost)
            matches = [(int(r) + 1, int(c) + 1) for r, c in zip(rows, cols) if cost[r, c] < 1.0]
        dscs, hds, nsds = [], [], []
        for r, p in matches:
            box = _grow(_union([ref_boxes[r - 1], pred_boxes[p - 1]]), 1, gt.shape)
            ref_m, pred_m = ref_inst[box] == r, pred_inst[box] == p
            dscs.append(dice(pred_m, ref_m))
            hd, nsd = _panoptica_surface_metrics(ref_m, pred_m, spacing)
            hds.append(hd)
            nsds.append(nsd)
        tp = len(matches)
        fp, fn = n_pred - tp, n_ref - tp
        if tp:
            lesion = {"lesion_dice": float(np.mean(dscs)), "lesion_hd95": float(np.mean(hds)),
                      "lesion_nsd_1": float(np.mean(nsds)), "f1": tp / (tp + 0.5 * fp + 0.5 * fn)}
        elif n_ref == 0 and n_pred == 0:  # NaN in panoptica; NaN → 1 (DSC, NSD) / 0 (HD95) as brats-infra fills it
            lesion = {"lesion_dice": 1.0, "lesion_hd95": 0.0, "lesion_nsd_1": 1.0, "f1": math.nan}
        else:
            lesion = {"lesion_dice": 0.0, "lesion_hd95": penalty, "lesion_nsd_1": 0.0, "f1": 0.0}
        if gt_mask.any() and pred_mask.any():
            g_hd, g_nsd = _panoptica_surface_metrics(gt_mask, pred_mask, spacing)
        elif gt_mask.any() or pred_mask.any():
            g_hd, g_nsd = penalty, 0.0
        else:
            g_hd, g_nsd = 0.0, 1.0
        voxel_volume = float(np.prod(spacing))
        result[region] = {**lesion, "tp": tp, "fn": fn, "fp": fp,
                          "legacy_dice": dice(pred_mask, gt_mask, empty=1.0), "legacy_hd95": g_hd,
                          "legacy_nsd_1": g_nsd, "gt_volume_mm3": float(gt_mask.sum()) * voxel_volume,
                          "pred_volume_mm3": float(pred_mask.sum()) * voxel_volume}
    return result


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------

def lesion_wise_scores(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float],
                       protocol: str = "brats2023", task: str = "GLI") -> dict[str, dict]:
    """Score one case: ``{region: {metric: value}}`` under ``protocol`` ('brats2023', 'brats2024', 'brats2025').

    ``pred`` and ``gt`` are canonical label maps (1 NETC, 2 SNFH, 3 ET, 4 RC) of equal shape, ``spacing`` the voxel
    size in mm per array axis (see the module docstring for the axis order that matches the official scripts).
    Metrics per region: ``lesion_dice``, ``lesion_hd95`` (mm), ``lesion_nsd_1`` (NSD at 1 mm; 2024 also
    ``lesion_nsd_0.5``), ``tp``/``fn``/``fp`` (lesion counts), ``legacy_dice``, ``legacy_hd95``, ``legacy_nsd_1``
    (2024 also ``legacy_nsd_0.5``), ``gt_volume_mm3``, ``pred_volume_mm3``; brats2025 adds ``f1``.
    Raises ValueError for unknown protocols/tasks, shape mismatches and label values outside the protocol's set.
    """
    _check_protocol(protocol, task)
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be 3-D arrays of one shape")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, not {spacing}")
    check_label_values(pred, protocol, task, "prediction")
    check_label_values(gt, protocol, task, "ground truth")
    if protocol == "brats2023":
        return _scores_2023(pred, gt, spacing, task)
    if protocol == "brats2024":
        return _scores_2024(pred, gt, spacing)
    return _scores_2025(pred, gt, spacing, task)


def _case_id(name: str) -> str:
    stem = name[: -len(".nii.gz")]
    return stem[: -len("-seg")] if stem.endswith("-seg") else stem


def _read_labels(path: Path, convention: str, protocol: str, task: str):
    import SimpleITK as sitk

    from .case import read_image

    image = read_image(path)  # refuses truncated NIfTI files, which ITK's reader silently fills with zeros
    array = sitk.GetArrayFromImage(image)
    if convention == "brats2021":
        try:
            array = _labels.brats2021_to_canonical(array)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    elif convention != "canonical":
        raise ValueError(f"labels must be 'canonical' or 'brats2021', not {convention!r}")
    check_label_values(array, protocol, task, str(path))
    # (z, y, x) → (x, y, z), the index order of the official (nibabel) scripts, with spacing (x, y, z)
    return image, array.transpose(2, 1, 0), tuple(image.GetSpacing())


def _check_geometry(pred_path: Path, pred_img, gt_path: Path, gt_img, tolerance: float = 1e-4) -> None:
    problems = []
    if pred_img.GetSize() != gt_img.GetSize():
        problems.append(f"size {pred_img.GetSize()} vs {gt_img.GetSize()}")
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        a, b = np.array(getattr(pred_img, what)()), np.array(getattr(gt_img, what)())
        if a.shape != b.shape or not np.allclose(a, b, atol=tolerance):
            problems.append(f"{what[3:].lower()} {tuple(a.round(5))} vs {tuple(b.round(5))}")
    if problems:
        raise ValueError(f"{pred_path} and {gt_path} differ in geometry: " + "; ".join(problems))


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path, protocol: str = "brats2023",
                     task: str = "GLI", labels: str = "canonical") -> dict:
    """Score every prediction ``<id>.nii.gz`` in ``pred_dir`` against ``gt_dir/<id>.nii.gz`` or ``<id>-seg.nii.gz``.

    Checks geometry and label values (ValueError naming the file); ``labels='brats2021'`` converts both label maps
    from the BraTS 2020/21 convention (4 = ET) first. Ground truths without a prediction are scored with the
    protocol's penalties (empty prediction) and listed under ``missing``; a prediction without ground truth is an
    error. Writes ``per_case.csv`` (one row per case and region), ``summary.csv`` (mean, median, std, n per region
    and metric) and ``boxplot_<region>.png``; returns ``{'protocol', 'task', 'cases', 'missing', 'summary':
    {region: {metric: {'mean', 'median', 'std', 'n'}}}, 'files'}``.
    """
    _check_protocol(protocol, task)
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    preds = {_case_id(p.name): p for p in sorted(pred_dir.glob("*.nii.gz"))}
    gts: dict[str, Path] = {}
    for p in sorted(gt_dir.glob("*.nii.gz")):
        case = _case_id(p.name)
        if case in gts:
            raise ValueError(f"two ground truths for case {case!r}: {gts[case].name} and {p.name}")
        gts[case] = p
    orphans = sorted(set(preds) - set(gts))
    if orphans:
        raise ValueError(f"predictions without ground truth in {gt_dir}: {orphans}")
    if not gts:
        raise ValueError(f"no ground truth (*.nii.gz) in {gt_dir}")

    rows: list[dict] = []
    missing: list[str] = []
    for case, gt_path in gts.items():
        gt_img, gt_arr, spacing = _read_labels(gt_path, labels, protocol, task)
        if case in preds:
            pred_img, pred_arr, _ = _read_labels(preds[case], labels, protocol, task)
            _check_geometry(preds[case], pred_img, gt_path, gt_img)
        else:
            missing.append(case)
            pred_arr = np.zeros_like(gt_arr)
        scores = lesion_wise_scores(pred_arr, gt_arr, spacing, protocol, task)
        for region, metrics in scores.items():
            rows.append({"case": case, "region": region, "missing_prediction": int(case not in preds), **metrics})

    out_dir.mkdir(parents=True, exist_ok=True)
    metric_names = [k for k in rows[0] if k not in ("case", "region", "missing_prediction")]
    per_case = out_dir / "per_case.csv"
    with per_case.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "region", "missing_prediction", *metric_names])
        writer.writeheader()
        writer.writerows(rows)

    regions = list(dict.fromkeys(r["region"] for r in rows))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for region in regions:
        summary[region] = {}
        for metric in metric_names:
            values = np.array([r[metric] for r in rows if r["region"] == region], dtype=float)
            values = values[~np.isnan(values)]
            summary[region][metric] = {
                "mean": float(values.mean()) if len(values) else math.nan,
                "median": float(np.median(values)) if len(values) else math.nan,
                "std": float(values.std()) if len(values) else math.nan,
                "n": int(len(values)),
            }
    summary_csv = out_dir / "summary.csv"
    with summary_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["region", "metric", "mean", "median", "std", "n"])
        for region, metrics in summary.items():
            for metric, stats in metrics.items():
                writer.writerow([region, metric, stats["mean"], stats["median"], stats["std"], stats["n"]])

    plots = [_box_plot(out_dir / f"boxplot_{region}.png", region,
                       [r for r in rows if r["region"] == region], protocol) for region in regions]
    return {"protocol": protocol, "task": task, "cases": list(gts), "missing": missing, "summary": summary,
            "files": {"per_case": per_case, "summary": summary_csv, "plots": plots}}


def _box_plot(path: Path, region: str, rows: list[dict], protocol: str) -> Path:
    """Box plot of one region's per-case scores: overlap scores (0–1) left, HD95 (mm) right. No pyplot state."""
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
    fig.savefig(path, dpi=100)
    return path
