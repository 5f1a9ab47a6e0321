"""Modality roles: which MRI sequence an image is, from file names, node names or series descriptions, and which
role each input channel of a model expects (from the model's own ``dataset.json`` ``channel_names``).

Roles: ``t1n`` (native T1), ``t1c`` (contrast-enhanced T1), ``t2w`` (T2), ``t2f`` (T2-FLAIR). Any other channel
name (``CT``, ``ADC`` …) is kept as a generic role spelt in lower case, for single-channel or non-BraTS models.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from .errors import InputError, ModelError

BRATS_ROLES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")

ROLE_TITLES: dict[str, str] = {"t1n": "T1 native", "t1c": "T1 contrast-enhanced", "t2w": "T2", "t2f": "T2-FLAIR"}

# File-name suffixes of the BraTS conventions (after the case id): 2023+ with '-', 2020/21 with '_'.
BRATS2023_SUFFIXES: dict[str, str] = {"-t1n": "t1n", "-t1c": "t1c", "-t2w": "t2w", "-t2f": "t2f"}
BRATS2021_SUFFIXES: dict[str, str] = {"_t1": "t1n", "_t1ce": "t1c", "_t2": "t2w", "_flair": "t2f"}

#: Roles other than BraTS's that a case folder may name in its file names (``<id>-ct.nii.gz``, ``<id>_ct.nii.gz``)
#: whatever the model: CT (the channel name by which nnU-Net selects its CT normalisation).
NAMED_FILE_ROLES: tuple[str, ...] = ("ct",)


def role_file_suffixes(roles: Iterable[str]) -> dict[str, str]:
    """File-name suffixes ``-role`` and ``_role`` → role for roles other than BraTS's (``{"-ct": "ct", "_ct":
    "ct"}``): how a case folder names the image of a generic role."""
    return {f"{separator}{role}": role for role in roles if role not in BRATS_ROLES for separator in "-_"}


# Free-text names (node names, DICOM series descriptions, dataset.json channel names) → role. Tested in order, on
# lower-case text with separators folded to single spaces; the first match wins, so contrast-enhanced T1 and FLAIR
# are recognised before plain T1 and T2.
_ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("t2f", r"flair|t2f\b|t2 f\b|\bdark fluid|\btirm\b"),
    ("t1c", r"t1c|t1ce|t1 ce\b|t1gd|t1 gd\b|gad|\bgd\b|contrast|\bpost\b|\+ ?c\b|\bc\+|t1 ?post|mprage ?post|enhanc"),
    ("t2w", r"\bt2w?\b|t2 ?weighted|t2 ?tse|t2 ?fse|\bt2w\b"),
    ("t1n", r"\bt1n?\b|t1 ?weighted|t1w|t1 ?pre|\bpre\b|native|mprage|spgr|t1 ?native"),
)


def _fold(text: str) -> str:
    return re.sub(r"[\s_\-\.()\[\]:,/]+", " ", text.lower()).strip()


def role_from_text(text: str) -> str | None:
    """The BraTS role that a free-text name suggests ('AX T1 POST GAD' → 't1c'), or None."""
    folded = _fold(text)
    for role, pattern in _ROLE_PATTERNS:
        if re.search(pattern, folded):
            return role
    return None


def channel_role(channel_name: str) -> str:
    """Role of one model input channel from its ``channel_names`` entry: a BraTS role or a generic lower-case one.

    Names such as 'T1', 'T1Gd', 't1c', 'T1CE', 'FLAIR', 't2f', 'T2w' give BraTS roles. A name that suggests no
    BraTS role ('CT', 'ADC') becomes a generic role; the caller decides whether a case can provide it.
    """
    role = role_from_text(channel_name)
    if role is not None:
        return role
    generic = _fold(channel_name).replace(" ", "")
    if not generic:
        raise ValueError(f"empty channel name {channel_name!r}")
    return generic


def model_channel_roles(channel_names: Mapping[str, str], source: str) -> tuple[str, ...]:
    """Roles of a model's input channels in channel order, from ``dataset.json`` ``channel_names``.

    ``channel_names`` maps channel index (as a string, nnU-Net style) to a name. ``source`` (the dataset.json
    path) is named in errors. Raises ModelError when indices are not 0..n-1 or two channels map to one role.
    """
    try:
        indices = sorted(int(k) for k in channel_names)
    except ValueError as exc:
        raise ModelError(f"{source}: channel_names keys must be channel numbers, found {list(channel_names)}") from exc
    if indices != list(range(len(indices))):
        raise ModelError(f"{source}: channel_names must be numbered 0..{len(indices) - 1}, found {indices}")
    names = [channel_names[str(i)] for i in indices]
    roles = tuple(channel_role(name) for name in names)
    if len(set(roles)) != len(roles):
        pairs = ", ".join(f"{i}:{n!r}→{r}" for i, (n, r) in enumerate(zip(names, roles)))
        raise ModelError(
            f"{source}: two input channels map to the same modality role ({pairs}). "
            "Rename the channels in channel_names so each names its sequence (e.g. T1, T1Gd, T2, FLAIR)."
        )
    return roles


def describe_roles(roles: Iterable[str]) -> str:
    """Human-readable list of roles, e.g. 't1n (T1 native), t2f (T2-FLAIR)'."""
    return ", ".join(f"{r} ({ROLE_TITLES[r]})" if r in ROLE_TITLES else r for r in roles)


def assign_roles(names: Iterable[str]) -> dict[str, str]:
    """Auto-assign roles to named volumes (Slicer node names, series descriptions): ``{role: name}``.

    A name that suggests no role, or a role suggested by more than one name, is left out; the caller (the Slicer
    module) shows what could not be assigned rather than guessing.
    """
    candidates: dict[str, list[str]] = {}
    for name in names:
        role = role_from_text(name)
        if role is not None:
            candidates.setdefault(role, []).append(name)
    return {role: found[0] for role, found in candidates.items() if len(found) == 1}


def ensure_roles_available(needed: Iterable[str], available: Iterable[str], who: str, where: str) -> None:
    """Raise InputError naming the missing roles when ``available`` lacks any of ``needed``."""
    have = set(available)
    missing = [r for r in needed if r not in have]
    if missing:
        raise InputError(
            f"{who} needs {describe_roles(missing)}, which {where} does not provide "
            f"(found: {describe_roles(sorted(have)) or 'nothing'}). Add the missing sequence(s) or choose a model "
            "that does not need them."
        )
