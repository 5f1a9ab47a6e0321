"""The module's logic bound to the running Slicer application (console API: ``BraTSEnsemble.BraTSEnsembleLogic``).

:class:`BraTSEnsembleLogic` is :class:`~BraTSEnsembleModule.logic.SegmentationLogic` given what only the application
has: its application logic (scene, module logics, temporary folder), the launcher environment for the CLI process,
BRAINSResample for "Resample onto T1c grid", the typed parameter node and the dependency installer.
"""
import slicer

from . import install
from .logic import SegmentationLogic


def brainsResample(inputVolume, referenceVolume, outputVolume):
    """Resample ``inputVolume`` onto the reference grid into ``outputVolume`` with BRAINSResample (linear)."""
    parameters = {"inputVolume": inputVolume.GetID(), "referenceVolume": referenceVolume.GetID(),
                  "outputVolume": outputVolume.GetID(), "pixelType": "float", "interpolationMode": "Linear"}
    cliNode = slicer.cli.runSync(slicer.modules.brainsresample, None, parameters)
    failed = cliNode.GetStatus() & cliNode.ErrorsMask
    errorText = cliNode.GetErrorText()
    slicer.mrmlScene.RemoveNode(cliNode)
    if failed:
        raise RuntimeError(f"Resampling {inputVolume.GetName()} failed: {errorText}")


class BraTSEnsembleLogic(SegmentationLogic):
    """Everything the module does, usable from the Python console without the widget:

    >>> logic = BraTSEnsembleLogic()
    >>> seg, table = logic.segment({"t1n": n1, "t1c": n2, "t2w": n3, "t2f": n4}, "/models/goat2025.json")
    """

    def __init__(self, applicationLogic=None):
        super().__init__(applicationLogic or slicer.app.applicationLogic(),
                         environment=slicer.util.startupEnvironment, resampler=brainsResample)

    def getParameterNode(self):
        from .parameters import BraTSEnsembleParameterNode

        return BraTSEnsembleParameterNode(super().getParameterNode())

    @staticmethod
    def missingImports():
        return install.missingImports()

    def requirements(self):
        return install.requirements()

    def ensureDependencies(self, askConfirmation=True):
        return install.ensureDependencies(askConfirmation=askConfirmation)
