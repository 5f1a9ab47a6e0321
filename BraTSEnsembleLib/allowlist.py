"""What a model folder may make the library import, build or fetch: a model's architecture is data, never code.

nnU-Net v2 builds a network from names in ``plans.json``: ``get_network_from_plans`` imports the network class and
every entry of ``_kw_requires_import`` (``conv_op``, ``norm_op``, ``dropout_op``, ``nonlin``) with
``pydoc.locate``, then calls them with the plans' keyword arguments, and its predictor looks up the preprocessor,
normalisation schemes, resampling functions and label manager by name. Any importable callable would do, e.g.
``"nonlin": "subprocess.call"``. So before nnU-Net reads a configuration, :func:`check_nnunet_plans` compares each of
those names with the allow-lists below (the names real models use) and checks that their keyword arguments are plain
data; anything else is refused before anything is imported. The check compares strings only: nothing named in the
file is imported to check it.

The other frameworks build their networks here from fixed code: U-Mamba (:mod:`.members.umamba`, from the trainer
name and the plans' figures) and MedNeXt (:mod:`.members.mednext`, from the trainer name; v1 ``plans.pkl`` is read
with a restricted unpickler), so their plans name nothing that is imported. MONAI networks come from
``monai.networks.nets`` only, and :func:`refuse_file_arguments` refuses constructor arguments that would download or
read a file (``pretrained``, URLs, paths): a member's weights come only from its own file, loaded safely.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ModelError

# ----------------------------------------------------------------------------------------------------------------
# Allow-lists (dotted names as nnU-Net writes them)

_DNA = "dynamic_network_architectures.architectures"
_DNA_NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")
#: Network classes nnU-Net v2 may build: dynamic-network-architectures' U-Nets under their current module, the module
#: older nnU-Net versions wrote (``residual_unet``), and the bare class name (nnU-Net then searches that package).
NETWORK_CLASSES: frozenset[str] = frozenset(
    [f"{_DNA}.unet.{n}" for n in _DNA_NETWORKS] + [f"{_DNA}.residual_unet.{n}" for n in _DNA_NETWORKS[1:]]
    + list(_DNA_NETWORKS))

#: The networks the library builds itself for trainers whose plans do not describe them (never imported by name).
OWN_NETWORKS: dict[str, str] = {
    "U-Mamba (nnUNetTrainerUMambaBot/Enc)": "BraTSEnsembleLib.members.umamba.UMambaBot / UMambaEnc",
    "MedNeXt v1 (nnUNetTrainerV2_MedNeXt_*)": "BraTSEnsembleLib.members.mednext.MedNeXt",
}

_TORCH_MODULES = {"conv": "conv", "instancenorm": "instancenorm", "batchnorm": "batchnorm",
                  "normalization": "normalization", "dropout": "dropout", "activation": "activation"}
_BUILDING_BLOCKS: dict[str, dict[str, tuple[str, ...]]] = {
    "conv_op": {"conv": ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")},
    "norm_op": {"instancenorm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
                "batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"),
                "normalization": ("GroupNorm", "LayerNorm")},
    "dropout_op": {"dropout": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout")},
    "nonlin": {"activation": ("LeakyReLU", "ReLU", "PReLU", "ReLU6", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
                              "Hardswish", "Sigmoid", "Tanh")},
}


def _torch_names(groups: Mapping[str, tuple[str, ...]]) -> frozenset[str]:
    """``torch.nn.X`` and ``torch.nn.modules.<module>.X`` for each class X (both spellings occur in plans)."""
    names = set()
    for module, classes in groups.items():
        for cls in classes:
            names.update({f"torch.nn.{cls}", f"torch.nn.modules.{_TORCH_MODULES[module]}.{cls}"})
    return frozenset(names)


#: Per ``_kw_requires_import`` key: the torch.nn classes it may name (or null).
BUILDING_BLOCKS: dict[str, frozenset[str]] = {key: _torch_names(groups) for key, groups in _BUILDING_BLOCKS.items()}
_ANY_BUILDING_BLOCK: frozenset[str] = frozenset().union(*BUILDING_BLOCKS.values())

#: Names nnU-Net's predictor looks up inside its own packages (class or function name, as plans store them).
NNUNET_LOOKUPS: dict[str, frozenset[str]] = {
    "preprocessor_name": frozenset({"DefaultPreprocessor"}),
    "normalization_schemes": frozenset({"ZScoreNormalization", "CTNormalization", "NoNormalization",
                                        "RescaleTo01Normalization", "RGBTo01Normalization"}),
    "resampling_fn_data": frozenset({"resample_data_or_seg_to_shape", "resample_torch_fornnunet",
                                     "no_resampling_hack"}),
    "label_manager": frozenset({"LabelManager"}),
}
NNUNET_LOOKUPS["resampling_fn_seg"] = NNUNET_LOOKUPS["resampling_fn_probabilities"] = \
    NNUNET_LOOKUPS["resampling_fn_data"]

_PLAIN_SCALARS = (type(None), bool, int, float, str)


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net v2 plans


def _refuse(source: Path, key: str, value: Any, allowed: Iterable[str], what: str) -> ModelError:
    shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "…"
    examples = ", ".join(sorted(allowed, key=len)[:6])
    return ModelError(
        f"{source}: {key} = {shown} is not {what} that real models use, so it is refused: BraTSEnsemble never imports "
        f"or calls a name from a model folder that is not on its allow-list (e.g. {examples}). Use a plans.json "
        "written by nnU-Net for this model (nnUNetv2_plan_experiment); a custom network needs its own member type, "
        "not a name in plans.json.")


def _is_plain(value: Any, depth: int = 0) -> bool:
    """JSON-like data: scalars, lists and string-keyed dicts of them, not deeper than 8 levels."""
    if isinstance(value, _PLAIN_SCALARS):
        return True
    if depth >= 8:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _check_architecture(architecture: Any, source: Path, where: str) -> None:
    if not isinstance(architecture, dict):
        raise ModelError(f"{source}: {where} must be an object with network_class_name, arch_kwargs and "
                         "_kw_requires_import. Use a plans.json written by nnU-Net.")
    name = architecture.get("network_class_name")
    if not isinstance(name, str) or name not in NETWORK_CLASSES:
        raise _refuse(source, f"{where}.network_class_name", name, NETWORK_CLASSES,
                      "a network class of dynamic_network_architectures")
    kwargs = architecture.get("arch_kwargs", {})
    if not isinstance(kwargs, dict) or not _is_plain(kwargs):
        raise ModelError(f"{source}: {where}.arch_kwargs must be an object of plain values (numbers, strings, lists). "
                         "Use a plans.json written by nnU-Net.")
    imports = architecture.get("_kw_requires_import", [])
    if not isinstance(imports, list) or not all(isinstance(k, str) for k in imports):
        raise ModelError(f"{source}: {where}._kw_requires_import must be a list of arch_kwargs keys. Use a plans.json "
                         "written by nnU-Net.")
    for key in imports:
        value = kwargs.get(key)
        allowed = BUILDING_BLOCKS.get(key, _ANY_BUILDING_BLOCK)
        if value is not None and (not isinstance(value, str) or value not in allowed):
            kind = {"conv_op": "a torch.nn convolution class", "norm_op": "a torch.nn normalisation class",
                    "dropout_op": "a torch.nn dropout class", "nonlin": "a torch.nn activation class"}
            raise _refuse(source, f"{where}.arch_kwargs.{key}", value, allowed,
                          kind.get(key, "a torch.nn convolution, normalisation, dropout or activation class"))
    # A dotted name that nnU-Net would pass on as a string is still a name: only plain kwargs beside the imports.
    for key, value in kwargs.items():
        if key in imports:
            continue
        if key.endswith("_kwargs") and value is not None and not isinstance(value, dict):
            raise ModelError(f"{source}: {where}.arch_kwargs.{key} must be an object of plain values or null. Use a "
                             "plans.json written by nnU-Net.")


def _check_lookups(configuration: Mapping[str, Any], source: Path, where: str) -> None:
    for key, allowed in NNUNET_LOOKUPS.items():
        if key == "label_manager" or key not in configuration:
            continue
        values = configuration[key]
        for index, value in enumerate(values if key == "normalization_schemes" and isinstance(values, list)
                                      else [values]):
            if not isinstance(value, str) or value not in allowed:
                label = f"{where}.{key}" + (f"[{index}]" if key == "normalization_schemes" else "")
                raise _refuse(source, label, value, allowed, f"a {key.replace('_', ' ')} of nnU-Net")
        if key.startswith("resampling_fn_"):
            kwargs = configuration.get(f"{key}_kwargs", {})
            if not isinstance(kwargs, dict) or not all(isinstance(v, _PLAIN_SCALARS) for v in kwargs.values()):
                raise ModelError(f"{source}: {where}.{key}_kwargs must be an object of plain values (numbers, true/"
                                 "false, null). Use a plans.json written by nnU-Net.")


def check_nnunet_plans(plans: Any, source: Path) -> None:
    """Refuse ``plans`` (parsed plans.json of ``source``) unless every name nnU-Net would import from it is allowed.

    Checked in every configuration: ``architecture.network_class_name`` (:data:`NETWORK_CLASSES`), the
    ``_kw_requires_import`` entries of ``arch_kwargs`` (:data:`BUILDING_BLOCKS`) and the predictor's lookups
    (:data:`NNUNET_LOOKUPS`); plus the plans' ``label_manager``. Old plans without ``architecture`` (nnU-Net 2.1,
    U-Mamba) name only ``UNet_class_name``, which nnU-Net maps to its two U-Nets itself. Raises ModelError naming the
    file, the key, the name and the fix.
    """
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations", {}), dict):
        raise ModelError(f"{source}: not nnU-Net v2 plans (\"configurations\" is no object). Point to the results "
                         "folder that nnU-Net wrote (it holds plans.json, dataset.json and fold_N/).")
    if "label_manager" in plans:
        value = plans["label_manager"]
        if not isinstance(value, str) or value not in NNUNET_LOOKUPS["label_manager"]:
            raise _refuse(source, "label_manager", value, NNUNET_LOOKUPS["label_manager"], "a label manager of nnU-Net")
    for name, configuration in plans.get("configurations", {}).items():  # none: nothing to build (refused later)
        where = f"configurations.{name}"
        if not isinstance(configuration, dict):
            raise ModelError(f"{source}: {where} must be an object. Use a plans.json written by nnU-Net.")
        if "architecture" in configuration:
            _check_architecture(configuration["architecture"], source, f"{where}.architecture")
        elif "UNet_class_name" in configuration and configuration["UNet_class_name"] not in _DNA_NETWORKS[:2]:
            raise _refuse(source, f"{where}.UNet_class_name", configuration["UNet_class_name"], _DNA_NETWORKS[:2],
                          "a network class of nnU-Net 2.1 plans")
        _check_lookups(configuration, source, where)


# ----------------------------------------------------------------------------------------------------------------
# MONAI network arguments

#: Constructor parameters that fetch or read weights (``pretrained``, ``pretrained_url``, ``checkpoint`` paths,
#: torchvision ``weights``, Hugging Face ``path_or_repo_id``/``filename``): their value must be off (false/null).
_FILE_PARAMETER = re.compile(r"pretrain|url|checkpoint|ckpt|path|file|repo|download|hub|^weights$", re.I)
#: Parameters whose names match but that read nothing (gradient checkpointing, drop-path rates, caches).
_HARMLESS_PARAMETERS = frozenset({"use_checkpoint", "use_checkpointing", "gradient_checkpointing",
                                  "dropout_path_rate", "drop_path_rate", "use_cache"})
#: Suffixes of weight files: a string argument ending so names a file to read.
_WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl", ".tar", ".zip", ".npz", ".h5")


def _file_like(value: str) -> bool:
    """A string that names a URL or a file: ``scheme://``, a path separator, ``~``, or a weight-file suffix."""
    text = value.strip().lower()
    return ("://" in text or "/" in text or "\\" in text or text.startswith("~")
            or text.endswith(_WEIGHT_SUFFIXES))


def _strings(value: Any, where: str) -> Iterable[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]")


def refuse_file_arguments(cls: type, kwargs: Mapping[str, Any]) -> None:
    """ValueError when building ``cls(**kwargs)`` would download or read a file.

    Every parameter of the class whose name says it fetches weights (:data:`_FILE_PARAMETER`) must be off in the
    manifest or by default (``EfficientNetBN``'s ``pretrained`` defaults to true: it must be set to false), and no
    string argument may be a URL or a path.
    """
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - every monai network has a signature
        parameters = {}
    for name in [*parameters, *(k for k in kwargs if k not in parameters)]:  # and what **kwargs passes on
        if name in _HARMLESS_PARAMETERS or not _FILE_PARAMETER.search(name):
            continue
        given = name in kwargs
        value = kwargs[name] if given else parameters[name].default
        if value is inspect.Parameter.empty or value is None or value is False or value == "" or value == 0:
            continue
        origin = f"{name}={value!r}" + ("" if given else " (its default)")
        raise ValueError(f"{cls.__name__} argument {origin} would download or read weights from outside the "
                         f"member's file; set \"{name}\": {'false' if isinstance(value, bool) else 'null'} in the "
                         "manifest: the weights come only from the member's own file")
    for where, text in _strings(dict(kwargs), "network"):
        if _file_like(text):
            raise ValueError(f"{where} = {text!r} names a URL or a file; network arguments must not (the weights come "
                             "only from the member's own file). Remove it or give a plain value")
