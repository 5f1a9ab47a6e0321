"""What every ensemble member is and returns.

A member is one trained model (one framework, one or more folds). It runs its framework's own preprocessing and
sliding-window inference and returns :class:`Probabilities` on the case grid, with each channel named by the
canonical BraTS label it stands for, so that members of different frameworks and class orders can be summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..case import Case

#: Called by a member with a short description of what it is doing ("preprocessing", "fold 1/5", ...).
StepReporter = Callable[[str], None]


@dataclass
class Probabilities:
    """Per-class probabilities of one member on the case grid.

    ``array`` is float32 with shape (C, z, y, x): SimpleITK/nnU-Net array order of the case's reference image.
    ``labels[c]`` is the canonical BraTS label (see :mod:`BraTSEnsembleLib.labels`) of channel ``c``; channels of
    a label-space member sum to 1 at every voxel.
    """

    array: np.ndarray
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.array.ndim != 4 or self.array.shape[0] != len(self.labels):
            raise ValueError(f"probabilities of shape {self.array.shape} do not fit labels {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels {self.labels} name one class twice")

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Shape (z, y, x) of the grid the probabilities lie on."""
        return tuple(self.array.shape[1:])  # type: ignore[return-value]

    def channel(self, label: int) -> np.ndarray | None:
        """The probability map of canonical ``label``, or None when this member does not predict it."""
        return self.array[self.labels.index(label)] if label in self.labels else None


@runtime_checkable
class Member(Protocol):
    """One model of an ensemble."""

    #: Short name shown in progress reports and recorded in the provenance of each output.
    name: str

    @property
    def roles(self) -> tuple[str, ...]:
        """Modality roles the model needs, in the order of its input channels."""

    @property
    def labels(self) -> tuple[int, ...]:
        """Canonical labels of the channels that :meth:`predict` returns."""

    def predict(self, case: "Case", device: "torch.device", report: StepReporter | None = None) -> Probabilities:
        """Run the model on ``case`` and return its probabilities on the case grid."""

    def describe(self) -> dict[str, Any]:
        """Provenance: framework, path, folds, checkpoint and options, as JSON-serialisable values."""
