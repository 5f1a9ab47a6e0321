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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .members.base import Probabilities


@dataclass
class StreamingEnsemble:
    """Class-weighted average of label-space probabilities, accumulated member by member."""

    _sum: np.ndarray | None = None
    _labels: tuple[int, ...] = ()
    #: (weight, class factors by canonical label) of every member added, in order (for the per-class totals).
    _weights: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    members: int = field(default=0)

    @property
    def labels(self) -> tuple[int, ...]:
        """Canonical labels of the fused channels (ascending)."""
        return self._labels

    def add(self, probabilities: Probabilities, weight: float = 1.0,
            class_weights: Mapping[int, float] | None = None) -> None:
        """Add one member's probabilities with ``weight`` (> 0) and optional per-class factors.

        ``class_weights`` maps canonical labels to factors (> 0) of ``weight``; classes not named get factor 1.
        """
        weight = float(weight)
        if not weight > 0:
            raise ValueError(f"member weights must be positive, got {weight}")
        factors = {int(k): float(v) for k, v in (class_weights or {}).items()}
        if any(not v > 0 for v in factors.values()):
            raise ValueError(f"class weights must be positive, got {dict(class_weights or {})}")
        aligned, labels = self._align(probabilities)
        per_class = [weight * factors.get(label, 1.0) for label in labels]
        uniform = all(w == per_class[0] for w in per_class)
        if self._sum is not None and aligned.shape != self._sum.shape:
            raise ValueError(f"member probabilities on grid {aligned.shape[1:]} do not match {self._sum.shape[1:]}")
        if uniform:  # one scalar for every class: the nnU-Net arithmetic, unchanged
            w = per_class[0]
            if self._sum is None:
                self._sum = aligned.astype(np.float32, copy=True) if w == 1.0 else aligned * np.float32(w)
            elif w == 1.0:
                self._sum += aligned
            else:
                self._sum += aligned * np.float32(w)
        else:  # channel by channel, so no second full-size array is made
            if self._sum is None:
                self._sum = np.empty(aligned.shape, dtype=np.float32)
                for index, w in enumerate(per_class):
                    np.multiply(aligned[index], np.float32(w), out=self._sum[index])
            else:
                for index, w in enumerate(per_class):
                    self._sum[index] += aligned[index] * np.float32(w)
        self._labels = labels
        self._weights.append((weight, factors))
        self.members += 1

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
        totals = []
        for label in self._labels:
            total = 0.0
            for weight, factors in self._weights:
                total += weight * factors.get(label, 1.0)
            totals.append(total)
        return tuple(totals)

    def probabilities(self) -> Probabilities:
        """The class-weighted mean (float32): channel c is Σ_m w[m,c]·p[m,c] / Σ_m w[m,c]."""
        if self._sum is None:
            raise ValueError("no member has been added")
        totals = self.total_weights()
        if all(t == totals[0] for t in totals):
            total = totals[0]
            mean = self._sum / np.float32(total) if total != 1.0 else self._sum.copy()
        else:
            mean = self._sum / np.asarray(totals, dtype=np.float32).reshape(-1, 1, 1, 1)
        return Probabilities(mean, self._labels)

    def argmax_labels(self) -> np.ndarray:
        """Canonical label map (uint8, z·y·x) by argmax of the class-weighted mean."""
        mean = self.probabilities()
        return argmax_labels(mean)


def argmax_labels(probabilities: Probabilities) -> np.ndarray:
    """Label of the most probable channel at each voxel (ties go to the first channel, as in nnU-Net)."""
    index = np.argmax(probabilities.array, axis=0)
    lut = np.asarray(probabilities.labels, dtype=np.uint8)
    return lut[index]
