"""Plausibility of CT inputs: a model trained on CT expects Hounsfield units (HU).

nnU-Net normalises a channel named ``CT`` with the intensity statistics of its training set in HU (clip to the
foreground's 0.5–99.5 percentiles, then z-score), so a CT that is not in HU — stored values without the DICOM
rescale slope/intercept (air at 0 instead of −1000), intensities normalised to 0–1, a brain-windowed export, an MRI
given as CT — is segmented without any error, and wrongly. Such inputs are not refused (a CT cropped to the head's
inside has no air either): each finding is a warning that names the file, recorded with the result.

What a scan in HU shows: air at about −1000 HU (around the body, in sinuses and airways; scanners pad outside the
field of view with −1024 or lower) and bone above +300 HU (the skull, the spine, ribs).
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: Roles whose images must be in HU: the channel name ``CT`` (see :func:`BraTSEnsembleLib.roles.channel_role`),
#: the name by which nnU-Net itself treats a channel as CT.
CT_ROLES: tuple[str, ...] = ("ct",)
#: Below this there is air (−1000 HU) or the scanner's padding; a CT in HU has such voxels.
AIR_BELOW_HU = -500.0
#: Above this there is bone (cortical bone 500–1900 HU); a CT of the head or trunk in HU has such voxels.
BONE_ABOVE_HU = 300.0


def hounsfield_problems(voxels: np.ndarray) -> list[str]:
    """What makes an image implausible as a CT in HU (empty when it looks like one)."""
    lowest, highest = float(np.min(voxels)), float(np.max(voxels))
    problems = []
    if lowest >= AIR_BELOW_HU:
        problems.append(
            f"no voxel below {AIR_BELOW_HU:g} (lowest {lowest:g}), so no air at about -1000 HU: the image is probably "
            "not in Hounsfield units (stored values without the DICOM rescale slope/intercept, normalised "
            "intensities, or not a CT)")
    if highest <= BONE_ABOVE_HU:
        problems.append(
            f"no voxel above {BONE_ABOVE_HU:g} (highest {highest:g}), so no bone: the image is probably not in "
            "Hounsfield units, or clipped to a soft-tissue window")
    return problems


def ct_warnings(case: Any) -> list[str]:
    """One warning per CT image (roles :data:`CT_ROLES`) of the case that does not look like HU, naming the file."""
    warnings = []
    for role in case.roles:
        problems = hounsfield_problems(case.array(role)) if role in CT_ROLES else []
        if problems:
            warnings.append(f"{case.source(role)} ({role}): {'; '.join(problems)}. A CT model segments such an "
                            "image without error, but unreliably: check the export (HU: air -1000, water 0, bone "
                            "above +300).")
    return warnings
