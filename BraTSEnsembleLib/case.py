"""A case: its images by modality role on one checked grid, the folder readers, and the result writers.

Images are SimpleITK images; arrays handed to models are in SimpleITK/nnU-Net order (z, y, x), exactly as
nnU-Net's ``SimpleITKIO`` reads them, so that a member wrapping nnU-Net sees the numbers ``nnUNetv2_predict`` sees.
"""
from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .roles import BRATS2021_SUFFIXES, BRATS2023_SUFFIXES, BRATS_ROLES, channel_role

NIFTI_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# Geometry tolerances: the same spirit as nnU-Net's own sanity checks (they compare with np.allclose); physical
# positions are compared in mm, directions as cosines.
SPACING_TOLERANCE = 1e-4  # relative
ORIGIN_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4


@dataclass
class Case:
    """Images of one case by role (``t1n``, ``t1c``, ``t2w``, ``t2f`` or generic roles), all on one grid.

    Build it with :func:`read_case_folder`, :func:`case_from_files` or :func:`case_from_images`, which validate
    every image and the shared geometry; the constructor itself does not.
    """

    case_id: str
    images: dict[str, sitk.Image]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles present in this case."""
        return tuple(self.images)

    @property
    def reference(self) -> sitk.Image:
        """The image whose grid results are written on: T1c when present (BraTS images share one grid)."""
        role = "t1c" if "t1c" in self.images else next(iter(self.images))
        return self.images[role]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing in array order (z, y, x), as nnU-Net's SimpleITKIO reports it."""
        return tuple(float(s) for s in reversed(self.reference.GetSpacing()))  # type: ignore[return-value]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return tuple(int(s) for s in reversed(self.reference.GetSize()))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (spacing is in mm)."""
        return float(np.prod(self.reference.GetSpacing())) / 1000.0

    def array(self, role: str) -> np.ndarray:
        """Voxels of ``role`` as float32 (z, y, x): what nnU-Net's SimpleITKIO hands its preprocessing."""
        if role not in self.images:
            raise InputError(f"case {self.case_id} has no {role} image (it has: {', '.join(self.images)})")
        return sitk.GetArrayFromImage(self.images[role]).astype(np.float32, copy=False)

    def stacked(self, roles: Sequence[str]) -> np.ndarray:
        """Channels (c, z, y, x) float32 in the given role order."""
        return np.stack([self.array(r) for r in roles])

    def source(self, role: str) -> str:
        """Where the image of ``role`` came from (file path or node name), for messages."""
        return self.sources.get(role, f"{self.case_id}:{role}")


# ----------------------------------------------------------------------------------------------------------------
# Reading and validation


def strip_image_ending(name: str) -> str | None:
    """File name without its image ending, or None when the name is not an image file we read."""
    lower = name.lower()
    for ending in NIFTI_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)]
    return None


def read_image(path: str | Path) -> sitk.Image:
    """Read one image with SimpleITK, turning every failure into an InputError that names the file.

    NIfTI files are first checked with nibabel, because ITK's NIfTI reader hides two problems: it fills the missing
    part of a truncated ``.nii.gz`` with zeros and it reads NaN/Inf voxels as 0, without a word (nnU-Net's own
    reader, SimpleITK, then segments a half-empty or silently altered image).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_voxels(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: cannot be read as an image ({first_line}). The file may be truncated or not a NIfTI/NRRD "
            "file; export it again from the scanner or converter."
        ) from exc


def _check_nifti_voxels(path: Path) -> None:
    """Read every voxel of a NIfTI file with nibabel: refuse truncated files and NaN/Inf voxels."""
    import nibabel

    try:
        image = nibabel.load(str(path))
        voxels = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises EOFError, zlib/gzip errors, ImageFileError, ValueError …
        raise InputError(
            f"{path}: cannot be read as a NIfTI image ({type(exc).__name__}: {exc}). The file is truncated or "
            "damaged; copy or export it again."
        ) from exc
    if np.issubdtype(voxels.dtype, np.floating):
        finite = np.isfinite(voxels)
        if not finite.all():
            raise InputError(
                f"{path}: has {int(voxels.size - np.count_nonzero(finite))} NaN/Inf voxel(s). Replace them (e.g. "
                "with 0) before segmenting; models cannot be run on undefined intensities."
            )


def validate_image(image: sitk.Image, source: str) -> None:
    """Refuse images a model cannot use: not 3-D, vector-valued, empty, constant, or with NaN/Inf voxels."""
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (an RGB or vector "
            "image); give one grey-value 3-D volume per sequence."
        )
    if dim != 3:
        size = "×".join(str(s) for s in image.GetSize())
        fix = (
            "split the 4-D series into one 3-D volume per sequence (e.g. with SimpleITK or Slicer's Sequences)"
            if dim == 4
            else "give a 3-D volume; a single slice cannot be segmented in 3-D"
        )
        raise InputError(f"{source}: is a {dim}-D image of size {size}; {fix}.")
    array = sitk.GetArrayViewFromImage(image)
    if array.size == 0 or min(image.GetSize()) < 2:
        raise InputError(f"{source}: has size {image.GetSize()}, which is empty or flat; give a 3-D volume.")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise InputError(
                f"{source}: has {bad} NaN/Inf voxel(s). Replace them (e.g. with 0) before segmenting; "
                "models cannot be run on undefined intensities."
            )
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        what = "all zero (empty)" if hi == 0 else f"constant ({hi:g})"
        raise InputError(f"{source}: is {what}; check that the right volume/file was chosen for this sequence.")


def _describe_geometry(image: sitk.Image) -> str:
    return (
        f"size {image.GetSize()}, spacing {tuple(round(s, 5) for s in image.GetSpacing())}, "
        f"origin {tuple(round(o, 3) for o in image.GetOrigin())}"
    )


def check_same_grid(images: Mapping[str, sitk.Image], sources: Mapping[str, str]) -> None:
    """Raise InputError when the images do not share size, spacing, origin and direction."""
    roles = list(images)
    ref_role = "t1c" if "t1c" in images else roles[0]
    ref = images[ref_role]
    for role in roles:
        if role == ref_role:
            continue
        image = images[role]
        problems = []
        if image.GetSize() != ref.GetSize():
            problems.append("size")
        if not np.allclose(image.GetSpacing(), ref.GetSpacing(), rtol=SPACING_TOLERANCE, atol=0):
            problems.append("spacing")
        if not np.allclose(image.GetOrigin(), ref.GetOrigin(), atol=ORIGIN_TOLERANCE_MM, rtol=0):
            problems.append("origin")
        if not np.allclose(image.GetDirection(), ref.GetDirection(), atol=DIRECTION_TOLERANCE, rtol=0):
            problems.append("direction")
        if problems:
            raise InputError(
                f"{sources.get(role, role)} ({role}) and {sources.get(ref_role, ref_role)} ({ref_role}) differ in "
                f"{', '.join(problems)}: {_describe_geometry(image)} vs {_describe_geometry(ref)}. All sequences "
                f"must be co-registered on one grid: resample them onto the {ref_role} image (e.g. with Slicer's "
                "'Resample Image (BRAINS)' or SimpleITK.Resample) or use BraTS-preprocessed data."
            )


def case_from_images(case_id: str, images: Mapping[str, sitk.Image], sources: Mapping[str, str] | None = None) -> Case:
    """Validate in-memory images by role (from Slicer nodes or arrays) and build a Case."""
    sources = dict(sources or {})
    if not images:
        raise InputError(f"case {case_id}: no images given")
    for role, image in images.items():
        validate_image(image, f"{sources.get(role, role)} ({role})")
    check_same_grid(images, sources)
    return Case(case_id, dict(images), {r: sources.get(r, r) for r in images})


def case_from_files(case_id: str, files: Mapping[str, str | Path]) -> Case:
    """Read and validate one file per role."""
    seen: dict[Path, str] = {}
    for role, path in files.items():
        resolved = Path(path).resolve()
        if resolved in seen:
            raise InputError(
                f"{path}: given for both {seen[resolved]} and {role}; each sequence needs its own file."
            )
        seen[resolved] = role
    images = {role: read_image(path) for role, path in files.items()}
    return case_from_images(case_id, images, {role: str(path) for role, path in files.items()})


def _match_suffix(stem: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    lowered = stem.lower()
    for suffix, role in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if lowered.endswith(suffix):
            return stem[: -len(suffix)], role
    return None


def find_dataset_json(folder: Path, levels: int = 2) -> Path | None:
    """A ``dataset.json`` in ``folder`` or up to ``levels`` parents (nnU-Net raw datasets keep it at the top)."""
    for candidate in [folder, *list(folder.parents)[:levels]]:
        path = candidate / "dataset.json"
        if path.is_file():
            return path
    return None


def discover_case_files(folder: str | Path, channel_names: Mapping[str, str] | None = None,
                        fallback_channel_names: Mapping[str, str] | None = None) -> tuple[str, dict[str, Path]]:
    """Find the case id and one file per role in a case folder.

    Understands BraTS 2023+ (``<id>-t1n.nii.gz`` …), BraTS 2020/21 (``<id>_t1.nii.gz``, ``_t1ce``, ``_t2``,
    ``_flair``) and nnU-Net naming (``<id>_0000.nii.gz`` …). nnU-Net channel numbers are turned into roles with
    ``channel_names`` (a dataset.json ``channel_names`` dict) or, when not given, with a ``dataset.json`` found in
    the folder or its parents, else with ``fallback_channel_names`` (the command line passes the first model's, as
    files numbered for nnU-Net are usually numbered for the model at hand). Segmentation files (``-seg``, ``_seg``) are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder. Give a case folder holding one image file per sequence.")
    stems = {}
    for entry in sorted(folder.iterdir()):
        stem = strip_image_ending(entry.name) if entry.is_file() else None
        if stem is not None and not re.search(r"[-_](seg|label|labels|mask)$", stem, re.IGNORECASE):
            stems[entry] = stem
    found: dict[str, list[Path]] = {}
    ids: set[str] = set()
    nnunet_files: dict[int, Path] = {}
    for path, stem in stems.items():
        match = _match_suffix(stem, BRATS2023_SUFFIXES) or _match_suffix(stem, BRATS2021_SUFFIXES)
        if match:
            ids.add(match[0])
            found.setdefault(match[1], []).append(path)
            continue
        nnunet = re.fullmatch(r"(.+)_(\d{4})", stem)
        if nnunet:
            ids.add(nnunet.group(1))
            channel = int(nnunet.group(2))
            if channel in nnunet_files:
                raise InputError(f"{path} and {nnunet_files[channel]}: two files for nnU-Net channel {channel:04d}")
            nnunet_files[channel] = path
    if nnunet_files:
        if channel_names is None:
            dataset_json = find_dataset_json(folder)
            if dataset_json is None and fallback_channel_names is not None:
                channel_names = fallback_channel_names
            elif dataset_json is None:
                raise InputError(
                    f"{folder}: files use nnU-Net channel numbers ({', '.join(f'_{c:04d}' for c in sorted(nnunet_files))}) "
                    "but no dataset.json says which sequence each number is. Put the dataset's dataset.json beside "
                    "the files, pass --channel-names (e.g. t1n,t1c,t2w,t2f), or rename files to BraTS naming "
                    "(<id>-t1n.nii.gz …)."
                )
            else:
                channel_names = json.loads(dataset_json.read_text())["channel_names"]
        for channel, path in nnunet_files.items():
            if str(channel) not in channel_names:
                raise InputError(
                    f"{path}: channel {channel:04d} is not among the channel names {dict(channel_names)}"
                )
            found.setdefault(channel_role(channel_names[str(channel)]), []).append(path)
    if not found:
        names = ", ".join(p.name for p in stems) or "no image files"
        raise InputError(
            f"{folder}: no sequence files recognised (found: {names}). Name them <id>-t1n/-t1c/-t2w/-t2f.nii.gz "
            "(BraTS 2023), <id>_t1/_t1ce/_t2/_flair.nii.gz (BraTS 2021) or <id>_0000.nii.gz … (nnU-Net)."
        )
    duplicates = {role: paths for role, paths in found.items() if len(paths) > 1}
    if duplicates:
        role, paths = next(iter(duplicates.items()))
        raise InputError(
            f"{folder}: more than one file for {role}: {', '.join(p.name for p in paths)}. Keep one file per sequence."
        )
    if len(ids) > 1:
        raise InputError(f"{folder}: files of more than one case ({', '.join(sorted(ids))}); give one case per folder.")
    return ids.pop(), {role: paths[0] for role, paths in found.items()}


def read_case_folder(folder: str | Path, channel_names: Mapping[str, str] | None = None,
                     fallback_channel_names: Mapping[str, str] | None = None) -> Case:
    """Read a case folder in BraTS 2023+, BraTS 2020/21 or nnU-Net naming (see :func:`discover_case_files`)."""
    case_id, files = discover_case_files(folder, channel_names, fallback_channel_names)
    ordered = {role: files[role] for role in sorted(files, key=lambda r: (BRATS_ROLES + (r,)).index(r))}
    return case_from_files(case_id, ordered)


# ----------------------------------------------------------------------------------------------------------------
# Writing: every file is written to a temporary name in the target folder and renamed when complete, so that an
# interrupted run never leaves a file that looks finished.


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot be created ({exc.strerror or exc}). Choose another output "
                          "folder.") from exc
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"{path.parent}: not writable. Choose an output folder you can write to.")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: could not be written ({exc.strerror or exc}). Check free space and permissions.") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_array_image(array: np.ndarray, dtype: type, reference: sitk.Image, path: str | Path) -> Path:
    """Write a (z, y, x) array as ``dtype`` on the reference image's geometry, atomically, compressed."""
    path = Path(path)
    image = sitk.GetImageFromArray(array.astype(dtype, copy=False))
    image.CopyInformation(reference)
    _atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
    return path


def write_label_map(labels: np.ndarray, reference: sitk.Image, path: str | Path) -> Path:
    """Write a (z, y, x) label array as uint8 on the reference image's geometry."""
    return write_array_image(labels, np.uint8, reference, path)


def write_scalar_map(values: np.ndarray, reference: sitk.Image, path: str | Path) -> Path:
    """Write a (z, y, x) float map (uncertainty, probability) as float32 on the reference image's geometry."""
    return write_array_image(values, np.float32, reference, path)


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON (indented, UTF-8) atomically."""
    path = Path(path)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def write_csv(rows: Iterable[Mapping[str, Any]], path: str | Path, columns: Sequence[str]) -> Path:
    """Write rows (dicts) as CSV with the given columns, atomically."""
    path = Path(path)
    rows = list(rows)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(path, write)
    return path
