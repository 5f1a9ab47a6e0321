"""Which input roles (``t1c``, ``t2f``, ``ct`` …) a model list needs, known from its JSON files alone.

The Slicer panel asks this to show only the role selectors the chosen model set needs, and the module's logic to
refuse missing volumes before exporting anything. Nothing here loads weights, unpickles or imports torch: an nnU-Net
results folder (a cascade's stage too) is read through its ``dataset.json`` ``channel_names`` (the member's own
mapping, :func:`BraTSEnsembleLib.roles.model_channel_roles`); a model-set manifest through each member's
``channel_roles`` when given, else (nnunetv2/umamba) the member folder's ``dataset.json``. Where the files cannot tell
(a MedNeXt member without ``channel_roles``: its roles are in the pickled v1 plans; a member to be downloaded from
its ``url``), the answer is None, "unknown": the panel then shows the four BraTS roles and the command line decides.
Every JSON file is read size-capped and exact (:mod:`BraTSEnsembleLib.jsonfiles`); a broken file is a ModelError
naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import ModelError
from .jsonfiles import MANIFEST_MAX_BYTES, MODEL_JSON_MAX_BYTES, read_json_file
from .roles import BRATS_ROLES, channel_role, model_channel_roles

#: Frameworks whose member folder is an nnU-Net v2 results folder (roles from its dataset.json).
_NNUNET_FRAMEWORKS = ("nnunetv2", "umamba")
#: Frameworks whose roles the manifest must give (``channel_roles``), mapped like dataset.json channel names.
_NETWORK_FILE_FRAMEWORKS = ("torchscript", "monai")
_MEDNEXT = "mednext"


def results_folder_roles(folder: str | Path) -> tuple[str, ...]:
    """Roles of an nnU-Net v2 results folder (``Trainer__Plans__configuration``, a cascade stage too) in channel
    order, from its ``dataset.json`` as the member reads it (``channel_names``, else v1's ``modality``)."""
    folder = Path(folder).expanduser()
    path = folder / "dataset.json"
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder. Give an nnU-Net v2 results folder (Trainer__Plans__configuration) "
                         "or a model-set manifest (.json).")
    if not path.is_file():
        raise ModelError(f"{folder}: no dataset.json. An nnU-Net v2 results folder (Trainer__Plans__configuration) "
                         "holds dataset.json, plans.json and fold_N/; point at that folder.")
    data, _ = read_json_file(path, "dataset.json", MODEL_JSON_MAX_BYTES)
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must be a JSON object, as nnU-Net writes it")
    channels = data.get("channel_names") or data.get("modality")
    if not isinstance(channels, dict) or not channels or not all(isinstance(v, str) for v in channels.values()):
        raise ModelError(f"{path}: channel_names must be an object naming each input channel, e.g. "
                         '{"0": "CT"} or {"0": "T1", "1": "T1Gd", "2": "T2", "3": "FLAIR"}.')
    return model_channel_roles(channels, str(path))


def _member_roles(raw: Any, index: int, manifest: Path) -> tuple[str, ...] | None:
    where = f"{manifest}: member {index + 1}"
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: must be an object such as {{\"framework\": \"nnunetv2\", \"path\": \"…\"}}.")
    framework = raw.get("framework")
    roles = raw.get("channel_roles")
    if roles is not None:
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r.strip() for r in roles):
            raise ModelError(f"{where}: channel_roles must be a non-empty list of role names, e.g. "
                             '["t1n", "t1c", "t2w", "t2f"] in the model\'s channel order.')
        # MedNeXt takes the names as given; network files map them as dataset.json channel names are mapped
        mapped = tuple(roles) if framework == _MEDNEXT else tuple(channel_role(r) for r in roles)
        if len(set(mapped)) != len(mapped):
            raise ModelError(f"{where}: channel_roles {roles} name one role twice.")
        return mapped
    if framework in _NETWORK_FILE_FRAMEWORKS:
        raise ModelError(f"{where}: no channel_roles (a network file does not say which sequence each input channel "
                         'is). Write e.g. "channel_roles": ["t2f", "t1c", "t1n", "t2w"].')
    if framework == _MEDNEXT:
        return None  # its plans.pkl names the modalities: a pickle, not read here
    if framework not in _NNUNET_FRAMEWORKS:
        raise ModelError(f"{where}: unknown framework {framework!r}; use nnunetv2, umamba, mednext, torchscript or "
                         "monai.")
    path = raw.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ModelError(f"{where}: \"path\" must name the member's folder (relative to the manifest's folder).")
    folder = Path(path).expanduser()
    folder = folder if folder.is_absolute() else manifest.parent / folder
    if not folder.exists() and raw.get("url"):
        return None  # downloaded when the set is first run
    try:
        return results_folder_roles(folder)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from exc


def manifest_roles(manifest: str | Path) -> tuple[str, ...] | None:
    """Roles the members of a model-set manifest need (first-seen order), or None when a member's roles cannot be
    known from JSON files (see the module's docstring). Raises ModelError for a manifest that is not one."""
    manifest = Path(manifest).expanduser()
    if not manifest.exists():
        raise ModelError(f"{manifest}: model-set manifest not found.")
    data, _ = read_json_file(manifest, "model-set manifest", MANIFEST_MAX_BYTES)
    members = data.get("members") if isinstance(data, dict) else None
    if not isinstance(members, list) or not members:
        raise ModelError(f"{manifest}: a model-set manifest is a JSON object with a non-empty \"members\" list; see "
                         "docs/model-sets.md.")
    seen: dict[str, None] = {}
    for index, raw in enumerate(members):
        roles = _member_roles(raw, index, manifest)
        if roles is None:
            return None
        seen.update(dict.fromkeys(roles))
    return tuple(seen)


def needed_roles(models: str | Path | Sequence[str | Path]) -> tuple[str, ...] | None:
    """The input roles a model list needs — what ``brats-ensemble predict`` will ask of a case — or None when its
    JSON files cannot tell (then the panel offers the four BraTS roles and the command line checks).

    ``models``: a manifest (``.json``), an nnU-Net v2 results folder, or a list of them, as the module passes them
    to the command line. Order: the BraTS roles first (t1n, t1c, t2w, t2f), others after them as first seen — the
    order in which a case is read, whose first role gives the result's grid.
    """
    entries = [models] if isinstance(models, (str, Path)) else list(models)
    entries = [str(m) for m in entries if str(m).strip()]
    if not entries:
        raise ValueError("no model given: choose a model set (manifest or nnU-Net results folder)")
    seen: dict[str, None] = {}
    for entry in entries:
        roles = manifest_roles(entry) if entry.lower().endswith(".json") else results_folder_roles(entry)
        if roles is None:
            return None
        seen.update(dict.fromkeys(roles))
    return tuple(sorted(seen, key=lambda r: (BRATS_ROLES + (r,)).index(r)))
