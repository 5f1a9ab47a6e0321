"""The module's panel: role selectors, model set, options, Apply/Cancel with progress, outputs (Qt world).

State lives in the parameter node (``parameters.py``); everything it does to the scene goes through the logic
(``application.BraTSEnsembleLogic``, i.e. ``logic.SegmentationLogic``).
"""
import logging
import os

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from . import ROLES, importLibrary
from .application import BraTSEnsembleLogic

SETTINGS_LAST_MODEL_DIR = "BraTSEnsemble/LastModelDirectory"


class BraTSEnsembleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = None
        self._neededRoles = ROLES  # the roles the chosen model set needs (the four BraTS ones until it is known)
        self._rolesProblem = ""
        self._rolesFor = None  # the model list _neededRoles was read for
        self._otherRoleSelectors = {}  # role → (label, qMRMLNodeComboBox) made for roles outside the BraTS four

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
        self.ui.serverConnectButton.connect("clicked(bool)", self.onServerConnect)
        self.ui.serverModelSetComboBox.connect("currentTextChanged(QString)", self.onServerModelSetChosen)
        self.ui.progressBar.setVisible(False)

        self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload and Test: forget the module's package too, so that its edited files are read again."""
        import sys

        for name in [n for n in sys.modules if n == "BraTSEnsembleModule" or n.startswith("BraTSEnsembleModule.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

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

    def _updateRoleSelectors(self) -> None:
        """Show the role selectors the chosen model set needs (read from its JSON files, nothing loaded): the BraTS
        ones of the .ui, and for other roles (CT …) selectors made here in the inputs form. Unknown (MedNeXt without
        channel_roles, a member still to download) or on a server: the four BraTS roles."""
        pn = self._parameterNode
        models = tuple(pn.modelPaths) if pn and not pn.isRemote() else ()
        if models != self._rolesFor:
            self._rolesFor = models
            self._neededRoles, self._rolesProblem = ROLES, ""
            if models:
                try:
                    self._neededRoles = self.logic.neededRoles(list(models))
                except Exception as exc:  # a broken manifest/folder: said in the panel; the run would refuse it
                    self._rolesProblem = _("Model set: {error}").format(error=exc)
        for role in ROLES:
            for suffix in ("Label", "Selector"):
                getattr(self.ui, role + suffix).setVisible(role in self._neededRoles)
        layout = self.ui.inputsCollapsibleButton.layout()
        for role in self._neededRoles:
            if role in ROLES or role in self._otherRoleSelectors:
                continue
            label = qt.QLabel(_("{role}:").format(role=role.upper() if role == "ct" else role))
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.showChildNodeTypes = False
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.noneEnabled = True
            selector.toolTip = _("The volume for the model set's {role} input.").format(role=role)
            selector.setMRMLScene(slicer.mrmlScene)
            selector.connect("currentNodeChanged(vtkMRMLNode*)",
                             lambda node, role=role: self._parameterNode.setVolume(role, node))
            layout.insertRow(len(ROLES), label, selector)  # after the BraTS rows, before the buttons
            self._otherRoleSelectors[role] = (label, selector)
        for role, (label, selector) in self._otherRoleSelectors.items():
            label.setVisible(role in self._neededRoles)
            selector.setVisible(role in self._neededRoles)
            if pn:
                wasBlocked = selector.blockSignals(True)
                selector.setCurrentNode(pn.volumesByRole().get(role))
                selector.blockSignals(wasBlocked)

    def _updateGui(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        running = self._run is not None
        self.ui.modelsListWidget.clear()
        if pn:
            for path in pn.modelPaths:
                self.ui.modelsListWidget.addItem(path)
        self._updateRoleSelectors()
        problems, canResample = self._inputProblems()
        self.ui.inputWarningLabel.text = "\n".join(problems)
        self.ui.resampleButton.enabled = canResample and not running
        ready, reason = self._canApply(problems)
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = reason if not ready else _("Run the model set on the selected volumes.")
        self.ui.cancelButton.enabled = running
        for name in ("inputsCollapsibleButton", "modelsCollapsibleButton", "runOnCollapsibleButton",
                     "optionsCollapsibleButton", "outputsCollapsibleButton"):
            getattr(self.ui, name).enabled = not running
        # On a server, its model set fixes the members and their options: only TC/WT and the heat map stay.
        remote = bool(pn) and pn.isRemote()
        for name in ("serverUrlLineEdit", "serverTokenLineEdit", "serverModelSetComboBox", "serverConnectButton"):
            getattr(self.ui, name).enabled = remote
        for name in ("modelsListWidget", "addModelFolderButton", "addModelFileButton", "addRecipeButton",
                     "removeModelButton", "deviceComboBox", "postprocessComboBox", "tileStepSpinBox",
                     "mirroringCheckBox", "foldsLineEdit", "checkpointComboBox"):
            getattr(self.ui, name).enabled = not remote
        if pn and self.ui.serverModelSetComboBox.currentText != pn.serverModelSet:
            wasBlocked = self.ui.serverModelSetComboBox.blockSignals(True)
            if self.ui.serverModelSetComboBox.findText(pn.serverModelSet) < 0 and pn.serverModelSet:
                self.ui.serverModelSetComboBox.addItem(pn.serverModelSet)
            self.ui.serverModelSetComboBox.setCurrentText(pn.serverModelSet)
            self.ui.serverModelSetComboBox.blockSignals(wasBlocked)

    def _inputProblems(self):
        """(messages, resampling would help) for the current inputs."""
        pn = self._parameterNode
        if not pn:
            return [], False
        process, _roles, _seg = importLibrary()
        volumes = pn.volumesByRole(self._neededRoles)
        messages = [self._rolesProblem] if self._rolesProblem else []
        duplicates = process.duplicate_roles({r: v.GetID() for r, v in volumes.items()})
        for group in duplicates:
            messages.append(_("The same volume is selected for {roles}; each sequence needs its own volume.").format(
                roles=", ".join(group)))
        # Volumes are exported in world coordinates; one under a different transform than T1c would not be on the
        # T1c grid any more, so ask for the transform to be hardened (never done silently).
        transforms = {r: v.GetParentTransformNode() for r, v in volumes.items()}
        transformName = lambda t: t.GetName() if t is not None else _("none")  # noqa: E731
        reference = process.reference_role(transforms)  # t1c, or the first needed role (ct for a CT model)
        if reference is not None:
            referenceTransformId = transforms[reference].GetID() if transforms[reference] is not None else None
            for role, transform in transforms.items():
                if (transform.GetID() if transform is not None else None) != referenceTransformId:
                    messages.append(_("{role} is under transform '{name}' but {reference} under '{t1c}'; harden the "
                                      "transforms (Data module) before segmenting.").format(
                        role=role, name=transformName(transform), reference=reference,
                        t1c=transformName(transforms[reference])))
        mismatches = self.logic.gridMismatches(volumes)
        for role, what in mismatches.items():
            messages.append(_("{role} differs from {reference} in {what}: the sequences must share one grid. Use "
                              "'Resample onto T1c grid'.").format(role=role, reference=reference,
                                                                  what=", ".join(what)))
        return messages, bool(mismatches) and not duplicates

    def _canApply(self, problems):
        pn = self._parameterNode
        if not pn:
            return False, ""
        selected = pn.volumesByRole()
        missing = [r for r in self._neededRoles if selected.get(r) is None]
        if missing:
            return False, _("Select a volume for: {roles}").format(roles=", ".join(missing))
        if pn.isRemote():
            if not pn.serverUrl.strip():
                return False, _("Enter the server's URL (Run on), or run on this computer.")
        elif not pn.modelPaths:
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
        volumes = pn.volumesByRole(self._neededRoles)
        mismatches = self.logic.gridMismatches(volumes)
        if not mismatches or "t1c" not in volumes:  # resampling onto another reference: not offered (yet)
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

    # --- server

    def onServerConnect(self) -> None:
        """Ask the server what it serves; fill the model-set choice, or say in the panel why it cannot be used."""
        pn = self._parameterNode
        self.ui.serverStatusLabel.text = _("Connecting...")
        slicer.app.processEvents()
        try:
            with slicer.util.WaitCursor():
                info = self.logic.serverInfo(pn.serverUrl, self.ui.serverTokenLineEdit.text or None)
        except Exception as exc:  # RemoteError (unreachable, refused) or a malformed URL
            self.ui.serverStatusLabel.text = _("Cannot use the server: {error}").format(error=exc)
            return
        names = [m["name"] for m in info["model_sets"]]
        wasBlocked = self.ui.serverModelSetComboBox.blockSignals(True)
        self.ui.serverModelSetComboBox.clear()
        self.ui.serverModelSetComboBox.addItems(names)
        self.ui.serverModelSetComboBox.blockSignals(wasBlocked)
        if pn.serverModelSet not in names:
            pn.serverModelSet = names[0] if names else ""
        self._updateGui()
        sets = "; ".join(f"{m['name']} ({len(m['members'])} models, {m['fingerprint'][:19]}…)"
                         for m in info["model_sets"])
        self.ui.serverStatusLabel.text = _("Connected: brats-ensemble {version} on {device}. Model sets: {sets}. "
                                           "The four volumes are sent to this server.").format(
            version=info.get("version", "?"), device=info.get("device", "?"), sets=sets)

    def onServerModelSetChosen(self, name) -> None:
        if self._parameterNode and name and name != self._parameterNode.serverModelSet:
            self._parameterNode.serverModelSet = name

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
            trust = [] if pn.isRemote() else self._confirmTorchScript(list(pn.modelPaths))
            if trust is None:
                self.ui.statusLabel.text = _("The TorchScript files were not trusted; nothing was run.")
                return
            with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
                if pn.isRemote():
                    self._run = self.logic.startSegmentation(
                        pn.volumesByRole(), pn.serverModelSet or None, token=self.ui.serverTokenLineEdit.text or None,
                        **pn.remoteOptions())
                else:
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
                self.logic.showResults(segmentationNode, tableNode, run.reference, run.uncertaintyNode,
                                       run.uncertaintyOpacity)
                if run.warnings:  # e.g. the demo models on real images: said in the panel and in a dialog
                    self.ui.statusLabel.text += "\n" + _("Warning: {warning}").format(warning=" ".join(run.warnings))
                    slicer.util.warningDisplay("\n\n".join(run.warnings), windowTitle=_("BraTSEnsemble"))
        except Exception as exc:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=str(exc).splitlines()[0] if str(exc) else "")
            logging.exception("BraTSEnsemble: segmentation failed")
        finally:
            self.ui.progressBar.setVisible(False)
            self._updateGui()

