"""The BraTSEnsemble Slicer module's own package, split as SlicerNNUnet splits its ``SlicerNNUNetLib``:

* ``logic.py`` — :class:`~BraTSEnsembleModule.logic.SegmentationLogic`: everything that touches the MRML scene. It
  needs no Qt and no Slicer application: it takes the application logic (scene, module logics, temporary folder) and
  calls only MRML classes and ``slicer.util`` functions that exist without the application, so the test suite runs
  it on ``slicer-core`` (Slicer's own libraries as a wheel).
* ``application.py`` — :class:`~BraTSEnsembleModule.application.BraTSEnsembleLogic`: that logic bound to the running
  Slicer (its application logic, launcher environment, BRAINSResample, the typed parameter node).
* ``parameters.py`` — the parameter node (``parameterNodeWrapper``, Qt world).
* ``install.py`` — the dependency installer (pip inside Slicer, the PyTorch extension, confirmation dialogs).
* ``widget.py`` — the panel.

The name differs from the library package ``BraTSEnsembleLib`` (which never imports slicer, qt or vtk), and from
every other extension's, because all scripted modules share one folder on ``sys.path``.
"""
import os
import sys

MODULE_NAME = "BraTSEnsemble"
ROLES = ("t1n", "t1c", "t2w", "t2f")


def moduleDirectory():
    """The module's folder (``BraTSEnsemble/``: the module file, this package and ``Resources/``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def libraryParentDirectory():
    """Folder that holds the ``BraTSEnsembleLib`` package: the module's folder once installed, the repository root
    in the source tree."""
    here = moduleDirectory()
    if os.path.isdir(os.path.join(here, "BraTSEnsembleLib")):
        return here
    return os.path.dirname(here)


def importLibrary():
    """Import the pure-Python library (never imports slicer/qt/vtk itself): (process, roles, segmentation)."""
    parent = libraryParentDirectory()
    if parent not in sys.path:
        sys.path.insert(0, parent)
    from BraTSEnsembleLib import process, roles, segmentation

    return process, roles, segmentation


def resourcePath(*parts):
    """A file under the module's ``Resources/`` folder."""
    return os.path.join(moduleDirectory(), "Resources", *parts)
