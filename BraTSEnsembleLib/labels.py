"""BraTS label conventions, derived regions and the mapping of a model's classes onto them.

The library's canonical label space is the BraTS 2023+ one: 0 background, 1 NETC (non-enhancing tumour core /
necrosis), 2 SNFH (surrounding non-enhancing FLAIR hyperintensity / oedema), 3 ET (enhancing tumour), 4 RC
(resection cavity, BraTS 2024 post-treatment glioma). BraTS 2020/21 used 1 NCR, 2 ED, 4 ET.
Derived regions: TC = NETC ∪ ET, WT = NETC ∪ SNFH ∪ ET (RC is not tumour).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

BACKGROUND, NETC, SNFH, ET, RC = 0, 1, 2, 3, 4

LABEL_NAMES: dict[int, str] = {BACKGROUND: "background", NETC: "NETC", SNFH: "SNFH", ET: "ET", RC: "RC"}


@dataclass(frozen=True)
class Region:
    """A named tumour region: the set of canonical labels it is made of, a display colour and a description."""

    name: str
    labels: tuple[int, ...]
    color: tuple[float, float, float]
    description: str


# Colours follow the usual BraTS figures (ET yellow, NETC red, SNFH green); TC/WT are derived regions.
REGIONS: dict[str, Region] = {
    "ET": Region("ET", (ET,), (1.0, 0.85, 0.0), "enhancing tumour"),
    "NETC": Region("NETC", (NETC,), (0.85, 0.1, 0.1), "non-enhancing tumour core"),
    "SNFH": Region("SNFH", (SNFH,), (0.2, 0.75, 0.25), "surrounding non-enhancing FLAIR hyperintensity"),
    "TC": Region("TC", (NETC, ET), (0.9, 0.45, 0.1), "tumour core (NETC + ET)"),
    "WT": Region("WT", (NETC, SNFH, ET), (0.3, 0.6, 0.95), "whole tumour (NETC + SNFH + ET)"),
    "RC": Region("RC", (RC,), (0.55, 0.35, 0.75), "resection cavity"),
}

# Words by which datasets name their classes, mapped to canonical labels. Checked in this order; the first pattern
# that matches a class name wins (so "non-enhancing" is tested before "enhancing").
_CLASS_NAME_PATTERNS: tuple[tuple[str, int], ...] = (
    (r"^(background|bg|0)$", BACKGROUND),
    (r"resect|cavity|^rc$", RC),
    (r"snfh|edema|oedema|^ed$|flair.?hyper|peritumou?ral", SNFH),
    (r"netc|ncr|necro|non.?enhanc|nonenh|^net$|^ncr.?net$", NETC),
    (r"^et$|enhanc", ET),
)

# BraTS 2020/21 label values → canonical values.
BRATS2021_TO_CANONICAL: dict[int, int] = {0: BACKGROUND, 1: NETC, 2: SNFH, 4: ET}


def canonical_label_for_class_name(name: str) -> int | None:
    """Canonical BraTS label for a dataset class name (e.g. 'edema' → SNFH), or None if the name is not known."""
    key = name.strip().lower().replace("_", " ")
    for pattern, label in _CLASS_NAME_PATTERNS:
        if re.search(pattern, key):
            return label
    return None


def class_mapping_from_dataset_labels(labels: Mapping[str, int]) -> dict[int, int]:
    """Map a label-based nnU-Net ``dataset.json`` ``labels`` dict to ``{model value: canonical label}``.

    Names are recognised by :func:`canonical_label_for_class_name`. When some names are not recognised (datasets
    that call their classes '1', '2', '3' or 'label1'), the model's values are taken as BraTS 2023 values, which is
    what nnU-Net's own BraTS 2023/2024 conversions use.
    Raises ValueError when two classes map to one label or when a value is not a valid BraTS label.
    """
    by_name = {int(v): canonical_label_for_class_name(k) for k, v in labels.items()}
    if any(label is None for label in by_name.values()):
        mapping = {v: v for v in by_name}
    else:
        mapping = {v: int(label) for v, label in by_name.items()}  # type: ignore[arg-type]
    values = list(mapping.values())
    if len(set(values)) != len(values):
        raise ValueError(f"classes {dict(labels)} map more than one class onto one BraTS label: {mapping}")
    unknown = [v for v in values if v not in LABEL_NAMES]
    if unknown:
        raise ValueError(f"classes {dict(labels)} have values {unknown} that are not BraTS labels (0-4)")
    return mapping


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a region ('ET', 'NETC', 'SNFH', 'TC', 'WT', 'RC') in a canonical label map."""
    return np.isin(labels, REGIONS[region].labels)


def brats2021_to_canonical(labels: np.ndarray) -> np.ndarray:
    """Convert a BraTS 2020/21 label map (1 NCR, 2 ED, 4 ET) to canonical BraTS 2023 values."""
    return remap(labels, BRATS2021_TO_CANONICAL)


def remap(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Replace label values by ``mapping``; values not in the mapping raise ValueError."""
    present = np.unique(labels)
    missing = [int(v) for v in present if int(v) not in mapping]
    if missing:
        raise ValueError(f"label values {missing} have no mapping (known: {sorted(mapping)})")
    lut = np.zeros(int(max(max(mapping), present.max(initial=0))) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        lut[source] = target
    return lut[labels]


def present_regions(label_values: Sequence[int]) -> list[str]:
    """Regions worth reporting for a model whose canonical labels are ``label_values`` (RC only when present)."""
    names = ["ET", "NETC", "SNFH", "TC", "WT"]
    if RC in label_values:
        names.append("RC")
    return names
