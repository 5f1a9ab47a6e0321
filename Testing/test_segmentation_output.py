"""The Slicer outputs written without Slicer: segment definitions, ``.seg.nrrd`` files read back with slicerio, and
the statistics table rows (BraTSEnsembleLib/segmentation.py, process.finalize_case_outputs)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from BraTSEnsembleLib import labels as L
from BraTSEnsembleLib import process, segmentation
from BraTSEnsembleLib.errors import InputError

SHAPE_ZYX = (6, 7, 8)


def oblique_reference() -> sitk.Image:
    """An anisotropic, oblique reference grid: any axis-order or LPS/RAS mistake shows up in the geometry checks."""
    image = sitk.Image(SHAPE_ZYX[2], SHAPE_ZYX[1], SHAPE_ZYX[0], sitk.sitkFloat32)
    image.SetSpacing((0.9, 1.1, 2.0))
    image.SetOrigin((-12.5, 30.25, 7.0))
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple(rotation.ravel()))
    return image


def label_map() -> np.ndarray:
    labels = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    labels[1:3, 1:4, 1:5] = L.SNFH
    labels[2, 2:4, 2:4] = L.NETC
    labels[2:4, 4:6, 5:7] = L.ET
    labels[5, 6, 7] = L.ET  # a second ET lesion in the far corner: catches transposed axes
    return labels


# ------------------------------------------------------------------------------------------------ segment definitions


def test_default_segments_are_et_netc_snfh_with_brats_colours():
    specs = segmentation.segment_specs()
    assert [s.segment_id for s in specs] == ["ET", "NETC", "SNFH"]
    for spec in specs:
        assert spec.color == L.REGIONS[spec.region].color
        assert spec.name.endswith(f"({spec.region})")
        assert not spec.derived


def test_derived_regions_only_when_asked_and_rc_when_present():
    assert [s.segment_id for s in segmentation.segment_specs(include_derived=True)] == ["ET", "NETC", "SNFH", "TC", "WT"]
    assert [s.segment_id for s in segmentation.segment_specs(include_rc=True)] == ["ET", "NETC", "SNFH", "RC"]
    assert all(s.derived for s in segmentation.segment_specs(include_derived=True) if s.region in ("TC", "WT"))


@pytest.mark.parametrize(
    "region, type_code, modifier",
    [("NETC", "6574001", None), ("SNFH", "79654002", None), ("ET", "108369006", "ET"), ("TC", "108369006", "TC"),
     ("WT", "108369006", "WT")],
)
def test_terminology_uses_snomed_codes_of_slicers_dicom_master_list(region, type_code, modifier):
    """The SNOMED CT codes of Slicer's DICOM master list, in the project's own context (the private ET/TC/WT
    modifiers are not in the master list; Testing/test_slicer_mrml.py resolves them in the shipped .term.json)."""
    entry = segmentation.terminology_entry(region)
    assert entry["contextName"] == "Segmentation category and type - BraTS Ensemble"
    assert entry["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
    assert entry["type"][:2] == ["SCT", type_code]
    assert entry["anatomicRegion"] == ["SCT", "12738006", "Brain"]
    if modifier is None:
        assert "typeModifier" not in entry
    else:
        assert entry["typeModifier"][:2] == ["99BRATS", modifier]


def test_terminology_string_is_what_slicerio_parses_back():
    for region in ("ET", "NETC", "SNFH", "TC", "WT", "RC"):
        text = segmentation.terminology_string(region)
        assert text.count("~") == 6
        assert slicerio.segmentation.terminology_entry_from_string(text) == segmentation.terminology_entry(region)
        assert slicerio.segmentation.terminology_entry_to_string(segmentation.terminology_entry(region)) == text


def test_terminologies_are_distinct_per_region():
    entries = [segmentation.terminology_entry(r) for r in ("ET", "NETC", "SNFH", "TC", "WT", "RC")]
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            assert not slicerio.segmentation.terminology_entry_matches(a, b)


# ------------------------------------------------------------------------------------------------ .seg.nrrd


def test_ijk_to_lps_matches_simpleitk_physical_points():
    ref = oblique_reference()
    matrix = segmentation.ijk_to_lps(ref)
    for index in [(0, 0, 0), (7, 6, 5), (3, 1, 4)]:
        expected = ref.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(matrix @ np.array([*index, 1.0]), [*expected, 1.0], atol=1e-9)


def test_seg_nrrd_round_trip_segments_labels_colours_geometry(tmp_path):
    ref, labels = oblique_reference(), label_map()
    path = segmentation.write_seg_nrrd(labels, ref, tmp_path / "BraTS-GLI-00001-000.seg.nrrd")
    assert [p.name for p in tmp_path.iterdir()] == ["BraTS-GLI-00001-000.seg.nrrd"]  # no partial files left

    seg = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(seg) == [segmentation.SEGMENT_TITLES[r] for r in ("ET", "NETC", "SNFH")]
    by_id = {s["id"]: s for s in seg["segments"]}
    assert list(by_id) == ["ET", "NETC", "SNFH"]
    assert {k: v["labelValue"] for k, v in by_id.items()} == {"ET": 3, "NETC": 1, "SNFH": 2}
    for region, segment in by_id.items():
        np.testing.assert_allclose(segment["color"], L.REGIONS[region].color, atol=1e-6)
        assert segment["terminology"] == segmentation.terminology_entry(region)
        assert segment["layer"] == 0
        assert segment["status"] == "completed"
        # Mask of the segment, back in (z, y, x), equals the region of the label map.
        mask_zyx = slicerio.segment_mask(seg, region).transpose(2, 1, 0)
        np.testing.assert_array_equal(mask_zyx, L.region_mask(labels, region))
    np.testing.assert_allclose(seg["ijkToLPS"], segmentation.ijk_to_lps(ref), atol=1e-9)
    assert seg["voxels"].shape == tuple(reversed(SHAPE_ZYX))
    assert seg["voxels"].dtype == np.uint8


def test_seg_nrrd_header_is_what_slicer_reads(tmp_path):
    path = segmentation.write_seg_nrrd(label_map(), oblique_reference(), tmp_path / "c.seg.nrrd")
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segment0_ID"] == "ET"
    assert header["Segment0_LabelValue"] == "3"
    assert f"TerminologyEntry:{segmentation.terminology_string('ET')}" in header["Segment0_Tags"]
    assert header["Segment0_Tags"].endswith("|")
    assert header["Segment0_NameAutoGenerated"] == "0"
    # The corner voxel (x=7, y=6, z=5) is ET: the physical position it is written at must be SimpleITK's.
    ref = oblique_reference()
    origin = np.array(header["space origin"])
    directions = np.array(header["space directions"])  # rows: i, j, k axis vectors
    point = origin + np.array([7, 6, 5]) @ directions
    np.testing.assert_allclose(point, ref.TransformIndexToPhysicalPoint((7, 6, 5)), atol=1e-9)


def test_derived_regions_are_extra_layers(tmp_path):
    labels = label_map()
    path = segmentation.write_seg_nrrd(labels, oblique_reference(), tmp_path / "d.seg.nrrd", include_derived=True)
    seg = slicerio.read_segmentation(str(path))
    assert seg["voxels"].ndim == 4 and seg["voxels"].shape[0] == 3
    by_id = {s["id"]: s for s in seg["segments"]}
    assert list(by_id) == ["ET", "NETC", "SNFH", "TC", "WT"]
    assert (by_id["TC"]["layer"], by_id["TC"]["labelValue"]) == (1, 1)
    assert (by_id["WT"]["layer"], by_id["WT"]["labelValue"]) == (2, 1)
    for region in ("ET", "NETC", "SNFH", "TC", "WT"):
        np.testing.assert_array_equal(slicerio.segment_mask(seg, region).transpose(2, 1, 0),
                                      L.region_mask(labels, region))


def test_resection_cavity_becomes_a_segment_when_present(tmp_path):
    labels = label_map()
    labels[0, 0, 0:2] = L.RC
    seg = segmentation.label_map_to_segmentation(labels, oblique_reference())
    assert [s["id"] for s in seg["segments"]] == ["ET", "NETC", "SNFH", "RC"]
    assert seg["segments"][-1]["labelValue"] == 4


def test_empty_regions_still_give_segments(tmp_path):
    labels = np.zeros(SHAPE_ZYX, np.uint8)
    path = segmentation.write_seg_nrrd(labels, oblique_reference(), tmp_path / "empty.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert [s["id"] for s in seg["segments"]] == ["ET", "NETC", "SNFH"]
    assert not seg["voxels"].any()


def test_bad_label_maps_are_refused(tmp_path):
    ref = oblique_reference()
    with pytest.raises(InputError, match="not BraTS 2023 labels"):
        segmentation.label_map_to_segmentation(np.full(SHAPE_ZYX, 7, np.uint8), ref)
    with pytest.raises(InputError, match="shape"):
        segmentation.label_map_to_segmentation(np.zeros((8, 7, 6), np.uint8), ref)
    with pytest.raises(ValueError, match=".seg.nrrd"):
        segmentation.write_seg_nrrd(label_map(), ref, tmp_path / "x.nrrd")


def test_label_file_from_the_cli_converts_to_seg_nrrd(tmp_path):
    ref, labels = oblique_reference(), label_map()
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ref)
    sitk.WriteImage(image, str(tmp_path / "case.nii.gz"))
    path = segmentation.label_file_to_seg_nrrd(tmp_path / "case.nii.gz", tmp_path / "case.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), labels)
    # NIfTI stores float32 geometry: compare at that precision.
    np.testing.assert_allclose(seg["ijkToLPS"], segmentation.ijk_to_lps(ref), atol=1e-4)


# ------------------------------------------------------------------------------------------------ statistics


CLI_RESULT = {
    "case_id": "BraTS-GLI-00001-000",
    "regions": {
        "ET": {"voxels": 1200, "volume_ml": 1.2, "lesions": 2},
        "NETC": {"voxels": 300, "volume_ml": 0.3, "lesions": 1},
        "SNFH": {"voxels": 5000, "volume_ml": 5.0, "lesions": 1},
        "TC": {"voxels": 1500, "volume_ml": 1.5, "lesions": 2},
        "WT": {"voxels": 6500, "volume_ml": 6.5, "lesions": 1},
    },
    "models": ["m1"], "postprocess": ["ratio-adaptive"], "device": "cpu",
}


def test_statistics_rows_from_cli_json():
    rows = segmentation.statistics_rows(CLI_RESULT)
    assert [r["Region"] for r in rows] == ["ET", "NETC", "SNFH", "TC", "WT"]
    assert rows[0] == {"Region": "ET", "Description": "enhancing tumour", "Volume [mL]": 1.2, "Voxels": 1200,
                       "Lesions": 2}
    assert set(rows[0]) == set(segmentation.STATISTICS_COLUMNS)
    assert segmentation.statistics_rows(CLI_RESULT["regions"]) == rows  # the regions dict alone works too
    columns = segmentation.table_columns(rows)
    assert columns["Region"] == ["ET", "NETC", "SNFH", "TC", "WT"]
    assert columns["Voxels"] == [1200, 300, 5000, 1500, 6500]


def test_statistics_rows_refuse_incomplete_numbers():
    broken = {"regions": {"ET": {"voxels": 1, "volume_ml": 0.001}}}
    with pytest.raises(ValueError, match="ET"):
        segmentation.statistics_rows(broken)
    with pytest.raises(ValueError, match="no entry for region WT"):
        segmentation.statistics_rows({"regions": {"ET": CLI_RESULT["regions"]["ET"]}}, regions=["ET", "WT"])


def test_statistics_csv(tmp_path):
    path = segmentation.write_statistics_csv(CLI_RESULT, tmp_path / "s.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["Region"] for r in rows] == ["ET", "NETC", "SNFH", "TC", "WT"]
    assert rows[2]["Volume [mL]"] == "5.0"


def write_cli_outputs(folder):
    """What `brats-ensemble predict` leaves for one case: the label map (oblique grid) and its statistics JSON."""
    image = sitk.GetImageFromArray(label_map())
    image.CopyInformation(oblique_reference())
    sitk.WriteImage(image, str(folder / "BraTS-GLI-00001-000.nii.gz"))
    (folder / "BraTS-GLI-00001-000.json").write_text(json.dumps(CLI_RESULT))


def test_finalize_case_outputs_writes_seg_nrrd_and_csv_beside_cli_outputs(tmp_path):
    write_cli_outputs(tmp_path)
    outputs = process.finalize_case_outputs(tmp_path, "BraTS-GLI-00001-000", include_derived=True)
    assert outputs["segmentation"] == tmp_path / "BraTS-GLI-00001-000.seg.nrrd"
    seg = slicerio.read_segmentation(str(outputs["segmentation"]))
    assert [s["id"] for s in seg["segments"]] == ["ET", "NETC", "SNFH", "TC", "WT"]
    assert outputs["csv"].read_text(encoding="utf-8").splitlines()[0] == "Region,Description,Volume [mL],Voxels,Lesions"
    with pytest.raises(FileNotFoundError, match="did not write"):
        process.finalize_case_outputs(tmp_path, "other-case")


def test_finalize_case_outputs_returns_the_uncertainty_map_only_when_asked(tmp_path):
    write_cli_outputs(tmp_path)
    assert "uncertainty" not in process.finalize_case_outputs(tmp_path, "BraTS-GLI-00001-000")
    with pytest.raises(FileNotFoundError, match=r"BraTS-GLI-00001-000_entropy\.nii\.gz: brats-ensemble did not"):
        process.finalize_case_outputs(tmp_path, "BraTS-GLI-00001-000", uncertainty=True)
    shape = label_map().shape
    entropy = sitk.GetImageFromArray(np.linspace(0, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape))
    entropy.CopyInformation(oblique_reference())
    sitk.WriteImage(entropy, str(tmp_path / "BraTS-GLI-00001-000_entropy.nii.gz"))
    outputs = process.finalize_case_outputs(tmp_path, "BraTS-GLI-00001-000", uncertainty=True)
    assert outputs["uncertainty"] == tmp_path / "BraTS-GLI-00001-000_entropy.nii.gz"
    assert process.uncertainty_map_path(tmp_path, "c", "disagreement") == tmp_path / "c_disagreement.nii.gz"
    with pytest.raises(ValueError, match="unknown uncertainty map"):
        process.uncertainty_map_path(tmp_path, "c", "variance")


def test_uncertainty_heat_map_has_a_warm_colour_table_and_a_fixed_window():
    display = segmentation.uncertainty_heat_map("BraTS-GLI-00001-000")
    assert display.name == "BraTS-GLI-00001-000 uncertainty (entropy)"
    assert display.color_node_id == "vtkMRMLColorTableNodeFileInferno.txt"  # Slicer's Inferno colour table
    assert (display.window_min, display.window_max) == (0.0, 1.0)  # the maps' range, never auto window/level
    assert 0.0 < display.foreground_opacity < 1.0  # the input stays visible under it
    assert segmentation.uncertainty_heat_map("c", "disagreement", opacity=1.0).name == "c uncertainty (disagreement)"
    with pytest.raises(ValueError, match="unknown uncertainty map"):
        segmentation.uncertainty_heat_map("c", "variance")
    with pytest.raises(ValueError, match="opacity"):
        segmentation.uncertainty_heat_map("c", opacity=0.0)
