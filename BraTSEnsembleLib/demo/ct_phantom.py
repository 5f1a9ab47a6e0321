"""Synthetic head CTs with small brain metastases, in Hounsfield units, and their one-label ground truth.

For tests and the demo only (build-time tooling, like :mod:`BraTSEnsembleLib.demo.phantom`): air around an
ellipsoidal head (−1000 HU), a scalp of soft tissue (~40 HU), a skull of bone (~900 HU), brain of grey and white
matter (~40 / ~28 HU) with two ventricles of CSF (~8 HU), and several small contrast-enhancing metastases (~100 HU)
with hypodense oedema (~18 HU) around them. Only the metastases are
labelled (label 1, "metastasis"); the oedema is not. Voxels are int16 HU, as CT is stored; deterministic from the
seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Label of a metastasis in the ground truth (the dataset.json says ``{"background": 0, "metastasis": 1}``).
METASTASIS = 1
#: Mean attenuation of each tissue (HU).
AIR_HU, SCALP_HU, BONE_HU, GM_HU, WM_HU, CSF_HU = -1000.0, 40.0, 900.0, 40.0, 28.0, 8.0
LESION_HU, OEDEMA_HU = 100.0, 18.0


@dataclass(frozen=True)
class CTPhantom:
    """One phantom CT (z, y, x) int16 HU, its metastasis labels (uint8) and the voxel size (x, y, z) mm."""

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """An array of this phantom as a SimpleITK image with the phantom's geometry (origin at the centre)."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(tuple(float(v) for v in -np.array(image.GetSize()) * np.array(self.spacing) / 2))
        return image

    @property
    def lesion_count(self) -> int:
        """Number of separate metastases (26-connected) in the labels."""
        import cc3d

        return int(cc3d.connected_components(self.labels > 0, connectivity=26, return_N=True)[1])

    def write(self, folder: str | Path, naming: str = "nnunet", with_labels: bool = False) -> Path:
        """Write the case into ``folder/<case_id>/`` as ``<id>_0000.nii.gz`` (``naming="nnunet"``) or
        ``<id>-ct.nii.gz`` (``naming="named"``); returns the case folder. Labels go to ``<id>-seg.nii.gz``."""
        suffix = {"nnunet": "_0000", "named": "-ct"}[naming]
        case_dir = Path(folder) / self.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(self.to_sitk(self.image), str(case_dir / f"{self.case_id}{suffix}.nii.gz"))
        if with_labels:
            sitk.WriteImage(self.to_sitk(self.labels), str(case_dir / f"{self.case_id}-seg.nii.gz"))
        return case_dir


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_ct_phantom(seed: int, shape: tuple[int, int, int] = (48, 64, 64),
                    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0), case_id: str | None = None,
                    n_lesions: int | None = None) -> CTPhantom:
    """Generate one head CT of array shape (z, y, x) and voxel size ``spacing`` (x, y, z mm).

    4–6 metastases (``n_lesions`` overrides), kept apart inside the brain: one tiny (radius 2.5–4 mm, about 65–270
    mm³, around the 100 mm³ that metastasis studies count from) and the others of radius 6–12 mm. The anatomy is
    defined in mm over the field of view.
    """
    rng = np.random.default_rng(seed)
    step_zyx = np.array(tuple(reversed(spacing)), dtype=np.float32)
    grid = np.meshgrid(*(np.arange(s, dtype=np.float32) * d for s, d in zip(shape, step_zyx)), indexing="ij")
    field_mm = np.array(shape, dtype=np.float32) * step_zyx
    centre = field_mm / 2 + rng.uniform(-0.03, 0.03, 3) * field_mm
    head = field_mm * rng.uniform(0.40, 0.45, 3)
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    skull_outer = head - 3.0
    brain = head - 9.0
    hu[_ellipsoid(grid, centre, head)] = SCALP_HU
    hu[_ellipsoid(grid, centre, skull_outer)] = BONE_HU
    inside = _ellipsoid(grid, centre, brain)
    hu[inside] = GM_HU
    hu[_ellipsoid(grid, centre, brain * 0.8)] = WM_HU
    for side in (-1, 1):  # lateral ventricles
        offset = np.array([0.0, 0.0, side * brain[2] * 0.2])
        hu[_ellipsoid(grid, centre + offset, brain * np.array([0.22, 0.32, 0.08]))] = CSF_HU

    labels = np.zeros(shape, dtype=np.uint8)
    count = n_lesions if n_lesions is not None else int(rng.integers(4, 7))
    placed: list[tuple[np.ndarray, float]] = []
    for index in range(count):
        radius = float(rng.uniform(2.5, 4.0) if index == 0 else rng.uniform(6.0, 12.0))
        position = _lesion_position(rng, centre, brain, radius, placed)
        placed.append((position, radius))
        distance = np.sqrt(sum(((g - p) / s) ** 2 for g, p, s in zip(grid, position, rng.uniform(0.85, 1.15, 3))))
        distance /= radius
        oedema = (distance <= rng.uniform(1.6, 2.2)) & inside & (labels == 0)
        hu[oedema] = OEDEMA_HU
        lesion = distance <= 1.0
        hu[lesion] = LESION_HU
        labels[lesion] = METASTASIS
    noise = rng.normal(0.0, 6.0, shape).astype(np.float32)
    hu += noise * (hu > AIR_HU)
    hu += rng.normal(0.0, 2.0, shape).astype(np.float32) * (hu <= AIR_HU)  # a little noise in air too
    image = np.rint(hu).clip(-1024, 3071).astype(np.int16)
    return CTPhantom(case_id or f"CTPhantom-{seed:05d}", image, labels, tuple(float(s) for s in spacing))  # type: ignore[arg-type]


def _lesion_position(rng: np.random.Generator, centre: np.ndarray, brain: np.ndarray, radius: float,
                     placed: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """A lesion centre (mm) inside the brain whose lesion (up to 1.15 radii from its centre) keeps at least 4 mm from
    the lesions placed already, so that each metastasis is its own connected component; the draw with the widest gap
    when none of 200 does."""
    best, best_gap = centre, -np.inf
    for _ in range(200):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        position = centre + direction * rng.uniform(0.0, 1.0) * (brain - 1.2 * radius)
        gap = min((float(np.linalg.norm(position - other)) - 1.15 * (radius + r) for other, r in placed),
                  default=np.inf)
        if gap > 4.0:
            return position
        if gap > best_gap:
            best, best_gap = position, gap
    return best
