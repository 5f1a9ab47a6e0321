"""A case: its images by modality role on one checked grid, the folder readers, and the result writers.

Images are SimpleITK images; arrays handed to models are in SimpleITK/nnU-Net order (z, y, x), exactly as
nnU-Net's ``SimpleITKIO`` reads them, so that a member wrapping nnU-Net sees the numbers ``nnUNetv2_predict`` sees.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .headers import check_image_header
from .limits import check_direction, check_spacing
from .roles import (BRATS2021_SUFFIXES, BRATS2023_SUFFIXES, BRATS_ROLES, NAMED_FILE_ROLES, channel_role,
                    role_file_suffixes)

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
    #: seconds spent reading and checking the files (:func:`case_from_files`); None for images given in memory
    read_seconds: float | None = field(default=None, compare=False)

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

    @property
    def description(self) -> str:
        """'case <id>', with its folder when all its images came from files in one folder (for messages)."""
        folders = {str(Path(s).parent) for s in self.sources.values() if Path(s).is_file()}
        return f"case {self.case_id}" + (f" ({folders.pop()})" if len(folders) == 1 else "")


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

    The header is checked first (:func:`BraTSEnsembleLib.headers.check_image_header`): an image too large for the
    memory budget or with non-orthonormal axes is refused before any voxel is read.

    NIfTI files are first checked with nibabel, because ITK's NIfTI reader hides two problems: it fills the missing
    part of a truncated ``.nii.gz`` with zeros and it reads NaN/Inf voxels as 0, without a word (nnU-Net's own
    reader, SimpleITK, then segments a half-empty or silently altered image).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    check_image_header(path)  # size against the memory budget, orthonormal axes: before any voxel is read
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
    """Refuse images a model cannot use: not 3-D, vector-valued, empty, with an implausible spacing (see
    :mod:`BraTSEnsembleLib.limits`) or non-orthonormal axes, constant, or with NaN/Inf voxels."""
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
    check_spacing(image.GetSpacing(), source)  # plausible for MRI/CT unless --allow-unusual-spacing
    check_direction(image.GetDirection(), source)
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


def check_distinct_volumes(images: Mapping[str, sitk.Image], sources: Mapping[str, str]) -> None:
    """Raise InputError when two roles hold identical voxels: one volume given (or copied) for two sequences.

    Different MRI sequences never have identical voxels; a model fed one volume twice would still return labels,
    just wrong ones, so this is refused rather than segmented.
    """
    seen: dict[tuple[str, tuple[int, ...], bytes], str] = {}
    for role, image in images.items():
        array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
        key = (str(array.dtype), array.shape, hashlib.sha256(array.data).digest())
        if key in seen:
            first = seen[key]
            raise InputError(
                f"{sources.get(first, first)} ({first}) and {sources.get(role, role)} ({role}) hold identical voxels: "
                "the same volume was given for two sequences. Give each sequence its own image file (check the "
                "file names or the volumes chosen for each sequence)."
            )
        seen[key] = role


def case_from_images(case_id: str, images: Mapping[str, sitk.Image], sources: Mapping[str, str] | None = None) -> Case:
    """Validate in-memory images by role (from Slicer nodes or arrays) and build a Case."""
    sources = dict(sources or {})
    if not images:
        raise InputError(f"case {case_id}: no images given")
    for role, image in images.items():
        validate_image(image, f"{sources.get(role, role)} ({role})")
    check_same_grid(images, sources)
    check_distinct_volumes(images, sources)
    return Case(case_id, dict(images), {r: sources.get(r, r) for r in images})


def check_distinct_files(files: Mapping[str, str | Path]) -> None:
    """Refuse one file given for two roles (the same path, a symbolic or a hard link to it), before anything is
    read. A file that cannot be looked at is left to the reader, which names it."""
    seen: dict[tuple[int, int], tuple[str, str | Path]] = {}
    for role, path in files.items():
        try:
            status = Path(path).stat()  # follows symbolic links; (device, inode) also catches hard links
        except OSError:
            continue  # read_image names a missing or unreadable file
        identity = (status.st_dev, status.st_ino)
        if identity in seen:
            first_role, first_path = seen[identity]
            raise InputError(
                f"{path} ({role}) and {first_path} ({first_role}) are one file (the same path or a link to it): "
                f"it is given for both {first_role} and {role}. Each sequence needs its own file."
            )
        seen[identity] = (role, path)


def case_from_files(case_id: str, files: Mapping[str, str | Path]) -> Case:
    """Read and validate one file per role. One file given for two roles (the same path, a symbolic or a hard link
    to it) is refused before anything is read."""
    started = time.perf_counter()
    check_distinct_files(files)
    images = {role: read_image(path) for role, path in files.items()}
    case = case_from_images(case_id, images, {role: str(path) for role, path in files.items()})
    case.read_seconds = time.perf_counter() - started
    return case


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
                        fallback_channel_names: Mapping[str, str] | None = None, *,
                        roles: Iterable[str] = ()) -> tuple[str, dict[str, Path]]:
    """Find the case id and one file per role in a case folder.

    Understands BraTS 2023+ (``<id>-t1n.nii.gz`` …), BraTS 2020/21 (``<id>_t1.nii.gz``, ``_t1ce``, ``_t2``,
    ``_flair``), other roles by name (``<id>-ct.nii.gz`` or ``<id>_ct.nii.gz``: CT, and the generic ``roles`` the
    models need, such as ``adc``) and nnU-Net naming (``<id>_0000.nii.gz`` …). nnU-Net channel numbers are turned into roles with
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
    named_roles = role_file_suffixes((*NAMED_FILE_ROLES, *roles))
    for path, stem in stems.items():
        match = (_match_suffix(stem, BRATS2023_SUFFIXES) or _match_suffix(stem, BRATS2021_SUFFIXES)
                 or _match_suffix(stem, named_roles))
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
            "(BraTS 2023), <id>_t1/_t1ce/_t2/_flair.nii.gz (BraTS 2021), <id>-ct.nii.gz (CT) or <id>_0000.nii.gz "
            "… (nnU-Net)."
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
                     fallback_channel_names: Mapping[str, str] | None = None, *, roles: Iterable[str] = ()) -> Case:
    """Read a case folder in BraTS 2023+, BraTS 2020/21, role-named or nnU-Net naming (see
    :func:`discover_case_files`)."""
    case_id, files = discover_case_files(folder, channel_names, fallback_channel_names, roles=roles)
    return case_from_files(case_id, in_role_order(files))


def in_role_order(files: Mapping[str, Any]) -> dict[str, Any]:
    """``files`` by role in the order a case is read: BraTS roles first (t1n, t1c, t2w, t2f), others after them as
    given (the order decides the reference image and the order of the roles in a result's JSON)."""
    return {role: files[role] for role in sorted(files, key=lambda r: (BRATS_ROLES + (r,)).index(r))}


# ----------------------------------------------------------------------------------------------------------------
# Writing: every file is written to a temporary name in the target folder and renamed when complete, so that an
# interrupted or failed run never leaves a file that looks finished, nor a temporary file. Files that belong
# together (a case's label map, uncertainty maps and statistics JSON) are staged together and renamed in one go.

#: What a user can do when a write fails for lack of space (ENOSPC, a quota, a file-size limit).
NO_SPACE_FIX = "Free space on that disk (or raise the quota / file-size limit), or choose another output folder."
NOT_WRITABLE_FIX = "Choose an output folder you can write to."
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class IncompleteWrite(OSError):
    """A written file that reads back incomplete (ITK's writers do not report a failed write)."""


def write_failure(path: Path, exc: BaseException) -> OutputError:
    """An OutputError for a failed write of ``path``: the path, the system's reason, and the fix that fits it."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        fix = NOT_WRITABLE_FIX if exc.errno in _PERMISSION_ERRNOS else NO_SPACE_FIX
        if exc.errno in _NO_SPACE_ERRNOS or isinstance(exc, IncompleteWrite):
            reason += ": the disk is full or a quota / file-size limit was reached"
    else:  # ITK reports failed writes as RuntimeError, without an errno
        lines = str(exc).strip().splitlines()
        reason = lines[-1].strip() if lines else type(exc).__name__
        fix = NO_SPACE_FIX
    return OutputError(f"{path}: could not be written ({reason}). Nothing was written under that name. {fix}")


def check_output_folder(folder: str | Path) -> None:
    """Refuse, before any work is done, an output folder that cannot be created or written to.

    Nothing is created: the nearest existing folder on the way must be a writable folder.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{existing}: is a file, so the output folder {folder} cannot be created there. Choose "
                          "another output folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f", so the output folder {folder} cannot be created in it"
        raise OutputError(f"{existing}: not writable{where}. {NOT_WRITABLE_FIX}")


def _prepare_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot be created ({exc.strerror or exc}). Choose another output "
                          "folder.") from exc
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{folder}: not writable. {NOT_WRITABLE_FIX}")


def _default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` would give a new file (``mkstemp`` gives 0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


Writer = Callable[[Path], None]


class StagedFiles:
    """Files written under temporary names beside their final names and renamed into place by :meth:`commit`.

    Use it as a context manager: leaving the block without ``commit()`` (an error, a cancel, Ctrl-C) deletes every
    temporary file, and no final name has been touched. ``commit()`` renames in the order the files were staged, so
    the file staged last (a statistics JSON) appears last.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temporary file, final path)

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.discard()

    def stage(self, path: str | Path, write: Writer, verify: Writer | None = None) -> Path:
        """Write ``path``'s content to a temporary file with ``write(tmp)``, then check it with ``verify(tmp)``.

        Raises OutputError naming ``path`` and the fix when the folder cannot be used or the write fails (disk full,
        file-size limit, permissions); the temporary file is deleted then.
        """
        path = Path(path)
        _prepare_folder(path.parent)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + "".join(path.suffixes),
                                            dir=path.parent)
            os.close(fd)
        except OSError as exc:
            raise write_failure(path, exc) from exc
        tmp = Path(tmp_name)
        self._pending.append((tmp, path))
        try:
            write(tmp)
            if verify is not None:
                verify(tmp)
        except (OSError, RuntimeError) as exc:
            self._remove(tmp)
            raise write_failure(path, exc) from exc
        return path

    @property
    def pending(self) -> list[tuple[Path, Path]]:
        """(temporary file, final path) of every staged file not renamed yet, in staging order."""
        return list(self._pending)

    def commit(self, on_renamed: Callable[[Path], None] | None = None) -> list[Path]:
        """Rename every staged file to its final name (calling ``on_renamed(final path)`` after each); if one rename
        fails, or the run is interrupted (Ctrl-C, SIGTERM) between two, the files renamed before it are removed
        again (so no set is left half-replaced); a failed rename raises an OutputError."""
        done: list[Path] = []
        mode = _default_file_mode()
        try:
            for tmp, path in self._pending:
                os.chmod(tmp, mode)
                os.replace(tmp, path)
                done.append(path)
                if on_renamed is not None:
                    on_renamed(path)
        except BaseException as exc:
            for renamed in done:
                self._remove(renamed)
            if isinstance(exc, OSError):
                raise write_failure(path, exc) from exc
            raise
        finally:
            self.discard()
        return done

    def discard(self) -> None:
        """Delete the temporary files not renamed yet."""
        for tmp, _ in self._pending:
            self._remove(tmp)
        self._pending.clear()

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _atomic_write(path: Path, write: Writer, verify: Writer | None = None) -> None:
    """Write one file under a temporary name and rename it when complete (see :class:`StagedFiles`)."""
    with StagedFiles() as staged:
        staged.stage(path, write, verify)
        staged.commit()


def _stage_or_write(path: Path, write: Writer, verify: Writer | None, staged: StagedFiles | None) -> Path:
    if staged is None:
        _atomic_write(path, write, verify)
    else:
        staged.stage(path, write, verify)
    return path


def _verify_image_file(tmp: Path, image: sitk.Image) -> None:
    """Read a just-written image back completely: ITK's writers do not report a failed write (a full disk, a
    file-size limit) but leave a truncated file, which ITK's reader would even read back with zeros in place of the
    missing voxels. Raises IncompleteWrite when the file is incomplete or differs from ``image``."""
    try:
        if tmp.name.lower().endswith((".nii", ".nii.gz")):
            import nibabel

            voxels = np.asarray(nibabel.load(str(tmp)).dataobj)
            complete = tuple(voxels.shape) == tuple(image.GetSize())
        else:
            written = sitk.ReadImage(str(tmp))
            complete = np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image))
    except Exception as exc:  # nibabel: EOFError, zlib errors …; ITK: RuntimeError
        raise IncompleteWrite(errno.EIO, f"the file came out incomplete ({type(exc).__name__})") from exc
    if not complete:
        raise IncompleteWrite(errno.EIO, "the file came out incomplete")


def write_array_image(array: np.ndarray, dtype: type, reference: sitk.Image, path: str | Path,
                      staged: StagedFiles | None = None) -> Path:
    """Write a (z, y, x) array as ``dtype`` on the reference image's geometry, compressed, and check it by reading
    it back; atomically, or as part of ``staged`` (renamed into place by its ``commit()``)."""
    image = sitk.GetImageFromArray(array.astype(dtype, copy=False))
    image.CopyInformation(reference)
    return _stage_or_write(Path(path), lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True),
                           lambda tmp: _verify_image_file(tmp, image), staged)


def write_label_map(labels: np.ndarray, reference: sitk.Image, path: str | Path,
                    staged: StagedFiles | None = None) -> Path:
    """Write a (z, y, x) label array as uint8 on the reference image's geometry."""
    return write_array_image(labels, np.uint8, reference, path, staged)


def write_scalar_map(values: np.ndarray, reference: sitk.Image, path: str | Path,
                     staged: StagedFiles | None = None) -> Path:
    """Write a (z, y, x) float map (uncertainty, probability) as float32 on the reference image's geometry."""
    return write_array_image(values, np.float32, reference, path, staged)


def write_json(data: Any, path: str | Path, staged: StagedFiles | None = None) -> Path:
    """Write JSON (indented, UTF-8), atomically or as part of ``staged``."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return _stage_or_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), None, staged)


def write_csv(rows: Iterable[Mapping[str, Any]], path: str | Path, columns: Sequence[str],
              staged: StagedFiles | None = None) -> Path:
    """Write rows (dicts) as CSV with the given columns, atomically or as part of ``staged``."""
    path = Path(path)
    rows = list(rows)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return _stage_or_write(path, write, None, staged)
