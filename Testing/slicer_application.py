"""The stand-in for Slicer's Qt application in the MRML tests: what it replaces, and nothing more.

In 3D Slicer, ``qSlicerCoreApplication`` creates the MRML scene and the application logic and sets the home, share
and temporary folders on it; ``qSlicerModuleManager`` creates each loadable module's logic on that scene and
registers it with the application logic (``SetModuleLogic``); ``qSlicerLayoutManager`` keeps a layout logic (the
layout node and the view nodes of the current layout) and one slice logic per slice view, and starts in the
Conventional layout; Slicer's share folder holds the colour files. :class:`CoreApplication` does exactly that with
the real classes of ``slicer-core`` — every object it makes is Slicer's own, none is a fake — for the logics the
module uses (Colors, Subject hierarchy, Terminologies, Volumes, Segmentations, Tables), the layout and the three
slice views (Red, Yellow, Green). The one file it has to make is the colour table the heat map uses,
``ColorFiles/Inferno.txt``, which slicer-core does not ship: it is written from matplotlib's "inferno" colour map
in Slicer's colour-file format (Slicer's own file comes from the same map).

It does not replace: widgets, ``slicer.app``, ``slicer.modules``, the CLI modules (BRAINSResample), Sample Data,
``parameterNodeWrapper``, pip. Those exist only in the application and are not tested here.

``close()`` tears the scene and the logics down explicitly: without it the process sometimes crashed at exit
after pytest had passed.
"""
from __future__ import annotations

import os
from pathlib import Path

import slicer

#: Module logics the BraTSEnsemble module uses, by the module name Slicer registers them under; in creation order
#: (the Volumes logic asks the Colors logic for its default colour table).
MODULE_LOGICS = (
    ("Colors", "vtkSlicerColorLogic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Terminologies", "vtkSlicerTerminologiesModuleLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
)
SLICE_VIEWS = ("Red", "Yellow", "Green")


def write_inferno_color_file(path: Path) -> Path:
    """Slicer's colour-file format (``index name r g b a``, 0..255) for matplotlib's "inferno" map, 256 entries."""
    from matplotlib import colormaps

    inferno = colormaps["inferno"]
    lines = ["# 256 values"]
    for index in range(256):
        r, g, b, _a = inferno(index)
        lines.append(f"{index} {index} {int(r * 255)} {int(g * 255)} {int(b * 255)} 255")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class CoreApplication:
    """Scene, application logic, module logics, layout and slice logics, set up as Slicer's application does."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.home = folder / "home"
        write_inferno_color_file(self.home / "share" / "ColorFiles" / "Inferno.txt")
        self.temporary = folder / "temp"
        self.temporary.mkdir(parents=True, exist_ok=True)
        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetHomeDirectory(str(self.home))
        self.applicationLogic.SetShareDirectory("share")
        self.applicationLogic.SetTemporaryPath(str(self.temporary))
        self.applicationLogic.SetMRMLScene(self.scene)
        self.moduleLogics = {}
        for name, class_name in MODULE_LOGICS:
            logic = getattr(slicer, class_name)()
            logic.SetMRMLApplicationLogic(self.applicationLogic)
            logic.SetMRMLScene(self.scene)
            self.applicationLogic.SetModuleLogic(name, logic)
            self.moduleLogics[name] = logic
        if self.applicationLogic.GetInteractionNode() is None:  # Slicer's application makes the singleton
            interaction = slicer.vtkMRMLInteractionNode()
            interaction.SetSingletonTag("Singleton")
            self.scene.AddNode(interaction)
        self.layoutLogic = slicer.vtkMRMLLayoutLogic()
        self.layoutLogic.SetMRMLScene(self.scene)
        self.layoutNode = self.layoutLogic.GetLayoutNode()
        self.layoutNode.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
        self.sliceLogics = {}
        import vtk

        self.applicationLogic.SetSliceLogics(vtk.vtkCollection())
        for name in SLICE_VIEWS:
            sliceLogic = slicer.vtkMRMLSliceLogic()
            sliceLogic.SetMRMLApplicationLogic(self.applicationLogic)
            sliceLogic.SetMRMLScene(self.scene)
            # the layout's slice node for this view, as qMRMLSliceControllerWidget gives it to its slice logic
            sliceNode = self.scene.GetSingletonNode(name, "vtkMRMLSliceNode")
            assert sliceNode is not None, f"the layout logic made no {name} slice node"
            sliceLogic.SetSliceNode(sliceNode)
            self.applicationLogic.GetSliceLogics().AddItem(sliceLogic)
            self.sliceLogics[name] = sliceLogic

    def close(self) -> None:
        """Clear the scene and detach every logic from it, in the reverse order of creation."""
        self.scene.Clear(True)
        self.applicationLogic.GetSliceLogics().RemoveAllItems()
        for sliceLogic in self.sliceLogics.values():
            sliceLogic.SetMRMLScene(None)
        self.layoutLogic.SetMRMLScene(None)
        for name, _class_name in reversed(MODULE_LOGICS):
            self.moduleLogics[name].SetMRMLScene(None)
            self.applicationLogic.SetModuleLogic(name, None)
        self.applicationLogic.SetMRMLScene(None)
        self.sliceLogics.clear()
        self.moduleLogics.clear()

    def clear(self) -> None:
        """Close the scene (File → Close scene): nodes go, the singletons (layout, selection, views) stay."""
        self.scene.Clear(False)


def add_module_to_path(root: Path) -> None:
    """Make the module's package importable, as Slicer does by putting the module's folder on ``sys.path``."""
    import sys

    module_dir = str(Path(root) / "BraTSEnsemble")
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
