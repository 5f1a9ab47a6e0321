"""Slicer's own slice and 3D views, rendered offscreen with ``slicer-core`` (for the tests and the README picture).

A slice view in Slicer is a ``vtkMRMLSliceLogic`` (it reslices the background/foreground volumes into an RGBA image)
shown by an image actor, plus the slice view's displayable managers (here Slicer's
``vtkMRMLSegmentationsDisplayableManager2D``: segment fill and outline). The 3D view is a renderer with the 3D
displayable managers (camera, segmentations' closed surfaces). In the application the image actor comes from CTK's
light-box renderer manager; here it is a plain ``vtkImageMapper``/``vtkActor2D`` pair, the only piece that is not
Slicer's. The render window is VTK's EGL window (headless, Mesa's software renderer on a machine without a GPU).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

import slicer  # noqa: E402

SLICE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D",)
# (vtkMRMLViewDisplayableManager, which draws the box and the background, crashes without the Qt view: the view
# node's background colours are set on the renderer instead.)
THREE_D_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLSegmentationsDisplayableManager3D")


def _window(size: tuple[int, int]):
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()  # displayable managers add their widgets to it (never started)
    interactor.SetRenderWindow(window)
    return window, renderer


def _pixels(window) -> np.ndarray:
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[:, :, :3]
    return np.ascontiguousarray(rgb[::-1])  # VTK's rows go bottom-up


def _managers(factory_class, application_logic, names, renderer, view_node):
    factory = factory_class.GetInstance()
    factory.SetMRMLApplicationLogic(application_logic)
    for name in names:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = factory.InstantiateDisplayableManagers(renderer)
    group.SetMRMLDisplayableNode(view_node)
    return group


def render_slice_view(app, name: str, center_ras, size=(360, 360)) -> np.ndarray:
    """RGB pixels of slice view ``name`` ('Red', 'Yellow', 'Green') through ``center_ras``, fitted to the background."""
    slice_logic = app.sliceLogics[name]
    slice_node = slice_logic.GetSliceNode()
    window, renderer = _window(size)
    mapper = vtk.vtkImageMapper()
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    renderer.AddViewProp(actor)
    group = _managers(slicer.vtkMRMLSliceViewDisplayableManagerFactory, app.applicationLogic, SLICE_MANAGERS,
                      renderer, slice_node)
    try:
        slice_logic.ResizeSliceNode(*size)
        slice_logic.FitSliceToBackground()
        slice_node.JumpSliceByCentering(*center_ras)
        slice_logic.SnapSliceOffsetToIJK()
        mapper.SetInputConnection(slice_logic.GetImageDataConnection())
        group.RequestRender()
        return _pixels(window)
    finally:
        group.SetMRMLDisplayableNode(None)
        window.Finalize()


def render_3d_view(app, size=(360, 360)) -> np.ndarray:
    """RGB pixels of the 3D view (view node "1" of the layout), camera reset to the visible segments."""
    view_node = app.scene.GetFirstNodeByClass("vtkMRMLViewNode")
    window, renderer = _window(size)
    renderer.SetBackground(view_node.GetBackgroundColor())
    renderer.SetBackground2(view_node.GetBackgroundColor2())
    renderer.GradientBackgroundOn()
    group = _managers(slicer.vtkMRMLThreeDViewDisplayableManagerFactory, app.applicationLogic, THREE_D_MANAGERS,
                      renderer, view_node)
    try:
        renderer.ResetCamera()
        camera = renderer.GetActiveCamera()
        camera.Elevation(20)
        camera.Azimuth(30)
        renderer.ResetCamera()
        renderer.ResetCameraClippingRange()
        return _pixels(window)
    finally:
        group.SetMRMLDisplayableNode(None)
        window.Finalize()


def save_png(pixels: np.ndarray, path: Path) -> Path:
    """Write RGB pixels as a PNG with VTK's writer."""
    height, width, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    from vtk.util.numpy_support import numpy_to_vtk

    scalars = numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, 3), deep=True,
                           array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return Path(path)


#: View bar colours of Slicer's Red, Yellow and Green slice views and of the 3D view (what tells them apart).
VIEW_BAR_COLORS = {"Red": (243, 74, 51), "Yellow": (237, 213, 76), "Green": (110, 176, 75), "3D": (116, 131, 233)}


def render_views(app, center_ras, size=(360, 360)) -> dict[str, np.ndarray]:
    """The three slice views (axial Red, sagittal Yellow, coronal Green) through ``center_ras`` and the 3D view."""
    views = {name: render_slice_view(app, name, center_ras, size) for name in ("Red", "Yellow", "Green")}
    views["3D"] = render_3d_view(app, size)
    return views


def views_picture(views: dict[str, np.ndarray], bar: int = 6, gap: int = 4) -> np.ndarray:
    """The views side by side, each under a bar in its view's colour, as Slicer's one-row layouts show them."""
    panels = []
    for name, pixels in views.items():
        strip = np.empty((bar, pixels.shape[1], 3), np.uint8)
        strip[:] = VIEW_BAR_COLORS[name]
        panels.append(np.concatenate([strip, pixels], axis=0))
        panels.append(np.full((pixels.shape[0] + bar, gap, 3), 255, np.uint8))
    return np.concatenate(panels[:-1], axis=1)
