"""MedNeXt ensemble member: official ``mednextv1`` networks trained with nnU-Net v1 (MIC-DKFZ/MedNeXt).

What is here, written from the published description of MedNeXt and of nnU-Net v1's inference (no code of either
is vendored):

* the MedNeXt network with the official parameter names (``stem``, ``enc_block_i``, ``down_i``, ``bottleneck``,
  ``up_i``, ``dec_block_i``, ``out_0`` … ``out_4``, ``dummy_tensor``), so that official checkpoints load with
  ``load_state_dict(strict=True)``; :func:`create_mednext` builds sizes S/B/M/L with kernel 3 or 5;
* reading nnU-Net v1 model folders (``<trainer>__<plans>/plans.pkl``, ``fold_N/<checkpoint>.model`` and
  ``.model.pkl``) without executing code from the files: checkpoints are read with ``torch.load(weights_only=True)``
  and an allow-list of the numpy globals that v1 checkpoints contain; pickles with a restricted unpickler;
* nnU-Net v1 preprocessing (transpose, crop to the nonzero box, resampling, normalisation), v1 sliding-window
  inference (Gaussian weighting, **softmax** averaged over windows, mirrors and folds) and the way back to the case
  grid (resampling to the cropped shape, background = 1 outside the box, transpose back);
* :class:`MedNeXtMember`, the :class:`~BraTSEnsembleLib.members.base.Member` of the ensemble.

Class mapping: v1 model folders do not carry the dataset's label names. By default output channel ``c`` is taken
as BraTS 2023 label ``c`` (0 background, 1 NETC, 2 SNFH, 3 ET, 4 RC), which is right for models trained on BraTS
2023+ data with its own label values. Models trained on nnU-Net v1's own BraTS 2018-2021 conversions (Task043,
Task082, Task137) use 1 = oedema, 2 = non-enhancing, 3 = enhancing: pass
``class_labels=V1_BRATS_TASK_CLASS_LABELS`` for those.
"""
from __future__ import annotations

import itertools
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes, gaussian_filter
from torch import nn

from ..checkpoints import load_checkpoint, load_plain_pickle
from ..errors import InputError, ModelError
from ..labels import BACKGROUND, ET, LABEL_NAMES, NETC, SNFH
from ..roles import model_channel_roles
from ..timing import stage
from ..trust import TrustedFiles
from .base import Probabilities, StepReporter, with_cpu_results_on_oom
from .progress import AFTER_WINDOW, TileProgress

FRAMEWORK = "mednext"

# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------

#: Published configurations: expansion ratio per stage (9 stages: 4 encoder, bottleneck, 4 decoder) and blocks.
MEDNEXT_SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "S": {"exp_r": (2,) * 9, "block_counts": (2,) * 9},
    "B": {"exp_r": (2, 3, 4, 4, 4, 4, 4, 3, 2), "block_counts": (2,) * 9},
    "M": {"exp_r": (2, 3, 4, 4, 4, 4, 4, 3, 2), "block_counts": (3, 4, 4, 4, 4, 4, 4, 4, 3)},
    "L": {"exp_r": (3, 4, 8, 8, 8, 8, 8, 4, 3), "block_counts": (3, 4, 8, 8, 8, 8, 8, 4, 3)},
}
MEDNEXT_KERNEL_SIZES: tuple[int, ...] = (3, 5)
#: Width of the first stage; stage i has ``BASE_CHANNELS * 2**i`` channels.
BASE_CHANNELS = 32
#: The network halves the grid four times, so patch sizes must be multiples of 16.
PATCH_DIVISOR = 16


class MedNeXtBlock(nn.Module):
    """ConvNeXt-style block: depthwise k³ conv → GroupNorm (one group per channel) → 1×1 expansion → GELU →
    (optional GRN) → 1×1 compression, plus the input when ``do_res``."""

    def __init__(self, in_channels: int, out_channels: int, exp_r: int, kernel_size: int, do_res: bool = True,
                 grn: bool = False) -> None:
        super().__init__()
        self.do_res = do_res
        self.conv1 = nn.Conv3d(in_channels, in_channels, kernel_size, stride=1, padding=kernel_size // 2,
                               groups=in_channels)
        self.norm = nn.GroupNorm(num_groups=in_channels, num_channels=in_channels)
        self.conv2 = nn.Conv3d(in_channels, exp_r * in_channels, kernel_size=1)
        self.act = nn.GELU()
        self.conv3 = nn.Conv3d(exp_r * in_channels, out_channels, kernel_size=1)
        self.grn = grn
        if grn:
            self.grn_beta = nn.Parameter(torch.zeros(1, exp_r * in_channels, 1, 1, 1))
            self.grn_gamma = nn.Parameter(torch.zeros(1, exp_r * in_channels, 1, 1, 1))

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv2(self.norm(self.conv1(x))))
        if self.grn:
            gx = torch.norm(y, p=2, dim=(-3, -2, -1), keepdim=True)
            nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
            y = self.grn_gamma * (y * nx) + self.grn_beta + y
        return self.conv3(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._body(x)
        return x + y if self.do_res else y


class MedNeXtDownBlock(MedNeXtBlock):
    """Block whose depthwise conv has stride 2 (halves the grid); ``res_conv`` (1×1, stride 2) is the residual."""

    def __init__(self, in_channels: int, out_channels: int, exp_r: int, kernel_size: int, do_res: bool = True,
                 grn: bool = False) -> None:
        super().__init__(in_channels, out_channels, exp_r, kernel_size, do_res=False, grn=grn)
        self.resample_do_res = do_res
        if do_res:
            self.res_conv = nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=2)
        self.conv1 = nn.Conv3d(in_channels, in_channels, kernel_size, stride=2, padding=kernel_size // 2,
                               groups=in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._body(x)
        return y + self.res_conv(x) if self.resample_do_res else y


class MedNeXtUpBlock(MedNeXtBlock):
    """Block whose depthwise conv is a stride-2 transposed conv (doubles the grid); the result (2n−1 voxels per
    axis) is padded by one voxel at the start of each axis; ``res_conv`` is a 1×1 stride-2 transposed conv."""

    def __init__(self, in_channels: int, out_channels: int, exp_r: int, kernel_size: int, do_res: bool = True,
                 grn: bool = False) -> None:
        super().__init__(in_channels, out_channels, exp_r, kernel_size, do_res=False, grn=grn)
        self.resample_do_res = do_res
        if do_res:
            self.res_conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=1, stride=2)
        self.conv1 = nn.ConvTranspose3d(in_channels, in_channels, kernel_size, stride=2, padding=kernel_size // 2,
                                        groups=in_channels)

    @staticmethod
    def _pad_front(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, (1, 0, 1, 0, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._pad_front(self._body(x))
        return y + self._pad_front(self.res_conv(x)) if self.resample_do_res else y


class OutBlock(nn.Module):
    """Segmentation head: a 1×1 transposed conv to the class logits (weight shape (in, n_classes, 1, 1, 1))."""

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        self.conv_out = nn.ConvTranspose3d(in_channels, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(x)


class MedNeXt(nn.Module):
    """The MedNeXt U-Net: 4 encoder stages, bottleneck, 4 decoder stages; skips are added, not concatenated.

    ``forward`` returns the full-resolution logits (``out_0``); with ``do_ds`` set (training only) it returns the
    list ``[out_0, out_1, out_2, out_3, out_4]`` from full to lowest resolution, as the official network does.
    """

    def __init__(self, in_channels: int, n_classes: int, exp_r: Sequence[int], block_counts: Sequence[int],
                 kernel_size: int, n_channels: int = BASE_CHANNELS, deep_supervision: bool = True,
                 do_res: bool = True, do_res_up_down: bool = True, grn: bool = False) -> None:
        super().__init__()
        if len(exp_r) != 9 or len(block_counts) != 9:
            raise ValueError("exp_r and block_counts need 9 entries (4 encoder stages, bottleneck, 4 decoder)")
        self.do_ds = False
        self.has_deep_supervision_heads = deep_supervision
        self.stem = nn.Conv3d(in_channels, n_channels, kernel_size=1)

        def stage(width: int, index: int) -> nn.Sequential:
            return nn.Sequential(*[MedNeXtBlock(width, width, exp_r[index], kernel_size, do_res, grn)
                                   for _ in range(block_counts[index])])

        for i in range(4):
            width = n_channels * 2 ** i
            setattr(self, f"enc_block_{i}", stage(width, i))
            # The down block after stage i already uses the next stage's expansion ratio.
            setattr(self, f"down_{i}", MedNeXtDownBlock(width, 2 * width, exp_r[i + 1], kernel_size,
                                                        do_res_up_down, grn))
        self.bottleneck = stage(n_channels * 16, 4)
        for j in (3, 2, 1, 0):
            width = n_channels * 2 ** j
            setattr(self, f"up_{j}", MedNeXtUpBlock(2 * width, width, exp_r[8 - j], kernel_size, do_res_up_down,
                                                    grn))
            setattr(self, f"dec_block_{j}", stage(width, 8 - j))
        self.out_0 = OutBlock(n_channels, n_classes)
        # Exists in the official network (gradient-checkpointing workaround); kept so that checkpoints load strictly.
        self.dummy_tensor = nn.Parameter(torch.tensor([1.0]))
        if deep_supervision:
            for k in range(1, 5):
                setattr(self, f"out_{k}", OutBlock(n_channels * 2 ** k, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for i in range(4):
            x = getattr(self, f"enc_block_{i}")(x)
            skips.append(x)
            x = getattr(self, f"down_{i}")(x)
        x = self.bottleneck(x)
        use_ds = self.do_ds and self.has_deep_supervision_heads
        deep = [self.out_4(x)] if use_ds else []
        for j in (3, 2, 1, 0):
            x = getattr(self, f"dec_block_{j}")(skips[j] + getattr(self, f"up_{j}")(x))
            if use_ds and j > 0:
                deep.insert(0, getattr(self, f"out_{j}")(x))
        logits = self.out_0(x)
        return [logits, *deep] if use_ds else logits


def create_mednext(size: str, kernel_size: int, in_channels: int, n_classes: int,
                   deep_supervision: bool = True, n_channels: int = BASE_CHANNELS) -> MedNeXt:
    """MedNeXt of a published size ('S', 'B', 'M', 'L') and kernel (3 or 5), as ``nnUNetTrainerV2_MedNeXt_*``
    builds it (residual blocks and residual up/down blocks, base width 32, no GRN).

    ``n_classes`` counts the background. ``deep_supervision`` adds the heads ``out_1`` … ``out_4`` that every
    published trainer has (they are in the checkpoints even though inference uses ``out_0`` only).
    ``n_channels`` is the width of the first stage (the official trainers' ``n_channels=32``; a narrower network
    has the same parameter names, with smaller shapes).
    """
    if n_channels < 1:
        raise ValueError(f"n_channels must be positive, got {n_channels}")
    key = size.upper()
    if key not in MEDNEXT_SIZES:
        raise ValueError(f"unknown MedNeXt size {size!r}; expected one of {', '.join(MEDNEXT_SIZES)}")
    if kernel_size not in MEDNEXT_KERNEL_SIZES:
        raise ValueError(f"unsupported MedNeXt kernel size {kernel_size}; expected 3 or 5")
    config = MEDNEXT_SIZES[key]
    return MedNeXt(in_channels, n_classes, config["exp_r"], config["block_counts"], kernel_size,
                   n_channels=n_channels, deep_supervision=deep_supervision)


# ----------------------------------------------------------------------------------------------------------------
# Reading nnU-Net v1 files without executing code from them
# ----------------------------------------------------------------------------------------------------------------

def load_v1_checkpoint(path: Path, trusted: bool = False, loaded_trusted: list[Path] | None = None) -> dict[str, Any]:
    """Read an nnU-Net v1 ``.model`` checkpoint safely (see :mod:`BraTSEnsembleLib.checkpoints`) onto the CPU.

    v1 checkpoints hold numpy float64 values in ``plot_stuff``/``best_stuff``; exactly the numpy globals needed for
    those are allowed; any other global is refused with ModelError, unless the user ``trusted`` this file.
    """
    checkpoint = load_checkpoint(path, trusted=trusted, loaded_trusted=loaded_trusted)
    if "state_dict" not in checkpoint:
        raise ModelError(f"{path}: not an nnU-Net v1 checkpoint (no 'state_dict'). Point to the "
                         "fold_N/model_final_checkpoint.model file written by nnU-Net v1 / MedNeXt training.")
    return checkpoint


def stem_width(state_dict: Mapping[str, torch.Tensor], source: Path) -> int:
    """The network's first-stage width (``n_channels``) from the shape of its ``stem.weight`` (32 in every published
    MedNeXt; the trainer, not the plans, sets it, so the checkpoint is where it is recorded)."""
    weight = state_dict.get("stem.weight")
    if weight is None or weight.ndim != 5:
        raise ModelError(f"{source}: no 5-D 'stem.weight' in the state_dict; this is not a 3D MedNeXt checkpoint.")
    return int(weight.shape[0])


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix that (Distributed)DataParallel training leaves on parameter names."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------------------------
# Model folder
# ----------------------------------------------------------------------------------------------------------------

_TRAINER_RE = re.compile(r"MedNeXt_([SBML])_kernel([35])(?![0-9])")


def parse_mednext_trainer(trainer_name: str) -> tuple[str, int] | None:
    """``(size, kernel)`` from a trainer name like ``nnUNetTrainerV2_MedNeXt_L_kernel5`` (or a variant such as
    ``…_kernel5_lr_1e_4``), or None."""
    match = _TRAINER_RE.search(trainer_name)
    return (match.group(1), int(match.group(2))) if match else None


def split_model_folder_name(folder: Path) -> tuple[str, str]:
    """``(trainer, plans identifier)`` from a v1 folder name ``<trainer>__<plans>`` (plans empty if absent)."""
    trainer, _, plans_id = folder.name.partition("__")
    return trainer, plans_id


def find_fold_checkpoints(model_dir: Path, folds: Sequence[int | str] | None, checkpoint: str) -> dict[str, Path]:
    """``{fold name: path of <checkpoint>.model}`` for the requested folds, or every ``fold_*`` that has one.

    Fold names are ``"0"`` … ``"4"`` (or ``"all"`` for a model trained on all cases). Raises ModelError naming the
    missing file when a requested fold, or every fold, lacks the checkpoint.
    """
    filename = f"{checkpoint}.model"
    if folds is None:
        found = {}
        for sub in sorted(model_dir.glob("fold_*")):
            if (sub / filename).is_file():
                found[sub.name[len("fold_"):]] = sub / filename
        if not found:
            raise ModelError(
                f"{model_dir}: no fold_N/{filename} found. Point to the '<trainer>__<plans>' folder of a trained "
                f"MedNeXt model, or choose another checkpoint ('model_final_checkpoint', 'model_best')."
            )
        numbered = sorted((k for k in found if k.isdigit()), key=int)
        return {k: found[k] for k in numbered + sorted(k for k in found if not k.isdigit())}
    result = {}
    for fold in folds:
        path = model_dir / f"fold_{fold}" / filename
        if not path.is_file():
            raise ModelError(f"{path}: checkpoint not found. Check the fold numbers and the checkpoint name, or "
                             f"leave folds unset to use every fold that has {filename}.")
        result[str(fold)] = path
    return result


def select_stage(plans: Mapping[str, Any], model_info: Mapping[str, Any] | None) -> Any:
    """The plans stage the model was trained on: the trainer's ``init`` stage argument when the ``.model.pkl``
    records one, else the last (highest-resolution) stage, as nnU-Net v1 uses for 3d_fullres."""
    stages = plans["plans_per_stage"]
    if model_info is not None:
        init = model_info.get("init")
        if isinstance(init, (tuple, list)) and len(init) > 5 and init[5] in stages:
            return init[5]
    return sorted(stages)[-1]


#: v1 preprocessors whose behaviour :func:`preprocess_v1` reproduces.
SUPPORTED_PREPROCESSORS: tuple[str, ...] = ("GenericPreprocessor",)


@dataclass(frozen=True)
class V1Preprocessing:
    """What nnU-Net v1 preprocessing and export need from the plans (all spacings/patch in transposed order)."""

    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    target_spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple[Mapping[str, float] | None, ...]
    force_separate_z: bool | None = None
    export_order: int = 1
    export_order_z: int = 0


def preprocessing_from_plans(plans: Mapping[str, Any], stage: Any, source: Path) -> V1Preprocessing:
    """Extract :class:`V1Preprocessing` from v1 plans; raises ModelError naming ``source`` on missing entries."""
    try:
        stage_plans = plans["plans_per_stage"][stage]
        n_mod = int(plans["num_modalities"])
        schemes = plans["normalization_schemes"]
        use_mask = plans.get("use_mask_for_norm") or {}
        intensity = (plans.get("dataset_properties") or {}).get("intensityproperties") or {}
        forward = tuple(int(i) for i in plans.get("transpose_forward", (0, 1, 2)))
        backward = tuple(int(i) for i in plans.get("transpose_backward", (0, 1, 2)))
        export = plans.get("segmentation_export_params") or {}
        prep = V1Preprocessing(
            transpose_forward=forward,
            transpose_backward=backward,
            target_spacing=tuple(float(s) for s in stage_plans["current_spacing"]),
            patch_size=tuple(int(p) for p in stage_plans["patch_size"]),
            normalization_schemes=tuple(str(schemes[c]) for c in range(n_mod)),
            use_mask_for_norm=tuple(bool(use_mask.get(c, False)) for c in range(n_mod)),
            intensity_properties=tuple(intensity.get(c) for c in range(n_mod)),
            force_separate_z=export.get("force_separate_z"),
            export_order=int(export.get("interpolation_order", 1)),
            export_order_z=int(export.get("interpolation_order_z", 0)),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelError(f"{source}: plans lack what preprocessing needs ({type(exc).__name__}: {exc}). "
                         "Use the plans.pkl written by nnU-Net v1 planning for this model.") from exc
    if sorted(forward) != [0, 1, 2] or [forward[b] for b in backward] != [0, 1, 2]:
        raise ModelError(f"{source}: transpose_forward {forward} / transpose_backward {backward} are not inverse "
                         "permutations of the three axes.")
    if (len(prep.patch_size) != 3 or any(p % PATCH_DIVISOR or p <= 0 for p in prep.patch_size)
            or np.prod([p // PATCH_DIVISOR for p in prep.patch_size]) < 2):
        # The bottleneck's GroupNorm (one group per channel) needs more than one voxel.
        raise ModelError(f"{source}: patch size {prep.patch_size} is not 3D with multiples of {PATCH_DIVISOR} "
                         f"(and larger than {PATCH_DIVISOR}³), which MedNeXt needs; this does not look like a "
                         "3d_fullres MedNeXt plan.")
    preprocessor = plans.get("preprocessor_name", "GenericPreprocessor")
    if preprocessor not in SUPPORTED_PREPROCESSORS:
        raise ModelError(f"{source}: the model was trained with the {preprocessor} preprocessor; only "
                         f"{', '.join(SUPPORTED_PREPROCESSORS)} (nnU-Net v1's default) is reproduced here.")
    for c, scheme in enumerate(prep.normalization_schemes):
        if scheme in ("CT", "CT2") and not prep.intensity_properties[c]:
            raise ModelError(f"{source}: channel {c} uses {scheme} normalisation but the plans have no "
                             "dataset_properties['intensityproperties'] for it.")
    return prep


# ----------------------------------------------------------------------------------------------------------------
# v1 preprocessing
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PreprocessedCase:
    """A case after v1 preprocessing, and what is needed to bring predictions back to its grid.

    ``data`` is (C, …) in transposed axis order; ``bbox`` (slices), ``original_shape``, ``cropped_shape`` and
    ``original_spacing`` are in the case's (z, y, x) order.
    """

    data: np.ndarray
    bbox: tuple[slice, slice, slice]
    original_shape: tuple[int, int, int]
    cropped_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled (nnU-Net v1's ``create_nonzero_mask``)."""
    mask = np.any(data != 0, axis=0)
    return binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Tight bounding box of ``mask`` as slices; the whole array when the mask is empty."""
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _resample(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
              new_spacing: Sequence[float], is_seg: bool, order: int, order_z: int,
              force_separate_z: bool | None) -> np.ndarray:
    """nnU-Net's resampling (skimage ``resize``, mode 'edge', no anti-aliasing; in-plane then nearest along z
    for anisotropic spacing). nnU-Net v2's implementation has v1's semantics when ``force_separate_z`` is None."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    return resample_data_or_seg_to_shape(data, np.asarray(new_shape), np.asarray(current_spacing, float),
                                         np.asarray(new_spacing, float), is_seg=is_seg, order=order,
                                         order_z=order_z, force_separate_z=force_separate_z)


def normalise(data: np.ndarray, inside: np.ndarray, prep: V1Preprocessing) -> np.ndarray:
    """v1 ``GenericPreprocessor`` normalisation per channel, in place on float32 ``data`` (C, …).

    ``nonCT``: z-score, over ``inside`` (and zero outside) when ``use_mask_for_norm``; ``CT``: clip to the dataset's
    0.5/99.5 percentiles, z-score with the dataset's mean/sd; ``CT2``: clip, z-score with the clipped case's own
    statistics; CT schemes zero the outside when ``use_mask_for_norm``.
    """
    for c, scheme in enumerate(prep.normalization_schemes):
        channel = data[c]
        use_mask = prep.use_mask_for_norm[c]
        if scheme in ("CT", "CT2"):
            props = prep.intensity_properties[c] or {}
            low, high = float(props["percentile_00_5"]), float(props["percentile_99_5"])
            if scheme == "CT":
                np.clip(channel, low, high, out=channel)
                channel[...] = (channel - float(props["mean"])) / float(props["sd"])
            else:
                window = (channel > low) & (channel < high)
                np.clip(channel, low, high, out=channel)
                mean, sd = channel[window].mean(), channel[window].std()
                channel[...] = (channel - mean) / sd
            if use_mask:
                channel[~inside] = 0
        elif scheme == "nonCT":
            if use_mask:
                values = channel[inside]
                if values.size:
                    channel[inside] = (values - values.mean()) / (values.std() + 1e-8)
                channel[~inside] = 0
            else:
                channel[...] = (channel - channel.mean()) / (channel.std() + 1e-8)
        else:
            raise ModelError(f"normalisation scheme {scheme!r} of channel {c} is not supported "
                             "(supported: nonCT, CT, CT2).")
    return data


def preprocess_v1(data: np.ndarray, spacing_zyx: Sequence[float], prep: V1Preprocessing) -> PreprocessedCase:
    """nnU-Net v1 preprocessing of (C, z, y, x) float32 images: crop to the nonzero box, transpose, resample to the
    plans' spacing (order 3, order 0 along an anisotropic axis), normalise. The normalisation mask is v1's: the
    nonzero mask, resampled as a segmentation with order 1."""
    original_shape = tuple(int(s) for s in data.shape[1:])
    mask = nonzero_mask(data)
    bbox = bounding_box(mask)
    cropped = np.array(data[(slice(None), *bbox)], dtype=np.float32)
    cropped[np.isnan(cropped)] = 0  # v1 zeroes NaNs after cropping (they count as nonzero for the box)
    inside = mask[bbox]
    cropped_shape = tuple(int(s) for s in cropped.shape[1:])

    axes = (0, *[a + 1 for a in prep.transpose_forward])
    cropped = cropped.transpose(axes)
    seg = np.where(inside, 0, -1).astype(np.int8)[None].transpose(axes)
    spacing_t = np.asarray(spacing_zyx, float)[list(prep.transpose_forward)]
    target = np.asarray(prep.target_spacing, float)
    new_shape = [max(1, int(round(s / t * n))) for s, t, n in zip(spacing_t, target, cropped.shape[1:])]

    resampled = _resample(cropped, new_shape, spacing_t, target, False, 3, 0, None).astype(np.float32, copy=False)
    seg = _resample(seg, new_shape, spacing_t, target, True, 1, 0, None)
    resampled = normalise(np.ascontiguousarray(resampled), seg[0] >= 0, prep)
    return PreprocessedCase(resampled, bbox, original_shape, cropped_shape,  # type: ignore[arg-type]
                            tuple(float(s) for s in spacing_zyx))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# v1 sliding-window inference
# ----------------------------------------------------------------------------------------------------------------

def sliding_window_starts(patch_size: Sequence[int], image_size: Sequence[int], step_size: float) -> list[list[int]]:
    """Window start positions per axis (v1 rule): the fewest windows whose spacing is at most ``step_size`` of the
    patch, spread evenly from the first to the last possible position. ``image_size`` is at least the patch."""
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    starts = []
    for patch, size in zip(patch_size, image_size):
        n_steps = int(np.ceil((size - patch) / (patch * step_size))) + 1
        last = size - patch
        step = last / (n_steps - 1) if n_steps > 1 else 0.0
        starts.append([int(np.round(step * i)) for i in range(n_steps)])
    return starts


def window_count(patch_size: Sequence[int], image_size: Sequence[int], step_size: float) -> int:
    """Windows :func:`predict_sliding_window` runs on an image of ``image_size`` (padded to at least the patch)."""
    padded = [max(int(s), int(p)) for s, p in zip(image_size, patch_size)]
    return int(np.prod([len(starts) for starts in sliding_window_starts(patch_size, padded, step_size)]))


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian weights over a patch (sigma = patch · ``sigma_scale``), peak 1 at the centre voxel (size // 2), and
    no zeros (v1 replaces zeros by the smallest positive weight)."""
    impulse = np.zeros(patch_size, dtype=np.float64)
    impulse[tuple(p // 2 for p in patch_size)] = 1.0
    weights = gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    weights = (weights / weights.max()).astype(np.float32)
    weights[weights == 0] = weights[weights > 0].min()
    return weights


def _mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``mirror_axes`` as tensor dims of a (B, C, z, y, x) batch, the empty one first."""
    dims = [a + 2 for a in mirror_axes]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def _softmax_with_mirroring(network: nn.Module, patch: torch.Tensor, flips: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """Softmax of ``network`` on ``patch`` averaged over the mirrored copies (v1 averages probabilities)."""
    total = None
    for dims in flips:
        x = torch.flip(patch, dims) if dims else patch
        logits = network(x)
        probs = torch.softmax(logits.float(), dim=1)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)


def predict_sliding_window(network: nn.Module, data: np.ndarray, patch_size: Sequence[int], n_classes: int,
                           device: torch.device, step_size: float = 0.5,
                           mirror_axes: Sequence[int] = (0, 1, 2),
                           results_device: torch.device | None = None,
                           on_window: Callable[[int], None] | None = None) -> np.ndarray:
    """v1 sliding-window softmax of (C, …) ``data``: padded (zeros, centred) to at least the patch, windows at
    :func:`sliding_window_starts`, each window's mirror-averaged softmax weighted by the Gaussian, normalised by the
    summed weights. Returns float32 (n_classes, …) on the shape of ``data``.

    Windows run on ``device``; the weighted sums are accumulated on ``results_device`` (default ``device``; the CPU
    when the device ran out of memory, see :func:`.base.with_cpu_results_on_oom`). ``on_window(1)`` is called
    after each window (progress)."""
    results_device = device if results_device is None else torch.device(results_device)
    shape = np.array(data.shape[1:])
    patch = np.array(patch_size)
    pad_total = np.maximum(patch - shape, 0)
    pad_before = pad_total // 2
    padded = np.pad(data, [(0, 0)] + [(int(b), int(t - b)) for b, t in zip(pad_before, pad_total)])
    padded_shape = padded.shape[1:]

    weights = torch.from_numpy(gaussian_importance_map(patch_size)).to(results_device)
    summed = torch.zeros((n_classes, *padded_shape), dtype=torch.float32, device=results_device)
    weight_sum = torch.zeros(padded_shape, dtype=torch.float32, device=results_device)
    source = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    flips = _mirror_combinations(mirror_axes)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()

    with torch.inference_mode(), autocast:
        for start in itertools.product(*sliding_window_starts(patch_size, padded_shape, step_size)):
            window = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
            x = source[(slice(None), *window)][None].to(device)
            probs = _softmax_with_mirroring(network, x, flips)[0].to(results_device)
            summed[(slice(None), *window)] += probs * weights
            weight_sum[window] += weights
            if on_window is not None:
                on_window(1)
    result = summed / weight_sum
    crop = tuple(slice(int(b), int(b + s)) for b, s in zip(pad_before, shape))
    return result[(slice(None), *crop)].cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Back to the case grid
# ----------------------------------------------------------------------------------------------------------------

def probabilities_to_case_grid(softmax: np.ndarray, case: PreprocessedCase, prep: V1Preprocessing,
                               background_channel: int = 0) -> np.ndarray:
    """Bring v1 softmax (C, preprocessed transposed grid) back to the case grid (C, z, y, x) float32.

    Transpose back, resample to the cropped shape (order 1 by default, order 0 along an anisotropic axis, as v1's
    export does) and place the result in the crop box; outside the box the background channel is 1 and the others
    0. Channels are renormalised to sum to exactly 1 (interpolation leaves rounding errors only).
    """
    back = softmax.transpose((0, *[a + 1 for a in prep.transpose_backward]))
    target_zyx = np.asarray(prep.target_spacing, float)[list(prep.transpose_backward)]
    if tuple(back.shape[1:]) != case.cropped_shape:
        # v1's export checks the original spacing for anisotropy first, then the resampled one: the order of
        # (current, new) below reproduces that check order.
        back = _resample(back, case.cropped_shape, case.original_spacing, target_zyx, False, prep.export_order,
                         prep.export_order_z, prep.force_separate_z)
    back = np.clip(back.astype(np.float32, copy=False), 0, None)
    back /= np.maximum(back.sum(axis=0, keepdims=True), np.float32(1e-12))
    full = np.zeros((back.shape[0], *case.original_shape), dtype=np.float32)
    full[background_channel] = 1.0
    full[(slice(None), *case.bbox)] = back
    return full


# ----------------------------------------------------------------------------------------------------------------
# Member
# ----------------------------------------------------------------------------------------------------------------

#: Class values of nnU-Net v1's own BraTS conversions (Task043/082/137): 1 oedema, 2 non-enhancing, 3 enhancing.
V1_BRATS_TASK_CLASS_LABELS: dict[int, int] = {0: BACKGROUND, 1: SNFH, 2: NETC, 3: ET}


def default_class_labels(plans: Mapping[str, Any], source: Path) -> dict[int, int]:
    """``{output channel: canonical label}`` from v1 plans: channel c is class c (v1 requires classes 0..n), and the
    values are taken as BraTS 2023 labels (see the module docstring for v1's own BraTS conversions)."""
    n_classes = int(plans["num_classes"])
    classes = plans.get("all_classes")
    if classes is not None and sorted(int(c) for c in classes) != list(range(1, n_classes + 1)):
        raise ModelError(f"{source}: all_classes {list(classes)} are not 1..{n_classes}; pass class_labels "
                         "({output channel: BraTS label}) to say which BraTS label each output channel is.")
    if n_classes + 1 > len(LABEL_NAMES):
        raise ModelError(f"{source}: the model has {n_classes} foreground classes, more than the BraTS labels "
                         "(1-4); pass class_labels to map its channels.")
    return {c: c for c in range(n_classes + 1)}


def validate_class_labels(mapping: Mapping[int, int], n_outputs: int, source: Path) -> tuple[int, ...]:
    """Canonical labels in output-channel order; ModelError unless ``mapping`` covers channels 0..n-1 exactly,
    maps channel 0 to background and names each BraTS label at most once."""
    keys = sorted(int(k) for k in mapping)
    if keys != list(range(n_outputs)):
        raise ModelError(f"{source}: class_labels {dict(mapping)} must name every output channel 0..{n_outputs - 1}.")
    labels = tuple(int(mapping[c]) for c in range(n_outputs))
    if labels[0] != BACKGROUND:
        raise ModelError(f"{source}: class_labels must map output channel 0 (nnU-Net's background) to 0.")
    if len(set(labels)) != len(labels) or any(label not in LABEL_NAMES for label in labels):
        raise ModelError(f"{source}: class_labels {dict(mapping)} must map channels to distinct BraTS labels 0-4.")
    return labels


def channel_roles_from_plans(plans: Mapping[str, Any], source: Path) -> tuple[str, ...]:
    """Input roles from the plans' ``modalities`` ({0: 'T1', 1: 'T1ce', …}) via :func:`model_channel_roles`."""
    modalities = plans.get("modalities") or (plans.get("dataset_properties") or {}).get("modalities")
    if not modalities:
        raise ModelError(f"{source}: the plans name no modalities; pass channel_roles (e.g. "
                         "('t1n', 't1c', 't2w', 't2f')) in the order the model was trained with.")
    return model_channel_roles({str(k): str(v) for k, v in modalities.items()}, str(source))


class MedNeXtMember:
    """An ensemble member running an official MedNeXt model from an nnU-Net v1 model folder.

    ``model_dir`` is the ``<trainer>__<plans>`` folder (``plans.pkl`` and ``fold_N/``). Folds default to every
    ``fold_N`` holding ``<checkpoint>.model``; their softmax outputs are averaged, as v1 does. Size and kernel
    come from the trainer name (``nnUNetTrainerV2_MedNeXt_L_kernel5``), the ``.model.pkl`` ``name``, or the
    ``size``/``kernel_size`` arguments. ``channel_roles`` overrides the roles from the plans' ``modalities``;
    ``class_labels`` ({output channel: canonical label}) overrides the default BraTS 2023 reading of the classes.
    Construction reads plans and checks files; weights are read (and checked) when a fold is loaded.
    """

    def __init__(self, model_dir: str | Path, folds: list[int] | None = None,
                 checkpoint: str = "model_final_checkpoint", use_mirroring: bool = True, step_size: float = 0.5,
                 channel_roles: tuple[str, ...] | None = None, class_labels: dict[int, int] | None = None, *,
                 size: str | None = None, kernel_size: int | None = None, name: str | None = None,
                 trust_checkpoint: "bool | TrustedFiles" = False) -> None:
        self.model_dir = Path(model_dir)
        #: the files the user trusts (--trust-checkpoint): plans.pkl, .model.pkl and each fold's .model on its own
        self.trust = TrustedFiles.of(trust_checkpoint)
        #: files that needed (and got) full unpickling because the user trusted them
        self.trusted_files: list[Path] = []
        if not self.model_dir.is_dir():
            raise ModelError(f"{self.model_dir}: model folder not found. Point to the '<trainer>__<plans>' folder "
                             "of a MedNeXt model (it holds plans.pkl and fold_N/).")
        self.plans_path = self.model_dir / "plans.pkl"
        if not self.plans_path.is_file():
            raise ModelError(f"{self.plans_path}: plans.pkl not found. Point to the '<trainer>__<plans>' folder "
                             "itself (not its parent or a fold_N folder), as written by nnU-Net v1 training.")
        if not 0 < step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {step_size}")
        self.plans: dict[str, Any] = self._read_pickle(self.plans_path)
        if not isinstance(self.plans, Mapping) or "plans_per_stage" not in self.plans:
            raise ModelError(f"{self.plans_path}: not nnU-Net v1 plans (no 'plans_per_stage').")
        self.checkpoint = checkpoint
        self.use_mirroring = use_mirroring
        self.step_size = float(step_size)
        self.checkpoints = find_fold_checkpoints(self.model_dir, folds, checkpoint)
        first = next(iter(self.checkpoints.values()))
        info_path = first.with_name(first.name + ".pkl")
        self.model_info = self._read_pickle(info_path) if info_path.is_file() else None

        self.trainer, self.plans_identifier = split_model_folder_name(self.model_dir)
        self.size, self.kernel_size = self._architecture(size, kernel_size)
        self.stage = select_stage(self.plans, self.model_info)
        self.prep = preprocessing_from_plans(self.plans, self.stage, self.plans_path)
        self.in_channels = int(self.plans["num_modalities"])
        self.n_outputs = int(self.plans["num_classes"]) + 1

        self._roles = tuple(channel_roles) if channel_roles is not None else channel_roles_from_plans(
            self.plans, self.plans_path)
        if len(self._roles) != self.in_channels:
            raise ModelError(f"{self.plans_path}: the model has {self.in_channels} input channels but "
                             f"{len(self._roles)} roles were given ({', '.join(self._roles)}).")
        mapping = class_labels if class_labels is not None else default_class_labels(self.plans, self.plans_path)
        self._labels = validate_class_labels(mapping, self.n_outputs, self.plans_path)
        self.name = name or f"MedNeXt-{self.size}-k{self.kernel_size} ({self.model_dir.name})"

    def _read_pickle(self, path: Path) -> Any:
        return load_plain_pickle(path, trusted=self.trust.covers(path), loaded_trusted=self.trusted_files)

    def _architecture(self, size: str | None, kernel_size: int | None) -> tuple[str, int]:
        parsed = parse_mednext_trainer(self.trainer)
        if parsed is None and self.model_info is not None:
            parsed = parse_mednext_trainer(str(self.model_info.get("name", "")))
        chosen_size = size.upper() if size else (parsed[0] if parsed else None)
        chosen_kernel = kernel_size if kernel_size is not None else (parsed[1] if parsed else None)
        if chosen_size is None or chosen_kernel is None:
            raise ModelError(f"{self.model_dir}: cannot tell the MedNeXt size and kernel from the trainer name "
                             f"{self.trainer!r}; pass size ('S', 'B', 'M', 'L') and kernel_size (3 or 5).")
        if chosen_size not in MEDNEXT_SIZES or chosen_kernel not in MEDNEXT_KERNEL_SIZES:
            raise ModelError(f"{self.model_dir}: unsupported MedNeXt size {chosen_size!r} / kernel {chosen_kernel}.")
        return chosen_size, int(chosen_kernel)

    @property
    def roles(self) -> tuple[str, ...]:
        """Modality roles of the model's input channels, in channel order."""
        return self._roles

    @property
    def target_spacing_zyx(self) -> tuple[float, ...]:
        """Spacing (z, y, x; mm) the case is resampled to (the plans' spacing, in the case's axis order)."""
        return tuple(float(self.prep.target_spacing[axis]) for axis in self.prep.transpose_backward)

    @property
    def labels(self) -> tuple[int, ...]:
        """Canonical BraTS label of each output channel, in the model's channel order."""
        return self._labels

    @property
    def folds(self) -> list[str]:
        """Fold names used ('0' … '4' or 'all')."""
        return list(self.checkpoints)

    def load_network(self, fold: str | int, device: torch.device | str = "cpu") -> MedNeXt:
        """The network of one fold with its weights loaded strictly, in eval mode on ``device``.

        Raises ModelError naming the checkpoint when its weights do not fit the architecture.
        """
        path = self.checkpoints[str(fold)]
        state = strip_module_prefix(load_v1_checkpoint(path, self.trust.covers(path), self.trusted_files)["state_dict"])
        deep_supervision = any(k.startswith("out_1.") for k in state)
        network = create_mednext(self.size, self.kernel_size, self.in_channels, self.n_outputs, deep_supervision,
                                 n_channels=stem_width(state, path))
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:800]
            raise ModelError(
                f"{path}: the weights do not fit MedNeXt-{self.size} kernel {self.kernel_size} with "
                f"{self.in_channels} inputs and {self.n_outputs} classes ({detail}). Check that the folder's "
                "trainer name and plans belong to this checkpoint, or pass size= and kernel_size=."
            ) from exc
        network.do_ds = False
        return network.to(device).eval()

    def predict(self, case: Any, device: torch.device, report: StepReporter | None = None) -> Probabilities:
        """Probabilities (C, z, y, x) of ``case`` on its grid: v1 preprocessing, sliding window per fold (softmax
        averaged over folds), back to the case grid."""
        device = torch.device(device)
        say = report or (lambda _step, _fraction=None: None)
        say("preprocessing", 0.0)
        with stage("preprocessing"):
            images = np.stack([np.asarray(case.array(role), dtype=np.float32) for role in self._roles])
            if tuple(images.shape[1:]) != tuple(case.shape_zyx):
                raise InputError(f"case {case.case_id}: images of shape {images.shape[1:]} do not match the case "
                                 f"grid {tuple(case.shape_zyx)}.")
            pre = preprocess_v1(images, case.spacing_zyx, self.prep)
        mirror_axes = (0, 1, 2) if self.use_mirroring else ()
        summed: np.ndarray | None = None
        folds = len(self.checkpoints)
        tiles = TileProgress(say, window_count(self.prep.patch_size, pre.data.shape[1:], self.step_size) * folds)
        for index, fold in enumerate(self.checkpoints, start=1):
            tiles.label = f"fold {fold} ({index}/{folds}), sliding window" if folds > 1 else "sliding window"
            with stage("loading"):
                network = self.load_network(fold, device)

            def attempt(on_device: bool, _start: int = tiles.done) -> np.ndarray:
                tiles.rewind(_start)  # a pass repeated after out-of-memory counts its tiles again
                return predict_sliding_window(
                    network, pre.data, self.prep.patch_size, self.n_outputs, device, self.step_size, mirror_axes,
                    results_device=device if on_device else torch.device("cpu"), on_window=tiles.advance)

            with stage("network"):  # the fold's sliding window, with mirroring, and its sum with the others
                softmax = with_cpu_results_on_oom(attempt, device, say, self.name)
                summed = softmax if summed is None else summed + softmax
            del network
        assert summed is not None
        say("back to the case grid", AFTER_WINDOW)
        with stage("export"):
            mean = summed / len(self.checkpoints)
            array = probabilities_to_case_grid(mean, pre, self.prep, background_channel=0)
        return Probabilities(array=array, labels=self._labels)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable provenance of this member."""
        return {
            "framework": FRAMEWORK,
            "name": self.name,
            "path": str(self.model_dir),
            "trainer": self.trainer,
            "plans": self.plans_identifier,
            "folds": self.folds,
            "checkpoint": self.checkpoint,
            "size": self.size,
            "kernel": self.kernel_size,
            "stage": str(self.stage),
            "patch_size": list(self.prep.patch_size),
            "target_spacing": list(self.prep.target_spacing),
            "use_mirroring": self.use_mirroring,
            "step_size": self.step_size,
            "roles": list(self._roles),
            "labels": list(self._labels),
        }

