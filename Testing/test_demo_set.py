"""The shipped demo: its case, its three-framework model set, the Sample Data description, the quality of the set on
a held-out phantom, and ``brats-ensemble demo`` end to end (no training anywhere: everything here is shipped)."""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BraTSEnsembleLib import demo, process
from BraTSEnsembleLib.case import case_from_images
from BraTSEnsembleLib.checkpoints import load_checkpoint, load_plain_pickle
from BraTSEnsembleLib.demo import train as demo_train
from BraTSEnsembleLib.downloads import file_sha256
from BraTSEnsembleLib.demo.phantom import LAYOUTS, make_phantom
from BraTSEnsembleLib.labels import region_mask
from BraTSEnsembleLib.modelset import load_model_set
from BraTSEnsembleLib.pipeline import segment_case
from BraTSEnsembleLib.uncertainty import region_dice

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "BraTSEnsembleLib" / "demo"
#: The held-out phantoms of the quality test (the first of each layout among docs/demo.md's held-out phantoms) and the
#: bar each must clear.
HELD_OUT_FIRSTS: tuple[tuple[int, str], ...] = tuple(
    next(item for item in demo_train.HELD_OUT if item[1] == layout) for layout in LAYOUTS)
MIN_DICE = 0.85
#: Budget of the committed demo files (case + models), bytes.
MAX_SHIPPED_BYTES = 15_000_000


def shipped_files() -> list[Path]:
    return sorted(p for folder in (demo.CASE_DIR, demo.MODELS_DIR) for p in folder.rglob("*") if p.is_file()
                  and "__pycache__" not in p.parts)


def int16_case(seed: int, case_id: str, layout: str = "standard"):
    """A phantom at the demo case's size, rounded to int16 as the shipped case is, as an in-memory Case."""
    phantom = make_phantom(seed, shape=demo_train.DEMO_CASE_SHAPE, case_id=case_id, layout=layout)
    images = {role: phantom.to_sitk(np.rint(image).astype(np.int16)) for role, image in phantom.images.items()}
    return phantom, case_from_images(case_id, images)


# ------------------------------------------------------------------------------------------- the phantom layouts

#: The demo's field of view at 2 mm (the training grid): the layouts are defined in mm, and this is fast.
FOV_2MM = {"shape": demo_train.TRAIN_SHAPE, "spacing": demo_train.TRAIN_SPACING}


def lesions(labels: np.ndarray, region: str) -> list[int]:
    """Voxel counts of the 26-connected components of a region, largest first."""
    components, count = cc3d.connected_components(region_mask(labels, region), connectivity=26, return_N=True)
    return sorted(np.bincount(components.ravel())[1:].tolist(), reverse=True) if count else []


def test_standard_layout_is_the_default_phantom():
    default, standard = make_phantom(3, **FOV_2MM), make_phantom(3, layout="standard", **FOV_2MM)
    assert np.array_equal(default.labels, standard.labels)
    assert all(np.array_equal(default.images[r], standard.images[r]) for r in default.images)
    with pytest.raises(ValueError, match="multifocal"):
        make_phantom(3, layout="diffuse", **FOV_2MM)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_multifocal_phantoms_have_separate_tumour_cores(seed):
    labels = make_phantom(seed, layout="multifocal", **FOV_2MM).labels
    cores, enhancing = lesions(labels, "TC"), lesions(labels, "ET")
    assert len(cores) >= 2 and len(enhancing) >= 2, (cores, enhancing)
    assert set(np.unique(labels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_small_lesion_phantoms_have_only_small_lesions(seed):
    phantom = make_phantom(seed, layout="small", **FOV_2MM)
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    standard = make_phantom(seed, **FOV_2MM)
    enhancing = lesions(phantom.labels, "ET")
    # enhancing radius ≤ 9 mm, stretched ≤ 1.2× per axis, lumpy border: each ET lesion well under 10 mL
    assert 1 <= len(enhancing) <= 2 and max(enhancing) * voxel_ml < 10.0, enhancing
    assert region_mask(phantom.labels, "WT").sum() < 0.25 * region_mask(standard.labels, "WT").sum()


# ------------------------------------------------------------------------------------------------ the shipped case


def test_shipped_case_is_what_the_generator_makes_from_its_seed():
    info = demo.demo_case_info()
    assert info["case_id"] == demo_train.DEMO_CASE_ID and info["seed"] == demo_train.DEMO_CASE_SEED
    assert info["seed"] not in demo_train.TRAIN_SEEDS and info["seed"] not in demo_train.HELD_OUT_SEEDS
    phantom = make_phantom(info["seed"], shape=tuple(info["grid_zyx"]), case_id=info["case_id"])
    for role, entry in info["files"].items():
        path = demo.CASE_DIR / entry["file"]
        assert file_sha256(path) == entry["sha256"], f"{path} changed without case.json"
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == (160, 192, 160) and image.GetSpacing() == (1.0, 1.0, 1.0)
        array = sitk.GetArrayFromImage(image)
        if role == "seg":
            assert array.dtype == np.uint8 and np.array_equal(array, phantom.labels)
        else:
            assert array.dtype == np.int16, f"{role}: BraTS ships int16 images"
            assert np.array_equal(array, np.rint(phantom.images[role]).astype(np.int16)), role
    assert set(np.unique(phantom.labels)) == {0, 1, 2, 3}, "the demo case shows every tumour label"


def test_sample_data_source_describes_the_shipped_files_for_slicer():
    source = demo.sample_data_source()
    # keyword arguments of SampleData.SampleDataLogic.registerCustomSampleDataSource (Slicer 5.x)
    assert set(source) <= {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                           "thumbnailFileName", "loadFileType", "loadFiles", "loadFileProperties", "checksums"}
    assert source["category"] == "BraTSEnsemble"
    lists = [source[k] for k in ("uris", "fileNames", "nodeNames", "loadFileType", "checksums")]
    assert {len(v) for v in lists} == {5}
    assert source["loadFileType"] == ["VolumeFile"] * 4 + ["SegmentationFile"]
    for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
        parsed = urlparse(uri)
        path = Path(unquote(parsed.path))
        assert parsed.scheme == "file" and path.name == name and path.is_file()
        assert checksum == f"SHA256:{file_sha256(path)}"
    # the module's role auto-assignment recognises the loaded volume nodes by their names
    volumes = {f"vtkMRMLScalarVolumeNode{i}": n for i, n in enumerate(source["nodeNames"][:4])}
    assigned = process.auto_assign_volumes(volumes).assigned
    assert assigned == {role: f"vtkMRMLScalarVolumeNode{i}" for i, role in enumerate(("t1n", "t1c", "t2w", "t2f"))}


def test_demo_models_are_offered_only_for_the_demo_case():
    names = demo.sample_data_source()["nodeNames"][:4]
    assert demo.model_set_offered_for(names) == demo.MANIFEST
    assert demo.model_set_offered_for([*names[:3], "BraTS-GLI-00001-000-t2f"]) is None
    assert demo.model_set_offered_for(["DemoPhantom-7770-t1c"]) is None
    assert demo.model_set_offered_for([]) is None


# ------------------------------------------------------------------------------------------- the shipped model set


def test_manifest_ensembles_three_frameworks_with_ratio_adaptive_postprocessing():
    model_set = load_model_set(demo.MANIFEST)
    described = model_set.describe()
    assert [m["framework"] for m in described["members"]] == ["nnunetv2", "umamba", "mednext"]
    assert [str(step) for step in model_set.postprocess] == ["ratio-adaptive"]
    umamba = model_set.members[1]
    checkpoint = load_checkpoint(umamba.model_dir / "fold_0" / "checkpoint_final.pth")
    assert checkpoint["trainer_name"] == "nnUNetTrainerUMambaBot"


def test_mednext_member_is_an_official_v1_folder_and_loads_strictly():
    mednext = load_model_set(demo.MANIFEST).members[2]
    folder = mednext.model_dir
    assert folder.name.startswith("nnUNetTrainerV2_MedNeXt_S_kernel3__nnUNetPlansv2.1_trgSp_")
    plans = load_plain_pickle(folder / "plans.pkl")
    assert plans["num_classes"] == 3 and plans["num_modalities"] == 4
    model = folder / "fold_0" / "model_final_checkpoint.model"
    checkpoint = load_checkpoint(model)
    assert {"epoch", "state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "plot_stuff",
            "best_stuff"} <= set(checkpoint)
    info = load_plain_pickle(model.with_name(model.name + ".pkl"))
    assert {"init", "name", "class", "plans"} <= set(info) and info["name"] == "nnUNetTrainerV2_MedNeXt_S_kernel3"
    network = mednext.load_network("0")  # load_state_dict(strict=True) with the official parameter names
    assert network.stem.weight.shape[0] == 8 and hasattr(network, "enc_block_0") and hasattr(network, "out_4")


def test_shipped_files_are_small_and_packaged():
    files = shipped_files()
    total = sum(p.stat().st_size for p in files)
    assert total < MAX_SHIPPED_BYTES, f"the demo's files take {total / 1e6:.1f} MB"
    for checkpoint in [p for p in files if p.suffix in (".pth", ".model")]:
        assert checkpoint.stat().st_size < 4_000_000, checkpoint
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["BraTSEnsembleLib.demo"]
    for path in files:
        relative = path.relative_to(DEMO_DIR).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) and relative.count("/") == pattern.count("/")
                   for pattern in patterns), f"{relative} is not in pyproject's package-data"


# ---------------------------------------------------------------------------------------------- quality and demo


@pytest.mark.parametrize("seed, layout", HELD_OUT_FIRSTS, ids=[layout for _, layout in HELD_OUT_FIRSTS])
def test_shipped_set_segments_held_out_phantoms(seed, layout):
    """The ensemble on phantoms it never saw (seeds not among the training seeds), at the demo case's size: one
    standard, one multifocal and one with small lesions."""
    assert seed not in demo_train.TRAIN_SEEDS
    torch.set_num_threads(min(2, torch.get_num_threads()))
    phantom, case = int16_case(seed, demo_train.held_out_case_id(seed, layout), layout)
    result = segment_case(case, load_model_set(demo.MANIFEST), device="cpu")
    scores = {r: region_dice(result.labels, phantom.labels, r) for r in ("ET", "TC", "WT")}
    assert all(score >= MIN_DICE for score in scores.values()), scores
    agreement = result.provenance["member_agreement"]
    assert [a["member"] for a in agreement] == ["nnunet", "umamba-bot", "mednext-s"]
    assert all(0.0 <= a["dice"][r] <= 1.0 for a in agreement for r in ("WT", "TC", "ET"))


def test_demo_command_writes_every_file_and_never_replaces_files_unasked(tmp_path):
    env = {**os.environ, "BRATS_ENSEMBLE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "demo", "--device", "cpu"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = tmp_path / "cache" / "demo" / "output" / "result"
    case_id = demo_train.DEMO_CASE_ID
    for name in (f"{case_id}.nii.gz", f"{case_id}.json", f"{case_id}.seg.nrrd", f"{case_id}_statistics.csv",
                 f"{case_id}_disagreement.nii.gz", f"{case_id}_entropy.nii.gz", f"{case_id}_report.png"):
        assert (result / name).is_file(), name
        assert str(result / name) in done.stdout, f"the demo does not say where {name} is"
    assert "Dice against the phantom's ground truth: ET" in done.stdout

    mine = tmp_path / "mine" / "result"
    mine.mkdir(parents=True)
    (mine / f"{case_id}.json").write_text("my own file")
    refused = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "demo", "-o", str(mine.parent)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    assert (mine / f"{case_id}.json").read_text() == "my own file"
    assert sorted(p.name for p in mine.iterdir()) == [f"{case_id}.json"]


def test_held_out_phantoms_are_written_as_evaluate_reads_them(tmp_path):
    assert not set(demo_train.HELD_OUT_SEEDS) & set(demo_train.TRAIN_SEEDS)
    assert {layout for _, layout in demo_train.HELD_OUT} == set(LAYOUTS)
    chosen = [next(item for item in demo_train.HELD_OUT if item[1] == "small")]
    demo_train.write_held_out_cases(tmp_path / "cases", tmp_path / "ground_truth", chosen)
    case_id = demo_train.held_out_case_id(*chosen[0])
    assert case_id.endswith("-small")
    assert sorted(p.name for p in (tmp_path / "cases" / case_id).iterdir()) == sorted(
        f"{case_id}-{role}.nii.gz" for role in ("t1n", "t1c", "t2w", "t2f"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ground_truth" / f"{case_id}-seg.nii.gz")))
    assert np.array_equal(truth, make_phantom(chosen[0][0], shape=demo_train.DEMO_CASE_SHAPE, layout="small").labels)
    image = sitk.ReadImage(str(tmp_path / "cases" / case_id / f"{case_id}-t1c.nii.gz"))
    assert image.GetPixelID() == sitk.sitkInt16


def test_training_takes_a_gpu_only_where_torch_sees_one():
    from BraTSEnsembleLib.demo.nnunet_train import resolve_training_device

    assert resolve_training_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_training_device("cpu") == "cpu" and resolve_training_device("cuda") == "cuda"


def test_v1_plans_refuse_what_nnunet_v1_cannot_express():
    from BraTSEnsembleLib.demo.v1_export import v1_plans_from_v2

    plans = {"configurations": {"3d_fullres": {"normalization_schemes": ["ZScoreNormalization"]}},
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2]}
    regions = {"channel_names": {"0": "t1c"}, "labels": {"background": 0, "whole tumor": [1, 2, 3]}}
    with pytest.raises(ValueError, match="region"):
        v1_plans_from_v2(plans, regions)
    other = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}}
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["CTNormalization"]
    with pytest.raises(ValueError, match="z-score"):
        v1_plans_from_v2(plans, other)
