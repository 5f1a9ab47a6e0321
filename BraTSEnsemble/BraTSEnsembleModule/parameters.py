"""The module's parameter node: its state, typed with Slicer's ``parameterNodeWrapper`` and saved with the scene.

Qt world: ``parameterNodeWrapper`` (and its GUI connectors) exist only in the Slicer application. The node it wraps
is the logic's ``getParameterNode()`` (a ``vtkMRMLScriptedModuleNode``), which the MRML tests cover.
"""
from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from . import ROLES

DEVICE_CHOICES = ["auto", "cuda", "cpu"]
POSTPROCESS_CHOICES = ["default", "ratio-adaptive", "min-size", "et-to-netc", "none"]
CHECKPOINT_CHOICES = ["final", "best"]
#: Where a case is segmented: here (the CLI in a separate process) or by ``brats-ensemble serve`` on a server.
RUN_HERE, RUN_ON_SERVER = "this computer", "server"
RUN_ON_CHOICES = [RUN_HERE, RUN_ON_SERVER]
#: Node reference role (on the parameter node) of the volume chosen for a role other than the four BraTS ones.
OTHER_ROLE_PREFIX = "BraTSEnsemble.Role."



@parameterNodeWrapper
class BraTSEnsembleParameterNode:
    """Module state, saved with the scene.

    t1n, t1c, t2w, t2f - input volumes by role.
    modelPaths - ensemble members: model-set manifests (.json) or nnU-Net results folders.
    device, postprocess, mirroring, tileStep, folds, checkpoint - inference options.
    showDerivedRegions - also create TC and WT segments.
    showUncertainty - also compute the uncertainty map and show it as a heat map over the input.
    outputSegmentation, outputTable - chosen outputs (None: create new nodes).
    runOn, serverUrl, serverModelSet - where to segment: this computer, or a ``brats-ensemble serve`` server and
    the name of one of its model sets (the token is never stored: it would be saved with the scene).
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
    runOn: Annotated[str, Choice(RUN_ON_CHOICES)] = RUN_HERE
    serverUrl: str = ""
    serverModelSet: str = ""

    def volumesByRole(self, roles=None):
        """Selected volumes by role: the BraTS fields and the volumes of other roles (CT …), which a typed field
        cannot hold (the roles depend on the model set) and are kept as node references of the parameter node
        (``BraTSEnsemble.Role.<role>``), saved with the scene as well. ``roles``: only these."""
        volumes = {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}
        node = self.parameterNode
        for index in range(node.GetNumberOfNodeReferenceRoles()):
            referenceRole = node.GetNthNodeReferenceRole(index)
            if referenceRole.startswith(OTHER_ROLE_PREFIX) and node.GetNodeReference(referenceRole) is not None:
                volumes[referenceRole[len(OTHER_ROLE_PREFIX):]] = node.GetNodeReference(referenceRole)
        return volumes if roles is None else {r: v for r, v in volumes.items() if r in roles}

    def setVolume(self, role, volumeNode):
        """Select a volume for a role: a BraTS field, or a node reference for another role."""
        if role in ROLES:
            setattr(self, role, volumeNode)
        else:
            self.parameterNode.SetNodeReferenceID(OTHER_ROLE_PREFIX + role, volumeNode.GetID() if volumeNode else None)

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

    def isRemote(self):
        return self.runOn == RUN_ON_SERVER

    def remoteOptions(self):
        """Options for a run on a server (``startSegmentation(..., server=…)``): what its model set does not fix."""
        return {"include_derived": self.showDerivedRegions, "save_uncertainty": self.showUncertainty,
                "server": self.serverUrl.strip()}
