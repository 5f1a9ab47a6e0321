"""Synthetic BraTS-like phantoms: four MRI sequences of a head with a tumour, and the ground-truth label map.

The phantom is for tests and the demo only: an ellipsoidal brain with white/grey matter and ventricles, and a tumour
of necrotic core (NETC, label 1) inside an enhancing rim (ET, label 3) inside oedema (SNFH, label 2). Each sequence
gives each tissue its own typical intensity (e.g. ET bright on T1c, SNFH bright on T2-FLAIR), with smooth bias and
noise. Everything is deterministic from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..labels import ET, NETC, SNFH

# Tissue classes of the phantom (internal) and their mean intensity per sequence (arbitrary scanner units).
_BACKGROUND, _WM, _GM, _CSF, _NETC, _SNFH, _ET = range(7)
_INTENSITY: dict[str, tuple[float, ...]] = {
    #        bg   WM    GM    CSF   NETC  SNFH  ET
    "t1n": (0.0, 620, 480, 180, 300, 420, 430),
    "t1c": (0.0, 640, 500, 190, 260, 440, 1150),
    "t2w": (0.0, 420, 560, 1250, 1050, 900, 700),
    "t2f": (0.0, 380, 470, 120, 520, 1050, 760),
}
ROLES: tuple[str, ...] = tuple(_INTENSITY)
#: Tumour layouts of :func:`make_phantom`.
LAYOUTS: tuple[str, ...] = ("standard", "multifocal", "small")


@dataclass(frozen=True)
class Phantom:
    """One phantom case: images by role and the ground truth, all (z, y, x) float32 / uint8 on one grid."""

    case_id: str
    images: dict[str, np.ndarray]
    labels: np.ndarray
    spacing: tuple[float, float, float]  # (x, y, z) in mm, SimpleITK order

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """An array of this phantom as a SimpleITK image with the phantom's geometry (RAS-like origin at centre)."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        size = np.array(image.GetSize()) * np.array(self.spacing)
        image.SetOrigin(tuple(float(v) for v in -size / 2))
        return image

    def write(self, folder: str | Path, naming: str = "brats2023", with_labels: bool = False,
              integer_images: bool = False) -> Path:
        """Write the case into ``folder/<case_id>/`` in BraTS 2023 (``-t1n``), BraTS 2021 (``_t1``) or nnU-Net
        (``_0000`` in t1n, t1c, t2w, t2f order) naming; returns the case folder. Images are float32, or int16
        (rounded) with ``integer_images``, as BraTS distributes its images; labels are uint8."""
        suffixes = {
            "brats2023": {"t1n": "-t1n", "t1c": "-t1c", "t2w": "-t2w", "t2f": "-t2f"},
            "brats2021": {"t1n": "_t1", "t1c": "_t1ce", "t2w": "_t2", "t2f": "_flair"},
            "nnunet": {"t1n": "_0000", "t1c": "_0001", "t2w": "_0002", "t2f": "_0003"},
        }[naming]
        case_dir = Path(folder) / self.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        for role, suffix in suffixes.items():
            image = self.images[role]
            if integer_images:
                image = np.rint(image).clip(np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
            sitk.WriteImage(self.to_sitk(image), str(case_dir / f"{self.case_id}{suffix}.nii.gz"))
        if with_labels:
            seg_suffix = "-seg" if naming == "brats2023" else "_seg"
            sitk.WriteImage(self.to_sitk(self.labels), str(case_dir / f"{self.case_id}{seg_suffix}.nii.gz"))
        return case_dir


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int],
                  lump_voxels: tuple[float, float, float]) -> np.ndarray:
    """Low-frequency random field in [-1, 1] (for lumpy tumour borders and bias fields); ``lump_voxels`` is the size
    of its lumps in voxels per (z, y, x) axis.

    The coarse grid has at least 4 samples per axis: ITK's cubic B-spline mirrors an out-of-range index only once,
    so on a 2-sample axis it reads outside the buffer (garbage, sometimes NaN, in small phantoms)."""
    coarse = rng.standard_normal(tuple(max(4, int(s / c)) for s, c in zip(shape, lump_voxels))).astype(np.float32)
    image = sitk.GetImageFromArray(coarse)
    resampled = sitk.Resample(
        image, [s for s in reversed(shape)], sitk.Transform(), sitk.sitkBSpline,
        (0, 0, 0), [c / s for c, s in zip(reversed(coarse.shape), reversed(shape))],
    )
    field = sitk.GetArrayFromImage(resampled)
    return field / (np.abs(field).max() + 1e-6)


def make_phantom(seed: int, shape: tuple[int, int, int] = (64, 72, 64), case_id: str | None = None,
                 n_tumours: int | None = None, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 layout: str = "standard") -> Phantom:
    """Generate one phantom of array shape (z, y, x).

    ``layout`` (one of :data:`LAYOUTS`) decides the tumours: ``standard`` — one large tumour (radius of the enhancing
    rim 10–20 % of the smallest field-of-view side), sometimes two, near the centre (they usually merge);
    ``multifocal`` — 2–3 medium tumours (5–8 %) in different directions, kept apart so that each has its own
    core (their oedema may merge); ``small`` — 1–2 small lesions (enhancing radius 5–9 mm), the hard case of the
    BraTS lesion-wise metrics. ``n_tumours`` overrides the count of any layout.

    ``spacing`` is the voxel size in mm in SimpleITK (x, y, z) order. The anatomy is defined in millimetres over
    the field of view ``shape × spacing``, so one seed gives the same head at any spacing of the same field of view
    (e.g. 160×192×160 voxels at 1 mm and 80×96×80 at 2 mm): only the sampling differs, and the noise, which is
    drawn per voxel. With the default 1 mm the phantom is the one earlier versions made from the same seed.
    """
    rng = np.random.default_rng(seed)
    step_zyx = tuple(float(s) for s in reversed(spacing))
    grid = np.meshgrid(*(np.arange(s, dtype=np.float32) * np.float32(d) for s, d in zip(shape, step_zyx)),
                       indexing="ij")
    field_mm = np.array(shape, dtype=np.float32) * np.array(step_zyx, dtype=np.float32)
    centre = field_mm / 2
    brain_radii = field_mm * rng.uniform(0.36, 0.43, 3)
    tissue = np.full(shape, _BACKGROUND, dtype=np.uint8)
    brain = _ellipsoid(grid, centre, brain_radii)
    tissue[brain] = _GM
    tissue[_ellipsoid(grid, centre, brain_radii * 0.78)] = _WM
    for side in (-1, 1):  # two lateral ventricles
        offset = np.array([0.0, 0.0, side * brain_radii[2] * 0.18])
        tissue[_ellipsoid(grid, centre + offset, brain_radii * np.array([0.22, 0.35, 0.08]))] = _CSF

    labels = np.zeros(shape, dtype=np.uint8)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown phantom layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "standard":
        count = n_tumours if n_tumours is not None else (2 if rng.random() < 0.25 else 1)
    else:
        count = n_tumours if n_tumours is not None else int(rng.integers(2, 4) if layout == "multifocal"
                                                                   else rng.integers(1, 3))
    lump = _smooth_noise(rng, shape, _voxels(6.0, step_zyx))
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        if layout == "standard":
            radius = rng.uniform(0.10, 0.2) * float(field_mm.min())
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            position = centre + direction * rng.uniform(0.0, 0.45) * (brain_radii - radius)
        else:
            radius = (rng.uniform(0.05, 0.08) * float(field_mm.min()) if layout == "multifocal"
                      else rng.uniform(5.0, 9.0))
            position = _separate_position(rng, centre, brain_radii, radius, placed)
            placed.append((position, radius))
        distance = np.sqrt(sum(((g - p) / s) ** 2 for g, p, s in zip(grid, position, rng.uniform(0.8, 1.2, 3))))
        distance = distance / radius + 0.18 * lump
        oedema = (distance <= rng.uniform(1.5, 2.0)) & brain
        enhancing = distance <= 1.0
        necrotic = distance <= rng.uniform(0.45, 0.7)
        labels[oedema & (labels == 0)] = SNFH
        labels[enhancing & (labels != NETC)] = ET
        labels[necrotic] = NETC
    tissue[labels == SNFH] = _SNFH
    tissue[labels == ET] = _ET
    tissue[labels == NETC] = _NETC

    images = {}
    for role, means in _INTENSITY.items():
        contrast = rng.uniform(0.85, 1.15)
        image = np.asarray(means, dtype=np.float32)[tissue] * contrast
        bias = 1.0 + 0.08 * _smooth_noise(rng, shape, _voxels(16.0, step_zyx))
        noise = rng.normal(0.0, rng.uniform(0.02, 0.05) * 600, shape).astype(np.float32)
        image = (image * bias + noise * (tissue != _BACKGROUND)).clip(0, None)
        images[role] = image.astype(np.float32)
    return Phantom(case_id or f"Phantom-{seed:05d}", images, labels, tuple(float(s) for s in spacing))  # type: ignore[arg-type]


def _separate_position(rng: np.random.Generator, centre: np.ndarray, brain_radii: np.ndarray, radius: float,
                       placed: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """A tumour centre (mm) inside the white matter whose tumour core keeps clear of the tumours ``placed`` already
    (centre, radius): the first of 200 random draws that does, else the draw with the widest gap.

    The enhancing rim reaches at most 1.6 radii from a centre (1 radius, stretched up to 1.2× per axis, plus the
    lumpy border), so two cores are separate lesions when their centres are more than 1.6 × (sum of radii) + 6 mm
    apart; their oedema may still be confluent, as in multifocal glioma."""
    best, best_gap = centre, -np.inf
    for _ in range(200):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        position = centre + direction * rng.uniform(0.3, 0.9) * (brain_radii * 0.78 - 2.0 * radius)
        gap = min((float(np.linalg.norm(position - other)) - 1.6 * (radius + r) for other, r in placed),
                  default=np.inf)
        if gap > 6.0:
            return position
        if gap > best_gap:
            best, best_gap = position, gap
    return best


def _voxels(size_mm: float, step_zyx: tuple[float, ...]) -> tuple[float, float, float]:
    """A length in mm as voxels per (z, y, x) axis."""
    return tuple(size_mm / d for d in step_zyx)  # type: ignore[return-value]
