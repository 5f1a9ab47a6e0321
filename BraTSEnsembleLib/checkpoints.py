"""Loading model checkpoints without running arbitrary pickled code.

``torch.load(weights_only=True)`` refuses any global that torch does not know. Real nnU-Net v2 checkpoints carry a
few numpy objects (``_best_ema`` is a numpy float32 scalar; MedNeXt/nnU-Net v1 checkpoints keep numpy float64 in
``plot_stuff``), so those numpy reconstruction globals — and nothing else — are allowed. nnU-Net v1 ``.pkl`` files
(plans, ``.model.pkl``) are read with an unpickler restricted to plain containers and numpy values. A checkpoint that needs
anything more is refused with a message that names the file and the way to trust it explicitly.
"""
from __future__ import annotations

import codecs
import io
import pickle
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .errors import ModelError


try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

# numpy moved its core package from ``numpy.core`` (1.x, what 2022-2024 checkpoints name) to ``numpy._core`` (2.x).
_NUMPY_CORE_MODULES = ("numpy.core", "numpy._core")


def _numpy_dtype_classes() -> list[type]:
    """The numpy dtype classes (numpy >= 1.25) of the plain numeric types v1 files store."""
    dtypes = getattr(np, "dtypes", None)
    if dtypes is None:  # pragma: no cover - numpy < 1.25 has no per-dtype classes
        return []
    names = ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
             "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType")
    return [getattr(dtypes, n) for n in names if hasattr(dtypes, n)]


def _allowed_numpy_globals() -> dict[str, Any]:
    """``{"module.name": object}`` for the numpy globals that pickled numpy scalars, arrays and dtypes refer to."""
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for core in _NUMPY_CORE_MODULES:
        allowed[f"{core}.multiarray.scalar"] = _np_multiarray.scalar
        allowed[f"{core}.multiarray._reconstruct"] = _np_multiarray._reconstruct
        allowed[f"{core}.numeric._frombuffer"] = _np_numeric._frombuffer
    for cls in _numpy_dtype_classes():
        allowed[f"numpy.dtypes.{cls.__name__}"] = cls
    return allowed


def torch_safe_numpy_globals() -> list[Any]:
    """Allow-list for ``torch.serialization.safe_globals``: numpy scalar/array reconstruction and dtypes, under both
    the numpy 1.x and 2.x module names, and the dtype classes that torch must allow for BUILD."""
    entries: list[Any] = []
    for name, obj in _allowed_numpy_globals().items():
        if name.startswith("numpy.dtypes."):
            entries.append(obj)
        else:
            entries.append((obj, name))
    return entries


_ALLOWED_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): defaultdict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "str"): str,
    ("builtins", "bool"): bool,
    ("builtins", "bytes"): bytes,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only creates builtins containers, ``collections`` dicts and numpy scalars/arrays/dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_PICKLE_GLOBALS.get((module, name))
        if found is None:
            found = _allowed_numpy_globals().get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")
        return found


def load_plain_pickle(path: Path, trusted: bool = False, loaded_trusted: list[Path] | None = None) -> Any:
    """Read an nnU-Net v1 ``.pkl`` (plans, ``.model.pkl``) that holds only dicts, lists and numpy values.

    Raises ModelError when the file is missing, unreadable, or asks for any other class or function (such a file
    could run code when unpickled, so it is refused rather than trusted). With ``trusted`` (the user passed
    ``--trust-checkpoint`` for it) such a file is unpickled fully instead, and appended to ``loaded_trusted``.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the file ({exc}).") from exc
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if trusted:
            return _record(path, loaded_trusted, lambda: pickle.loads(data))  # noqa: S301 - trusted by the user
        raise ModelError(
            f"{path}: the pickle contains something other than plain data ({exc}). BraTSEnsemble does not unpickle "
            "arbitrary objects; re-create the file from a trusted nnU-Net v1 installation, or, only if you trust "
            f"its source, pass --trust-checkpoint {path}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files fail in many ways
        raise ModelError(f"{path}: not a readable nnU-Net v1 pickle ({type(exc).__name__}: {exc}).") from exc


def _record(path: Path, loaded_trusted: list[Path] | None, load: Any) -> Any:
    """``load()`` (a full unpickling the user trusted), noting ``path`` in ``loaded_trusted``."""
    try:
        result = load()
    except Exception as exc:  # noqa: BLE001 - whatever the trusted file raises
        raise ModelError(f"{path}: cannot be unpickled even with --trust-checkpoint ({type(exc).__name__}: "
                         f"{str(exc)[:200]}).") from exc
    if loaded_trusted is not None and path not in loaded_trusted:
        loaded_trusted.append(path)
    return result


def _weights_only_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, without its advice to allow-list it."""
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y whose …"
    if match:
        return f"it refers to {match.group(1)}"
    match = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return (match.group(1) if match else type(exc).__name__)[:200]


def load_checkpoint(path: str | Path, trusted: bool = False, extra_safe_globals: Iterable[Any] = (),
                    loaded_trusted: list[Path] | None = None) -> dict:
    """Load a checkpoint dict on the CPU, safely; fully unpickled only if ``trusted`` and the safe read refuses it.

    Raises ModelError naming the file when it is missing, unreadable, or needs unsafe unpickling without
    ``trusted`` (then the message says how to trust it: ``--trust-checkpoint PATH`` on the command line). A file
    that needed the full unpickling is appended to ``loaded_trusted``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint file not found")
    try:
        try:
            with torch.serialization.safe_globals([*torch_safe_numpy_globals(), *extra_safe_globals]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not trusted:
                raise ModelError(
                    f"{path}: refused to load because it needs code beyond weights and numpy values "
                    f"({_weights_only_reason(exc)}). "
                    f"Load it only if you trust its source: pass --trust-checkpoint {path} (that file only)"
                ) from exc
            checkpoint = _record(path, loaded_trusted,
                                 lambda: torch.load(path, map_location="cpu", weights_only=False))
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot be read as a torch checkpoint ({exc}). The file may be truncated; "
                         "download or copy it again.") from exc
    if not isinstance(checkpoint, dict):
        raise ModelError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint
