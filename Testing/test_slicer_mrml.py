"""The Slicer module's logic on Slicer's own libraries: ``slicer-core`` (Slicer 5.12's MRML, Volumes, Segmentations,
Terminologies, Subject hierarchy, Tables and Colors logics, layout and slice logics, and Slicer's ``slicer/util.py``).

Everything here is MRML for real: a ``vtkMRMLScene``, the module logics on it, files read and written through
Slicer's storage nodes. The only stand-in is ``slicer_application.CoreApplication`` (what Slicer's Qt application
sets up; see there). What still runs only inside the Slicer application (the widget, ``parameterNodeWrapper``, the
dependency installer, BRAINSResample itself, Sample Data's download) is listed in docs/slicer.md.
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from vtk.util.numpy_support import vtk_to_numpy

import slicer

from BraTSEnsembleLib import process, segmentation, stats
from BraTSEnsembleLib import demo as demo_library

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slicer_application import CoreApplication, add_module_to_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
add_module_to_path(ROOT)

from BraTSEnsembleModule import logic as module_logic  # noqa: E402
from BraTSEnsembleModule.logic import SegmentationLogic, SegmentationRun  # noqa: E402

LOGIC_PY = ROOT / "BraTSEnsemble" / "BraTSEnsembleModule" / "logic.py"
DEMO_CASE = demo_library.CASE_DIR
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture
def app(tmp_path):
    application = CoreApplication(tmp_path / "slicer")
    yield application
    application.close()


@pytest.fixture
def logic(app):
    return SegmentationLogic(app.applicationLogic)


def load_volume(app, path, name=None):
    name = name or Path(path).name.split(".")[0]
    node = app.moduleLogics["Volumes"].AddArchetypeVolume(str(path), name, 0)
    assert node is not None, path
    return node


def nodes_of_class(scene, class_name):
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


# ================================================================================================ the logic's names


def slicer_names_used(path: Path) -> tuple[set[str], set[str]]:
    """(``slicer.X`` names, ``slicer.util.X`` names) a file uses."""
    names, util = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
            names.add(node.attr)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "slicer"
                and node.value.attr == "util"):
            util.add(node.attr)
    return names, util


def test_every_slicer_name_the_logic_uses_exists_in_slicer_core():
    names, util = slicer_names_used(LOGIC_PY)
    assert {"vtkMRMLSubjectHierarchyNode", "vtkMRMLVolumeArchetypeStorageNode"} <= names
    assert not names & {"app", "mrmlScene", "modules", "cli", "qt", "ctk"}, "the logic must not need the application"
    for name in names - {"util"}:
        assert hasattr(slicer, name), f"slicer.{name} is not in slicer-core"
    for name in util:
        function = getattr(slicer.util, name)
        source = inspect.getsource(function)
        assert "slicer.app" not in source and "slicer.mrmlScene" not in source, f"slicer.util.{name} needs the app"
    imported = set()
    for node in ast.walk(ast.parse(LOGIC_PY.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    assert not imported & {"qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper",
                           "slicer.i18n", "SampleData", "PyTorchUtils"}, imported


def test_the_logic_needs_an_application_logic_with_a_scene(app):
    with pytest.raises(ValueError, match="scene"):
        SegmentationLogic(slicer.vtkSlicerApplicationLogic())
    with pytest.raises(RuntimeError, match="Sequences module logic"):
        SegmentationLogic(app.applicationLogic).moduleLogic("Sequences")


# ================================================================================================ volumes, export


def sitk_ras_grid(image: sitk.Image):
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return LPS_TO_RAS @ direction, LPS_TO_RAS @ np.asarray(image.GetOrigin())


def test_volumes_load_through_storage_nodes_and_export_in_world_coordinates(app, logic, tmp_path):
    path = DEMO_CASE / "DemoPhantom-777-t1c.nii.gz"
    node = load_volume(app, path)
    assert node.GetStorageNode().GetFileName() == str(path)
    reference = sitk.ReadImage(str(path))
    assert node.GetImageData().GetDimensions() == reference.GetSize()
    logic.exportVolume(node, str(tmp_path / "plain.nii.gz"))
    exported = sitk.ReadImage(str(tmp_path / "plain.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(reference))
    assert np.allclose(exported.GetOrigin(), reference.GetOrigin()) and np.allclose(exported.GetSpacing(),
                                                                                    reference.GetSpacing())
    # Under a transform: written where it is shown (world coordinates); the scene's volume is untouched.
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 12.5)  # 12.5 mm to the right (RAS x)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    before = app.scene.GetNumberOfNodes()
    logic.exportVolume(node, str(tmp_path / "moved.nii.gz"))
    assert app.scene.GetNumberOfNodes() == before
    assert node.GetParentTransformNode() is transform and node.GetStorageNode().GetFileName() == str(path)
    moved = sitk.ReadImage(str(tmp_path / "moved.nii.gz"))
    assert np.allclose(np.subtract(moved.GetOrigin(), reference.GetOrigin()), (-12.5, 0.0, 0.0))  # LPS x = -R


# ================================================================================================ importing results


def oblique_left_handed_label_map() -> sitk.Image:
    """A small BraTS 2023 label map on an oblique, anisotropic, left-handed grid (det(direction) = -1)."""
    angle = np.deg2rad(23.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    tilt = np.deg2rad(11.0)
    rotation = rotation @ np.array([[1.0, 0.0, 0.0], [0.0, np.cos(tilt), -np.sin(tilt)], [0.0, np.sin(tilt),
                                                                                        np.cos(tilt)]])
    direction = rotation @ np.diag([1.0, 1.0, -1.0])
    assert np.linalg.det(direction) == pytest.approx(-1.0)
    rng = np.random.default_rng(7)
    labels = np.zeros((13, 29, 31), np.uint8)  # (z, y, x)
    labels[3:10, 5:22, 6:25] = 2  # SNFH
    labels[4:9, 8:18, 9:20] = 1  # NETC
    labels[5:8, 10:15, 11:16] = 3  # ET
    labels[rng.random(labels.shape) < 0.02] = 3  # scattered single-voxel lesions
    labels[0, 0, 0] = 1  # a corner voxel
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.7, 1.3, 3.1))
    image.SetOrigin((-41.2, 17.9, 5.5))
    image.SetDirection(direction.flatten().tolist())
    return image


def write_cli_outputs(out_dir: Path, case_id: str, labels: sitk.Image, uncertainty: bool = False) -> None:
    """What ``brats-ensemble predict`` leaves in its output folder for a case: ``<id>.nii.gz`` and ``<id>.json``
    (statistics computed by the library's own stats, as the CLI does), and the uncertainty map when asked for."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(labels, str(out_dir / f"{case_id}.nii.gz"), True)
    array = sitk.GetArrayFromImage(labels)
    regions = stats.region_statistics(array, tuple(reversed(labels.GetSpacing())))
    (out_dir / f"{case_id}.json").write_text(json.dumps({
        "case": case_id, "regions": regions, "models": ["test"], "postprocess": [], "device": "cpu"}))
    if uncertainty:
        entropy = sitk.GetImageFromArray((array > 0).astype(np.float32) * 0.25)
        entropy.CopyInformation(labels)
        sitk.WriteImage(entropy, str(process.uncertainty_map_path(out_dir, case_id)), True)


def reference_volume_on(app, image: sitk.Image, tmp_path: Path, name: str):
    """A T1c-like volume on the label map's grid, loaded through the volumes logic."""
    values = sitk.Cast(image, sitk.sitkFloat32) * 100.0
    values.CopyInformation(image)
    path = tmp_path / f"{name}.nii.gz"
    sitk.WriteImage(values, str(path))
    return load_volume(app, path, name)


def label_points_ras(image: sitk.Image, value: int | tuple[int, ...]) -> np.ndarray:
    """Physical RAS positions (mm) of the voxels with a label value, from the file's geometry."""
    array = sitk.GetArrayFromImage(image)
    zyx = np.argwhere(np.isin(array, value))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    lps = np.asarray(image.GetOrigin()) + (zyx[:, ::-1] * np.asarray(image.GetSpacing())) @ direction.T
    return lps @ LPS_TO_RAS.T


def segment_points_ras(segmentation_node, segment_id: str) -> np.ndarray:
    """Physical RAS positions of a segment's voxels, from its binary labelmap representation in the scene."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    labelmap = segment.GetRepresentation("Binary labelmap")
    extent = labelmap.GetExtent()
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    if min(dims) <= 0:
        return np.zeros((0, 3))
    scalars = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    kji = np.argwhere(scalars == segment.GetLabelValue())
    ijk = kji[:, ::-1] + np.asarray(extent[0::2])
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return ijk @ m[:3, :3].T + m[:3, 3]


def mismatches(expected: np.ndarray, found: np.ndarray, tolerance_mm: float = 0.01) -> int:
    """Voxels of either set with no voxel of the other within ``tolerance_mm`` (voxels are ≥ 0.7 mm apart)."""
    from scipy.spatial import cKDTree

    if len(expected) == 0 or len(found) == 0:
        return len(expected) + len(found)
    missing = np.count_nonzero(cKDTree(found).query(expected)[0] > tolerance_mm)
    extra = np.count_nonzero(cKDTree(expected).query(found)[0] > tolerance_mm)
    return int(missing + extra + abs(len(expected) - len(found)))


REGION_VALUES = {"ET": 3, "NETC": 1, "SNFH": 2, "TC": (1, 3), "WT": (1, 2, 3)}


@pytest.mark.parametrize("case", ["oblique-left-handed", pytest.param("demo", marks=pytest.mark.slow)])
def test_segment_voxels_land_on_the_physical_positions_of_the_label_map(app, logic, tmp_path, case):
    """The segments in the scene cover exactly the label map's voxels, by physical position (0 mismatches): on an
    oblique, anisotropic, left-handed grid (every segment, TC/WT layers included) and on the demo case (160×192×160,
    ET/NETC/SNFH; about 5 s)."""
    if case == "demo":
        labels = sitk.ReadImage(str(DEMO_CASE / "DemoPhantom-777-seg.nii.gz"))
        reference = load_volume(app, DEMO_CASE / "DemoPhantom-777-t1c.nii.gz")
        regions = ("ET", "NETC", "SNFH")
    else:
        labels = oblique_left_handed_label_map()
        reference = reference_volume_on(app, labels, tmp_path, "Oblique-t1c")
        regions = tuple(REGION_VALUES)
    write_cli_outputs(tmp_path / "out", "C", labels)
    node, _table, _ = logic.importResults(str(tmp_path / "out"), "C", reference, includeDerived=case != "demo")
    counts = {}
    for region in regions:
        value = REGION_VALUES[region]
        expected, found = label_points_ras(labels, value), segment_points_ras(node, region)
        assert len(expected), region
        counts[region] = mismatches(expected, found)
    assert counts == {region: 0 for region in regions}


def test_finish_segmentation_into_new_and_existing_nodes(app, logic, tmp_path):
    labels = oblique_left_handed_label_map()
    reference = reference_volume_on(app, labels, tmp_path, "BraTS-GLI-00009-000-t1c")

    def finished_run(case_id):
        temp = Path(logic._newTemporaryDirectory())
        write_cli_outputs(temp / "output", case_id, labels)
        cli = process.CliProcess([sys.executable, "-c", "pass"])  # a process that succeeded
        cli.wait(timeout=60)
        return SegmentationRun(cli, str(temp), case_id, reference, includeDerived=False), temp

    run, temp = finished_run("BraTS-GLI-00009-000")
    assert Path(temp).is_relative_to(app.temporary)
    seg, table = logic.finishSegmentation(run)
    assert not temp.exists()
    assert seg.GetName() == "BraTS-GLI-00009-000 segmentation"
    assert table.GetName() == "BraTS-GLI-00009-000 tumor statistics"
    ids = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert ids == ["ET", "NETC", "SNFH"]
    assert json.loads(seg.GetAttribute("BraTSEnsemble.Provenance")) == {"models": ["test"], "postprocess": [],
                                                                        "device": "cpu"}
    # A second run into the same (existing) nodes replaces their content; nothing else is added.
    existing_seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    existing_seg.GetSegmentation().AddEmptySegment("old")
    existing_table = app.scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    before = app.scene.GetNumberOfNodes()
    run, temp = finished_run("BraTS-GLI-00009-000")
    seg2, table2 = logic.finishSegmentation(run, outputSegmentation=existing_seg, outputTable=existing_table)
    assert seg2 is existing_seg and table2 is existing_table and seg2.GetName() == "my segmentation"
    ids = [seg2.GetSegmentation().GetNthSegmentID(i) for i in range(seg2.GetSegmentation().GetNumberOfSegments())]
    assert ids == ["ET", "NETC", "SNFH"]
    assert table2.GetNumberOfRows() == table.GetNumberOfRows()
    added = app.scene.GetNumberOfNodes() - before
    assert added == 1, "only the existing segmentation's display node may be added"
    # A failed run: its error message, the scene unchanged, the temporary folder gone.
    temp = Path(logic._newTemporaryDirectory())
    cli = process.CliProcess([sys.executable, "-c",
                              "import sys; print('error: C-t1c.nii.gz: cannot be read', file=sys.stderr); "
                              "sys.exit(2)"])
    cli.wait(timeout=60)
    before = app.scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="C-t1c.nii.gz: cannot be read"):
        logic.finishSegmentation(SegmentationRun(cli, str(temp), "C", reference, False))
    assert app.scene.GetNumberOfNodes() == before and not temp.exists()


def test_segments_and_terminology_resolve_in_the_projects_term_json(app, logic, tmp_path):
    shipped = json.loads(Path(SegmentationLogic.terminologyFile()).read_text())
    assert shipped == segmentation.terminology_context(), (
        "regenerate BraTSEnsemble/Resources/" + segmentation.TERMINOLOGY_FILE_NAME + " from "
        "BraTSEnsembleLib.segmentation.terminology_context()")
    labels = oblique_left_handed_label_map()
    write_cli_outputs(tmp_path / "out", "C", labels)
    reference = reference_volume_on(app, labels, tmp_path, "C-t1c")
    node, _table, _ = logic.importResults(str(tmp_path / "out"), "C", reference, includeDerived=True)
    terminologies = app.moduleLogics["Terminologies"]
    names = vtk.vtkStringArray()
    terminologies.GetLoadedTerminologyNames(names)
    assert segmentation.CATEGORY_CONTEXT in [names.GetValue(i) for i in range(names.GetNumberOfValues())]
    for region in ("ET", "NETC", "SNFH", "TC", "WT"):
        segment = node.GetSegmentation().GetSegment(region)
        spec = segmentation.segment_spec(region)
        assert segment.GetName() == spec.name
        assert segment.GetColor() == pytest.approx(spec.color)
        text = segment.GetTerminology()
        assert text == segmentation.terminology_string(region)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(text, entry)
        found = terminologies.UpdateEntryFromLoadedTerminologies(entry, [segmentation.CATEGORY_CONTEXT], [])
        assert found, region
        assert entry.GetTerminologyContextName() == segmentation.CATEGORY_CONTEXT
        type_code, modifier = segmentation._TERMINOLOGY_CODES[region]
        assert entry.GetCategoryObject().GetCodeValue() == segmentation.MORPHOLOGICALLY_ALTERED[1]
        assert entry.GetTypeObject().GetCodeValue() == type_code[1]
        coded = entry.GetTypeModifierObject() if modifier else entry.GetTypeObject()
        assert coded.GetCodeMeaning() == (modifier or type_code)[2]
        # the colour Slicer takes from the terminology is the segment's colour
        assert np.allclose(np.asarray(coded.GetRecommendedDisplayRGBValue()) / 255.0, spec.color, atol=0.5 / 255)
        assert entry.GetRegionObject().GetCodeValue() == segmentation.BRAIN[1]


def test_reference_geometry_and_subject_hierarchy_placement(app, logic, tmp_path):
    labels = oblique_left_handed_label_map()
    reference = reference_volume_on(app, labels, tmp_path, "C-t1c")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Doe^Jane")
    study = sh.CreateStudyItem(patient, "MR brain")
    sh.CreateItem(study, reference)
    write_cli_outputs(tmp_path / "out", "C", labels, uncertainty=True)
    node, table, (heat, _opacity) = logic.importResults(str(tmp_path / "out"), "C", reference,
                                                        saveUncertainty=True)
    for placed in (node, table, heat):
        assert sh.GetItemParent(sh.GetItemByDataNode(placed)) == study, placed.GetName()
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert node.GetSegmentation().GetConversionParameter(parameter) == \
        slicer.vtkSegmentationConverter.SerializeImageGeometry(_oriented_geometry(reference))
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()).GetID() == reference.GetID()
    assert node.GetNodeReferenceID("BraTSEnsemble.Uncertainty") == heat.GetID()
    # the case id falls back to the patient's name when the volume names carry none
    volumes = {"t1c": reference}
    reference.SetName("AX T1 POST GAD")
    assert logic.caseIdFor(volumes) == "Doe_Jane"
    reference.SetName("BraTS-GLI-00001-000-t1c")
    assert logic.caseIdFor(volumes) == "BraTS-GLI-00001-000"


def _oriented_geometry(volume):
    """The volume's geometry as a vtkOrientedImageData (what Slicer serialises as reference geometry)."""
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(volume.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def test_table_columns_units_and_replacement(app, logic, tmp_path):
    labels = oblique_left_handed_label_map()
    reference = reference_volume_on(app, labels, tmp_path, "C-t1c")
    write_cli_outputs(tmp_path / "out", "C", labels)
    _seg, table, _ = logic.importResults(str(tmp_path / "out"), "C", reference)
    expected = segmentation.statistics_rows(json.loads((tmp_path / "out" / "C.json").read_text()))
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(
        segmentation.STATISTICS_COLUMNS)
    columns = {table.GetColumnName(i): table.GetTable().GetColumn(i) for i in range(table.GetNumberOfColumns())}
    assert columns["Voxels"].IsA("vtkIntArray") and columns["Lesions"].IsA("vtkIntArray")
    assert columns["Volume [mL]"].IsA("vtkDoubleArray") and columns["Region"].IsA("vtkStringArray")
    assert table.GetColumnUnitLabel("Volume [mL]") == "mL"
    assert table.GetColumnDescription("Lesions").startswith("Connected components")
    rows = [{name: (column.GetValue(r)) for name, column in columns.items()} for r in range(table.GetNumberOfRows())]
    assert rows == expected
    # the voxel counts are those of the segments in the scene
    seg = _seg
    for row in rows:
        if row["Region"] in ("ET", "NETC", "SNFH"):
            assert len(segment_points_ras(seg, row["Region"])) == row["Voxels"]


def test_show_results_shows_the_table_in_a_table_view_and_the_heat_map_over_t1c(app, logic, tmp_path):
    labels = oblique_left_handed_label_map()
    reference = reference_volume_on(app, labels, tmp_path, "C-t1c")
    write_cli_outputs(tmp_path / "out", "C", labels, uncertainty=True)
    seg, table, (heat, opacity) = logic.importResults(str(tmp_path / "out"), "C", reference, saveUncertainty=True)
    assert app.layoutNode.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView
    assert not nodes_of_class(app.scene, "vtkMRMLTableViewNode"), "Slicer's default layout has no table view"
    logic.showResults(seg, table, reference, heat, opacity)
    assert "vtkMRMLTableViewNode" in app.layoutNode.GetCurrentLayoutDescription()
    views = nodes_of_class(app.scene, "vtkMRMLTableViewNode")
    assert views and all(v.GetTableNodeID() == table.GetID() for v in views)
    assert app.layoutNode.GetViewArrangement() == app.moduleLogics["Tables"].GetLayoutWithTable(
        slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    composites = nodes_of_class(app.scene, "vtkMRMLSliceCompositeNode")
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == reference.GetID()
        assert composite.GetForegroundVolumeID() == heat.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    display = seg.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility2D() and display.GetVisibility3D()
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")


def test_heat_map_name_colour_window_and_no_storage_node_in_the_deleted_temp_folder(app, logic, tmp_path):
    labels = oblique_left_handed_label_map()
    reference = reference_volume_on(app, labels, tmp_path, "C-t1c")
    temp = Path(logic._newTemporaryDirectory())
    write_cli_outputs(temp / "output", "C", labels, uncertainty=True)
    cli = process.CliProcess([sys.executable, "-c", "pass"])
    cli.wait(timeout=60)
    run = SegmentationRun(cli, str(temp), "C", reference, False, saveUncertainty=True)
    seg, table = logic.finishSegmentation(run)
    heat = run.uncertaintyNode
    assert heat.GetName() == "C uncertainty (entropy)"  # not "…_1": the name is made unique once, by Slicer
    display = heat.GetDisplayNode()
    colors = display.GetColorNode()
    assert colors.GetID() == segmentation.HEAT_MAP_COLOR_NODE_ID and colors.GetNumberOfColors() == 256
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert run.uncertaintyOpacity == pytest.approx(0.5)
    assert not temp.exists()
    for node in (seg, heat, table):
        storage = node.GetStorageNode()
        assert storage is None or not str(storage.GetFileName() or "").startswith(str(temp)), node.GetName()
    leftovers = [n.GetFileName() for n in nodes_of_class(app.scene, "vtkMRMLStorageNode")
                 if str(n.GetFileName() or "").startswith(str(temp))]
    assert leftovers == []
    # Saving as Slicer's Save dialog does (a default storage node, a new file) writes the data.
    for node, name in ((heat, "heat.nrrd"), (seg, "seg.seg.nrrd")):
        assert node.AddDefaultStorageNode()
        node.GetStorageNode().SetFileName(str(tmp_path / name))
        assert node.GetStorageNode().WriteData(node), name
    saved = sitk.ReadImage(str(tmp_path / "heat.nrrd"))
    assert float(sitk.GetArrayFromImage(saved).max()) == pytest.approx(0.25)
    # a second heat map for the same case gets Slicer's unique name
    write_cli_outputs(tmp_path / "again", "C", labels, uncertainty=True)
    _s, _t, (heat2, _o) = logic.importResults(str(tmp_path / "again"), "C", reference, saveUncertainty=True)
    assert heat2.GetName() == "C uncertainty (entropy)_1"


# ================================================================================================ inputs


def sitk_resampler(input_volume, reference_volume, output_volume):
    """Linear resampling onto the reference grid with SimpleITK (the test's stand-in for BRAINSResample)."""
    def to_sitk(volume):
        array = slicer.util.arrayFromVolume(volume).astype(np.float32)
        image = sitk.GetImageFromArray(array)
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASDirectionMatrix(matrix)
        direction = LPS_TO_RAS @ np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
        image.SetDirection(direction.flatten().tolist())
        image.SetSpacing(volume.GetSpacing())
        image.SetOrigin((LPS_TO_RAS @ np.asarray(volume.GetOrigin())).tolist())
        return image

    result = sitk.Resample(to_sitk(input_volume), to_sitk(reference_volume), sitk.Transform(), sitk.sitkLinear)
    matrix = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(matrix)
    output_volume.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(output_volume, sitk.GetArrayFromImage(result))


def test_grid_mismatches_and_resample_onto_reference(app, tmp_path):
    labels = oblique_left_handed_label_map()
    t1c = reference_volume_on(app, labels, tmp_path, "C-t1c")
    other = sitk.Resample(sitk.Cast(labels, sitk.sitkFloat32), (20, 20, 8), sitk.Transform(), sitk.sitkLinear,
                          (-40.0, 18.0, 6.0), (1.0, 1.0, 2.0))
    sitk.WriteImage(other, str(tmp_path / "C-t2f.nii.gz"))
    t2f = load_volume(app, tmp_path / "C-t2f.nii.gz")
    t1n = reference_volume_on(app, labels, tmp_path, "C-t1n")
    logic = SegmentationLogic(app.applicationLogic, resampler=sitk_resampler)
    volumes = {"t1c": t1c, "t1n": t1n, "t2f": t2f}
    assert logic.gridMismatches(volumes) == {"t2f": ["size", "spacing", "origin", "direction"]}
    created = logic.resampleOntoReference({"t2f": t2f}, t1c)
    assert created["t2f"].GetName() == "C-t2f (T1c grid)"
    assert logic.gridMismatches({"t1c": t1c, "t2f": created["t2f"]}) == {}

    # a resampler that fails, or one that gives another grid: the scene is left as it was
    def failing(*_):
        raise RuntimeError("BRAINSResample crashed")

    def wrong_grid(input_volume, _reference, output):
        output.SetAndObserveImageData(input_volume.GetImageData())

    for resampler, message in ((failing, "crashed"), (wrong_grid, "did not give the T1c grid")):
        before = app.scene.GetNumberOfNodes()
        with pytest.raises(RuntimeError, match=message):
            SegmentationLogic(app.applicationLogic, resampler=resampler).resampleOntoReference(
                {"t2f": t2f, "t1n": t1n}, t1c)
        assert app.scene.GetNumberOfNodes() == before
    with pytest.raises(RuntimeError, match="BRAINSResample"):
        SegmentationLogic(app.applicationLogic).resampleOntoReference({"t2f": t2f}, t1c)


def test_sample_data_source_loads_as_sample_data_loads_it(app, logic):
    """The demo case's Sample Data entry: arguments Slicer's registerCustomSampleDataSource accepts (its signature
    in Slicer 5.12), files whose SHA-256 match, loaded with the readers of their file types into nodes that the
    module recognises (roles, demo model set)."""
    from BraTSEnsembleLib.downloads import file_sha256
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    source = SegmentationLogic.sampleDataSource()
    signature = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader", "thumbnailFileName",
                 "loadFileTypes", "loadFiles", "loadFileProperties", "checksums", "loadFileType"}
    assert set(source) <= signature
    assert len({len(source[k]) for k in ("uris", "fileNames", "nodeNames", "loadFileType", "checksums")}) == 1
    nodes = []
    for uri, name, node_name, file_type, checksum in zip(source["uris"], source["fileNames"], source["nodeNames"],
                                                        source["loadFileType"], source["checksums"]):
        path = Path(url2pathname(urlparse(uri).path))
        assert path.name == name and checksum == f"SHA256:{file_sha256(path)}"
        if file_type == "VolumeFile":
            nodes.append(load_volume(app, path, node_name))
        else:
            assert file_type == "SegmentationFile"
            ground_truth = app.moduleLogics["Segmentations"].LoadSegmentationFromFile(str(path), True, node_name)
            assert ground_truth.GetSegmentation().GetNumberOfSegments() == 3
    assert [n.GetName() for n in nodes] == source["nodeNames"][:4]
    assigned = logic.autoAssignRoles()
    assert {role: node.GetName() for role, node in assigned["volumes"].items()} == {
        role: f"DemoPhantom-777-{role}" for role in ("t1n", "t1c", "t2w", "t2f")}
    assert assigned["summary"] == ""
    assert logic.defaultModelSet(list(assigned["volumes"].values())) == str(demo_library.MANIFEST)
    assert logic.caseIdFor(assigned["volumes"]) == "DemoPhantom-777"
    assert logic.gridMismatches(assigned["volumes"]) == {}
    nodes[0].SetName("AX T1 PRE")
    assert logic.defaultModelSet(nodes) is None  # never offered for other images


def test_parameter_node_round_trip_through_a_saved_scene(app, logic, tmp_path):
    node = logic.getParameterNode()
    assert logic.getParameterNode() is node
    assert node.GetSingletonTag() == "BraTSEnsemble" and node.GetAttribute("ModuleName") == "BraTSEnsemble"
    volumes = {role: load_volume(app, DEMO_CASE / f"DemoPhantom-777-{role}.nii.gz")
               for role in ("t1n", "t1c", "t2w", "t2f")}
    for role, volume in volumes.items():  # what parameterNodeWrapper stores for a node-typed field
        node.SetNodeReferenceID(role, volume.GetID())
    node.SetParameter("device", "cpu")
    node.SetParameter("modelPaths", json.dumps([str(demo_library.MANIFEST)]))
    scene_file = tmp_path / "scene" / "scene.mrml"
    scene_file.parent.mkdir()
    app.scene.SetURL(str(scene_file))
    assert app.scene.Commit()
    other = CoreApplication(tmp_path / "other")
    try:
        other.scene.SetURL(str(scene_file))
        assert other.scene.Import()
        restored = SegmentationLogic(other.applicationLogic).getParameterNode()
        assert restored.GetParameter("device") == "cpu"
        assert json.loads(restored.GetParameter("modelPaths")) == [str(demo_library.MANIFEST)]
        for role, volume in volumes.items():
            loaded = restored.GetNodeReference(role)
            assert loaded.GetName() == volume.GetName() and loaded.GetImageData() is not None
        assert other.scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    finally:
        other.close()
    app.clear()  # closing the scene keeps no stale parameter node; a new one is made on demand
    assert logic.getParameterNode().GetNodeReference("t1c") is None


# ================================================================================================ end to end


@pytest.mark.slow
def test_segment_end_to_end_through_the_cli_on_the_demo_case(app, logic):
    """``segment()`` as the console API runs it: the demo case's volumes exported through storage nodes, the real
    ``brats-ensemble predict`` with the shipped demo ensemble in a separate process, the result imported."""
    volumes = {role: load_volume(app, DEMO_CASE / f"DemoPhantom-777-{role}.nii.gz")
               for role in ("t1n", "t1c", "t2w", "t2f")}
    seg, table = logic.segment(volumes, str(demo_library.MANIFEST), device="cpu", timeout=900,
                               save_uncertainty=True)
    ids = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert ids == ["ET", "NETC", "SNFH"]  # the panel's default (TC/WT off)
    assert seg.GetName() == "DemoPhantom-777 segmentation"
    rows = {table.GetCellText(r, 0): int(table.GetCellText(r, 3)) for r in range(table.GetNumberOfRows())}
    for region in ("ET", "NETC", "SNFH"):
        assert len(segment_points_ras(seg, region)) == rows[region] > 0
    # the demo ensemble finds the phantom's tumour: whole-tumour Dice against the shipped ground truth
    truth = label_points_ras(sitk.ReadImage(str(DEMO_CASE / "DemoPhantom-777-seg.nii.gz")), (1, 2, 3))
    found = np.concatenate([segment_points_ras(seg, region) for region in ("ET", "NETC", "SNFH")])
    differing = mismatches(truth, found, tolerance_mm=0.01)  # voxels in one of the two only (same 1 mm grid)
    assert 1 - differing / (len(truth) + len(found)) > 0.8
    heat = seg.GetNodeReference("BraTSEnsemble.Uncertainty")
    assert heat is not None and heat.GetName() == "DemoPhantom-777 uncertainty (entropy)"
    assert not [n for n in nodes_of_class(app.scene, "vtkMRMLStorageNode")
                if "BraTSEnsemble-" in str(n.GetFileName() or "")]
    assert list(app.temporary.iterdir()) == []
    logic.showResults(seg, table, volumes["t1c"])
    assert [v.GetTableNodeID() for v in nodes_of_class(app.scene, "vtkMRMLTableViewNode")] == [table.GetID()]
    # The result as Slicer shows it (README picture): segments over T1c in the Red, Yellow and Green slice views,
    # through the centre of the ensemble's NETC, and the 3D view.
    import slicer_views

    netc = segment_points_ras(seg, "NETC")
    views = slicer_views.render_views(app, netc.mean(axis=0), size=(300, 300))
    for name, pixels in views.items():
        assert pixels.std() > 10, f"the {name} view is blank"
    if os.environ.get("BRATS_UPDATE_SCREENSHOT"):
        slicer_views.save_png(slicer_views.views_picture(views), ROOT / "Resources" / "Screenshots" /
                              "slicer_views.png")


def test_the_module_logic_module_finds_the_demo():
    assert module_logic.findDemoData() == (demo_library.CASE_DIR, demo_library.MANIFEST)
