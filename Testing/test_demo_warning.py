"""Demo models say what they are (docs/bad-input.md, row "Toy models on real scans").

A model set whose manifest says ``"demo": true`` (the shipped demo ensemble does) warns whenever it segments anything
but the shipped demo phantom: on stderr, in the result JSON (``warnings``) and as a ``warning`` progress event, which
the Slicer module shows. Through the real command line, with the shipped demo nnU-Net model (trained on phantoms):
the real BraTS case of ../shared must warn, and so must a phantom that is not the shipped one; a set without the key
never warns. The shipped phantom itself does not warn: it is recognised by its voxels (here in a renamed copy).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from BraTSEnsembleLib import demo
from BraTSEnsembleLib.demo.guard import DEMO_WARNING
from BraTSEnsembleLib.demo.phantom import make_phantom
from BraTSEnsembleLib.modelset import load_model_set

ROOT = Path(__file__).resolve().parents[1]
DEMO_NNUNET = demo.MODELS_DIR / "nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres"


def toy_manifest(folder: Path, is_demo: bool | None) -> Path:
    """A one-member set of the shipped demo nnU-Net model (no mirroring: fast), with or without "demo"."""
    manifest = {"name": "toy-set", "postprocess": "none",
                "members": [{"name": "nnunet", "framework": "nnunetv2", "path": str(DEMO_NNUNET), "folds": [0],
                             "mirroring": False}]}
    if is_demo is not None:
        manifest["demo"] = is_demo
    path = folder / "toy-set.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def predict_json(case_dir: Path, out: Path, manifest: Path) -> tuple[subprocess.CompletedProcess, list[dict], dict]:
    """``predict --model-set --progress json``: (the process, its progress events, the result JSON)."""
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", "predict", str(case_dir), "-o", str(out),
                           "--model-set", str(manifest), "--device", "cpu", "--progress", "json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    result = json.loads(next(out.glob("*.json")).read_text())
    return done, events, result


def test_the_shipped_demo_manifest_declares_itself_a_demo() -> None:
    model_set = load_model_set(demo.MANIFEST)
    assert model_set.demo is True
    assert model_set.describe()["model_set"]["demo"] is True


def test_demo_set_on_the_real_brats_case_warns(real_case: Path, tmp_path: Path) -> None:
    done, events, result = predict_json(real_case, tmp_path / "out", toy_manifest(tmp_path / "set", True))
    expected = f"model set toy-set {DEMO_WARNING}"
    assert result["warnings"] == [expected]
    assert f"warning: {real_case.name}: {expected}" in done.stderr.splitlines()
    assert [e["message"] for e in events if e["event"] == "warning"] == [expected]
    assert result["model_set"]["demo"] is True


@pytest.mark.parametrize("is_demo", [True, None], ids=["demo-set", "other-set"])
def test_a_phantom_that_is_not_the_shipped_one(tmp_path: Path, is_demo: bool | None) -> None:
    """Another phantom (made by the same generator, not shipped) warns with a demo set; a set without "demo" never
    warns."""
    case_dir = make_phantom(9105, shape=(40, 44, 40)).write(tmp_path / "cases", integer_images=True)
    done, events, result = predict_json(case_dir, tmp_path / "out", toy_manifest(tmp_path / "set", is_demo))
    warned = is_demo is True
    assert bool(result["warnings"]) == warned
    assert ("warning:" in done.stderr) == warned
    assert any(e["event"] == "warning" for e in events) == warned


def test_demo_set_on_a_renamed_copy_of_the_shipped_phantom_does_not_warn(tmp_path: Path) -> None:
    case_dir = tmp_path / "copy-of-the-demo-case"
    case_dir.mkdir()
    for role in ("t1n", "t1c", "t2w", "t2f"):
        name = demo.demo_case_info()["files"][role]["file"]
        shutil.copy(demo.CASE_DIR / name, case_dir / name)
    done, events, result = predict_json(case_dir, tmp_path / "out", toy_manifest(tmp_path / "set", True))
    assert result["warnings"] == [] and "warning:" not in done.stderr
    assert not any(e["event"] == "warning" for e in events)
