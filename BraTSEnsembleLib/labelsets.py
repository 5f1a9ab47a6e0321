"""Label sets: which classes a model predicts, what its output label map means, and which members may be fused.

A model's classes form its **label set**, read from its ``dataset.json`` ``labels`` when the model set is built.
There are two kinds:

* **BraTS** (:data:`BRATS_LABEL_SET`) — the classes are BraTS tumour sub-regions. A ``dataset.json`` is BraTS when
  every foreground class name is a BraTS class name (``edema``, ``NCR``, ``enhancing tumor``, ``NETC`` …; see
  :func:`BraTSEnsembleLib.labels.canonical_label_for_class_name`) or a bare number (``"1"``, ``"label 2"``: then
  the values are taken as BraTS 2023 values, as nnU-Net's own BraTS conversions number them), and when its labels
  are regions (WT/TC/ET). Such models are mapped onto the canonical BraTS 2023 classes exactly as before this
  module existed: output values 1 NETC, 2 SNFH, 3 ET, 4 RC, statistics for ET, NETC, SNFH, TC, WT (and RC), BraTS
  postprocessing. Every BraTS member may be fused with every other (whatever its numbering, whether it has RC,
  label- or region-based). TorchScript, MONAI and MedNeXt members name their channels by BraTS class and are BraTS.
* **dataset** — any other ``labels`` (``{"background": 0, "metastasis": 1}``, ``{"background": 0, "liver": 1,
  "liver tumour": 2}``): the model **keeps its own classes**. The output label map carries the values of its
  ``dataset.json``, each class keeps its name, statistics and lesion tables are per class, and no BraTS region (TC,
  WT) or BraTS postprocessing exists for it.

**Identity of a label set.** A dataset label set is the set of its foreground classes as (value, name) pairs, the
name normalised: lower case, surrounding space removed, runs of spaces, ``_`` and ``-`` folded to one space (so
``"Brain_Metastasis"`` and ``"brain metastasis"`` are one class). Two members may be fused only when these pairs
are identical: the same names with the same values. Both are required. The name says what a class is; the value is
what the output file and every tool that reads it (an evaluation, a colleague's script) calls it. Two models that
give one name different values were trained on differently numbered data, and remapping them silently could fuse
different things; such a set is refused, naming both members and both label sets, before any model runs. (When the
classes really are the same, make the two ``dataset.json`` files agree.) Value 0 is background in every set, as in
nnU-Net; nnU-Net's ``ignore`` label is not predicted and is not part of the set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import ModelError
from .labels import LABEL_NAMES, canonical_label_for_class_name, present_regions, region_mask

BRATS = "brats"
DATASET = "dataset"

#: Largest class value of a dataset label set: label maps are written as uint8.
MAX_CLASS_VALUE = 255
#: Characters a class name may have: it becomes a segment name and ID in Slicer files, a JSON key and a CSV cell.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.,()+/'&#%-]{0,63}")
#: Names that say nothing but a number ("1", "label 2", "class_3"): their values are taken as BraTS 2023 values.
_NUMBER_NAME = re.compile(r"^(label|class|c|l)?[\s_-]*\d+$")


def normalised_class_name(name: str) -> str:
    """The form in which class names are compared: lower case, spaces/``_``/``-`` runs folded to one space."""
    return re.sub(r"[\s_-]+", " ", name.strip().lower()).strip()


@dataclass(frozen=True)
class LabelClass:
    """One foreground class of a dataset label set: its value in label maps and its name from ``dataset.json``."""

    value: int
    name: str


@dataclass(frozen=True)
class LabelSet:
    """The classes of a model (see the module docstring). ``classes`` lists the foreground classes of a dataset
    label set in ascending value; the BraTS set lists the canonical classes. ``source`` (the ``dataset.json``) is
    named in messages and does not take part in comparisons."""

    kind: str
    classes: tuple[LabelClass, ...]
    source: str = field(default="", compare=False)

    @property
    def is_brats(self) -> bool:
        return self.kind == BRATS

    @property
    def identity(self) -> frozenset[tuple[int, str]]:
        """What two dataset label sets must share to be fused: (value, normalised name) of every class."""
        return frozenset((c.value, normalised_class_name(c.name)) for c in self.classes)

    def same_as(self, other: "LabelSet") -> bool:
        """True when members of the two sets may be fused: both BraTS, or equal dataset label sets."""
        if self.is_brats or other.is_brats:
            return self.is_brats and other.is_brats
        return self.identity == other.identity

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def value_of(self, name: str) -> int:
        """Label value of the class ``name`` (compared normalised); KeyError when the set has no such class."""
        key = normalised_class_name(name)
        for c in self.classes:
            if normalised_class_name(c.name) == key:
                return c.value
        raise KeyError(f"no class {name!r} in {self.describe()}")

    def labels_json(self) -> dict[str, int]:
        """``{"background": 0, name: value, …}`` as in a ``dataset.json``."""
        return {"background": 0, **{c.name: c.value for c in self.classes}}

    def describe(self) -> str:
        """Short human-readable form for messages: ``BraTS classes (…)`` or the dataset.json labels."""
        if self.is_brats:
            return "the BraTS tumour classes (NETC, SNFH, ET, RC and the regions TC, WT)"
        return "labels " + ", ".join(f"{name!r}: {value}" for name, value in self.labels_json().items())

    def to_json(self) -> dict[str, Any]:
        """What the result JSON records as ``label_set``: the kind and the labels of the output label map."""
        return {"kind": self.kind, "labels": self.labels_json()}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "LabelSet":
        """The label set of a result JSON's ``label_set`` entry (a missing entry means BraTS: results written
        before label sets existed). Raises ValueError for an entry that is not a label set."""
        if data is None:
            return BRATS_LABEL_SET
        if not isinstance(data, Mapping) or data.get("kind") not in (BRATS, DATASET):
            raise ValueError(f"{where}: label_set must be an object with kind 'brats' or 'dataset'")
        if data["kind"] == BRATS:
            return BRATS_LABEL_SET
        return dataset_label_set(data.get("labels"), where)

    def region_names(self, labels: np.ndarray | None = None) -> list[str]:
        """The names that statistics are reported for: BraTS regions (RC only when ``labels`` have it) or the
        dataset's classes in value order."""
        if self.is_brats:
            values = np.unique(labels).tolist() if labels is not None else []
            return present_regions(values)
        return list(self.names)

    def mask(self, labels: np.ndarray, name: str) -> np.ndarray:
        """Boolean mask of a BraTS region or of a dataset class (by name) in a label map of this set."""
        if self.is_brats:
            return region_mask(labels, name)
        return labels == self.value_of(name)


#: The canonical BraTS 2023+ classes (see :mod:`BraTSEnsembleLib.labels`).
BRATS_LABEL_SET = LabelSet(BRATS, tuple(LabelClass(v, n) for v, n in LABEL_NAMES.items() if v != 0))


def _is_region_based(labels: Mapping[str, Any]) -> bool:
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())


def is_brats_class_names(labels: Mapping[str, Any]) -> bool:
    """True when every foreground class of ``dataset.json`` ``labels`` is a BraTS class name or a bare number
    (the test that decides between the BraTS and a dataset label set; see the module docstring)."""
    for name, value in labels.items():
        if name == "ignore" or value == 0 or not isinstance(name, str):
            continue
        if canonical_label_for_class_name(name) is None and not _NUMBER_NAME.match(name.strip().lower()):
            return False
    return True


def dataset_label_set(labels: Any, source: str) -> LabelSet:
    """A dataset label set from ``dataset.json``-style ``labels`` ({name: value}), checked: ModelError naming
    ``source`` for values that are not integers 1–255 (background must be 0), a value or a (normalised) name used
    twice, or names that cannot be shown safely."""
    fix = ('Give each class a name of letters, digits and spaces and a distinct integer value, e.g. "labels": '
           '{"background": 0, "metastasis": 1}.')
    if not isinstance(labels, Mapping) or not labels:
        raise ModelError(f"{source}: labels must be an object of class names and values. {fix}")
    classes: list[LabelClass] = []
    seen_names: dict[str, str] = {}
    seen_values: dict[int, str] = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"{source}: class {name!r} has value {value!r}, not an integer. {fix}")
        if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
            raise ModelError(f"{source}: class name {name!r} is empty, longer than 64 characters or has characters "
                             f"other than letters, digits, spaces and -_.,()+/'&#%. Rename the class. {fix}")
        if value == 0:
            continue  # background, whatever it is called
        if not 0 < value <= MAX_CLASS_VALUE:
            raise ModelError(f"{source}: class {name!r} has value {value}; values must be 1–{MAX_CLASS_VALUE} "
                             f"(0 is background). {fix}")
        key = normalised_class_name(name)
        if key in seen_names:
            raise ModelError(f"{source}: classes {seen_names[key]!r} and {name!r} have the same name. {fix}")
        if value in seen_values:
            raise ModelError(f"{source}: classes {seen_values[value]!r} and {name!r} have the same value {value}. "
                             f"{fix}")
        seen_names[key], seen_values[value] = name, name
        classes.append(LabelClass(value, name))
    if not classes:
        raise ModelError(f"{source}: labels name no class besides background. {fix}")
    return LabelSet(DATASET, tuple(sorted(classes, key=lambda c: c.value)), source)


def label_set_from_dataset_labels(labels: Mapping[str, Any], source: str) -> LabelSet:
    """The label set of a model from its ``dataset.json`` ``labels``: BraTS (region-based, BraTS class names or
    bare numbers) or the dataset's own classes (see the module docstring)."""
    if _is_region_based(labels) or is_brats_class_names(labels):
        return BRATS_LABEL_SET
    return dataset_label_set(labels, source)


def member_label_set(member: Any) -> LabelSet:
    """A member's label set: its ``label_set`` attribute, else BraTS (members that name channels by BraTS class)."""
    found = getattr(member, "label_set", None)
    return found if isinstance(found, LabelSet) else BRATS_LABEL_SET


def common_label_set(members: Sequence[Any]) -> LabelSet:
    """The label set shared by every member; ModelError naming both members and both label sets otherwise."""
    first = members[0]
    first_set = member_label_set(first)
    for other in members[1:]:
        other_set = member_label_set(other)
        if not first_set.same_as(other_set):
            raise ModelError(
                f"members {first.name!r} and {other.name!r} cannot be fused: {first.name!r} predicts "
                f"{_described(first_set)} but {other.name!r} predicts {_described(other_set)}. A member may be "
                "fused only with members of the same label set (the same class names with the same values in "
                "dataset.json). Run them as separate model sets, or make the dataset.json labels agree if they "
                "are the same classes.")
    return first_set


def _described(label_set: LabelSet) -> str:
    return label_set.describe() + (f" ({label_set.source})" if label_set.source else "")


def check_postprocess_steps(label_set: LabelSet, steps: Iterable[Any]) -> None:
    """Refuse postprocessing for a dataset label set: every rule is defined on BraTS regions (WT, TC, ET)."""
    rules = [str(s) for s in steps]
    if rules and not label_set.is_brats:
        raise ModelError(
            f"postprocessing {', '.join(rules)} is defined on the BraTS tumour regions (WT, TC, ET), but the "
            f"models predict {_described(label_set)}. Use --postprocess none (the default for such models) or "
            'remove "postprocess" from the manifest; --min-lesion-volume sets a minimum lesion size for the '
            "statistics.")


def check_class_weights(label_set: LabelSet, class_weights: Iterable[Mapping[int, float] | None]) -> None:
    """Refuse class weights for a dataset label set: they are named by BraTS class."""
    if not label_set.is_brats and any(factors for factors in class_weights):
        raise ModelError(
            f"class weights name BraTS classes (background, NETC, SNFH, ET, RC), but the models predict "
            f"{_described(label_set)}. Remove class_weights from the manifest; member weights (\"weight\") apply "
            "to every class.")
