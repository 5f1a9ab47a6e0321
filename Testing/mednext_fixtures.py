"""Test helpers for the MedNeXt member: synthetic nnU-Net v1 model folders in the official on-disk format, a stand-in
for :class:`BraTSEnsembleLib.case.Case`, and the key renaming to MONAI's MedNeXt (used as a numeric oracle)."""
from __future__ import annotations

import io
import operator
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

TRAINER_S3 = "nnUNetTrainerV2_MedNeXt_S_kernel3"
PLANS_ID = "nnUNetPlansv2.1_trgSp_1x1x1"
BRATS_MODALITIES = {0: "T1", 1: "T1ce", 2: "T2", 3: "FLAIR"}


class FakeCase:
    """Exactly the members of ``Case`` that a member's ``predict`` uses."""

    def __init__(self, case_id: str, images: Mapping[str, np.ndarray], spacing_zyx: Sequence[float]) -> None:
        self.case_id = case_id
        self._images = {k: np.asarray(v, dtype=np.float32) for k, v in images.items()}
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)
        self.shape_zyx = tuple(int(s) for s in next(iter(self._images.values())).shape)

    def array(self, role: str) -> np.ndarray:
        return self._images[role]


class NotPlainData:
    """An arbitrary class: a checkpoint or pickle that needs it must be refused."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (operator.add, (1, 2))


def v1_plans(patch_size: Sequence[int] = (32, 32, 32), spacing: Sequence[float] = (1.0, 1.0, 1.0),
             transpose_forward: Sequence[int] = (0, 1, 2), num_classes: int = 3,
             modalities: Mapping[int, str] | None = None, schemes: Sequence[str] | None = None,
             use_mask: Sequence[bool] | None = None) -> dict[str, Any]:
    """Plans in nnU-Net v1's layout (numpy arrays/scalars and OrderedDicts where v1 puts them)."""
    modalities = dict(modalities or BRATS_MODALITIES)
    n_mod = len(modalities)
    schemes = list(schemes or ["nonCT"] * n_mod)
    use_mask = list(use_mask if use_mask is not None else [True] * n_mod)
    forward = list(transpose_forward)
    backward = [forward.index(i) for i in range(3)]
    intensity = OrderedDict(
        (c, OrderedDict(median=np.float64(40.0), mean=np.float64(30.0), sd=np.float64(50.0), mn=np.float64(-1000.0),
                        mx=np.float64(2000.0), percentile_99_5=np.float64(300.0), percentile_00_5=np.float64(-100.0)))
        for c in range(n_mod))
    stage = {
        "batch_size": 2,
        "num_pool_per_axis": [5, 5, 5],
        "patch_size": np.array(patch_size, dtype=np.int64),
        "median_patient_size_in_voxels": np.array([138, 169, 138], dtype=np.int64),
        "current_spacing": np.array(spacing, dtype=np.float64),
        "original_spacing": np.array([1.0, 1.0, 1.0]),
        "do_dummy_2D_data_aug": False,
        "pool_op_kernel_sizes": [[2, 2, 2]] * 5,
        "conv_kernel_sizes": [[3, 3, 3]] * 6,
    }
    classes = list(range(1, num_classes + 1))
    return {
        "num_stages": 1,
        "num_modalities": n_mod,
        "modalities": modalities,
        "normalization_schemes": OrderedDict((c, s) for c, s in enumerate(schemes)),
        "dataset_properties": {
            "all_sizes": [(155, 240, 240)], "all_spacings": [np.array([1.0, 1.0, 1.0])],
            "all_classes": classes, "modalities": modalities, "intensityproperties": intensity,
            "size_reductions": OrderedDict(case_0=np.float64(0.4)),
        },
        "list_of_npz_files": ["/data/nnUNet_preprocessed/Task500/case_0.npz"],
        "original_spacings": [np.array([1.0, 1.0, 1.0])],
        "original_sizes": [np.array([155, 240, 240])],
        "preprocessed_data_folder": "/data/nnUNet_preprocessed/Task500",
        "num_classes": num_classes,
        "all_classes": classes,
        "base_num_features": 32,
        "use_mask_for_norm": OrderedDict((c, bool(m)) for c, m in enumerate(use_mask)),
        "keep_only_largest_region": None,
        "min_region_size_per_class": None,
        "min_size_per_class": None,
        "transpose_forward": forward,
        "transpose_backward": backward,
        "data_identifier": "nnUNetData_plans_v2.1_trgSp_1x1x1",
        "plans_per_stage": {0: stage},
        "preprocessor_name": "GenericPreprocessor",
        "conv_per_stage": 2,
    }


def v1_checkpoint(state_dict: Mapping[str, torch.Tensor], module_prefix: bool = True, epoch: int = 1000,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint dict as nnU-Net v1's ``save_checkpoint`` writes it (numpy float64 in plot/best stuff)."""
    prefix = "module." if module_prefix else ""
    weights = OrderedDict((prefix + k, v.detach().cpu()) for k, v in state_dict.items())
    # The optimizer's state_dict before its first step: hyper-parameters and parameter indices (no tensors needed).
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in state_dict]
    optimizer = torch.optim.AdamW(params, lr=1e-3, eps=1e-4, weight_decay=3e-5)
    checkpoint: dict[str, Any] = {
        "epoch": epoch,
        "state_dict": weights,
        "optimizer_state_dict": optimizer.state_dict(),
        "lr_scheduler_state_dict": None,
        "plot_stuff": ([np.float64(0.9 - 0.001 * i) for i in range(5)], [np.float64(0.8), np.float64(0.7)], [],
                       [np.mean(np.array([0.7, 0.8, 0.9])), np.float64(0.85)]),
        "best_stuff": (epoch - 10, np.float64(-0.71), np.float64(0.86)),
        "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 17},
    }
    checkpoint.update(extra or {})
    return checkpoint


def _numpy1_names(data: bytes) -> bytes:
    """Rewrite protocol-2 pickle bytes so numpy globals carry numpy 1.x's module names (``numpy.core.*``)."""
    return data.replace(b"numpy._core.", b"numpy.core.")


def save_torch(obj: Any, path: Path, numpy1_names: bool = True) -> None:
    """``torch.save`` (zip format); with ``numpy1_names`` the pickle names numpy globals as numpy 1.x did, which is
    what checkpoints trained in 2022-2024 contain."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    if not numpy1_names:
        path.write_bytes(buffer.getvalue())
        return
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = _numpy1_names(data)
            target.writestr(info.filename, data)


def save_pickle(obj: Any, path: Path, numpy1_names: bool = True) -> None:
    """Pickle as nnU-Net v1 does; with ``numpy1_names`` protocol 2 with numpy 1.x names, else the default."""
    if numpy1_names:
        path.write_bytes(_numpy1_names(pickle.dumps(obj, protocol=2)))
    else:
        path.write_bytes(pickle.dumps(obj))


def write_v1_model_folder(root: Path, state_dicts: Mapping[int, Mapping[str, torch.Tensor]],
                          plans: Mapping[str, Any], trainer: str = TRAINER_S3,
                          checkpoint: str = "model_final_checkpoint", numpy1_names: bool = True,
                          checkpoint_extra: Mapping[str, Any] | None = None) -> Path:
    """``root/<trainer>__<plans>/`` with ``plans.pkl`` and ``fold_N/<checkpoint>.model`` (+ ``.model.pkl``)."""
    folder = root / f"{trainer}__{PLANS_ID}"
    folder.mkdir(parents=True, exist_ok=True)
    save_pickle(dict(plans), folder / "plans.pkl", numpy1_names)
    for fold, state in state_dicts.items():
        fold_dir = folder / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        model_path = fold_dir / f"{checkpoint}.model"
        save_torch(v1_checkpoint(state, extra=checkpoint_extra), model_path, numpy1_names)
        init = (str(folder.parent / "plans.pkl"), fold, str(folder), "/data/nnUNet_preprocessed/Task500", True, 0,
                True, False, True)
        info = OrderedDict(init=init, name=trainer,
                           **{"class": f"<class 'nnunet_mednext.training.network_training.MedNeXt."
                                       f"nnUNetTrainerV2_MedNeXt.{trainer}'>"},
                           plans=dict(plans))
        save_pickle(info, model_path.with_name(model_path.name + ".pkl"), numpy1_names)
    return folder


def to_monai_key(key: str) -> str | None:
    """Official MedNeXt parameter name → MONAI ``MedNeXt`` name (None for ``dummy_tensor``, which MONAI lacks)."""
    if key == "dummy_tensor":
        return None
    rules = (
        (r"^enc_block_(\d)\.", lambda m: f"enc_stages.{m.group(1)}."),
        (r"^down_(\d)\.", lambda m: f"down_blocks.{m.group(1)}."),
        (r"^up_(\d)\.", lambda m: f"up_blocks.{3 - int(m.group(1))}."),
        (r"^dec_block_(\d)\.", lambda m: f"dec_stages.{3 - int(m.group(1))}."),
        (r"^out_([1-4])\.", lambda m: f"out_blocks.{4 - int(m.group(1))}."),
    )
    for pattern, replace in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replace, key)
    return key
