"""Model-set manifests (parsing, strict validation, relative paths), class-weighted fusion, and manifests run end to
end: through ``pipeline.segment_case`` (nnU-Net only, and nnU-Net mixed with MedNeXt) and ``brats-ensemble predict
--model-set`` as a subprocess."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BraTSEnsembleLib.case import read_case_folder
from BraTSEnsembleLib.ensemble import StreamingEnsemble, argmax_labels
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.labels import BACKGROUND, ET, NETC, RC, SNFH
from BraTSEnsembleLib.members.base import Probabilities
from BraTSEnsembleLib.members.mednext import MedNeXtMember, create_mednext
from BraTSEnsembleLib.members.nnunet import NnUNetMember
from BraTSEnsembleLib.modelset import ModelSet, load_model_set, nnunet_model_set
from BraTSEnsembleLib.pipeline import segment_case

from mednext_fixtures import TRAINER_S3, v1_plans, write_v1_model_folder

ROOT = Path(__file__).resolve().parents[1]
NNUNET_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
UMAMBA_FOLDER = "nnUNetTrainerUMambaBot__nnUNetPlans__3d_fullres"


# ------------------------------------------------------------------------------------------------ fixtures

def fake_nnunet_folder(root: Path, name: str = NNUNET_FOLDER, folds: tuple[str, ...] = ("all",)) -> Path:
    """An nnU-Net v2 results folder as far as a member's constructor looks (no real weights: never predicted)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"},
        "labels": {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}, "file_ending": ".nii.gz"}))
    (folder / "plans.json").write_text("{}")
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        (folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
        (folder / f"fold_{fold}" / "checkpoint_best.pth").write_bytes(b"")
    return folder


@pytest.fixture()
def model_tree(tmp_path: Path) -> Path:
    """tmp/models/{nnU-Net, U-Mamba, MedNeXt folders}; manifests are written to tmp/sets/."""
    models = tmp_path / "models"
    fake_nnunet_folder(models / "Dataset601_BraTS")
    fake_nnunet_folder(models / "Dataset602_BraTS", UMAMBA_FOLDER, folds=("0", "1"))
    write_v1_model_folder(models / "mednext", {0: {"x": torch.zeros(1)}}, v1_plans())  # never predicted
    (tmp_path / "sets").mkdir()
    return tmp_path


def good_manifest() -> dict:
    return {
        "name": "test-set", "description": "three frameworks", "postprocess": "ratio-adaptive",
        "members": [
            {"name": "resenc-m", "framework": "nnunetv2", "path": f"../models/Dataset601_BraTS/{NNUNET_FOLDER}",
             "folds": ["all"], "checkpoint": "final", "mirroring": False, "tile_step": 0.5, "weight": 1.0,
             "class_weights": {"background": 1.0, "NETC": 1.0, "SNFH": 1.0, "ET": 1.2}},
            {"name": "mednext-s", "framework": "mednext", "path": f"../models/mednext/{TRAINER_S3}__"
             "nnUNetPlansv2.1_trgSp_1x1x1", "class_labels": {"1": 2, "2": 1, "3": 3}, "weight": 0.5},
            {"framework": "umamba", "path": f"../models/Dataset602_BraTS/{UMAMBA_FOLDER}", "checkpoint": "best",
             "tile_step": 0.7},
        ],
    }


def write_manifest(folder: Path, data: dict, name: str = "set.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data, indent=1))
    return path


# ------------------------------------------------------------------------------------------------ parsing

def test_manifest_parsing_builds_every_member_with_its_options(model_tree: Path) -> None:
    path = write_manifest(model_tree / "sets", good_manifest())
    model_set = load_model_set(path)
    nn, mednext, umamba = model_set.members
    assert isinstance(nn, NnUNetMember) and isinstance(umamba, NnUNetMember)
    assert isinstance(mednext, MedNeXtMember)
    assert nn.name == "resenc-m" and nn.folds == ["all"] and nn.checkpoint_name == "checkpoint_final.pth"
    assert nn.use_mirroring is False and nn.tile_step_size == 0.5
    assert umamba.name == UMAMBA_FOLDER and umamba.folds == ["0", "1"]  # default name; folds auto-detected
    assert umamba.checkpoint_name == "checkpoint_best.pth" and umamba.use_mirroring is True
    assert umamba.tile_step_size == 0.7
    assert mednext.checkpoint == "model_final_checkpoint" and mednext.folds == ["0"]
    assert mednext.labels == (BACKGROUND, SNFH, NETC, ET)  # channel 0 → background added
    assert mednext.roles == ("t1n", "t1c", "t2w", "t2f")
    assert model_set.weights == [1.0, 0.5, 1.0]
    assert model_set.class_weights == [{BACKGROUND: 1.0, NETC: 1.0, SNFH: 1.0, ET: 1.2}, {}, {}]
    assert [str(s) for s in model_set.postprocess] == ["ratio-adaptive"]
    assert model_set.name == "test-set" and model_set.roles == ("t1n", "t1c", "t2w", "t2f")


def test_describe_records_the_set_members_weights_class_weights_and_postprocessing(model_tree: Path) -> None:
    data = good_manifest()
    data["members"][0]["url"] = "https://example.org/resenc-m.zip"  # path exists: no download, url recorded
    data["members"][0]["sha256"] = "ab" * 32
    path = write_manifest(model_tree / "sets", data)
    described = load_model_set(path).describe()
    json.dumps(described)  # JSON-serialisable as written with every output
    assert described["model_set"] == {"name": "test-set", "description": "three frameworks",
                                      "manifest": str(path.resolve()),
                                      "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert described["fusion"] == "class-weighted-mean"
    assert described["postprocess"] == ["ratio-adaptive"]
    first, second, third = described["members"]
    assert first["name"] == "resenc-m" and first["framework"] == "nnunetv2" and first["weight"] == 1.0
    assert first["class_weights"] == {"background": 1.0, "NETC": 1.0, "SNFH": 1.0, "ET": 1.2}
    assert first["url"] == "https://example.org/resenc-m.zip" and first["sha256"] == "ab" * 32
    assert first["folds"] == ["all"] and first["mirroring"] is False
    assert second["framework"] == "mednext" and second["weight"] == 0.5 and second["labels"] == [0, 2, 1, 3]
    assert second["class_weights"] == {"background": 1.0, "NETC": 1.0, "SNFH": 1.0, "ET": 1.0}
    assert third["framework"] == "umamba" and third["path"].endswith(UMAMBA_FOLDER)
    assert third["checkpoint"] == "checkpoint_best.pth" and third["tile_step_size"] == 0.7


def test_defaults_name_postprocess_and_list_postprocess(model_tree: Path) -> None:
    data = {"members": [{"framework": "nnunetv2", "path": f"../models/Dataset601_BraTS/{NNUNET_FOLDER}"}]}
    model_set = load_model_set(write_manifest(model_tree / "sets", data, "goat.json"))
    assert model_set.name == "goat" and [str(s) for s in model_set.postprocess] == ["ratio-adaptive"]
    assert model_set.weights == [1.0] and model_set.describe()["fusion"] == "weighted-mean"
    data["postprocess"] = ["min-size:20", "et-to-netc"]
    model_set = load_model_set(write_manifest(model_tree / "sets", data, "goat.json"))
    assert [str(s) for s in model_set.postprocess] == ["min-size:20", "et-to-netc:500"]
    data["postprocess"] = "none"
    assert load_model_set(write_manifest(model_tree / "sets", data, "goat.json")).postprocess == []


def test_relative_paths_are_relative_to_the_manifest_folder_not_the_working_directory(
        model_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nested = model_tree / "sets" / "deeper"
    nested.mkdir()
    data = {"members": [
        {"name": "rel", "framework": "nnunetv2", "path": f"../../models/Dataset601_BraTS/{NNUNET_FOLDER}"},
        {"name": "abs", "framework": "nnunetv2",
         "path": str(model_tree / "models" / "Dataset601_BraTS" / NNUNET_FOLDER)}]}
    path = write_manifest(nested, data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model_set = load_model_set(os.path.relpath(path, elsewhere))  # the manifest itself given relative to the cwd
    expected = (model_tree / "models" / "Dataset601_BraTS" / NNUNET_FOLDER).resolve()
    assert [m.model_dir for m in model_set.members] == [expected, expected]
    assert model_set.manifest == path.resolve()
    # the same path relative to the working directory is not looked up
    data["members"][0]["path"] = f"models/Dataset601_BraTS/{NNUNET_FOLDER}"
    monkeypatch.chdir(model_tree)
    with pytest.raises(ModelError, match="relative to the manifest's folder"):
        load_model_set(write_manifest(nested, data))


# ------------------------------------------------------------------------------------------------ validation

def _set(data: dict, member: int | None, key: str, value) -> dict:
    target = data if member is None else data["members"][member]
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return data


_DELETE = object()

# (id, member index or None for the top level, key, value, member name in the message or None, words of the fix)
INVALID = [
    ("unknown-top-key", None, "ensemble_space", "labels", None, "Remove them"),
    ("unknown-member-key", 0, "fold", [0], "'resenc-m'", "Remove them"),
    ("mednext-key-on-nnunet", 0, "class_labels", {"1": 1}, "'resenc-m'", "apply to mednext members only"),
    ("unknown-framework", 0, "framework", "nnunetv1", "'resenc-m'", "Use one of nnunetv2, umamba, mednext"),
    ("missing-framework", 1, "framework", _DELETE, "'mednext-s'", "Add \"framework\""),
    ("missing-path", 0, "path", _DELETE, "'resenc-m'", "Add \"path\""),
    ("path-not-found", 1, "path", "../models/nowhere", "'mednext-s'", "Fix the path"),
    ("zero-weight", 0, "weight", 0, "'resenc-m'", "give a number between 0.001 and 1000"),
    ("negative-weight", 1, "weight", -1.0, "'mednext-s'", "give a number between 0.001 and 1000"),
    ("string-weight", 0, "weight", "2", "'resenc-m'", "give a number between 0.001 and 1000"),
    ("bool-weight", 0, "weight", True, "'resenc-m'", "give a number between 0.001 and 1000"),
    ("unknown-class", 0, "class_weights", {"ET": 1.0, "EDEMA": 2.0}, "'resenc-m'", "Use one of background, NETC"),
    ("zero-class-weight", 0, "class_weights", {"ET": 0.0}, "'resenc-m'", "numbers between 0.001 and 1000"),
    ("class-weights-list", 0, "class_weights", [1.0, 2.0], "'resenc-m'", "\"class_weights\": {"),
    ("bad-fold", 0, "folds", ["zero"], "'resenc-m'", "list of fold numbers"),
    ("folds-not-list", 0, "folds", "all", "'resenc-m'", "list of fold numbers"),
    ("mirroring-not-bool", 0, "mirroring", "no", "'resenc-m'", "\"mirroring\": false"),
    ("tile-step-zero", 0, "tile_step", 0, "'resenc-m'", "between 0.1 and 1"),
    ("tile-step-above-one", 0, "tile_step", 1.5, "'resenc-m'", "between 0.1 and 1"),
    ("url-without-sha256", 0, "url", "https://example.org/m.zip", "'resenc-m'", "sha256sum"),
    ("bad-sha256", 0, "sha256", "1234", "'resenc-m'", "sha256sum"),
    ("bad-class-label", 1, "class_labels", {"1": 7}, "'mednext-s'", "Map the model's output channels"),
    ("bad-postprocess", None, "postprocess", "biggest-blob", None, "unknown postprocessing rule"),
    ("empty-members", None, "members", [], None, "List the models"),
    ("member-not-object", None, "members", ["model.json"], "member 1", "Write each member as"),
    ("empty-name", 0, "name", "", "member 1", "short name"),
]


@pytest.mark.parametrize("case_id, member, key, value, member_name, fix", INVALID, ids=[c[0] for c in INVALID])
def test_every_validation_error_names_the_manifest_the_member_and_the_fix(
        model_tree: Path, case_id, member, key, value, member_name, fix) -> None:
    path = write_manifest(model_tree / "sets", _set(good_manifest(), member, key, value))
    with pytest.raises(ModelError) as raised:
        load_model_set(path)
    message = str(raised.value)
    assert message.startswith(f"{path.resolve()}: "), message
    if member_name:
        assert member_name in message, message
    assert fix in message, message


def test_duplicate_member_names_are_refused(model_tree: Path) -> None:
    data = good_manifest()
    data["members"][1]["name"] = "resenc-m"
    with pytest.raises(ModelError, match=r"member 2 \('resenc-m'\): name 'resenc-m' is used by member 1 too"):
        load_model_set(write_manifest(model_tree / "sets", data))


def test_member_errors_from_the_framework_name_the_manifest_and_member(model_tree: Path) -> None:
    data = good_manifest()
    (model_tree / "models" / "Dataset601_BraTS" / NNUNET_FOLDER / "dataset.json").unlink()
    path = write_manifest(model_tree / "sets", data)
    with pytest.raises(ModelError, match=r"set\.json: member 1 \('resenc-m'\): .*no dataset\.json"):
        load_model_set(path)
    data["members"][0]["folds"] = [3]
    fake_nnunet_folder(model_tree / "models" / "other")
    data["members"][0]["path"] = f"../models/other/{NNUNET_FOLDER}"
    with pytest.raises(ModelError, match=r"member 1 \('resenc-m'\): .*fold_3.*not found"):
        load_model_set(write_manifest(model_tree / "sets", data))


@pytest.mark.parametrize("content, words", [
    (None, "model-set manifest not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_unreadable_manifests(tmp_path: Path, content, words) -> None:
    path = tmp_path / "set.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ModelError, match=words) as raised:
        load_model_set(path)
    assert str(raised.value).startswith(str(path))


def test_model_set_in_code_checks_class_weights() -> None:
    with pytest.raises(ModelError, match="not a BraTS label"):
        ModelSet([_StubMember()], [1.0], class_weights=[{7: 1.0}])
    with pytest.raises(ModelError, match="between 0.001 and 1000"):
        ModelSet([_StubMember()], [1.0], class_weights=[{ET: -1.0}])
    with pytest.raises(ModelError, match="between 0.001 and 1000"):
        ModelSet([_StubMember()], [0.0])


class _StubMember:
    name = "stub"
    roles = ("t1c",)
    labels = (0, 1, 2, 3)

    def describe(self) -> dict:
        return {"framework": "stub"}


# ------------------------------------------------------------------------------------------------ fusion

def random_probabilities(seed: int, labels=(0, 1, 2, 3), shape=(5, 6, 7)) -> Probabilities:
    logits = np.random.default_rng(seed).normal(size=(len(labels), *shape)).astype(np.float32)
    e = np.exp(logits)
    return Probabilities((e / e.sum(0)).astype(np.float32), tuple(labels))


def test_class_weighted_fusion_equals_the_direct_numpy_formula() -> None:
    a = random_probabilities(1)
    b_plain = random_probabilities(2)
    order = [0, 3, 1, 2]  # b in another channel order
    b = Probabilities(b_plain.array[order].copy(), tuple(b_plain.labels[i] for i in order))
    c = random_probabilities(3, labels=(0, 1, 2, 3, 4))  # the only member with RC
    specs = [(a, 2.0, {ET: 1.5, NETC: 0.5}), (b, 1.0, {SNFH: 3.0}), (c, 0.5, {})]
    ensemble = StreamingEnsemble()
    for probabilities, weight, factors in specs:
        ensemble.add(probabilities, weight, factors)

    labels = (0, 1, 2, 3, 4)
    numerator = np.zeros((5, 5, 6, 7), np.float64)
    denominator = np.zeros(5, np.float64)
    for probabilities, weight, factors in specs:
        for index, label in enumerate(labels):
            w = weight * factors.get(label, 1.0)
            channel = probabilities.channel(label)
            if channel is not None:
                numerator[index] += w * channel.astype(np.float64)
            denominator[index] += w  # a member without the class contributes 0 with its weight
    expected = numerator / denominator[:, None, None, None]
    fused = ensemble.probabilities()
    assert fused.labels == labels and fused.array.dtype == np.float32
    np.testing.assert_allclose(fused.array, expected, rtol=2e-6, atol=1e-7)
    assert ensemble.total_weights() == tuple(denominator)
    assert np.array_equal(ensemble.argmax_labels(), np.asarray(labels, np.uint8)[expected.argmax(0)])
    # ET counts 1.5× for member a: the fused ET differs from the plain weighted mean
    plain = StreamingEnsemble()
    for probabilities, weight, _ in specs:
        plain.add(probabilities, weight)
    assert not np.allclose(plain.probabilities().channel(ET), fused.channel(ET))
    np.testing.assert_allclose(plain.probabilities().channel(RC), fused.channel(RC), rtol=1e-6)


def test_member_weight_carries_class_weights_into_the_ensemble() -> None:
    """``segment_case`` hands ``model_set.weights[i]`` to ``add``: the class factors must travel with it."""
    a, b = random_probabilities(4), random_probabilities(5)
    model_set = ModelSet([_StubMember(), _StubMember()], [1.0, 2.0], class_weights=[{ET: 4.0}, None])
    via_weights = StreamingEnsemble()  # what pipeline.segment_case does with a model set
    for probabilities, weight, factors in zip((a, b), model_set.weights, model_set.class_weights):
        via_weights.add(probabilities, weight, factors)
    explicit = StreamingEnsemble()
    explicit.add(a, 1.0, {ET: 4.0})
    explicit.add(b, 2.0)
    assert np.array_equal(via_weights.probabilities().array, explicit.probabilities().array)
    assert model_set.weights == [1.0, 2.0]
    with pytest.raises(ValueError, match="class weights must be positive"):
        explicit.add(a, 1.0, {ET: 0.0})


def test_equal_class_weights_reduce_to_the_nnunet_arithmetic_bit_for_bit() -> None:
    members = [random_probabilities(s) for s in range(3)]
    expected = members[0].array.copy()  # nnUNetv2_ensemble: float32 running sum, then /= n
    for member in members[1:]:
        expected += member.array
    expected /= 3
    for factors in ({}, {BACKGROUND: 1.0, NETC: 1.0, SNFH: 1.0, ET: 1.0}, {RC: 1.0}):
        ensemble = StreamingEnsemble()
        for member in members:
            ensemble.add(member, 1.0, factors)
        assert np.array_equal(ensemble.probabilities().array, expected)
    # the same factor for every class of every member is a common scale: the mean is unchanged
    scaled = StreamingEnsemble()
    for member in members:
        scaled.add(member, 0.5, {label: 2.0 for label in range(5)})
    assert np.array_equal(scaled.probabilities().array, expected)


def test_streaming_keeps_only_the_running_sum() -> None:
    ensemble = StreamingEnsemble()
    for seed in range(4):
        ensemble.add(random_probabilities(seed), 1.0 + seed, {ET: 2.0})
    arrays = [v for v in vars(ensemble).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and arrays[0].shape == (4, 5, 6, 7)
    assert ensemble.members == 4


# ------------------------------------------------------------------------------------------------ end to end

def _nnunet_member(model, **extra) -> dict:
    return {"name": model.name, "framework": "nnunetv2", "path": str(model.path), "folds": ["0"],
            "mirroring": False, **extra}


@pytest.mark.slow
def test_manifest_of_two_nnunet_members_equals_the_command_line_model_set(trained_models, phantom_cases,
                                                                         tmp_path: Path) -> None:
    a, b = trained_models["A"], trained_models["B"]
    # paths relative to the manifest's folder, as a shipped model set would have them
    manifest_dir = tmp_path / "set"
    manifest_dir.mkdir()
    members = [_nnunet_member(a, weight=2.0), _nnunet_member(b, weight=1.0,
                                                             class_weights={"ET": 1.0, "SNFH": 1.0})]
    for member in members:
        member["path"] = os.path.relpath(member["path"], manifest_dir)
    path = write_manifest(manifest_dir, {"name": "ab", "postprocess": "none", "members": members})
    from_manifest = load_model_set(path)
    from_options = nnunet_model_set([a.path, b.path], weights=[2.0, 1.0], folds=["0"], use_mirroring=False,
                                    postprocess="none")
    case = read_case_folder(sorted(phantom_cases.iterdir())[0])
    ours = segment_case(case, from_manifest, "cpu")
    theirs = segment_case(case, from_options, "cpu")
    assert np.count_nonzero(theirs.labels) > 0
    assert np.array_equal(ours.labels, theirs.labels), f"{np.mean(ours.labels != theirs.labels):.2%} differ"
    assert ours.statistics == theirs.statistics
    assert [m["weight"] for m in ours.provenance["members"]] == [2.0, 1.0]
    assert [m["name"] for m in ours.provenance["members"]] == ["A", "B"]
    assert ours.provenance["model_set"]["name"] == "ab" and ours.provenance["postprocess"] == []


def mednext_state(seed: int, size: str = "S", class2_bias: float = 1.5) -> dict[str, torch.Tensor]:
    """Small random MedNeXt k3 weights whose output bias favours model class 2 (so it finds something)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_mednext(size, 3, 4, 4).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=generator) * 0.02 + (1.0 if k.endswith("norm.weight") else 0.0)
             for k, s in shapes.items()}
    state["out_0.conv_out.bias"] = torch.tensor([0.0, 0.0, class2_bias, 0.0])
    return state


@pytest.mark.slow
def test_manifest_mixing_mednext_and_nnunet_on_a_phantom_case(trained_models, phantom_cases, tmp_path: Path) -> None:
    mednext_dir = write_v1_model_folder(tmp_path / "models", {0: mednext_state(21)}, v1_plans(patch_size=(32, 32, 32)))
    data = {"name": "mixed", "postprocess": "none", "members": [
        _nnunet_member(trained_models["A"], weight=1.0, class_weights={"ET": 2.0, "background": 0.5}),
        {"name": "mednext", "framework": "mednext", "path": os.path.relpath(mednext_dir, tmp_path),
         "mirroring": False, "class_labels": {"1": "SNFH", "2": "NETC", "3": "ET"}, "weight": 0.5,
         "class_weights": {"NETC": 3.0}}]}
    model_set = load_model_set(write_manifest(tmp_path, data))
    case = read_case_folder(sorted(phantom_cases.iterdir())[1])
    result = segment_case(case, model_set, "cpu")

    nn_probabilities = model_set.members[0].predict(case, torch.device("cpu"))
    mednext_probabilities = model_set.members[1].predict(case, torch.device("cpu"))
    assert mednext_probabilities.labels == (BACKGROUND, SNFH, NETC, ET)
    labels = (0, 1, 2, 3)
    weights = {"nn": {0: 0.5, 1: 1.0, 2: 1.0, 3: 2.0}, "mx": {0: 0.5, 1: 1.5, 2: 0.5, 3: 0.5}}
    fused = np.stack([
        (weights["nn"][c] * nn_probabilities.channel(c).astype(np.float64)
         + weights["mx"][c] * mednext_probabilities.channel(c).astype(np.float64))
        / (weights["nn"][c] + weights["mx"][c]) for c in labels])
    expected = argmax_labels(Probabilities(fused.astype(np.float32), labels))
    agree = np.mean(result.labels == expected)
    assert agree > 0.9999, f"{1 - agree:.4%} of voxels differ from the direct computation"
    assert np.count_nonzero(result.labels) > 0
    plain = StreamingEnsemble()  # the same members without class weights give other labels: the factors bite
    plain.add(nn_probabilities, 1.0)
    plain.add(mednext_probabilities, 0.5)
    assert not np.array_equal(result.labels, plain.argmax_labels())
    members = result.provenance["members"]
    assert [m["framework"] for m in members] == ["nnunetv2", "mednext"]
    assert members[1]["weight"] == 0.5 and members[1]["class_weights"]["NETC"] == 3.0
    assert members[0]["class_weights"] == {"background": 0.5, "NETC": 1.0, "SNFH": 1.0, "ET": 2.0}
    assert result.provenance["fusion"] == "class-weighted-mean"


def brats_ensemble(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_cli_predict_with_model_set_writes_outputs_and_records_the_members(trained_models, phantom_cases,
                                                                          tmp_path: Path) -> None:
    case_dir = sorted(phantom_cases.iterdir())[2]
    data = {"name": "cli-set", "description": "one model from a manifest", "postprocess": ["min-size:20"],
            "members": [_nnunet_member(trained_models["B"], weight=1.5, class_weights={"ET": 1.2})]}
    manifest = write_manifest(tmp_path, data)
    out = tmp_path / "out"
    done = brats_ensemble("predict", str(case_dir), "-o", str(out), "--model-set", str(manifest), "--device", "cpu",
                          "--progress", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["event"] == "case-start" and events[-1]["event"] == "finished"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_dir.name}.nii.gz")))
    summary = json.loads((out / f"{case_dir.name}.json").read_text())
    assert summary["regions"]["WT"]["voxels"] == int(np.count_nonzero(labels))
    assert summary["model_set"]["name"] == "cli-set" and summary["model_set"]["manifest"] == str(manifest.resolve())
    assert summary["postprocess"] == ["min-size:20"]
    (member,) = summary["members"]
    assert member["name"] == "B" and member["weight"] == 1.5 and member["folds"] == ["0"]
    assert member["mirroring"] is False and member["class_weights"]["ET"] == 1.2
    assert member["channels"] == ["t2f", "t1c", "t1n", "t2w"]


def test_cli_model_set_refuses_options_the_manifest_sets_and_manifests_given_as_model(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, {"members": []})
    both = brats_ensemble("predict", str(tmp_path), "-o", str(tmp_path / "o"), "--model-set", str(manifest),
                          "--model", str(tmp_path))
    assert both.returncode == 2 and "not allowed with" in both.stderr
    neither = brats_ensemble("predict", str(tmp_path), "-o", str(tmp_path / "o"))
    assert neither.returncode == 2 and "--model-set" in neither.stderr
    extra = brats_ensemble("predict", str(tmp_path), "-o", str(tmp_path / "o"), "--model-set", str(manifest),
                           "--weight", "2", "--no-mirroring")
    assert extra.returncode == 1
    assert "--weight, --no-mirroring cannot be combined with --model-set" in extra.stderr
    as_model = brats_ensemble("predict", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(manifest))
    assert as_model.returncode == 1 and "--model-set FILE" in as_model.stderr
    invalid = brats_ensemble("predict", str(tmp_path), "-o", str(tmp_path / "o"), "--model-set", str(manifest))
    assert invalid.returncode == 1 and f"error: {manifest}" in invalid.stderr and "List the models" in invalid.stderr
