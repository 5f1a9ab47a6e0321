"""Reading case folders in the three namings, and refusing bad input with a message naming the file and the fix."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib.case import (StagedFiles, case_from_images, discover_case_files, read_case_folder, write_json,
                                   write_label_map)
from BraTSEnsembleLib.demo.phantom import make_phantom
from BraTSEnsembleLib.errors import InputError


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(42, shape=(24, 28, 26))


@pytest.mark.parametrize("naming", ["brats2023", "brats2021", "nnunet"])
def test_reads_each_naming_into_roles(phantom, tmp_path, naming):
    case_dir = phantom.write(tmp_path, naming=naming, with_labels=True)
    if naming == "nnunet":  # nnU-Net numbers need a dataset.json to say which sequence each is
        (tmp_path / "dataset.json").write_text(json.dumps(
            {"channel_names": {"0": "T1", "1": "T1Gd", "2": "T2", "3": "FLAIR"}}))
    case = read_case_folder(case_dir)
    assert case.case_id == phantom.case_id
    assert sorted(case.roles) == ["t1c", "t1n", "t2f", "t2w"]
    for role in case.roles:
        assert np.allclose(case.array(role), phantom.images[role], atol=1e-3)
    assert case.spacing_zyx == (1.0, 1.0, 1.0)
    assert case.shape_zyx == phantom.labels.shape


def test_nnunet_naming_without_dataset_json_names_the_fix(phantom, tmp_path):
    case_dir = phantom.write(tmp_path, naming="nnunet")
    with pytest.raises(InputError, match="--channel-names"):
        read_case_folder(case_dir)
    # the command line's fallback (the first model's channel roles) is used only when nothing else says
    case = read_case_folder(case_dir, fallback_channel_names={"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"})
    assert np.allclose(case.array("t2f"), phantom.images["t2f"], atol=1e-3)


def test_real_brats_case_reads_as_int16_with_real_geometry(real_case):
    case = read_case_folder(real_case)
    assert case.case_id == "BraTS-GLI-00001-000"
    assert case.shape_zyx == (155, 240, 240)
    assert sitk.GetArrayViewFromImage(case.images["t1c"]).dtype == np.int16
    assert case.array("t2f").dtype == np.float32 and case.array("t2f").max() > 100


# -- other refusals of the case reader (the bad-input matrix itself: test_bad_input_matrix.py) ---------------------


def test_folder_without_recognisable_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "scan.nii.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(InputError, match="no sequence files recognised.*scan.nii.gz"):
        discover_case_files(tmp_path)


def test_in_memory_images_are_validated_too(phantom):
    images = {"t1c": phantom.to_sitk(phantom.images["t1c"]),
              "t2f": phantom.to_sitk(np.zeros_like(phantom.images["t2f"]))}
    with pytest.raises(InputError, match=r"node t2f \(t2f\): is all zero"):
        case_from_images("x", images, {"t1c": "node t1c", "t2f": "node t2f"})


# -- writers ------------------------------------------------------------------------------------------------------


def test_label_map_keeps_reference_geometry_and_leaves_no_partial_file(phantom, tmp_path):
    reference = phantom.to_sitk(phantom.images["t1c"])
    reference.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    path = write_label_map(phantom.labels, reference, tmp_path / "x.nii.gz")
    written = sitk.ReadImage(str(path))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(written.GetDirection(), reference.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(written), phantom.labels)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


def test_written_files_follow_the_umask_not_mkstemps_private_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_staged_files_appear_together_in_order_or_not_at_all(tmp_path):
    with StagedFiles() as staged:
        write_json({"n": 1}, tmp_path / "first.json", staged)
        write_json({"n": 2}, tmp_path / "second.json", staged)
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
        assert all(".partial" in p.name for p in tmp_path.iterdir())
        assert [p.name for p in staged.commit()] == ["first.json", "second.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.json", "second.json"]
    try:
        with StagedFiles() as staged:
            write_json({"n": 3}, tmp_path / "third.json", staged)
            raise KeyboardInterrupt  # a cancel between staging and commit
    except KeyboardInterrupt:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.json", "second.json"]
