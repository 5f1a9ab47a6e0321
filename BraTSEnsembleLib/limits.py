"""The numbers a run accepts, checked before any work: weights, tile steps, voxel spacing, image directions and a
memory budget for the grids a case is read and segmented on.

Out-of-range numbers do not fail loudly further down: an infinite or tiny weight gives an empty or all-ET
segmentation, a tile step of 1e-6 makes the sliding window list millions of tiles, a spacing of 100 mm makes a
model resample a head onto a grid of hundreds of GiB, and a sheared direction is silently dropped by ITK's NIfTI
reader. Each check here raises an error that names the value, the accepted range and the fix.

The memory budget and the spacing exception are per run (:class:`Limits`); the command line sets them from
``--memory-budget`` and ``--allow-unusual-spacing`` with :func:`use_limits`.
"""
from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import InputError, ModelError

#: Member weights and per-class weight factors are relative; outside this range they only mean a mistake (a factor
#: of 1e39 is infinite in float32, 1e-46 is 0) and the fused probabilities stop meaning anything.
WEIGHT_RANGE: tuple[float, float] = (1e-3, 1e3)
#: Sliding-window step as a fraction of the patch (nnU-Net's tile_step_size, MedNeXt's step_size). 0.1 makes at
#: most 125 times the tiles of nnU-Net's default 0.5; smaller steps only multiply the work (and the tile lists).
TILE_STEP_RANGE: tuple[float, float] = (0.1, 1.0)
#: MONAI's overlap is 1 − step: the same bound.
OVERLAP_RANGE: tuple[float, float] = (0.0, 1.0 - TILE_STEP_RANGE[0])
#: Voxel spacing (mm, per axis) of MRI and CT: sub-millimetre in-plane up to thick 2-D slices. Outside it the
#: header's unit or scale is most likely wrong (cm or µm written as mm); --allow-unusual-spacing accepts it.
SPACING_RANGE_MM: tuple[float, float] = (0.1, 10.0)
#: A direction matrix counts as orthonormal when every entry of DᵀD is within this of the identity's (0.06°).
ORTHONORMAL_TOLERANCE = 1e-3
#: Memory one voxel of a grid costs while a case is segmented on it, in bytes: four sequences as float32 (16), the
#: preprocessed copy (16), probabilities of up to five classes as float32 (20) and the rest (fusion, labels, maps).
BYTES_PER_VOXEL = 64
DEFAULT_MEMORY_BUDGET_GIB = 16.0
GIB = 2 ** 30
BUDGET_FIX = ("raise the budget with --memory-budget GIB (brats-ensemble predict/batch) if this machine has the "
              "memory")


@dataclass(frozen=True)
class Limits:
    """The per-run limits: memory budget (bytes) and whether spacings outside :data:`SPACING_RANGE_MM` are used."""

    memory_budget_bytes: int = int(DEFAULT_MEMORY_BUDGET_GIB * GIB)
    allow_unusual_spacing: bool = False


_LIMITS: ContextVar[Limits] = ContextVar("brats_ensemble_limits", default=Limits())


def current_limits() -> Limits:
    """The limits in force (the defaults unless inside :func:`use_limits`)."""
    return _LIMITS.get()


@contextlib.contextmanager
def use_limits(limits: Limits) -> Iterator[Limits]:
    """Run a block under ``limits`` (reading images and segmenting check against them)."""
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


def gib(n_bytes: float) -> str:
    """'4.0 GiB' (or '12.5 MiB' below 1 GiB)."""
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / 2 ** 20:.1f} MiB"


def is_real_number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or ±inf)."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def range_problem(value: Any, bounds: tuple[float, float], what: str) -> str | None:
    """None when ``value`` is a finite number within ``bounds`` (inclusive), else what is wrong with it."""
    low, high = bounds
    if not is_real_number(value):
        return f"{what} must be a finite number between {low:g} and {high:g}, got {value!r}"
    if not low <= float(value) <= high:
        return f"{what} must be between {low:g} and {high:g}, got {float(value):g}"
    return None


def check_weights(weights: Sequence[Any], option: str = "--weight") -> None:
    """ModelError unless every weight lies in :data:`WEIGHT_RANGE` (``option`` names where they were given)."""
    for weight in weights:
        problem = range_problem(weight, WEIGHT_RANGE, f"{option} {weight!r}: a weight")
        if problem:
            raise ModelError(f"{problem}. Weights are relative (1 = the default; 2 counts a model twice as much as "
                             "a model of weight 1).")


def check_tile_step(step: Any, option: str = "--tile-step") -> None:
    """ModelError unless the sliding-window step lies in :data:`TILE_STEP_RANGE`."""
    problem = range_problem(step, TILE_STEP_RANGE, f"{option} {step!r}: the sliding-window step")
    if problem:
        raise ModelError(f"{problem} (a fraction of the patch size; smaller steps multiply the tiles). Use e.g. "
                         "0.5, nnU-Net's default.")


# ----------------------------------------------------------------------------------------------------------------
# Image geometry and size


def spacing_text(spacing: Sequence[float]) -> str:
    return " × ".join(f"{s:g}" for s in spacing) + " mm"


def check_spacing(spacing: Sequence[float], source: str, limits: Limits | None = None) -> None:
    """InputError for a spacing that is not finite and positive, or (unless allowed) outside
    :data:`SPACING_RANGE_MM` on some axis."""
    limits = limits or current_limits()
    if not all(is_real_number(s) and s > 0 for s in spacing):
        raise InputError(f"{source}: voxel spacing {tuple(spacing)} is not a positive number on every axis. The "
                         "header is damaged; export the image again.")
    low, high = SPACING_RANGE_MM
    if limits.allow_unusual_spacing or all(low <= s <= high for s in spacing):
        return
    raise InputError(
        f"{source}: voxel spacing {spacing_text(spacing)} is outside what MRI and CT use ({low:g} to {high:g} mm "
        "per axis), so the header's spacing is probably wrong (e.g. cm or µm written as mm) and models would "
        "resample the image to a nonsensical size. Fix the spacing in the header, or pass --allow-unusual-spacing "
        "if it is right.")


def direction_problem(direction: Sequence[float]) -> str | None:
    """None for an orthonormal 3×3 (or 2×2, 4×4) direction matrix (row-major), else a description of it."""
    n = int(round(math.sqrt(len(direction))))
    matrix = np.asarray(direction, dtype=float).reshape(n, n)
    if not np.all(np.isfinite(matrix)):
        return "has a direction matrix with NaN/Inf entries"
    deviation = float(np.max(np.abs(matrix.T @ matrix - np.eye(n))))
    if deviation > ORTHONORMAL_TOLERANCE:
        rows = "; ".join(" ".join(f"{v:.4g}" for v in row) for row in matrix)
        return (f"has a non-orthonormal direction matrix [{rows}] (sheared or scaled axes; DᵀD differs from the "
                f"identity by {deviation:.3g})")
    return None


def check_direction(direction: Sequence[float], source: str) -> None:
    """InputError for a direction matrix that is not orthonormal (ITK's NIfTI reader silently coerces it; other
    readers keep it and every physical size computed from the spacing alone is then wrong)."""
    problem = direction_problem(direction)
    if problem:
        raise InputError(f"{source}: {problem}. Volumes and the resampling onto a model's grid assume orthogonal "
                         "axes: resample the image onto an orthogonal grid (e.g. Slicer's Resample Scalar Volume or "
                         "SimpleITK.Resample with an identity direction) or export it again from the scanner's "
                         "DICOM.")


def segmentation_bytes(voxels: int, stored_bytes_per_voxel: int = 0) -> int:
    """Memory a case on a grid of ``voxels`` needs while it is read (``stored_bytes_per_voxel``) and segmented."""
    return int(voxels) * (BYTES_PER_VOXEL + int(stored_bytes_per_voxel))


def check_memory(needed: int, source: str, what: str, limits: Limits | None = None) -> None:
    """InputError when ``needed`` bytes exceed the memory budget; ``what`` says where the size comes from."""
    limits = limits or current_limits()
    if needed <= limits.memory_budget_bytes:
        return
    raise InputError(
        f"{source}: {what}; segmenting it needs about {gib(needed)} of memory, more than the memory budget of "
        f"{gib(limits.memory_budget_bytes)}. Crop or resample the image first (e.g. to the head at 1 mm), or "
        f"{BUDGET_FIX}.")


def memory_budget_bytes(gib_value: Any) -> int:
    """``--memory-budget`` (GiB) in bytes; InputError unless it is a finite number > 0."""
    if not is_real_number(gib_value) or not float(gib_value) > 0:
        raise InputError(f"--memory-budget {gib_value!r}: give the memory a case may use in GiB, a number > 0 "
                         f"(default {DEFAULT_MEMORY_BUDGET_GIB:g}).")
    return int(float(gib_value) * GIB)


def resampled_shape(shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                    target_zyx: Sequence[float]) -> tuple[int, ...]:
    """The grid (z, y, x) a case of ``shape_zyx`` at ``spacing_zyx`` has at ``target_zyx`` (two values: in-plane
    only, as nnU-Net's 2-D configurations resample; the z axis stays)."""
    target = tuple(target_zyx)
    if len(target) == len(shape_zyx) - 1:
        target = (spacing_zyx[0], *target)
    return tuple(int(round(n * s / t)) for n, s, t in zip(shape_zyx, spacing_zyx, target))


def check_model_grids(members: Sequence[Any], shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                      source: str, limits: Limits | None = None) -> None:
    """Before any member runs: InputError when a member would resample the case (at its ``target_spacing_zyx``)
    onto a grid larger than the memory budget allows, or onto an empty one. Reached with unusual spacings (allowed
    with --allow-unusual-spacing): a head at 100 mm spacing is kilometres wide, at 0.01 mm a few voxels."""
    for member in members:
        target = getattr(member, "target_spacing_zyx", None)
        if not target or not all(is_real_number(t) and t > 0 for t in target):
            continue
        shape = resampled_shape(shape_zyx, spacing_zyx, target)
        what = (f"model {member.name} resamples it from spacing {spacing_text(tuple(spacing_zyx)[::-1])} to its "
                f"spacing {spacing_text(tuple(target)[::-1])}, a grid of {' × '.join(map(str, shape[::-1]))} voxels")
        if min(shape) < 1:
            raise InputError(f"{source}: {what}: the image is smaller than one voxel of the model. Check the spacing "
                             "in the header.")
        check_memory(segmentation_bytes(int(np.prod(shape, dtype=object))), source, what, limits)
