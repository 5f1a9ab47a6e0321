"""Build-time helper of the bench: genuine nnU-Net v2 results folders, planned by nnU-Net's own planners and
initialised (not trained) by nnU-Net's own trainer.

Two architectures: nnU-Net's default plans (``PlainConvUNet``, ``ExperimentPlanner``) and its Residual Encoder M
preset (``ResidualEncoderUNet``, ``nnUNetPlannerResEncM``), both planned on phantoms of the bench's shape and
spacing and narrowed (:func:`BraTSEnsembleLib.demo.nnunet_train.narrow_plans`) so that a CPU can run them. Member
``k`` takes architecture ``k mod 2`` and torch seed ``k``: its weights are nnU-Net's random initialisation, written
with the trainer's own ``save_checkpoint`` as ``fold_0/checkpoint_final.pth`` beside ``plans.json`` and
``dataset.json``, which is what ``nnUNetv2_train`` leaves. Random weights are enough for timing and for comparing
two ways of running the same members; the labels mean nothing clinically.

Run as a script, because nnU-Net reads its folder variables when first imported::

    python bench/nnunet_members.py --work /tmp/bench --shape 64,72,64 --count 3

prints one results folder per line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

#: (planner class, plans name) of each architecture, in the order members take them.
ARCHITECTURES: tuple[tuple[str, str], ...] = (
    ("ExperimentPlanner", "nnUNetPlans"),
    ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
)
DATASET_ID = 990
DATASET_NAME = "BenchPhantoms"
TRAINING_SEEDS = (1001, 1002)  # phantoms the planner's fingerprint is taken from


def plan(work: Path, shape_zyx: tuple[int, int, int], base_features: int, max_features: int) -> dict[str, dict]:
    """Write the phantom dataset, extract its fingerprint, plan and preprocess every architecture (nnU-Net's own
    steps); return the narrowed plans by plans name."""
    from BraTSEnsembleLib.demo.nnunet_train import narrow_plans, set_nnunet_folders, write_raw_dataset
    from BraTSEnsembleLib.demo.phantom import ROLES

    set_nnunet_folders(work)
    write_raw_dataset(work / "raw", DATASET_ID, DATASET_NAME, TRAINING_SEEDS, ROLES, "brats2023", shape_zyx)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)

    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, verbose=False)
    preprocessed = work / "preprocessed" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    plans = {}
    for planner, name in ARCHITECTURES:
        plan_experiments([DATASET_ID], experiment_planner_class_name=planner)
        # the trainer's initialisation looks at the preprocessed folder (its file format), so preprocess too
        preprocess([DATASET_ID], plans_identifier=name, configurations=("3d_fullres",), num_processes=(1,),
                   verbose=False, show_progress_bar=False)
        loaded = json.loads((preprocessed / f"{name}.json").read_text())
        plans[name] = narrow_plans(loaded, "3d_fullres", max_features, base_features)
    return plans


def initialise_member(plans: dict, dataset_json: dict, seed: int, target: Path) -> Path:
    """One results folder ``target/nnUNetTrainer__<plans>__3d_fullres`` with nnU-Net's random initialisation."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(seed)
    trainer = nnUNetTrainer({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json,
                            device=torch.device("cpu"))
    trainer.initialize()
    folder = target / f"nnUNetTrainer__{plans['plans_name']}__3d_fullres"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    shutil.rmtree(trainer.output_folder_base, ignore_errors=True)  # the trainer's own (empty) log folder
    return folder


def build(work: Path, shape_zyx: tuple[int, int, int], count: int, base_features: int = 8,
          max_features: int = 64) -> list[Path]:
    """``count`` member folders under ``work/members`` (architectures alternating, each its own seed)."""
    plans = plan(work, shape_zyx, base_features, max_features)
    raw = work / "raw" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    dataset_json = json.loads((raw / "dataset.json").read_text())
    os.environ.setdefault("nnUNet_compile", "false")
    folders = []
    for k in range(count):
        _, name = ARCHITECTURES[k % len(ARCHITECTURES)]
        folders.append(initialise_member(plans[name], dataset_json, seed=k, target=work / "members" / f"m{k}"))
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shape", default="64,72,64", help="phantom array shape z,y,x (1 mm voxels)")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--base-features", type=int, default=8)
    parser.add_argument("--max-features", type=int, default=64)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    folders = build(args.work.resolve(), shape, args.count, args.base_features, args.max_features)  # type: ignore[arg-type]
    for folder in folders:
        print(folder, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
