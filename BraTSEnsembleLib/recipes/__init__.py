"""Recipes: the published BraTS pipelines as named model-set templates.

A recipe is a model-set manifest (see :mod:`BraTSEnsembleLib.modelset`) whose members name a **role** instead of a
path, plus what the pipeline's authors published about it. The JSON files beside this module are the recipes::

    {"name": "goat2025",                      # the recipe's name (the file is <name>.json)
     "title": "…", "source": "…",             # who published it, where
     "description": "…", "notes": ["…"],      # what it does, every rule spelled out
     "labels": "sequential-threshold",        # the manifest keys: labels, postprocess, members
     "postprocess": "ratio-adaptive",
     "members": [{"role": "resenc-m",         # filled by --model resenc-m=PATH
                  "repeatable": false,        # optional: true lets --model ROLE=PATH be given several times
                  "description": "…",         # what model the role expects
                  "framework": "nnunetv2", "folds": ["all"], "mirroring": false, …}]}   # any member key

:func:`recipe_model_set` fills the roles with paths (``--model ROLE=PATH``), applies the user's overrides of the
choices that do not depend on the models (``--labels``, ``--postprocess``, ``--mirroring``) and builds the set
through the manifest validation, so a recipe is checked exactly as a manifest is. The set records the recipe's
name and every override in its provenance (the output JSON's ``recipe`` entry).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:  # the model-set machinery (torch, nnU-Net) is imported only when a set is built
    from ..modelset import ModelSet

RECIPE_DIR = Path(__file__).resolve().parent
#: Keys a recipe has beyond a manifest's (dropped before the manifest validation)
_RECIPE_KEYS = ("title", "source", "notes")
_ROLE_KEYS = ("role", "repeatable", "description")


@dataclass(frozen=True)
class Overrides:
    """Choices the user may change in any recipe; None keeps the recipe's."""

    labels: str | None = None
    postprocess: str | None = None
    mirroring: bool | None = None
    min_lesion_volume_mm3: float | None = None

    def given(self) -> dict[str, Any]:
        """The overrides that were set, as recorded in the output."""
        return {k: v for k, v in (("labels", self.labels), ("postprocess", self.postprocess),
                                  ("mirroring", self.mirroring),
                                  ("min_lesion_volume_mm3", self.min_lesion_volume_mm3)) if v is not None}


def recipe_names() -> list[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def recipe_path(name: str) -> Path:
    """The JSON file of recipe ``name``; ModelError listing the recipes when there is none."""
    path = RECIPE_DIR / f"{name}.json"
    if name not in recipe_names():
        raise ModelError(f"unknown recipe {name!r}. Choose one of {', '.join(recipe_names())} "
                         "(`brats-ensemble recipes list`).")
    return path


def load_recipe(name: str) -> dict[str, Any]:
    """The recipe template ``name`` as parsed JSON."""
    path = recipe_path(name)
    return json.loads(path.read_text(encoding="utf-8"))


def recipe_roles(recipe: Mapping[str, Any]) -> list[str]:
    """The roles of a recipe's members, in member order."""
    return [member["role"] for member in recipe["members"]]


def parse_role_paths(values: Sequence[str], recipe_name: str) -> list[tuple[str, Path]]:
    """``["ROLE=PATH", …]`` → [(role, path)] in the order given; ModelError for a value without ``=``."""
    pairs = []
    for value in values:
        role, sep, path = value.partition("=")
        if not sep or not role.strip() or not path.strip():
            raise ModelError(f"--model {value!r}: with --recipe {recipe_name}, give each model as ROLE=PATH, e.g. "
                             f"--model {recipe_roles(load_recipe(recipe_name))[0]}=/models/Trainer__Plans__3d_fullres")
        pairs.append((role.strip(), Path(path.strip()).expanduser().resolve()))
    return pairs


def fill_recipe(recipe: Mapping[str, Any], models: Sequence[tuple[str, Path]],
                overrides: Overrides = Overrides()) -> dict[str, Any]:
    """A complete manifest (dict) from a recipe: each role's member gets its path (several for a repeatable role),
    the overrides replace the recipe's choices, and the recipe-only keys are dropped.

    Raises ModelError for a role the recipe does not have, a role missing, or a non-repeatable role given twice.
    """
    name = recipe["name"]
    roles = recipe_roles(recipe)
    given: dict[str, list[Path]] = {}
    for role, path in models:
        if role not in roles:
            raise ModelError(f"recipe {name}: no role {role!r}. Its roles are {', '.join(roles)} "
                             f"(`brats-ensemble recipes show {name}`).")
        given.setdefault(role, []).append(path)
    missing = [role for role in roles if role not in given]
    if missing:
        raise ModelError(f"recipe {name}: no model given for {', '.join(missing)}. Add "
                         + " ".join(f"--model {role}=PATH" for role in missing) + ".")
    manifest: dict[str, Any] = {k: copy.deepcopy(v) for k, v in recipe.items()
                                if k not in _RECIPE_KEYS and k != "members"}
    members = []
    for template in recipe["members"]:
        paths = given[template["role"]]
        if len(paths) > 1 and not template.get("repeatable", False):
            raise ModelError(f"recipe {name}: role {template['role']!r} takes one model, {len(paths)} were given.")
        for number, path in enumerate(paths, start=1):
            member = {k: copy.deepcopy(v) for k, v in template.items() if k not in _ROLE_KEYS}
            member["name"] = template["role"] if len(paths) == 1 else f"{template['role']}-{number}"
            member["path"] = str(path)
            if overrides.mirroring is not None:
                member["mirroring"] = overrides.mirroring
            members.append(member)
    manifest["members"] = members
    manifest["recipe"] = name
    if overrides.labels is not None:
        manifest["labels"] = overrides.labels
    if overrides.postprocess is not None:
        manifest["postprocess"] = overrides.postprocess
    if overrides.min_lesion_volume_mm3 is not None:
        manifest["min_lesion_volume_mm3"] = overrides.min_lesion_volume_mm3
    return manifest


def recipe_model_set(name: str, models: Sequence[tuple[str, Path]], overrides: Overrides = Overrides(), *,
                     trusted_checkpoints: Sequence[str | Path] = ()) -> ModelSet:
    """Build recipe ``name`` with the given (role, path) models and overrides; the set records the recipe."""
    from ..ensemble import LABEL_RULES
    from ..modelset import model_set_from_manifest

    if overrides.labels is not None and overrides.labels not in LABEL_RULES:
        raise ModelError(f"--labels {overrides.labels!r}: choose one of {', '.join(LABEL_RULES)}")
    recipe = load_recipe(name)
    manifest = fill_recipe(recipe, models, overrides)
    model_set = model_set_from_manifest(manifest, recipe_path(name), Path.cwd(),
                                        trusted_checkpoints=trusted_checkpoints)
    model_set.recipe = {"name": name, "title": recipe.get("title"), "source": recipe.get("source"),
                        "overrides": overrides.given()}
    return model_set


def write_recipe_manifest(name: str, models: Sequence[tuple[str, Path]], path: str | Path,
                          overrides: Overrides = Overrides(), overwrite: bool = False) -> Path:
    """Write recipe ``name`` filled with ``models`` as a model-set manifest (JSON) at ``path`` and return it.

    What the Slicer module does when the user builds a set from a recipe; the file is an ordinary manifest (it
    names its recipe) to run with ``--model-set``, edit or share. An existing file is kept unless ``overwrite``.
    """
    from ..case import write_json

    target = Path(path).expanduser().resolve()
    if target.exists() and not overwrite:
        raise ModelError(f"{target}: exists; choose another file name or allow replacing it")
    recipe = load_recipe(name)
    manifest = fill_recipe(recipe, models, overrides)
    manifest.setdefault("description", recipe.get("description", ""))
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_json(manifest, target)


def describe_recipe(recipe: Mapping[str, Any]) -> str:
    """A human-readable account of a recipe (``brats-ensemble recipes show NAME``)."""
    lines = [f"{recipe['name']}: {recipe.get('title', '')}", f"source: {recipe.get('source', '-')}", "",
             recipe.get("description", ""), "", "members (give each with --model ROLE=PATH):"]
    for member in recipe["members"]:
        options = {k: v for k, v in member.items() if k not in _ROLE_KEYS}
        more = " (repeatable)" if member.get("repeatable") else ""
        lines.append(f"  {member['role']}{more}: {member.get('description', '')}")
        lines.append(f"      {json.dumps(options)}")
    lines += ["", f"labels: {recipe.get('labels', 'default (argmax; p > 0.5 per region for region models)')}",
              f"postprocess: {recipe.get('postprocess', 'ratio-adaptive')}"]
    notes = recipe.get("notes") or []
    if notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in notes]
    return "\n".join(lines)
