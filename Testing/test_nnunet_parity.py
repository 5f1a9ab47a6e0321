"""Parity with nnU-Net's own commands on genuine nnU-Net v2 models trained here.

One member, no postprocessing: labels equal ``nnUNetv2_predict_from_modelfolder``'s voxel for voxel.
Several members: labels equal ``nnUNetv2_predict --save_probabilities`` on each model followed by
``nnUNetv2_ensemble``. nnU-Net's commands are run in the test, as subprocesses, on the same files.
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

from BraTSEnsembleLib.case import read_case_folder
from BraTSEnsembleLib.modelset import nnunet_model_set
from BraTSEnsembleLib.pipeline import segment_case

BIN = Path(sys.executable).parent


def nnunet_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp / var)
    return env


def write_nnunet_input(case_dir: Path, channel_order: tuple[str, ...], target: Path) -> Path:
    """Copy a BraTS-named case into nnU-Net naming in the model's channel order (what nnU-Net's users do)."""
    target.mkdir(parents=True, exist_ok=True)
    case_id = case_dir.name
    for channel, role in enumerate(channel_order):
        shutil.copy(case_dir / f"{case_id}-{role}.nii.gz", target / f"{case_id}_{channel:04d}.nii.gz")
    return target


def run_nnunet(args: list[str], tmp: Path) -> None:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=nnunet_env(tmp))
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def read_labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def our_labels(case_dir: Path, models: list[Path], **options) -> np.ndarray:
    model_set = nnunet_model_set(models, postprocess="none", **options)
    return segment_case(read_case_folder(case_dir), model_set, "cpu").labels


@pytest.mark.slow
def test_single_model_all_folds_equals_nnunet_predict(trained_models, phantom_cases, tmp_path):
    model = trained_models["A"]
    case_dir = sorted(phantom_cases.iterdir())[0]
    nn_in = write_nnunet_input(case_dir, model.channel_order, tmp_path / "in")
    run_nnunet(["nnUNetv2_predict_from_modelfolder", "-i", str(nn_in), "-o", str(tmp_path / "out"),
                "-m", str(model.path), "-f", "0", "1", "-device", "cpu"], tmp_path)
    theirs = read_labels(tmp_path / "out" / f"{case_dir.name}.nii.gz")
    ours = our_labels(case_dir, [model.path])  # folds auto-detected: 0 and 1
    assert ours.shape == theirs.shape
    assert np.count_nonzero(theirs) > 0, "the model should find some tumour on a phantom"
    assert np.array_equal(ours, theirs), f"{np.mean(ours != theirs):.2%} of voxels differ"


@pytest.mark.slow
def test_single_fold_without_mirroring_equals_nnunet_disable_tta(trained_models, phantom_cases, tmp_path):
    model = trained_models["B"]  # channels t2f, t1c, t1n, t2w named FLAIR, t1gd, T1w, T2w
    case_dir = sorted(phantom_cases.iterdir())[1]
    nn_in = write_nnunet_input(case_dir, model.channel_order, tmp_path / "in")
    run_nnunet(["nnUNetv2_predict_from_modelfolder", "-i", str(nn_in), "-o", str(tmp_path / "out"),
                "-m", str(model.path), "-f", "0", "-device", "cpu", "--disable_tta", "-chk",
                "checkpoint_best.pth", "-step_size", "0.7"], tmp_path)
    theirs = read_labels(tmp_path / "out" / f"{case_dir.name}.nii.gz")
    ours = our_labels(case_dir, [model.path], folds=["0"], checkpoint="best", use_mirroring=False,
                      tile_step_size=0.7)
    assert np.array_equal(ours, theirs), f"{np.mean(ours != theirs):.2%} of voxels differ"


@pytest.mark.slow
def test_two_model_ensemble_equals_nnunet_ensemble(trained_models, phantom_cases, tmp_path):
    case_dir = sorted(phantom_cases.iterdir())[2]
    prediction_folders = []
    for name in ("A", "B"):
        model = trained_models[name]
        nn_in = write_nnunet_input(case_dir, model.channel_order, tmp_path / f"in{name}")
        out = tmp_path / f"pred{name}"
        run_nnunet(["nnUNetv2_predict_from_modelfolder", "-i", str(nn_in), "-o", str(out), "-m", str(model.path),
                    "-f", "0", "-device", "cpu", "--save_probabilities"], tmp_path)
        prediction_folders.append(str(out))
    run_nnunet(["nnUNetv2_ensemble", "-i", *prediction_folders, "-o", str(tmp_path / "ensemble"), "-np", "1"],
               tmp_path)
    theirs = read_labels(tmp_path / "ensemble" / f"{case_dir.name}.nii.gz")
    ours = our_labels(case_dir, [trained_models["A"].path, trained_models["B"].path], folds=["0"])
    single_a = read_labels(Path(prediction_folders[0]) / f"{case_dir.name}.nii.gz")
    assert not np.array_equal(theirs, single_a), "the two models should disagree somewhere for this test to bite"
    assert np.array_equal(ours, theirs), f"{np.mean(ours != theirs):.2%} of voxels differ"


@pytest.mark.slow
def test_custom_trainer_name_loads_from_plans(trained_models, phantom_cases, tmp_path):
    """A results folder whose trainer class is not installed (a team's loss variant) still runs: the network comes
    from the plans, and the labels equal those of the same weights under nnU-Net's own trainer name."""
    import torch

    source = trained_models["A"].path
    custom = tmp_path / "nnUNetTrainerDiceTopK10Focal__nnUNetPlans__3d_fullres"
    shutil.copytree(source, custom, ignore=shutil.ignore_patterns("fold_1"))
    checkpoint_path = custom / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerDiceTopK10Focal"
    torch.save(checkpoint, checkpoint_path)
    case_dir = sorted(phantom_cases.iterdir())[0]
    ours_custom = our_labels(case_dir, [custom], use_mirroring=False)
    ours_original = our_labels(case_dir, [source], folds=["0"], use_mirroring=False)
    assert np.array_equal(ours_custom, ours_original)
    recorded = json.loads((custom / "dataset.json").read_text())
    assert recorded["labels"]["ET"] == 3
