"""The module's MRML side: inputs checks, export, the ``brats-ensemble`` run, and the import of its results.

No Qt and no Slicer application here. :class:`SegmentationLogic` takes the application logic — in Slicer
``slicer.app.applicationLogic()``, which holds the scene, the module logics (Volumes, Segmentations, Terminologies,
Tables) and the temporary folder — and calls only MRML classes and ``slicer.util`` functions that exist without the
application (``Testing/test_slicer_mrml.py`` checks every ``slicer.*`` name used here against ``slicer-core``).
What needs the application is given from outside: the launcher environment for the CLI and the BRAINSResample run
(``application.py``).
"""
import csv
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import vtk

import slicer

from . import MODULE_NAME, ROLES, importLibrary, libraryParentDirectory, resourcePath

#: Column types of the statistics table (others are strings).
_INTEGER_COLUMNS = ("Voxels", "Lesions")
_DOUBLE_COLUMNS = ("Volume [mL]",)
#: Integer columns of the per-lesion table (``region`` is a string, the others are doubles).
_LESION_INTEGER_COLUMNS = ("lesion", "voxels")
#: Node reference role from the segmentation node to its per-lesion table.
LESIONS_REFERENCE = "BraTSEnsemble.Lesions"


class SegmentationRun:
    """A started run: its process, temporary folder and what is needed to import the result."""

    def __init__(self, process, tempDir, caseId, reference, includeDerived, saveUncertainty=False):
        self.process = process
        self.tempDir = tempDir
        self.caseId = caseId
        self.reference = reference
        self.includeDerived = includeDerived
        self.saveUncertainty = saveUncertainty
        self.uncertaintyNode = None  # the heat-map volume, once finishSegmentation has loaded it
        self.uncertaintyOpacity = None
        self.warnings = []  # the result JSON's "warnings" (e.g. a demo model set run on real images)
        self._started = time.monotonic()

    def elapsedSeconds(self):
        return time.monotonic() - self._started

    @property
    def outputDir(self):
        return os.path.join(self.tempDir, "output")


class SegmentationLogic:
    """Everything the module does to the scene, usable without the widget and without the Qt application.

    ``applicationLogic``: a ``vtkSlicerApplicationLogic`` with a scene and the Volumes, Segmentations, Terminologies
    and Tables module logics registered (``SetModuleLogic``), as Slicer's application sets it up.
    ``environment``: callable returning the environment for the CLI process (Slicer: ``startupEnvironment``).
    ``resampler``: callable ``(inputVolume, referenceVolume, outputVolume)`` that fills ``outputVolume`` with
    ``inputVolume`` resampled onto the reference grid (Slicer: BRAINSResample).
    """

    def __init__(self, applicationLogic, environment=None, resampler=None):
        if applicationLogic is None or applicationLogic.GetMRMLScene() is None:
            raise ValueError("an application logic with a scene is needed")
        self.applicationLogic = applicationLogic
        self._environment = environment
        self._resampler = resampler

    @property
    def scene(self):
        return self.applicationLogic.GetMRMLScene()

    def moduleLogic(self, name):
        """A module logic registered with the application logic ('Volumes', 'Segmentations', …)."""
        logic = self.applicationLogic.GetModuleLogic(name)
        if logic is None:
            raise RuntimeError(f"the {name} module logic is not available")
        return logic

    # --- parameter node

    def getParameterNode(self):
        """The module's parameter node: the scene's singleton ``vtkMRMLScriptedModuleNode`` tagged with the module
        name, made exactly as Slicer's ``ScriptedLoadableModuleLogic.getParameterNode`` makes it (the typed wrapper
        in ``parameters.py`` wraps this node)."""
        node = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = self.scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # owned by the Python variable
            node.SetSingletonTag(MODULE_NAME)
            node.SetAttribute("ModuleName", MODULE_NAME)
            node.SetName(self.scene.GenerateUniqueName(MODULE_NAME))
            node = self.scene.AddNode(node)
        elif node.GetAttribute("ModuleName") != MODULE_NAME:  # removed when the scene was closed
            node.SetAttribute("ModuleName", MODULE_NAME)
        return node

    # --- inputs

    @staticmethod
    def volumeGrid(volumeNode):
        """Grid of a volume node (size, spacing, origin, IJK→RAS directions) for comparisons."""
        process, _roles, _seg = importLibrary()
        imageData = volumeNode.GetImageData()
        size = tuple(imageData.GetDimensions()) if imageData else (0, 0, 0)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(matrix)
        direction = tuple(matrix.GetElement(r, c) for r in range(3) for c in range(3))
        return process.Grid(size, tuple(volumeNode.GetSpacing()), tuple(volumeNode.GetOrigin()), direction)

    def gridMismatches(self, volumesByRole):
        """``{role: [what differs]}`` for volumes whose grid differs from the reference volume's: T1c's, or, for a
        model set without T1c (a CT model), the first needed role's (``process.reference_role``)."""
        process, _roles, _seg = importLibrary()
        reference = process.reference_role(volumesByRole)
        if reference is None:
            return {}
        grids = {role: self.volumeGrid(node) for role, node in volumesByRole.items()}
        return process.grid_mismatches(grids, reference)

    @staticmethod
    def neededRoles(modelSet):
        """The input roles a local model list needs (``BraTSEnsembleLib.inputroles.needed_roles``: read from its
        JSON files, nothing loaded), or the four BraTS roles when its files cannot tell (a MedNeXt member without
        channel_roles, a member still to be downloaded). Raises ModelError for a broken manifest or folder."""
        importLibrary()
        from BraTSEnsembleLib.inputroles import needed_roles

        return needed_roles(modelSet) or ROLES

    def referenceVolume(self, volumesByRole):
        """The volume whose grid the result is on: T1c, or the first needed role's for a model without T1c."""
        process, _roles, _seg = importLibrary()
        return volumesByRole.get(process.reference_role(volumesByRole))

    def _nodesByClass(self, className):
        collection = self.scene.GetNodesByClass(className)
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return nodes

    def autoAssignRoles(self):
        """Volumes of the scene assigned to roles from their names: {'volumes': {role: node}, 'summary': str}."""
        process, _roles, _seg = importLibrary()
        nodes = [n for n in self._nodesByClass("vtkMRMLScalarVolumeNode")
                 if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetHideFromEditors()]
        result = process.auto_assign_volumes({n.GetID(): n.GetName() for n in nodes})
        return {"volumes": {role: self.scene.GetNodeByID(nodeId) for role, nodeId in result.assigned.items()},
                "summary": result.summary()}

    def resampleOntoReference(self, volumesByRole, referenceVolume):
        """Resample volumes onto the reference grid; returns {role: new volume} named '<name> (T1c grid)'.

        The resampling itself is the ``resampler`` given to the logic (BRAINSResample in Slicer). Each result is
        checked to lie on the reference grid; on any failure every volume this call created is removed again, so
        the scene is left as it was.
        """
        if self._resampler is None:
            raise RuntimeError("no resampler: resampling needs Slicer's BRAINSResample (Resample Image (BRAINS))")
        created = {}
        try:
            for role, volume in volumesByRole.items():
                output = self.scene.AddNewNodeByClass(
                    "vtkMRMLScalarVolumeNode", self.scene.GenerateUniqueName(f"{volume.GetName()} (T1c grid)"))
                created[role] = output
                self._resampler(volume, referenceVolume, output)
                differences = self.gridMismatches({"t1c": referenceVolume, role: output}).get(role)
                if output.GetImageData() is None or differences:
                    raise RuntimeError(f"Resampling {volume.GetName()} did not give the T1c grid "
                                       f"({', '.join(differences or ['no image'])} differ)")
        except Exception:
            for node in created.values():
                self.scene.RemoveNode(node)
            raise
        return created

    def caseIdFor(self, volumesByRole):
        """Case id from the volume names ('BraTS-GLI-00001-000-t1c' → 'BraTS-GLI-00001-000'), else the patient's
        name in the subject hierarchy, else 'BraTSCase'."""
        process, _roles, _seg = importLibrary()
        fallback = "BraTSCase"
        reference = self.referenceVolume(volumesByRole)
        if reference is not None:
            shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
            item = shNode.GetItemByDataNode(reference)
            patientLevel = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelPatient()
            patient = shNode.GetItemAncestorAtLevel(item, patientLevel) if item else 0
            if patient:
                fallback = shNode.GetItemName(patient) or fallback
        return process.case_id_from_names({r: n.GetName() for r, n in volumesByRole.items()}, fallback=fallback)

    # --- models and sample data

    def defaultModelSet(self, volumeNodes):
        """The shipped demo model set (its manifest) when the input volumes are the shipped demo case loaded from
        Sample Data, else None: the demo models are trained on synthetic phantoms and are never offered for other
        images."""
        if not volumeNodes or not all(volumeNodes):
            return None
        importLibrary()
        from BraTSEnsembleLib.demo import model_set_offered_for

        manifest = model_set_offered_for([node.GetName() for node in volumeNodes])
        return str(manifest) if manifest else None

    @staticmethod
    def sampleDataSource():
        """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` (the demo case), or
        None when the demo case is not installed."""
        importLibrary()
        from BraTSEnsembleLib.demo import sample_data_source

        try:
            return sample_data_source()
        except FileNotFoundError as exc:
            logging.warning("BraTSEnsemble: demo case not registered as sample data: %s", exc)
            return None

    # --- terminology

    @staticmethod
    def terminologyFile():
        """The project's terminology context (``.term.json``), shipped in the module's Resources."""
        _process, _roles, segmentation = importLibrary()
        return resourcePath(segmentation.TERMINOLOGY_FILE_NAME)

    def loadTerminology(self):
        """Load the project's terminology into the Terminologies logic (once), so that Slicer resolves the segments'
        entries (codes, names, colours, the private ET/TC/WT modifiers). Returns its context name."""
        _process, _roles, segmentation = importLibrary()
        terminologies = self.moduleLogic("Terminologies")
        names = vtk.vtkStringArray()
        terminologies.GetLoadedTerminologyNames(names)
        if segmentation.CATEGORY_CONTEXT in [names.GetValue(i) for i in range(names.GetNumberOfValues())]:
            return segmentation.CATEGORY_CONTEXT
        loaded = terminologies.LoadTerminologyFromFile(self.terminologyFile())
        if loaded != segmentation.CATEGORY_CONTEXT:
            raise RuntimeError(f"the terminology file {self.terminologyFile()} could not be loaded")
        return loaded

    # --- running

    def startSegmentation(self, volumesByRole, modelSet, device="auto", postprocess=None, folds=None,
                          checkpoint=None, mirroring=True, tile_step=None, include_derived=False, weights=None,
                          save_uncertainty=False, trust=(), server=None, token=None, roles=None):
        """Export the volumes to a temporary case folder and start ``brats-ensemble predict`` (non-blocking), or,
        with ``server`` (``http://host:port``), send them to ``brats-ensemble serve`` there. ``trust``: files the
        user trusts (passed as ``--trust-checkpoint``; a local run only).

        ``roles``: the input roles to export; None: those the model set needs (:meth:`neededRoles`; on a server the
        four BraTS roles). A needed role without a volume is refused, naming it. Volumes given for roles the model set
        does not need are not exported and not checked (the panel keeps them selected for another model set): a CT
        model takes the CT volume only, whatever else is selected. Each role's volume is exported as
        ``<id>-<role>.nii.gz`` (``process.input_file_name``); the result lies on the reference volume's grid
        (:meth:`referenceVolume`).

        Remote: ``modelSet`` is the name of a model set the server serves (None: its first); the server's set fixes
        device, postprocessing, folds, checkpoint, mirroring, tile step and weights, so giving one is refused.
        ``token``: the server's token (None: ``$BRATS_ENSEMBLE_TOKEN``).
        Returns a :class:`SegmentationRun`; poll ``run.process`` and call :meth:`finishSegmentation`.
        """
        process, _roles, _seg = importLibrary()
        remote = bool(server and str(server).strip())
        if roles is None:
            roles = ROLES if remote else self.neededRoles(modelSet)
        roles = tuple(dict.fromkeys(roles))
        for role in roles:
            process.input_file_name("case", role)  # refuses a role that cannot be a file name before anything else
        missing = [r for r in roles if volumesByRole.get(r) is None]
        if missing:
            raise ValueError(f"the model set needs volumes for {', '.join(missing)}; none given for "
                             f"{'it' if len(missing) == 1 else 'them'} (needed: {', '.join(roles)})")
        unused = [r for r, n in volumesByRole.items() if n is not None and r not in roles]
        if unused:
            logging.info("BraTSEnsemble: not used by this model set: %s", ", ".join(unused))
        volumesByRole = {r: volumesByRole[r] for r in roles}
        duplicates = process.duplicate_roles({r: n.GetID() for r, n in volumesByRole.items()})
        if duplicates:
            raise ValueError(f"the same volume is given for {', '.join('/'.join(g) for g in duplicates)}")
        if remote:
            localOnly = {"device": device not in (None, "auto"),
                         "postprocess": postprocess not in (None, "", "default"), "folds": bool(folds),
                         "checkpoint": checkpoint not in (None, "final"), "mirroring": not mirroring,
                         "tile_step": tile_step not in (None, 0.5), "weights": bool(weights),
                         "trust": bool(trust)}
            given = [name for name, isSet in localOnly.items() if isSet]
            if given:
                raise ValueError(f"{', '.join(given)}: not used with a server (its model set fixes them); leave them "
                                 "at their defaults")
            if modelSet is not None and not isinstance(modelSet, str):
                raise ValueError("with a server, give the name of a model set it serves (or None for its first)")
            from BraTSEnsembleLib import remote as remoteLibrary

            client = remoteLibrary.ServerClient(server, token)  # a malformed URL or no token: refused before export
        else:
            models = [modelSet] if isinstance(modelSet, (str, os.PathLike)) else list(modelSet)
        caseId = self.caseIdFor(volumesByRole)
        tempDir = self._newTemporaryDirectory()
        try:
            caseDir = os.path.join(tempDir, "case")
            outDir = os.path.join(tempDir, "output")
            os.makedirs(caseDir)
            os.makedirs(outDir)
            files = {role: os.path.join(caseDir, process.input_file_name(caseId, role)) for role in roles}
            for role in roles:
                self.exportVolume(volumesByRole[role], files[role])
            reference = self.referenceVolume(volumesByRole)
            if remote:
                logging.info("BraTSEnsemble: sending %s to %s", caseId, client.url)
                runner = remoteLibrary.RemoteRun(client, files, caseId, outDir, model_set=modelSet or None,
                                                 save_uncertainty=save_uncertainty)
                return SegmentationRun(runner, tempDir, caseId, reference, include_derived, save_uncertainty)
            args = process.build_predict_command(
                caseDir, outDir, models, python=process.python_executable(), weights=weights, device=device,
                postprocess=postprocess, folds=folds, checkpoint=checkpoint, mirroring=mirroring,
                tile_step=tile_step, overwrite=True, progress=True, save_uncertainty=save_uncertainty, trust=trust)
            env = process.cli_environment(self._cliBaseEnvironment(), libraryParentDirectory())
            logging.info("BraTSEnsemble: running %s", " ".join(args))
            cliProcess = process.CliProcess(args, env=env, cwd=libraryParentDirectory())
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return SegmentationRun(cliProcess, tempDir, caseId, reference, include_derived, save_uncertainty)

    def _cliBaseEnvironment(self):
        return dict(self._environment() if self._environment is not None else os.environ)

    def _newTemporaryDirectory(self):
        """A new folder under the application's temporary folder (the system's when none is set)."""
        base = self.applicationLogic.GetTemporaryPath() or None
        if base:
            os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix="BraTSEnsemble-", dir=base)

    def exportVolume(self, volumeNode, path):
        """Write a volume in world coordinates (as Slicer's ``exportNode(..., world=True)``): a volume under a
        transform is written from a hardened copy; the scene's volume and its storage node are not changed."""
        exported = volumeNode
        if volumeNode.GetParentTransformNode() is not None:
            exported = self.moduleLogic("Volumes").CloneVolume(self.scene, volumeNode, "BraTSEnsemble export")
            exported.SetHideFromEditors(True)
        try:
            if exported is not volumeNode and not slicer.vtkSlicerTransformLogic.hardenTransform(exported):
                raise RuntimeError(f"the transform of {volumeNode.GetName()} could not be applied for the export")
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(path)
            storage.SetUseCompression(True)
            if not storage.WriteData(exported) or not os.path.isfile(path):
                raise RuntimeError(f"could not export {volumeNode.GetName()} to {path}")
        finally:
            if exported is not volumeNode:
                self._removeWithDisplayAndStorage(exported)

    def _removeWithDisplayAndStorage(self, node):
        """Remove a node and the display and storage nodes that belong to it."""
        owned = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        owned += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        self.scene.RemoveNode(node)
        for other in owned:
            if other is not None and other.GetScene() is not None:
                self.scene.RemoveNode(other)

    def serverInfo(self, server, token=None):
        """What a server serves (``GET /``: model sets with members and fingerprints, limits, device); raises
        ``BraTSEnsembleLib.remote.RemoteError`` saying why when it cannot be reached or refuses."""
        importLibrary()
        from BraTSEnsembleLib import remote as remoteLibrary

        return remoteLibrary.ServerClient(server, token, timeout=15).info()

    def cancelSegmentation(self, run):
        """Stop the run (kill the process tree, or cancel the job on the server) and delete the temporary files;
        the scene is not touched."""
        try:
            run.process.cancel()
        finally:
            shutil.rmtree(run.tempDir, ignore_errors=True)

    def finishSegmentation(self, run, outputSegmentation=None, outputTable=None):
        """Import a finished run into the scene: (segmentation node, table node). Temporary files are removed.

        An existing segmentation/table is only replaced when it is given as output; otherwise new nodes are made.
        """
        try:
            run.process.poll()
            if not run.process.succeeded:
                raise RuntimeError(run.process.failure_message())
            segmentationNode, tableNode, uncertainty = self.importResults(
                run.outputDir, run.caseId, run.reference, includeDerived=run.includeDerived,
                saveUncertainty=run.saveUncertainty, outputSegmentation=outputSegmentation, outputTable=outputTable)
            if uncertainty is not None:
                run.uncertaintyNode, run.uncertaintyOpacity = uncertainty
            run.warnings = json.loads(segmentationNode.GetAttribute("BraTSEnsemble.Warnings") or "[]")
            return segmentationNode, tableNode
        finally:
            shutil.rmtree(run.tempDir, ignore_errors=True)

    def importResults(self, outputDir, caseId, reference, includeDerived=False, saveUncertainty=False,
                      outputSegmentation=None, outputTable=None):
        """Import the CLI's outputs for one case (``<id>.nii.gz``, ``<id>.json``, the uncertainty maps) into the
        scene: (segmentation node, table node, (uncertainty node, opacity) or None).

        No node keeps a storage node pointing into ``outputDir`` (a temporary folder): saving the scene writes the
        results afresh.
        """
        process, _roles, segmentation = importLibrary()
        outputs = process.finalize_case_outputs(outputDir, caseId, include_derived=includeDerived,
                                                uncertainty=saveUncertainty)
        with open(outputs["json"], encoding="utf-8") as handle:
            statistics = json.load(handle)
        self.loadTerminology()
        segmentationNode = self._importSegmentation(str(outputs["segmentation"]), caseId, reference,
                                                    outputSegmentation)
        tableNode = self._fillTable(segmentation.statistics_rows(statistics), caseId, reference, outputTable)
        if outputs.get("lesions") is not None:  # the CLI's per-lesion table (<id>_lesions.csv): one row per lesion
            previous = segmentationNode.GetNodeReference(LESIONS_REFERENCE) if outputSegmentation is not None else None
            lesionsNode = self._fillLesionTable(str(outputs["lesions"]), caseId, reference, previous)
            segmentationNode.SetNodeReferenceID(LESIONS_REFERENCE, lesionsNode.GetID())
        segmentationNode.SetAttribute("BraTSEnsemble.Provenance", json.dumps(
            {k: statistics.get(k) for k in ("models", "postprocess", "device")}))
        warnings = [str(w) for w in statistics.get("warnings") or []]
        for warning in warnings:  # the Python console sees them in the log
            logging.warning("BraTSEnsemble: %s", warning)
        segmentationNode.SetAttribute("BraTSEnsemble.Warnings", json.dumps(warnings))
        uncertainty = None
        if saveUncertainty:
            display = segmentation.uncertainty_heat_map(caseId)
            uncertaintyNode = self._importUncertainty(str(outputs["uncertainty"]), display, reference)
            segmentationNode.SetNodeReferenceID("BraTSEnsemble.Uncertainty", uncertaintyNode.GetID())
            uncertainty = (uncertaintyNode, display.foreground_opacity)
        return segmentationNode, tableNode, uncertainty

    def _detachStorage(self, node):
        """Remove a node's storage node (it points at a temporary file that is deleted): Slicer's Save dialog then
        adds a default one and writes the data where the user saves the scene."""
        storageNode = node.GetStorageNode()
        if storageNode is not None:
            node.SetAndObserveStorageNodeID(None)
            self.scene.RemoveNode(storageNode)

    def _importUncertainty(self, path, display, reference):
        """Load an uncertainty map as a scalar volume shown as a heat map: the display's colour table and a fixed
        window (0..1), placed beside the reference volume. The volumes logic makes the name unique."""
        node = self.moduleLogic("Volumes").AddArchetypeVolume(path, display.name, 0)
        if node is None:
            raise RuntimeError(f"Slicer could not load the uncertainty map {path}")
        self._detachStorage(node)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        displayNode = node.GetDisplayNode()
        displayNode.SetAndObserveColorNodeID(display.color_node_id)
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(display.window_min, display.window_max)
        self._placeBeside(node, reference)
        return node

    def _placeBeside(self, node, reference):
        """Put a node in the subject hierarchy beside the reference volume (same patient/study; the scene's top
        level when the reference has no parent)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        referenceItem = shNode.GetItemByDataNode(reference)
        parent = shNode.GetItemParent(referenceItem) if referenceItem else 0
        parent = parent or shNode.GetSceneItemID()
        item = shNode.GetItemByDataNode(node)
        if not item:  # the application's subject hierarchy plugins make one for each new node; without them, here
            item = shNode.CreateItem(parent, node)
        shNode.SetItemParent(item, parent)

    def _importSegmentation(self, segPath, caseId, reference, outputNode):
        segmentations = self.moduleLogic("Segmentations")
        # the Segmentations logic takes the name as given (unlike the Volumes logic): make it unique here
        name = self.scene.GenerateUniqueName(f"{caseId} segmentation")
        loaded = segmentations.LoadSegmentationFromFile(segPath, True, name)
        if loaded is None:
            raise RuntimeError(f"Slicer could not load the result {segPath}")
        self._detachStorage(loaded)
        if outputNode is not None:
            outputNode.GetSegmentation().DeepCopy(loaded.GetSegmentation())
            self._removeWithDisplayAndStorage(loaded)
            node = outputNode
        else:
            node = loaded
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        node.CreateClosedSurfaceRepresentation()
        self._placeBeside(node, reference)
        return node

    def _fillTable(self, rows, caseId, reference, outputNode):
        _process, _roles, segmentation = importLibrary()
        node = outputNode or self.scene.AddNewNodeByClass(
            "vtkMRMLTableNode", self.scene.GenerateUniqueName(f"{caseId} tumor statistics"))
        columns = segmentation.table_columns(rows)
        wasModifying = node.StartModify()
        node.RemoveAllColumns()
        for name, values in columns.items():
            if name in _INTEGER_COLUMNS:
                array = vtk.vtkIntArray()
            elif name in _DOUBLE_COLUMNS:
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

    def _fillLesionTable(self, csvPath, caseId, reference, outputNode=None):
        """A table node ``<id> lesions`` from the CLI's per-lesion CSV (region, lesion, voxels, volume, centre in LPS
        and RAS mm): integer, double and string columns as the CSV's header says. ``outputNode``: the lesion table of
        the segmentation being replaced (its content is replaced), else a new node."""
        with open(csvPath, encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            raise RuntimeError(f"{csvPath}: empty; brats-ensemble writes a header line at least")
        header, body = rows[0], rows[1:]
        node = outputNode or self.scene.AddNewNodeByClass(
            "vtkMRMLTableNode", self.scene.GenerateUniqueName(f"{caseId} lesions"))
        wasModifying = node.StartModify()
        node.RemoveAllColumns()
        for index, name in enumerate(header):
            values = [row[index] if index < len(row) else "" for row in body]
            if name in _LESION_INTEGER_COLUMNS:
                array = vtk.vtkIntArray()
                convert = int
            elif name == "region":
                array = vtk.vtkStringArray()
                convert = str
            else:
                array = vtk.vtkDoubleArray()
                convert = float
            array.SetName(name)
            array.SetNumberOfValues(len(values))
            for row, value in enumerate(values):
                array.SetValue(row, convert(value))
            node.AddColumn(array)
            unit = "mL" if name.endswith("_ml") else "mm3" if name.endswith("_mm3") else (
                "mm" if name.endswith("_mm") else "")
            if unit:
                node.SetColumnUnitLabel(name, unit)
        node.SetColumnDescription("lesion", "Lesion number within its region (1 = the largest)")
        node.EndModify(wasModifying)
        self._placeBeside(node, reference)
        return node

    def showResults(self, segmentationNode, tableNode, reference, uncertaintyNode=None, uncertaintyOpacity=0.5):
        """Show the segmentation over the T1c volume in the slice views and 3D, the uncertainty heat map (when there
        is one) as the foreground layer, and the table in a table view: the layout is switched to its variant with a
        table first, as Slicer's Segment Statistics does (the default layout has no table view)."""
        for composite in self._nodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetBackgroundVolumeID(reference.GetID())
            if uncertaintyNode is not None:
                composite.SetForegroundVolumeID(uncertaintyNode.GetID())
                composite.SetForegroundOpacity(uncertaintyOpacity)
        displayNode = segmentationNode.GetDisplayNode()
        displayNode.SetVisibility(True)
        displayNode.SetVisibility2D(True)
        displayNode.SetVisibility3D(True)
        if tableNode is None:
            return
        layoutNode = self.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layoutNode is not None:
            withTable = self.moduleLogic("Tables").GetLayoutWithTable(layoutNode.GetViewArrangement())
            layoutNode.SetViewArrangement(withTable)
        self.applicationLogic.GetSelectionNode().SetActiveTableID(tableNode.GetID())
        self.applicationLogic.PropagateTableSelection()

    def segment(self, volumes_by_role, model_set, device="auto", timeout=None, **options):
        """Segment synchronously (Python console): returns (segmentationNode, tableNode).

        ``volumes_by_role``: a volume for each role the model set needs ({'t1n': node, 't1c': node, 't2w': node,
        't2f': node} for a BraTS model, {'ct': node} for a CT model; see :meth:`neededRoles`, volumes of other roles
        are ignored). ``model_set``: manifest path, results folder, or a list of them. Options: roles (the roles to
        export, default: those the model set needs), postprocess, folds, checkpoint, mirroring, tile_step,
        include_derived, weights, save_uncertainty, trust (files to trust, as --trust-checkpoint), outputSegmentation,
        outputTable. Segments are named by the model's classes (ET/NETC/SNFH, or e.g. "metastasis"); when the command
        line wrote a per-lesion table, it is a second table node, referenced from the segmentation node (role
        ``BraTSEnsemble.Lesions``). With ``server="http://…"`` (and ``token``) the case is segmented by ``brats-ensemble serve``
        there: ``model_set`` then names one of the server's model sets (None: its first). With save_uncertainty=True the
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
                      timeout=None, overwrite=False, **options):
        """Batch: every case folder under ``input_folder`` (or ``input_folder`` itself when it holds the images) →
        ``output_folder/<id>.nii.gz``, ``<id>.json``, ``<id>_lesions.csv`` (the command line's), ``<id>.seg.nrrd``
        and ``<id>-statistics.csv``. The scene is not touched. Returns {case folder: {kind: path} or {"error": …}}.

        One ``brats-ensemble batch`` process (``predict`` for a single case folder) does the work, so case identity,
        resuming and locks are the command line's: two folders whose files give one case id (nnU-Net's
        ``case_0000.nii.gz`` in each) are written under their folder names; a case whose result has the same
        fingerprint (inputs, models, options) is skipped, not recomputed; without ``overwrite`` a result made from
        other inputs or models is never replaced (the command line refuses the run and says so). Each result is
        matched to its folder by the ``case_folder`` its JSON records; a case that failed gets the command line's
        ``error`` event. A run that fails as a whole (a broken model set) raises RuntimeError with its message.
        ``timeout``: seconds for the whole run.
        """
        process, _roles, _seg = importLibrary()
        from BraTSEnsembleLib.cohort import find_case_folders
        from BraTSEnsembleLib.results import load_result

        timeoutPerCase = options.pop("timeout_per_case", None)  # older name, kept for existing scripts
        input_folder, output_folder = os.path.abspath(input_folder), os.path.abspath(output_folder)
        single = process.list_case_folders(input_folder) == [Path(input_folder)]
        folders = [Path(input_folder)] if single else find_case_folders(Path(input_folder), Path(output_folder))
        if timeout is None and timeoutPerCase is not None:
            timeout = timeoutPerCase * len(folders)
        models = [model_set] if isinstance(model_set, (str, os.PathLike)) else list(model_set)
        build = process.build_predict_command if single else process.build_batch_command
        args = build(input_folder, output_folder, models, python=process.python_executable(), device=device,
                     overwrite=overwrite, progress=True, **options)
        env = process.cli_environment(self._cliBaseEnvironment(), libraryParentDirectory())
        logging.info("BraTSEnsemble: running %s", " ".join(args))
        run = process.CliProcess(args, env=env, cwd=libraryParentDirectory())
        done, errors = [], []
        try:
            for event in self._waitForEvents(run, timeout):
                if event.event in ("written", "case-skipped") and event.case:
                    done.append(event.case)
                elif event.event == "error":
                    errors.append(event)
        except BaseException:
            run.cancel()
            raise
        if not run.succeeded and not done and not any(e.case for e in errors):  # refused as a whole (case "")
            raise RuntimeError(run.failure_message())
        byFolder = {}
        for caseId in dict.fromkeys(done):
            data, problem = load_result(Path(output_folder) / f"{caseId}.json")
            if data is None:
                raise RuntimeError(f"{caseId}: brats-ensemble reported the case done but its result is not readable "
                                   f"({problem})")
            byFolder[os.path.realpath(str(data.get("case_folder")))] = caseId
        results = {}
        for folder in folders:
            caseId = byFolder.get(os.path.realpath(folder))
            if caseId is not None:
                results[str(folder)] = {kind: str(path) for kind, path in process.finalize_case_outputs(
                    output_folder, caseId, include_derived=include_derived).items()}
        unmatched = list(errors)
        for folder in folders:
            if str(folder) in results:
                continue
            own = [e for e in unmatched if e.case == folder.name or str(folder) in e.message]
            unmatched = [e for e in unmatched if e not in own]
            if own:
                results[str(folder)] = {"error": "\n".join(dict.fromkeys(e.message for e in own))}
        missing = [folder for folder in folders if str(folder) not in results]
        for folder in missing:
            reported = "\n".join(dict.fromkeys(e.message for e in unmatched)) or run.failure_message()
            results[str(folder)] = {"error": reported if len(missing) == 1 else f"no result; the batch reported: "
                                    f"{reported}"}
        for folder, outcome in results.items():
            if "error" in outcome:
                logging.error("BraTSEnsemble: %s failed: %s", folder, outcome["error"])
        return results

    @staticmethod
    def _waitForEvents(run, timeout):
        """The progress events of a CLI run until it ends (logged as they come); TimeoutError after ``timeout`` s."""
        events = []

        def collect(event):
            events.append(event)
            logging.info("BraTSEnsemble %s %3.0f%% %s", event.case, 100 * (event.fraction or 0), event.message)

        run.wait(timeout=timeout, callback=collect)
        return events


def findDemoData():
    """(demo case folder, demo model set) when the demo is installed, else None."""
    process, _roles, _seg = importLibrary()
    return process.find_demo(os.path.join(libraryParentDirectory(), "BraTSEnsembleLib"))
