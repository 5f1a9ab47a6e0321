"""Per-voxel uncertainty of an ensemble: how much its members disagree, and how unsure their fused mean is.

Two maps, both in [0, 1] on the case grid:

- **disagreement** — the fraction of members whose own labels (argmax of their probabilities; nested thresholds for
  region-based members, see :func:`BraTSEnsembleLib.ensemble.fused_labels`) differ from the ensemble's fused label
  (before postprocessing). 0 where all members agree; with one member it is 0 everywhere.
  Counted in a streaming way: per class, how many members voted for it (uint8), so memory does not grow with the
  number of members.
- **entropy** — the Shannon entropy of the fused class probabilities divided by log(number of classes): 0 for a
  certain voxel, 1 for a uniform one. In nested-region space (WT, TC, ET are independent sigmoids, not one
  distribution) it is the mean of the three regions' binary entropies over log 2. Meaningful for a single model too.

Each is summarised per region (mean inside the final ET, TC, WT … masks) in the statistics JSON, and written as a
map with ``--save-uncertainty``.

**Agreement of each member with the ensemble** (:func:`member_agreement`): the Dice of each member's own labels with
the ensemble's final labels (after postprocessing), per region (WT, TC, ET), recorded in the statistics JSON as
``member_agreement`` and shown in the demo's report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .labels import region_mask
from .members.base import Probabilities

#: ``mask(labels, name)``: the boolean mask of a reported name (a BraTS region by default; a class of a model with
#: its own label set through :meth:`BraTSEnsembleLib.labelsets.LabelSet.mask`).
MaskFunction = Callable[[np.ndarray, str], np.ndarray]


@dataclass
class VoteCounter:
    """Counts, per voxel and canonical label, how many members' own labels chose it."""

    _counts: dict[int, np.ndarray] = field(default_factory=dict)
    members: int = 0

    def add(self, member_labels: np.ndarray) -> None:
        """Add one member's label map (canonical values)."""
        if self.members == 255:
            raise ValueError("more than 255 members cannot be counted in uint8")
        for label in np.unique(member_labels):
            counts = self._counts.get(int(label))
            if counts is None:
                counts = self._counts[int(label)] = np.zeros(member_labels.shape, dtype=np.uint8)
            counts += member_labels == label
        self.members += 1

    def disagreement(self, fused_labels: np.ndarray) -> np.ndarray:
        """Fraction of members whose label differs from ``fused_labels`` (float32)."""
        if self.members == 0:
            raise ValueError("no member has been counted")
        agreeing = np.zeros(fused_labels.shape, dtype=np.uint8)
        for label, counts in self._counts.items():
            where = fused_labels == label
            agreeing[where] = counts[where]
        return (1.0 - agreeing.astype(np.float32) / np.float32(self.members)).astype(np.float32)


def normalised_entropy(probabilities: Probabilities) -> np.ndarray:
    """Entropy of the class probabilities at each voxel divided by log(C) (float32, 0 certain … 1 uniform); for
    region probabilities the mean binary entropy of the regions over log 2."""
    array = probabilities.array
    if probabilities.is_regions:
        entropy = np.zeros(array.shape[1:], dtype=np.float32)
        for p in array:
            q = np.clip(p, 1e-7, 1 - 1e-7)
            entropy -= q * np.log(q) + (1 - q) * np.log1p(-q)
        return (entropy / np.float32(len(array) * np.log(2))).clip(0.0, 1.0).astype(np.float32)
    classes = array.shape[0]
    if classes < 2:
        return np.zeros(array.shape[1:], dtype=np.float32)
    entropy = np.zeros(array.shape[1:], dtype=np.float32)
    for channel in array:  # channel by channel: no second C × grid array
        positive = channel > 0
        entropy[positive] -= channel[positive] * np.log(channel[positive])
    return (entropy / np.float32(np.log(classes))).clip(0.0, 1.0).astype(np.float32)


def summarise(maps: dict[str, np.ndarray], labels: np.ndarray, regions: list[str],
              mask_of: MaskFunction = region_mask) -> dict[str, dict[str, float]]:
    """``{region: {"mean_<map>": value}}``: each map's mean inside each region of the final labels (None if empty)."""
    summary: dict[str, dict[str, float]] = {}
    for region in regions:
        mask = mask_of(labels, region)
        summary[region] = {
            f"mean_{name}": (round(float(values[mask].mean()), 4) if mask.any() else None)  # type: ignore[misc]
            for name, values in maps.items()
        }
    return summary


#: Regions in which each member's agreement with the ensemble is measured.
AGREEMENT_REGIONS: tuple[str, ...] = ("WT", "TC", "ET")


def region_dice(a: np.ndarray, b: np.ndarray, region: str, mask_of: MaskFunction = region_mask) -> float:
    """Dice of one region of two canonical label maps (1.0 when the region is empty in both)."""
    mask_a, mask_b = mask_of(a, region), mask_of(b, region)
    total = int(mask_a.sum()) + int(mask_b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(mask_a, mask_b).sum()) / total


def member_agreement(member_labels: Mapping[str, np.ndarray], final_labels: np.ndarray,
                     regions: Sequence[str] = AGREEMENT_REGIONS,
                     mask_of: MaskFunction = region_mask) -> dict[str, dict[str, float]]:
    """``{member: {region: Dice}}`` of each member's own label map with the ensemble's final labels (per class of
    its own label set, with ``regions`` and ``mask_of`` of that set)."""
    return {name: {region: region_dice(labels, final_labels, region, mask_of) for region in regions}
            for name, labels in member_labels.items()}

