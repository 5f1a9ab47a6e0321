"""The ``brats-ensemble`` command line, run as a real subprocess on real models and files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]


def brats_ensemble(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_predict_writes_labels_and_statistics_with_json_progress(trained_models, phantom_cases, tmp_path):
    case_dir = sorted(phantom_cases.iterdir())[0]
    out = tmp_path / "out"
    done = brats_ensemble("predict", str(case_dir), "-o", str(out), "-m", str(trained_models["A"].path),
                          "-m", str(trained_models["B"].path), "--weight", "2", "--weight", "1", "--folds", "0",
                          "--no-mirroring", "--device", "cpu", "--progress", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]  # stdout is JSON lines only
    assert [e["event"] for e in events][0] == "case-start" and events[-1]["event"] == "finished"
    assert {"member-start", "member-done", "postprocess", "written"} <= {e["event"] for e in events}
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    labels_image = sitk.ReadImage(str(out / f"{case_dir.name}.nii.gz"))
    reference = sitk.ReadImage(str(case_dir / f"{case_dir.name}-t1c.nii.gz"))
    assert labels_image.GetSize() == reference.GetSize()
    assert np.allclose(labels_image.GetOrigin(), reference.GetOrigin())
    labels = sitk.GetArrayFromImage(labels_image)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    summary = json.loads((out / f"{case_dir.name}.json").read_text())
    assert summary["regions"]["WT"]["voxels"] == int(np.count_nonzero(labels))
    assert summary["regions"]["ET"]["voxels"] == int(np.count_nonzero(labels == 3))
    assert summary["postprocess"] == ["ratio-adaptive"]  # the default
    assert [m["weight"] for m in summary["members"]] == [2.0, 1.0]
    assert summary["members"][1]["channels"] == ["t2f", "t1c", "t1n", "t2w"]

    again = brats_ensemble("predict", str(case_dir), "-o", str(out), "-m", str(trained_models["A"].path))
    assert again.returncode == 1 and "was made otherwise" in again.stderr and "--overwrite" in again.stderr


@pytest.mark.slow
def test_batch_is_resumable_and_writes_a_cohort_csv(trained_models, phantom_cases, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(phantom_cases, cohort)
    broken = cohort / "Broken-001"
    broken.mkdir()
    (broken / "Broken-001-t1c.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    model = ["-m", str(trained_models["A"].path), "--folds", "0", "--no-mirroring", "--device", "cpu"]
    first = brats_ensemble("batch", str(cohort), "-o", str(out), *model, "--progress", "bar")
    assert first.returncode == 1
    assert "Broken-001-t1c.nii.gz: cannot be read" in first.stderr
    assert not (out / "Broken-001.nii.gz").exists() and not (out / "Broken-001.json").exists()
    done_cases = sorted(p.stem for p in out.glob("*.json"))
    assert done_cases == sorted(p.name for p in phantom_cases.iterdir())
    csv_lines = (out / "statistics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("case_id,ET_voxels,ET_volume_ml,ET_lesions")
    assert len(csv_lines) == 1 + len(done_cases)

    shutil.rmtree(broken)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = brats_ensemble("batch", str(cohort), "-o", str(out), *model, "--progress", "json")
    assert second.returncode == 0, second.stderr[-2000:]
    events = [json.loads(line) for line in second.stdout.splitlines()]
    assert sum(e["event"] == "case-skipped" for e in events) == len(done_cases)
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items() if name.endswith("gz"))


#: The stages of ``timing.stages`` in the JSON, in order (docs/command-line.md); reading and writing lie outside
#: ``seconds``, the others inside it.
STAGES = ("reading", "loading", "preprocessing", "network", "export", "member_other", "uncertainty", "fusion",
          "postprocessing", "statistics", "writing")
OUTSIDE_SECONDS = ("reading", "writing")


@pytest.mark.slow
def test_predict_records_the_time_of_each_stage(trained_models, phantom_cases, tmp_path):
    """Every stage is in the JSON, none negative, and the stages within ``seconds`` add up to at most ``seconds``
    (allowing for the rounding of each to 1 ms and of ``seconds`` to 10 ms); each member's parts add up to its own
    time. No time is compared with a fixed figure."""
    case_dir = sorted(phantom_cases.iterdir())[1]
    out = tmp_path / "out"
    done = brats_ensemble("predict", str(case_dir), "-o", str(out), "-m", str(trained_models["A"].path),
                          "-m", str(trained_models["B"].path), "--folds", "0", "--no-mirroring", "--device", "cpu",
                          "--progress", "none", "--save-uncertainty")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / f"{case_dir.name}.json").read_text())
    stages = summary["timing"]["stages"]
    assert tuple(stages) == STAGES
    assert all(isinstance(v, float) and v >= 0 for v in stages.values()), stages
    assert stages["network"] > 0 and stages["writing"] > 0  # measured, not left out
    inside = [v for k, v in stages.items() if k not in OUTSIDE_SECONDS]
    assert sum(inside) <= summary["seconds"] + 0.005 + 0.0005 * len(inside), (summary["seconds"], stages)
    members = summary["timing"]["members"]
    assert [m["member"] for m in members] == [m["name"] for m in summary["members"]]
    for member in members:
        parts = [member[k] for k in ("loading", "preprocessing", "network", "export", "other")]
        assert all(v >= 0 for v in parts) and abs(sum(parts) - member["seconds"]) <= 0.0005 * 6, member
    assert sum(m["seconds"] for m in members) <= summary["seconds"] + 0.005 + 0.0005 * len(members)


@pytest.mark.parametrize("args, message", [
    (["--postprocess", "blur"], "unknown postprocessing rule 'blur'"),
    (["--weight", "1", "--weight", "2"], "2 weight(s) given for 1 model(s)"),
])
def test_bad_options_fail_clearly_before_any_output(trained_models, phantom_cases, tmp_path, args, message):
    """(--device cuda without a GPU and --folds of a fold that is not there: rows of test_bad_input_matrix.py.)"""
    case_dir = sorted(phantom_cases.iterdir())[0]
    done = brats_ensemble("predict", str(case_dir), "-o", str(tmp_path / "out"), "-m",
                          str(trained_models["A"].path), *args)
    assert done.returncode == 1
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_scores_a_folder(tmp_path):
    from BraTSEnsembleLib.demo.phantom import make_phantom

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for seed, drop_et in ((5, False), (6, True)):
        phantom = make_phantom(seed, shape=(40, 44, 40))
        sitk.WriteImage(phantom.to_sitk(phantom.labels), str(gt_dir / f"{phantom.case_id}-seg.nii.gz"))
        prediction = phantom.labels.copy()
        if drop_et:
            prediction[prediction == 3] = 2
        sitk.WriteImage(phantom.to_sitk(prediction), str(pred_dir / f"{phantom.case_id}.nii.gz"))
    done = brats_ensemble("evaluate", str(pred_dir), str(gt_dir), "-o", str(tmp_path / "scores"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ET: lesion_dice 0.5000" in done.stdout  # one perfect case, one with every ET lesion missed
    assert "WT: lesion_dice 1.0000" in done.stdout  # relabelling ET as SNFH keeps the whole tumour
    assert (tmp_path / "scores" / "per_case.csv").is_file()
    # (label maps with values outside the protocol's labels: a row of test_bad_input_matrix.py)
