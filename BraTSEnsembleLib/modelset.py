"""A model set: the members of an ensemble, their weights, and the postprocessing that follows the fusion.

Two ways to make one:

* :func:`nnunet_model_set` — nnU-Net v2 results folders with shared options (the command line's ``--model``);
* :func:`load_model_set` — a **manifest** (JSON) naming each member's framework, folder, folds, checkpoint,
  inference options, weight and per-class weights, plus the postprocessing (the command line's ``--model-set``).

Manifest format (every key; anything else is refused)::

    {"name": "my-ensemble",                 # optional; default: the file name without .json
     "description": "…",                    # optional, free text (at most 10 000 characters)
     "postprocess": "ratio-adaptive",       # optional; a rule string or a list of rules; default ratio-adaptive
                                            #   (none for models with their own label set: labelsets.py)
     "min_lesion_volume_mm3": 100,          # optional; lesions smaller than this are not counted (statistics)
     "labels": "sequential-threshold",      # optional; argmax | sequential-threshold (default: argmax for
                                            #   label-based members, sequential thresholds when one is region-based)
     "recipe": "goat2025",                  # optional; the recipe the set was made from (recorded only)
     "demo": true,                          # optional; a demo set (toy models): every run on images other than
                                            #   the shipped demo phantom warns (BraTSEnsembleLib.demo.guard)
     "members": [                           # required, at least one
       {"name": "resenc-m",                 # optional; default: the folder name; unique within the set
        "framework": "nnunetv2",            # required: nnunetv2 | umamba | mednext
        "path": "models/…/Trainer__Plans__3d_fullres",  # required; relative to the manifest's folder
        "folds": ["all"],                   # optional; default every fold present
        "checkpoint": "final",              # optional; final | best | a file name
        "mirroring": false,                 # optional; test-time mirroring, default true
        "tile_step": 0.5,                   # optional; sliding-window step in [0.1, 1], default 0.5
        "weight": 1.0,                      # optional; in [0.001, 1000], default 1
        "class_weights": {"ET": 1.2},       # optional; background/NETC/SNFH/ET/RC → factor in [0.001, 1000]
        "url": "https://…/resenc-m.zip",    # optional; downloaded (into the cache) when path does not exist
        "sha256": "…",                      # required with url: SHA-256 of the archive
        "archive_size": 123456789,          # optional with url: the archive's size in bytes (the download stops
                                            #   beyond it; see docs/security.md for the default caps)
        "class_labels": {"1": 2, "2": 1},   # mednext only: output channel → BraTS label (number or name)
        "channel_roles": ["t1n", …],        # mednext only: roles of the input channels
        "size": "M", "kernel_size": 3,      # mednext only: when the trainer name does not tell them
        "previous_stage": "models/…/Trainer__Plans__3d_lowres",  # nnunetv2/umamba cascades only; default: the
                                            #   plans' previous stage beside "path" (a 3d_cascade_fullres folder)
        "previous_stage_folds": [0, 1]}]}   # its folds; default: "folds" when given, else every fold there

The manifest is read bounded and exact (:mod:`BraTSEnsembleLib.jsonfiles`): at most 1 MiB, nested at most 32
levels, and a key named twice in one object is refused.

Fusion: member ``m`` has weight ``w[m,c] = weight · class_weights[c]`` for class ``c``; the fused probability of
``c`` is ``Σ_m w[m,c]·p[m,c] / Σ_m w[m,c]`` (see :mod:`BraTSEnsembleLib.ensemble`).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import BraTSEnsembleError, ModelError
from .jsonfiles import MANIFEST_MAX_BYTES, read_json_file
from .ensemble import ARGMAX, LABEL_RULES, SEQUENTIAL_THRESHOLD, fusion_space
from .labels import LABEL_NAMES
from .labelsets import (BRATS_LABEL_SET, LabelSet, check_class_weights, check_postprocess_steps,
                        common_label_set)
from .limits import TILE_STEP_RANGE, WEIGHT_RANGE, check_tile_step, is_real_number, range_problem
from .members.base import REGION_SPACE, Member
from .members.nnunet import nnunet_member
from .postprocess import Step, parse_steps
from .trust import TrustedFiles

#: Class names accepted in ``class_weights`` / ``class_labels`` (canonical BraTS 2023+ labels).
CLASS_NAMES: dict[str, int] = {name: label for label, name in LABEL_NAMES.items()}
FRAMEWORKS: tuple[str, ...] = ("nnunetv2", "umamba", "mednext", "torchscript", "monai")
DEFAULT_POSTPROCESS = "ratio-adaptive"

_TOP_KEYS = {"name", "description", "postprocess", "labels", "recipe", "demo", "members", "min_lesion_volume_mm3"}
_COMMON_MEMBER_KEYS = {"name", "framework", "path", "folds", "checkpoint", "mirroring", "tile_step", "weight",
                       "class_weights", "url", "sha256", "archive_size"}
_MEDNEXT_KEYS = {"class_labels", "channel_roles", "size", "kernel_size"}
#: nnU-Net v2 cascades (3d_cascade_fullres): the first stage's folder and folds (see members/nnunet_cascade.py)
_CASCADE_KEYS = {"previous_stage", "previous_stage_folds"}
_MEDNEXT_CHECKPOINTS = {"final": "model_final_checkpoint", "best": "model_best"}
#: torchscript / monai members (one network file, see members/torchscript.py): no folds, checkpoint or tile_step;
#: MONAI's sliding-window settings, the input roles and the meaning of the output channels instead.
_SLIDING_WINDOW_KEYS = (_COMMON_MEMBER_KEYS - {"folds", "checkpoint", "tile_step"}) | {
    "channel_roles", "activation", "class_labels", "regions", "roi_size", "overlap", "sw_batch_size", "mode",
    "normalization", "target_spacing", "axis_order"}
#: The keys a member of each framework may have.
_MEMBER_KEYS: dict[str, set[str]] = {
    "nnunetv2": _COMMON_MEMBER_KEYS | _CASCADE_KEYS, "umamba": _COMMON_MEMBER_KEYS | _CASCADE_KEYS,
    "mednext": _COMMON_MEMBER_KEYS | _MEDNEXT_KEYS,
    "torchscript": _SLIDING_WINDOW_KEYS, "monai": _SLIDING_WINDOW_KEYS | {"network"}}
_SHA256_RE = re.compile(r"^(sha256:)?[0-9a-fA-F]{64}$")
#: Free text copied into every result's JSON: the set's description and names are capped.
MAX_DESCRIPTION_CHARS = 10_000
MAX_NAME_CHARS = 200


@dataclass
class ModelSet:
    """Members with one positive weight each, optional per-class factors, and postprocessing.

    The fused probability of class c is Σ_m w[m,c]·p[m,c] / Σ_m w[m,c] with w[m,c] = weights[m] ·
    class_weights[m].get(c, 1); without class weights that is the weighted mean of nnUNetv2_ensemble.
    """

    members: list[Member]
    weights: list[float]
    postprocess: list[Step] = field(default_factory=list)
    #: per member: canonical label → factor of the member's weight (None, or an empty dict: factor 1 everywhere)
    class_weights: list[dict[int, float] | None] | None = None
    name: str | None = None
    description: str | None = None
    #: the manifest the set was read from (None for sets made in code or from --model options)
    manifest: Path | None = None
    #: per member: extra provenance recorded with it (url, sha256 of a downloaded member)
    member_sources: list[dict[str, Any]] | None = None
    #: SHA-256 of the manifest file as it was read
    manifest_sha256: str | None = None
    #: how fused probabilities become labels (one of ensemble.LABEL_RULES); None: argmax in label space,
    #: sequential thresholds in region space
    label_rule: str | None = None
    #: the recipe the set was made from: name, title, source, and the options the user overrode
    recipe: dict[str, Any] | None = None
    #: lesions (connected components) smaller than this many mm³ are left out of lesion counts and tables
    min_lesion_volume_mm3: float | None = None
    #: the classes every member predicts (set from the members; see BraTSEnsembleLib.labelsets)
    label_set: LabelSet = field(init=False, default=BRATS_LABEL_SET)
    #: a demo set (toy models, manifest key "demo"): runs on anything but the shipped demo phantom warn
    demo: bool = False

    def __post_init__(self) -> None:
        if not self.members:
            raise ModelError("a model set needs at least one model (--model PATH)")
        if len(self.weights) != len(self.members):
            raise ModelError(f"{len(self.weights)} weight(s) given for {len(self.members)} model(s); give one "
                             "--weight per --model, or none for equal weights")
        low, high = WEIGHT_RANGE
        if any(range_problem(w, WEIGHT_RANGE, "weight") for w in self.weights):
            raise ModelError(f"weights must be finite numbers between {low:g} and {high:g}, got "
                             f"{[float(w) for w in self.weights]}; weights are relative (1 = the default)")
        if self.class_weights is None:
            self.class_weights = [None] * len(self.members)
        if len(self.class_weights) != len(self.members):
            raise ModelError(f"{len(self.class_weights)} class-weight entries given for {len(self.members)} model(s)")
        for factors in self.class_weights:
            for label, value in (factors or {}).items():
                if label not in LABEL_NAMES:
                    raise ModelError(f"class weights name label {label}, which is not a BraTS label "
                                     f"({', '.join(f'{k} {v}' for k, v in LABEL_NAMES.items())})")
                if range_problem(value, WEIGHT_RANGE, "class weight"):
                    raise ModelError(f"class weights must be finite numbers between {low:g} and {high:g}, got "
                                     f"{factors}; they multiply the member's weight (1 = neutral)")
        if self.label_rule is not None and self.label_rule not in LABEL_RULES:
            raise ModelError(f"unknown label rule {self.label_rule!r}; choose from {', '.join(LABEL_RULES)}")
        if self.label_rule == ARGMAX and fusion_space(self.members) == REGION_SPACE:
            raise ModelError("labels by argmax need label-based members, but a member is region-based (WT/TC/ET "
                             f"probabilities): use the {SEQUENTIAL_THRESHOLD} label rule (p > 0.5 per region)")
        # Label sets that cannot be fused and BraTS-only rules on other classes: refused before any member runs.
        self.label_set = common_label_set(self.members)
        check_postprocess_steps(self.label_set, self.postprocess)
        check_class_weights(self.label_set, self.class_weights)
        minimum = self.min_lesion_volume_mm3
        if minimum is not None and (isinstance(minimum, bool) or not isinstance(minimum, (int, float))
                                    or not 0 <= minimum < float("inf")):
            raise ModelError(f"the minimum lesion volume must be a finite number of mm³ >= 0, got {minimum!r}")

    @property
    def resolved_label_rule(self) -> str:
        """The label rule that runs: the one set, else argmax (label space) or sequential thresholds (regions)."""
        if self.label_rule is not None:
            return self.label_rule
        return SEQUENTIAL_THRESHOLD if fusion_space(self.members) == REGION_SPACE else ARGMAX

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role some member needs, in first-seen order."""
        seen: dict[str, None] = {}
        for member in self.members:
            seen.update(dict.fromkeys(member.roles))
        return tuple(seen)

    def describe(self) -> dict[str, Any]:
        """Provenance of the set, as recorded with every output: the set, each member with its weight and its
        per-class factors (every class it predicts, 1.0 where none was given), the fusion rule, postprocessing."""
        members = []
        for index, (member, weight) in enumerate(zip(self.members, self.weights)):
            factors = (self.class_weights or [None] * len(self.members))[index] or {}
            labels = sorted(set(member.labels) | set(factors))
            names = LABEL_NAMES if self.label_set.is_brats else {0: "background", **{
                c.value: c.name for c in self.label_set.classes}}
            record = {**member.describe(), "weight": float(weight),
                      "class_weights": {names[c]: float(factors.get(c, 1.0)) for c in labels}}
            if self.member_sources and self.member_sources[index]:
                record.update(self.member_sources[index])
            record["trusted_files"] = [str(p) for p in getattr(member, "trusted_files", [])]
            members.append(record)
        description: dict[str, Any] = {}
        if self.name is not None or self.manifest is not None:
            model_set: dict[str, Any] = {"name": self.name}
            if self.description:
                model_set["description"] = self.description
            if self.manifest is not None:
                model_set["manifest"] = str(self.manifest)
            if self.manifest_sha256:
                model_set["manifest_sha256"] = self.manifest_sha256
            if self.demo:
                model_set["demo"] = True
            description["model_set"] = model_set
        if self.recipe is not None:
            description["recipe"] = self.recipe
        uniform = all(v == 1.0 for f in (self.class_weights or []) for v in (f or {}).values())
        description.update({
            "fusion": "weighted-mean" if uniform else "class-weighted-mean",
            "fusion_space": fusion_space(self.members),
            "label_rule": self.resolved_label_rule,
            "members": members,
            "postprocess": [str(s) for s in self.postprocess],
            "label_set": self.label_set.to_json(),
            "min_lesion_volume_mm3": self.min_lesion_volume_mm3,
            # every file that was loaded with full unpickling or run as TorchScript because the user trusted it
            "trusted_files": [f for record in members for f in record["trusted_files"]],
        })
        return description


def _parse_postprocess(spec: str, context: str) -> list[Step]:
    try:
        return parse_steps(spec)
    except ValueError as exc:
        raise ModelError(f"{context}{exc}") from exc


def default_postprocess(members: Sequence[Member]) -> str:
    """The postprocessing when none is asked for: ratio-adaptive for BraTS models, none for models with their own
    label set (every rule is defined on BraTS regions). Members that cannot be fused are refused here already."""
    return DEFAULT_POSTPROCESS if common_label_set(members).is_brats else "none"


def nnunet_model_set(paths: Sequence[str | Path], weights: Sequence[float] | None = None,
                     folds: Sequence[str] | None = None, checkpoint: str = "final", use_mirroring: bool = True,
                     tile_step_size: float = 0.5, postprocess: str | None = "none",
                     trusted_checkpoints: Sequence[str | Path] = (), label_rule: str | None = None,
                     min_lesion_volume_mm3: float | None = None) -> ModelSet:
    """A model set of nnU-Net v2 results folders (the command line's ``--model`` options). ``postprocess`` None
    means the command line's default (:func:`default_postprocess`)."""
    check_tile_step(tile_step_size)
    trust = TrustedFiles(trusted_checkpoints)  # each checkpoint is asked about on its own
    members: list[Member] = []
    for path in paths:  # a cascade's second stage brings its first stage from beside it
        members.append(nnunet_member(Path(path), folds=folds, checkpoint=checkpoint, use_mirroring=use_mirroring,
                                     tile_step_size=tile_step_size, trust=trust))
    if postprocess is None:
        postprocess = default_postprocess(members) if members else DEFAULT_POSTPROCESS
    steps = _parse_postprocess(postprocess, "")
    return ModelSet(members, list(weights) if weights else [1.0] * len(members), steps, label_rule=label_rule,
                    min_lesion_volume_mm3=min_lesion_volume_mm3)


# ----------------------------------------------------------------------------------------------------------------
# Manifests


class _Checker:
    """Validation of one manifest, with error messages that name the file, the member and the fix."""

    def __init__(self, manifest: Path) -> None:
        self.manifest = manifest

    def fail(self, where: str | None, problem: str, fix: str) -> ModelError:
        place = f"{self.manifest}: " + (f"{where}: " if where else "")
        return ModelError(f"{place}{problem}. {fix}")

    def number(self, value: Any, where: str, key: str, fix: str, positive: bool = True,
               bounds: tuple[float, float] | None = None) -> float:
        """A finite JSON number (NaN and ±Infinity, which Python's json reads, are refused), > 0 when
        ``positive``, within ``bounds`` (inclusive) when given."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_real_number(value):
            raise self.fail(where, f"{key} must be a finite number, got {json.dumps(value)}", fix)
        if positive and not value > 0:
            raise self.fail(where, f"{key} must be a positive number, got {json.dumps(value)}", fix)
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise self.fail(where, f"{key} must be between {bounds[0]:g} and {bounds[1]:g}, got {json.dumps(value)}",
                            fix)
        return float(value)

    def class_name(self, value: Any, where: str, key: str) -> int:
        names = {n.lower(): label for n, label in CLASS_NAMES.items()}
        if isinstance(value, str) and value.strip().lower() in names:
            return names[value.strip().lower()]
        raise self.fail(where, f"{key}: unknown class {json.dumps(value)}",
                        f"Use one of {', '.join(CLASS_NAMES)} (BraTS 2023+ classes).")


def _member_where(index: int, raw: Mapping[str, Any]) -> str:
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    return f"member {index + 1}" + (f" ({name!r})" if name else "")


def read_manifest(path: Path) -> tuple[Any, str]:
    """(parsed JSON, SHA-256 of the file) of a manifest, read bounded and exact (:mod:`.jsonfiles`)."""
    if not path.exists():
        raise ModelError(f"{path}: model-set manifest not found. Check the path given to --model-set.")
    try:
        data, raw = read_json_file(path, "model-set manifest", MANIFEST_MAX_BYTES)
    except ModelError as exc:
        if "not valid JSON" in str(exc):
            raise ModelError(f"{exc} A model-set manifest is a JSON object with a \"members\" list; see "
                             "docs/model-sets.md.") from exc
        raise
    return data, hashlib.sha256(raw).hexdigest()


_read_manifest = read_manifest


def _folds(check: _Checker, value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    fix = 'Give a list of fold numbers or ["all"], e.g. "folds": [0, 1, 2, 3, 4], or leave it out for every fold.'
    if not isinstance(value, list) or not value:
        raise check.fail(where, f"folds must be a non-empty list, got {json.dumps(value)}", fix)
    folds = []
    for fold in value:
        if isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0:
            folds.append(str(fold))
        elif isinstance(fold, str) and (fold == "all" or fold.isdigit()):
            folds.append(fold)
        else:
            raise check.fail(where, f"folds: {json.dumps(fold)} is not a fold", fix)
    if len(set(folds)) != len(folds):
        raise check.fail(where, f"folds {json.dumps(value)} name a fold twice", fix)
    return folds


def _class_weights(check: _Checker, value: Any, where: str) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise check.fail(where, f"class_weights must be an object, got {json.dumps(value)}",
                         'Write e.g. "class_weights": {"background": 1.0, "NETC": 1.0, "SNFH": 1.0, "ET": 1.2}.')
    factors: dict[int, float] = {}
    for name, factor in value.items():
        label = check.class_name(name, where, "class_weights")
        if label in factors:
            raise check.fail(where, f"class_weights names class {name!r} twice", "Name each class once.")
        factors[label] = check.number(factor, where, f"class_weights[{name!r}]",
                                      "Class weights multiply the member's weight; give numbers between "
                                      f"{WEIGHT_RANGE[0]:g} and {WEIGHT_RANGE[1]:g} (1 = neutral).",
                                      bounds=WEIGHT_RANGE)
    return factors


def _class_labels(check: _Checker, value: Any, where: str) -> dict[int, int]:
    fix = ('Map the model\'s output channels to BraTS labels, e.g. "class_labels": {"1": 2, "2": 1, "3": 3} '
           '(1 NETC, 2 SNFH, 3 ET, 4 RC; names such as "SNFH" work too; channel 0 is background).')
    if not isinstance(value, dict) or not value:
        raise check.fail(where, f"class_labels must be a non-empty object, got {json.dumps(value)}", fix)
    mapping: dict[int, int] = {}
    for channel, label in value.items():
        if not (isinstance(channel, str) and channel.isdigit()):
            raise check.fail(where, f"class_labels: {json.dumps(channel)} is not an output channel number", fix)
        if isinstance(label, int) and not isinstance(label, bool):
            if label not in LABEL_NAMES:
                raise check.fail(where, f"class_labels: {label} is not a BraTS label", fix)
            mapping[int(channel)] = label
        else:
            mapping[int(channel)] = check.class_name(label, where, "class_labels")
    mapping.setdefault(0, 0)
    return mapping


def _resolve_path(check: _Checker, raw: Mapping[str, Any], where: str, manifest_dir: Path,
                  cache_dir: Path | None) -> Path:
    local = Path(raw["path"]).expanduser()
    local = local if local.is_absolute() else manifest_dir / local
    if local.exists():
        return local.resolve()
    if raw.get("url"):
        from .downloads import ensure_member_files

        try:
            return Path(ensure_member_files(dict(raw), manifest_dir, cache_dir)).resolve()
        except BraTSEnsembleError as exc:
            raise ModelError(f"{check.manifest}: {where}: {exc}") from exc
    raise check.fail(where, f"path {raw['path']!r} does not exist (looked for {local})",
                     "Fix the path (a relative path is relative to the manifest's folder), or add \"url\" and "
                     "\"sha256\" so the model can be downloaded.")


def _resolve_previous_stage(check: _Checker, raw: Mapping[str, Any], where: str, manifest_dir: Path) -> Path:
    """The ``previous_stage`` folder of a cascade member (relative to the manifest's folder), which must exist."""
    local = Path(raw["previous_stage"]).expanduser()
    local = local if local.is_absolute() else manifest_dir / local
    if not local.is_dir():
        raise check.fail(where, f"previous_stage {raw['previous_stage']!r} is not a folder (looked for {local})",
                         "Name the cascade's 3d_lowres results folder (a relative path is relative to the "
                         "manifest's folder), or leave the key out to use the one beside the 3d_cascade_fullres "
                         "folder.")
    return local.resolve()


def _member_options(check: _Checker, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The member's constructor arguments, validated (before anything is downloaded or read)."""
    framework = raw["framework"]
    checkpoint = raw.get("checkpoint", "final")
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise check.fail(where, f"checkpoint must be a string, got {json.dumps(checkpoint)}",
                         'Use "final", "best" or a checkpoint file name.')
    mirroring = raw.get("mirroring", True)
    if not isinstance(mirroring, bool):
        raise check.fail(where, f"mirroring must be true or false, got {json.dumps(mirroring)}",
                         "Write \"mirroring\": false to switch test-time mirroring off.")
    step_fix = (f"Use a step between {TILE_STEP_RANGE[0]:g} and {TILE_STEP_RANGE[1]:g} (a fraction of the patch; "
                "smaller steps multiply the tiles), e.g. 0.5, nnU-Net's default.")
    tile_step = check.number(raw.get("tile_step", 0.5), where, "tile_step", step_fix, bounds=TILE_STEP_RANGE)
    if framework in ("torchscript", "monai"):  # one network file; MONAI's sliding window (members/torchscript.py)
        from .members.torchscript import manifest_options

        labels = _class_labels(check, raw["class_labels"], where) if "class_labels" in raw else None
        return {"name": raw.get("name"), "use_mirroring": raw.get("mirroring", False),  # bundles do not mirror
                "origin": f"{check.manifest}: {where}",
                **manifest_options(framework, raw, labels, lambda problem, fix: check.fail(where, problem, fix))}
    options: dict[str, Any] = {"folds": _folds(check, raw.get("folds"), where), "use_mirroring": mirroring,
                               "name": raw.get("name")}
    if framework in ("nnunetv2", "umamba"):
        previous = raw.get("previous_stage")
        if previous is not None and (not isinstance(previous, str) or not previous.strip()):
            raise check.fail(where, f"previous_stage must be a folder path, got {json.dumps(previous)}",
                             "Name the cascade's 3d_lowres results folder (relative to the manifest's folder), or "
                             "leave the key out to use the one beside the 3d_cascade_fullres folder.")
        stage_folds = _folds(check, raw.get("previous_stage_folds"), where)
        return {**options, "checkpoint": checkpoint, "tile_step_size": tile_step, "previous_stage_folds": stage_folds}
    roles = raw.get("channel_roles")
    if roles is not None and (not isinstance(roles, list) or not roles
                              or not all(isinstance(r, str) and r for r in roles)):
        raise check.fail(where, f"channel_roles must be a list of role names, got {json.dumps(roles)}",
                         'Write e.g. "channel_roles": ["t1n", "t1c", "t2w", "t2f"] in the model\'s channel order.')
    size = raw.get("size")
    if size is not None and not isinstance(size, str):
        raise check.fail(where, f"size must be a string, got {json.dumps(size)}", 'Use "S", "B", "M" or "L".')
    kernel = raw.get("kernel_size")
    if kernel is not None and (isinstance(kernel, bool) or not isinstance(kernel, int)):
        raise check.fail(where, f"kernel_size must be a number, got {json.dumps(kernel)}", "Use 3 or 5.")
    return {**options, "checkpoint": _MEDNEXT_CHECKPOINTS.get(checkpoint, checkpoint.removesuffix(".model")),
            "step_size": tile_step, "channel_roles": tuple(roles) if roles else None,
            "class_labels": _class_labels(check, raw["class_labels"], where) if "class_labels" in raw else None,
            "size": size, "kernel_size": kernel}


def _build_member(framework: str, path: Path, options: dict[str, Any], trust: TrustedFiles) -> Member:
    """The member; ``trust`` (the user's --trust-checkpoint paths) is asked about each file it loads."""
    if framework in ("nnunetv2", "umamba"):
        member: Any = nnunet_member(path, trust=trust, **options)
        stage = member
        while stage is not None:  # U-Mamba folders are nnU-Net v2 folders; record what the manifest says
            stage.framework = framework
            stage = stage.previous_stage
        return member
    if framework in ("torchscript", "monai"):
        from .members.torchscript import build_member

        return build_member(framework, path, options, trust)
    from .members.mednext import MedNeXtMember

    return MedNeXtMember(path, trust_checkpoint=trust, **options)


def load_model_set(path: str | Path, cache_dir: Path | None = None, *,
                   trusted_checkpoints: Sequence[str | Path] = ()) -> ModelSet:
    """Read and validate a model-set manifest (JSON) and build its members.

    Relative member paths are relative to the manifest's folder. A member whose ``path`` does not exist but that
    has a ``url`` is downloaded into ``cache_dir`` (see :mod:`BraTSEnsembleLib.downloads`). ``trusted_checkpoints``
    (files, or folders: every file under them) allow full unpickling of those checkpoints and running those
    TorchScript files, as ``--trust-checkpoint`` does (:mod:`BraTSEnsembleLib.trust`); a manifest cannot grant that
    itself. Every problem raises ModelError naming the manifest, the member and the fix.
    """
    manifest = Path(path).expanduser().resolve()
    data, digest = read_manifest(manifest)
    return model_set_from_manifest(data, manifest, manifest.parent, cache_dir=cache_dir,
                                   trusted_checkpoints=trusted_checkpoints, digest=digest)


def model_set_from_manifest(data: Any, manifest: Path, base_dir: Path, *, cache_dir: Path | None = None,
                            trusted_checkpoints: Sequence[str | Path] = (), digest: str | None = None) -> ModelSet:
    """Validate parsed manifest ``data`` and build its members (what :func:`load_model_set` does after reading).

    ``manifest`` names the source in error messages and provenance; relative member paths are relative to
    ``base_dir``. Recipes (:mod:`BraTSEnsembleLib.recipes`) come through here once their member paths are filled in.
    """
    check = _Checker(manifest)
    if not isinstance(data, dict):
        raise check.fail(None, "a model-set manifest must be a JSON object",
                         'Write {"name": …, "postprocess": …, "members": [{"framework": …, "path": …}]}.')
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise check.fail(None, f"unknown key(s) {', '.join(map(repr, unknown))}",
                         f"Remove them; a manifest has only {', '.join(sorted(_TOP_KEYS))}.")
    name = data.get("name", manifest.stem)
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        got = f"{len(name)} characters" if isinstance(name, str) and name.strip() else json.dumps(name)[:80]
        raise check.fail(None, f"name must be a non-empty string of at most {MAX_NAME_CHARS} characters, got {got}",
                         "Give the set a short name.")
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        raise check.fail(None, "description must be a string", "Write the description as one JSON string.")
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        raise check.fail(None, f"description has {len(description)} characters, more than the "
                         f"{MAX_DESCRIPTION_CHARS} copied into every result", "Shorten it (or link to a document).")
    postprocess = data.get("postprocess")  # None: the default of the members' label set, once they are read
    if isinstance(postprocess, list) and all(isinstance(p, str) for p in postprocess):
        postprocess = ",".join(postprocess) or "none"
    if postprocess is not None and not isinstance(postprocess, str):
        raise check.fail(None, f"postprocess must be a rule string or a list of them, got {json.dumps(postprocess)}",
                         'Write e.g. "postprocess": "ratio-adaptive" or ["min-size:50", "et-to-netc:500"].')
    steps = _parse_postprocess(postprocess, f"{manifest}: postprocess: ") if postprocess is not None else None
    min_lesion_volume = data.get("min_lesion_volume_mm3")
    if min_lesion_volume is not None:
        min_lesion_volume = check.number(min_lesion_volume, None, "min_lesion_volume_mm3",
                                         "Give the smallest lesion to count in mm³ (e.g. 100), or 0 to count all.",
                                         positive=False)
        if not 0 <= min_lesion_volume < float("inf"):
            raise check.fail(None, f"min_lesion_volume_mm3 must be a finite number >= 0, got {min_lesion_volume:g}",
                             "Give the smallest lesion to count in mm³ (e.g. 100), or 0 to count all.")
    recipe = data.get("recipe")
    if recipe is not None and (not isinstance(recipe, str) or not recipe.strip()):
        raise check.fail(None, f"recipe must be the name of the recipe the set was made from, got "
                         f"{json.dumps(recipe)}", "Remove the key or give the recipe's name.")
    label_rule = data.get("labels")
    if label_rule is not None and label_rule not in LABEL_RULES:
        raise check.fail(None, f"labels must be one of {', '.join(LABEL_RULES)}, got {json.dumps(label_rule)}",
                         'Write "labels": "argmax" (nnU-Net) or "sequential-threshold" (p > 0.5 channel by channel), '
                         "or leave it out for the default of the fusion space.")
    demo = data.get("demo", False)
    if not isinstance(demo, bool):
        raise check.fail(None, f"demo must be true or false, got {json.dumps(demo)}",
                         'Write "demo": true for a set of toy models (it then warns on real images), or leave it out.')
    raw_members = data.get("members")
    if not isinstance(raw_members, list) or not raw_members:
        raise check.fail(None, "\"members\" must be a non-empty list",
                         'List the models: "members": [{"framework": "nnunetv2", "path": "…"}, …].')

    trust = TrustedFiles(trusted_checkpoints)  # exact: the files named, or the files under a folder named
    members: list[Member] = []
    weights: list[float] = []
    class_weights: list[dict[int, float]] = []
    sources: list[dict[str, Any]] = []
    names: dict[str, int] = {}
    validated: list[tuple[dict, str, str, float, dict[int, float], dict[str, Any]]] = []
    for index, raw in enumerate(raw_members):
        where = f"member {index + 1}"
        if not isinstance(raw, dict):
            raise check.fail(where, f"must be an object, got {json.dumps(raw)}",
                             'Write each member as {"framework": …, "path": …}.')
        where = _member_where(index, raw)
        framework = raw.get("framework")
        if framework is None:
            raise check.fail(where, "no framework", f"Add \"framework\": one of {', '.join(FRAMEWORKS)}.")
        if framework not in FRAMEWORKS:
            raise check.fail(where, f"unknown framework {json.dumps(framework)}",
                             f"Use one of {', '.join(FRAMEWORKS)} (U-Mamba folders: umamba).")
        allowed = _MEMBER_KEYS[framework]
        unknown = sorted(set(raw) - allowed)
        if unknown:
            only_mednext = [k for k in unknown if k in _MEDNEXT_KEYS]
            fix = (f"{', '.join(only_mednext)} apply to mednext members only (nnU-Net v2 folders take channels and "
                   "labels from their dataset.json); remove them" if only_mednext else
                   f"Remove them; a member has only {', '.join(sorted(allowed))}")
            raise check.fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}", fix + ".")
        if "name" in raw and (not isinstance(raw["name"], str) or not raw["name"].strip()
                              or len(raw["name"]) > MAX_NAME_CHARS):
            raise check.fail(where, f"name must be a non-empty string of at most {MAX_NAME_CHARS} characters, got "
                             f"{json.dumps(raw['name'])[:80]}", "Give the member a short name, or leave the key out.")
        if not isinstance(raw.get("path"), str) or not raw["path"].strip():
            raise check.fail(where, "no path" if "path" not in raw else "path must be a non-empty string",
                             "Add \"path\": the model's results folder (Trainer__Plans__configuration), relative "
                             "to the manifest's folder or absolute.")
        for key in ("url", "sha256"):
            if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
                raise check.fail(where, f"{key} must be a non-empty string", f"Fix or remove \"{key}\".")
        if "url" in raw and "sha256" not in raw:
            raise check.fail(where, "has a url but no sha256",
                             "A download must be verifiable: add \"sha256\": the output of `sha256sum ARCHIVE`.")
        if "sha256" in raw and not _SHA256_RE.match(raw["sha256"].strip()):
            raise check.fail(where, f"sha256 {raw['sha256']!r} is not a SHA-256 digest (64 hex digits)",
                             "Compute it with `sha256sum ARCHIVE`.")
        if "archive_size" in raw:
            size = raw["archive_size"]
            if "url" not in raw:
                raise check.fail(where, "has an archive_size but no url", "\"archive_size\" is the byte size of "
                                 "the archive at \"url\"; remove it or add the url.")
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise check.fail(where, f"archive_size must be the archive's size in bytes (a positive integer), got "
                                 f"{json.dumps(size)}", "Write the output of `stat -c %s ARCHIVE` (or `wc -c`).")
        weight = check.number(raw.get("weight", 1.0), where, "weight",
                              f"Weights are relative; give a number between {WEIGHT_RANGE[0]:g} and "
                              f"{WEIGHT_RANGE[1]:g} (1 = the default).", bounds=WEIGHT_RANGE)
        factors = _class_weights(check, raw.get("class_weights"), where)
        validated.append((raw, where, framework, weight, factors, _member_options(check, raw, where)))

    # Only a manifest valid as a whole gets its members read (or downloaded).
    for index, (raw, where, framework, weight, factors, options) in enumerate(validated):
        model_dir = _resolve_path(check, raw, where, base_dir, cache_dir)
        if raw.get("previous_stage"):
            options = {**options, "previous_stage": _resolve_previous_stage(check, raw, where, base_dir)}
        try:
            member = _build_member(framework, model_dir, options, trust)
        except ModelError as exc:
            if str(exc).startswith(str(manifest)):
                raise
            raise ModelError(f"{manifest}: {where}: {exc}") from exc
        except ValueError as exc:
            raise ModelError(f"{manifest}: {where}: {exc}") from exc
        if member.name in names:
            raise check.fail(where, f"name {member.name!r} is used by member {names[member.name] + 1} too",
                             "Give each member its own \"name\".")
        names[member.name] = index
        members.append(member)
        weights.append(weight)
        class_weights.append(factors)
        sources.append({k: raw[k] for k in ("url", "sha256", "archive_size") if k in raw})
    try:
        if steps is None:
            steps = parse_steps(default_postprocess(members))
        return ModelSet(members, weights, steps, class_weights=class_weights, name=name.strip(),
                        description=description, manifest=manifest, member_sources=sources,
                        manifest_sha256=digest, label_rule=label_rule,
                        recipe={"name": recipe.strip()} if recipe else None,
                        min_lesion_volume_mm3=min_lesion_volume, demo=demo)
    except ModelError as exc:
        raise ModelError(f"{manifest}: {exc}") from exc
