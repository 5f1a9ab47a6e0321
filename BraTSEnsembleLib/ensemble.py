"""Streaming fusion of member probabilities and the labels they give.

Members are added one at a time: only the running weighted sum (float32, C × case grid) and the member being added
are in memory. The arithmetic is that of ``nnUNetv2_ensemble`` (float32 sum, then division by the total weight;
argmax with ties to the lower channel), so equal weights reproduce its labels voxel for voxel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .members.base import Probabilities


@dataclass
class StreamingEnsemble:
    """Weighted average of label-space probabilities, accumulated member by member."""

    _sum: np.ndarray | None = None
    _labels: tuple[int, ...] = ()
    _total_weight: float = 0.0
    members: int = field(default=0)

    @property
    def labels(self) -> tuple[int, ...]:
        """Canonical labels of the fused channels (ascending)."""
        return self._labels

    def add(self, probabilities: Probabilities, weight: float = 1.0) -> None:
        """Add one member's probabilities with ``weight`` (> 0)."""
        if not weight > 0:
            raise ValueError(f"member weights must be positive, got {weight}")
        aligned, labels = self._align(probabilities)
        if self._sum is None:
            self._sum = aligned.astype(np.float32, copy=True) if weight == 1.0 else aligned * np.float32(weight)
            self._labels = labels
        else:
            if aligned.shape != self._sum.shape:
                raise ValueError(f"member probabilities on grid {aligned.shape[1:]} do not match {self._sum.shape[1:]}")
            if weight == 1.0:
                self._sum += aligned
            else:
                self._sum += aligned * np.float32(weight)
        self._total_weight += weight
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

    def probabilities(self) -> Probabilities:
        """The weighted mean (float32)."""
        if self._sum is None:
            raise ValueError("no member has been added")
        mean = self._sum / np.float32(self._total_weight) if self._total_weight != 1.0 else self._sum.copy()
        return Probabilities(mean, self._labels)

    def argmax_labels(self) -> np.ndarray:
        """Canonical label map (uint8, z·y·x) by argmax of the weighted mean."""
        mean = self.probabilities()
        return argmax_labels(mean)


def argmax_labels(probabilities: Probabilities) -> np.ndarray:
    """Label of the most probable channel at each voxel (ties go to the first channel, as in nnU-Net)."""
    index = np.argmax(probabilities.array, axis=0)
    lut = np.asarray(probabilities.labels, dtype=np.uint8)
    return lut[index]
