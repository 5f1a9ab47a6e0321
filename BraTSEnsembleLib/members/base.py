"""What every ensemble member is and returns.

A member is one trained model (one framework, one or more folds). It runs its framework's own preprocessing and
sliding-window inference and returns :class:`Probabilities` on the case grid, with each channel named by the
canonical BraTS class it stands for, so that members of different frameworks and class orders can be summed.

**Class spaces.** Probabilities lie in one of two spaces:

* label space (``LABEL_SPACE``, softmax models): one channel per canonical label (0 background, 1 NETC, 2 SNFH,
  3 ET, 4 RC), named by that label; the channels sum to 1 at every voxel.
* nested-region space (``REGION_SPACE``, region-based models with sigmoid heads such as nnU-Net's BraTS
  Dataset137): one channel per BraTS region, named ``"WT"``, ``"TC"``, ``"ET"`` (:data:`NESTED_REGIONS`); no
  background channel. Each channel is an independent probability in [0, 1].

A member may say which space it predicts in through an optional ``space`` attribute (label space when absent).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Protocol, TypeVar, runtime_checkable

import numpy as np

from ..errors import DeviceError
from ..labels import ET, NETC, SNFH

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..case import Case

class StepReporter(Protocol):
    """Called by a member with a short description of what it is doing ("preprocessing", "fold 1/5", ...) and,
    when it knows it, the share of its own work done so far (0–1; see :mod:`.progress`)."""

    def __call__(self, step: str, fraction: float | None = None) -> None: ...


LABEL_SPACE = "labels"
REGION_SPACE = "regions"

#: The nested BraTS regions of the region space, outermost first: nnU-Net's ``regions_class_order`` for BraTS.
NESTED_REGIONS: tuple[str, ...] = ("WT", "TC", "ET")

#: Canonical label that each region writes where its probability exceeds 0.5 (nnU-Net's rule for regions, in the
#: order of :data:`NESTED_REGIONS`, later regions overwriting earlier): WT → SNFH, TC → NETC, ET → ET.
REGION_WRITES: dict[str, int] = {"WT": SNFH, "TC": NETC, "ET": ET}


@dataclass
class Probabilities:
    """Per-class probabilities of one member on the case grid.

    ``array`` is float32 with shape (C, z, y, x): SimpleITK/nnU-Net array order of the case's reference image.
    ``labels[c]`` names channel ``c``: in label space (``space == LABEL_SPACE``, the default) the canonical BraTS
    label (see :mod:`BraTSEnsembleLib.labels`), and the channels sum to 1 at every voxel; in nested-region space
    (``space == REGION_SPACE``) the region name ``"WT"``, ``"TC"`` or ``"ET"``, each channel a sigmoid probability
    (0 outside the framework's crop box, as nnU-Net exports region probabilities).
    """

    array: np.ndarray
    labels: tuple[Hashable, ...]
    space: str = LABEL_SPACE

    def __post_init__(self) -> None:
        if self.array.ndim != 4 or self.array.shape[0] != len(self.labels):
            raise ValueError(f"probabilities of shape {self.array.shape} do not fit labels {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels {self.labels} name one class twice")
        if self.space == REGION_SPACE:
            unknown = [r for r in self.labels if r not in NESTED_REGIONS]
            if unknown:
                raise ValueError(f"region channels {unknown} are not BraTS regions ({', '.join(NESTED_REGIONS)})")
        elif self.space == LABEL_SPACE:
            if not all(isinstance(v, (int, np.integer)) for v in self.labels):
                raise ValueError(f"label-space channels must be canonical labels (integers), got {self.labels}")
        else:
            raise ValueError(f"unknown class space {self.space!r}; use {LABEL_SPACE!r} or {REGION_SPACE!r}")

    @property
    def is_regions(self) -> bool:
        """True for nested-region probabilities (channels WT, TC, ET)."""
        return self.space == REGION_SPACE

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Shape (z, y, x) of the grid the probabilities lie on."""
        return tuple(self.array.shape[1:])  # type: ignore[return-value]

    def channel(self, label: Hashable) -> np.ndarray | None:
        """The probability map of canonical ``label`` (a region name in region space), or None when absent."""
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
        """Canonical labels the member predicts: its channels' labels (label space), or the labels that its
        regions write (region space: background and SNFH/NETC/ET for WT/TC/ET)."""

    def predict(self, case: "Case", device: "torch.device", report: StepReporter | None = None) -> Probabilities:
        """Run the model on ``case`` and return its probabilities on the case grid (in the member's ``space``:
        label space unless the member has ``space == REGION_SPACE``)."""

    def describe(self) -> dict[str, Any]:
        """Provenance: framework, path, folds, checkpoint and options, as JSON-serialisable values."""


# ----------------------------------------------------------------------------------------------------------------
# CUDA out of memory
# ----------------------------------------------------------------------------------------------------------------

T = TypeVar("T")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA out-of-memory: ``torch.cuda.OutOfMemoryError``, or a RuntimeError whose message says
    "out of memory" (what the TorchScript interpreter raises when an operator inside it runs out)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def with_cpu_results_on_oom(attempt: Callable[[bool], T], device: "torch.device", report: StepReporter,
                            who: str) -> T:
    """``attempt(True)`` (sliding window with its inputs and accumulated results on ``device``); on CUDA
    out-of-memory, empty the CUDA cache and return ``attempt(False)`` (windows still on ``device``, results on the
    CPU), after saying so through ``report`` and a RuntimeWarning. This is nnU-Net's own fallback (nnunetv2
    ``nnUNetPredictor.predict_sliding_window_return_logits``) for members that run their own sliding window.

    A second out-of-memory raises DeviceError with what to do. Any other error propagates unchanged.
    """
    import torch

    try:
        return attempt(True)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        reason = " ".join(str(exc).split())[:200]
    # Outside the except block, so that the failed attempt's frames (and the tensors they hold) are released.
    torch.cuda.empty_cache()
    message = (f"{who}: CUDA out of memory with the results on {device} ({reason}); retrying with the sliding "
               f"window on {device} and the results on the CPU (slower)")
    report(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    try:
        return attempt(False)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        raise DeviceError(f"{who}: out of memory on {device} even with the results on the CPU. Close other programs "
                          "using the GPU, use a smaller sliding-window batch or patch, or run on --device cpu.") from exc
