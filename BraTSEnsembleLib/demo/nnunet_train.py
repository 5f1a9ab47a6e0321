"""Train a small, real nnU-Net v2 model on phantoms with nnU-Net's own planner, preprocessor and trainer.

Used by the test suite and by ``make demo`` to build genuine nnU-Net v2 results folders here (no BraTS weights can be
downloaded). The dataset is a real ``nnUNet_raw`` dataset, planned and preprocessed by nnU-Net; the plans' network is
narrowed (fewer features per stage) so that a few CPU epochs are enough; the training is ``nnUNetTrainer`` itself
with fewer epochs and iterations. The results folder is exactly what ``nnUNetv2_train`` writes.

``--regions`` makes a region-based dataset instead, as nnU-Net's own BraTS conversion (Dataset137) does: labels
remapped to 1 = ED (SNFH), 2 = NCR (NETC), 3 = ET and ``dataset.json`` labels ``{"background": 0, "whole tumor":
[1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}`` with ``regions_class_order`` [1, 2, 3]. nnU-Net's trainer
then trains three sigmoid heads (WT, TC, ET) with its region loss and augmentation, natively.

Run it as a module, because nnU-Net reads its folder variables when it is first imported::

    python -m BraTSEnsembleLib.demo.nnunet_train --work /tmp/nn --dataset-id 501 --epochs 2

The last line printed is the results folder (``.../nnUNetTrainer__nnUNetPlans__3d_fullres``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from .phantom import ROLES, make_phantom

# Names the dataset.json uses per role; varied by --channel-style to exercise role mapping by name.
CHANNEL_STYLES: dict[str, dict[str, str]] = {
    "brats2023": {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f"},
    "msd": {"t1n": "T1w", "t1c": "t1gd", "t2w": "T2w", "t2f": "FLAIR"},
}

#: Region-based datasets (``--regions``) use nnU-Net's Dataset137 values: canonical label → value in labelsTr.
REGION_DATASET_VALUES: dict[int, int] = {0: 0, 1: 2, 2: 1, 3: 3}  # NETC → 2 (NCR), SNFH → 1 (ED), ET → 3
REGION_DATASET_LABELS: dict = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
REGION_CLASS_ORDER: list[int] = [1, 2, 3]


def write_raw_dataset(raw_root: Path, dataset_id: int, name: str, seeds: Sequence[int],
                      channel_order: Sequence[str], channel_style: str, shape: tuple[int, int, int],
                      regions: bool = False, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                      layouts: Mapping[int, str] | None = None) -> Path:
    """Write phantoms as an nnU-Net raw dataset (imagesTr, labelsTr, dataset.json) and return its folder.

    With ``regions`` the dataset is region-based in nnU-Net's Dataset137 convention (see the module docstring).
    ``spacing`` (x, y, z mm) is the phantoms' voxel size and ``layouts`` the tumour layout of a seed (default
    ``standard``; see :func:`~BraTSEnsembleLib.demo.phantom.make_phantom`)."""
    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    import SimpleITK as sitk

    for seed in seeds:
        phantom = make_phantom(seed, shape=shape, spacing=spacing, layout=(layouts or {}).get(seed, "standard"))
        for channel, role in enumerate(channel_order):
            sitk.WriteImage(phantom.to_sitk(phantom.images[role]),
                            str(folder / "imagesTr" / f"{phantom.case_id}_{channel:04d}.nii.gz"))
        labels = phantom.labels
        if regions:
            from ..labels import remap

            labels = remap(labels, REGION_DATASET_VALUES)
        sitk.WriteImage(phantom.to_sitk(labels), str(folder / "labelsTr" / f"{phantom.case_id}.nii.gz"))
    names = CHANNEL_STYLES[channel_style]
    dataset = {
        "channel_names": {str(i): names[role] for i, role in enumerate(channel_order)},
        "labels": REGION_DATASET_LABELS if regions else {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3},
        "numTraining": len(seeds),
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Synthetic BraTS-like phantoms (BraTSEnsembleLib.demo.phantom); not patient data.",
    }
    if regions:
        dataset["regions_class_order"] = REGION_CLASS_ORDER
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def narrow_plans(plans: dict, configuration: str, max_features: int, base_features: int) -> dict:
    """Make the planned network narrow: features per stage base·2^s capped at ``max_features``."""
    arch = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(base_features * 2**s, max_features) for s in range(arch["n_stages"])]
    return plans


def set_nnunet_folders(work: Path) -> None:
    """Point nnU-Net's folder variables at ``work/raw``, ``work/preprocessed`` and ``work/results`` (created).

    nnU-Net reads them when ``nnunetv2`` is first imported, so call this before importing it."""
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[var] = str(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)


def plan_and_preprocess(work: Path, dataset_id: int, name: str, seeds: Sequence[int], channel_order: Sequence[str],
                        channel_style: str, shape: tuple[int, int, int], base_features: int, max_features: int,
                        regions: bool = False, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                        layouts: Mapping[int, str] | None = None) -> tuple[dict, dict]:
    """Write the phantom dataset, run nnU-Net's fingerprint extraction, planner and 3d_fullres preprocessing, narrow
    the planned network; return ``(plans, dataset_json)`` as the trainer takes them."""
    set_nnunet_folders(work)
    write_raw_dataset(work / "raw", dataset_id, name, seeds, channel_order, channel_style, shape, regions, spacing,
                      layouts)

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)

    torch.manual_seed(0)
    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(1,), verbose=False)

    preprocessed = work / "preprocessed" / f"Dataset{dataset_id:03d}_{name}"
    plans_file = preprocessed / "nnUNetPlans.json"
    plans = narrow_plans(load_json(str(plans_file)), "3d_fullres", max_features, base_features)
    save_json(plans, str(plans_file), sort_keys=False)
    # Single-threaded augmentation (no worker processes); set only now, the planner needs a positive value.
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    return plans, load_json(str(preprocessed / "dataset.json"))


def resolve_training_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; any other value is returned as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def train_fold(plans: dict, dataset_json: dict, fold: str, epochs: int, iterations: int,
               trainer_class: type | None = None, seed: int | None = None, resumable: bool = False,
               device: str = "cpu") -> Path:
    """Train one fold ('0', '1' … or 'all') on ``device`` (``cpu``, ``cuda``, or ``auto``: CUDA when torch sees
    a GPU) with ``trainer_class`` (default ``nnUNetTrainer``) for ``epochs`` × ``iterations``; return the results
    folder. ``seed`` seeds torch, numpy and random first (nnU-Net's
    single-threaded data loading and augmentation draw from those), so a run is repeatable.

    ``resumable``: nnU-Net writes ``checkpoint_latest.pth`` after every epoch (instead of every 50), and a
    ``checkpoint_latest.pth`` left by an interrupted run is continued from with nnU-Net's own ``load_checkpoint``
    (the continued run is then not bit-identical to an uninterrupted one: the random streams restart)."""
    import torch

    if trainer_class is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_class
    if seed is not None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    # what nnunetv2.run.run_training passes for a fresh training (the trainer pops it from the dict)
    fold_plans = {**plans, "continue_training": False}
    trainer = trainer_class(fold_plans, "3d_fullres", fold if fold == "all" else int(fold), dataset_json,
                            device=torch.device(resolve_training_device(device)))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = max(1, iterations // 4)
    if resumable:
        trainer.save_every = 1
        latest = Path(trainer.output_folder) / "checkpoint_latest.pth"
        if latest.is_file():
            trainer.load_checkpoint(str(latest))
            print(f"continuing from {latest} (epoch {trainer.current_epoch})", flush=True)
    trainer.run_training()
    return Path(trainer.output_folder_base)


def train(work: Path, dataset_id: int, name: str, seeds: Sequence[int], epochs: int, iterations: int,
          folds: Sequence[str], channel_order: Sequence[str], channel_style: str, shape: tuple[int, int, int],
          base_features: int, max_features: int, regions: bool = False) -> Path:
    """Plan, preprocess and train; return the results folder. Sets nnU-Net's folder variables for this process."""
    plans, dataset_json = plan_and_preprocess(work, dataset_id, name, seeds, channel_order, channel_style, shape,
                                              base_features, max_features, regions)
    results = None
    for one_fold in folds:
        results = train_fold(plans, dataset_json, one_fold, epochs, iterations)
    assert results is not None, "no fold to train"
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for nnUNet_raw/preprocessed/results")
    parser.add_argument("--dataset-id", type=int, default=501)
    parser.add_argument("--name", default="Phantoms")
    parser.add_argument("--cases", type=int, default=6, help="number of training phantoms")
    parser.add_argument("--seed", type=int, default=1000, help="first phantom seed")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=8, help="training iterations per epoch")
    parser.add_argument("--fold", default="0", help="fold(s) to train, comma-separated (e.g. 0,1 or all)")
    parser.add_argument("--channel-order", default="t1n,t1c,t2w,t2f")
    parser.add_argument("--channel-style", choices=sorted(CHANNEL_STYLES), default="brats2023")
    parser.add_argument("--shape", default="64,72,64", help="phantom array shape z,y,x")
    parser.add_argument("--base-features", type=int, default=4)
    parser.add_argument("--max-features", type=int, default=32)
    parser.add_argument("--regions", action="store_true",
                        help="region-based dataset (WT, TC, ET sigmoid heads; nnU-Net's Dataset137 label values)")
    args = parser.parse_args(argv)
    order = args.channel_order.split(",")
    if sorted(order) != sorted(ROLES):
        parser.error(f"--channel-order must be a permutation of {','.join(ROLES)}")
    results = train(args.work.resolve(), args.dataset_id, args.name,
                    list(range(args.seed, args.seed + args.cases)), args.epochs, args.iterations, args.fold.split(","), order,
                    args.channel_style, tuple(int(v) for v in args.shape.split(",")),  # type: ignore[arg-type]
                    args.base_features, args.max_features, args.regions)
    print(results, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
