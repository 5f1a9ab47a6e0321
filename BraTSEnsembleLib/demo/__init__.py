"""Synthetic phantoms, a small demo model trained on them with nnU-Net's own trainer, and the demo command.

:func:`demo_case_folder` and :func:`demo_model_set` are what the Slicer self-test looks for (see
``process.find_demo``): the held-out demo phantom case, and the demo model once ``brats-ensemble demo`` has
trained it (None before; the self-test then says so and skips its segmentation part).
"""
from __future__ import annotations

from pathlib import Path


def demo_case_folder() -> Path:
    """The held-out demo phantom case in BraTS 2023 naming, written into the demo cache on first use."""
    from .phantom import make_phantom
    from .run import DEMO_CASE_ID, DEMO_CASE_SEED, demo_cache_dir

    case_dir = demo_cache_dir() / "case" / DEMO_CASE_ID
    if not (case_dir / f"{DEMO_CASE_ID}-t2f.nii.gz").is_file():
        make_phantom(DEMO_CASE_SEED, case_id=DEMO_CASE_ID).write(case_dir.parent)
    return case_dir


def demo_model_set() -> Path | None:
    """The demo's nnU-Net v2 results folder when ``brats-ensemble demo`` has trained it, else None."""
    from .run import cached_demo_model

    return cached_demo_model()
