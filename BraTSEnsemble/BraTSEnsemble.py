"""BraTSEnsemble: brain-tumour segmentation (ET, NETC, SNFH) by an ensemble of nnU-Net v2 / MedNeXt / U-Mamba models.

The module is thin: it exports the chosen volumes, runs the library's ``brats-ensemble`` command line in a separate
process (so the application stays responsive and Cancel can stop it), and imports the result. Everything that can
be done without Slicer lives in ``BraTSEnsembleLib`` (``process.py``: command line, progress, inputs checks;
``segmentation.py``: segments, terminology, ``.seg.nrrd``, statistics rows) and is tested outside Slicer.
"""
import json
import logging
import os
import shutil
from typing import Annotated

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

ROLES = ("t1n", "t1c", "t2w", "t2f")
DEVICE_CHOICES = ["auto", "cuda", "cpu"]
POSTPROCESS_CHOICES = ["default", "ratio-adaptive", "min-size", "et-to-netc", "none"]
CHECKPOINT_CHOICES = ["final", "best"]
SETTINGS_LAST_MODEL_DIR = "BraTSEnsemble/LastModelDirectory"
# Imports the CLI needs; checked before the first run (module name → pip package name).
REQUIRED_IMPORTS = {"torch": "torch", "nnunetv2": "nnunetv2", "cc3d": "connected-components-3d",
                    "slicerio": "slicerio", "SimpleITK": "SimpleITK", "numpy": "numpy", "monai": "monai"}


def libraryParentDirectory():
    """Folder that holds the ``BraTSEnsembleLib`` package (this module's folder once installed)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "BraTSEnsembleLib")):
        return here
    return os.path.dirname(here)  # running from the source tree: the library is beside the module folder


def _importLibrary():
    """Import the pure-Python library (never imports slicer/qt/vtk itself)."""
    import sys

    parent = libraryParentDirectory()
    if parent not in sys.path:
        sys.path.insert(0, parent)
    from BraTSEnsembleLib import process, roles, segmentation  # noqa: F401

    return process, roles, segmentation


#
# BraTSEnsemble
#


class BraTSEnsemble(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("BraTS Ensemble")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["BraTSEnsemble contributors"]
        self.parent.helpText = _("""
Segments brain tumours on four co-registered MRI sequences (T1, T1 contrast-enhanced, T2, T2-FLAIR) with an
ensemble of nnU-Net v2, MedNeXt and U-Mamba models, and reports volume, voxel count and lesion count for the
enhancing tumour (ET), non-enhancing tumour core (NETC), surrounding FLAIR hyperintensity (SNFH), tumour core (TC)
and whole tumour (WT).
See the <a href="https://github.com/BraTSEnsemble/SlicerBraTSEnsemble#readme">documentation</a>.
For research use only; not for clinical decisions.
""")
        self.parent.acknowledgementText = _("""
Built on nnU-Net v2 (Isensee et al.), MedNeXt (Roy et al.) and U-Mamba (Ma et al.), and the BraTS challenge
label conventions. Installation of dependencies follows the approach of SlicerTotalSegmentator and SlicerNNUnet.
""")
        # The demo case (a synthetic phantom) in Sample Data, once the application has started.
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the shipped demo case (four sequences and its ground truth segmentation; a synthetic phantom) in the
    Sample Data module, category "BraTSEnsemble". The file list, node names and SHA-256 come from the library."""
    import SampleData

    try:
        _importLibrary()
        from BraTSEnsembleLib.demo import sample_data_source

        source = sample_data_source()
    except (ImportError, FileNotFoundError) as exc:  # a package without the demo case: nothing to register
        logging.warning("BraTSEnsemble: demo case not registered as sample data: %s", exc)
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


#
# Parameter node
#


@parameterNodeWrapper
class BraTSEnsembleParameterNode:
    """Module state, saved with the scene.

    t1n, t1c, t2w, t2f - input volumes by role.
    modelPaths - ensemble members: model-set manifests (.json) or nnU-Net results folders.
    device, postprocess, mirroring, tileStep, folds, checkpoint - inference options.
    showDerivedRegions - also create TC and WT segments.
    showUncertainty - also compute the uncertainty map and show it as a heat map over the input.
    outputSegmentation, outputTable - chosen outputs (None: create new nodes).
    """

    t1n: vtkMRMLScalarVolumeNode
    t1c: vtkMRMLScalarVolumeNode
    t2w: vtkMRMLScalarVolumeNode
    t2f: vtkMRMLScalarVolumeNode
    modelPaths: list[str]
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    postprocess: Annotated[str, Choice(POSTPROCESS_CHOICES)] = "default"
    mirroring: bool = True
    tileStep: Annotated[float, WithinRange(0.1, 1.0)] = 0.5
    folds: str = ""
    checkpoint: Annotated[str, Choice(CHECKPOINT_CHOICES)] = "final"
    showDerivedRegions: bool = False
    showUncertainty: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode

    def volumesByRole(self):
        return {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}

    def options(self):
        """Options for :meth:`BraTSEnsembleLogic.segment`/``startSegmentation``."""
        return {
            "device": self.device,
            "postprocess": None if self.postprocess == "default" else self.postprocess,
            "mirroring": self.mirroring,
            "tile_step": self.tileStep,
            "folds": self.folds.strip() or None,
            "checkpoint": self.checkpoint,
            "include_derived": self.showDerivedRegions,
            "save_uncertainty": self.showUncertainty,
        }


#
# BraTSEnsembleWidget
#


class BraTSEnsembleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BraTSEnsemble.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = BraTSEnsembleLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.autoAssignButton.connect("clicked(bool)", self.onAutoAssign)
        self.ui.resampleButton.connect("clicked(bool)", self.onResample)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.addModelFileButton.connect("clicked(bool)", self.onAddModelFile)
        self.ui.addRecipeButton.connect("clicked(bool)", self.onAddFromRecipe)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModels)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.progressBar.setVisible(False)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._run is not None:
            self.logic.cancelSegmentation(self._run)
            self._run = None
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        pn = self._parameterNode
        if not any(getattr(pn, role) for role in ROLES):
            self.autoAssign(reportProblems=False)
        if not pn.modelPaths:
            default = self.logic.defaultModelSet([getattr(pn, role) for role in ROLES])
            if default:
                pn.modelPaths = [default]

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    # --- state shown in the GUI

    def _updateGui(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        running = self._run is not None
        self.ui.modelsListWidget.clear()
        if pn:
            for path in pn.modelPaths:
                self.ui.modelsListWidget.addItem(path)
        problems, canResample = self._inputProblems()
        self.ui.inputWarningLabel.text = "\n".join(problems)
        self.ui.resampleButton.enabled = canResample and not running
        ready, reason = self._canApply(problems)
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = reason if not ready else _("Run the ensemble on the four volumes.")
        self.ui.cancelButton.enabled = running
        for name in ("inputsCollapsibleButton", "modelsCollapsibleButton", "optionsCollapsibleButton",
                     "outputsCollapsibleButton"):
            getattr(self.ui, name).enabled = not running

    def _inputProblems(self):
        """(messages, resampling would help) for the current inputs."""
        pn = self._parameterNode
        if not pn:
            return [], False
        process, _roles, _seg = _importLibrary()
        volumes = pn.volumesByRole()
        messages = []
        duplicates = process.duplicate_roles({r: v.GetID() for r, v in volumes.items()})
        for group in duplicates:
            messages.append(_("The same volume is selected for {roles}; each sequence needs its own volume.").format(
                roles=", ".join(group)))
        # Volumes are exported in world coordinates; one under a different transform than T1c would not be on the
        # T1c grid any more, so ask for the transform to be hardened (never done silently).
        transforms = {r: v.GetParentTransformNode() for r, v in volumes.items()}
        transformName = lambda t: t.GetName() if t is not None else _("none")  # noqa: E731
        if "t1c" in transforms:
            t1cTransformId = transforms["t1c"].GetID() if transforms["t1c"] is not None else None
            for role, transform in transforms.items():
                if (transform.GetID() if transform is not None else None) != t1cTransformId:
                    messages.append(_("{role} is under transform '{name}' but t1c under '{t1c}'; harden the "
                                      "transforms (Data module) before segmenting.").format(
                        role=role, name=transformName(transform), t1c=transformName(transforms["t1c"])))
        mismatches = self.logic.gridMismatches(volumes)
        for role, what in mismatches.items():
            messages.append(_("{role} differs from t1c in {what}: the sequences must share one grid. Use "
                              "'Resample onto T1c grid'.").format(role=role, what=", ".join(what)))
        return messages, bool(mismatches) and not duplicates

    def _canApply(self, problems):
        pn = self._parameterNode
        if not pn:
            return False, ""
        missing = [r for r in ROLES if getattr(pn, r) is None]
        if missing:
            return False, _("Select a volume for: {roles}").format(roles=", ".join(missing))
        if not pn.modelPaths:
            return False, _("Add a model set (manifest or nnU-Net results folder).")
        if problems:
            return False, problems[0]
        return True, ""

    # --- inputs

    def onAutoAssign(self) -> None:
        self.autoAssign(reportProblems=True)

    def autoAssign(self, reportProblems=True) -> None:
        pn = self._parameterNode
        if not pn:
            return
        result = self.logic.autoAssignRoles()
        with slicer.util.NodeModify(pn.parameterNode):
            for role, node in result["volumes"].items():
                setattr(pn, role, node)
        if reportProblems and result["summary"]:
            current = self.ui.inputWarningLabel.text
            summary = _("Auto-assign: {summary}").format(summary=result["summary"])
            self.ui.inputWarningLabel.text = f"{current}\n{summary}" if current else summary

    def onResample(self) -> None:
        pn = self._parameterNode
        volumes = pn.volumesByRole()
        mismatches = self.logic.gridMismatches(volumes)
        if not mismatches or "t1c" not in volumes:
            return
        names = ", ".join(f"{volumes[r].GetName()} ({r})" for r in mismatches)
        if not slicer.util.confirmOkCancelDisplay(
            _("Resample {names} onto the grid of the T1c volume '{t1c}' (linear interpolation)?\n\nNew volumes are "
              "created and selected; the original volumes are kept unchanged.").format(
                names=names, t1c=volumes["t1c"].GetName()),
            windowTitle=_("Resample onto T1c grid"),
        ):
            return
        with slicer.util.tryWithErrorDisplay(_("Resampling failed."), waitCursor=True):
            resampled = self.logic.resampleOntoReference(
                {r: volumes[r] for r in mismatches}, volumes["t1c"])
            with slicer.util.NodeModify(pn.parameterNode):
                for role, node in resampled.items():
                    setattr(pn, role, node)

    # --- models

    def _addModelPath(self, path) -> None:
        if not path:
            return
        qt.QSettings().setValue(SETTINGS_LAST_MODEL_DIR, os.path.dirname(path.rstrip("/\\")))
        paths = list(self._parameterNode.modelPaths)
        if path not in paths:
            paths.append(path)
            self._parameterNode.modelPaths = paths

    def onAddModelFolder(self) -> None:
        start = qt.QSettings().value(SETTINGS_LAST_MODEL_DIR, "")
        path = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Choose an nnU-Net results folder (Trainer__Plans__Configuration)"), start)
        self._addModelPath(path)

    def onAddModelFile(self) -> None:
        start = qt.QSettings().value(SETTINGS_LAST_MODEL_DIR, "")
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Choose a model-set manifest"), start, _("Model set (*.json)"))
        self._addModelPath(path)

    def onAddFromRecipe(self) -> None:
        """A published pipeline as a model set: pick the recipe, a folder per role, where to save the manifest."""
        from BraTSEnsembleLib import recipes

        window = slicer.util.mainWindow()
        names = recipes.recipe_names()
        titles = [f"{name}: {recipes.load_recipe(name).get('title', '')}" for name in names]
        choice = qt.QInputDialog.getItem(window, _("Model set from a recipe"), _("Recipe:"), titles, 0, False)
        if not choice:
            return
        name = names[titles.index(choice)]
        start = qt.QSettings().value(SETTINGS_LAST_MODEL_DIR, "")
        models = []
        for member in recipes.load_recipe(name)["members"]:
            folder = qt.QFileDialog.getExistingDirectory(
                window, _("{recipe}: model folder for '{role}' ({description})").format(
                    recipe=name, role=member["role"], description=member.get("description", "")), start)
            if not folder:
                return
            models.append((member["role"], folder))
            start = os.path.dirname(folder.rstrip("/\\"))
        target = qt.QFileDialog.getSaveFileName(window, _("Save the model set"),
                                                os.path.join(start, f"{name}-set.json"), _("Model set (*.json)"))
        if not target:
            return
        with slicer.util.tryWithErrorDisplay(_("The model set could not be written.")):
            # the save dialog has already asked before replacing an existing file
            path = recipes.write_recipe_manifest(name, models, target, overwrite=True)
            self._addModelPath(str(path))

    def onRemoveModels(self) -> None:
        selected = {item.text() for item in self.ui.modelsListWidget.selectedItems()}
        if selected:
            self._parameterNode.modelPaths = [p for p in self._parameterNode.modelPaths if p not in selected]

    # --- dependencies

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed.")):
            if self.logic.ensureDependencies(askConfirmation=True):
                slicer.util.infoDisplay(_("All dependencies are installed."), windowTitle=_("BraTS Ensemble"))

    # --- run

    def onApply(self) -> None:
        pn = self._parameterNode
        self.ui.statusLabel.text = ""
        try:
            with slicer.util.tryWithErrorDisplay(_("The dependencies could not be installed.")):
                if not self.logic.ensureDependencies(askConfirmation=True):
                    self.ui.statusLabel.text = _("Dependencies are not installed; nothing was run.")
                    return
            trust = self._confirmTorchScript(list(pn.modelPaths))
            if trust is None:
                self.ui.statusLabel.text = _("The TorchScript files were not trusted; nothing was run.")
                return
            with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
                self._run = self.logic.startSegmentation(pn.volumesByRole(), list(pn.modelPaths), trust=trust,
                                                         **pn.options())
            self.ui.progressBar.value = 0
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()
        except Exception:
            logging.exception("BraTSEnsemble: could not start")
        finally:
            self._updateGui()

    def _confirmTorchScript(self, modelPaths):
        """The TorchScript files of the model list's manifests, once the user trusts them (a TorchScript file is a
        program: it runs only with --trust-checkpoint FILE); [] when there are none, None when the user declines."""
        from BraTSEnsembleLib.trust import torchscript_files

        files = [str(f) for m in modelPaths if str(m).lower().endswith(".json") for f in torchscript_files(m)]
        if files and not slicer.util.confirmYesNoDisplay(
                _("The model set runs these TorchScript files, which are programs:\n\n{files}\n\nRun them only if you "
                  "trust their source. Run them?").format(files="\n".join(files)), windowTitle=_("BraTS Ensemble")):
            return None
        return files

    def onCancel(self) -> None:
        if self._run is None:
            return
        self._timer.stop()
        self.logic.cancelSegmentation(self._run)
        self._run = None
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = _("Cancelled. The scene was not changed.")
        self._updateGui()

    def _onTimer(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        run.process.poll()
        state = run.process.state
        self.ui.progressBar.value = state.percent
        if state.status:
            self.ui.statusLabel.text = state.status
        if run.process.running:
            return
        self._timer.stop()
        self._run = None
        pn = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
                segmentationNode, tableNode = self.logic.finishSegmentation(
                    run, outputSegmentation=pn.outputSegmentation, outputTable=pn.outputTable)
                self.ui.statusLabel.text = _("Done in {seconds:.0f} s: {name}").format(
                    seconds=run.elapsedSeconds(), name=segmentationNode.GetName())
                self.logic.showResults(segmentationNode, tableNode, pn.t1c, run.uncertaintyNode,
                                       run.uncertaintyOpacity)
        except Exception as exc:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=str(exc).splitlines()[0] if str(exc) else "")
            logging.exception("BraTSEnsemble: segmentation failed")
        finally:
            self.ui.progressBar.setVisible(False)
            self._updateGui()


#
# BraTSEnsembleLogic
#


class SegmentationRun:
    """A started run: its process, temporary folder and what is needed to import the result."""

    def __init__(self, process, tempDir, caseId, reference, includeDerived, saveUncertainty=False):
        import time

        self.process = process
        self.tempDir = tempDir
        self.caseId = caseId
        self.reference = reference
        self.includeDerived = includeDerived
        self.saveUncertainty = saveUncertainty
        self.uncertaintyNode = None  # the heat-map volume, once finishSegmentation has loaded it
        self.uncertaintyOpacity = None
        self._started = time.monotonic()

    def elapsedSeconds(self):
        import time

        return time.monotonic() - self._started

    @property
    def outputDir(self):
        return os.path.join(self.tempDir, "output")


class BraTSEnsembleLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from the Python console without the widget:

    >>> logic = slicer.util.getModuleLogic("BraTSEnsemble")  # or BraTSEnsembleLogic()
    >>> seg, table = logic.segment({"t1n": n1, "t1c": n2, "t2w": n3, "t2f": n4}, "/models/goat2025.json")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return BraTSEnsembleParameterNode(super().getParameterNode())

    # --- inputs

    @staticmethod
    def volumeGrid(volumeNode):
        """Grid of a volume node (size, spacing, origin, IJK→RAS directions) for comparisons."""
        process, _roles, _seg = _importLibrary()
        imageData = volumeNode.GetImageData()
        size = tuple(imageData.GetDimensions()) if imageData else (0, 0, 0)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(matrix)
        direction = tuple(matrix.GetElement(r, c) for r in range(3) for c in range(3))
        return process.Grid(size, tuple(volumeNode.GetSpacing()), tuple(volumeNode.GetOrigin()), direction)

    def gridMismatches(self, volumesByRole):
        """``{role: [what differs]}`` for volumes whose grid differs from the T1c volume's."""
        process, _roles, _seg = _importLibrary()
        if "t1c" not in volumesByRole:
            return {}
        grids = {role: self.volumeGrid(node) for role, node in volumesByRole.items()}
        return process.grid_mismatches(grids, "t1c")

    def autoAssignRoles(self):
        """Volumes of the scene assigned to roles from their names: {'volumes': {role: node}, 'summary': str}."""
        process, _roles, _seg = _importLibrary()
        nodes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                 if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetHideFromEditors()]
        result = process.auto_assign_volumes({n.GetID(): n.GetName() for n in nodes})
        return {"volumes": {role: slicer.mrmlScene.GetNodeByID(nodeId) for role, nodeId in result.assigned.items()},
                "summary": result.summary()}

    def resampleOntoReference(self, volumesByRole, referenceVolume):
        """Resample volumes onto the reference grid with BRAINSResample (linear); returns {role: new volume}."""
        created = {}
        try:
            for role, volume in volumesByRole.items():
                output = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(f"{volume.GetName()} (T1c grid)"))
                created[role] = output
                parameters = {"inputVolume": volume.GetID(), "referenceVolume": referenceVolume.GetID(),
                              "outputVolume": output.GetID(), "pixelType": "float", "interpolationMode": "Linear"}
                cliNode = slicer.cli.runSync(slicer.modules.brainsresample, None, parameters)
                failed = cliNode.GetStatus() & cliNode.ErrorsMask
                errorText = cliNode.GetErrorText()
                slicer.mrmlScene.RemoveNode(cliNode)
                if failed:
                    raise RuntimeError(f"Resampling {volume.GetName()} failed: {errorText}")
        except Exception:
            # Leave the scene as it was: remove every volume this call created.
            for node in created.values():
                slicer.mrmlScene.RemoveNode(node)
            raise
        return created

    def caseIdFor(self, volumesByRole):
        """Case id from the volume names ('BraTS-GLI-00001-000-t1c' → 'BraTS-GLI-00001-000'), else the patient's
        name in the subject hierarchy, else 'BraTSCase'."""
        process, _roles, _seg = _importLibrary()
        fallback = "BraTSCase"
        reference = volumesByRole.get("t1c")
        if reference is not None:
            shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
            item = shNode.GetItemByDataNode(reference)
            patient = shNode.GetItemAncestorAtLevel(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelPatient())
            if patient:
                fallback = shNode.GetItemName(patient) or fallback
        return process.case_id_from_names({r: n.GetName() for r, n in volumesByRole.items()}, fallback=fallback)

    # --- models

    def defaultModelSet(self, volumeNodes):
        """The shipped demo model set (its manifest) when the input volumes are the shipped demo case loaded from
        Sample Data, else None: the demo models are trained on synthetic phantoms and are never offered for other
        images."""
        if not all(volumeNodes):
            return None
        _importLibrary()
        from BraTSEnsembleLib.demo import model_set_offered_for

        manifest = model_set_offered_for([node.GetName() for node in volumeNodes])
        return str(manifest) if manifest else None

    # --- dependencies

    @staticmethod
    def missingImports():
        """Packages the CLI needs that Slicer's Python cannot import (pip names)."""
        import importlib.util

        return [pipName for module, pipName in REQUIRED_IMPORTS.items() if importlib.util.find_spec(module) is None]

    def requirements(self):
        """The library's pinned requirements: ``[project] dependencies`` of its pyproject.toml (installed beside
        the library by the extension's CMakeLists; at the top of the source tree)."""
        process, _roles, _seg = _importLibrary()
        for candidate in (os.path.join(libraryParentDirectory(), "BraTSEnsembleLib", "pyproject.toml"),
                          os.path.join(libraryParentDirectory(), "pyproject.toml")):
            if os.path.isfile(candidate):
                with open(candidate, encoding="utf-8") as handle:
                    return process.project_dependencies(handle.read())
        raise RuntimeError("pyproject.toml of BraTSEnsembleLib is missing; reinstall the extension.")

    def ensureDependencies(self, askConfirmation=True):
        """Install PyTorch (through the PyTorch extension) and the library's requirements when missing.

        Returns True when everything imports, False when the user declined. Never replaces Slicer's numpy or
        SimpleITK (pinned by a constraints file); on failure, packages installed by this attempt are removed again
        so that no half-installed state is left, and the error says what to do.
        """
        missing = self.missingImports()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("BraTS Ensemble needs Python packages that are not installed yet: {packages}.\n\nThey will be "
              "downloaded and installed into Slicer's Python now (PyTorch alone may be several GB; this can take "
              "minutes). Continue?").format(packages=", ".join(missing)),
            windowTitle=_("Install dependencies"),
        ):
            return False
        process, _roles, _seg = _importLibrary()
        import importlib.metadata

        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(_("The PyTorch extension is required. Install 'PyTorch' from the Extensions "
                                     "Manager, restart Slicer, then press Apply again."))
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if torchLogic.installTorch(askConfirmation=False) is None:
                    raise RuntimeError(_("PyTorch could not be installed. Use the PyTorch Utils module to install it "
                                         "manually (choose the CUDA version that matches your driver), then retry."))
        before = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
        installed = {}
        for name in ("numpy", "SimpleITK", "torch"):
            try:
                installed[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        constraintsPath = os.path.join(slicer.util.tempDirectory("BraTSEnsemble-install"), "constraints.txt")
        with open(constraintsPath, "w", encoding="utf-8") as handle:
            handle.write(process.constraints_for_installed(installed))
        requirements = process.requirements_to_install("\n".join(self.requirements()))
        try:
            slicer.util.pip_install(["-c", constraintsPath] + requirements)
            importlib.invalidate_caches()
            stillMissing = self.missingImports()
            if stillMissing:
                raise RuntimeError(f"still not importable after installation: {', '.join(stillMissing)}")
        except Exception as exc:
            after = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
            added = sorted(after - before)
            if added:
                try:
                    slicer.util.pip_uninstall(["-y"] + added)
                except Exception:
                    logging.exception("Could not remove partially installed packages %s", added)
            raise RuntimeError(
                _("Installing {requirements} failed: {error}\nPackages installed by this attempt were removed. "
                  "Check the internet connection (proxy/SSL) and the Python console log, then retry.").format(
                    requirements=" ".join(requirements), error=exc)) from exc
        finally:
            shutil.rmtree(os.path.dirname(constraintsPath), ignore_errors=True)
        return True

    # --- running

    def startSegmentation(self, volumesByRole, modelSet, device="auto", postprocess=None, folds=None,
                          checkpoint=None, mirroring=True, tile_step=None, include_derived=False, weights=None,
                          save_uncertainty=False, trust=()):
        """Export the volumes to a temporary case folder and start ``brats-ensemble predict`` (non-blocking).
        ``trust``: files the user trusts (passed as ``--trust-checkpoint``).

        Returns a :class:`SegmentationRun`; poll ``run.process`` and call :meth:`finishSegmentation`.
        """
        process, _roles, _seg = _importLibrary()
        missing = [r for r in ROLES if volumesByRole.get(r) is None]
        if missing:
            raise ValueError(f"volumes missing for: {', '.join(missing)}")
        duplicates = process.duplicate_roles({r: n.GetID() for r, n in volumesByRole.items()})
        if duplicates:
            raise ValueError(f"the same volume is given for {', '.join('/'.join(g) for g in duplicates)}")
        models = [modelSet] if isinstance(modelSet, (str, os.PathLike)) else list(modelSet)
        caseId = self.caseIdFor(volumesByRole)
        tempDir = slicer.util.tempDirectory("BraTSEnsemble")
        try:
            caseDir = os.path.join(tempDir, "case")
            outDir = os.path.join(tempDir, "output")
            os.makedirs(caseDir, exist_ok=True)
            os.makedirs(outDir, exist_ok=True)
            for role in ROLES:
                path = os.path.join(caseDir, process.input_file_name(caseId, role))
                # A fresh properties dict each call: exportNode stores the file format in it.
                if not slicer.util.exportNode(volumesByRole[role], path, {}, world=True):
                    raise RuntimeError(f"could not export {volumesByRole[role].GetName()} to {path}")
            args = process.build_predict_command(
                caseDir, outDir, models, python=process.python_executable(), weights=weights, device=device,
                postprocess=postprocess, folds=folds, checkpoint=checkpoint, mirroring=mirroring,
                tile_step=tile_step, overwrite=True, progress=True, save_uncertainty=save_uncertainty, trust=trust)
            env = process.cli_environment(slicer.util.startupEnvironment(), libraryParentDirectory())
            logging.info("BraTSEnsemble: running %s", " ".join(args))
            cliProcess = process.CliProcess(args, env=env, cwd=libraryParentDirectory())
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return SegmentationRun(cliProcess, tempDir, caseId, volumesByRole["t1c"], include_derived, save_uncertainty)

    def cancelSegmentation(self, run):
        """Kill the process tree and delete the temporary files; the scene is not touched."""
        try:
            run.process.cancel()
        finally:
            shutil.rmtree(run.tempDir, ignore_errors=True)

    def finishSegmentation(self, run, outputSegmentation=None, outputTable=None):
        """Import a finished run into the scene: (segmentation node, table node). Temporary files are removed.

        An existing segmentation/table is only replaced when it is given as output; otherwise new nodes are made.
        """
        process, _roles, segmentation = _importLibrary()
        try:
            run.process.poll()
            if not run.process.succeeded:
                raise RuntimeError(run.process.failure_message())
            outputs = process.finalize_case_outputs(run.outputDir, run.caseId, include_derived=run.includeDerived,
                                                    uncertainty=run.saveUncertainty)
            with open(outputs["json"], encoding="utf-8") as handle:
                statistics = json.load(handle)
            segmentationNode = self._importSegmentation(str(outputs["segmentation"]), run.caseId, run.reference,
                                                        outputSegmentation)
            tableNode = self._fillTable(segmentation.statistics_rows(statistics), run.caseId, run.reference,
                                        outputTable)
            segmentationNode.SetAttribute("BraTSEnsemble.Provenance", json.dumps(
                {k: statistics.get(k) for k in ("models", "postprocess", "device")}))
            if run.saveUncertainty:
                display = segmentation.uncertainty_heat_map(run.caseId)
                run.uncertaintyNode = self._importUncertainty(str(outputs["uncertainty"]), display, run.reference)
                run.uncertaintyOpacity = display.foreground_opacity
                segmentationNode.SetNodeReferenceID("BraTSEnsemble.Uncertainty", run.uncertaintyNode.GetID())
            return segmentationNode, tableNode
        finally:
            shutil.rmtree(run.tempDir, ignore_errors=True)

    def _importUncertainty(self, path, display, reference):
        """Load an uncertainty map as a scalar volume shown as a heat map: the display's colour table and a fixed
        window (0..1), placed beside the reference volume."""
        node = slicer.util.loadVolume(path, {"name": slicer.mrmlScene.GenerateUniqueName(display.name),
                                             "show": False})
        if node is None:
            raise RuntimeError(f"Slicer could not load the uncertainty map {path}")
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        displayNode = node.GetDisplayNode()
        displayNode.SetAndObserveColorNodeID(display.color_node_id)
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(display.window_min, display.window_max)
        self._placeBeside(node, reference)
        return node

    def _placeBeside(self, node, reference):
        """Put a node in the subject hierarchy beside the reference volume (same patient/study)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(reference))
        if parent:
            shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)

    def _importSegmentation(self, segPath, caseId, reference, outputNode):
        loaded = slicer.util.loadSegmentation(segPath)
        if loaded is None:
            raise RuntimeError(f"Slicer could not load the result {segPath}")
        if outputNode is not None:
            outputNode.GetSegmentation().DeepCopy(loaded.GetSegmentation())
            slicer.mrmlScene.RemoveNode(loaded)
            node = outputNode
        else:
            node = loaded
            node.SetName(slicer.mrmlScene.GenerateUniqueName(f"{caseId} segmentation"))
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        node.CreateClosedSurfaceRepresentation()
        self._placeBeside(node, reference)
        return node

    def _fillTable(self, rows, caseId, reference, outputNode):
        process, _roles, segmentation = _importLibrary()
        node = outputNode or slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(f"{caseId} tumor statistics"))
        columns = segmentation.table_columns(rows)
        wasModifying = node.StartModify()
        node.RemoveAllColumns()
        for name, values in columns.items():
            if name in ("Voxels", "Lesions"):
                array = vtk.vtkIntArray()
            elif name == "Volume [mL]":
                array = vtk.vtkDoubleArray()
            else:
                array = vtk.vtkStringArray()
            array.SetName(name)
            array.SetNumberOfValues(len(values))
            for index, value in enumerate(values):
                array.SetValue(index, value)
            node.AddColumn(array)
        node.SetColumnUnitLabel("Volume [mL]", "mL")
        node.SetColumnDescription("Lesions", "Connected components (lesions) of the region")
        node.EndModify(wasModifying)
        self._placeBeside(node, reference)
        return node

    def showResults(self, segmentationNode, tableNode, reference, uncertaintyNode=None, uncertaintyOpacity=0.5):
        """Show the segmentation over the T1c volume in 2D and 3D and the table in the layout; the uncertainty heat
        map, when there is one, as the foreground layer over the T1c volume."""
        if uncertaintyNode is not None:
            slicer.util.setSliceViewerLayers(background=reference, foreground=uncertaintyNode,
                                             foregroundOpacity=uncertaintyOpacity, fit=False)
        else:
            slicer.util.setSliceViewerLayers(background=reference, fit=False)
        displayNode = segmentationNode.GetDisplayNode()
        displayNode.SetVisibility(True)
        displayNode.SetVisibility3D(True)
        if tableNode is not None:
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()

    def segment(self, volumes_by_role, model_set, device="auto", timeout=None, **options):
        """Segment synchronously (Python console): returns (segmentationNode, tableNode).

        ``volumes_by_role``: {'t1n': node, 't1c': node, 't2w': node, 't2f': node}. ``model_set``: manifest path,
        results folder, or a list of them. Options: postprocess, folds, checkpoint, mirroring, tile_step,
        include_derived, weights, save_uncertainty, outputSegmentation, outputTable. With save_uncertainty=True the
        uncertainty heat-map volume is referenced from the segmentation node (node reference role
        'BraTSEnsemble.Uncertainty').
        """
        outputSegmentation = options.pop("outputSegmentation", None)
        outputTable = options.pop("outputTable", None)
        run = self.startSegmentation(volumes_by_role, model_set, device=device, **options)
        try:
            run.process.wait(timeout=timeout, callback=lambda event: logging.info(
                "BraTSEnsemble %3.0f%% %s", 100 * (event.fraction or 0), event.message))
        except BaseException:
            self.cancelSegmentation(run)
            raise
        return self.finishSegmentation(run, outputSegmentation=outputSegmentation, outputTable=outputTable)

    def segmentFolder(self, input_folder, output_folder, model_set, device="auto", include_derived=False,
                      timeout_per_case=None, **options):
        """Batch: every case folder under ``input_folder`` → ``output_folder/<id>.seg.nrrd``, ``<id>.nii.gz``,
        ``<id>.json`` and ``<id>-statistics.csv``. The scene is not touched. Returns {case folder: outputs or error}.
        """
        process, _roles, _seg = _importLibrary()
        from BraTSEnsembleLib.case import discover_case_files

        models = [model_set] if isinstance(model_set, (str, os.PathLike)) else list(model_set)
        os.makedirs(output_folder, exist_ok=True)
        results = {}
        env = process.cli_environment(slicer.util.startupEnvironment(), libraryParentDirectory())
        for caseFolder in process.list_case_folders(input_folder):
            args = process.build_predict_command(caseFolder, output_folder, models,
                                                 python=process.python_executable(), device=device, **options)
            run = process.CliProcess(args, env=env, cwd=libraryParentDirectory())
            try:
                run.wait(timeout=timeout_per_case)
            except BaseException:
                run.cancel()
                raise
            if not run.succeeded:
                results[str(caseFolder)] = {"error": run.failure_message()}
                logging.error("BraTSEnsemble: %s failed: %s", caseFolder, results[str(caseFolder)]["error"])
                continue
            caseId = discover_case_files(caseFolder)[0]
            results[str(caseFolder)] = {kind: str(path) for kind, path in process.finalize_case_outputs(
                output_folder, caseId, include_derived=include_derived).items()}
        return results


def findDemoData():
    """(demo case folder, demo model set) when the demo is installed, else None."""
    process, _roles, _seg = _importLibrary()
    return process.find_demo(os.path.join(libraryParentDirectory(), "BraTSEnsembleLib"))


#
# BraTSEnsembleTest
#


class BraTSEnsembleTest(ScriptedLoadableModuleTest):
    """Self-test: segments the demo case with the demo model set (skipped with a message when not installed)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LibraryImports()
        self.test_AutoAssign()
        self.test_DemoSegmentation()

    def test_LibraryImports(self):
        process, roles, segmentation = _importLibrary()
        self.assertEqual(segmentation.BASE_REGIONS, ("ET", "NETC", "SNFH"))
        self.assertIn("t1c", roles.BRATS_ROLES)

    def test_AutoAssign(self):
        self.delayDisplay("Auto-assigning roles from node names")
        import numpy as np

        names = {"t1n": "BraTS-GLI-00001-000-t1n", "t1c": "BraTS-GLI-00001-000-t1c",
                 "t2w": "BraTS-GLI-00001-000-t2w", "t2f": "BraTS-GLI-00001-000-t2f"}
        nodes = {}
        for role, name in names.items():
            nodes[role] = slicer.util.addVolumeFromArray(np.random.rand(8, 9, 10).astype("float32"), name=name)
        result = BraTSEnsembleLogic().autoAssignRoles()
        for role, node in nodes.items():
            self.assertEqual(result["volumes"][role].GetID(), node.GetID())
        self.assertEqual(BraTSEnsembleLogic().caseIdFor(nodes), "BraTS-GLI-00001-000")
        self.assertEqual(BraTSEnsembleLogic().gridMismatches(nodes), {})
        slicer.mrmlScene.Clear()

    def test_DemoSegmentation(self):
        demo = findDemoData()
        if demo is None:
            self.delayDisplay("Demo case / demo model set not installed: skipping the segmentation test "
                              "(set BRATSENSEMBLE_DEMO_CASE and BRATSENSEMBLE_DEMO_MODELS to run it).")
            return
        caseFolder, modelSet = demo
        logic = BraTSEnsembleLogic()
        if logic.missingImports():
            self.delayDisplay(f"Dependencies missing ({', '.join(logic.missingImports())}): skipping the "
                              "segmentation test. Press Apply once in the module to install them.")
            return
        process, roles, _seg = _importLibrary()
        from BraTSEnsembleLib import demo as demoLibrary
        from BraTSEnsembleLib.case import discover_case_files

        caseId, files = discover_case_files(caseFolder)
        shipped = demoLibrary.demo_case_folder()
        if shipped.is_dir() and os.path.samefile(caseFolder, shipped):
            # the shipped case: load it the way a new user does, through Sample Data
            import SampleData

            registerSampleData()
            nodes = SampleData.SampleDataLogic().downloadSamples(demoLibrary.SAMPLE_NAME)
            self.assertEqual(len(nodes), len(demoLibrary.SAMPLE_ROLES))
            volumes = {role: node for role, node in zip(demoLibrary.SAMPLE_ROLES, nodes) if role in ROLES}
        else:
            volumes = {role: slicer.util.loadVolume(str(files[role])) for role in ROLES}
        self.delayDisplay(f"Segmenting demo case {caseId}")
        segmentationNode, tableNode = logic.segment(volumes, str(modelSet), device="cpu", timeout=600)
        segmentIds = [segmentationNode.GetSegmentation().GetNthSegmentID(i)
                      for i in range(segmentationNode.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(segmentIds, ["ET", "NETC", "SNFH"])
        self.assertEqual(tableNode.GetNumberOfRows(), 5)
        self.assertEqual(tableNode.GetCellText(0, 0), "ET")
        self.delayDisplay("Demo segmentation passed")
