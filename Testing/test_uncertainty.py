"""Uncertainty maps: member disagreement and entropy of the fused probabilities, their summaries and files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BraTSEnsembleLib.labels import ET, NETC, SNFH
from BraTSEnsembleLib.members.base import Probabilities
from BraTSEnsembleLib.ensemble import fused_labels
from BraTSEnsembleLib.uncertainty import VoteCounter, normalised_entropy, summarise

ROOT = Path(__file__).resolve().parents[1]


def test_disagreement_is_the_fraction_of_members_voting_against_the_fused_label():
    votes = VoteCounter()
    votes.add(np.array([[[0, ET, ET, SNFH]]], np.uint8))
    votes.add(np.array([[[0, ET, NETC, SNFH]]], np.uint8))
    votes.add(np.array([[[0, NETC, NETC, 0]]], np.uint8))
    fused = np.array([[[0, ET, NETC, SNFH]]], np.uint8)
    assert votes.disagreement(fused).ravel().tolist() == pytest.approx([0.0, 1 / 3, 1 / 3, 1 / 3])
    lonely = VoteCounter()
    lonely.add(fused)
    assert not lonely.disagreement(fused).any()


def test_normalised_entropy_is_zero_when_certain_and_one_when_uniform():
    array = np.zeros((4, 1, 1, 3), np.float32)
    array[:, 0, 0, 0] = [1, 0, 0, 0]
    array[:, 0, 0, 1] = 0.25
    array[:, 0, 0, 2] = [0.5, 0.5, 0, 0]
    entropy = normalised_entropy(Probabilities(array, (0, 1, 2, 3)))
    assert entropy.ravel().tolist() == pytest.approx([0.0, 1.0, 0.5], abs=1e-6)


def test_region_entropy_is_the_mean_binary_entropy():
    from BraTSEnsembleLib.members.base import REGION_SPACE

    array = np.zeros((3, 1, 1, 2), np.float32)
    array[:, 0, 0, 0] = [0.5, 0.5, 0.5]  # maximally unsure for every region
    array[:, 0, 0, 1] = [1.0, 1.0, 0.0]  # certain
    entropy = normalised_entropy(Probabilities(array, ("WT", "TC", "ET"), REGION_SPACE))
    assert entropy.ravel().tolist() == pytest.approx([1.0, 0.0], abs=1e-4)


def test_member_labels_and_region_summary():
    array = np.zeros((3, 1, 1, 2), np.float32)
    array[:, 0, 0, 0] = [0.1, 0.6, 0.3]
    array[:, 0, 0, 1] = [0.1, 0.2, 0.7]
    assert fused_labels(Probabilities(array, (0, SNFH, ET))).tolist() == [[[SNFH, ET]]]
    labels = np.array([[[SNFH, ET]]], np.uint8)
    summary = summarise({"disagreement": np.array([[[0.5, 0.0]]], np.float32)}, labels, ["ET", "WT", "NETC"])
    assert summary == {"ET": {"mean_disagreement": 0.0}, "WT": {"mean_disagreement": 0.25},
                       "NETC": {"mean_disagreement": None}}


@pytest.mark.slow
def test_cli_writes_uncertainty_maps_and_summaries(trained_models, phantom_cases, tmp_path):
    case_dir = sorted(phantom_cases.iterdir())[1]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case_dir), "-o", str(out),
                           "-m", str(trained_models["A"].path), "-m", str(trained_models["B"].path), "--folds", "0",
                           "--no-mirroring", "--device", "cpu", "--postprocess", "none", "--save-uncertainty",
                           "--progress", "none"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_dir.name}.nii.gz")))
    disagreement = sitk.ReadImage(str(out / f"{case_dir.name}_disagreement.nii.gz"))
    assert disagreement.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayFromImage(disagreement)
    # two members: both agree with the fused label, one does, or neither (the mean can favour a third class)
    assert set(np.unique(values)) <= {0.0, 0.5, 1.0} and (values == 0.5).any()
    entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_dir.name}_entropy.nii.gz")))
    assert 0.0 <= entropy.min() and entropy.max() <= 1.0
    summary = json.loads((out / f"{case_dir.name}.json").read_text())
    wt = labels > 0
    assert summary["uncertainty"]["WT"]["mean_disagreement"] == pytest.approx(float(values[wt].mean()), abs=1e-4)
    assert summary["disagreement_file"] == f"{case_dir.name}_disagreement.nii.gz"
    # where the Slicer module looks for the map it shows (BraTSEnsembleLib.process, which does not import the CLI)
    from BraTSEnsembleLib.process import UNCERTAINTY_MAPS, uncertainty_map_path

    for kind in UNCERTAINTY_MAPS:
        assert uncertainty_map_path(out, case_dir.name, kind).is_file()
