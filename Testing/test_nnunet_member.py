"""The nnU-Net member: folder checks, fold discovery, safe checkpoint loading, and the real BraTS case end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from BraTSEnsembleLib.case import read_case_folder
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.members.nnunet import NnUNetMember, available_folds
from BraTSEnsembleLib.modelset import nnunet_model_set
from BraTSEnsembleLib.pipeline import segment_case, write_result


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.png", "*.txt", "checkpoint_best.pth"))
    return target


def test_member_reads_roles_labels_and_folds(trained_models):
    a = NnUNetMember(trained_models["A"].path)
    assert a.folds == ["0", "1"]
    assert a.roles == ("t1n", "t1c", "t2w", "t2f")
    assert a.labels == (0, 1, 2, 3)
    b = NnUNetMember(trained_models["B"].path, folds=[0], checkpoint="best")
    assert b.roles == ("t2f", "t1c", "t1n", "t2w")
    assert b.describe()["checkpoint"] == "checkpoint_best.pth"


def test_only_folds_with_a_checkpoint_are_used(trained_models, tmp_path):
    """(Folders without plans.json, dataset.json or checkpoints, and a fold asked for that is not there: rows of
    test_bad_input_matrix.py.)"""
    model = copy_model(trained_models["A"].path, tmp_path / "model")
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    assert NnUNetMember(model).folds == ["1"]


def test_fold_all_is_used_when_no_numbered_fold_exists(trained_models, tmp_path):
    model = copy_model(trained_models["B"].path, tmp_path / "model")
    (model / "fold_0").rename(model / "fold_all")
    assert available_folds(model, "checkpoint_final.pth") == ["all"]


def test_checkpoint_needing_arbitrary_code_is_refused_unless_trusted(trained_models, phantom_cases, tmp_path):
    model = copy_model(trained_models["B"].path, tmp_path / "model")
    path = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["extra"] = Path("/tmp")  # a pickled class that weights-only loading does not allow
    torch.save(checkpoint, path)
    case = read_case_folder(sorted(phantom_cases.iterdir())[0])
    with pytest.raises(ModelError, match=rf"refused to load.*--trust-checkpoint {path}"):
        NnUNetMember(model, use_mirroring=False).predict(case, torch.device("cpu"))
    trusted = nnunet_model_set([model], use_mirroring=False, trusted_checkpoints=[path])
    assert trusted.members[0].predict(case, torch.device("cpu")).array.shape[0] == 4


@pytest.mark.parametrize("labels, order, message", [
    # region names unknown and the label sets not nested: which region is WT, TC, ET cannot be told
    ({"background": 0, "r1": [1, 2], "r2": [2, 3], "r3": 3}, [1, 2, 3], "cannot tell which of the regions"),
    # named regions that are not nested as WT ⊃ TC ⊃ ET
    ({"background": 0, "whole tumor": [1, 2], "tumor core": [2, 3], "enhancing tumor": 3}, [1, 2, 3],
     "not nested"),
    # region-based without regions_class_order (nnU-Net itself cannot run it)
    ({"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}, None,
     "regions_class_order"),
])
def test_region_models_that_cannot_be_mapped_are_refused_clearly(trained_models, tmp_path, labels, order, message):
    model = copy_model(trained_models["B"].path, tmp_path / "model")
    dataset = json.loads((model / "dataset.json").read_text())
    dataset["labels"] = labels
    if order is not None:
        dataset["regions_class_order"] = order
    (model / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ModelError, match=message):
        NnUNetMember(model)


@pytest.mark.slow
def test_real_brats_case_end_to_end(trained_models, real_case, tmp_path):
    """The real BraTS 2023 case (240×240×155, int16) through the whole pipeline. The phantom-trained model is no
    glioma model, so only the plumbing is judged: geometry, label values, statistics that match the label map."""
    import SimpleITK as sitk

    case = read_case_folder(real_case)
    model_set = nnunet_model_set([trained_models["A"].path], folds=["0"], use_mirroring=False,
                                 postprocess="ratio-adaptive")
    events = []
    result = segment_case(case, model_set, "cpu", progress=events.append)
    paths = write_result(result, tmp_path)
    written = sitk.ReadImage(str(paths["labels"]))
    t1c = sitk.ReadImage(str(real_case / "BraTS-GLI-00001-000-t1c.nii.gz"))
    assert written.GetSize() == (240, 240, 155)
    assert np.allclose(written.GetDirection(), t1c.GetDirection()) and np.allclose(written.GetOrigin(),
                                                                                     t1c.GetOrigin())
    labels = sitk.GetArrayFromImage(written)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    summary = json.loads(paths["statistics"].read_text())
    assert summary["regions"]["WT"]["voxels"] == int(np.count_nonzero(labels))
    assert summary["inputs"]["t1c"].endswith("BraTS-GLI-00001-000-t1c.nii.gz")
    nonzero = np.any([case.array(role) != 0 for role in case.roles], axis=0)
    box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(nonzero))
    outside = np.ones_like(labels, dtype=bool)
    outside[box] = False
    assert not labels[outside].any(), "outside nnU-Net's crop box (the head's bounding box) all is background"
    assert [e.event for e in events][:2] == ["case-start", "member-start"]


def test_umamba_results_folder_runs_as_an_nnunet_member(trained_models, phantom_cases, tmp_path):
    """A U-Mamba (UMambaBot) results folder is an nnU-Net v2 folder whose trainer nnU-Net cannot build: the member
    builds the network by trainer name, loads its checkpoint strictly and runs nnU-Net's predictor with it."""
    from BraTSEnsembleLib.members.umamba import build_umamba_network

    model = copy_model(trained_models["B"].path, tmp_path / "nnUNetTrainerUMambaBot__nnUNetPlans__3d_fullres")
    shutil.rmtree(model / "fold_0")
    plans = json.loads((model / "plans.json").read_text())
    torch.manual_seed(0)
    network = build_umamba_network("nnUNetTrainerUMambaBot", plans, "3d_fullres", 4, 4)
    (model / "fold_0").mkdir()
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainerUMambaBot",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": json.loads((model / "dataset.json").read_text())},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, model / "fold_0" / "checkpoint_final.pth")
    case = read_case_folder(sorted(phantom_cases.iterdir())[0])
    probabilities = NnUNetMember(model, use_mirroring=False).predict(case, torch.device("cpu"))
    assert probabilities.grid_shape == case.shape_zyx
    assert np.allclose(probabilities.array.sum(0), 1.0, atol=1e-4)
