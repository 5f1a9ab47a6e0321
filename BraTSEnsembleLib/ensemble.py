"""Streaming fusion of member probabilities and the labels they give.

Members are added one at a time: only the running weighted sum (float32, C × case grid) and the member being added
are in memory (plus one small weight record per member). The arithmetic is that of ``nnUNetv2_ensemble`` (float32
sum, then division by the total weight; argmax with ties to the lower channel), so equal weights reproduce its labels
voxel for voxel.

**Class-weighted fusion.** Each member ``m`` has one weight per class ``c``: ``w[m,c] = weight[m] ·
class_weight[m,c]`` (a class without a class weight has factor 1). The fused probability of class ``c`` is the
weighted mean *per class*

    p[c] = Σ_m w[m,c] · p[m,c]  /  Σ_m w[m,c]

so a member trusted more for ET than for oedema can count more in the ET channel only. (The alternative, weighting
the members' probabilities and renormalising every voxel to sum 1, would let a class weight of one class change the
other classes' fused values; the per-class mean keeps each channel a convex combination of the members' values for
that class, which is what the BraTS teams' class-wise weights mean. The channels of the result need not sum to 1;
labels come from their argmax.) A member that does not predict class ``c`` (a model without RC) contributes
probability 0 to it, with its weight still in the denominator, as before.

With no class weights, or with the same factor for every class of a member, ``w[m,c]`` does not depend on ``c`` and
the computation is exactly the previous one — the same float32 products, the same running sum, one division by the
same total (summed in member order as Python floats) — so the nnU-Net parity (``nnUNetv2_ensemble``) is unchanged
bit for bit.

**Fusion space.** Members predict in label space (softmax over canonical labels) or in nested-region space
(region-based models: sigmoid probabilities of WT, TC and ET; see :mod:`BraTSEnsembleLib.members.base`).

* All members label-based → **label space**, exactly as above (nnU-Net parity unchanged): labels by argmax.
* Any member region-based → **nested-region space** (channels WT, TC, ET; no background). A label-space member is
  converted voxel by voxel before it is summed (float32, added left to right)::

      P(WT) = P(NETC) + P(SNFH) + P(ET)      P(TC) = P(NETC) + P(ET)      P(ET) = P(ET)

  (a class the member does not predict counts 0; its RC and background probabilities have no region and are
  dropped). Region members enter as they are. The fused region probabilities are the weighted mean per region, as
  above. Labels follow nnU-Net's rule for regions with ``regions_class_order`` WT, TC, ET: start from 0, then for
  each region in that order write its label where the fused p > 0.5, later regions overwriting earlier ones:
  P(WT) > 0.5 → SNFH, P(TC) > 0.5 → NETC, P(ET) > 0.5 → ET (canonical values). Region space cannot produce RC.
* **Class weights in region space.** The manifest names class weights by label (background, NETC, SNFH, ET, RC);
  a region channel takes the factor of the label it writes: WT ← SNFH's factor, TC ← NETC's, ET ← ET's — for
  region members and converted label members alike, so the weighted mean stays a convex combination per region.
  The background and RC factors have no region and are not used in region space.

**Choosing the space.** ``StreamingEnsemble(space=fusion_space(members))`` fixes the space before the first
member (:func:`fusion_space` reads each member's ``space``); then every label member is converted on its own as it
is added, and the running sum is the only full-size array held (3 channels in region space). A label-space ensemble
refuses a region member. ``StreamingEnsemble()`` without a space decides from the members: it sums in label space
until the first region-based member arrives and then converts the running label sum with the same formulas. The
conversion is linear, so this equals converting each earlier member on its own (the same float32 operations when a
single label member came first; otherwise equal up to float32 rounding of the summation order) — provided every
earlier label member has one factor for NETC, SNFH and ET (no class weights, or equal ones). When one does not, its
per-region weights cannot be recovered from the sum and the switch is refused with a ValueError: fix the space in
advance (or list region-based members first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import numpy as np

from .labels import ET, NETC, SNFH
from .members.base import LABEL_SPACE, NESTED_REGIONS, REGION_SPACE, REGION_WRITES, Probabilities


def _accumulate(total: np.ndarray | None, aligned: np.ndarray, per_channel: Sequence[float]) -> np.ndarray:
    """total + Σ_c w[c]·aligned[c] in float32; one scalar weight takes exactly nnUNetv2_ensemble's arithmetic."""
    if total is not None and aligned.shape != total.shape:
        raise ValueError(f"member probabilities on grid {aligned.shape[1:]} do not match {total.shape[1:]}")
    if all(w == per_channel[0] for w in per_channel):  # one scalar for every class: the nnU-Net arithmetic
        w = per_channel[0]
        if total is None:
            return aligned.astype(np.float32, copy=True) if w == 1.0 else aligned * np.float32(w)
        if w == 1.0:
            total += aligned
        else:
            total += aligned * np.float32(w)
        return total
    if total is None:  # channel by channel, so no second full-size array is made
        total = np.empty(aligned.shape, dtype=np.float32)
        for index, w in enumerate(per_channel):
            np.multiply(aligned[index], np.float32(w), out=total[index])
        return total
    for index, w in enumerate(per_channel):
        total[index] += aligned[index] * np.float32(w)
    return total


@dataclass
class StreamingEnsemble:
    """Class-weighted average of member probabilities, accumulated member by member (see the module docstring).

    ``space``: None (default) decides the fusion space from the members; ``LABEL_SPACE`` or ``REGION_SPACE`` fixes it.
    """

    space: str | None = None
    _sum: np.ndarray | None = None
    _labels: tuple[int, ...] = ()
    #: running sum in nested-region space (channels NESTED_REGIONS); only one of _sum/_region_sum is held
    _region_sum: np.ndarray | None = None
    _has_region_member: bool = False
    #: (weight, class factors by canonical label) of every member added, in order (for the per-class totals).
    _weights: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    members: int = field(default=0)

    def __post_init__(self) -> None:
        if self.space not in (None, LABEL_SPACE, REGION_SPACE):
            raise ValueError(f"unknown fusion space {self.space!r}; use {LABEL_SPACE!r} or {REGION_SPACE!r}")

    @property
    def fusion_space(self) -> str:
        """LABEL_SPACE while every member so far is label-based (and no space was fixed), else REGION_SPACE."""
        if self.space is not None:
            return self.space
        return REGION_SPACE if self._has_region_member else LABEL_SPACE

    @property
    def labels(self) -> tuple[Hashable, ...]:
        """Names of the fused channels: canonical labels (ascending) in label space, WT/TC/ET in region space."""
        return NESTED_REGIONS if self.fusion_space == REGION_SPACE else self._labels

    def add(self, probabilities: Probabilities, weight: float = 1.0,
            class_weights: Mapping[int, float] | None = None) -> None:
        """Add one member's probabilities with ``weight`` (> 0) and optional per-class factors.

        ``class_weights`` maps canonical labels to factors (> 0) of ``weight``; classes not named get factor 1.
        In region space a region takes the factor of the label it writes (WT ← SNFH, TC ← NETC, ET ← ET).
        """
        weight = float(weight)
        if not weight > 0:
            raise ValueError(f"member weights must be positive, got {weight}")
        factors = {int(k): float(v) for k, v in (class_weights or {}).items()}
        if any(not v > 0 for v in factors.values()):
            raise ValueError(f"class weights must be positive, got {dict(class_weights or {})}")
        if probabilities.is_regions and self.space == LABEL_SPACE:
            raise ValueError("a region-based member (WT/TC/ET probabilities) cannot join a label-space fusion")
        for running in (self._sum, self._region_sum):
            if running is not None and probabilities.grid_shape != running.shape[1:]:
                raise ValueError(f"member probabilities on grid {probabilities.grid_shape} do not match "
                                 f"{running.shape[1:]}")
        if probabilities.is_regions and self.space is None and not self._has_region_member:
            self._switch_to_regions()
        self._has_region_member = self._has_region_member or probabilities.is_regions
        if self.fusion_space == LABEL_SPACE:
            aligned, labels = self._align(probabilities)
            self._sum = _accumulate(self._sum, aligned, [weight * factors.get(label, 1.0) for label in labels])
            self._labels = labels
        else:
            regions = label_to_region_probabilities(probabilities)
            aligned = _align_regions(regions)
            self._region_sum = _accumulate(self._region_sum, aligned,
                                           [weight * factors.get(REGION_WRITES[r], 1.0) for r in NESTED_REGIONS])
            del regions, aligned
        self._weights.append((weight, factors))
        self.members += 1

    def _switch_to_regions(self) -> None:
        """Convert the label-space running sum to regions (first region member of an undecided ensemble)."""
        if self._sum is None:
            return
        for index, (_, factors) in enumerate(self._weights):
            used = {factors.get(label, 1.0) for label in (NETC, SNFH, ET)}
            if len(used) > 1:
                raise ValueError(
                    f"member {index + 1} is label-based with different class weights for NETC, SNFH and ET, and a "
                    "region-based member follows it: its region weights cannot be recovered from the running sum. "
                    "Create the ensemble with space=fusion_space(members), or list region-based members first.")
        self._region_sum = label_to_region_probabilities(Probabilities(self._sum, self._labels)).array
        self._sum = None

    def _align(self, probabilities: Probabilities) -> tuple[np.ndarray, tuple[int, ...]]:
        """Reorder (and, when label sets differ, widen) channels so every member shares one ascending label order."""
        labels = tuple(sorted(set(self._labels) | set(probabilities.labels)))
        if self._sum is not None and labels != self._labels:  # a new label: widen the running sum once
            widened = np.zeros((len(labels), *self._sum.shape[1:]), dtype=np.float32)
            for index, label in enumerate(self._labels):
                widened[labels.index(label)] = self._sum[index]
            self._sum, self._labels = widened, labels
        if probabilities.labels == labels:
            return probabilities.array, labels
        aligned = np.zeros((len(labels), *probabilities.grid_shape), dtype=np.float32)
        for index, label in enumerate(probabilities.labels):
            aligned[labels.index(label)] = probabilities.array[index]
        return aligned, labels

    def total_weights(self) -> tuple[float, ...]:
        """Σ_m w[m,c] for each fused channel c (summed in member order, as Python floats)."""
        if self.fusion_space == REGION_SPACE:
            keys = [REGION_WRITES[r] for r in NESTED_REGIONS]  # a region weighs as the label it writes
        else:
            keys = list(self._labels)
        totals = []
        for label in keys:
            total = 0.0
            for weight, factors in self._weights:
                total += weight * factors.get(label, 1.0)
            totals.append(total)
        return tuple(totals)

    def probabilities(self) -> Probabilities:
        """The class-weighted mean (float32) in the fusion space: channel c is Σ_m w[m,c]·p[m,c] / Σ_m w[m,c]."""
        region = self.fusion_space == REGION_SPACE
        running = self._region_sum if region else self._sum
        if running is None:
            raise ValueError("no member has been added")
        totals = self.total_weights()
        if all(t == totals[0] for t in totals):
            total = totals[0]
            mean = running / np.float32(total) if total != 1.0 else running.copy()
        else:
            mean = running / np.asarray(totals, dtype=np.float32).reshape(-1, 1, 1, 1)
        if region:
            return Probabilities(mean, NESTED_REGIONS, REGION_SPACE)
        return Probabilities(mean, self._labels)

    def fused_labels(self) -> np.ndarray:
        """Canonical label map (uint8, z·y·x) of the fusion: argmax (label space) or nested thresholds (region)."""
        return fused_labels(self.probabilities())

    def argmax_labels(self) -> np.ndarray:
        """Canonical label map (uint8, z·y·x) by argmax of the class-weighted mean (label space only)."""
        if self.fusion_space == REGION_SPACE:
            raise ValueError("the fusion is in region space (a member is region-based): use fused_labels()")
        return argmax_labels(self.probabilities())


def fusion_space(members: Sequence[object]) -> str:
    """REGION_SPACE when some member is region-based (its ``space`` attribute), else LABEL_SPACE."""
    spaces = {getattr(member, "space", LABEL_SPACE) for member in members}
    return REGION_SPACE if REGION_SPACE in spaces else LABEL_SPACE


def argmax_labels(probabilities: Probabilities) -> np.ndarray:
    """Label of the most probable channel at each voxel (ties go to the first channel, as in nnU-Net)."""
    if probabilities.is_regions:
        raise ValueError("region probabilities have no argmax; use region_labels()")
    index = np.argmax(probabilities.array, axis=0)
    lut = np.asarray(probabilities.labels, dtype=np.uint8)
    return lut[index]


def label_to_region_probabilities(probabilities: Probabilities) -> Probabilities:
    """Label-space probabilities → nested regions (float32): WT = (NETC + SNFH) + ET, TC = NETC + ET, ET = ET.

    A class the member does not predict counts 0; background and RC are dropped. Region probabilities are returned
    as they are.
    """
    if probabilities.is_regions:
        return probabilities
    zero = None

    def channel(label: int) -> np.ndarray:
        nonlocal zero
        found = probabilities.channel(label)
        if found is not None:
            return found.astype(np.float32, copy=False)
        if zero is None:
            zero = np.zeros(probabilities.grid_shape, dtype=np.float32)
        return zero

    netc, snfh, et = channel(NETC), channel(SNFH), channel(ET)
    out = np.empty((3, *probabilities.grid_shape), dtype=np.float32)
    np.add(netc, snfh, out=out[0])
    out[0] += et
    np.add(netc, et, out=out[1])
    out[2] = et
    return Probabilities(out, NESTED_REGIONS, REGION_SPACE)


def _align_regions(probabilities: Probabilities) -> np.ndarray:
    """Region channels in NESTED_REGIONS order; a region the member does not predict counts 0."""
    if probabilities.labels == NESTED_REGIONS:
        return probabilities.array
    aligned = np.zeros((len(NESTED_REGIONS), *probabilities.grid_shape), dtype=np.float32)
    for index, region in enumerate(probabilities.labels):
        aligned[NESTED_REGIONS.index(region)] = probabilities.array[index]
    return aligned


def region_labels(probabilities: Probabilities, threshold: float = 0.5) -> np.ndarray:
    """nnU-Net's labels for regions: for WT, TC, ET in this order, write the region's label (SNFH, NETC, ET) where
    p > ``threshold``, later regions overwriting earlier ones; 0 elsewhere."""
    if not probabilities.is_regions:
        raise ValueError("region_labels needs region probabilities; convert with label_to_region_probabilities()")
    labels = np.zeros(probabilities.grid_shape, dtype=np.uint8)
    for region in NESTED_REGIONS:
        channel = probabilities.channel(region)
        if channel is not None:
            labels[channel > threshold] = REGION_WRITES[region]
    return labels


#: How fused probabilities become labels (``--labels``, the manifest's ``"labels"``).
ARGMAX = "argmax"
SEQUENTIAL_THRESHOLD = "sequential-threshold"
LABEL_RULES: tuple[str, ...] = (ARGMAX, SEQUENTIAL_THRESHOLD)


def sequential_threshold_labels(probabilities: Probabilities, threshold: float = 0.5) -> np.ndarray:
    """Labels by thresholds applied channel after channel: start from 0; for each channel in order, write its label
    where p > ``threshold``, later channels overwriting earlier ones.

    In label space the channels are taken in ascending canonical label order (background, NETC, SNFH, ET, RC):
    the BraTS 2025 GoAT 1st-place rule (its inference code loops over the four softmax channels 0…3 and writes i
    where p > 0.5). It differs from argmax where no channel exceeds 0.5 (the voxel stays 0, not the most probable
    class) and, when class weights make the channels sum to more than 1, where two channels exceed 0.5 (the higher
    label wins). In region space it is nnU-Net's region rule (:func:`region_labels`).
    """
    if probabilities.is_regions:
        return region_labels(probabilities, threshold)
    labels = np.zeros(probabilities.grid_shape, dtype=np.uint8)
    for index, label in enumerate(probabilities.labels):
        labels[probabilities.array[index] > threshold] = label
    return labels


def default_label_rule(probabilities: Probabilities) -> str:
    """argmax in label space (nnU-Net's export), sequential thresholds in region space (nnU-Net's region rule)."""
    return SEQUENTIAL_THRESHOLD if probabilities.is_regions else ARGMAX


def fused_labels(probabilities: Probabilities, rule: str | None = None) -> np.ndarray:
    """Labels of fused probabilities by ``rule`` (one of LABEL_RULES; None: :func:`default_label_rule`).

    Region probabilities have no argmax: asking for it raises ValueError.
    """
    rule = rule or default_label_rule(probabilities)
    if rule == SEQUENTIAL_THRESHOLD:
        return sequential_threshold_labels(probabilities)
    if rule == ARGMAX:
        if probabilities.is_regions:
            raise ValueError("labels by argmax need label-space probabilities, but a member is region-based (the "
                             "fusion is in WT/TC/ET region space); use the sequential-threshold rule")
        return argmax_labels(probabilities)
    raise ValueError(f"unknown label rule {rule!r}; choose from {', '.join(LABEL_RULES)}")
