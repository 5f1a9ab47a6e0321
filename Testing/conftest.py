"""Shared fixtures: real nnU-Net v2 models trained here on phantoms, phantom cases, and the real BraTS case.

The models are built once per test session by ``python -m BraTSEnsembleLib.demo.nnunet_train`` (nnU-Net's own
planner, preprocessor and trainer, a few CPU epochs). Set ``BRATS_ENSEMBLE_MODEL_CACHE=DIR`` to keep them between
sessions on a developer machine; the cache key is a hash of the code that builds them, so a change rebuilds them.
CI always builds them fresh.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_REAL_CASE = ROOT.parent / "shared" / "data" / "real" / "BraTS-GLI-00001-000"

# name → (dataset id, channel order, channel naming style, folds, first training seed, extra training options)
MODEL_SPECS: dict[str, tuple[int, str, str, str, int, tuple[str, ...]]] = {
    # BraTS 2023 channel names in BraTS order, two folds (fold averaging is exercised)
    "A": (501, "t1n,t1c,t2w,t2f", "brats2023", "0,1", 1000, ()),
    # other names (T1w, t1gd, T2w, FLAIR) in another order: role mapping must follow dataset.json
    "B": (502, "t2f,t1c,t1n,t2w", "msd", "0", 2000, ()),
    # region-based (sigmoid heads WT, TC, ET; nnU-Net's Dataset137 labels 1 ED, 2 NCR, 3 ET), a few more epochs
    "R": (503, "t1n,t1c,t2w,t2f", "brats2023", "0", 3000, ("--regions", "--epochs", "5")),
}


@dataclass(frozen=True)
class TrainedModel:
    name: str
    path: Path  # the results folder Trainer__Plans__configuration
    channel_order: tuple[str, ...]


def _builder_hash() -> str:
    digest = hashlib.sha256()
    for part in ("BraTSEnsembleLib/demo/nnunet_train.py", "BraTSEnsembleLib/demo/phantom.py"):
        digest.update((ROOT / part).read_bytes())
    digest.update(repr(MODEL_SPECS).encode())
    return digest.hexdigest()[:16]


def _train(work: Path, name: str) -> Path:
    dataset_id, order, style, folds, seed, extra = MODEL_SPECS[name]
    command = [sys.executable, "-m", "BraTSEnsembleLib.demo.nnunet_train", "--work", str(work),
               "--dataset-id", str(dataset_id), "--name", f"Phantoms{name}", "--channel-order", order,
               "--channel-style", style, "--fold", folds, "--seed", str(seed), "--epochs", "3",
               "--iterations", "6", "--cases", "6", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training model {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainedModel]:
    """Model name → trained nnU-Net v2 results folder (see MODEL_SPECS)."""
    cache_root = os.environ.get("BRATS_ENSEMBLE_MODEL_CACHE")
    base = Path(cache_root) / _builder_hash() if cache_root else tmp_path_factory.mktemp("nnunet")
    models = {}
    for name, spec in MODEL_SPECS.items():
        marker = base / f"{name}.path"
        if marker.is_file() and Path(marker.read_text()).is_dir():
            path = Path(marker.read_text())
        else:
            work = base / f"work{name}"
            shutil.rmtree(work, ignore_errors=True)
            path = _train(work, name)
            marker.write_text(str(path))
        models[name] = TrainedModel(name, path, tuple(spec[1].split(",")))
    return models


@pytest.fixture(scope="session")
def metastasis_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained nnU-Net v2 model with its own label set: one input channel (T1c) and one class, "metastasis"
    (``python -m BraTSEnsembleLib.demo.labelset_train``). Cached like ``trained_models``, under its own key."""
    digest = hashlib.sha256()
    for part in ("BraTSEnsembleLib/demo/labelset_train.py", "BraTSEnsembleLib/demo/nnunet_train.py",
                 "BraTSEnsembleLib/demo/phantom.py"):
        digest.update((ROOT / part).read_bytes())
    cache_root = os.environ.get("BRATS_ENSEMBLE_MODEL_CACHE")
    base = (Path(cache_root) / f"labelset-{digest.hexdigest()[:16]}" if cache_root
            else tmp_path_factory.mktemp("labelset"))
    marker = base / "M.path"
    if marker.is_file() and Path(marker.read_text()).is_dir():
        return Path(marker.read_text())
    work = base / "workM"
    shutil.rmtree(work, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.demo.labelset_train", "--work", str(work),
                           "--epochs", "3", "--iterations", "6", "--cases", "6"], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training the metastasis model failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    path = Path(done.stdout.strip().splitlines()[-1])
    base.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(path))
    return path


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cohort folder of three phantom cases (seeds never used for training) in BraTS 2023 naming."""
    from BraTSEnsembleLib.demo.phantom import make_phantom

    cohort = tmp_path_factory.mktemp("cohort")
    for seed in (9001, 9002, 9003):
        make_phantom(seed).write(cohort)
    return cohort


@pytest.fixture(scope="session")
def real_case() -> Path:
    """The real BraTS 2023 case from ../shared (read in place, never copied into the repository)."""
    if not SHARED_REAL_CASE.is_dir():
        pytest.skip(f"the real BraTS case is not available at {SHARED_REAL_CASE} (../shared is absent)")
    return SHARED_REAL_CASE


# The CT metastasis cascade (3d_lowres → 3d_cascade_fullres), trained by BraTSEnsembleLib.demo.cascade_train with its
# defaults (nnU-Net's own planner with a small memory target, 6 phantoms, fold "all"); dataset id and its options.
CASCADE_DATASET_ID = 601
CASCADE_OPTIONS: tuple[str, ...] = ("--dataset-id", str(CASCADE_DATASET_ID), "--name", "CTMetastases", "--seed", "600")


@dataclass(frozen=True)
class TrainedCascade:
    cascade: Path  # …/nnUNetTrainer__nnUNetPlans__3d_cascade_fullres
    lowres: Path  # …/nnUNetTrainer__nnUNetPlans__3d_lowres, beside it
    work: Path  # holds raw/, preprocessed/ and results/ (nnU-Net's folder variables, for nnUNetv2_predict -d)
    dataset_id: int


def _cascade_hash() -> str:
    digest = hashlib.sha256()
    for part in ("cascade_train.py", "ct_phantom.py", "nnunet_train.py"):
        digest.update((ROOT / "BraTSEnsembleLib" / "demo" / part).read_bytes())
    digest.update(repr(CASCADE_OPTIONS).encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_cascade(tmp_path_factory: pytest.TempPathFactory) -> TrainedCascade:
    """A genuine nnU-Net v2 cascade trained here on CT phantoms (one channel "CT", one label "metastasis")."""
    cache_root = os.environ.get("BRATS_ENSEMBLE_MODEL_CACHE")
    base = Path(cache_root) / f"cascade-{_cascade_hash()}" if cache_root else tmp_path_factory.mktemp("cascade")
    marker = base / "cascade.path"
    if marker.is_file() and Path(marker.read_text()).is_dir():
        cascade = Path(marker.read_text())
    else:
        work = base / "work"
        shutil.rmtree(work, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.demo.cascade_train", "--work", str(work),
                               *CASCADE_OPTIONS], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"training the cascade failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        cascade = Path(done.stdout.strip().splitlines()[-1])
        marker.write_text(str(cascade))
    lowres = cascade.parent / cascade.name.replace("3d_cascade_fullres", "3d_lowres")
    return TrainedCascade(cascade, lowres, cascade.parents[2], CASCADE_DATASET_ID)
