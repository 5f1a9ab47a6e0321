"""CT inputs without a model: case folders that name a CT image (nnU-Net numbering or ``<id>-ct.nii.gz``) and the
check that a CT is plausibly in Hounsfield units (a warning, tested end to end in test_cascade.py)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib.case import discover_case_files, read_case_folder
from BraTSEnsembleLib.demo.ct_phantom import make_ct_phantom
from BraTSEnsembleLib.errors import InputError
from BraTSEnsembleLib.hounsfield import ct_warnings, hounsfield_problems

SEED = 9621


def test_ct_case_folders_numbered_or_named(tmp_path):
    phantom = make_ct_phantom(SEED, shape=(24, 32, 32), spacing=(4.0, 4.0, 4.0))
    numbered = phantom.write(tmp_path / "numbered", naming="nnunet")
    case_id, files = discover_case_files(numbered, fallback_channel_names={"0": "CT"})
    assert case_id == phantom.case_id and list(files) == ["ct"]
    with pytest.raises(InputError, match="no dataset.json says which sequence"):
        discover_case_files(numbered)  # a number alone does not say CT

    named = phantom.write(tmp_path / "named", naming="named")  # <id>-ct.nii.gz: CT without any model's help
    case = read_case_folder(named)
    assert case.roles == ("ct",) and case.case_id == phantom.case_id
    assert np.array_equal(case.array("ct"), phantom.image.astype(np.float32))
    (named / f"{phantom.case_id}-ct.nii.gz").rename(named / f"{phantom.case_id}_CT.nii.gz")
    assert read_case_folder(named).roles == ("ct",)

    # another generic role by name, when a model needs it
    (named / f"{phantom.case_id}_CT.nii.gz").rename(named / f"{phantom.case_id}-adc.nii.gz")
    with pytest.raises(InputError, match=r"<id>-ct\.nii\.gz \(CT\)"):
        discover_case_files(named)
    assert list(discover_case_files(named, roles=("adc",))[1]) == ["adc"]


def test_hounsfield_check_finds_ct_not_in_hounsfield_units(tmp_path):
    image = make_ct_phantom(SEED + 1, shape=(24, 32, 32), spacing=(4.0, 4.0, 4.0)).image.astype(np.float32)
    assert hounsfield_problems(image) == []
    assert [p.split(" (lowest")[0] for p in hounsfield_problems(image + 1024)] == ["no voxel below -500"]
    normalised = (image - image.min()) / (image.max() - image.min())
    assert len(hounsfield_problems(normalised)) == 2  # no air and no bone
    brain_window = np.clip(image, 0, 80)
    assert len(hounsfield_problems(brain_window)) == 2

    # only CT images are checked: an MRI role with the same values is not
    phantom = make_ct_phantom(SEED + 2, shape=(24, 32, 32), spacing=(4.0, 4.0, 4.0))
    shifted = phantom.to_sitk((phantom.image.astype(np.int32) + 1024).astype(np.int16))
    folder = tmp_path / "case"
    folder.mkdir()
    sitk.WriteImage(shifted, str(folder / "X-ct.nii.gz"))
    sitk.WriteImage(phantom.to_sitk((phantom.image.astype(np.int32) + 1000).astype(np.int16)), str(folder / "X-t1c.nii.gz"))
    warnings = ct_warnings(read_case_folder(folder))
    assert len(warnings) == 1 and warnings[0].startswith(f"{folder / 'X-ct.nii.gz'} (ct): no voxel below -500")
