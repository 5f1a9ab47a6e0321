"""Errors that the library raises for problems a user can fix. Each message names the file or volume and the fix."""
from __future__ import annotations


class BraTSEnsembleError(Exception):
    """Base class: a problem with the user's input, models or environment (not a bug in the library)."""


class InputError(BraTSEnsembleError):
    """A case's images cannot be used: missing/duplicate roles, bad geometry, unreadable or invalid voxels."""


class ModelError(BraTSEnsembleError):
    """A model folder or checkpoint cannot be used."""


class DeviceError(BraTSEnsembleError):
    """The requested compute device is not available."""


class OutputError(BraTSEnsembleError):
    """Results cannot be written where asked (existing files, permissions)."""


class Cancelled(BraTSEnsembleError):
    """The run was cancelled by the caller."""
