"""Models with their own label set (labelsets.py), per-class statistics and per-lesion tables (lesions.py), and the
refusals made when a model set is built.

Oracles: SimpleITK's own connected components (fully connected = 26-connectivity) and label shape statistics
(voxel counts, physical centroids in LPS) on the label map the command line wrote; ``stats.region_statistics`` for
BraTS label maps; slicerio reading back the ``.seg.nrrd``. The metastasis model is a real nnU-Net v2 model trained
here (``metastasis_model`` fixture: one channel T1c, one class "metastasis").
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib.demo.labelset_train import metastasis_phantom
from BraTSEnsembleLib.demo.phantom import make_phantom
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.labels import ET, NETC, SNFH
from BraTSEnsembleLib.labelsets import (BRATS_LABEL_SET, DATASET, LabelSet, dataset_label_set,
                                        label_set_from_dataset_labels)
from BraTSEnsembleLib.lesions import LESION_COLUMNS, class_statistics, lesion_table
from BraTSEnsembleLib.members.nnunet import NnUNetMember
from BraTSEnsembleLib.modelset import load_model_set, nnunet_model_set
from BraTSEnsembleLib.stats import region_statistics

from test_modelset import write_manifest

ROOT = Path(__file__).resolve().parents[1]
METASTASIS = {"background": 0, "metastasis": 1}


def brats_ensemble(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)


def relabelled(model: Path, dest: Path, labels: dict) -> Path:
    """The results folder ``model`` with other dataset.json labels (plans and folds as they are, folds linked)."""
    dest.mkdir(parents=True)
    (dest / "plans.json").write_bytes((model / "plans.json").read_bytes())
    dataset = json.loads((model / "dataset.json").read_text())
    (dest / "dataset.json").write_text(json.dumps({**dataset, "labels": labels}))
    for fold in model.glob("fold_*"):
        (dest / fold.name).symlink_to(fold, target_is_directory=True)
    return dest


@pytest.fixture(scope="module")
def metastasis_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multifocal phantom with three separate lesions (a seed never used in training) in BraTS 2023 naming; the
    model reads its T1c and FLAIR."""
    return metastasis_phantom(9303).write(tmp_path_factory.mktemp("met-case"))


# ------------------------------------------------------------------------------------------------ label sets

@pytest.mark.parametrize("labels, brats", [
    ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}, True),
    ({"background": 0, "edema": 1, "non-enhancing and necrosis": 2, "enhancing tumor": 3}, True),
    ({"background": 0, "NCR/NET": 1, "ED": 2, "ET": 4}, True),             # BraTS 2020 names and values
    ({"background": 0, "1": 1, "2": 2, "3": 3}, True),                      # bare numbers: BraTS 2023 values
    ({"background": 0, "label1": 1, "label 2": 2}, True),
    ({"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}, True),
    ({"background": 0, "liver": 1}, False),                                 # was silently NETC before
    ({"background": 0, "metastasis": 1}, False),
    ({"background": 0, "edema": 1, "liver": 2}, False),                     # one class that is not BraTS's
])
def test_a_model_keeps_its_own_labels_unless_they_are_brats(labels: dict, brats: bool) -> None:
    found = label_set_from_dataset_labels(labels, "x/dataset.json")
    assert found.is_brats is brats
    if not brats:
        assert found.kind == DATASET and found.labels_json() == labels


def test_label_set_identity_is_normalised_names_with_their_values() -> None:
    a = dataset_label_set({"background": 0, "Brain_Metastasis": 1}, "a")
    assert a.same_as(dataset_label_set({"background": 0, "brain metastasis": 1}, "b"))
    assert a.same_as(dataset_label_set({"bg": 0, "BRAIN-METASTASIS": 1}, "c"))
    assert not a.same_as(dataset_label_set({"background": 0, "brain metastasis": 2}, "d"))  # same name, other value
    assert not a.same_as(dataset_label_set({"background": 0, "lesion": 1}, "e"))            # same value, other name
    assert not a.same_as(BRATS_LABEL_SET) and not BRATS_LABEL_SET.same_as(a)
    assert BRATS_LABEL_SET.same_as(label_set_from_dataset_labels({"background": 0, "1": 1}, "f"))
    assert LabelSet.from_json(a.to_json(), "x").same_as(a) and LabelSet.from_json(None, "x").is_brats


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "liver\nSegment0_ID:=x": 1}, "has characters other than"),
    ({"background": 0, "liver": 256}, "values must be 1–255"),
    ({"background": 0, "liver": True}, "not an integer"),
    ({"background": 0, "Liver": 1, "liver": 2}, "have the same name"),
    ({"background": 0, "liver": 1, "spleen": 1}, "have the same value 1"),
    ({"background": 0}, "name no class besides background"),
])
def test_a_dataset_label_set_that_cannot_be_shown_safely_is_refused(labels: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message) as raised:
        dataset_label_set(labels, "m/dataset.json")
    assert str(raised.value).startswith("m/dataset.json: ") and '"metastasis": 1' in str(raised.value)


def test_an_nnunet_member_with_a_liver_class_keeps_it(metastasis_model: Path, tmp_path: Path) -> None:
    liver = NnUNetMember(relabelled(metastasis_model, tmp_path / "liver", {"background": 0, "liver": 1}))
    assert not liver.label_set.is_brats and liver.label_set.names == ("liver",) and liver.labels == (0, 1)
    member = NnUNetMember(metastasis_model)
    assert member.label_set.labels_json() == METASTASIS and member.roles == ("t1c", "t2f")


def test_defaults_and_refusals_when_a_set_is_built(metastasis_model: Path, trained_models, tmp_path: Path) -> None:
    # the command line's default postprocessing: ratio-adaptive for BraTS models (as before), none for the others
    assert [str(s) for s in nnunet_model_set([trained_models["A"].path], postprocess=None).postprocess] == [
        "ratio-adaptive"]
    own = nnunet_model_set([metastasis_model], postprocess=None, min_lesion_volume_mm3=100)
    assert own.postprocess == [] and own.describe()["label_set"] == {"kind": "dataset", "labels": METASTASIS}
    assert own.describe()["min_lesion_volume_mm3"] == 100
    assert own.describe()["members"][0]["class_weights"] == {"background": 1.0, "metastasis": 1.0}
    manifest = write_manifest(tmp_path, {"members": [{"framework": "nnunetv2", "path": str(metastasis_model)}],
                                         "min_lesion_volume_mm3": 100})
    assert load_model_set(manifest).postprocess == []  # no "postprocess" key: none for this label set
    with pytest.raises(ModelError, match=r"class weights name BraTS classes .*'metastasis': 1"):
        load_model_set(write_manifest(tmp_path, {"postprocess": "none", "members": [
            {"framework": "nnunetv2", "path": str(metastasis_model), "class_weights": {"ET": 2}}]}, "cw.json"))
    with pytest.raises(ModelError, match=r"min_lesion_volume_mm3 must be a finite number >= 0"):
        load_model_set(write_manifest(tmp_path, {"members": [{"framework": "nnunetv2", "path": str(metastasis_model)}],
                                                 "min_lesion_volume_mm3": -5}, "neg.json"))


# ------------------------------------------------------------------------------------------------ statistics

def oblique_reference(shape_zyx: tuple[int, int, int]) -> sitk.Image:
    image = sitk.Image(tuple(reversed(shape_zyx)), sitk.sitkUInt8)
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((12.0, -30.5, 4.0))
    c, s = np.cos(0.4), np.sin(0.4)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    return image


def sitk_lesions(labels: np.ndarray, reference: sitk.Image, value: int | tuple[int, ...]) -> list[tuple[int, tuple]]:
    """(voxels, LPS centroid) of each 26-connected component, largest first, by SimpleITK alone."""
    mask = sitk.GetImageFromArray(np.isin(labels, value).astype(np.uint8))
    mask.CopyInformation(reference)
    components = sitk.ConnectedComponent(mask, True)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(components)
    found = [(shape.GetNumberOfPixels(i), shape.GetCentroid(i)) for i in shape.GetLabels()]
    return sorted(found, key=lambda item: -item[0])


def test_lesion_tables_match_simpleitk_and_brats_statistics_are_unchanged() -> None:
    labels = make_phantom(9302, shape=(40, 44, 36), layout="multifocal").labels
    reference = oblique_reference(labels.shape)
    statistics, lesions = class_statistics(labels, reference, BRATS_LABEL_SET)
    assert statistics == region_statistics(labels, reference.GetSpacing())  # BraTS numbers as before
    for region, values in (("ET", ET), ("TC", (NETC, ET)), ("WT", (NETC, SNFH, ET))):
        expected = sitk_lesions(labels, reference, values)
        table = lesions[region]
        assert len(table) == statistics[region]["lesions"] == len(expected) > 0
        assert [lesion["voxels"] for lesion in table] == [voxels for voxels, _ in expected]
        for lesion, (voxels, centre) in zip(table, expected):
            np.testing.assert_allclose(lesion["centre_lps_mm"], centre, atol=0.006)
            np.testing.assert_allclose(lesion["centre_ras_mm"], [-centre[0], -centre[1], centre[2]], atol=0.006)
            assert lesion["volume_mm3"] == pytest.approx(voxels * 0.8 * 1.1 * 2.5, abs=0.006)
    # a minimum: lesions below it are neither counted nor listed, but reported; one of exactly the minimum stays
    sizes = [lesion["volume_mm3"] for lesion in lesions["TC"]]
    minimum = sorted(sizes)[len(sizes) // 2] if len(sizes) > 1 else sizes[0]
    with_minimum, kept = class_statistics(labels, reference, BRATS_LABEL_SET, min_volume_mm3=minimum)
    assert [lesion["volume_mm3"] for lesion in kept["TC"]] == [v for v in sizes if v >= minimum]
    assert with_minimum["TC"]["lesions"] + with_minimum["TC"]["lesions_below_minimum"] == len(sizes)
    assert with_minimum["TC"]["voxels"] == statistics["TC"]["voxels"]  # nothing removed
    assert lesion_table(np.zeros(labels.shape, bool), reference) == ([], 0)


# ------------------------------------------------------------------------------------------------ command line

def read_lesion_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == LESION_COLUMNS
        return list(reader)


def test_a_metastasis_model_gives_a_per_lesion_table_not_brats_regions(metastasis_model: Path, metastasis_case: Path,
                                                                      tmp_path: Path) -> None:
    from BraTSEnsembleLib import process

    out = tmp_path / "out"
    fast = ("--no-mirroring", "--device", "cpu", "--progress", "none")
    done = brats_ensemble("predict", metastasis_case, "-o", out, "-m", metastasis_model, *fast)
    assert done.returncode == 0, done.stderr[-3000:]
    case_id = metastasis_case.name
    summary = json.loads((out / f"{case_id}.json").read_text())
    image = sitk.ReadImage(str(out / f"{case_id}.nii.gz"))
    labels = sitk.GetArrayFromImage(image)
    assert set(np.unique(labels).tolist()) <= {0, 1}
    assert summary["label_set"] == {"kind": "dataset", "labels": METASTASIS}
    assert list(summary["regions"]) == ["metastasis"] and summary["postprocess"] == []
    assert summary["lesions_file"] == f"{case_id}_lesions.csv"
    stats = summary["regions"]["metastasis"]
    expected = sitk_lesions(labels, image, 1)
    assert len(expected) >= 1, "the trained model must find the lesions of a multifocal case"
    assert stats["value"] == 1 and stats["voxels"] == int(np.count_nonzero(labels == 1))
    assert stats["lesions"] == len(expected) and "lesions_below_minimum" not in stats
    table = summary["lesions"]["metastasis"]
    assert [lesion["id"] for lesion in table] == list(range(1, len(expected) + 1))
    assert [lesion["voxels"] for lesion in table] == [voxels for voxels, _ in expected]
    for lesion, (_, centre) in zip(table, expected):
        np.testing.assert_allclose(lesion["centre_lps_mm"], centre, atol=0.006)
    rows = read_lesion_csv(out / f"{case_id}_lesions.csv")
    assert [(r["region"], int(r["lesion"]), int(r["voxels"])) for r in rows] == [
        ("metastasis", lesion["id"], lesion["voxels"]) for lesion in table]
    assert list(summary["uncertainty"]) == ["metastasis"]
    assert list(summary["member_agreement"][0]["dice"]) == ["metastasis"]
    assert summary["members"][0]["channels"] == ["t1c", "t2f"]

    # Slicer outputs: one segment per class, named from dataset.json, generic terminology
    import slicerio

    outputs = process.finalize_case_outputs(out, case_id)
    seg = slicerio.read_segmentation(str(outputs["segmentation"]))
    (segment,) = seg["segments"]
    assert segment["id"] == segment["name"] == "metastasis" and segment["labelValue"] == 1
    assert segment["terminology"]["type"] == ["SCT", "85756007", "Tissue"]
    assert np.array_equal(np.asarray(seg["voxels"]).transpose(2, 1, 0), labels)
    assert outputs["lesions"] == out / f"{case_id}_lesions.csv"
    table_rows = list(csv.DictReader(outputs["csv"].open(encoding="utf-8")))
    assert [(r["Region"], r["Description"], int(r["Lesions"])) for r in table_rows] == [
        ("metastasis", "label 1", len(expected))]

    # a minimum lesion volume: the same label map, fewer lesions counted, the others reported
    volumes = sorted(lesion["volume_mm3"] for lesion in table)
    minimum = (volumes[0] + volumes[-1]) / 2 if volumes[-1] > volumes[0] else volumes[0] + 1  # some below it
    again = brats_ensemble("predict", metastasis_case, "-o", tmp_path / "min", "-m", metastasis_model, *fast,
                           "--min-lesion-volume", str(minimum))
    assert again.returncode == 0, again.stderr[-3000:]
    with_minimum = json.loads((tmp_path / "min" / f"{case_id}.json").read_text())
    assert with_minimum["min_lesion_volume_mm3"] == minimum
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "min" / f"{case_id}.nii.gz"))), labels)
    kept = [lesion for lesion in table if lesion["volume_mm3"] >= minimum]
    assert [lesion["voxels"] for lesion in with_minimum["lesions"]["metastasis"]] == [l["voxels"] for l in kept]
    assert with_minimum["regions"]["metastasis"]["lesions"] == len(kept)
    assert with_minimum["regions"]["metastasis"]["lesions_below_minimum"] == len(table) - len(kept) > 0


def test_label_sets_that_cannot_be_fused_are_refused_before_any_member_runs(metastasis_model: Path, trained_models,
                                                                           metastasis_case: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = brats_ensemble("predict", metastasis_case, "-o", out, "-m", metastasis_model, "-m",
                          trained_models["A"].path, "--device", "cpu", "--progress", "json")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: members ") and "cannot be fused" in error
    assert "'metastasis': 1" in error and "the BraTS tumour classes" in error
    assert str(metastasis_model / "dataset.json") in error
    events = [json.loads(line)["event"] for line in done.stdout.splitlines() if line.strip()]
    assert "case-start" not in events and "member-start" not in events
    assert not out.exists() or not any(out.iterdir())

    done = brats_ensemble("predict", metastasis_case, "-o", out, "-m", metastasis_model, "--postprocess",
                          "ratio-adaptive", "--device", "cpu")
    assert done.returncode == 1
    assert "postprocessing ratio-adaptive is defined on the BraTS tumour regions" in done.stderr
    assert "Use --postprocess none" in done.stderr

    # in batch: refused once, for the whole cohort, before any case
    cohort = tmp_path / "cohort"
    for seed in (9304, 9306):
        metastasis_phantom(seed).write(cohort)
    lesion = relabelled(metastasis_model, tmp_path / "lesion" / metastasis_model.name, {"background": 0, "lesion": 1})
    manifest = write_manifest(tmp_path, {"members": [
        {"name": "metastases", "framework": "nnunetv2", "path": str(metastasis_model)},
        {"name": "lesions", "framework": "nnunetv2", "path": str(lesion)}]})
    done = brats_ensemble("batch", cohort, "-o", out, "--model-set", manifest, "--device", "cpu", "--progress",
                          "none")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "members 'metastases' and 'lesions' cannot be fused" in errors[0]
    assert "'metastasis': 1" in errors[0] and "'lesion': 1" in errors[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_brats_results_gain_lesion_tables_and_keep_their_fields(trained_models, phantom_cases, tmp_path: Path) -> None:
    case_dir = sorted(phantom_cases.iterdir())[1]
    out = tmp_path / "out"
    done = brats_ensemble("predict", case_dir, "-o", out, "-m", trained_models["A"].path, "--folds", "0",
                          "--no-mirroring", "--device", "cpu", "--progress", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / f"{case_dir.name}.json").read_text())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_dir.name}.nii.gz")))
    assert summary["regions"] == region_statistics(labels, sitk.ReadImage(str(out / f"{case_dir.name}.nii.gz"))
                                                   .GetSpacing())
    assert all(set(values) == {"voxels", "volume_ml", "lesions"} for values in summary["regions"].values())
    assert summary["label_set"]["kind"] == "brats" and summary["min_lesion_volume_mm3"] is None
    assert summary["postprocess"] == ["ratio-adaptive"]
    assert {region: len(table) for region, table in summary["lesions"].items()} == {
        region: values["lesions"] for region, values in summary["regions"].items()}
    rows = read_lesion_csv(out / f"{case_dir.name}_lesions.csv")
    assert len(rows) == sum(values["lesions"] for values in summary["regions"].values()) > 0
