"""TorchScript files and MONAI networks as ensemble members, run with MONAI's sliding-window inference.

Two file formats, named by the manifest's ``framework``:

* ``"torchscript"`` — a TorchScript archive written by ``torch.jit.save(torch.jit.script(network), path)`` (or of
  ``torch.jit.trace``), e.g. the ``models/model.ts`` of a MONAI bundle. It is read with
  ``torch.jit.load(path, map_location=device)``. A TorchScript file is a program of torch operators (no Python code
  runs from it), but it is still code (``torch.from_file(…, shared=True)`` writes files, for one): it runs only
  when the user trusts that file (``--trust-checkpoint FILE``, or the Slicer module's question), never because a
  manifest names it; otherwise the member is refused when it is built (:mod:`BraTSEnsembleLib.trust`).
* ``"monai"`` — a **state-dict checkpoint** written by ``torch.save(network.state_dict(), path)``, e.g. the
  ``models/model.pt`` of a MONAI bundle, or a dictionary holding such a state dict under one of the keys
  ``state_dict``, ``model``, ``network``, ``net``, ``network_weights``, ``model_state_dict``. It is read with
  ``torch.load(weights_only=True)`` (:func:`BraTSEnsembleLib.checkpoints.load_checkpoint`): nothing in the file is
  executed. The network is a class of ``monai.networks.nets`` named in the manifest with its constructor arguments,
  ``{"_target_": "SegResNet", "in_channels": 4, "out_channels": 3, …}`` (``"monai.networks.nets.SegResNet"`` works
  too); no other import is ever made, and bundle expressions (``"$…"``, ``"@…"``, ``"%…"``) are refused, as are
  arguments that would download or read weights (``pretrained``, ``pretrained_url``, paths, URLs: see
  :func:`BraTSEnsembleLib.allowlist.refuse_file_arguments`). The weights are loaded strictly (a ``module.`` prefix
  from DataParallel training is removed).

``path`` is the file itself, or a folder holding exactly one ``.ts``/``.pt``/``.pth``/``.ckpt`` file (what a
downloaded archive extracts to).

**The network's contract.** It takes a float32 batch (B, C, *roi_size*) whose C channels are the images of
``channel_roles`` in that order, on the model's axes (``axis_order``), and returns logits (B, K, *roi_size*) — or a
tuple/list whose first element is that (deep supervision). K must be the number of channels the manifest declares.

**Inference** (what a MONAI bundle's inference does, without reorientation):

1. the case's images (z, y, x) are put in the model's axis order: ``"xyz"`` (default; arrays as MONAI's
   ``LoadImage``/nibabel give them) or ``"zyx"`` (SimpleITK/nnU-Net array order). The images are used in their stored
   voxel orientation: no reorientation to RAS is made;
2. optionally resampled to ``target_spacing`` (mm, in the model's axis order) with MONAI's ``Spacing`` (bilinear);
3. normalised with MONAI's ``NormalizeIntensity``: ``"zscore-nonzero"`` (``nonzero=True, channel_wise=True``, the
   BraTS bundle's; zero voxels stay 0), ``"zscore"`` (``channel_wise=True`` over all voxels) or ``"none"``;
4. logits from ``monai.inferers.sliding_window_inference`` (``roi_size``, ``overlap``, ``sw_batch_size``, ``mode``
   ``"constant"`` or ``"gaussian"``; defaults are MONAI's ``SlidingWindowInferer`` defaults: overlap 0.25, batch 1,
   constant). With ``mirroring`` each window's logits are averaged over the 8 flips of the three spatial axes
   (default off: MONAI bundles do not mirror);
5. the logits are brought back with the inverse of step 2 (MONAI's ``Spacing.inverse``), the activation is applied
   (``"softmax"`` over channels, or ``"sigmoid"`` per channel) and the axes are put back in the case's (z, y, x)
   order.

**Checked when the model set is built.** A ``monai`` network is built without its weights and run on one window of
"meta" tensors (shapes only, no arithmetic): arguments it refuses, a ``roi_size`` it does not take (Swin UNETR:
multiples of 32) and an output that is not one channel per declared class or region on the window's grid are refused
then, before any member runs. Networks whose code cannot run on "meta" tensors, and TorchScript files, are checked
when they run. SwinUNETR's patch merging depends on the MONAI version it was trained with: see
:mod:`BraTSEnsembleLib.members.swinunetr` (``"downsample": "merging-legacy"`` for MONAI ≤ 1.4 checkpoints).

**Channel semantics.** ``activation: "softmax"`` — label space: ``class_labels`` maps every output channel to a
distinct BraTS label 0-4 (as MedNeXt's ``class_labels``). ``activation: "sigmoid"`` — nested-region space:
``regions`` names the region of each output channel, each of WT, TC and ET once, in channel order; the BraTS MONAI
bundle's three sigmoid channels are ``["TC", "WT", "ET"]``.

**CUDA out of memory.** The sliding window first keeps its inputs and the stitched logits on the device; on CUDA
out-of-memory the cache is emptied and the member is run again with the windows on the device and the stitching on
the CPU, and says so (progress message and a RuntimeWarning); see :func:`.base.with_cpu_results_on_oom`.
"""
from __future__ import annotations

import inspect
import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..allowlist import refuse_file_arguments
from ..checkpoints import load_checkpoint
from ..errors import InputError, ModelError
from ..labels import BACKGROUND, LABEL_NAMES
from ..limits import OVERLAP_RANGE, SPACING_RANGE_MM, is_real_number
from ..roles import channel_role, ensure_roles_available
from ..timing import stage
from ..trust import TrustedFiles, trust_advice
from .base import (LABEL_SPACE, NESTED_REGIONS, REGION_SPACE, REGION_WRITES, Probabilities, StepReporter,
                   with_cpu_results_on_oom)
from .progress import AFTER_WINDOW, TileProgress, monai_window_count

FRAMEWORKS: tuple[str, ...] = ("torchscript", "monai")
ACTIVATIONS: tuple[str, ...] = ("softmax", "sigmoid")
BLEND_MODES: tuple[str, ...] = ("constant", "gaussian")
NORMALIZATIONS: tuple[str, ...] = ("zscore-nonzero", "zscore", "none")
AXIS_ORDERS: tuple[str, ...] = ("xyz", "zyx")
MODEL_FILE_SUFFIXES: tuple[str, ...] = (".ts", ".pt", ".pth", ".ckpt")
#: Keys under which training scripts commonly nest the state dict in a checkpoint dictionary.
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model", "network", "net", "network_weights", "model_state_dict")


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlidingWindowSettings:
    """How a member prepares its input and runs the sliding window (see the module docstring)."""

    roi_size: tuple[int, int, int]
    normalization: str
    overlap: float = 0.25
    sw_batch_size: int = 1
    mode: str = "constant"
    target_spacing: tuple[float, float, float] | None = None
    axis_order: str = "xyz"
    mirroring: bool = False

    def __post_init__(self) -> None:
        if len(self.roi_size) != 3 or any(int(s) != s or s < 1 for s in self.roi_size):
            raise ValueError(f"roi_size must be three positive integers, got {list(self.roi_size)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if int(self.sw_batch_size) != self.sw_batch_size or self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive integer, got {self.sw_batch_size}")
        if self.mode not in BLEND_MODES:
            raise ValueError(f"mode must be one of {', '.join(BLEND_MODES)}, got {self.mode!r}")
        if self.target_spacing is not None and (len(self.target_spacing) != 3
                                                or any(not s > 0 for s in self.target_spacing)):
            raise ValueError(f"target_spacing must be three positive numbers, got {self.target_spacing}")
        if self.axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {', '.join(AXIS_ORDERS)}, got {self.axis_order!r}")


def channel_semantics(activation: str, class_labels: Mapping[int, int] | None,
                      regions: Sequence[str] | None) -> tuple[str, tuple[Hashable, ...]]:
    """``(space, name of each output channel)`` from the activation and the channel mapping.

    softmax: ``class_labels`` {output channel: BraTS label} must name channels 0..n-1 with distinct labels 0-4;
    sigmoid: ``regions`` must list WT, TC and ET once each, in channel order. Raises ValueError otherwise.
    """
    if activation == "softmax":
        if regions is not None or not class_labels:
            raise ValueError("a softmax network needs class_labels (output channel → BraTS label), not regions")
        keys = sorted(int(k) for k in class_labels)
        if keys != list(range(len(keys))):
            raise ValueError(f"class_labels must name every output channel 0..{len(keys) - 1}, got channels {keys}")
        labels = tuple(int(class_labels[c]) for c in keys)
        if len(set(labels)) != len(labels) or any(label not in LABEL_NAMES for label in labels):
            raise ValueError(f"class_labels must map the channels to distinct BraTS labels 0-4, got {labels}")
        return LABEL_SPACE, labels
    if activation == "sigmoid":
        if class_labels is not None or not regions:
            raise ValueError("a sigmoid network needs regions (the region of each output channel), not class_labels")
        names = tuple(str(r) for r in regions)
        if sorted(names) != sorted(NESTED_REGIONS):
            raise ValueError(f"regions must list each of {', '.join(NESTED_REGIONS)} once, in the network's channel "
                             f"order, got {list(names)}")
        return REGION_SPACE, names
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


# ----------------------------------------------------------------------------------------------------------------
# MONAI network classes (no import outside monai.networks.nets)
# ----------------------------------------------------------------------------------------------------------------

_NETS_PREFIX = "monai.networks.nets."


def monai_network_class(target: str) -> type[nn.Module]:
    """The class ``target`` (``"SegResNet"`` or ``"monai.networks.nets.SegResNet"``) of ``monai.networks.nets``.

    Raises ValueError for anything else: another module, a function, an unknown name.
    """
    import monai.networks.nets as nets

    name = target[len(_NETS_PREFIX):] if target.startswith(_NETS_PREFIX) else target
    found = getattr(nets, name, None) if name.isidentifier() else None
    if not (inspect.isclass(found) and issubclass(found, nn.Module)
            and found.__module__.startswith(_NETS_PREFIX.rstrip("."))):
        raise ValueError(f"{target!r} is not a network class of monai.networks.nets")
    return found


def _expressions(value: Any, where: str = "") -> list[str]:
    """Places in a JSON value that hold bundle-config syntax (``$`` expressions, ``@``/``%`` references) or nested
    ``_target_`` objects: none of those is evaluated here."""
    found = []
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        found.append(f"{where or 'value'} = {value!r}")
    elif isinstance(value, dict):
        if "_target_" in value:
            found.append(f"{where or 'value'} (a nested _target_)")
        for key, item in value.items():
            found.extend(_expressions(item, f"{where}.{key}" if where else str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_expressions(item, f"{where}[{index}]"))
    return found


def check_network_spec(spec: Mapping[str, Any], n_inputs: int, n_outputs: int) -> tuple[type[nn.Module], dict]:
    """``(class, keyword arguments)`` of a manifest's ``network`` object, checked without building the network:
    the class is in ``monai.networks.nets``, the arguments fit its signature and hold plain JSON values, and its
    ``in_channels``/``out_channels`` (given or default) match the manifest's channels. Raises ValueError."""
    target = spec.get("_target_")
    if not isinstance(target, str):
        raise ValueError('network needs "_target_": the name of a class of monai.networks.nets')
    cls = monai_network_class(target)
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    evaluated = _expressions(kwargs)
    if evaluated:
        raise ValueError(f"network arguments {', '.join(evaluated)} need evaluation, which is not done here")
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__} does not take these arguments ({exc})") from exc
    refuse_file_arguments(cls, kwargs)
    for key, expected, what in (("in_channels", n_inputs, "channel_roles names"),
                                ("out_channels", n_outputs, "the manifest declares")):
        parameter = signature.parameters.get(key)
        value = kwargs.get(key, parameter.default if parameter is not None else None)
        if isinstance(value, int) and value != expected:
            given = "" if key in kwargs else " (its default)"
            raise ValueError(f"{cls.__name__} has {key}={value}{given} but {what} {expected} channel(s)")
    from .swinunetr import is_swinunetr_class, swinunetr_arguments

    if is_swinunetr_class(cls):  # its patch merging depends on the MONAI version: see members/swinunetr.py
        kwargs = swinunetr_arguments(kwargs)
    return cls, kwargs


# ----------------------------------------------------------------------------------------------------------------
# Manifest options
# ----------------------------------------------------------------------------------------------------------------

#: ``fail(problem, fix)`` → the exception to raise (the manifest checker's, naming manifest and member).
ManifestFail = Callable[[str, str], Exception]


def _positive_ints(value: Any, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and is_real_number(value)  # finite: JSON NaN/Infinity are refused


def manifest_options(framework: str, raw: Mapping[str, Any], class_labels: Mapping[int, int] | None,
                     fail: ManifestFail) -> dict[str, Any]:
    """Constructor arguments of a ``torchscript``/``monai`` member from its manifest entry (without ``path``,
    ``name`` and ``mirroring``), checked before anything is read. ``class_labels`` is the manifest's mapping
    already parsed (class names resolved), or None."""
    roles = raw.get("channel_roles")
    roles_fix = 'Write e.g. "channel_roles": ["t2f", "t1c", "t1n", "t2w"]: the role of each input channel in order.'
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r.strip() for r in roles):
        raise fail("channel_roles must be a non-empty list of role names" if "channel_roles" in raw
                   else "no channel_roles (a network file does not say which sequence each input channel is)",
                   roles_fix)
    mapped = [channel_role(r) for r in roles]
    if len(set(mapped)) != len(mapped):
        raise fail(f"channel_roles {roles} name one role twice", roles_fix)

    activation = raw.get("activation")
    if activation not in ACTIVATIONS:
        raise fail(f"activation must be \"softmax\" or \"sigmoid\", got {activation!r}",
                   'Write "activation": "softmax" (one channel per label) or "sigmoid" (one channel per region).')
    regions = raw.get("regions")
    if activation == "sigmoid":
        regions_fix = ('Write "regions": the region of each output channel in order, e.g. ["TC", "WT", "ET"] for '
                       "the BraTS MONAI bundle.")
        if class_labels is not None:
            raise fail("class_labels is for softmax networks", regions_fix.replace("Write", "Remove it and write"))
        if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
            raise fail("a sigmoid network needs regions" if regions is None else f"regions must be a list of "
                       f"region names, got {regions!r}", regions_fix)
        regions = [r.strip().upper() for r in regions]
    else:
        labels_fix = ('Write e.g. "class_labels": {"0": "background", "1": "NETC", "2": "SNFH", "3": "ET"}: the '
                      "BraTS label of every output channel.")
        if regions is not None:
            raise fail("regions is for sigmoid networks", labels_fix.replace("Write", "Remove it and write"))
        if class_labels is None:
            raise fail("a softmax network needs class_labels", labels_fix)
    try:
        _, channels = channel_semantics(activation, class_labels, regions)
    except ValueError as exc:
        raise fail(str(exc), "Name every output channel of the network once, in its channel order.") from exc

    roi = raw.get("roi_size")
    if not _positive_ints(roi, 3):
        raise fail("no roi_size" if roi is None else f"roi_size must be three positive integers, got {roi!r}",
                   'Write the window the network was trained for, e.g. "roi_size": [128, 128, 128] (model axes).')
    normalization = raw.get("normalization")
    if normalization not in NORMALIZATIONS:
        raise fail("no normalization" if normalization is None else f"unknown normalization {normalization!r}",
                   f"Use one of {', '.join(NORMALIZATIONS)} (the BraTS MONAI bundle: zscore-nonzero).")
    overlap = raw.get("overlap", 0.25)
    if not _number(overlap) or not OVERLAP_RANGE[0] <= overlap <= OVERLAP_RANGE[1]:
        raise fail(f"overlap must be a number between {OVERLAP_RANGE[0]:g} and {OVERLAP_RANGE[1]:g}, got "
                   f"{overlap!r}", "Use e.g. 0.5 (MONAI's default 0.25; larger overlaps multiply the windows).")
    batch = raw.get("sw_batch_size", 1)
    if not _positive_ints([batch], 1):
        raise fail(f"sw_batch_size must be a positive integer, got {batch!r}", "Use e.g. 1 (windows per forward).")
    mode = raw.get("mode", "constant")
    if mode not in BLEND_MODES:
        raise fail(f"mode must be \"constant\" or \"gaussian\", got {mode!r}", "Use MONAI's blend mode names.")
    spacing = raw.get("target_spacing")
    low, high = SPACING_RANGE_MM
    if spacing is not None and not (isinstance(spacing, list) and len(spacing) == 3
                                    and all(_number(s) and low <= s <= high for s in spacing)):
        raise fail(f"target_spacing must be three numbers between {low:g} and {high:g} (mm), got {spacing!r}",
                   'Write e.g. "target_spacing": [1.0, 1.0, 1.0], or leave it out to run on the case grid.')
    axis_order = raw.get("axis_order", "xyz")
    if axis_order not in AXIS_ORDERS:
        raise fail(f"axis_order must be \"xyz\" or \"zyx\", got {axis_order!r}",
                   'Use "xyz" for networks trained on MONAI/nibabel arrays, "zyx" for SimpleITK/nnU-Net arrays.')

    options: dict[str, Any] = {
        "channel_roles": tuple(mapped), "activation": activation,
        "class_labels": dict(class_labels) if activation == "softmax" and class_labels else None,
        "regions": tuple(regions) if activation == "sigmoid" else None,
        "roi_size": tuple(roi), "normalization": normalization, "overlap": float(overlap),
        "sw_batch_size": int(batch), "mode": mode,
        "target_spacing": tuple(float(s) for s in spacing) if spacing is not None else None,
        "axis_order": axis_order}
    if framework == "monai":
        spec = raw.get("network")
        spec_fix = ('Write e.g. "network": {"_target_": "SegResNet", "in_channels": 4, "out_channels": 3, '
                    '"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}.')
        if not isinstance(spec, dict):
            raise fail("no network" if spec is None else "network must be an object", spec_fix)
        try:
            check_network_spec(spec, len(mapped), len(channels))
        except ValueError as exc:
            raise fail(f"network: {exc}", "Name a class of monai.networks.nets with the arguments it was trained "
                       "with, as plain JSON values; in_channels/out_channels must match channel_roles and the "
                       "output channels.") from exc
        options["network"] = dict(spec)
    return options


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and the way back
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PreparedInput:
    """The network's input (C, *spatial*) on the model's axes, and what is needed to come back to the case grid."""

    data: torch.Tensor
    #: MONAI Spacing transform and its output (for ``inverse``), when the input was resampled
    spacing_transform: Any = None
    resampled: Any = None


def to_model_axes(array: np.ndarray, axis_order: str) -> np.ndarray:
    """(C, z, y, x) → (C, *model axes*): reversed spatial axes for ``"xyz"``, unchanged for ``"zyx"``."""
    return array.transpose(0, 3, 2, 1) if axis_order == "xyz" else array


def from_model_axes(array: np.ndarray, axis_order: str) -> np.ndarray:
    """Inverse of :func:`to_model_axes` (reversing the spatial axes is its own inverse)."""
    return to_model_axes(array, axis_order)


def prepare_input(images_zyx: np.ndarray, spacing_zyx: Sequence[float],
                  settings: SlidingWindowSettings) -> PreparedInput:
    """Model axes, optional resampling to the target spacing (MONAI ``Spacing``, bilinear), then MONAI
    ``NormalizeIntensity`` — the order of the BraTS MONAI bundle's transforms."""
    from monai.data import MetaTensor
    from monai.transforms import NormalizeIntensity, Spacing

    array = np.ascontiguousarray(to_model_axes(images_zyx, settings.axis_order), dtype=np.float32)
    spacing = tuple(reversed(spacing_zyx)) if settings.axis_order == "xyz" else tuple(spacing_zyx)
    data: torch.Tensor = torch.from_numpy(array)
    prepared = PreparedInput(data)
    if settings.target_spacing is not None:
        affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        transform = Spacing(pixdim=settings.target_spacing, mode="bilinear")
        resampled = transform(MetaTensor(data, affine=affine))
        prepared.spacing_transform, prepared.resampled = transform, resampled
        data = resampled.as_tensor()
    if settings.normalization != "none":
        normalise = NormalizeIntensity(nonzero=settings.normalization == "zscore-nonzero", channel_wise=True)
        data = torch.as_tensor(normalise(data))
    prepared.data = data.to(torch.float32).contiguous()
    return prepared


def logits_to_case_grid(logits: torch.Tensor, prepared: PreparedInput, activation: str,
                        axis_order: str) -> np.ndarray:
    """Logits (K, *model grid*) → probabilities (K, z, y, x) float32 on the case grid: inverse resampling (when
    the input was resampled), activation, case axis order."""
    if prepared.spacing_transform is not None:
        from monai.data import MetaTensor

        stitched = MetaTensor(logits)
        stitched.copy_meta_from(prepared.resampled, copy_attr=True)  # affine and the Spacing record, as Invertd does
        logits = prepared.spacing_transform.inverse(stitched).as_tensor()
    logits = logits.float()
    probabilities = torch.softmax(logits, dim=0) if activation == "softmax" else torch.sigmoid(logits)
    return np.ascontiguousarray(from_model_axes(probabilities.numpy(), axis_order), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Sliding window
# ----------------------------------------------------------------------------------------------------------------

def mirror_dims(mirroring: bool) -> list[tuple[int, ...]]:
    """Flip dims of a (B, C, *spatial*) batch: the empty flip, then every non-empty subset of the spatial axes."""
    if not mirroring:
        return [()]
    return [combo for r in range(4) for combo in itertools.combinations((2, 3, 4), r)]


class WindowPredictor:
    """The function MONAI's sliding window calls: the network's logits of a batch of windows, averaged over the
    mirror flips, with the output checked against the declared channels."""

    def __init__(self, network: Callable[[torch.Tensor], Any], n_outputs: int, flips: Sequence[tuple[int, ...]],
                 where: str, on_windows: Callable[[int], None] | None = None) -> None:
        self.network, self.n_outputs, self.flips, self.where = network, n_outputs, list(flips), where
        #: called with the number of windows of each batch once its logits are computed (progress)
        self.on_windows = on_windows

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"{self.where}: the network returns {type(out).__name__}, not a tensor of logits. "
                             "Export a network whose forward returns (B, K, …) logits.")
        if out.ndim != x.ndim or out.shape[1] != self.n_outputs or out.shape[2:] != x.shape[2:]:
            raise ModelError(
                f"{self.where}: the network returns shape {tuple(out.shape)} for a window of shape {tuple(x.shape)}, "
                f"but the manifest declares {self.n_outputs} output channel(s) on the window's grid. Fix "
                "class_labels/regions to name every output channel of the network (and roi_size to the size it "
                "was trained with).")
        return out.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for dims in self.flips:
            logits = self._logits(torch.flip(x, dims) if dims else x)
            logits = torch.flip(logits, dims) if dims else logits
            total = logits if total is None else total + logits
        assert total is not None
        if self.on_windows is not None:
            self.on_windows(int(x.shape[0]))
        return total / len(self.flips) if len(self.flips) > 1 else total


def sliding_window_logits(predictor: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor,
                          settings: SlidingWindowSettings, device: torch.device,
                          results_device: torch.device) -> torch.Tensor:
    """MONAI ``sliding_window_inference`` of (C, *spatial*) ``data``: windows run on ``device``; inputs and the
    stitched logits live on ``results_device``. Returns (K, *spatial*) float32 on the CPU."""
    from monai.inferers import sliding_window_inference

    inputs = data[None].to(results_device)
    with torch.inference_mode():
        logits = sliding_window_inference(inputs, list(settings.roi_size), settings.sw_batch_size, predictor,
                                          overlap=settings.overlap, mode=settings.mode, sw_device=device,
                                          device=results_device)
    assert isinstance(logits, torch.Tensor)
    return logits[0].to("cpu", torch.float32)


def _last_line(exc: BaseException) -> str:
    """The last non-empty line of an error (TorchScript puts the cause after its serialized traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


# ----------------------------------------------------------------------------------------------------------------
# Members
# ----------------------------------------------------------------------------------------------------------------

def find_model_file(path: Path) -> Path:
    """``path`` when it is a file; for a folder, its only ``.ts``/``.pt``/``.pth``/``.ckpt`` file."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelError(f"{path}: model file not found. Point path to the TorchScript file or the checkpoint.")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MODEL_FILE_SUFFIXES)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise ModelError(f"{path}: holds {what} model files ({', '.join(MODEL_FILE_SUFFIXES)}). Point path to the "
                         "file itself.")
    return found[0]


class SlidingWindowMember:
    """A network run by MONAI's sliding window (see the module docstring); subclasses say how it is loaded."""

    framework = "torchscript"

    def __init__(self, path: str | Path, channel_roles: Sequence[str], activation: str,
                 roi_size: Sequence[int], normalization: str, class_labels: Mapping[int, int] | None = None,
                 regions: Sequence[str] | None = None, overlap: float = 0.25, sw_batch_size: int = 1,
                 mode: str = "constant", target_spacing: Sequence[float] | None = None, axis_order: str = "xyz",
                 use_mirroring: bool = False, name: str | None = None, origin: str | None = None,
                 trust_checkpoint: "bool | TrustedFiles" = False) -> None:
        self.path = find_model_file(Path(path).expanduser().resolve())
        #: whether the user trusts the member's file (--trust-checkpoint FILE or a folder above it)
        self.trusted = TrustedFiles.of(trust_checkpoint).covers(self.path)
        #: files that were loaded trusted (run as TorchScript, or fully unpickled)
        self.trusted_files: list[Path] = []
        #: prefix of error messages: where the member was declared (manifest and member) and its file
        self.where = f"{origin}: {self.path}" if origin else str(self.path)
        self.name = name or self.path.stem
        self.settings = SlidingWindowSettings(
            roi_size=tuple(int(s) for s in roi_size), normalization=normalization, overlap=float(overlap),
            sw_batch_size=int(sw_batch_size), mode=mode,
            target_spacing=tuple(float(s) for s in target_spacing) if target_spacing is not None else None,
            axis_order=axis_order, mirroring=bool(use_mirroring))
        self.activation = activation
        #: class space of the probabilities that predict() returns, and the name of each output channel
        self.space, self.channels = channel_semantics(activation, class_labels, regions)
        self._roles = tuple(channel_roles)
        if not self._roles or len(set(self._roles)) != len(self._roles):
            raise ValueError(f"channel_roles must name each input channel's role once, got {list(channel_roles)}")

    @property
    def roles(self) -> tuple[str, ...]:
        """Modality roles of the network's input channels, in channel order."""
        return self._roles

    @property
    def target_spacing_zyx(self) -> tuple[float, ...] | None:
        """Spacing (z, y, x; mm) the case is resampled to, or None (the network runs on the case grid)."""
        spacing = self.settings.target_spacing
        if spacing is None:
            return None
        return tuple(reversed(spacing)) if self.settings.axis_order == "xyz" else tuple(spacing)

    @property
    def labels(self) -> tuple[int, ...]:
        """Canonical labels of the channels (softmax), or background and the labels the regions write (sigmoid)."""
        if self.space == REGION_SPACE:
            return tuple(sorted({BACKGROUND, *(REGION_WRITES[r] for r in self.channels)}))
        return tuple(int(c) for c in self.channels)  # type: ignore[arg-type]

    def load_network(self, device: torch.device) -> Callable[[torch.Tensor], Any]:
        """The network in eval mode on ``device``."""
        raise NotImplementedError

    def predict(self, case: Any, device: torch.device, report: StepReporter | None = None) -> Probabilities:
        """Probabilities (K, z, y, x) on the case grid (see the module docstring for the steps)."""
        device = torch.device(device)
        say = report or (lambda _step, _fraction=None: None)
        ensure_roles_available(self._roles, case.roles, f"model {self.name}", f"case {case.case_id}")
        say("preprocessing", 0.0)
        with stage("preprocessing"):
            images = case.stacked(self._roles)
            if tuple(images.shape[1:]) != tuple(case.shape_zyx):
                raise InputError(f"case {case.case_id}: images of shape {images.shape[1:]} do not match the case "
                                 f"grid {tuple(case.shape_zyx)}.")
            prepared = prepare_input(images, case.spacing_zyx, self.settings)
            del images
        say(f"loading {self.path.name}", 0.05)
        with stage("loading"):
            network = self.load_network(device)
        tiles = TileProgress(say, monai_window_count(prepared.data.shape[1:], self.settings.roi_size,
                                                     self.settings.overlap), f"sliding window on {device}")
        predictor = WindowPredictor(network, len(self.channels), mirror_dims(self.settings.mirroring), self.where,
                                    on_windows=tiles.advance)

        def attempt(results_on_device: bool) -> torch.Tensor:
            tiles.rewind(0)  # a pass repeated after out-of-memory counts its windows again
            results_device = device if results_on_device else torch.device("cpu")
            return sliding_window_logits(predictor, prepared.data, self.settings, device, results_device)

        try:
            with stage("network"):
                logits = with_cpu_results_on_oom(attempt, device, say, self.name)
        except ModelError:
            raise
        except (RuntimeError, ValueError) as exc:  # not out of memory (handled above): the network does not fit
            raise ModelError(
                f"{self.where}: the network failed on windows of shape (1, {len(self._roles)}, "
                f"{', '.join(map(str, self.settings.roi_size))}) ({_last_line(exc)}). Check that channel_roles lists "
                f"its {len(self._roles)} input channel(s) in order and that roi_size is a size it accepts.") from exc
        finally:
            del network, predictor
        say("back to the case grid", AFTER_WINDOW)
        with stage("export"):
            array = logits_to_case_grid(logits, prepared, self.activation, self.settings.axis_order)
        if array.shape[1:] != tuple(case.shape_zyx):  # pragma: no cover - guarded by the inverse transforms
            raise ModelError(f"{self.where}: probabilities of shape {array.shape[1:]} do not fit the case grid")
        return Probabilities(array, self.channels, self.space)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable provenance of this member."""
        s = self.settings
        channels = {"space": REGION_SPACE, "regions": list(self.channels)} if self.space == REGION_SPACE else {
            "labels": [int(c) for c in self.channels]}  # type: ignore[arg-type]
        return {
            "framework": self.framework, "name": self.name, "path": str(self.path), "channels": list(self._roles),
            "activation": self.activation, **channels, "roi_size": list(s.roi_size), "overlap": s.overlap,
            "sw_batch_size": s.sw_batch_size, "mode": s.mode, "normalization": s.normalization,
            "target_spacing": list(s.target_spacing) if s.target_spacing else None, "axis_order": s.axis_order,
            "mirroring": s.mirroring,
        }


class TorchScriptMember(SlidingWindowMember):
    """A TorchScript file (``torch.jit.save``) as an ensemble member; refused unless the user trusts the file."""

    framework = "torchscript"

    def __init__(self, path: str | Path, *args: Any, **options: Any) -> None:
        super().__init__(path, *args, **options)
        if not self.trusted:
            raise ModelError(f"{self.where}: a TorchScript file is a program, and it runs only if you trust this "
                             f"file. {trust_advice(self.path)} Otherwise use a state-dict checkpoint with framework "
                             "\"monai\" and a \"network\", which is loaded without running code.")

    def load_network(self, device: torch.device) -> Callable[[torch.Tensor], Any]:
        if not self.trusted:  # pragma: no cover - refused in __init__
            raise ModelError(f"{self.where}: not trusted. {trust_advice(self.path)}")
        if self.path not in self.trusted_files:
            self.trusted_files.append(self.path)
        try:
            network = torch.jit.load(str(self.path), map_location=device)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"{self.where}: not a TorchScript file ({_last_line(exc)}). Save the network with "
                             "torch.jit.save(torch.jit.script(network), path); a state-dict checkpoint is "
                             "framework \"monai\" with a \"network\".") from exc
        return network.eval()


def state_dict_from_checkpoint(checkpoint: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint: the checkpoint itself when every value is a tensor, else the one nested
    under one of :data:`STATE_DICT_KEYS`; the ``module.`` prefix of DataParallel training removed."""
    def is_state(value: Any) -> bool:
        return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor)
                                                                  for v in value.values())

    if is_state(checkpoint):
        state = checkpoint
    else:
        nested = [k for k in STATE_DICT_KEYS if is_state(checkpoint.get(k))]
        if len(nested) != 1:
            raise ModelError(f"{where}: cannot find the network weights (top-level keys: "
                             f"{', '.join(map(str, list(checkpoint)[:12])) or 'none'}). Save the checkpoint with "
                             "torch.save(network.state_dict(), path), or nest it under \"state_dict\".")
        state = checkpoint[nested[0]]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


class MonaiNetworkMember(SlidingWindowMember):
    """A network of ``monai.networks.nets`` built from the manifest, with a state-dict checkpoint."""

    framework = "monai"

    def __init__(self, path: str | Path, network: Mapping[str, Any], channel_roles: Sequence[str], activation: str,
                 roi_size: Sequence[int], normalization: str, trust_checkpoint: "bool | TrustedFiles" = False,
                 **options: Any) -> None:
        # full unpickling of the checkpoint only by --trust-checkpoint, never by a manifest
        super().__init__(path, channel_roles, activation, roi_size, normalization, trust_checkpoint=trust_checkpoint,
                         **options)
        try:
            self.network_class, self.network_kwargs = check_network_spec(network, len(self.roles),
                                                                         len(self.channels))
        except ValueError as exc:
            raise ModelError(f"{self.where}: network: {exc}") from exc
        self.network_spec = dict(network)
        from .swinunetr import is_swinunetr_class, unstated_merging_warning

        if is_swinunetr_class(self.network_class) and "downsample" not in network:
            warnings.warn(unstated_merging_warning(self.where), RuntimeWarning, stacklevel=2)
        self._check_windows()

    def _check_windows(self) -> None:
        """Build the network without its weights and run it on one window of "meta" tensors (shapes only, no
        arithmetic), so that a network that refuses its arguments, does not take ``roi_size`` windows, or does not
        return one channel per declared output is refused when the model set is built, not when it runs. Networks
        whose code cannot run on "meta" tensors are checked when they run."""
        try:
            with torch.device("meta"):
                network = self._build()
        except ModelError:
            raise
        except Exception:  # noqa: BLE001 - classes that compute values while they are built (SwinUNETR)
            network = self._build().to("meta")
        window = torch.empty((1, len(self.roles), *self.settings.roi_size), device="meta")
        try:
            with torch.inference_mode():
                WindowPredictor(network.eval(), len(self.channels), [()], self.where)._logits(window)
        except ModelError:
            raise
        except (NotImplementedError, RuntimeError) as exc:
            if "meta" in str(exc).lower() or isinstance(exc, NotImplementedError):
                return  # an operation without a shape-only version: predict() checks the output instead
            raise self._window_failure(exc) from exc
        except (ValueError, TypeError, AssertionError) as exc:
            raise self._window_failure(exc) from exc

    def _window_failure(self, exc: BaseException) -> ModelError:
        return ModelError(
            f"{self.where}: network: {self.network_class.__name__} does not take windows of shape (1, "
            f"{len(self.roles)}, {', '.join(map(str, self.settings.roi_size))}) ({_last_line(exc)}). Give the roi_size "
            "the model was trained with (Swin UNETR: multiples of 32) and the network arguments it was trained "
            "with.")

    def _build(self) -> nn.Module:
        """The network from the manifest's arguments; ModelError when the class refuses them."""
        try:
            return self.network_class(**self.network_kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ModelError(f"{self.where}: network: {self.network_class.__name__} refuses the arguments "
                             f"{self.network_kwargs} ({_last_line(exc)}). Give the arguments the model was trained "
                             "with.") from exc

    def load_network(self, device: torch.device) -> Callable[[torch.Tensor], Any]:
        checkpoint = load_checkpoint(self.path, trusted=self.trusted, loaded_trusted=self.trusted_files)
        state = state_dict_from_checkpoint(checkpoint, self.where)
        network = self._build()
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:600]
            raise ModelError(f"{self.where}: the weights do not fit {self.network_class.__name__} with the manifest's "
                             f"arguments ({detail}). Give the network arguments the model was trained with.") from exc
        return network.to(device).eval()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "network": self.network_spec}


def build_member(framework: str, path: Path, options: Mapping[str, Any],
                 trust: "bool | TrustedFiles" = False) -> SlidingWindowMember:
    """The member of ``framework`` (``"torchscript"`` or ``"monai"``) from :func:`manifest_options`' arguments.
    ``trust`` (the user's ``--trust-checkpoint`` paths) allows running a TorchScript file, or full unpickling of a
    ``monai`` checkpoint, when it covers the member's file."""
    if framework == "monai":
        return MonaiNetworkMember(path, trust_checkpoint=trust, **options)
    if framework == "torchscript":
        return TorchScriptMember(path, trust_checkpoint=trust, **{k: v for k, v in options.items() if k != "network"})
    raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
