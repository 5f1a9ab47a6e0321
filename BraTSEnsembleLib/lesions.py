"""Statistics per reported class, with a per-lesion table: how many lesions, how large, and where.

Reported names: for BraTS models the regions ET, NETC, SNFH, TC, WT (RC when labelled), exactly as
:func:`BraTSEnsembleLib.stats.region_statistics` reports them; for a model with its own label set (see
:mod:`BraTSEnsembleLib.labelsets`) each of its classes, by its ``dataset.json`` name, with its label ``value``.
Each has ``voxels``, ``volume_ml`` (voxels × voxel volume / 1000) and ``lesions`` (the number of lesions).

**Lesions** are the 26-connected components of a name's mask, as the official BraTS lesion-wise evaluation finds
lesions (:data:`BraTSEnsembleLib.stats.LESION_CONNECTIVITY`). Each is listed with ``id`` (1 = the largest; ties in
the raster order of their first voxel), ``voxels``, ``volume_ml``, ``volume_mm3`` and its centre: the mean of its
voxel centres in physical millimetres, given twice — ``centre_lps_mm`` (x towards the patient's Left, y Posterior,
z Superior: the coordinates of ITK/SimpleITK, DICOM and ITK-SNAP) and ``centre_ras_mm`` (= (−x, −y, z): the
coordinates of 3D Slicer and of NIfTI's world space), so that a lesion can be found in any viewer.

**Minimum lesion volume** (``--min-lesion-volume MM3``, manifest key ``min_lesion_volume_mm3``): a lesion whose
volume (voxels × voxel volume) is below the minimum is neither counted in ``lesions`` nor listed; how many there
were is reported as ``lesions_below_minimum``. Such lesions are **not removed**: they stay in the label map and in
``voxels``/``volume_ml``, because the segmentation is the models' and a small candidate the count leaves out may
still matter to the reader; the minimum makes the counts comparable with evaluations that score lesions above a
size (the CT metastasis system reports Dice above 100 mm³). Without a minimum every lesion is counted, and BraTS
results are those of :func:`~BraTSEnsembleLib.stats.region_statistics`, number for number.
"""
from __future__ import annotations

from typing import Any, Mapping

import cc3d
import numpy as np
import SimpleITK as sitk

from .labelsets import LabelSet
from .stats import LESION_CONNECTIVITY

#: Columns of the per-lesion CSV (``<id>_lesions.csv``), one row per lesion.
LESION_COLUMNS: tuple[str, ...] = (
    "region", "lesion", "voxels", "volume_ml", "volume_mm3", "centre_lps_x_mm", "centre_lps_y_mm", "centre_lps_z_mm",
    "centre_ras_x_mm", "centre_ras_y_mm", "centre_ras_z_mm")


def lesion_table(mask: np.ndarray, reference: sitk.Image,
                 min_volume_mm3: float | None = None) -> tuple[list[dict[str, Any]], int]:
    """``(lesions, lesions_below_minimum)`` of a boolean mask (z, y, x) on the reference image's grid: one record
    per 26-connected component at least ``min_volume_mm3`` large, largest first (see the module docstring)."""
    voxel_mm3 = float(np.prod(list(reference.GetSpacing())))
    if not mask.any():
        return [], 0
    components = cc3d.connected_components(mask.astype(np.uint8, copy=False), connectivity=LESION_CONNECTIVITY)
    found = cc3d.statistics(components)
    counts, centroids = found["voxel_counts"], found["centroids"]
    del components
    order = sorted(range(1, len(counts)), key=lambda i: -int(counts[i]))  # stable: raster order on ties
    lesions, below = [], 0
    for index in order:
        voxels = int(counts[index])
        if voxels == 0:
            continue
        volume_mm3 = voxels * voxel_mm3
        if min_volume_mm3 is not None and volume_mm3 < min_volume_mm3:
            below += 1
            continue
        z, y, x = (float(v) for v in centroids[index])
        lps = reference.TransformContinuousIndexToPhysicalPoint((x, y, z))
        lesions.append({"id": len(lesions) + 1, "voxels": voxels, "volume_ml": round(volume_mm3 / 1000.0, 4),
                        "volume_mm3": round(volume_mm3, 2), "centre_lps_mm": [round(v, 2) for v in lps],
                        "centre_ras_mm": [round(-lps[0], 2), round(-lps[1], 2), round(lps[2], 2)]})
    return lesions, below


def class_statistics(labels: np.ndarray, reference: sitk.Image, label_set: LabelSet,
                     min_volume_mm3: float | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, list]]:
    """``(statistics, lesions)`` of a label map (z, y, x) on the reference grid: ``{name: {"voxels", "volume_ml",
    "lesions"[, "value"][, "lesions_below_minimum"]}}`` and ``{name: [lesion records]}`` (module docstring)."""
    voxel_ml = float(np.prod(list(reference.GetSpacing()))) / 1000.0  # as stats.region_statistics computes it
    statistics: dict[str, dict[str, Any]] = {}
    lesions: dict[str, list] = {}
    for name in label_set.region_names(labels):
        mask = label_set.mask(labels, name)
        voxels = int(np.count_nonzero(mask))
        table, below = lesion_table(mask, reference, min_volume_mm3)
        entry: dict[str, Any] = {} if label_set.is_brats else {"value": label_set.value_of(name)}
        entry.update({"voxels": voxels, "volume_ml": round(voxels * voxel_ml, 4), "lesions": len(table)})
        if min_volume_mm3 is not None:
            entry["lesions_below_minimum"] = below
        statistics[name], lesions[name] = entry, table
    return statistics, lesions


def lesion_rows(lesions: Mapping[str, list]) -> list[dict[str, Any]]:
    """One flat row per lesion (columns :data:`LESION_COLUMNS`) for the per-lesion CSV."""
    rows = []
    for region, table in lesions.items():
        for lesion in table:
            lps, ras = lesion["centre_lps_mm"], lesion["centre_ras_mm"]
            rows.append({"region": region, "lesion": lesion["id"], "voxels": lesion["voxels"],
                         "volume_ml": lesion["volume_ml"], "volume_mm3": lesion["volume_mm3"],
                         **{f"centre_lps_{a}_mm": v for a, v in zip("xyz", lps)},
                         **{f"centre_ras_{a}_mm": v for a, v in zip("xyz", ras)}})
    return rows
