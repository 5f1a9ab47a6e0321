"""Segment definitions (names, colours, standard terminology) and the ``.seg.nrrd`` / statistics-table writers.

This is what makes a BraTS label map a proper 3D Slicer segmentation: one segment per tumour region with a stable
ID, a BraTS colour and a DICOM/SNOMED-CT terminology entry, on the geometry of the reference (T1c) image. The
Slicer module loads the ``.seg.nrrd`` written here, so the scene and the batch outputs share one definition.

Label values in the file are the BraTS 2023 ones (1 NETC, 2 SNFH, 3 ET, 4 RC), so the first layer of the
``.seg.nrrd`` is the BraTS label map itself. The derived regions TC and WT overlap the others and, when asked for,
are stored in extra layers (a 4-D ``.seg.nrrd``, as Slicer stores overlapping segments).

Terminology: SNOMED CT codes as in Slicer's "DICOM master list": Necrosis for NETC, Edema for SNFH, Neoplasm for
ET/TC/WT, anatomic region Brain. No standard code separates enhancing tumour, tumour core and whole tumour, so these
carry a private type modifier (coding scheme ``99BRATS``), as DICOM allows for private codes. Because of those private
modifiers the entries name the project's own terminology context (:data:`CATEGORY_CONTEXT`), which
:func:`terminology_context` writes in Slicer's ``.term.json`` format; the Slicer module ships it as
``BraTSEnsemble/Resources/SegmentationCategoryTypeModifier-BraTSEnsemble.term.json`` and loads it into Slicer's
Terminologies logic, so every segment's entry resolves there (codes, names and colours).

**Models with their own label set** (see :mod:`BraTSEnsembleLib.labelsets`; e.g. one class "metastasis"): one
segment per class of the set, in value order, on layer 0 with the class's own value; segment ID and name are the
class's ``dataset.json`` name (the keys of the result JSON's ``regions``), the colour is the class's entry in
:data:`GENERIC_COLORS` (by its position in the set), and the terminology is :func:`generic_terminology_entry`: the
generic "Tissue" entry that Slicer itself gives a new segment, since a dataset's class names carry no code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from . import labels as L
from .case import _atomic_write, write_csv
from .errors import InputError
from .labelsets import BRATS_LABEL_SET, LabelSet

#: The project's own terminology context (the ``.term.json`` the Slicer module ships and loads).
CATEGORY_CONTEXT = "Segmentation category and type - BraTS Ensemble"
TERMINOLOGY_FILE_NAME = "SegmentationCategoryTypeModifier-BraTSEnsemble.term.json"
TERMINOLOGY_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
MORPHOLOGICALLY_ALTERED = ["SCT", "49755003", "Morphologically Altered Structure"]
BRAIN = ["SCT", "12738006", "Brain"]
NEOPLASM = ["SCT", "108369006", "Neoplasm"]
NECROSIS = ["SCT", "6574001", "Necrosis"]
EDEMA = ["SCT", "79654002", "Edema"]
PRIVATE_SCHEME = "99BRATS"

# Region → (type code, type modifier or None).
_TERMINOLOGY_CODES: dict[str, tuple[list[str], list[str] | None]] = {
    "ET": (NEOPLASM, [PRIVATE_SCHEME, "ET", "Enhancing tumor"]),
    "NETC": (NECROSIS, None),
    "SNFH": (EDEMA, None),
    "TC": (NEOPLASM, [PRIVATE_SCHEME, "TC", "Tumor core"]),
    "WT": (NEOPLASM, [PRIVATE_SCHEME, "WT", "Whole tumor"]),
    "RC": ([PRIVATE_SCHEME, "RC", "Resection cavity"], None),
}

SEGMENT_TITLES: dict[str, str] = {
    "ET": "Enhancing tumor (ET)",
    "NETC": "Non-enhancing tumor core (NETC)",
    "SNFH": "Surrounding FLAIR hyperintensity (SNFH)",
    "TC": "Tumor core (TC)",
    "WT": "Whole tumor (WT)",
    "RC": "Resection cavity (RC)",
}

BASE_REGIONS: tuple[str, ...] = ("ET", "NETC", "SNFH")
DERIVED_REGIONS: tuple[str, ...] = ("TC", "WT")
STATISTICS_REGIONS: tuple[str, ...] = ("ET", "NETC", "SNFH", "TC", "WT", "RC")
STATISTICS_COLUMNS: tuple[str, ...] = ("Region", "Description", "Volume [mL]", "Voxels", "Lesions")

# Single-label regions and their value in the first layer of the file (the BraTS 2023 label value).
_LABEL_VALUE: dict[str, int] = {"NETC": L.NETC, "SNFH": L.SNFH, "ET": L.ET, "RC": L.RC}

#: Slicer's generic terminology for a segment whose meaning no code says (what Slicer gives a new segment).
GENERIC_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
TISSUE = ["SCT", "85756007", "Tissue"]
#: Colours of the classes of a model with its own label set, by position in the set (distinct on grey images;
#: repeated after ten classes).
GENERIC_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.10, 0.10), (0.10, 0.60, 0.95), (1.00, 0.80, 0.00), (0.20, 0.75, 0.25), (0.75, 0.35, 0.85),
    (1.00, 0.50, 0.05), (0.10, 0.80, 0.80), (0.95, 0.40, 0.65), (0.55, 0.40, 0.20), (0.60, 0.60, 0.60))


@dataclass(frozen=True)
class SegmentSpec:
    """How one region appears as a Slicer segment."""

    region: str
    segment_id: str
    name: str
    color: tuple[float, float, float]
    terminology: dict[str, Any]
    derived: bool


def terminology_entry(region: str) -> dict[str, Any]:
    """Terminology of a region as slicerio writes it (category, type, optional modifier, anatomic region)."""
    if region not in _TERMINOLOGY_CODES:
        raise KeyError(f"no terminology for region {region!r} (known: {', '.join(_TERMINOLOGY_CODES)})")
    type_code, modifier = _TERMINOLOGY_CODES[region]
    entry: dict[str, Any] = {
        "contextName": CATEGORY_CONTEXT,
        "category": list(MORPHOLOGICALLY_ALTERED),
        "type": list(type_code),
    }
    if modifier is not None:
        entry["typeModifier"] = list(modifier)
    entry["anatomicContextName"] = ANATOMIC_CONTEXT
    entry["anatomicRegion"] = list(BRAIN)
    return entry


def terminology_string(region: str) -> str:
    """The ``TerminologyEntry`` tag text Slicer stores for a segment (``context~cat~type~mod~anatctx~region~mod``)."""
    entry = terminology_entry(region)

    def code(key: str) -> str:
        return "^".join(entry.get(key, ["", "", ""]))

    return "~".join(
        [entry["contextName"], code("category"), code("type"), code("typeModifier"), entry["anatomicContextName"],
         code("anatomicRegion"), code("anatomicRegionModifier")]
    )


def segment_spec(region: str) -> SegmentSpec:
    """Segment definition of a region ('ET', 'NETC', 'SNFH', 'TC', 'WT', 'RC')."""
    if region not in L.REGIONS:
        raise KeyError(f"unknown region {region!r} (known: {', '.join(L.REGIONS)})")
    r = L.REGIONS[region]
    return SegmentSpec(region, region, SEGMENT_TITLES[region], tuple(float(c) for c in r.color),  # type: ignore[arg-type]
                       terminology_entry(region), region in DERIVED_REGIONS)


def segment_specs(include_derived: bool = False, include_rc: bool = False) -> list[SegmentSpec]:
    """Segments the module creates: ET, NETC, SNFH (+ RC when the model has it, + TC, WT when asked for)."""
    regions = list(BASE_REGIONS) + (["RC"] if include_rc else []) + (list(DERIVED_REGIONS) if include_derived else [])
    return [segment_spec(r) for r in regions]


def _coded(code: Sequence[str], region: str | None = None) -> dict[str, Any]:
    scheme, value, meaning = code
    entry: dict[str, Any] = {"CodingSchemeDesignator": scheme, "CodeValue": value, "CodeMeaning": meaning}
    if region is not None:
        entry["recommendedDisplayRGBValue"] = [int(round(255 * c)) for c in L.REGIONS[region].color]
    return entry


def terminology_context() -> dict[str, Any]:
    """The project's terminology context as a Slicer ``.term.json`` document (dcmqi segment-context schema).

    One category (Morphologically Altered Structure) whose types are the codes :func:`terminology_entry` uses:
    Neoplasm with the private modifiers ET, TC and WT, Necrosis (NETC), Edema (SNFH) and the private resection
    cavity; each with the region's colour. Written from the same tables as the segments, so the two cannot drift.
    """
    types: dict[tuple[str, ...], dict[str, Any]] = {}
    for region in STATISTICS_REGIONS:
        type_code, modifier = _TERMINOLOGY_CODES[region]
        if modifier is None:
            types[tuple(type_code)] = _coded(type_code, region)
        else:
            entry = types.setdefault(tuple(type_code), _coded(type_code))
            entry.setdefault("Modifier", []).append(_coded(modifier, region))
    category = {**_coded(MORPHOLOGICALLY_ALTERED), "showAnatomy": True, "Type": list(types.values())}
    return {"SegmentationCategoryTypeContextName": CATEGORY_CONTEXT, "@schema": TERMINOLOGY_SCHEMA,
            "SegmentationCodes": {"Category": [category]}}


def generic_terminology_entry() -> dict[str, Any]:
    """The terminology of a class of a model with its own label set: Slicer's generic "Tissue" entry."""
    return {"contextName": GENERIC_CONTEXT, "category": list(TISSUE), "type": list(TISSUE)}


def label_set_segment_specs(label_set: LabelSet) -> list[SegmentSpec]:
    """One segment per class of a dataset label set, in value order: ID and name the class's name, a colour of
    :data:`GENERIC_COLORS`, the generic terminology (see the module docstring)."""
    if label_set.is_brats:
        raise ValueError("BraTS label maps have segment_specs(); this is for models with their own label set")
    return [SegmentSpec(c.name, c.name, c.name, GENERIC_COLORS[index % len(GENERIC_COLORS)],
                        generic_terminology_entry(), False)
            for index, c in enumerate(label_set.classes)]


# ----------------------------------------------------------------------------------------------------------------
# Geometry and the .seg.nrrd writer


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4×4 matrix from voxel index (i, j, k) to physical LPS millimetres of a 3-D SimpleITK image."""
    if image.GetDimension() != 3:
        raise InputError(f"reference image is {image.GetDimension()}-D; a 3-D image is needed")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def label_map_to_segmentation(
    labels_zyx: np.ndarray, reference: sitk.Image, include_derived: bool = False,
    label_set: LabelSet = BRATS_LABEL_SET,
) -> dict[str, Any]:
    """A slicerio segmentation dict from a canonical BraTS label map (z, y, x) on the reference image grid.

    Layer 0 holds the label map with its BraTS values (1 NETC, 2 SNFH, 3 ET, 4 RC if present); TC and WT, when
    asked for, each get a further layer with value 1. For a model with its own ``label_set`` layer 0 holds its
    values, one segment per class (``include_derived`` does not apply). Raises InputError on a shape mismatch or
    unknown values.
    """
    labels_zyx = np.asarray(labels_zyx)
    expected = tuple(reversed(reference.GetSize()))
    if labels_zyx.shape != expected:
        raise InputError(f"label map has shape {labels_zyx.shape} (z, y, x) but the reference image has {expected}")
    present = np.unique(labels_zyx)
    if label_set.is_brats:
        unknown = sorted(int(v) for v in present if int(v) not in (L.BACKGROUND, L.NETC, L.SNFH, L.ET, L.RC))
        if unknown:
            raise InputError(f"label map has values {unknown} that are not BraTS 2023 labels (0 background, 1 NETC, "
                             "2 SNFH, 3 ET, 4 RC); convert BraTS 2021 maps (4 = ET) first")
        include_rc = bool(np.any(present == L.RC))
        specs = segment_specs(include_derived=include_derived, include_rc=include_rc)
        values = dict(_LABEL_VALUE)
    else:
        values = {c.name: c.value for c in label_set.classes}
        unknown = sorted(int(v) for v in present if int(v) != 0 and int(v) not in values.values())
        if unknown:
            raise InputError(f"label map has values {unknown} that are not classes of its model's "
                             f"{label_set.describe()}")
        specs = label_set_segment_specs(label_set)
    layer0 = np.ascontiguousarray(labels_zyx.astype(np.uint8).transpose(2, 1, 0))  # (i, j, k) = (x, y, z)
    layers = [layer0]
    full_extent = [0, layer0.shape[0] - 1, 0, layer0.shape[1] - 1, 0, layer0.shape[2] - 1]
    segments = []
    for spec in specs:
        if spec.derived:
            layers.append(L.region_mask(layer0, spec.region).astype(np.uint8))
            layer, value = len(layers) - 1, 1
        else:
            layer, value = 0, values[spec.region]
        segments.append({
            "id": spec.segment_id,
            "name": spec.name,
            "nameAutoGenerated": False,
            "color": list(spec.color),
            "colorAutoGenerated": False,
            "labelValue": int(value),
            "layer": int(layer),
            # The full extent for every segment: older Slicer versions crop segments sharing a layer to the first
            # segment's extent.
            "extent": list(full_extent),
            "terminology": spec.terminology,
            "status": "completed",
        })
    voxels = layers[0] if len(layers) == 1 else np.stack(layers)
    return {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps(reference),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }


def write_seg_nrrd(labels_zyx: np.ndarray, reference: sitk.Image, path: str | Path,
                   include_derived: bool = False, label_set: LabelSet = BRATS_LABEL_SET) -> Path:
    """Write a label map (z, y, x; BraTS, or of ``label_set``) as a Slicer ``.seg.nrrd`` on the reference geometry
    (atomically)."""
    import slicerio

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a segmentation file name must end with .seg.nrrd")
    segmentation = label_map_to_segmentation(labels_zyx, reference, include_derived=include_derived,
                                             label_set=label_set)
    _atomic_write(path, lambda tmp: slicerio.write_segmentation(str(tmp), segmentation))
    return path


def label_file_to_seg_nrrd(label_path: str | Path, seg_path: str | Path, include_derived: bool = False,
                           label_set: LabelSet = BRATS_LABEL_SET) -> Path:
    """Convert a label map file (NIfTI/NRRD, e.g. ``OUT_DIR/<id>.nii.gz`` from the CLI) to ``.seg.nrrd``; give the
    ``label_set`` of its result JSON (:meth:`LabelSet.from_json`) for models with their own classes."""
    from .case import read_image

    image = read_image(label_path)
    labels_zyx = sitk.GetArrayFromImage(image)
    return write_seg_nrrd(labels_zyx, image, seg_path, include_derived=include_derived, label_set=label_set)


# ----------------------------------------------------------------------------------------------------------------
# Statistics table


def statistics_rows(statistics: Mapping[str, Any], regions: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of the statistics table from the CLI's result JSON (or its ``regions`` dict).

    One row per region in the order ET, NETC, SNFH, TC, WT (RC when present), with columns
    :data:`STATISTICS_COLUMNS`. Missing numbers raise ValueError naming the region, rather than showing zeros.
    """
    by_region = statistics.get("regions", statistics)
    if not isinstance(by_region, Mapping):
        raise ValueError("statistics must be a dict of regions")
    own_classes = not LabelSet.from_json(statistics.get("label_set"), "statistics").is_brats
    if regions is not None:
        order = list(regions)
    elif own_classes:  # a model with its own label set: its classes, in the result's order
        order = list(by_region)
    else:
        order = [r for r in STATISTICS_REGIONS if r in by_region]
    rows = []
    for region in order:
        values = by_region.get(region)
        if not isinstance(values, Mapping):
            raise ValueError(f"statistics have no entry for region {region}")
        try:
            volume = float(values["volume_ml"])
            voxels = int(values["voxels"])
            lesions = int(values["lesions"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"statistics for {region} lack volume_ml/voxels/lesions: {dict(values)}") from exc
        if own_classes:
            description = f"label {values.get('value', '?')}"
        else:
            description = L.REGIONS[region].description if region in L.REGIONS else region
        rows.append({"Region": region, "Description": description, "Volume [mL]": round(volume, 3),
                     "Voxels": voxels, "Lesions": lesions})
    return rows


def write_statistics_csv(statistics: Mapping[str, Any], path: str | Path) -> Path:
    """Write the statistics table as CSV (same columns as the Slicer table node)."""
    return write_csv(statistics_rows(statistics), path, STATISTICS_COLUMNS)


def table_columns(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows turned into columns ``{column: [values…]}``, the shape a Slicer table node is filled in."""
    rows = list(rows)
    return {column: [row[column] for row in rows] for column in STATISTICS_COLUMNS}


# ----------------------------------------------------------------------------------------------------------------
# Uncertainty heat map

#: Slicer's "Inferno" colour table: black → purple → red → yellow, so the most uncertain voxels are the warmest.
HEAT_MAP_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"


@dataclass(frozen=True)
class HeatMapDisplay:
    """How the Slicer module shows an uncertainty map: the volume's name, its colour table, a fixed window (min, max)
    and its opacity as the foreground layer over the input volume."""

    name: str
    color_node_id: str
    window_min: float
    window_max: float
    foreground_opacity: float


def uncertainty_heat_map(case_id: str, kind: str = "entropy", opacity: float = 0.5) -> HeatMapDisplay:
    """Display of a case's uncertainty map (``predict --save-uncertainty``) as a heat map.

    Both maps lie in [0, 1] (see :mod:`BraTSEnsembleLib.uncertainty`), so the window is fixed at 0 … 1: an automatic
    window/level would stretch a nearly certain case's small values to full colour and make it look uncertain.
    """
    from .process import UNCERTAINTY_MAPS

    if kind not in UNCERTAINTY_MAPS:
        raise ValueError(f"unknown uncertainty map {kind!r}; choose one of {', '.join(UNCERTAINTY_MAPS)}")
    if not 0.0 < opacity <= 1.0:
        raise ValueError(f"opacity must be in (0, 1], got {opacity}")
    return HeatMapDisplay(f"{case_id} uncertainty ({kind})", HEAT_MAP_COLOR_NODE_ID, 0.0, 1.0, opacity)
