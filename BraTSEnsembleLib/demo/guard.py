"""Demo model sets say what they are: a set whose manifest has ``"demo": true`` (the shipped demo ensemble, trained
for minutes on synthetic phantoms) warns whenever it segments anything but the shipped demo phantom.

The shipped phantom is recognised by its voxels, not by names or paths: each image of the case must have the voxel
type, the size and the SHA-256 of the voxel values of the shipped case's image of the same role
(``BraTSEnsembleLib/demo/case``). A copy, a renamed folder or the Sample Data volumes that the Slicer module exports
again all count as the phantom; a real scan, or any other phantom, never does.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import CASE_DIR, demo_case_info

#: What the result JSON, stderr and the Slicer panel say (after the set's name).
DEMO_WARNING = ("is a demo set of toy models trained for minutes on synthetic phantoms, and these images are not "
                "the shipped demo phantom: its labels and volumes mean nothing for real scans. Use a model set "
                "trained on real data (see `brats-ensemble recipes list`); never use the demo set on patients.")


def voxel_fingerprint(image: sitk.Image) -> tuple[str, tuple[int, ...], str]:
    """(voxel type, size, SHA-256 of the voxel values) of an image."""
    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    return str(array.dtype), tuple(image.GetSize()), hashlib.sha256(array.data).hexdigest()


@functools.lru_cache(maxsize=1)
def shipped_fingerprints() -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Role → voxel fingerprint of each sequence of the shipped demo case ({} when it is not installed)."""
    try:
        files = demo_case_info()["files"]
    except (FileNotFoundError, KeyError, ValueError):
        return {}
    fingerprints = {}
    for role, entry in files.items():
        path = CASE_DIR / entry["file"]
        if role != "seg" and path.is_file():
            fingerprints[role] = voxel_fingerprint(sitk.ReadImage(str(path)))
    return fingerprints


def is_shipped_phantom(images: dict[str, sitk.Image]) -> bool:
    """True when every image is the shipped demo case's image of its role (voxel type, size and values)."""
    shipped = shipped_fingerprints() if images else {}
    for role, image in images.items():
        expected = shipped.get(role)
        if expected is None:
            return False
        pixel = sitk.GetArrayViewFromImage(image).dtype  # the cheap part first: a real scan differs in size
        if (str(pixel), tuple(image.GetSize())) != expected[:2] or voxel_fingerprint(image) != expected:
            return False
    return True


def demo_warnings(model_set: Any, images: dict[str, sitk.Image]) -> list[str]:
    """The warnings of running ``model_set`` on ``images``: one when the set is a demo set and the images are not the
    shipped phantom, else none."""
    if not getattr(model_set, "demo", False) or is_shipped_phantom(images):
        return []
    return [f"model set {model_set.name or 'demo'} {DEMO_WARNING}"]
