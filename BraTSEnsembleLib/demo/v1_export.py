"""Write a MedNeXt model trained in nnU-Net v2's loop as the nnU-Net v1 model folder the official trainer writes.

The official MedNeXt trainers (``nnUNetTrainerV2_MedNeXt_*`` of MIC-DKFZ/MedNeXt) are nnU-Net v1 trainers; their
model folders are ``<trainer>__<plans identifier>/`` with

* ``plans.pkl`` — v1 plans: ``plans_per_stage[stage]`` (patch size, ``current_spacing``), ``num_modalities``,
  ``modalities``, ``normalization_schemes``, ``use_mask_for_norm``, ``transpose_forward``/``_backward``,
  ``num_classes`` (foreground only), ``all_classes``, ``preprocessor_name`` …;
* ``fold_N/model_final_checkpoint.model`` — a torch dict ``epoch``, ``state_dict``, ``optimizer_state_dict``,
  ``lr_scheduler_state_dict``, ``plot_stuff`` (training/validation loss and metric curves), ``best_stuff``;
* ``fold_N/model_final_checkpoint.model.pkl`` — ``{init, name, class, plans}`` (the trainer's init arguments, its
  name and class, the plans).

:func:`write_mednext_v1_folder` fills these from a v2 results folder trained by
:class:`~BraTSEnsembleLib.demo.trainers.nnUNetTrainerV2_MedNeXt_S_kernel3`: the weights are the trained ones (the
optimiser state, needed only to resume training, is left out as ``None``, which v1 accepts), the curves are the v2
trainer's log, and the plans describe v2's preprocessing of that training (crop to the nonzero box, resampling to
the planned spacing, z-score inside the mask), which is what v1's ``GenericPreprocessor`` does with these settings.
:class:`~BraTSEnsembleLib.members.mednext.MedNeXtMember` then reads the folder exactly as it reads an official one.
Pickles use plain containers and numpy values only.
"""
from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..labels import LABEL_NAMES

V1_PREPROCESSOR = "GenericPreprocessor"


def v1_plans_identifier(spacing: tuple[float, ...]) -> str:
    """The plans identifier nnU-Net v1's custom-target-spacing planner gives, e.g. ``nnUNetPlansv2.1_trgSp_2x2x2``
    (the official MedNeXt models use ``…_trgSp_1x1x1``)."""
    return "nnUNetPlansv2.1_trgSp_" + "x".join(f"{s:g}" for s in spacing)


def v1_plans_from_v2(plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration: str = "3d_fullres",
                     base_num_features: int = 32) -> dict[str, Any]:
    """nnU-Net v1 plans (one stage) that describe the preprocessing of ``configuration`` of v2 ``plans``.

    Channel names and classes come from ``dataset_json`` (a label-based dataset whose label values are the BraTS
    2023 labels 1..n, as the demo's). Raises ValueError for anything v1 plans cannot express here (region-based
    labels, a normalisation other than z-score).
    """
    config = plans["configurations"][configuration]
    labels = {name: value for name, value in dataset_json["labels"].items() if name != "background"}
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise ValueError("region-based datasets cannot be written as nnU-Net v1 plans")
    classes = sorted(int(v) for v in labels.values())
    if classes != list(range(1, len(classes) + 1)) or any(c not in LABEL_NAMES for c in classes):
        raise ValueError(f"labels {classes} are not BraTS labels 1..n")
    schemes = list(config["normalization_schemes"])
    if any(s != "ZScoreNormalization" for s in schemes):
        raise ValueError(f"only z-score normalisation has a v1 equivalent ('nonCT'), not {schemes}")
    channels = {int(k): str(v) for k, v in dataset_json["channel_names"].items()}
    arch = config["architecture"]["arch_kwargs"]
    stage = {
        "batch_size": int(config["batch_size"]),
        "num_pool_per_axis": [len(arch["strides"]) - 1] * 3,
        "patch_size": np.array(config["patch_size"], dtype=np.int64),
        "median_patient_size_in_voxels": np.array(config["median_image_size_in_voxels"], dtype=np.int64),
        "current_spacing": np.array(config["spacing"], dtype=np.float64),
        "original_spacing": np.array(config["spacing"], dtype=np.float64),
        "do_dummy_2D_data_aug": False,
        "pool_op_kernel_sizes": [[int(v) for v in s] for s in arch["strides"][1:]],
        "conv_kernel_sizes": [[int(v) for v in k] for k in arch["kernel_sizes"]],
    }
    return {
        "num_stages": 1,
        "num_modalities": len(channels),
        "modalities": channels,
        "normalization_schemes": OrderedDict((c, "nonCT") for c in range(len(channels))),
        "use_mask_for_norm": OrderedDict((c, bool(m)) for c, m in enumerate(config["use_mask_for_norm"])),
        "dataset_properties": {"modalities": channels, "all_classes": classes, "intensityproperties": None},
        "num_classes": len(classes),
        "all_classes": classes,
        "base_num_features": int(base_num_features),
        "keep_only_largest_region": None,
        "min_region_size_per_class": None,
        "min_size_per_class": None,
        "transpose_forward": [int(v) for v in plans["transpose_forward"]],
        "transpose_backward": [int(v) for v in plans["transpose_backward"]],
        "data_identifier": "nnUNetData_plans_v2.1_trgSp_" + "x".join(f"{s:g}" for s in config["spacing"]),
        "plans_per_stage": {0: stage},
        "preprocessor_name": V1_PREPROCESSOR,
        "conv_per_stage": 2,
    }


def v1_checkpoint_from_v2(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The v1 ``.model`` dict with the weights, epoch and curves of a v2 ``checkpoint_final.pth``.

    ``plot_stuff`` is v1's (train losses, validation losses, validation losses in train mode, validation metric)
    from the v2 log (``train_losses``, ``val_losses``, ``mean_fg_dice``); ``best_stuff`` is (epoch of the lowest
    train loss, that loss, best EMA pseudo-Dice)."""
    logging = checkpoint.get("logging") or {}
    train_losses = [float(v) for v in logging.get("train_losses", [])]
    val_losses = [float(v) for v in logging.get("val_losses", [])]
    metric = [float(v) for v in logging.get("mean_fg_dice", [])]
    ema = [float(v) for v in logging.get("ema_fg_dice", [])]
    best_epoch = int(np.argmin(train_losses)) if train_losses else 0
    return {
        "epoch": int(checkpoint["current_epoch"]),
        "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in checkpoint["network_weights"].items()),
        "optimizer_state_dict": None,  # only needed to resume training (v1 then skips it); keeps the file small
        "lr_scheduler_state_dict": None,
        "plot_stuff": (train_losses, val_losses, [], metric),
        "best_stuff": (best_epoch, train_losses[best_epoch] if train_losses else None, max(ema) if ema else None),
    }


def write_mednext_v1_folder(v2_results: Path, target_parent: Path, trainer_name: str, fold: int = 0,
                            base_num_features: int = 32) -> Path:
    """Write ``target_parent/<trainer_name>__<plans identifier>/`` (plans.pkl, fold_N/model_final_checkpoint.model
    and .model.pkl) from the v2 results folder ``v2_results`` (plans.json, dataset.json, fold_N/checkpoint_final.pth
    of a MedNeXt trained with nnU-Net v2); returns the folder."""
    plans = json.loads((v2_results / "plans.json").read_text())
    dataset_json = json.loads((v2_results / "dataset.json").read_text())
    v1_plans = v1_plans_from_v2(plans, dataset_json, base_num_features=base_num_features)
    spacing = tuple(float(s) for s in v1_plans["plans_per_stage"][0]["current_spacing"])
    folder = target_parent / f"{trainer_name}__{v1_plans_identifier(spacing)}"
    fold_dir = folder / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    (folder / "plans.pkl").write_bytes(pickle.dumps(v1_plans))

    # our own training's checkpoint, written moments ago: full unpickling is safe here
    source = torch.load(v2_results / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    model_path = fold_dir / "model_final_checkpoint.model"
    torch.save(v1_checkpoint_from_v2(source), model_path)
    # v1 trainer init arguments: plans_file, fold, output_folder, dataset_directory, batch_dice, stage, unpack_data,
    # deterministic, fp16 (relative paths: the folder is meant to be moved).
    init = ("plans.pkl", fold, folder.name, v1_plans["data_identifier"], False, 0, True, True, False)
    info = OrderedDict(init=init, name=trainer_name, plans=v1_plans)
    info["class"] = f"<class 'BraTSEnsembleLib.demo.trainers.{trainer_name}'>"
    model_path.with_name(model_path.name + ".pkl").write_bytes(pickle.dumps(info))
    return folder
