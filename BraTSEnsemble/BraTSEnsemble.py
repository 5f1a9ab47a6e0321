"""BraTSEnsemble: brain-tumour segmentation (ET, NETC, SNFH) by an ensemble of nnU-Net v2 / MedNeXt / U-Mamba models.

The module file is thin, as in SlicerNNUnet: the module class, the self-test and the names Slicer looks up here
(``BraTSEnsembleWidget``, ``BraTSEnsembleLogic``). The rest lives in the package ``BraTSEnsembleModule`` beside this
file: ``logic.py`` (the MRML side, no Qt: tested on Slicer's own libraries, slicer-core), ``application.py`` (that
logic bound to the running Slicer), ``parameters.py`` (parameter node), ``install.py`` (dependencies), ``widget.py``
(the panel). Everything that can be done without Slicer lives in the library ``BraTSEnsembleLib`` (``process.py``,
``segmentation.py``, …), which the module runs as the ``brats-ensemble`` command line in a separate process.
"""
import os
import sys

# Slicer puts the scripted-modules folder on sys.path; this also covers a module loaded from another folder.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

import slicer  # noqa: E402
from slicer.i18n import tr as _  # noqa: E402
from slicer.i18n import translate  # noqa: E402
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest  # noqa: E402

from BraTSEnsembleModule import ROLES, importLibrary  # noqa: E402
from BraTSEnsembleModule.application import BraTSEnsembleLogic  # noqa: E402,F401  (console API)
from BraTSEnsembleModule.logic import SegmentationLogic, findDemoData  # noqa: E402,F401
from BraTSEnsembleModule.widget import BraTSEnsembleWidget  # noqa: E402,F401  (Slicer looks it up here)

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

    source = SegmentationLogic.sampleDataSource()
    if source is not None:  # None: a package without the demo case, nothing to register
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


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
        process, roles, segmentation = importLibrary()
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
        process, roles, _seg = importLibrary()
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
