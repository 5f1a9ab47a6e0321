"""The module's logic with models that are not four-sequence BraTS models, on Slicer's own libraries (slicer-core):
a metastasis model with its own label set (T1c and FLAIR in, one class "metastasis" out), the CT metastasis cascade
(one CT channel), and ``segmentFolder`` through one ``brats-ensemble batch`` run. Each runs the real command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slicer_mrml import (app, label_points_ras, load_volume, logic, mismatches, nodes_of_class,  # noqa: E402,F401
                              segment_points_ras)

from BraTSEnsembleLib.demo.ct_phantom import make_ct_phantom  # noqa: E402
from BraTSEnsembleLib.demo.labelset_train import metastasis_phantom  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def segment_ids(node):
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def table_rows(table):
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [dict(zip(columns, (table.GetCellText(r, c) for c in range(len(columns)))))
            for r in range(table.GetNumberOfRows())]


def write_metastasis_case(folder: Path, seed: int) -> Path:
    """A metastasis phantom's T1c and FLAIR in BraTS 2023 naming (and its T1n, which the model does not read)."""
    phantom = metastasis_phantom(seed)
    folder.mkdir(parents=True)
    for role in ("t1c", "t2f", "t1n"):
        sitk.WriteImage(phantom.to_sitk(phantom.images[role]), str(folder / f"{phantom.case_id}-{role}.nii.gz"))
    return folder


def test_metastasis_model_gives_its_own_segment_and_a_lesion_table(app, logic, tmp_path, metastasis_model):
    case = write_metastasis_case(tmp_path / "case", 9301)
    volumes = {role: load_volume(app, case / f"Phantom-09301-{role}.nii.gz") for role in ("t1c", "t2f", "t1n")}
    assert logic.neededRoles(str(metastasis_model)) == ("t1c", "t2f")
    # a needed role without a volume: refused naming it, before anything is exported or added
    nodes_before = app.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="needs volumes for t2f"):
        logic.startSegmentation({"t1c": volumes["t1c"]}, str(metastasis_model), device="cpu")
    assert app.scene.GetNumberOfNodes() == nodes_before and list(app.temporary.iterdir()) == []

    # t1n is given too (the panel keeps it selected): not used by this model, so not exported
    seg, table = logic.segment(volumes, str(metastasis_model), device="cpu", mirroring=False, timeout=600)
    assert segment_ids(seg) == ["metastasis"]
    assert seg.GetSegmentation().GetSegment("metastasis").GetName() == "metastasis"
    assert seg.GetName() == "Phantom-09301 segmentation"
    voxels = len(segment_points_ras(seg, "metastasis"))
    stats = {row["Region"]: row for row in table_rows(table)}
    assert list(stats) == ["metastasis"] and int(stats["metastasis"]["Voxels"]) == voxels > 0
    lesions = seg.GetNodeReference("BraTSEnsemble.Lesions")
    assert lesions is not None and lesions.GetName() == "Phantom-09301 lesions"
    rows = table_rows(lesions)
    assert len(rows) == int(stats["metastasis"]["Lesions"]) >= 1
    assert {row["region"] for row in rows} == {"metastasis"}
    assert sum(int(row["voxels"]) for row in rows) == voxels  # no minimum lesion volume: every lesion is listed
    assert [int(row["lesion"]) for row in rows] == list(range(1, len(rows) + 1))
    assert lesions.GetColumnUnitLabel("volume_mm3") == "mm3"
    # each lesion's RAS centre is the mean of its segment voxels' RAS positions (the largest: lesion 1)
    points = segment_points_ras(seg, "metastasis")
    centre = np.array([float(rows[0][f"centre_ras_{a}_mm"]) for a in "xyz"])
    assert np.linalg.norm(points - centre, axis=1).min() < 20
    assert list(app.temporary.iterdir()) == []


def test_ct_cascade_through_segment_equals_the_command_line(app, logic, tmp_path, trained_cascade):
    phantom = make_ct_phantom(9601)
    case = phantom.write(tmp_path / "cases", naming="named")  # <id>-ct.nii.gz
    ct = load_volume(app, case / f"{phantom.case_id}-ct.nii.gz")
    assert logic.neededRoles(str(trained_cascade.cascade)) == ("ct",)
    seg, table = logic.segment({"ct": ct}, str(trained_cascade.cascade), device="cpu", mirroring=False,
                               timeout=600)
    assert seg.GetName() == f"{phantom.case_id} segmentation"  # the id from the CT volume's name
    assert segment_ids(seg) == ["metastasis"]
    # the same case through the command line itself
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case), "-o", str(out), "--model",
                    str(trained_cascade.cascade), "--device", "cpu", "--no-mirroring", "--progress", "none"],
                   cwd=ROOT, check=True, capture_output=True)
    labels = sitk.ReadImage(str(out / f"{phantom.case_id}.nii.gz"))
    expected = label_points_ras(labels, 1)
    found = segment_points_ras(seg, "metastasis")
    assert len(expected) > 0 and mismatches(expected, found) == 0
    assert seg.GetNodeReference("BraTSEnsemble.Lesions") is not None


def write_nnunet_named_case(folder: Path, seed: int) -> Path:
    """A metastasis phantom as nnU-Net numbers it: ``case_0000.nii.gz`` (T1c), ``case_0001.nii.gz`` (FLAIR)."""
    phantom = metastasis_phantom(seed)
    folder.mkdir(parents=True)
    for channel, role in enumerate(("t1c", "t2f")):
        sitk.WriteImage(phantom.to_sitk(phantom.images[role]), str(folder / f"case_{channel:04d}.nii.gz"))
    return folder


def test_segment_folder_runs_one_batch_keeps_same_named_cases_apart_and_resumes(logic, tmp_path, metastasis_model):
    cohort = tmp_path / "cohort"
    first, second = write_nnunet_named_case(cohort / "patientA", 9311), write_nnunet_named_case(cohort / "patientB",
                                                                                                9312)
    broken = write_nnunet_named_case(cohort / "patientC", 9313)
    (broken / "case_0001.nii.gz").unlink()  # its FLAIR is missing: that case fails, the others do not
    out = tmp_path / "results"
    options = {"device": "cpu", "mirroring": False, "timeout": 600}
    results = logic.segmentFolder(str(cohort), str(out), str(metastasis_model), **options)
    assert set(results) == {str(first), str(second), str(broken)}
    assert "t2f" in results[str(broken)]["error"] and not (out / "patientC.json").exists()
    for folder in (first, second):  # the files' id ("case") is shared: each case is written under its folder's name
        outcome = results[str(folder)]
        assert "error" not in outcome, outcome
        assert Path(outcome["segmentation"]).name == f"{folder.name}.seg.nrrd"
        assert Path(outcome["lesions"]).name == f"{folder.name}_lesions.csv"
        data = json.loads(Path(outcome["json"]).read_text())
        assert data["case_folder"] == str(folder.resolve()) and data["case_id"] == folder.name
    labels = {f: sitk.GetArrayFromImage(sitk.ReadImage(results[str(f)]["labels"])) for f in (first, second)}
    assert not np.array_equal(labels[first], labels[second])  # two patients, two results
    written = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()
               if p.name.endswith((".nii.gz", ".json", "_lesions.csv"))}

    # a rerun skips both (same fingerprint): nothing recomputed, the command line's files untouched
    again = logic.segmentFolder(str(cohort), str(out), str(metastasis_model), **options)
    assert again == results
    assert {name: (out / name).stat().st_mtime_ns for name in written} == {n: v[0] for n, v in written.items()}

    # one patient's image changes: without overwrite its result made from other inputs is never replaced
    image = sitk.ReadImage(str(second / "case_0000.nii.gz"))
    sitk.WriteImage(image * 1.5, str(second / "case_0000.nii.gz"))
    with pytest.raises(RuntimeError, match="patientB"):
        logic.segmentFolder(str(cohort), str(out), str(metastasis_model), **options)
    assert {name: (out / name).read_bytes() for name in written} == {n: v[1] for n, v in written.items()}
