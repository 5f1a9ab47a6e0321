"""Which input roles a model list needs, from its JSON files only (``BraTSEnsembleLib.inputroles``), and the file
names the Slicer module exports each role to (``process.input_file_name``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from BraTSEnsembleLib import process
from BraTSEnsembleLib.errors import ModelError
from BraTSEnsembleLib.inputroles import manifest_roles, needed_roles, results_folder_roles

ROOT = Path(__file__).resolve().parents[1]
DEMO_MANIFEST = ROOT / "BraTSEnsembleLib" / "demo" / "models" / "demo-ensemble.json"


def results_folder(parent: Path, name: str, channel_names: dict) -> Path:
    """A results folder as far as its roles go: its dataset.json (the roles function reads nothing else)."""
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": channel_names,
                                                     "labels": {"background": 0, "metastasis": 1}}))
    return folder


def write_manifest(path: Path, members: list) -> Path:
    path.write_text(json.dumps({"name": "set", "members": members}))
    return path


def test_trained_results_folders_and_both_cascade_stages(metastasis_model, trained_cascade):
    assert results_folder_roles(metastasis_model) == ("t1c", "t2f")
    assert needed_roles(str(trained_cascade.cascade)) == ("ct",)
    assert needed_roles(trained_cascade.lowres) == ("ct",)
    # a list: the union, BraTS roles first in BraTS order, the others after them
    assert needed_roles([trained_cascade.cascade, metastasis_model]) == ("t1c", "t2f", "ct")


def test_manifest_members_by_framework(tmp_path):
    brats = results_folder(tmp_path / "models", "brats", {"0": "T2w", "1": "FLAIR", "2": "T1w", "3": "T1Gd"})
    ct = results_folder(tmp_path / "models", "ct", {"0": "CT"})
    assert needed_roles(brats) == ("t1n", "t1c", "t2w", "t2f")  # BraTS order, whatever the channel order
    manifest = write_manifest(tmp_path / "set.json", [
        {"framework": "nnunetv2", "path": "models/ct"},  # relative to the manifest's folder
        {"framework": "umamba", "path": str(brats)},
        {"framework": "torchscript", "path": "net.pt", "channel_roles": ["ADC", "t1c"]},
    ])
    assert manifest_roles(manifest) == ("ct", "t2w", "t2f", "t1n", "t1c", "adc")  # first-seen, channel order
    assert needed_roles(manifest) == ("t1n", "t1c", "t2w", "t2f", "ct", "adc")
    assert needed_roles(write_manifest(tmp_path / "m.json", [
        {"framework": "mednext", "path": "x", "channel_roles": ["t1c"]}])) == ("t1c",)
    # what JSON cannot tell: None ("unknown"; the panel offers the four BraTS roles, the CLI decides)
    assert needed_roles(write_manifest(tmp_path / "mednext.json", [
        {"framework": "nnunetv2", "path": "models/ct"}, {"framework": "mednext", "path": "anything"}])) is None
    assert needed_roles(write_manifest(tmp_path / "url.json", [
        {"framework": "nnunetv2", "path": "not-yet", "url": "https://example.org/m.zip", "sha256": "0" * 64}])) is None
    assert needed_roles(DEMO_MANIFEST) is None  # the shipped demo set has a MedNeXt member without channel_roles


def test_reading_roles_imports_no_torch(tmp_path):
    results_folder(tmp_path, "ct", {"0": "CT"})
    code = ("import sys; from BraTSEnsembleLib.inputroles import needed_roles; "
            f"print(needed_roles({str(tmp_path / 'ct')!r}), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["('ct',)", "False"]


@pytest.mark.parametrize("content, message", [
    (b"{" + b" " * (1 << 20) + b"}", "larger than"),
    (b'{"members": [], "members": [{"framework": "nnunetv2", "path": "x"}]}', "appears twice"),
    (b"[" * 40 + b"]" * 40, "nested 40 levels"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"members": {"framework": "nnunetv2"}}', "non-empty \"members\" list"),
    (b'{"members": ["x"]}', "member 1: must be an object"),
    (b'{"members": [{"framework": "caffe", "path": "x"}]}', "unknown framework"),
    (b'{"members": [{"framework": "nnunetv2", "path": 7}]}', "\"path\" must name"),
    (b'{"members": [{"framework": "nnunetv2", "path": "../../.."}]}', "no dataset.json"),
    (b'{"members": [{"framework": "monai", "path": "n.pt"}]}', "no channel_roles"),
    (b'{"members": [{"framework": "torchscript", "path": "n.pt", "channel_roles": ["T1Gd", "t1c"]}]}',
     "name one role twice"),
])
def test_hostile_manifests_are_refused_naming_the_file(tmp_path, content, message):
    manifest = tmp_path / "hostile.json"
    manifest.write_bytes(content)
    with pytest.raises(ModelError, match="hostile.json") as raised:
        needed_roles(manifest)
    assert message in str(raised.value)


def test_hostile_results_folders_are_refused(tmp_path):
    with pytest.raises(ModelError, match="not a folder"):
        needed_roles(tmp_path / "missing")
    same = results_folder(tmp_path, "same", {"0": "T1Gd", "1": "T1 post contrast"})
    with pytest.raises(ModelError, match="same modality role"):
        needed_roles(same)
    bad = results_folder(tmp_path, "bad", {"0": "CT"})
    (bad / "dataset.json").write_text('{"channel_names": ["CT"]}')
    with pytest.raises(ModelError, match="channel_names must be an object"):
        needed_roles(bad)
    with pytest.raises(ValueError, match="no model given"):
        needed_roles([])


def test_input_file_names_for_brats_and_generic_roles():
    assert process.input_file_name("BraTS-GLI-00001-000", "t1c") == "BraTS-GLI-00001-000-t1c.nii.gz"
    assert process.input_file_name("CTPhantom-00001", "ct") == "CTPhantom-00001-ct.nii.gz"
    assert process.input_file_name("case", "adc") == "case-adc.nii.gz"
    for role in ("CT", "flair", "t1", "seg", "mask", "../ct", "c t", "", "0000", "ct/x", "a" * 40):
        with pytest.raises(ValueError, match="unusable role"):
            process.input_file_name("case", role)
    for case_id in ("../x", "", "a b"):
        with pytest.raises(ValueError, match="unusable case id"):
            process.input_file_name(case_id, "ct")


def test_case_id_reference_role_and_batch_command():
    assert process.case_id_from_names({"ct": "CTPhantom-00001-ct"}) == "CTPhantom-00001"
    assert process.case_id_from_names({"t1c": "Met-7_t1ce", "t2f": "Met-7_flair"}) == "Met-7"
    assert process.reference_role(["t2f", "t1c"]) == "t1c"
    assert process.reference_role(["ct"]) == "ct"
    assert process.reference_role(["adc", "t2f"]) == "t2f"
    args = process.build_batch_command("cohort", "out", ["/m/a"], device="cpu", mirroring=False)
    assert args[:4] == ["brats-ensemble", "batch", "cohort", "-o"] and "--overwrite" not in args
    assert "--no-mirroring" in args and "--progress" in args
    assert "--overwrite" in process.build_batch_command("cohort", "out", "/m/a", overwrite=True)
    assert "--overwrite" in process.build_predict_command("case", "out", "/m/a")  # the module's temp folder
