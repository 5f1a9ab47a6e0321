"""U-Mamba networks (UMambaBot, UMambaEnc) that load the official U-Mamba checkpoints, without ``mamba_ssm``.

U-Mamba (bowang-lab/U-Mamba) is a fork of nnU-Net 2.1.1 whose trainers ``nnUNetTrainerUMambaBot``,
``nnUNetTrainerUMambaEnc`` and ``nnUNetTrainerUMambaEncNoAMP`` build their own networks. Its results folders are
ordinary nnU-Net v2 folders, but nnunetv2 2.8 cannot build those networks (the trainers are not part of it, their
``build_network_architecture`` signature is the old one, and they need ``mamba_ssm``'s CUDA kernels). This module
rebuilds them:

* the module tree (attribute names, ``nn.Sequential``/``nn.ModuleList`` indices) is the official one, so that the
  official ``network_weights`` load with ``strict=True``; this includes the aliases that the official tree has
  because the decoder keeps a reference to the encoder (``decoder.encoder.*``) and because dynamic-network-
  architectures' ``ConvDropoutNormReLU`` lists its layers twice (``conv``/``norm``/``nonlin`` and
  ``all_modules.N``);
* the residual blocks are re-implemented here with the same parameters and arithmetic as dynamic-network-
  architectures' ``BasicBlockD`` (stride 1, same width: the only form U-Mamba uses), so the key layout cannot drift
  with that package's versions;
* ``MambaLayer`` uses :class:`BraTSEnsembleLib.members.mamba.Mamba` (pure torch, chunked scan, ``mamba_ssm``'s
  kernel on CUDA when available) and runs in float32 with autocast off, as the official layer does.

The forward behaves like an nnU-Net network: (B, C, [z,] y, x) -> logits (B, K, [z,] y, x); with deep supervision
a list of logits, full resolution first. ``decoder.deep_supervision`` can be switched like nnU-Net's.

The networks follow U-Mamba's current code (``nets/UMambaBot_3d.py``, ``UMambaEnc_3d.py`` and the 2d variants,
March 2024 on). The first release (January 2024, ``nets/UMambaBot.py``) built a different tree; its checkpoints
will not load (``load_state_dict`` reports the mismatching keys).
"""
from __future__ import annotations

import math
from copy import deepcopy
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .mamba import Mamba

__all__ = [
    "UMAMBA_TRAINERS",
    "is_umamba_trainer",
    "build_umamba_network",
    "umamba_architecture_from_plans",
    "UMambaBot",
    "UMambaEnc",
    "MambaLayer",
]

#: Trainer name -> network class name.
UMAMBA_TRAINERS = {
    "nnUNetTrainerUMambaBot": "UMambaBot",
    "nnUNetTrainerUMambaEnc": "UMambaEnc",
    "nnUNetTrainerUMambaEncNoAMP": "UMambaEnc",
}

IntOrSeq = Union[int, Sequence[int]]


def is_umamba_trainer(trainer_name: str) -> bool:
    """True for the U-Mamba trainers this module can build networks for."""
    return trainer_name in UMAMBA_TRAINERS


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------

def _conv_op(dim: int):
    if dim == 2:
        return nn.Conv2d
    if dim == 3:
        return nn.Conv3d
    raise ValueError(f"U-Mamba networks are 2d or 3d, not {dim}d")


def _norm_op(dim: int):
    return nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d


def _as_list(value: IntOrSeq, dim: int) -> List[int]:
    if isinstance(value, (int,)) or (hasattr(value, "ndim") and getattr(value, "ndim") == 0):
        return [int(value)] * dim
    out = [int(v) for v in value]
    if len(out) != dim:
        raise ValueError(f"expected {dim} values, got {list(value)}")
    return out


def _norm(dim: int, channels: int) -> nn.Module:
    # U-Mamba hard-codes instance norm (eps 1e-5, affine) and LeakyReLU(0.01, inplace) whatever the plans say.
    return _norm_op(dim)(channels, eps=1e-5, affine=True)


def _act() -> nn.Module:
    return nn.LeakyReLU(negative_slope=0.01, inplace=True)


class ConvNormAct(nn.Module):
    """Conv -> InstanceNorm [-> LeakyReLU], registered both by name and as ``all_modules`` (the dynamic-network-
    architectures ``ConvDropoutNormReLU`` layout, which is where the ``*.all_modules.N.*`` keys come from)."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], bias: bool, with_act: bool):
        super().__init__()
        kernel = list(kernel)
        self.conv = _conv_op(dim)(in_ch, out_ch, kernel, 1, padding=[(k - 1) // 2 for k in kernel], bias=bias)
        self.norm = _norm(dim, out_ch)
        layers = [self.conv, self.norm]
        if with_act:
            self.nonlin = _act()
            layers.append(self.nonlin)
        self.all_modules = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class ResBlockD(nn.Module):
    """Residual block with identity skip (dynamic-network-architectures' ``BasicBlockD`` with stride 1 and equal
    widths): ``act(norm(conv(act(norm(conv(x))))) + x)``; attributes ``conv1``, ``conv2``, ``nonlin2``."""

    def __init__(self, dim: int, channels: int, kernel: Sequence[int], conv_bias: bool):
        super().__init__()
        self.conv1 = ConvNormAct(dim, channels, channels, kernel, conv_bias, with_act=True)
        self.conv2 = ConvNormAct(dim, channels, channels, kernel, conv_bias, with_act=False)
        self.nonlin2 = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += x
        return self.nonlin2(out)


class BasicResBlock(nn.Module):
    """U-Mamba's first block of a stage: conv1 (maybe strided) -> norm1 -> act1 -> conv2 -> norm2, plus the input
    (through the 1x1 ``conv3`` when present), then act2. All convolutions have a bias."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int],
                 use_1x1conv: bool = True):
        super().__init__()
        conv = _conv_op(dim)
        kernel = list(kernel)
        pad = [k // 2 for k in kernel]
        self.conv1 = conv(in_ch, out_ch, kernel, stride=list(stride), padding=pad)
        self.norm1 = _norm(dim, out_ch)
        self.act1 = _act()
        self.conv2 = conv(out_ch, out_ch, kernel, padding=pad)
        self.norm2 = _norm(dim, out_ch)
        self.act2 = _act()
        self.conv3 = conv(in_ch, out_ch, kernel_size=1, stride=list(stride)) if use_1x1conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        y += self.conv3(x) if self.conv3 is not None else x
        return self.act2(y)


def _stage(dim: int, in_ch: int, out_ch: int, kernel, stride, n_blocks: int, conv_bias: bool) -> nn.Sequential:
    return nn.Sequential(BasicResBlock(dim, in_ch, out_ch, kernel, stride, use_1x1conv=True),
                         *[ResBlockD(dim, out_ch, kernel, conv_bias) for _ in range(n_blocks - 1)])


class UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling by the stage stride, then a 1x1 convolution (``conv``, with bias)."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, scale: Sequence[int]):
        super().__init__()
        self.conv = _conv_op(dim)(in_ch, out_ch, kernel_size=1)
        self.pool_op_kernel_size = list(scale)
        self.mode = "nearest"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.pool_op_kernel_size, mode=self.mode))


class MambaLayer(nn.Module):
    """LayerNorm + Mamba over the flattened feature map, in float32 with autocast off. Replaces its input.

    Voxel tokens (default): (B, C, *S) -> (B, prod(S), C) tokens of width C = ``dim``. Channel tokens
    (``channel_token=True``, UMambaEnc stages with no more voxels than channels): (B, C, *S) -> C tokens of width
    prod(S) = ``dim``, so such a layer only accepts that exact feature-map size (the training patch size).
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, channel_token: bool = False):
        super().__init__()
        self.dim = int(dim)
        self.norm = nn.LayerNorm(self.dim)
        self.mamba = Mamba(d_model=self.dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.channel_token = bool(channel_token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            b, c = x.shape[:2]
            spatial = x.shape[2:]
            if self.channel_token:
                if spatial.numel() != self.dim:
                    raise ValueError(f"this channel-token Mamba layer was built for feature maps of {self.dim} "
                                     f"voxels (the training patch size); got {tuple(spatial)}")
                tokens = x.reshape(b, c, self.dim)
                return self.mamba(self.norm(tokens)).reshape(b, c, *spatial)
            if c != self.dim:
                raise ValueError(f"Mamba layer of width {self.dim} got {c} channels")
            tokens = x.reshape(b, c, spatial.numel()).transpose(1, 2)
            out = self.mamba(self.norm(tokens))
            return out.transpose(1, 2).reshape(b, c, *spatial)


# --------------------------------------------------------------------------------------------------------------
# Encoder, decoder, networks
# --------------------------------------------------------------------------------------------------------------

class _ResEncoder(nn.Module):
    """Residual encoder shared by both networks: ``stem``, ``stages`` and (UMambaEnc only) ``mamba_layers``."""

    def __init__(self, dim: int, input_channels: int, features: List[int], kernels: List[List[int]],
                 strides: List[List[int]], n_blocks: List[int], conv_bias: bool,
                 stages_as_module_list: bool):
        super().__init__()
        n_stages = len(features)
        self.conv_op = _conv_op(dim)
        self.dim = dim
        self.kernel_sizes = kernels
        self.conv_pad_sizes = [[k // 2 for k in kern] for kern in kernels]
        self.strides = strides
        self.output_channels = list(features)
        self.conv_bias = conv_bias
        self.return_skips = True
        self.stem = nn.Sequential(
            BasicResBlock(dim, input_channels, features[0], kernels[0], [1] * dim, use_1x1conv=True),
            *[ResBlockD(dim, features[0], kernels[0], conv_bias) for _ in range(n_blocks[0] - 1)])
        stages, previous = [], features[0]
        for s in range(n_stages):
            stages.append(_stage(dim, previous, features[s], kernels[s], strides[s], n_blocks[s], conv_bias))
            previous = features[s]
        # UMambaBot's encoder holds its stages in an nn.Sequential, UMambaEnc's in an nn.ModuleList (same keys).
        self.stages = nn.ModuleList(stages) if stages_as_module_list else nn.Sequential(*stages)
        self.mamba_layers: Optional[nn.ModuleList] = None

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if self.mamba_layers is not None:
                x = self.mamba_layers[s](x)
            skips.append(x)
        return skips


class _ResDecoder(nn.Module):
    """Decoder: per stage ``upsample_layers[s]`` (nearest + 1x1), concatenation with the skip, ``stages[s]``
    (a BasicResBlock on 2x channels, then residual blocks) and ``seg_layers[s]`` (1x1 with bias). Holds the encoder
    as ``encoder`` (hence the ``decoder.encoder.*`` keys). In 2d U-Mamba the last stage takes no skip."""

    def __init__(self, encoder: _ResEncoder, num_classes: int, n_conv_per_stage: List[int], deep_supervision: bool):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.encoder = encoder
        self.num_classes = num_classes
        dim = encoder.dim
        n_enc = len(encoder.output_channels)
        self.last_stage_without_skip = dim == 2
        stages, ups, segs = [], [], []
        for s in range(1, n_enc):
            below = encoder.output_channels[-s]
            skip = encoder.output_channels[-(s + 1)]
            ups.append(UpsampleLayer(dim, below, skip, encoder.strides[-s]))
            in_ch = skip if (self.last_stage_without_skip and s == n_enc - 1) else 2 * skip
            kernel = encoder.kernel_sizes[-(s + 1)]
            stages.append(nn.Sequential(
                BasicResBlock(dim, in_ch, skip, kernel, [1] * dim, use_1x1conv=True),
                *[ResBlockD(dim, skip, kernel, encoder.conv_bias) for _ in range(n_conv_per_stage[s - 1] - 1)]))
            segs.append(encoder.conv_op(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.upsample_layers = nn.ModuleList(ups)
        self.seg_layers = nn.ModuleList(segs)

    def forward(self, skips: List[torch.Tensor]):
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s in range(len(self.stages)):
            x = self.upsample_layers[s](x)
            if not (self.last_stage_without_skip and s == last):
                x = torch.cat((x, skips[-(s + 2)]), 1)
            x = self.stages[s](x)
            if self.deep_supervision:
                outputs.append(self.seg_layers[s](x))
            elif s == last:
                outputs.append(self.seg_layers[-1](x))
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]


def _blocks_per_stage(n_conv_per_stage: IntOrSeq, n_conv_per_stage_decoder: IntOrSeq, n_stages: int):
    """U-Mamba keeps one block in the deeper half of the encoder and of the decoder."""
    enc = [int(n_conv_per_stage)] * n_stages if isinstance(n_conv_per_stage, int) else [int(v) for v in
                                                                                       n_conv_per_stage]
    dec = ([int(n_conv_per_stage_decoder)] * (n_stages - 1) if isinstance(n_conv_per_stage_decoder, int)
           else [int(v) for v in n_conv_per_stage_decoder])
    if len(enc) != n_stages or len(dec) != n_stages - 1:
        raise ValueError(f"{n_stages} stages need {n_stages} encoder and {n_stages - 1} decoder block counts, "
                         f"got {enc} and {dec}")
    for s in range(math.ceil(n_stages / 2), n_stages):
        enc[s] = 1
    for s in range(math.ceil((n_stages - 1) / 2 + 0.5), n_stages - 1):
        dec[s] = 1
    return enc, dec


class _UMambaBase(nn.Module):
    def __init__(self, input_channels: int, features_per_stage: Sequence[int], kernel_sizes, strides,
                 n_conv_per_stage: IntOrSeq, num_classes: int, n_conv_per_stage_decoder: IntOrSeq,
                 conv_bias: bool, deep_supervision: bool, stages_as_module_list: bool):
        super().__init__()
        n_stages = len(features_per_stage)
        dim = len(list(kernel_sizes[0]))
        kernels = [_as_list(k, dim) for k in kernel_sizes]
        strides = [_as_list(s, dim) for s in strides]
        if len(kernels) != n_stages or len(strides) != n_stages:
            raise ValueError("kernel_sizes and strides need one entry per stage")
        enc_blocks, dec_blocks = _blocks_per_stage(n_conv_per_stage, n_conv_per_stage_decoder, n_stages)
        self.n_blocks_per_stage = enc_blocks
        self.n_conv_per_stage_decoder = dec_blocks
        self.encoder = _ResEncoder(dim, input_channels, [int(f) for f in features_per_stage], kernels, strides,
                                   enc_blocks, conv_bias, stages_as_module_list)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.decoder.deep_supervision = bool(value)


class UMambaBot(_UMambaBase):
    """Residual U-Net with one Mamba layer (``mamba_layer``) on the deepest feature map, replacing it."""

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], kernel_sizes, strides,
                 n_conv_per_stage: IntOrSeq, num_classes: int, n_conv_per_stage_decoder: IntOrSeq,
                 conv_bias: bool = True, deep_supervision: bool = False):
        super().__init__(input_channels, features_per_stage, kernel_sizes, strides, n_conv_per_stage, num_classes,
                         n_conv_per_stage_decoder, conv_bias, deep_supervision, stages_as_module_list=False)
        self.mamba_layer = MambaLayer(dim=int(features_per_stage[-1]))
        self.decoder = _ResDecoder(self.encoder, num_classes, self.n_conv_per_stage_decoder, deep_supervision)

    def forward(self, x: torch.Tensor):
        skips = self.encoder(x)
        skips[-1] = self.mamba_layer(skips[-1])
        return self.decoder(skips)


class UMambaEnc(_UMambaBase):
    """Residual U-Net with a Mamba layer after every encoder stage (``encoder.mamba_layers[s]``; in 2d only every
    other stage, ending with the last, the others being ``nn.Identity``). A stage whose feature map has no more
    voxels than channels uses channel tokens, so the network is tied to ``input_size`` (the plans' patch size)."""

    def __init__(self, input_size: Sequence[int], input_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes, strides, n_conv_per_stage: IntOrSeq, num_classes: int,
                 n_conv_per_stage_decoder: IntOrSeq, conv_bias: bool = True, deep_supervision: bool = False):
        super().__init__(input_channels, features_per_stage, kernel_sizes, strides, n_conv_per_stage, num_classes,
                         n_conv_per_stage_decoder, conv_bias, deep_supervision, stages_as_module_list=True)
        enc = self.encoder
        n_stages = len(features_per_stage)
        size = [int(v) for v in input_size]
        if len(size) != enc.dim:
            raise ValueError(f"input_size {list(input_size)} is not {enc.dim}d")
        self.input_size = list(size)
        self.feature_map_sizes: List[List[int]] = []
        self.channel_token: List[bool] = []
        layers = []
        for s in range(n_stages):
            size = [i // j for i, j in zip(size, enc.strides[s])]
            voxels = math.prod(size)
            channel_token = voxels <= enc.output_channels[s]
            self.feature_map_sizes.append(list(size))
            self.channel_token.append(channel_token)
            if enc.dim == 2 and not (bool(s % 2) ^ bool(n_stages % 2)):
                layers.append(nn.Identity())
                continue
            layers.append(MambaLayer(dim=voxels if channel_token else enc.output_channels[s],
                                     channel_token=channel_token))
        enc.mamba_layers = nn.ModuleList(layers)
        self.decoder = _ResDecoder(enc, num_classes, self.n_conv_per_stage_decoder, deep_supervision)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))


# --------------------------------------------------------------------------------------------------------------
# From plans
# --------------------------------------------------------------------------------------------------------------

def _resolve_configuration(plans: dict, configuration: str, visited: tuple = ()) -> dict:
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise ValueError(f"configuration {configuration!r} is not in the plans (have {sorted(configs)})")
    if configuration in visited:
        raise ValueError(f"circular 'inherits_from' in the plans: {visited + (configuration,)}")
    config = deepcopy(configs[configuration])
    parent = config.get("inherits_from")
    if parent:
        merged = _resolve_configuration(plans, parent, visited + (configuration,))
        merged.update(config)
        config = merged
    return config


def umamba_architecture_from_plans(plans: dict, configuration: str) -> dict:
    """The architecture figures U-Mamba's network builders read from one configuration of the plans.

    Accepts nnU-Net 2.1.1's plans (``UNet_base_num_features``, ``unet_max_num_features``, ``conv_kernel_sizes``,
    ``pool_op_kernel_sizes``, ``n_conv_per_stage_encoder``/``_decoder`` in the configuration) and the newer format
    (``architecture: {network_class_name, arch_kwargs}``, which nnunetv2 >= 2.4 also writes when it converts old
    plans in place). ``inherits_from`` is resolved. Returns a dict with ``patch_size``, ``features_per_stage``,
    ``kernel_sizes``, ``strides``, ``n_conv_per_stage``, ``n_conv_per_stage_decoder``.
    """
    config = _resolve_configuration(plans, configuration)
    if "patch_size" not in config:
        raise ValueError(f"configuration {configuration!r} has no patch_size")
    patch = [int(v) for v in config["patch_size"]]
    arch = config.get("architecture")
    if isinstance(arch, dict) and "arch_kwargs" in arch:
        kw = arch["arch_kwargs"]
        try:
            n_stages = int(kw.get("n_stages", len(kw["kernel_sizes"])))
            features = kw["features_per_stage"]
            features = [int(features)] * n_stages if isinstance(features, int) else [int(f) for f in features]
            n_enc = kw.get("n_conv_per_stage", kw.get("n_blocks_per_stage"))
            if n_enc is None:
                raise KeyError("n_conv_per_stage")
            result = {"kernel_sizes": kw["kernel_sizes"], "strides": kw["strides"], "features_per_stage": features,
                      "n_conv_per_stage": n_enc, "n_conv_per_stage_decoder": kw["n_conv_per_stage_decoder"]}
        except KeyError as err:
            raise ValueError(f"configuration {configuration!r}: architecture lacks {err}") from None
    else:
        try:
            kernels = config["conv_kernel_sizes"]
            n_stages = len(kernels)
            base, top = int(config["UNet_base_num_features"]), int(config["unet_max_num_features"])
            result = {"kernel_sizes": kernels, "strides": config["pool_op_kernel_sizes"],
                      "features_per_stage": [min(base * 2 ** i, top) for i in range(n_stages)],
                      "n_conv_per_stage": config["n_conv_per_stage_encoder"],
                      "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"]}
        except KeyError as err:
            raise ValueError(f"configuration {configuration!r} lacks {err} (neither nnU-Net 2.1 nor 2.4+ plans?)") \
                from None
    result["patch_size"] = patch
    result["kernel_sizes"] = [[int(k) for k in kern] for kern in result["kernel_sizes"]]
    result["strides"] = [[int(k) for k in st] for st in result["strides"]]
    if any(len(k) != len(patch) for k in result["kernel_sizes"] + result["strides"]):
        raise ValueError(f"configuration {configuration!r}: kernel sizes/strides do not match a "
                         f"{len(patch)}d patch")
    return result


def build_umamba_network(trainer_name: str, plans: dict, configuration: str, num_input_channels: int,
                         num_output_channels: int, deep_supervision: bool = False) -> nn.Module:
    """The network that U-Mamba's trainer ``trainer_name`` builds for ``configuration`` of ``plans``.

    ``num_output_channels`` is the number of segmentation heads (label manager's ``num_segmentation_heads``).
    The weights are freshly initialised: load the checkpoint's ``network_weights`` with ``strict=True``.
    Raises ValueError for other trainers or unusable plans.
    """
    if not is_umamba_trainer(trainer_name):
        raise ValueError(f"{trainer_name!r} is not a U-Mamba trainer (known: {sorted(UMAMBA_TRAINERS)})")
    arch = umamba_architecture_from_plans(plans, configuration)
    common = dict(input_channels=int(num_input_channels), features_per_stage=arch["features_per_stage"],
                  kernel_sizes=arch["kernel_sizes"], strides=arch["strides"],
                  n_conv_per_stage=arch["n_conv_per_stage"], num_classes=int(num_output_channels),
                  n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"], conv_bias=True,
                  deep_supervision=bool(deep_supervision))
    if UMAMBA_TRAINERS[trainer_name] == "UMambaBot":
        return UMambaBot(**common)
    return UMambaEnc(input_size=arch["patch_size"], **common)
