"""Train a small nnU-Net v2 model whose classes are not BraTS's: a metastasis-like model (build-time tool).

The dataset: multifocal phantoms (2–3 tumours each, see :func:`~BraTSEnsembleLib.demo.phantom.make_phantom`), two
input channels (the contrast-enhanced T1 and FLAIR, named ``T1c`` and ``FLAIR``), and one class, ``metastasis``
(label 1): each tumour with its perilesional oedema, so that a case has one or more separate lesions (oedema of
nearby tumours may merge), the situation that brain-metastasis counting and sizing is about. (The tumour cores alone
are too small for a few CPU epochs to learn.) :func:`metastasis_phantom` makes such a case for any seed. Its ``dataset.json`` labels are ``{"background": 0,
"metastasis": 1}``: the model keeps its own label set (:mod:`BraTSEnsembleLib.labelsets`). Fingerprint, plans,
preprocessing and training are nnU-Net's own, as in :mod:`BraTSEnsembleLib.demo.nnunet_train` (narrowed network,
few CPU epochs).

Run it as a module (nnU-Net reads its folder variables when it is first imported)::

    python -m BraTSEnsembleLib.demo.labelset_train --work /tmp/met --dataset-id 511 --epochs 3

The last line printed is the results folder (``.../nnUNetTrainer__nnUNetPlans__3d_fullres``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .nnunet_train import narrow_plans, set_nnunet_folders, train_fold
from .phantom import make_phantom

CLASS_NAME = "metastasis"
#: dataset.json channel name of each phantom role the model reads, in channel order
CHANNELS: dict[str, str] = {"t1c": "T1c", "t2f": "FLAIR"}
SHAPE: tuple[int, int, int] = (64, 72, 64)


def metastasis_phantom(seed: int, shape: tuple[int, int, int] = SHAPE):
    """A multifocal phantom: the training and test cases of the metastasis-like model."""
    return make_phantom(seed, shape=shape, layout="multifocal")


def write_metastasis_dataset(raw_root: Path, dataset_id: int, name: str, seeds: Sequence[int],
                             shape: tuple[int, int, int], class_name: str = CLASS_NAME) -> Path:
    """Write :func:`metastasis_phantom` cases as a one-channel, one-class nnU-Net raw dataset; return its folder."""
    import SimpleITK as sitk

    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        phantom = metastasis_phantom(seed, shape)
        for channel, role in enumerate(CHANNELS):
            sitk.WriteImage(phantom.to_sitk(phantom.images[role]),
                            str(folder / "imagesTr" / f"{phantom.case_id}_{channel:04d}.nii.gz"))
        lesions = (phantom.labels > 0).astype(np.uint8)  # tumour and oedema
        sitk.WriteImage(phantom.to_sitk(lesions), str(folder / "labelsTr" / f"{phantom.case_id}.nii.gz"))
    dataset = {"channel_names": {str(i): name for i, name in enumerate(CHANNELS.values())},
               "labels": {"background": 0, class_name: 1},
               "numTraining": len(seeds), "file_ending": ".nii.gz", "name": name,
               "description": "Synthetic multifocal phantoms, tumours with oedema as one class (BraTSEnsembleLib.demo."
                              "labelset_train); not patient data."}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def train(work: Path, dataset_id: int, name: str, seeds: Sequence[int], epochs: int, iterations: int, fold: str,
          shape: tuple[int, int, int], base_features: int, max_features: int, seed: int) -> Path:
    """Write, plan, preprocess and train; return the results folder (sets nnU-Net's folder variables)."""
    set_nnunet_folders(work)
    write_metastasis_dataset(work / "raw", dataset_id, name, seeds, shape)

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
    os.environ.setdefault("nnUNet_n_proc_DA", "0")  # single-threaded augmentation (no worker processes)
    return train_fold(plans, load_json(str(preprocessed / "dataset.json")), fold, epochs, iterations, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for nnUNet_raw/preprocessed/results")
    parser.add_argument("--dataset-id", type=int, default=511)
    parser.add_argument("--name", default="Metastases")
    parser.add_argument("--cases", type=int, default=6, help="number of training phantoms")
    parser.add_argument("--seed", type=int, default=5000, help="first phantom seed (and the training seed)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=6, help="training iterations per epoch")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="phantom array shape z,y,x")
    parser.add_argument("--base-features", type=int, default=4)
    parser.add_argument("--max-features", type=int, default=32)
    args = parser.parse_args(argv)
    results = train(args.work.resolve(), args.dataset_id, args.name, list(range(args.seed, args.seed + args.cases)),
                    args.epochs, args.iterations, args.fold,
                    tuple(int(v) for v in args.shape.split(",")),  # type: ignore[arg-type]
                    args.base_features, args.max_features, args.seed)
    print(results, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
