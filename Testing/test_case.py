"""Reading case folders in the three namings, and refusing bad input with a message naming the file and the fix."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib.case import (case_from_images, discover_case_files, read_case_folder, write_json,
                                   write_label_map)
from BraTSEnsembleLib.demo.phantom import make_phantom
from BraTSEnsembleLib.errors import InputError, OutputError


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


# -- the bad-input matrix of the case reader ----------------------------------------------------------------------


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def test_missing_role_is_reported_by_the_pipeline_with_what_was_found(phantom, tmp_path):
    from BraTSEnsembleLib.roles import ensure_roles_available

    case_dir = phantom.write(tmp_path)
    (case_dir / f"{phantom.case_id}-t2f.nii.gz").unlink()
    case = read_case_folder(case_dir)
    with pytest.raises(InputError, match=r"t2f \(T2-FLAIR\).*found: t1c"):
        ensure_roles_available(("t1n", "t1c", "t2w", "t2f"), case.roles, "model X", f"case {case.case_id}")


def test_two_files_for_one_role(phantom, tmp_path):
    case_dir = phantom.write(tmp_path)
    _write(phantom.to_sitk(phantom.images["t1c"]), case_dir / f"{phantom.case_id}_t1ce.nii.gz")
    with pytest.raises(InputError, match="more than one file for t1c"):
        read_case_folder(case_dir)


def test_same_file_for_two_roles(phantom, tmp_path):
    from BraTSEnsembleLib.case import case_from_files

    path = _write(phantom.to_sitk(phantom.images["t1c"]), tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="given for both t1n and t1c"):
        case_from_files("x", {"t1n": path, "t1c": path})


@pytest.mark.parametrize("change, word", [
    (lambda im: im.SetSpacing((1.0, 1.0, 1.2)), "spacing"),
    (lambda im: im.SetOrigin((5.0, 0.0, 0.0)), "origin"),
    (lambda im: im.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1)), "direction"),
])
def test_geometry_mismatch_names_both_files_and_the_fix(phantom, tmp_path, change, word):
    case_dir = phantom.write(tmp_path)
    path = case_dir / f"{phantom.case_id}-t2w.nii.gz"
    image = sitk.ReadImage(str(path))
    change(image)
    _write(image, path)
    with pytest.raises(InputError) as error:
        read_case_folder(case_dir)
    message = str(error.value)
    assert word in message and "t2w" in message and "t1c" in message and "resample" in message


def test_size_mismatch(phantom, tmp_path):
    case_dir = phantom.write(tmp_path)
    smaller = phantom.to_sitk(phantom.images["t1n"][:, :, :-2].copy())
    _write(smaller, case_dir / f"{phantom.case_id}-t1n.nii.gz")
    with pytest.raises(InputError, match="size"):
        read_case_folder(case_dir)


def test_four_d_image(phantom, tmp_path):
    case_dir = phantom.write(tmp_path)
    series = sitk.JoinSeries([phantom.to_sitk(phantom.images["t1n"])] * 2)
    _write(series, case_dir / f"{phantom.case_id}-t1n.nii.gz")
    with pytest.raises(InputError, match="4-D image.*split"):
        read_case_folder(case_dir)


def test_two_d_image(phantom, tmp_path):
    case_dir = phantom.write(tmp_path)
    _write(sitk.GetImageFromArray(phantom.images["t1n"][10]), case_dir / f"{phantom.case_id}-t1n.nii.gz")
    with pytest.raises(InputError, match="2-D image"):
        read_case_folder(case_dir)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(phantom, tmp_path, bad):
    case_dir = phantom.write(tmp_path)
    array = phantom.images["t2w"].copy()
    array[3, 4, 5] = bad
    _write(phantom.to_sitk(array), case_dir / f"{phantom.case_id}-t2w.nii.gz")
    with pytest.raises(InputError, match="NaN/Inf"):
        read_case_folder(case_dir)


@pytest.mark.parametrize("value, word", [(0.0, "empty"), (7.0, "constant")])
def test_empty_or_constant_image(phantom, tmp_path, value, word):
    case_dir = phantom.write(tmp_path)
    _write(phantom.to_sitk(np.full_like(phantom.images["t1c"], value)), case_dir / f"{phantom.case_id}-t1c.nii.gz")
    with pytest.raises(InputError, match=word):
        read_case_folder(case_dir)


def test_truncated_file(phantom, tmp_path):
    case_dir = phantom.write(tmp_path)
    path = case_dir / f"{phantom.case_id}-t1c.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match=r"t1c\.nii\.gz: cannot be read"):
        read_case_folder(case_dir)


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


def test_output_folder_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(OutputError, match="results.*cannot be created"):
        write_json({"a": 1}, blocker / "case" / "x.json")
