"""Swin UNETR: the patch merging of each MONAI version, and the network of nnU-Net's Swin UNETR trainer.

**Patch merging changed in MONAI 1.5.** SwinUNETR's default ``downsample="merging"`` concatenates the eight
2×2×2 neighbours of each voxel before a linear layer. Up to MONAI 1.4 it took the slices (d, h, w) = (0,0,0),
(1,0,0), (0,1,0), (0,0,1), (1,0,1), (0,1,0), (0,0,1), (1,1,1) — two of them twice and (1,1,0), (0,1,1) never (MONAI
kept it so "in case of breaking existing models"; issue Project-MONAI/MONAI#8284). MONAI 1.5 (PR #8285, January
2025) replaced the repeats by the missing slices. The weights have the same names and shapes, so a checkpoint trained
with MONAI ≤ 1.4 — every BraTS Swin UNETR published up to 2024, the BraTS 2021 tutorial's and the BraTS 2023 PED and
GoAT 2024 ones included — loads into MONAI ≥ 1.5 without any error and computes something else. This module makes the
choice explicit and independent of the installed MONAI: :data:`DOWNSAMPLE_CHOICES`:

* ``"merging-legacy"`` — MONAI ≤ 1.4's ``"merging"`` (:class:`LegacyPatchMerging`);
* ``"merging"`` — MONAI ≥ 1.5's ``"merging"`` (:class:`Monai15PatchMerging`);
* ``"mergingv2"`` — MONAI's ``PatchMergingV2`` (unchanged across versions).

A MONAI-network member (``framework: "monai"``, ``"_target_": "SwinUNETR"``) takes the choice as its
``"downsample"`` argument; without one it uses ``"merging"`` (the installed MONAI's default) and warns.

**nnU-Net's Swin UNETR trainer** (``nnUNetTrainer_SwinUNETR``, the GoAT 2024 team's: ShadowTwin41/
BraTS_2023_2024_solutions, trained with nnU-Net v2) builds its network in code: MONAI's SwinUNETR as of MONAI 1.3
(``feature_size=48``, ``img_size`` 128³, legacy patch merging) with four more output heads for deep supervision
(``out_dec0`` … ``out_dec3``, 1×1×1 convolutions on the decoder features of widths 1, 2, 4, 8 × feature size) that
are used only in training; at inference its output is SwinUNETR's own. :func:`nnunet_swinunetr_network` builds that
network with those heads, so its checkpoints load strictly, and the nnU-Net member runs it through nnU-Net's own
predictor like any other nnU-Net network.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: Slices (d, h, w offsets) concatenated by MONAI ≤ 1.4's "merging" (two repeated, two never taken).
LEGACY_MERGING_ORDER: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
#: Slices concatenated by MONAI ≥ 1.5's "merging".
MONAI15_MERGING_ORDER: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))

#: The trainer of the GoAT 2024 Swin UNETR and its fixed architecture.
SWIN_TRAINER_FEATURE_SIZE = 48
DEEP_SUPERVISION_WIDTHS: tuple[int, ...] = (1, 2, 4, 8)  # out_dec0 … out_dec3, × feature size


def _patch_merging_base() -> type[nn.Module]:
    from monai.networks.nets.swin_unetr import PatchMergingV2

    return PatchMergingV2


class _OrderedPatchMerging(_patch_merging_base()):  # type: ignore[misc]
    """MONAI's patch merging with an explicit slice order (3-D inputs; 2-D ones as MONAI's PatchMergingV2)."""

    ORDER: tuple[tuple[int, int, int], ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:  # MONAI pads odd sizes at the end
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.ORDER], -1)
        return self.reduction(self.norm(x))


class LegacyPatchMerging(_OrderedPatchMerging):
    """SwinUNETR's ``"merging"`` as MONAI ≤ 1.4 computed it (module docstring)."""

    ORDER = LEGACY_MERGING_ORDER


class Monai15PatchMerging(_OrderedPatchMerging):
    """SwinUNETR's ``"merging"`` as MONAI ≥ 1.5 computes it (module docstring)."""

    ORDER = MONAI15_MERGING_ORDER


#: The manifest's ``downsample`` values for SwinUNETR networks → what SwinUNETR is built with.
DOWNSAMPLE_CHOICES: dict[str, Any] = {"merging-legacy": LegacyPatchMerging, "merging": Monai15PatchMerging,
                                      "mergingv2": "mergingv2"}


def is_swinunetr_class(cls: type) -> bool:
    """True for MONAI's SwinUNETR (the networks whose patch merging depends on the MONAI version)."""
    return cls.__name__ == "SwinUNETR"


def swinunetr_arguments(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """SwinUNETR's constructor arguments with ``downsample`` resolved (:data:`DOWNSAMPLE_CHOICES`; absent: MONAI ≥
    1.5's ``"merging"``). Raises ValueError for another value."""
    resolved = dict(kwargs)
    choice = resolved.get("downsample", "merging")
    if not isinstance(choice, str) or choice not in DOWNSAMPLE_CHOICES:
        raise ValueError(f"SwinUNETR's downsample must be one of {', '.join(DOWNSAMPLE_CHOICES)}, got {choice!r} "
                         '("merging-legacy" for checkpoints trained with MONAI 1.4 or older)')
    resolved["downsample"] = DOWNSAMPLE_CHOICES[choice]
    return resolved


def unstated_merging_warning(where: str) -> str:
    """The warning for a SwinUNETR member whose manifest does not say which patch merging it was trained with."""
    return (f"{where}: SwinUNETR without \"downsample\": using MONAI 1.5's patch merging. A checkpoint trained with "
            "MONAI 1.4 or older (every BraTS Swin UNETR published up to 2024) needs \"downsample\": "
            "\"merging-legacy\": it loads either way, but gives other outputs with the wrong one. State it in the "
            "manifest to silence this warning.")


def is_swinunetr_trainer(trainer_name: str) -> bool:
    """True for nnU-Net trainers that build a Swin UNETR in code (``nnUNetTrainer_SwinUNETR``)."""
    return "SwinUNETR" in trainer_name


def _swinunetr_class() -> type[nn.Module]:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR


class NnUNetSwinUNETR(_swinunetr_class()):  # type: ignore[misc]
    """The network of ``nnUNetTrainer_SwinUNETR`` at inference: MONAI's SwinUNETR (legacy patch merging) plus the
    trainer's deep-supervision heads, which hold weights in its checkpoints but do not take part in the output."""

    def __init__(self, in_channels: int, out_channels: int,
                 feature_size: int = SWIN_TRAINER_FEATURE_SIZE) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                         downsample=LegacyPatchMerging)
        from monai.networks.blocks import UnetOutBlock

        for index, width in enumerate(DEEP_SUPERVISION_WIDTHS):
            self.add_module(f"out_dec{index}", UnetOutBlock(spatial_dims=3, in_channels=feature_size * width,
                                                            out_channels=out_channels))


def nnunet_swinunetr_network(trainer_name: str, num_inputs: int, num_outputs: int) -> nn.Module:
    """The network that ``trainer_name`` (a Swin UNETR trainer, :func:`is_swinunetr_trainer`) trains, for nnU-Net's
    predictor: logits of the (B, C, *patch*) input, no deep supervision."""
    if not is_swinunetr_trainer(trainer_name):
        raise ValueError(f"{trainer_name} is not a Swin UNETR trainer")
    return NnUNetSwinUNETR(num_inputs, num_outputs)
