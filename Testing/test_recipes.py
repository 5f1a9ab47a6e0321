"""Recipes (the published BraTS pipelines): each rule a recipe names, on a small case where the published rule and
the obvious alternative disagree, and each recipe end to end on small members of the right frameworks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BraTSEnsembleLib.case import read_case_folder
from BraTSEnsembleLib.ensemble import argmax_labels, fused_labels, region_labels, sequential_threshold_labels
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.labels import ET, NETC, RC, SNFH
from BraTSEnsembleLib.members.base import NESTED_REGIONS, REGION_SPACE, Probabilities
from BraTSEnsembleLib.members.umamba import build_umamba_network
from BraTSEnsembleLib.modelset import load_model_set, nnunet_model_set
from BraTSEnsembleLib.pipeline import segment_case
from BraTSEnsembleLib.postprocess import apply_steps, parse_steps
from BraTSEnsembleLib.recipes import (Overrides, fill_recipe, load_recipe, recipe_model_set, recipe_names,
                                      recipe_roles)

from mednext_fixtures import v1_plans, write_v1_model_folder
from test_modelset import mednext_state
from test_umamba import BOT, plans_v211, write_results_folder

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("brats2020-nnunet", "goat2024", "goat2025", "nnunet-default", "ped2023-swinunetr", "sparkans2025")


def recipe_steps(name: str):
    return parse_steps(load_recipe(name)["postprocess"])


def recipe_label_rule(name: str) -> str | None:
    return load_recipe(name).get("labels")


# ------------------------------------------------------------------------------------------------ the recipes

def test_the_four_published_recipes_ship_with_their_rules() -> None:
    assert tuple(recipe_names()) == RECIPES
    goat2025 = load_recipe("goat2025")
    assert len(goat2025["members"]) == 7
    assert [m["framework"] for m in goat2025["members"]].count("umamba") == 1
    assert all(m["folds"] == ["all"] and m["mirroring"] is False for m in goat2025["members"])
    assert goat2025["labels"] == "sequential-threshold" and goat2025["postprocess"] == "ratio-adaptive"
    goat2024 = load_recipe("goat2024")
    assert len(goat2024["members"]) == 3 and goat2024["postprocess"] == "region-min-size:250/150/100"
    sparkans = load_recipe("sparkans2025")
    assert [m["framework"] for m in sparkans["members"]] == ["nnunetv2", "mednext"]
    assert all("class_weights" in m for m in sparkans["members"])
    default = load_recipe("nnunet-default")
    assert default["postprocess"] == "none" and "labels" not in default
    assert default["members"][0]["mirroring"] is True


def test_filling_a_recipe_checks_roles() -> None:
    recipe = load_recipe("sparkans2025")
    with pytest.raises(ModelError, match=r"no model given for mednext-m\. Add --model mednext-m=PATH"):
        fill_recipe(recipe, [("resenc-m", Path("/m"))])
    with pytest.raises(ModelError, match=r"no role 'mednext'. Its roles are resenc-m, mednext-m"):
        fill_recipe(recipe, [("resenc-m", Path("/m")), ("mednext", Path("/x"))])
    with pytest.raises(ModelError, match="takes one model, 2 were given"):
        fill_recipe(recipe, [("resenc-m", Path("/m")), ("resenc-m", Path("/n")), ("mednext-m", Path("/x"))])
    manifest = fill_recipe(recipe, [("resenc-m", Path("/m")), ("mednext-m", Path("/x"))],
                           Overrides(labels="sequential-threshold", postprocess="min-size:9", mirroring=False))
    assert [m["path"] for m in manifest["members"]] == ["/m", "/x"]
    assert [m["name"] for m in manifest["members"]] == ["resenc-m", "mednext-m"]
    assert all(m["mirroring"] is False and "role" not in m for m in manifest["members"])
    assert manifest["labels"] == "sequential-threshold" and manifest["postprocess"] == "min-size:9"
    assert not {"title", "source", "notes"} & set(manifest)
    repeated = fill_recipe(load_recipe("nnunet-default"), [("model", Path("/a")), ("model", Path("/b"))])
    assert [m["name"] for m in repeated["members"]] == ["model-1", "model-2"]
    with pytest.raises(ModelError, match="unknown recipe 'goat2026'"):
        recipe_model_set("goat2026", [])


# ------------------------------------------------------------------------------------------------ label rule

def test_goat2025_labels_by_sequential_threshold_not_argmax() -> None:
    """A voxel whose most probable class has p <= 0.5 stays 0 under the published rule; argmax labels it."""
    p = np.zeros((4, 1, 1, 3), dtype=np.float32)
    p[:, 0, 0, 0] = (0.30, 0.45, 0.15, 0.10)   # argmax NETC, no channel > 0.5 → 0
    p[:, 0, 0, 1] = (0.10, 0.10, 0.20, 0.60)   # ET > 0.5 → ET under both rules
    p[:, 0, 0, 2] = (0.40, 0.05, 0.35, 0.20)   # argmax background → 0 under both
    probabilities = Probabilities(p, (0, 1, 2, 3))
    published = fused_labels(probabilities, recipe_label_rule("goat2025"))
    assert published.ravel().tolist() == [0, ET, 0]
    assert argmax_labels(probabilities).ravel().tolist() == [NETC, ET, 0]


def test_sequential_threshold_writes_channels_in_label_order() -> None:
    """Class weights can push two channels over 0.5: the later (higher) label wins, as the published loop does."""
    p = np.array([0.0, 0.6, 0.0, 0.7], dtype=np.float32).reshape(4, 1, 1, 1)
    assert sequential_threshold_labels(Probabilities(p, (0, 1, 2, 3))).item() == ET
    assert sequential_threshold_labels(Probabilities(p[[0, 1]], (0, 4))).item() == RC
    regions = Probabilities(np.array([0.9, 0.2, 0.6], dtype=np.float32).reshape(3, 1, 1, 1), NESTED_REGIONS,
                            REGION_SPACE)
    assert sequential_threshold_labels(regions).item() == region_labels(regions).item() == ET
    with pytest.raises(ValueError, match="argmax need label-space"):
        fused_labels(regions, "argmax")


# ------------------------------------------------------------------------------------------------ goat2025 rules

def _blob(labels: np.ndarray, label: int, corner: tuple[int, int, int], size: int) -> None:
    z, y, x = corner
    labels[z:z + size, y:y + size, x:x + size] = label


def test_goat2025_removes_small_et_to_background_not_netc() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    _blob(labels, SNFH, (2, 2, 2), 30)          # WT_vol 27000 → ET threshold min(13.5, 100)
    _blob(labels, ET, (10, 10, 10), 2)          # 8 voxels of ET < 13.5
    _blob(labels, ET, (20, 20, 20), 3)          # 27 voxels: kept
    out, _ = apply_steps(labels, recipe_steps("goat2025"))
    assert out[10, 10, 10] == 0, "the published rule sets the small ET component to background"
    assert out[20, 20, 20] == ET
    netc_alternative = labels.copy()
    netc_alternative[10:12, 10:12, 10:12] = NETC
    assert not np.array_equal(out, netc_alternative)


def test_goat2025_counts_components_6_connected() -> None:
    """Two 64-voxel WT cubes touching along an edge only: two components under the published 6-connectivity (each
    below its WT threshold: removed); one 128-voxel component under 26-connectivity, which would be kept."""
    labels = np.zeros((50, 50, 50), dtype=np.uint8)
    _blob(labels, SNFH, (0, 0, 0), 35)          # 42875 voxels
    _blob(labels, SNFH, (40, 40, 40), 4)
    _blob(labels, SNFH, (44, 44, 40), 4)        # shares an edge with the previous cube
    out, (record,) = apply_steps(labels, recipe_steps("goat2025"))
    assert record["wt_threshold"] == pytest.approx(0.005 * (42875 + 128) / 3)  # 71.7 > 64
    assert out[41, 41, 41] == 0 and out[45, 45, 41] == 0 and out[10, 10, 10] == SNFH
    components = cc3d.connected_components(labels > 0, connectivity=26)
    assert components[41, 41, 41] == components[45, 45, 41]
    assert 0.005 * (42875 + 128) / 2 <= 128, "the 26-connected alternative's threshold would keep the pair"


def test_goat2025_recomputes_wt_volume_between_the_et_and_wt_steps() -> None:
    """An ET-only component removed in the ET step changes WT_vol (mean component size) before the WT step."""
    labels = np.zeros((64, 64, 64), dtype=np.uint8)
    _blob(labels, SNFH, (0, 0, 0), 50)          # 125000 voxels
    labels[55:57, 55:57, 55:58] = ET            # 12 voxels: a WT component (≥ 10) of ET only
    _blob(labels, SNFH, (52, 0, 0), 6)          # 216 voxels
    out, (record,) = apply_steps(labels, recipe_steps("goat2025"))
    before = (125000 + 12 + 216) / 3
    after = (125000 + 216) / 2
    assert record["wt_volume"] == pytest.approx(before) and record["wt_volume_after_et"] == pytest.approx(after)
    assert record["et_components_removed"] == 1 and out[55, 55, 55] == 0
    assert record["wt_threshold"] == 250.0
    assert out[52, 0, 0] == 0, "216 < min(0.005·WT_vol recomputed, 250) = 250: removed"
    assert min(0.005 * before, 250) < 216, "with the stale WT_vol (threshold 208.7) it would have been kept"


# ------------------------------------------------------------------------------------------------ goat2024 rules

def test_goat2024_removed_et_inside_a_kept_tc_becomes_netc() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    _blob(labels, SNFH, (0, 0, 0), 30)
    _blob(labels, NETC, (5, 5, 5), 10)          # TC 1000 voxels ≥ 150: kept
    _blob(labels, ET, (6, 6, 6), 4)             # ET 64 voxels < 100: removed from ET, still inside TC
    out, (record,) = apply_steps(labels, recipe_steps("goat2024"))
    assert out[7, 7, 7] == NETC, "rebuilt WT → TC → ET: a removed ET inside a kept TC is NETC"
    assert record["components_removed"] == {"WT": 0, "TC": 0, "ET": 1}
    to_background = labels.copy()  # the alternative: the removed ET component set to background
    to_background[labels == ET] = 0
    assert to_background[7, 7, 7] != out[7, 7, 7]


def test_goat2024_counts_components_26_connected_with_fixed_thresholds() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    _blob(labels, SNFH, (0, 0, 0), 6)           # 216 voxels
    _blob(labels, SNFH, (6, 6, 6), 4)           # 64 voxels touching the first cube at a corner only
    _blob(labels, SNFH, (20, 20, 20), 6)        # 216 voxels alone: < 250 → removed
    out, _ = apply_steps(labels, recipe_steps("goat2024"))
    assert out[0, 0, 0] == SNFH and out[7, 7, 7] == SNFH, "26-connected: one 280-voxel WT component ≥ 250"
    assert out[22, 22, 22] == 0
    six = cc3d.connected_components(labels > 0, connectivity=6)  # the 6-connected alternative splits the pair
    assert six[7, 7, 7] != six[0, 0, 0]


def test_goat2024_keeps_a_large_et_even_when_its_tc_is_removed() -> None:
    """The published rebuild is unconditional: ET ≥ 100 stays ET although its TC component (< 150) is dropped."""
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    _blob(labels, SNFH, (0, 0, 0), 20)
    _blob(labels, ET, (5, 5, 5), 5)             # ET 125 ≥ 100, TC = the same 125 voxels < 150
    out, (record,) = apply_steps(labels, recipe_steps("goat2024"))
    assert record["components_removed"]["TC"] == 1 and record["components_removed"]["ET"] == 0
    assert out[6, 6, 6] == ET


# ------------------------------------------------------------------------------------------------ end to end

def fold_all_copy(model: Path, dest: Path, fold: str = "0") -> Path:
    """A results folder whose fold_all is the given fold (the published pipelines use -f all)."""
    dest.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(model / name, dest / name)
    (dest / "fold_all").symlink_to(model / f"fold_{fold}", target_is_directory=True)
    return dest


@pytest.fixture(scope="module")
def umamba_bot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Mamba Bot results folder (random weights, official trainer name, 32³ patch) with fold_all."""
    plans = plans_v211([32, 32, 32], 4, 16, [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [2] * 4, [2] * 3)
    torch.manual_seed(5)
    network = build_umamba_network(BOT, plans, "3d_fullres", 4, 4).eval()
    folder = write_results_folder(tmp_path_factory.mktemp("umamba"), BOT, network, plans)
    (folder / "fold_0").rename(folder / "fold_all")
    return folder


class Recorded:
    """A member that keeps the probabilities it returned (so a test can recompute the fusion without predicting
    twice); everything else is the member's own."""

    def __init__(self, member) -> None:
        self.member = member
        self.probabilities: Probabilities | None = None

    def __getattr__(self, name: str):
        return getattr(self.member, name)

    def predict(self, *args, **kwargs) -> Probabilities:
        self.probabilities = self.member.predict(*args, **kwargs)
        return self.probabilities


def record_members(model_set) -> list[Recorded]:
    model_set.members = [Recorded(member) for member in model_set.members]
    return model_set.members


def member_mean(recorded: list[Recorded]) -> Probabilities:
    """The equal-weight mean of the members' probabilities, computed here in float64."""
    probabilities = [r.probabilities for r in recorded]
    labels = probabilities[0].labels
    assert all(p.labels == labels for p in probabilities)
    mean = np.mean(np.stack([p.array.astype(np.float64) for p in probabilities]), axis=0)
    return Probabilities(mean.astype(np.float32), labels, probabilities[0].space)


@pytest.mark.slow
def test_goat2025_end_to_end_on_nnunet_and_umamba_members(trained_models, phantom_cases, umamba_bot,
                                                          tmp_path: Path) -> None:
    a = fold_all_copy(trained_models["A"].path, tmp_path / "A" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    b = fold_all_copy(trained_models["B"].path, tmp_path / "B" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    roles = recipe_roles(load_recipe("goat2025"))
    paths = [a, b, a, b, a, b, umamba_bot]
    model_set = recipe_model_set("goat2025", list(zip(roles, paths)))
    recorded = record_members(model_set)
    case = read_case_folder(sorted(phantom_cases.iterdir())[0])
    result = segment_case(case, model_set, "cpu")

    mean = member_mean(recorded)
    sequential = sequential_threshold_labels(mean)
    expected, _ = apply_steps(sequential, parse_steps("ratio-adaptive"))
    assert np.mean(result.labels == expected) > 0.9999
    assert np.count_nonzero(sequential != argmax_labels(mean)) > 0, "the case must tell the two label rules apart"
    assert result.provenance["label_rule"] == "sequential-threshold"
    assert result.provenance["postprocess"] == ["ratio-adaptive"]
    assert result.provenance["recipe"]["name"] == "goat2025" and result.provenance["recipe"]["overrides"] == {}
    members = result.provenance["members"]
    assert [m["name"] for m in members] == roles
    assert [m["framework"] for m in members] == ["nnunetv2"] * 6 + ["umamba"]
    assert all(m["folds"] == ["all"] and m["mirroring"] is False and m["weight"] == 1.0 for m in members)


@pytest.mark.slow
def test_goat2024_end_to_end_on_region_members(trained_models, phantom_cases, tmp_path: Path) -> None:
    r = trained_models["R"].path
    paths = [fold_all_copy(r, tmp_path / f"R{i}" / r.name) for i in range(3)]
    model_set = recipe_model_set("goat2024", list(zip(recipe_roles(load_recipe("goat2024")), paths)))
    recorded = record_members(model_set)
    case = read_case_folder(sorted(phantom_cases.iterdir())[1])
    result = segment_case(case, model_set, "cpu")

    mean = member_mean(recorded)
    assert mean.is_regions
    expected, _ = apply_steps(region_labels(mean), parse_steps("region-min-size:250/150/100"))
    assert np.array_equal(result.labels, expected)
    assert np.count_nonzero(result.labels) > 0
    assert result.provenance["fusion_space"] == "regions" and result.provenance["label_rule"] == "sequential-threshold"
    assert result.provenance["postprocess"] == ["region-min-size:250/150/100"]
    assert result.provenance["postprocess_details"][0]["connectivity"] == 26


@pytest.mark.slow
def test_sparkans2025_end_to_end_on_nnunet_and_mednext_members(trained_models, phantom_cases,
                                                              tmp_path: Path) -> None:
    """The recipe written out as a manifest (`recipes show … --model …`), class weights edited, run as a model set."""
    mednext = write_v1_model_folder(tmp_path / "mednext", {0: mednext_state(3, "M", 1.0)},
                                    v1_plans(patch_size=(32, 32, 32)), trainer="nnUNetTrainerV2_MedNeXt_M_kernel3")
    recipe = fill_recipe(load_recipe("sparkans2025"),
                         [("resenc-m", trained_models["A"].path), ("mednext-m", mednext)])
    recipe["members"][1].update(class_labels={"1": "SNFH", "2": "NETC", "3": "ET"}, mirroring=False, tile_step=1.0)
    recipe["members"][0].update(mirroring=False, folds=[0])
    recipe["members"][0]["class_weights"]["ET"] = 3.0  # per-class weights at work
    manifest = tmp_path / "sparkans.json"
    manifest.write_text(json.dumps(recipe))
    model_set = load_model_set(manifest)
    recorded = record_members(model_set)
    case = read_case_folder(sorted(phantom_cases.iterdir())[2])
    result = segment_case(case, model_set, "cpu")

    assert [m["framework"] for m in result.provenance["members"]] == ["nnunetv2", "mednext"]
    assert result.provenance["members"][0]["class_weights"]["ET"] == 3.0
    assert result.provenance["fusion"] == "class-weighted-mean"
    assert result.provenance["label_rule"] == "argmax" and result.provenance["postprocess"] == []
    nn, mx = (r.probabilities for r in recorded)
    assert mx.grid_shape == nn.grid_shape == case.shape_zyx
    assert mx.labels == (0, SNFH, NETC, ET)  # the MedNeXt channel order, mapped by class_labels
    fused = np.stack([(w_nn * nn.channel(c).astype(np.float64) + mx.channel(c)) / (w_nn + 1.0)
                      for c, w_nn in ((0, 1.0), (NETC, 1.0), (SNFH, 1.0), (ET, 3.0))])
    expected = argmax_labels(Probabilities(fused.astype(np.float32), (0, NETC, SNFH, ET)))
    assert np.mean(result.labels == expected) > 0.9999
    equal = np.stack([(nn.channel(c).astype(np.float64) + mx.channel(c)) / 2 for c in (0, NETC, SNFH, ET)])
    assert not np.array_equal(expected, argmax_labels(Probabilities(equal.astype(np.float32), (0, NETC, SNFH, ET))))


@pytest.mark.slow
def test_nnunet_default_recipe_equals_the_plain_model_options(trained_models, phantom_cases, tmp_path: Path) -> None:
    """The parity baseline: the recipe builds the same set as --model A --postprocess none (whose labels the suite
    checks against nnUNetv2_predict), and the CLI records the recipe and an override."""
    model = tmp_path / "A" / trained_models["A"].path.name  # one fold keeps the test short
    model.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(trained_models["A"].path / name, model / name)
    (model / "fold_0").symlink_to(trained_models["A"].path / "fold_0", target_is_directory=True)
    case = read_case_folder(sorted(phantom_cases.iterdir())[0])
    recipe = segment_case(case, recipe_model_set("nnunet-default", [("model", model)]), "cpu")
    plain = segment_case(case, nnunet_model_set([model], postprocess="none"), "cpu")
    assert np.array_equal(recipe.labels, plain.labels)
    assert recipe.provenance["label_rule"] == "argmax" and recipe.provenance["members"][0]["mirroring"] is True

    out = tmp_path / "out"
    case_dir = sorted(phantom_cases.iterdir())[0]
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case_dir), "-o", str(out),
                           "--recipe", "nnunet-default", "--model", f"model={model}", "--mirroring", "off",
                           "--labels", "sequential-threshold", "--device", "cpu", "--progress", "none"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / f"{case_dir.name}.json").read_text())
    assert summary["recipe"]["name"] == "nnunet-default"
    assert summary["recipe"]["overrides"] == {"labels": "sequential-threshold", "mirroring": False}
    assert summary["label_rule"] == "sequential-threshold" and summary["members"][0]["mirroring"] is False


def test_cli_recipe_errors_name_the_fix(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    done = run("predict", str(tmp_path), "-o", str(tmp_path / "o"), "--recipe", "goat2025", "--model", "/x")
    assert done.returncode == 1 and "give each model as ROLE=PATH" in done.stderr
    done = run("predict", str(tmp_path), "-o", str(tmp_path / "o"), "--recipe", "goat2025", "--model", "a=/x",
               "--folds", "0")
    assert done.returncode == 1 and "--folds cannot be combined with a recipe" in done.stderr
    assert "recipes show goat2025" in done.stderr
    done = run("recipes", "show", "goat2026")
    assert done.returncode == 1 and "unknown recipe 'goat2026'" in done.stderr
    listing = run("recipes", "list")
    assert listing.returncode == 0 and all(name in listing.stdout for name in RECIPES)
    shown = run("recipes", "show", "sparkans2025", "--model", "resenc-m=/m", "--model", "mednext-m=/x")
    manifest = json.loads(shown.stdout)
    assert [m["path"] for m in manifest["members"]] == ["/m", "/x"]
    assert manifest["members"][1]["size"] == "M"


def test_a_recipe_written_as_a_manifest_runs_as_a_model_set_and_names_its_recipe(tmp_path: Path) -> None:
    """What the Slicer module's "Add from recipe…" does: the filled recipe saved as an ordinary manifest."""
    from BraTSEnsembleLib.recipes import write_recipe_manifest
    from test_modelset import fake_nnunet_folder

    folder = fake_nnunet_folder(tmp_path / "models", folds=("0",))
    path = write_recipe_manifest("nnunet-default", [("model", folder)], tmp_path / "sets" / "default.json")
    data = json.loads(path.read_text())
    assert data["recipe"] == "nnunet-default" and data["members"][0]["path"] == str(folder)
    model_set = load_model_set(path)
    assert model_set.recipe == {"name": "nnunet-default"} and model_set.postprocess == []
    assert model_set.describe()["recipe"] == {"name": "nnunet-default"}
    with pytest.raises(ModelError, match="exists"):
        write_recipe_manifest("nnunet-default", [("model", folder)], path)
    assert json.loads(path.read_text()) == data


@pytest.mark.slow
def test_brats2020_recipe_on_a_2020_style_model_gives_the_2023_style_model_labels(trained_models, phantom_cases,
                                                                                  tmp_path: Path) -> None:
    """A BraTS 2020-style results folder (channels T1/T1CE/T2/FLAIR, labels 1 NCR/NET, 2 ED, 4 ET named as BraTS 2020
    names them) made from model A's fold 0 by rewriting its dataset.json only: the recipe must give the labels of A's
    fold 0 voxel for voxel (classes matched by name; ET, value 4 in the model, written as 3)."""
    a = trained_models["A"].path
    old = tmp_path / "Dataset520_BraTS2020" / a.name
    old.mkdir(parents=True)
    shutil.copy(a / "plans.json", old / "plans.json")
    dataset = json.loads((a / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
    dataset.update(channel_names={"0": "T1", "1": "T1CE", "2": "T2", "3": "FLAIR"},
                   labels={"background": 0, "NCR/NET": 1, "ED": 2, "ET": 4})
    (old / "dataset.json").write_text(json.dumps(dataset))
    (old / "fold_0").symlink_to(a / "fold_0", target_is_directory=True)  # the recipe takes every fold there
    case_dir = sorted(phantom_cases.iterdir())[2]
    results = {}
    for name, model_options in (("brats2020-nnunet", ["--recipe", "brats2020-nnunet", "--model", f"model={old}"]),
                                ("plain", ["--model", str(a), "--folds", "0", "--postprocess", "none"])):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case_dir), "-o", str(out),
                               *model_options, "--mirroring", "off", "--device", "cpu", "--progress", "none"],
                              capture_output=True, text=True, cwd=ROOT, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_dir.name}.nii.gz")))
        summary = json.loads((out / f"{case_dir.name}.json").read_text())
        assert summary["label_set"]["kind"] == "brats"
    assert np.array_equal(results["brats2020-nnunet"], results["plain"])
    assert set(np.unique(results["brats2020-nnunet"]).tolist()) == {0, NETC, SNFH, ET}  # ET as 3, never 4
    summary = json.loads((tmp_path / "brats2020-nnunet" / f"{case_dir.name}.json").read_text())
    assert summary["recipe"]["name"] == "brats2020-nnunet" and summary["postprocess"] == []
    assert summary["members"][0]["channels"] == ["t1n", "t1c", "t2w", "t2f"] and summary["members"][0]["folds"] == ["0"]
