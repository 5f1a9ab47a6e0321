"""Train a small, genuine nnU-Net v2 cascade (``3d_lowres`` → ``3d_cascade_fullres``) on CT phantoms with metastases.

Build-time tooling for the test suite (like :mod:`BraTSEnsembleLib.demo.nnunet_train`): a real ``nnUNet_raw``
dataset of single-channel head CTs (``dataset.json`` channel ``"CT"``, labels ``{"background": 0, "metastasis":
1}``; see :mod:`BraTSEnsembleLib.demo.ct_phantom`), planned by nnU-Net's own planner, preprocessed by its own
preprocessor and trained by ``nnUNetTrainer`` itself, as ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train``
would do it:

1. nnU-Net plans a ``3d_lowres`` configuration only when the image is large compared with the patch that fits the
   GPU memory target. The phantoms are small, so the planner is given a small memory target (the documented
   ``-gpu_memory_target`` option): its patch then covers a small part of the image and it plans ``3d_lowres``,
   ``3d_fullres`` and ``3d_cascade_fullres`` by itself. The planned networks are then narrowed (fewer features
   per stage, :func:`~BraTSEnsembleLib.demo.nnunet_train.narrow_plans`) so that a few CPU epochs suffice.
2. ``3d_lowres`` is trained; its final validation writes the low-resolution predictions of its validation cases
   resampled for the next stage (``predicted_next_stage/3d_cascade_fullres``), as nnU-Net does for every cascade.
3. ``3d_cascade_fullres`` is trained on the full-resolution data with those predictions as extra one-hot inputs.

Both stages are trained on fold ``all`` (every case is then also a validation case, so the lowres stage predicts
every case for the next stage; a numbered fold would need all five lowres folds first). Run it as a module,
because nnU-Net reads its folder variables when it is first imported::

    python -m BraTSEnsembleLib.demo.cascade_train --work /tmp/cascade --dataset-id 601

The last line printed is the ``3d_cascade_fullres`` results folder; ``3d_lowres`` lies beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .ct_phantom import make_ct_phantom
from .nnunet_train import narrow_plans, resolve_training_device, set_nnunet_folders

LOWRES, CASCADE, FULLRES = "3d_lowres", "3d_cascade_fullres", "3d_fullres"
CT_DATASET_LABELS: dict[str, int] = {"background": 0, "metastasis": 1}


def write_ct_dataset(raw_root: Path, dataset_id: int, name: str, seeds: Sequence[int], shape: tuple[int, int, int],
                     spacing: tuple[float, float, float]) -> Path:
    """Write CT phantoms as an nnU-Net raw dataset (``imagesTr/<id>_0000``, ``labelsTr``, ``dataset.json``)."""
    import SimpleITK as sitk

    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        phantom = make_ct_phantom(seed, shape=shape, spacing=spacing)
        sitk.WriteImage(phantom.to_sitk(phantom.image), str(folder / "imagesTr" / f"{phantom.case_id}_0000.nii.gz"))
        sitk.WriteImage(phantom.to_sitk(phantom.labels), str(folder / "labelsTr" / f"{phantom.case_id}.nii.gz"))
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": CT_DATASET_LABELS,
        "numTraining": len(seeds),
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Synthetic head CTs with metastases (BraTSEnsembleLib.demo.ct_phantom); not patient data.",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def plan_and_preprocess_cascade(work: Path, dataset_id: int, name: str, seeds: Sequence[int],
                                shape: tuple[int, int, int], spacing: tuple[float, float, float],
                                gpu_memory_gb: float, base_features: int, max_features: int) -> tuple[dict, dict]:
    """Write the CT dataset, run nnU-Net's fingerprint extraction, planner (with ``gpu_memory_gb`` as its memory
    target) and the ``3d_lowres``/``3d_fullres`` preprocessing; narrow both networks. Returns ``(plans,
    dataset_json)``. Raises SystemExit when the planner did not plan a cascade (images too small for the target)."""
    set_nnunet_folders(work)
    write_ct_dataset(work / "raw", dataset_id, name, seeds, shape, spacing)

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)

    torch.manual_seed(0)
    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([dataset_id], gpu_memory_target_in_gb=gpu_memory_gb)
    preprocessed = work / "preprocessed" / f"Dataset{dataset_id:03d}_{name}"
    plans_file = preprocessed / "nnUNetPlans.json"
    plans = load_json(str(plans_file))
    if CASCADE not in plans["configurations"]:
        raise SystemExit(f"nnU-Net planned no cascade for images of shape {shape} with a {gpu_memory_gb} GB memory "
                         f"target (configurations: {', '.join(plans['configurations'])}); use larger images or a "
                         "smaller --gpu-memory")
    preprocess([dataset_id], configurations=(LOWRES, FULLRES), num_processes=(1, 1), verbose=False)
    for configuration in (LOWRES, FULLRES):  # 3d_cascade_fullres inherits 3d_fullres's network
        plans = narrow_plans(plans, configuration, max_features, base_features)
    save_json(plans, str(plans_file), sort_keys=False)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")  # single-threaded augmentation (set after planning)
    return plans, load_json(str(preprocessed / "dataset.json"))


def train_stage(plans: dict, dataset_json: dict, configuration: str, epochs: int, iterations: int, seed: int,
                device: str = "cpu", validate: bool = True) -> Path:
    """Train one configuration on fold ``all`` with ``nnUNetTrainer`` (seeded) and return its results folder.

    ``validate`` runs nnU-Net's final validation, as ``nnUNetv2_train`` does (for ``3d_lowres`` it also writes the
    next stage's inputs); without it the results folder holds everything inference needs, only no scores."""
    import random

    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    trainer = nnUNetTrainer({**plans, "continue_training": False}, configuration, "all", dataset_json,
                            device=torch.device(resolve_training_device(device)))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = max(1, iterations // 4)
    trainer.run_training()
    if validate:
        trainer.perform_actual_validation()
    return Path(trainer.output_folder_base)


def train_cascade(work: Path, dataset_id: int, name: str, seeds: Sequence[int], shape: tuple[int, int, int],
                  spacing: tuple[float, float, float], gpu_memory_gb: float, epochs: tuple[int, int], iterations: int,
                  base_features: int, max_features: int, device: str = "cpu") -> Path:
    """Plan, preprocess, train ``3d_lowres`` then ``3d_cascade_fullres`` (``epochs`` of each); return the
    cascade's results folder."""
    plans, dataset_json = plan_and_preprocess_cascade(work, dataset_id, name, seeds, shape, spacing, gpu_memory_gb,
                                                      base_features, max_features)
    lowres = train_stage(plans, dataset_json, LOWRES, epochs[0], iterations, seed=1, device=device)
    next_stage = lowres / "predicted_next_stage" / CASCADE
    if not any(next_stage.glob("*")):
        raise SystemExit(f"{next_stage}: the {LOWRES} validation wrote no predictions for the next stage")
    # the cascade stage's own validation would only score the training (not needed here, and its sliding window
    # over every full-resolution case is the slowest step on a CPU)
    return train_stage(plans, dataset_json, CASCADE, epochs[1], iterations, seed=2, device=device, validate=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for nnUNet_raw/preprocessed/results")
    parser.add_argument("--dataset-id", type=int, default=601)
    parser.add_argument("--name", default="CTMetastases")
    parser.add_argument("--cases", type=int, default=6, help="number of training phantoms")
    parser.add_argument("--seed", type=int, default=600, help="first phantom seed")
    parser.add_argument("--shape", default="48,64,64", help="phantom array shape z,y,x")
    parser.add_argument("--spacing", default="2,2,2", help="voxel size x,y,z in mm")
    parser.add_argument("--gpu-memory", type=float, default=0.05,
                        help="the planner's GPU memory target in GB (small: small patches, hence a cascade)")
    parser.add_argument("--epochs", type=int, default=24,
                        help="epochs of 3d_lowres (its lesions appear after about 300-400 iterations)")
    parser.add_argument("--cascade-epochs", type=int, default=10,
                        help="epochs of 3d_cascade_fullres (it starts from the 3d_lowres segmentation)")
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--base-features", type=int, default=4)
    parser.add_argument("--max-features", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args(argv)
    os.environ.setdefault("nnUNet_def_n_proc", "1")  # nnU-Net's export pools: one worker (read at import)
    if args.device == "cpu":
        import torch

        # one thread: the tiny networks gain nothing from more, and on a busy machine idle threads spin-wait (a
        # training step then costs 25 times the CPU time)
        torch.set_num_threads(1)
    results = train_cascade(args.work.resolve(), args.dataset_id, args.name,
                            list(range(args.seed, args.seed + args.cases)),
                            tuple(int(v) for v in args.shape.split(",")),  # type: ignore[arg-type]
                            tuple(float(v) for v in args.spacing.split(",")),  # type: ignore[arg-type]
                            args.gpu_memory, (args.epochs, args.cascade_epochs), args.iterations,
                            args.base_features, args.max_features,
                            args.device)
    print(results, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
