"""An image file's header, read without reading any voxel, and the checks made on it before the voxels are read.

A header can promise far more than a file holds: a 3 kB ``.nii.gz`` may claim 1024³ float32 voxels (4 GiB), a
sparse ``.nii`` 1200³ (readers map or allocate all of it). :func:`check_image_header` reads the size, voxel type,
spacing and direction with SimpleITK's ``ImageFileReader.ReadImageInformation`` (header only, every format) and,
for NIfTI, the sform with nibabel (ITK's NIfTI reader coerces a sheared sform into a rotation without a word), and
refuses a file whose voxels would not fit the memory budget or whose axes are not orthonormal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .limits import (Limits, check_direction, check_memory, current_limits, direction_problem, gib,
                     segmentation_bytes)


@dataclass(frozen=True)
class ImageHeader:
    """What a header says (SimpleITK's axis order x, y, z)."""

    size: tuple[int, ...]
    pixel_type: str  # e.g. "32-bit float"
    components: int
    bytes_per_component: int
    spacing: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size, dtype=object))

    @property
    def stored_bytes_per_voxel(self) -> int:
        return self.components * self.bytes_per_component

    def describe(self) -> str:
        """'its header says 1024 × 1024 × 1024 voxels of 32-bit float (4.0 GiB)'."""
        stored = self.voxels * self.stored_bytes_per_voxel
        components = f" × {self.components} components" if self.components != 1 else ""
        return (f"its header says {' × '.join(map(str, self.size))} voxels of {self.pixel_type}{components} "
                f"({gib(stored)} as stored)")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def read_header(path: str | Path) -> ImageHeader:
    """The header of an image file (no voxel is read); InputError naming the file when it cannot be read."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise InputError(
            f"{path}: cannot be read as an image ({lines[-1] if lines else type(exc).__name__}). The file may be "
            "truncated or not a NIfTI/NRRD/MetaImage file; export it again from the scanner or converter."
        ) from exc
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    pixel_id = reader.GetPixelID()
    probe = sitk.Image([1] * len(size), pixel_id, components) if components > 1 else sitk.Image([1] * len(size),
                                                                                                 pixel_id)
    return ImageHeader(size, sitk.GetPixelIDValueAsString(pixel_id), components,
                       int(probe.GetSizeOfPixelComponent()), tuple(float(s) for s in reader.GetSpacing()),
                       tuple(float(d) for d in reader.GetDirection()))


def nifti_sform_direction(path: Path) -> tuple[float, ...] | None:
    """The direction (columns of the sform's 3×3 part, normalised; SimpleITK's LPS convention does not change
    orthonormality) when the NIfTI header has an sform in use, else None (the qform is orthonormal by definition)."""
    import nibabel

    try:
        header = nibabel.load(str(path)).header
    except Exception as exc:  # nibabel raises ImageFileError, ValueError, gzip/zlib errors …
        raise InputError(f"{path}: cannot be read as a NIfTI image ({type(exc).__name__}: {exc}). The file is "
                         "truncated or damaged; copy or export it again.") from exc
    if int(header["sform_code"]) <= 0:
        return None
    matrix = np.asarray(header.get_sform(), dtype=float)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(norms == 0):
        return tuple(float("nan") for _ in range(9))
    return tuple(float(v) for v in (matrix / norms).ravel())


def check_image_header(path: str | Path, limits: Limits | None = None) -> ImageHeader:
    """Read ``path``'s header and refuse, before any voxel is read, an image that would not fit the memory budget
    or whose axes are not orthonormal (in its sform for NIfTI, its direction for other formats)."""
    path = Path(path)
    limits = limits or current_limits()
    if _is_nifti(path):  # before ITK, which would coerce a sheared sform into a rotation (a warning on stderr)
        sform = nifti_sform_direction(path)
        if sform is not None and direction_problem(sform):
            check_direction(sform, f"{path} (NIfTI sform)")
    header = read_header(path)
    check_memory(segmentation_bytes(header.voxels, header.stored_bytes_per_voxel), str(path),
                 header.describe(), limits)
    if len(header.size) == 3:
        check_direction(header.direction, str(path))
    return header
