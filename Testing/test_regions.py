"""Region-based nnU-Net v2 models (sigmoid heads WT, TC, ET) as members, alone and beside label-based members.

Parity is checked against nnU-Net's own commands, run here as subprocesses on the same files, as in
``test_nnunet_parity.py``: model "R" is a real region-based model trained by nnU-Net's own trainer on a dataset in
nnU-Net's BraTS Dataset137 convention (labels 1 = ED, 2 = NCR, 3 = ET; regions whole tumor [1, 2, 3], tumor core
[2, 3], enhancing tumor 3; ``regions_class_order`` [1, 2, 3]).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from BraTSEnsembleLib.ensemble import (StreamingEnsemble, argmax_labels, fused_labels, fusion_space,
                                       label_to_region_probabilities, region_labels)
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.labels import ET, NETC, SNFH
from BraTSEnsembleLib.members.base import LABEL_SPACE, REGION_SPACE, Probabilities
from BraTSEnsembleLib.members.nnunet import NnUNetMember, region_channels
from BraTSEnsembleLib.modelset import nnunet_model_set
from test_nnunet_parity import our_labels, read_labels, run_nnunet, write_nnunet_input

#: nnU-Net's output values of model R (Dataset137 convention) → canonical BraTS 2023 values. nnU-Net writes
#: regions_class_order [1, 2, 3] for WT, TC, ET, i.e. 1 = ED (SNFH), 2 = NCR (NETC), 3 = ET.
R_VALUES_TO_CANONICAL = np.array([0, SNFH, NETC, ET], dtype=np.uint8)


def to_regions_reference(label_probabilities: np.ndarray) -> np.ndarray:
    """The documented conversion, written out: channels (background, NETC, SNFH, ET) → (WT, TC, ET), float32."""
    netc, snfh, et = label_probabilities[1], label_probabilities[2], label_probabilities[3]
    return np.stack([(netc + snfh) + et, netc + et, et]).astype(np.float32)


def threshold_reference(regions: np.ndarray) -> np.ndarray:
    """nnU-Net's rule for regions with regions_class_order WT, TC, ET writing SNFH, NETC, ET (canonical values)."""
    labels = np.zeros(regions.shape[1:], dtype=np.uint8)
    for channel, value in enumerate((SNFH, NETC, ET)):
        labels[regions[channel] > 0.5] = value
    return labels


# -- (c) the arithmetic on hand-made arrays ----------------------------------------------------------------------

def hand_made_label_probabilities() -> Probabilities:
    # voxels:      0     1     2     3     4
    background = [0.70, 0.30, 0.10, 0.05, 0.40]
    netc = [0.10, 0.10, 0.50, 0.05, 0.20]
    snfh = [0.10, 0.55, 0.20, 0.30, 0.20]
    et = [0.10, 0.05, 0.20, 0.60, 0.20]
    array = np.asarray([background, netc, snfh, et], dtype=np.float32).reshape(4, 1, 1, 5)
    return Probabilities(array, (0, NETC, SNFH, ET))


def test_label_to_region_conversion_on_hand_made_arrays():
    regions = label_to_region_probabilities(hand_made_label_probabilities())
    assert regions.space == REGION_SPACE and regions.labels == ("WT", "TC", "ET")
    np.testing.assert_allclose(regions.channel("WT").ravel(), [0.30, 0.70, 0.90, 0.95, 0.60], atol=1e-6)
    np.testing.assert_allclose(regions.channel("TC").ravel(), [0.20, 0.15, 0.70, 0.65, 0.40], atol=1e-6)
    np.testing.assert_allclose(regions.channel("ET").ravel(), [0.10, 0.05, 0.20, 0.60, 0.20], atol=1e-6)
    # a model without some class (here without ET, with RC): the missing class counts 0, RC has no region
    no_et = Probabilities(np.asarray([[0.2], [0.3], [0.4], [0.1]], np.float32).reshape(4, 1, 1, 1), (0, 1, 2, 4))
    converted = label_to_region_probabilities(no_et).array.ravel()
    np.testing.assert_allclose(converted, [0.7, 0.3, 0.0], atol=1e-6)


def test_region_thresholds_write_nested_labels_later_regions_overwriting():
    regions = np.asarray([
        # WT    TC    ET     → expected
        [0.40, 0.90, 0.90],  # 0: TC/ET above 0.5 though WT is not: TC writes NETC, ET overwrites → ET
        [0.60, 0.40, 0.10],  # 1: SNFH
        [0.60, 0.70, 0.20],  # 2: NETC
        [0.90, 0.80, 0.51],  # 3: ET
        [0.50, 0.50, 0.50],  # 4: exactly 0.5 is not > 0.5 → background
        [0.90, 0.20, 0.70],  # 5: ET inside no TC: still ET (ET is written last)
    ], dtype=np.float32).T.reshape(3, 1, 1, 6)
    labels = region_labels(Probabilities(regions, ("WT", "TC", "ET"), REGION_SPACE))
    assert labels.ravel().tolist() == [ET, SNFH, NETC, ET, 0, ET]
    # the order of the member's channels does not matter: regions are applied as WT, TC, ET
    reordered = Probabilities(regions[[2, 0, 1]].copy(), ("ET", "WT", "TC"), REGION_SPACE)
    assert region_labels(reordered).ravel().tolist() == labels.ravel().tolist()
    assert np.array_equal(threshold_reference(regions), labels)


def test_label_and_region_members_fuse_in_region_space_in_any_order():
    label_member = hand_made_label_probabilities()
    region_array = np.asarray([[0.2, 0.9, 0.1, 0.8, 0.6], [0.1, 0.2, 0.9, 0.1, 0.5], [0.0, 0.1, 0.8, 0.2, 0.1]],
                              dtype=np.float32).reshape(3, 1, 1, 5)
    region_member = Probabilities(region_array, ("WT", "TC", "ET"), REGION_SPACE)
    expected = (to_regions_reference(label_member.array) + region_array) / np.float32(2)
    for order in ((label_member, region_member), (region_member, label_member)):
        ensemble = StreamingEnsemble()
        for member in order:
            ensemble.add(member)
        fused = ensemble.probabilities()
        assert ensemble.fusion_space == REGION_SPACE and fused.labels == ("WT", "TC", "ET")
        assert np.array_equal(fused.array, expected)
        assert np.array_equal(ensemble.fused_labels(), threshold_reference(expected))
    # fixed space: region from the start gives the same; a label-space fusion refuses a region member
    fixed = StreamingEnsemble(space=REGION_SPACE)
    fixed.add(label_member)
    fixed.add(region_member)
    assert np.array_equal(fixed.probabilities().array, expected)
    with pytest.raises(ValueError, match="region-based member"):
        StreamingEnsemble(space=LABEL_SPACE).add(region_member)
    with pytest.raises(ValueError, match="fused_labels"):
        ensemble.argmax_labels()
    # label members only: label space and argmax, as before
    only_labels = StreamingEnsemble()
    only_labels.add(label_member)
    assert only_labels.fusion_space == LABEL_SPACE
    assert np.array_equal(only_labels.fused_labels(), argmax_labels(label_member))
    assert np.array_equal(fused_labels(label_member), argmax_labels(label_member))


def test_class_weights_in_region_space_follow_the_label_each_region_writes():
    label_member = hand_made_label_probabilities()
    region_array = np.full((3, 1, 1, 5), 0.5, dtype=np.float32)
    region_member = Probabilities(region_array, ("WT", "TC", "ET"), REGION_SPACE)
    label_factors = {SNFH: 3.0, NETC: 1.0, ET: 2.0, 0: 7.0}  # the background factor has no region
    ensemble = StreamingEnsemble(space=REGION_SPACE)
    ensemble.add(label_member, 1.0, label_factors)
    ensemble.add(region_member, 2.0, {ET: 0.5})
    converted = to_regions_reference(label_member.array)
    w_label = np.asarray([3.0, 1.0, 2.0]).reshape(3, 1, 1, 1)  # WT ← SNFH, TC ← NETC, ET ← ET
    w_region = np.asarray([2.0, 2.0, 1.0]).reshape(3, 1, 1, 1)
    expected = (w_label * converted + w_region * region_array) / (w_label + w_region)
    assert ensemble.total_weights() == (5.0, 3.0, 3.0)
    np.testing.assert_allclose(ensemble.probabilities().array, expected, atol=1e-6)
    # undecided space, region member first: the same
    region_first = StreamingEnsemble()
    region_first.add(region_member, 2.0, {ET: 0.5})
    region_first.add(label_member, 1.0, label_factors)
    np.testing.assert_allclose(region_first.probabilities().array, expected, atol=1e-6)
    # undecided space, this label member first: its per-region weights are lost in the label sum, so refused
    late = StreamingEnsemble()
    late.add(label_member, 1.0, label_factors)
    with pytest.raises(ValueError, match="space=fusion_space"):
        late.add(region_member, 2.0)


def test_undecided_space_switches_exactly_after_several_label_members():
    first = hand_made_label_probabilities()
    second = Probabilities(first.array[:, :, :, ::-1].copy(), first.labels)
    region_member = Probabilities(np.full((3, 1, 1, 5), 0.3, np.float32), ("WT", "TC", "ET"), REGION_SPACE)
    undecided, fixed = StreamingEnsemble(), StreamingEnsemble(space=fusion_space([object(), region_member]))
    for ensemble in (undecided, fixed):
        ensemble.add(first, 2.0)
        ensemble.add(second, 1.0, {0: 5.0, 4: 3.0})  # background/RC factors do not matter in region space
        ensemble.add(region_member, 1.0)
    assert fixed.space == REGION_SPACE and undecided.fusion_space == REGION_SPACE
    np.testing.assert_allclose(undecided.probabilities().array, fixed.probabilities().array, atol=1e-6)
    assert undecided.total_weights() == fixed.total_weights() == (4.0, 4.0, 4.0)
    assert fusion_space([object()]) == LABEL_SPACE


def test_probabilities_check_their_class_space():
    with pytest.raises(ValueError, match="not BraTS regions"):
        Probabilities(np.zeros((1, 1, 1, 1), np.float32), ("NETC",), REGION_SPACE)
    with pytest.raises(ValueError, match="unknown class space"):
        Probabilities(np.zeros((1, 1, 1, 1), np.float32), (1,), "softmax")


def test_regions_are_identified_by_name_else_by_nesting():
    dataset137 = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    assert region_channels(dataset137, "x") == ("WT", "TC", "ET")
    brats2023 = {"background": 0, "ET": 3, "TC": [1, 3], "WT": [1, 2, 3]}
    assert region_channels(brats2023, "x") == ("ET", "TC", "WT")
    unnamed = {"background": 0, "r1": [4], "r2": [1, 2, 4], "r3": [1, 4]}  # BraTS 2021 values, by nesting
    assert region_channels(unnamed, "x") == ("ET", "WT", "TC")
    with pytest.raises(ModelError, match="cannot tell"):
        region_channels({"background": 0, "a": [1, 2], "b": [2, 3]}, "x")


# -- the member on a real region-based model -----------------------------------------------------------------------

def test_region_member_reads_its_regions(trained_models):
    member = NnUNetMember(trained_models["R"].path)
    assert member.space == REGION_SPACE
    assert member.regions == ("WT", "TC", "ET")
    assert member.labels == (0, NETC, SNFH, ET)
    described = member.describe()
    assert described["space"] == "regions" and described["regions"] == ["WT", "TC", "ET"]
    summary = nnunet_model_set([trained_models["R"].path, trained_models["A"].path]).describe()
    assert len(summary["members"]) == 2
    dataset = json.loads((trained_models["R"].path / "dataset.json").read_text())
    assert dataset["regions_class_order"] == [1, 2, 3]


# -- (a), (b): parity with nnU-Net's own commands ------------------------------------------------------------------

@pytest.mark.slow
def test_single_region_model_equals_nnunet_predict(trained_models, phantom_cases, tmp_path):
    """Labels of R alone equal nnUNetv2_predict_from_modelfolder's. nnU-Net writes R's dataset values (1 ED, 2 NCR,
    3 ET); they are mapped to canonical values (SNFH, NETC, ET) before comparing, so like is compared with like."""
    model = trained_models["R"]
    case_dir = sorted(phantom_cases.iterdir())[0]
    nn_in = write_nnunet_input(case_dir, model.channel_order, tmp_path / "in")
    run_nnunet(["nnUNetv2_predict_from_modelfolder", "-i", str(nn_in), "-o", str(tmp_path / "out"),
                "-m", str(model.path), "-f", "0", "-device", "cpu", "--save_probabilities"], tmp_path)
    theirs_raw = read_labels(tmp_path / "out" / f"{case_dir.name}.nii.gz")
    assert set(np.unique(theirs_raw)) <= {0, 1, 2, 3}
    theirs = R_VALUES_TO_CANONICAL[theirs_raw]
    ours = our_labels(case_dir, [model.path])
    assert np.count_nonzero(theirs) > 0, "the model should find some tumour on a phantom"
    assert np.array_equal(ours, theirs), f"{np.mean(ours != theirs):.2%} of voxels differ"
    # and the member's probabilities are nnU-Net's exported sigmoid probabilities (0 outside the crop box)
    from BraTSEnsembleLib.case import read_case_folder

    exported = np.load(tmp_path / "out" / f"{case_dir.name}.npz")["probabilities"]
    probabilities = NnUNetMember(model.path).predict(read_case_folder(case_dir), torch.device("cpu"))
    assert probabilities.space == REGION_SPACE and probabilities.labels == ("WT", "TC", "ET")
    np.testing.assert_allclose(probabilities.array, exported, atol=1e-6)


@pytest.mark.slow
def test_label_and_region_ensemble_equals_the_documented_arithmetic_on_nnunet_probabilities(
        trained_models, phantom_cases, tmp_path):
    """A (label-based) + R (region-based): our labels equal the reference computed here from the probabilities that
    ``nnUNetv2_predict_from_modelfolder --save_probabilities`` exports for each model: A's softmax converted to
    regions (WT = NETC + SNFH + ET, TC = NETC + ET, ET), averaged with R's sigmoid in float32, thresholded at 0.5 in
    the order WT → SNFH, TC → NETC, ET → ET. A comes first, so the fusion switches from label to region space."""
    case_dir = sorted(phantom_cases.iterdir())[2]
    exported = {}
    for name in ("A", "R"):
        model = trained_models[name]
        nn_in = write_nnunet_input(case_dir, model.channel_order, tmp_path / f"in{name}")
        out = tmp_path / f"pred{name}"
        run_nnunet(["nnUNetv2_predict_from_modelfolder", "-i", str(nn_in), "-o", str(out), "-m", str(model.path),
                    "-f", "0", "-device", "cpu", "--save_probabilities"], tmp_path)
        exported[name] = np.load(out / f"{case_dir.name}.npz")["probabilities"]
    a_labels = json.loads((trained_models["A"].path / "dataset.json").read_text())["labels"]
    assert a_labels == {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}  # npz channels in this order
    reference_probabilities = (to_regions_reference(exported["A"]) + exported["R"]) / np.float32(2)
    reference = threshold_reference(reference_probabilities)
    ours = our_labels(case_dir, [trained_models["A"].path, trained_models["R"].path], folds=["0"])
    alone_a = exported["A"].argmax(0)
    alone_r = threshold_reference(exported["R"])
    assert not np.array_equal(reference, alone_r) and not np.array_equal(reference, alone_a), \
        "the ensemble should differ from each member alone for this test to bite"
    assert np.array_equal(ours, reference), f"{np.mean(ours != reference):.2%} of voxels differ"
