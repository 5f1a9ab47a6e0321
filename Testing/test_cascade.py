"""nnU-Net v2 cascades (3d_lowres → 3d_cascade_fullres) as one member, on a genuine cascade trained here
(conftest ``trained_cascade``: single-channel CT phantoms, one label "metastasis"), against nnU-Net's own two
commands run as subprocesses; ``--model`` and manifests with a cascade; the Hounsfield-unit warning end to end;
cascade problems refused before any member runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BraTSEnsembleLib.case import read_case_folder
from BraTSEnsembleLib.demo.ct_phantom import make_ct_phantom
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.members.nnunet import nnunet_member
from BraTSEnsembleLib.modelset import load_model_set

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CPU = torch.device("cpu")
CASE_SEED = 9601  # never a training seed (600-605)


def brats_ensemble(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)


def run_nnunet(args: list[str], work: Path) -> None:
    """An nnU-Net command with its folder variables pointing at the cascade's training folders."""
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results")}
    done = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def read_labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT phantom case folder in nnU-Net naming (``<id>_0000.nii.gz``): nnU-Net's input folder as it is."""
    return make_ct_phantom(CASE_SEED).write(tmp_path_factory.mktemp("ct"), naming="nnunet")


@pytest.fixture(scope="module")
def nnunet_cascade(trained_cascade, ct_case, tmp_path_factory) -> tuple[Path, Path]:
    """nnU-Net's own cascade on ``ct_case``: ``nnUNetv2_predict -c 3d_lowres``, then ``nnUNetv2_predict -c
    3d_cascade_fullres -prev_stage_predictions`` (with probabilities); returns both output folders."""
    out = tmp_path_factory.mktemp("nnunet")
    common = ["-d", str(trained_cascade.dataset_id), "-f", "all", "-device", "cpu", "-npp", "1", "-nps", "1"]
    run_nnunet(["nnUNetv2_predict", "-i", str(ct_case), "-o", str(out / "lowres"), "-c", "3d_lowres", *common],
               trained_cascade.work)
    run_nnunet(["nnUNetv2_predict", "-i", str(ct_case), "-o", str(out / "cascade"), "-c", "3d_cascade_fullres",
                "-prev_stage_predictions", str(out / "lowres"), "--save_probabilities", *common],
               trained_cascade.work)
    return out / "lowres", out / "cascade"


# -- parity with nnU-Net's own cascade ------------------------------------------------------------------------------

@pytest.mark.slow
def test_cascade_member_equals_nnunet_lowres_then_cascade_fullres(trained_cascade, ct_case, nnunet_cascade):
    lowres_out, cascade_out = nnunet_cascade
    case_id = ct_case.name
    case = read_case_folder(ct_case, {"0": "CT"})
    member = nnunet_member(trained_cascade.cascade)  # the 3d_lowres stage is found beside it
    assert member.configuration == "3d_cascade_fullres" and member.roles == ("ct",)
    assert member.previous_stage is not None and member.previous_stage.model_dir == trained_cascade.lowres
    assert member.folds == ["all"] and member.previous_stage.folds == ["all"]

    # stage 1: our low-resolution segmentation is the one nnUNetv2_predict -c 3d_lowres wrote
    theirs_lowres = read_labels(lowres_out / f"{case_id}.nii.gz")
    ours_lowres = member.previous_stage.segmentation(case, CPU)
    assert np.count_nonzero(theirs_lowres) > 0, "the 3d_lowres stage should find metastases on a phantom"
    assert np.array_equal(ours_lowres, theirs_lowres), f"{np.mean(ours_lowres != theirs_lowres):.3%} differ"

    # stage 2: the member's probabilities and labels are nnUNetv2_predict -c 3d_cascade_fullres's
    probabilities = member.predict(case, CPU)
    exported = np.load(cascade_out / f"{case_id}.npz")["probabilities"]
    theirs = read_labels(cascade_out / f"{case_id}.nii.gz")
    assert probabilities.array.shape == exported.shape == (2, *case.shape_zyx)
    assert np.count_nonzero(theirs) > 0, "the cascade should find metastases on a phantom"
    np.testing.assert_allclose(probabilities.array, exported, atol=1e-6)
    assert np.array_equal(probabilities.array.argmax(0), theirs), "labels differ"

    # the comparison bites: nnU-Net's cascade stage without the first stage's segmentation answers otherwise
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=CPU, verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained_cascade.cascade), ("all",))
    without_first_stage = predictor.predict_single_npy_array(
        case.stacked(("ct",)), {"spacing": list(case.spacing_zyx)}, np.zeros((1, *case.shape_zyx), np.float32))
    assert not np.array_equal(without_first_stage, theirs)


@pytest.mark.slow
def test_cli_model_accepts_a_cascade_folder_and_a_named_ct_file(trained_cascade, ct_case, nnunet_cascade, tmp_path):
    """``--model`` with the 3d_cascade_fullres folder alone; the case folder names its CT ``<id>-ct.nii.gz``."""
    case_id = ct_case.name
    case_dir = tmp_path / "cases" / case_id
    case_dir.mkdir(parents=True)
    shutil.copy(ct_case / f"{case_id}_0000.nii.gz", case_dir / f"{case_id}-ct.nii.gz")
    out = tmp_path / "out"
    done = brats_ensemble("predict", case_dir, "-o", out, "--model", trained_cascade.cascade, "--postprocess", "none",
                          "--device", "cpu", "--progress", "json", "--min-lesion-volume", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning:" not in done.stderr  # the phantom is in Hounsfield units
    steps = [e["message"] for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "member-step"]
    assert any("3d_lowres: predicting" in s for s in steps), steps
    theirs = read_labels(nnunet_cascade[1] / f"{case_id}.nii.gz")
    assert np.array_equal(read_labels(out / f"{case_id}.nii.gz"), theirs)
    # the system's output: metastases counted and sized lesion by lesion, those under 100 mm³ left out of the count
    summary = json.loads((out / f"{case_id}.json").read_text())
    assert list(summary["regions"]) == ["metastasis"] and summary["min_lesion_volume_mm3"] == 100
    image = sitk.ReadImage(str(out / f"{case_id}.nii.gz"))
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(image == 1, True))
    voxel_mm3 = float(np.prod(image.GetSpacing()))
    sizes = np.bincount(components.ravel())[1:] * voxel_mm3
    stats = summary["regions"]["metastasis"]
    assert stats["lesions"] == int(np.count_nonzero(sizes >= 100)) >= 1
    assert stats.get("lesions_below_minimum", 0) == int(np.count_nonzero(sizes < 100))
    assert sorted(lesion["volume_mm3"] for lesion in summary["lesions"]["metastasis"]) == pytest.approx(
        sorted(sizes[sizes >= 100]))
    assert (out / f"{case_id}_lesions.csv").is_file()
    member = summary["members"][0]
    assert member["configuration"] == "3d_cascade_fullres" and member["channels"] == ["ct"]
    assert member["previous_stage"]["path"] == str(trained_cascade.lowres)
    assert member["previous_stage"]["folds"] == ["all"]


@pytest.mark.slow
def test_ct_not_in_hounsfield_units_gives_a_warning_not_a_refusal(trained_cascade, tmp_path):
    """Stored values without the DICOM rescale intercept (air at 0, not -1000): the run completes and says so."""
    phantom = make_ct_phantom(CASE_SEED + 1)
    case_dir = tmp_path / "cases" / phantom.case_id
    case_dir.mkdir(parents=True)
    sitk.WriteImage(phantom.to_sitk((phantom.image.astype(np.int32) + 1024).astype(np.uint16)),
                    str(case_dir / f"{phantom.case_id}_0000.nii.gz"))
    out = tmp_path / "out"
    done = brats_ensemble("predict", case_dir, "-o", out, "--model", trained_cascade.cascade, "--postprocess", "none",
                          "--no-mirroring", "--device", "cpu", "--progress", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{phantom.case_id}_0000.nii.gz (ct): no voxel below -500" in warnings[0]
    summary = json.loads((out / f"{phantom.case_id}.json").read_text())
    assert len(summary["warnings"]) == 1 and "Hounsfield" in summary["warnings"][0]


# -- manifests and refusals before any work -------------------------------------------------------------------------

def _copy_stage(folder: Path, target: Path) -> Path:
    """A copy of a results folder (plans, dataset.json, fold folders) under ``target`` with its own name."""
    copy = target / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("predicted_next_stage", "validation", "*.png"))
    return copy


@pytest.mark.slow
def test_manifest_names_both_stages(trained_cascade, tmp_path):
    second = _copy_stage(trained_cascade.cascade, tmp_path / "models" / "second")
    first = _copy_stage(trained_cascade.lowres, tmp_path / "models" / "first")
    manifest = tmp_path / "ct-metastases.json"
    member = {"framework": "nnunetv2", "name": "ct-cascade", "path": f"models/second/{second.name}",
              "previous_stage": f"models/first/{first.name}", "folds": ["all"], "previous_stage_folds": ["all"],
              "mirroring": False}
    manifest.write_text(json.dumps({"postprocess": "none", "members": [member]}))
    model_set = load_model_set(manifest)
    built = model_set.members[0]
    assert built.previous_stage.model_dir == first and built.model_dir == second
    assert built.roles == ("ct",) and built.previous_stage.use_mirroring is False
    recorded = model_set.describe()["members"][0]
    assert recorded["previous_stage"]["path"] == str(first) and recorded["previous_stage"]["folds"] == ["all"]

    def refused(**changes) -> str:
        manifest.write_text(json.dumps({"members": [{k: v for k, v in {**member, **changes}.items()
                                                     if v is not None}]}))
        with pytest.raises(ModelError) as caught:
            load_model_set(manifest)
        assert str(caught.value).startswith(f"{manifest}: member 1 ('ct-cascade'): ")
        return str(caught.value)

    # by default the first stage is looked for beside the second, where nnU-Net puts it; here it is not there
    message = refused(previous_stage=None, previous_stage_folds=None)
    assert f"{second.parent / 'nnUNetTrainer__nnUNetPlans__3d_lowres'} is missing" in message
    assert "3d_lowres stage" in message and "previous_stage" in message
    assert "is not a folder" in refused(previous_stage="models/first/nothing-here")
    assert "form a loop" in refused(previous_stage=f"models/second/{second.name}")
    assert "not found" in refused(previous_stage_folds=[3]) and "fold_3" in refused(previous_stage_folds=[3])
    # a plain (single-stage) folder takes no previous stage
    assert "takes no previous stage" in refused(path=f"models/first/{first.name}")
    # a first stage of another training (other labels) does not fit
    other = _copy_stage(trained_cascade.lowres, tmp_path / "models" / "other")
    dataset = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**dataset, "labels": {"background": 0, "lesion": 1,
                                                                          "oedema": 2}}))
    assert "labels differ" in refused(previous_stage=f"models/other/{other.name}")


@pytest.mark.slow
def test_missing_first_stage_is_refused_before_any_member_runs(trained_cascade, ct_case, tmp_path):
    """A set whose first member is fine and whose second is a cascade without its 3d_lowres stage: refused when the
    set is built — no member runs, nothing is written; in batch once, not per case."""
    lone = _copy_stage(trained_cascade.cascade, tmp_path / "lone")
    missing = lone.parent / "nnUNetTrainer__nnUNetPlans__3d_lowres"
    manifest = tmp_path / "set.json"
    manifest.write_text(json.dumps({"postprocess": "none", "members": [
        {"framework": "nnunetv2", "name": "good", "path": str(trained_cascade.lowres)},
        {"framework": "nnunetv2", "name": "cascade", "path": str(lone)}]}))
    out = tmp_path / "out"
    done = brats_ensemble("predict", ct_case, "-o", out, "--model-set", manifest, "--device", "cpu",
                          "--progress", "json")
    assert done.returncode == 1
    events = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert events == ["error"], events  # no case-start, no member-start
    assert done.stderr.count("error:") == 1 and "member 2 ('cascade')" in done.stderr
    assert f"{missing} is missing" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()

    cohort = tmp_path / "cohort"
    for index in (1, 2):
        make_ct_phantom(CASE_SEED + 10 + index).write(cohort)
    batch = brats_ensemble("batch", cohort, "-o", out, "--model-set", manifest, "--device", "cpu", "--progress", "none")
    assert batch.returncode == 1 and batch.stderr.count("error:") == 1 and f"{missing} is missing" in batch.stderr
    assert not out.exists()

    alone = brats_ensemble("predict", ct_case, "-o", out, "--model", lone, "--device", "cpu")
    assert alone.returncode == 1 and alone.stderr.count("error:") == 1
    assert f"{missing} is missing" in alone.stderr and "beside it" in alone.stderr
    assert not out.exists()
