"""Swin UNETR: MONAI's SwinUNETR as a member with 128³ windows, the patch merging of each MONAI version, problems
refused when the model set is built, and the GoAT 2024 team's nnU-Net Swin UNETR checkpoint.

Oracles: MONAI's own ``sliding_window_inference`` (with NormalizeIntensity) called directly on the same network and
weights (``test_torchscript_member.oracle``); nnU-Net's own ``nnUNetPredictor`` given MONAI's SwinUNETR directly.
Weights are initialised here (seeded); nothing is faked.

Runtime and memory: a 128³ window of SwinUNETR at the recipes' feature size 48 takes minutes on two CPU cores, and
each 128³ window holds about 3 GB of attention maps on the CPU. So the paediatric recipe's member (as `recipes show`
writes it: roi 128³, overlap 0.5, sw_batch_size 4, sigmoid TC/WT/ET, z-score over non-zero voxels, legacy patch
merging) runs at feature size 12 — the same code path, a narrower network — on a case padded into one 128³ window;
overlapping windows in batches are checked on four 64 × 32 × 32 windows. The GoAT 2024 member is the trainer's full
network (feature size 48) with the plans' patch set to 64³ for the test.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from BraTSEnsembleLib.case import read_case_folder
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.labels import BACKGROUND, ET, NETC, SNFH
from BraTSEnsembleLib.members.base import REGION_SPACE
from BraTSEnsembleLib.members.swinunetr import (LEGACY_MERGING_ORDER, MONAI15_MERGING_ORDER, LegacyPatchMerging,
                                                Monai15PatchMerging, NnUNetSwinUNETR)
from BraTSEnsembleLib.members.torchscript import MonaiNetworkMember
from BraTSEnsembleLib.modelset import load_model_set
from BraTSEnsembleLib.recipes import fill_recipe, load_recipe

from test_modelset import write_manifest
from test_recipes import fold_all_copy
from test_torchscript_member import make_case, oracle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def ped_member_entry(checkpoint: Path, **network: object) -> dict:
    """The paediatric recipe's member as a manifest entry, with network arguments changed by ``network``."""
    manifest = fill_recipe(load_recipe("ped2023-swinunetr"), [("swinunetr", checkpoint)])
    entry = manifest["members"][0]
    entry["network"] = {**entry["network"], **network}
    return entry


def monai_swinunetr(seed: int, feature_size: int, downsample: object) -> torch.nn.Module:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    return SwinUNETR(in_channels=4, out_channels=3, feature_size=feature_size, downsample=downsample).eval()


# ------------------------------------------------------------------------------------------------ patch merging

def test_patch_merging_takes_the_slices_of_each_monai_version() -> None:
    """MONAI ≤ 1.4's "merging" took (0,1,0) and (0,0,1) twice and never (1,1,0), (0,1,1) (MONAI#8284); MONAI ≥ 1.5
    takes each once. The slices are read back from an input whose value is the voxel's (d, h, w) parity code."""
    from monai.networks.nets.swin_unetr import PatchMerging

    grid = np.indices((4, 4, 4)) % 2
    code = torch.from_numpy((4 * grid[0] + 2 * grid[1] + grid[2]).astype(np.float32))[None, ..., None]  # (1,d,h,w,1)
    for cls, order in ((LegacyPatchMerging, LEGACY_MERGING_ORDER), (Monai15PatchMerging, MONAI15_MERGING_ORDER)):
        merging = cls(dim=1)
        merging.norm, merging.reduction = torch.nn.Identity(), torch.nn.Identity()
        taken = merging(code)[0, 0, 0, 0].tolist()
        assert taken == [4 * d + 2 * h + w for d, h, w in order]
    assert [4 * d + 2 * h + w for d, h, w in LEGACY_MERGING_ORDER] == [0, 4, 2, 1, 5, 2, 1, 7]
    # MONAI 1.6.1 (installed): its "merging" is the corrected one, ours gives it bit for bit with the same weights
    torch.manual_seed(0)
    installed, ours, legacy = PatchMerging(6), Monai15PatchMerging(6), LegacyPatchMerging(6)
    ours.load_state_dict(installed.state_dict())
    legacy.load_state_dict(installed.state_dict())
    x = torch.randn(1, 7, 8, 5, 6)  # odd sizes: padded as MONAI pads
    assert torch.equal(ours(x), installed(x))
    assert not torch.allclose(legacy(x), installed(x))


# ------------------------------------------------------------------------------------------------ MONAI member

def test_paediatric_recipe_member_equals_monai_sliding_window_with_a_128_window(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    network = monai_swinunetr(seed=7, feature_size=12, downsample=LegacyPatchMerging)
    torch.save({"state_dict": network.state_dict(), "epoch": 300}, checkpoint)  # as the tutorial saves it
    shown = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "recipes", "show", "ped2023-swinunetr",
                            "--model", f"swinunetr={checkpoint}"], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    entry = json.loads(shown.stdout)["members"][0]
    # what the command line writes is the recipe's member with the path filled in
    assert Path(entry.pop("path")) == checkpoint.resolve()
    assert entry == {k: v for k, v in ped_member_entry(checkpoint).items() if k != "path"}
    assert entry["roi_size"] == [128, 128, 128] and entry["overlap"] == 0.5 and entry["sw_batch_size"] == 4
    entry["network"]["feature_size"] = 12  # time: the same network, narrower
    entry["path"] = str(checkpoint)
    member = load_model_set(write_manifest(tmp_path, {"postprocess": "none", "members": [entry]})).members[0]
    assert isinstance(member, MonaiNetworkMember) and member.space == REGION_SPACE
    assert member.roles == ("t2f", "t1c", "t1n", "t2w")
    assert member.labels == (BACKGROUND, NETC, SNFH, ET)

    case = make_case(shape_zyx=(30, 36, 40), spacing_xyz=(1.0, 1.0, 1.0), seed=11)  # padded to one 128³ window
    probabilities = member.predict(case, torch.device("cpu"))
    expected = oracle(network, case, member.roles, (128, 128, 128), overlap=0.5, mode="constant", axis_order="xyz",
                      activation="sigmoid", sw_batch_size=4)
    assert probabilities.labels == ("TC", "WT", "ET") and probabilities.grid_shape == case.shape_zyx
    assert np.abs(probabilities.array - expected).max() <= 1e-5
    assert probabilities.array.std(axis=(1, 2, 3)).min() > 1e-4  # a real, varying prediction
    assert member.describe()["network"]["downsample"] == "merging-legacy"


def test_swinunetr_member_overlaps_and_batches_windows_as_monai_does(tmp_path: Path) -> None:
    """Overlap 0.5 and sw_batch_size 2 over four overlapping 64 × 32 × 32 windows (two batches), MONAI 1.5's patch
    merging: equal to MONAI's sliding_window_inference with its own SwinUNETR (whose "merging" is MONAI 1.5's)."""
    checkpoint = tmp_path / "model.pt"
    network = monai_swinunetr(seed=8, feature_size=12, downsample="merging")
    torch.save(network.state_dict(), checkpoint)
    entry = {**ped_member_entry(checkpoint, feature_size=12, downsample="merging"), "roi_size": [64, 32, 32],
             "sw_batch_size": 2}
    member = load_model_set(write_manifest(tmp_path, {"postprocess": "none", "members": [entry]})).members[0]
    case = make_case(shape_zyx=(20, 40, 70), spacing_xyz=(1.0, 1.0, 1.0), seed=12)  # 2 × 2 × 1 windows (x, y, z)
    probabilities = member.predict(case, torch.device("cpu"))
    expected = oracle(network, case, member.roles, (64, 32, 32), overlap=0.5, mode="constant", axis_order="xyz",
                      activation="sigmoid", sw_batch_size=2)
    assert np.abs(probabilities.array - expected).max() <= 1e-5
    assert probabilities.array.std(axis=(1, 2, 3)).min() > 1e-4


def test_swinunetr_problems_are_refused_or_warned_when_the_set_is_built(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"never read: refused before the weights are loaded")

    def build(entry: dict, name: str = "set.json"):
        return load_model_set(write_manifest(tmp_path, {"postprocess": "none", "members": [entry]}, name))

    entry = ped_member_entry(checkpoint, feature_size=12)
    with pytest.raises(ModelError, match=r"member 1 \('swinunetr'\): .*SwinUNETR does not take windows of shape "
                                         r"\(1, 4, 100, 100, 100\) .*divisible by 2\*\*5.*multiples of 32"):
        build({**entry, "roi_size": [100, 100, 100]})
    with pytest.raises(ModelError, match=r"downsample must be one of merging-legacy, merging, mergingv2"):
        build(ped_member_entry(checkpoint, feature_size=12, downsample="merging-v1"))
    unstated = dict(entry, network={k: v for k, v in entry["network"].items() if k != "downsample"})
    with pytest.warns(RuntimeWarning, match=r"SwinUNETR without \"downsample\".*\"merging-legacy\""):
        build(unstated)


def test_a_member_refused_at_build_time_stops_a_batch_once_before_any_member_runs(trained_models, phantom_cases,
                                                                                  tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"never read")
    manifest = write_manifest(tmp_path, {"postprocess": "none", "members": [
        {"name": "nnunet", "framework": "nnunetv2", "path": str(trained_models["A"].path)},
        {**ped_member_entry(checkpoint, feature_size=12), "roi_size": [96, 96, 100]}]})
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "batch", str(phantom_cases), "-o", str(out),
                           "--model-set", str(manifest), "--device", "cpu", "--progress", "json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not take windows of shape (1, 4, 96, 96, 100)" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    events = [json.loads(line)["event"] for line in done.stdout.splitlines() if line.strip()]
    assert "member-start" not in events and "case-start" not in events
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------ GoAT 2024 member

SWIN_CONFIGURATION = "3d_fullres_SwinUNETR"
SWIN_TRAINER = "nnUNetTrainer_SwinUNETR"


def goat2024_swin_folder(root: Path, region_model: Path, seed: int = 3) -> tuple[Path, NnUNetSwinUNETR]:
    """A results folder as the GoAT 2024 team's trainer writes it: the region-based dataset.json and plans of a model
    trained here, the plans' extra configuration 3d_fullres_SwinUNETR (inherits 3d_fullres; patch 64³ here, 128³ in
    theirs), and fold_all/checkpoint_final.pth holding the trainer's network (deep-supervision heads included)."""
    folder = root / f"{SWIN_TRAINER}__nnUNetPlans__{SWIN_CONFIGURATION}"
    (folder / "fold_all").mkdir(parents=True)
    shutil.copy(region_model / "dataset.json", folder / "dataset.json")
    plans = json.loads((region_model / "plans.json").read_text())
    plans["configurations"][SWIN_CONFIGURATION] = {"inherits_from": "3d_fullres", "patch_size": [64, 64, 64],
                                                   "batch_size": 4}
    (folder / "plans.json").write_text(json.dumps(plans))
    dataset = json.loads((folder / "dataset.json").read_text())
    torch.manual_seed(seed)
    network = NnUNetSwinUNETR(len(dataset["channel_names"]), 3).eval()
    assert {k for k in network.state_dict() if k.startswith("out_dec")} == {
        f"out_dec{i}.conv.conv.{p}" for i in range(4) for p in ("weight", "bias")}
    torch.save({"network_weights": network.state_dict(), "trainer_name": SWIN_TRAINER,
                "init_args": {"configuration": SWIN_CONFIGURATION, "fold": "all"},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, folder / "fold_all" / "checkpoint_final.pth")
    return folder, network


def test_goat2024_swin_unetr_member_loads_and_equals_nnunet_predictor_with_monai_swinunetr(
        trained_models, phantom_cases, tmp_path: Path) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from BraTSEnsembleLib.recipes import recipe_model_set

    region_model = fold_all_copy(trained_models["R"].path, tmp_path / "R" / trained_models["R"].path.name)
    folder, network = goat2024_swin_folder(tmp_path / "models", region_model)
    roles = [("nnunet", region_model), ("nnunet-swin", folder), ("nnunet-large", region_model)]
    model_set = recipe_model_set("goat2024", roles)
    member = model_set.members[1]
    assert member.name == "nnunet-swin" and member.folds == ["all"] and member.use_mirroring is False
    case = read_case_folder(sorted(phantom_cases.iterdir())[0])
    probabilities = member.predict(case, torch.device("cpu"))
    assert probabilities.space == REGION_SPACE and probabilities.grid_shape == case.shape_zyx

    # nnU-Net's own predictor with MONAI's SwinUNETR (MONAI 1.3's patch merging) and the checkpoint's weights
    # without the deep-supervision heads, which the trainer uses only in training.
    swin = monai_swinunetr(seed=0, feature_size=48, downsample=LegacyPatchMerging)
    weights = {k: v for k, v in network.state_dict().items() if not k.startswith("out_dec")}
    swin.load_state_dict(weights, strict=True)
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(swin, plans_manager, plans_manager.get_configuration(SWIN_CONFIGURATION),
                                    [weights], dataset, SWIN_TRAINER, (0, 1, 2))
    _, expected = predictor.predict_single_npy_array(case.stacked(member.roles), {"spacing": list(case.spacing_zyx)},
                                                     None, None, True)
    assert np.array_equal(probabilities.array, np.asarray(expected, dtype=np.float32))
    assert probabilities.array.std() > 1e-4

    # and the whole recipe runs through the command line with it
    out = tmp_path / "out"
    case_dir = sorted(phantom_cases.iterdir())[0]
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case_dir), "-o", str(out),
                           "--recipe", "goat2024", *[f"--model={role}={path}" for role, path in roles],
                           "--device", "cpu", "--progress", "none"], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / f"{case_dir.name}.json").read_text())
    assert summary["recipe"]["name"] == "goat2024" and summary["fusion_space"] == "regions"
    assert [m["name"] for m in summary["members"]] == ["nnunet", "nnunet-swin", "nnunet-large"]
    assert summary["members"][1]["path"] == str(folder) and summary["members"][1]["folds"] == ["all"]

