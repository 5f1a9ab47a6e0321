"""nnU-Net v2 cascades (``3d_lowres`` → ``3d_cascade_fullres``): which stage a results folder is, where its first
stage lies, and whether the two stages belong together.

A cascade's second stage is a configuration whose plans name a ``previous_stage``; its network takes the image
channels plus one one-hot channel per foreground label of the first stage's segmentation. nnU-Net runs it as two
commands: ``nnUNetv2_predict -c 3d_lowres`` writes the low-resolution segmentation, and ``nnUNetv2_predict -c
3d_cascade_fullres -prev_stage_predictions FOLDER`` reads it back; its preprocessor crops and resamples it with the
images and the predictor appends the one-hot channels. :class:`~BraTSEnsembleLib.members.nnunet.NnUNetMember`
does the same in memory: the second stage holds the first as a member of its own and hands its segmentation to
nnU-Net's predictor (``segmentation_previous_stage``, the same preprocessing path), as the array nnU-Net would read
back from the file it wrote (:func:`as_read_back`).

nnU-Net names results folders ``Trainer__Plans__configuration``, side by side in one dataset folder, and trains both
stages with one trainer and one plans file; so the first stage of ``T__P__3d_cascade_fullres`` is
``T__P__3d_lowres`` beside it (the plans' ``previous_stage``), unless another folder is named.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoints import load_checkpoint
from ..errors import ModelError


def folder_configuration(model_dir: Path, plans: dict) -> str | None:
    """The configuration that a results folder's name ``Trainer__Plans__configuration`` names, when the plans have
    it; None for folders named otherwise."""
    parts = model_dir.name.split("__")
    configurations = plans.get("configurations")
    if len(parts) >= 3 and isinstance(configurations, dict) and parts[-1] in configurations:
        return parts[-1]
    return None


def previous_stage_name(plans: dict, configuration: str, where: Path) -> str | None:
    """The ``previous_stage`` of ``configuration`` in the plans (inheritance resolved as nnU-Net resolves it), or
    None for a configuration that is not a cascade's second stage."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        previous = PlansManager(plans).get_configuration(configuration).previous_stage_name
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ModelError(f"{where}: configuration {configuration!r} cannot be read ({exc})") from exc
    if previous is not None and not isinstance(previous, str):
        raise ModelError(f"{where}: configuration {configuration!r} names previous_stage {previous!r}, not a "
                         "configuration name")
    return previous


def stage_configuration(model_dir: Path, plans: dict, first_checkpoint: Path | None,
                        trusted: bool) -> tuple[str | None, str | None]:
    """``(configuration, previous stage)`` of a results folder, known before its weights are loaded.

    The configuration is the one the folder's name names (``Trainer__Plans__configuration``), else the one its first
    checkpoint was trained with (a renamed folder), which the plans must have; None when there is no checkpoint to
    ask. The previous stage is None for anything but a cascade's second stage."""
    if not isinstance(plans.get("configurations"), dict):
        return None, None  # not nnU-Net plans: refused when the network is built from them
    configuration = folder_configuration(model_dir, plans)
    if configuration is None and first_checkpoint is not None and first_checkpoint.is_file():
        configuration = checkpoint_configuration(first_checkpoint, trusted)
        if configuration not in plans["configurations"]:
            raise ModelError(f"{model_dir / 'plans.json'}: has no configuration {configuration!r} that "
                             f"{first_checkpoint} was trained with; copy plans.json from the results folder the "
                             "checkpoints were trained in.")
    if configuration is None:
        return None, None
    return configuration, previous_stage_name(plans, configuration, model_dir / "plans.json")


def checkpoint_configuration(checkpoint_path: Path, trusted: bool) -> str:
    """The configuration a checkpoint was trained with (``init_args.configuration``)."""
    init_args = load_checkpoint(checkpoint_path, trusted=trusted).get("init_args")
    configuration = init_args.get("configuration") if isinstance(init_args, dict) else None
    if not isinstance(configuration, str):
        raise ModelError(f"{checkpoint_path}: not an nnU-Net v2 checkpoint (no init_args.configuration)")
    return configuration


def sibling_stage_folder(model_dir: Path, stage: str) -> Path:
    """Where nnU-Net puts the results of ``stage`` trained with the same trainer and plans: beside ``model_dir``."""
    parts = model_dir.name.split("__")
    if len(parts) < 3:
        raise ModelError(f"{model_dir}: is a cascade stage, but its name is not Trainer__Plans__configuration, so its "
                         f"{stage} stage cannot be found beside it. Name the {stage} results folder explicitly "
                         '("previous_stage" in a model-set manifest).')
    return model_dir.parent / "__".join([*parts[:-1], stage])


def check_stages_fit(stage: Any, previous: Any, previous_name: str) -> None:
    """Refuse a first stage that is not the ``previous_name`` stage of the same dataset and plans as ``stage``
    (both :class:`~BraTSEnsembleLib.members.nnunet.NnUNetMember`): its segmentation would be fed as channels that
    the second stage's network was not trained with."""
    fix = (f"Use the {previous_name} results folder trained with the same dataset and plans as {stage.model_dir.name} "
           "(nnUNetv2_train DATASET 3d_lowres … and 3d_cascade_fullres … of one nnUNetv2_plan_and_preprocess).")
    if previous.configuration is not None and previous.configuration != previous_name:
        raise ModelError(f"{previous.model_dir}: is the {previous.configuration} stage, but {stage.model_dir} needs "
                         f"its {previous_name} stage. {fix}")
    for key in ("dataset_name", "plans_name"):
        if stage.plans.get(key) != previous.plans.get(key):
            raise ModelError(f"{previous.model_dir / 'plans.json'}: {key} {previous.plans.get(key)!r} differs from "
                             f"{stage.plans.get(key)!r} of {stage.model_dir / 'plans.json'}. {fix}")
    for key in ("labels", "channel_names"):
        if stage.dataset_json.get(key) != previous.dataset_json.get(key):
            raise ModelError(f"{previous.model_dir / 'dataset.json'}: {key} differ from those of "
                             f"{stage.model_dir / 'dataset.json'} ({previous.dataset_json.get(key)} vs "
                             f"{stage.dataset_json.get(key)}). {fix}")


def as_read_back(segmentation: np.ndarray) -> np.ndarray:
    """A stage's segmentation (z, y, x) as ``nnUNetv2_predict -prev_stage_predictions`` hands it to the next stage:
    written as an integer label image and read back by nnU-Net's reader as float32 with one channel axis."""
    return np.ascontiguousarray(segmentation[None], dtype=np.float32)
