"""Role names, model channel mapping from dataset.json, and class-name → BraTS label mapping."""
from __future__ import annotations

import numpy as np
import pytest

from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.labels import (ET, NETC, RC, SNFH, brats2021_to_canonical, class_mapping_from_dataset_labels,
                                     region_mask)
from BraTSEnsembleLib.roles import assign_roles, channel_role, model_channel_roles, role_from_text


@pytest.mark.parametrize("name, role", [
    ("T1", "t1n"), ("t1n", "t1n"), ("T1w", "t1n"), ("T1 native", "t1n"), ("MPRAGE", "t1n"),
    ("T1Gd", "t1c"), ("t1c", "t1c"), ("T1CE", "t1c"), ("t1gd", "t1c"), ("AX T1 POST GAD", "t1c"),
    ("T1 +C", "t1c"), ("MPRAGE post", "t1c"),
    ("T2", "t2w"), ("t2w", "t2w"), ("T2 TSE", "t2w"),
    ("FLAIR", "t2f"), ("t2f", "t2f"), ("T2-FLAIR", "t2f"), ("AX T2 FLAIR FS", "t2f"),
    ("BraTS-GLI-00001-000-t1c", "t1c"), ("BraTS-GLI-00001-000-t2f", "t2f"), ("BraTS20_001_t1ce", "t1c"),
])
def test_role_from_text(name, role):
    assert role_from_text(name) == role


def test_unknown_names_give_no_role_or_a_generic_channel():
    assert role_from_text("DWI b1000") is None
    assert channel_role("CT") == "ct"


@pytest.mark.parametrize("channel_names, roles", [
    ({"0": "T1", "1": "T1Gd", "2": "T2", "3": "FLAIR"}, ("t1n", "t1c", "t2w", "t2f")),  # nnU-Net Dataset137
    ({"0": "t1c", "1": "t1n", "2": "t2f", "3": "t2w"}, ("t1c", "t1n", "t2f", "t2w")),  # GoAT 2025 order
    ({"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, ("t2f", "t1n", "t1c", "t2w")),  # MSD Task01 style
])
def test_model_channel_roles_follow_dataset_json(channel_names, roles):
    assert model_channel_roles(channel_names, "dataset.json") == roles


def test_model_channel_roles_errors_list_what_was_found():
    with pytest.raises(ModelError, match=r"two input channels map to the same modality role \(0:'T1'→t1n, 1:'T1w'→t1n"):
        model_channel_roles({"0": "T1", "1": "T1w"}, "x/dataset.json")
    with pytest.raises(ModelError, match="numbered 0..1"):
        model_channel_roles({"0": "T1", "2": "T2"}, "x/dataset.json")


def test_assign_roles_skips_ambiguous_names():
    names = ["BraTS-1-t1n", "BraTS-1-t1c", "T2 FLAIR", "T2 TSE", "T2 FLAIR repeat", "localizer"]
    assert assign_roles(names) == {"t1n": "BraTS-1-t1n", "t1c": "BraTS-1-t1c", "t2w": "T2 TSE"}


def test_class_mapping_by_name_and_fallback_by_value():
    assert class_mapping_from_dataset_labels({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}) == {0: 0, 1: 1, 2: 2,
                                                                                                    3: 3}
    # nnU-Net's label-based BraTS 2021 remapping (1 edema, 2 necrosis, 3 enhancing) by name
    assert class_mapping_from_dataset_labels(
        {"background": 0, "edema": 1, "non-enhancing and necrosis": 2, "enhancing tumor": 3}) == {0: 0, 1: SNFH,
                                                                                                 2: NETC, 3: ET}
    assert class_mapping_from_dataset_labels({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4})[4] == RC
    # unknown names: the values are taken as BraTS 2023 labels
    assert class_mapping_from_dataset_labels({"background": 0, "1": 1, "2": 2, "3": 3}) == {0: 0, 1: 1, 2: 2, 3: 3}
    with pytest.raises(ValueError, match="more than one class"):
        class_mapping_from_dataset_labels({"background": 0, "edema": 1, "oedema": 2})


def test_regions_and_brats2021_conversion():
    labels = brats2021_to_canonical(np.array([0, 1, 2, 4], np.uint8))
    assert labels.tolist() == [0, NETC, SNFH, ET]
    assert region_mask(labels, "TC").tolist() == [False, True, False, True]
    assert region_mask(labels, "WT").tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match=r"\[3\]"):
        brats2021_to_canonical(np.array([3], np.uint8))
