"""Installing the library's dependencies into Slicer's Python (application only: pip, the PyTorch extension, dialogs).

The Python version is checked first: Slicer 5.6 and 5.8 ship Python 3.9, on which nnunetv2 and monai cannot be
installed, so an older Slicer gets a clear "install Slicer 5.10 or later" instead of a pip failure.
"""
import importlib
import logging
import os
import shutil

import slicer
from slicer.i18n import tr as _

from . import importLibrary, libraryParentDirectory


def missingImports():
    """Packages the CLI (and the module's in-process import of its results) need that Slicer's Python cannot
    import (pip names); the list is ``BraTSEnsembleLib.process.REQUIRED_IMPORTS``."""
    process, _roles, _seg = importLibrary()
    importlib.invalidate_caches()
    return process.missing_imports()


def requirements():
    """The library's pinned requirements: ``[project] dependencies`` of its pyproject.toml (installed beside the
    library by the extension's CMakeLists; at the top of the source tree)."""
    process, _roles, _seg = importLibrary()
    for candidate in (os.path.join(libraryParentDirectory(), "BraTSEnsembleLib", "pyproject.toml"),
                      os.path.join(libraryParentDirectory(), "pyproject.toml")):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as handle:
                return process.project_dependencies(handle.read())
    raise RuntimeError("pyproject.toml of BraTSEnsembleLib is missing; reinstall the extension.")


def ensureDependencies(askConfirmation=True):
    """Install PyTorch (through the PyTorch extension) and the library's requirements when missing.

    Returns True when everything imports, False when the user declined. Refuses (RuntimeError saying what to do)
    when Slicer's Python is too old. Never replaces Slicer's numpy or SimpleITK (pinned by a constraints file); on
    failure, packages installed by this attempt are removed again so that no half-installed state is left, and the
    error says what to do.
    """
    process, _roles, _seg = importLibrary()
    problem = process.python_version_problem()
    if problem:
        raise RuntimeError(problem)
    missing = missingImports()
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
        _("BraTS Ensemble needs Python packages that are not installed yet: {packages}.\n\nThey will be "
          "downloaded and installed into Slicer's Python now (PyTorch alone may be several GB; this can take "
          "minutes). Continue?").format(packages=", ".join(missing)),
        windowTitle=_("Install dependencies"),
    ):
        return False
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
    constraintsDir = slicer.util.tempDirectory("BraTSEnsemble-install")
    constraintsPath = os.path.join(constraintsDir, "constraints.txt")
    with open(constraintsPath, "w", encoding="utf-8") as handle:
        handle.write(process.constraints_for_installed(installed))
    toInstall = process.requirements_to_install("\n".join(requirements()))
    try:
        slicer.util.pip_install(["-c", constraintsPath] + toInstall)
        stillMissing = missingImports()
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
                requirements=" ".join(toInstall), error=exc)) from exc
    finally:
        shutil.rmtree(constraintsDir, ignore_errors=True)
    return True
