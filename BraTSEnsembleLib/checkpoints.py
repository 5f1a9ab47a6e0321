"""Loading model checkpoints without running arbitrary pickled code.

``torch.load(weights_only=True)`` refuses any global that torch does not know. Real nnU-Net v2 checkpoints carry a
few numpy objects (``_best_ema`` is a numpy float32 scalar; MedNeXt/nnU-Net v1 checkpoints keep numpy float64 in
``plot_stuff``), so those numpy reconstruction globals — and nothing else — are allowed. A checkpoint that needs
anything more is refused with a message that names the file and the way to trust it explicitly.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .errors import ModelError


def _numpy_safe_globals() -> list[Any]:
    """The numpy objects that numpy arrays and scalars pickle through (names differ between numpy 1.x and 2.x)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    found: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    # The per-dtype classes (numpy.dtypes.Float64DType …) that dtypes pickle as in numpy ≥ 1.25.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return found


NUMPY_SAFE_GLOBALS: list[Any] = _numpy_safe_globals()


def load_checkpoint(path: str | Path, trusted: bool = False, extra_safe_globals: Iterable[Any] = ()) -> dict:
    """Load a checkpoint dict on the CPU, safely unless ``trusted``.

    Raises ModelError naming the file when it is missing, unreadable, or needs unsafe unpickling (then the message
    says how to trust it: ``--trust-checkpoint PATH`` on the command line).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint file not found")
    try:
        if trusted:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([*NUMPY_SAFE_GLOBALS, *extra_safe_globals]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ModelError(
            f"{path}: refused to load because it needs code beyond weights and numpy values ({detail}). "
            f"Load it only if you trust its source: pass --trust-checkpoint {path}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot be read as a torch checkpoint ({exc}). The file may be truncated; "
                         "download or copy it again.") from exc
    if not isinstance(checkpoint, dict):
        raise ModelError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint
