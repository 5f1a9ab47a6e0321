"""Per-region statistics of a BraTS label map: voxels, volume in mL and the number of separate lesions."""
from __future__ import annotations

from typing import Iterable

import cc3d
import numpy as np

from .labels import REGIONS, present_regions, region_mask

#: Lesions are counted as 26-connected components, as the official BraTS lesion-wise evaluation finds lesions.
LESION_CONNECTIVITY = 26

STATISTICS_COLUMNS: tuple[str, ...] = ("voxels", "volume_ml", "lesions")


def region_statistics(labels: np.ndarray, spacing: Iterable[float], regions: Iterable[str] | None = None) -> dict:
    """``{region: {"voxels", "volume_ml", "lesions"}}`` for ET, NETC, SNFH, TC, WT (and RC when labelled).

    ``spacing`` is the voxel size in mm (any axis order); volumes are voxels × voxel volume / 1000.
    """
    voxel_ml = float(np.prod(list(spacing))) / 1000.0
    names = list(regions) if regions is not None else present_regions(np.unique(labels).tolist())
    result = {}
    for name in names:
        if name not in REGIONS:
            raise ValueError(f"unknown region {name!r}")
        mask = region_mask(labels, name)
        voxels = int(np.count_nonzero(mask))
        lesions = int(cc3d.connected_components(mask.astype(np.uint8), connectivity=LESION_CONNECTIVITY,
                                                return_N=True)[1]) if voxels else 0
        result[name] = {"voxels": voxels, "volume_ml": round(voxels * voxel_ml, 4), "lesions": lesions}
    return result


def cohort_rows(case_statistics: dict[str, dict]) -> list[dict]:
    """One flat row per case (``case_id``, ``ET_volume_ml``, ``ET_lesions`` …) for the cohort CSV."""
    rows = []
    for case_id, regions in sorted(case_statistics.items()):
        row: dict = {"case_id": case_id}
        for region, values in regions.items():
            for column in STATISTICS_COLUMNS:
                row[f"{region}_{column}"] = values[column]
        rows.append(row)
    return rows


def cohort_columns(rows: list[dict]) -> list[str]:
    """Columns of the cohort CSV in a stable order (case id, then each region's columns)."""
    columns = ["case_id"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns
