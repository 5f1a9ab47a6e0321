"""The demo: a shipped phantom case and a shipped three-framework demo model set, and the command that runs them.

* ``case/`` — the demo case ``DemoPhantom-777`` (a synthetic phantom at 1 mm, 160×192×160, int16 sequences in
  BraTS 2023 naming, ground truth ``-seg.nii.gz``) and ``case.json`` (file names and SHA-256);
* ``models/`` — nnU-Net v2, U-Mamba Bot and MedNeXt-S members trained on phantoms, and the manifest
  ``demo-ensemble.json`` that ensembles them (made by ``python -m BraTSEnsembleLib.demo.train``; see
  :mod:`BraTSEnsembleLib.demo.train`).

:func:`demo_case_folder` and :func:`demo_model_set` are what the Slicer self-test looks for (see
``process.find_demo``); :func:`sample_data_source` is what the Slicer module registers as Sample Data. The demo
models know only synthetic phantoms: never use them on patient data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

PACKAGE = Path(__file__).resolve().parent
CASE_DIR = PACKAGE / "case"
MODELS_DIR = PACKAGE / "models"
MANIFEST = MODELS_DIR / "demo-ensemble.json"
CASE_INFO = CASE_DIR / "case.json"
#: Sample Data category and sample name under which the Slicer module registers the demo case.
SAMPLE_CATEGORY = "BraTSEnsemble"
SAMPLE_NAME = "BraTSEnsembleDemoPhantom"
#: Order of the sample's files and nodes: the four sequences, then the ground truth.
SAMPLE_ROLES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f", "seg")


def demo_case_folder() -> Path:
    """The shipped demo case folder (``BraTSEnsembleLib/demo/case``)."""
    return CASE_DIR


def demo_model_set() -> Path | None:
    """The shipped demo manifest ``models/demo-ensemble.json``, or None when the models are not installed."""
    return MANIFEST if MANIFEST.is_file() else None


def demo_case_info() -> dict[str, Any]:
    """``case.json`` of the demo case: ``case_id``, ``seed``, ``grid_zyx``, ``spacing_mm`` and ``files`` (role →
    ``{"file", "sha256"}`` for t1n, t1c, t2w, t2f and seg). FileNotFoundError when the case is not installed."""
    if not CASE_INFO.is_file():
        raise FileNotFoundError(f"{CASE_INFO}: the demo case is not installed (regenerate it with "
                                "python -m BraTSEnsembleLib.demo.train OUT_DIR --case-only)")
    return json.loads(CASE_INFO.read_text())


def sample_data_source() -> dict[str, Any]:
    """Keyword arguments of Slicer's ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` for the demo case.

    One node per sequence (``VolumeFile``, node named like the file, e.g. ``DemoPhantom-777-t1c``, so the module's
    role auto-assignment recognises it) and the ground truth as a segmentation (``SegmentationFile``: Slicer loads a
    NIfTI label map directly as a segmentation); ``uris`` are ``file://`` URIs of the shipped files (SampleData
    copies them into its cache with urllib, which reads ``file://``), ``checksums`` ``SHA256:<hex>`` from
    ``case.json``, so a damaged installation is reported by Slicer's checksum check.
    """
    info = demo_case_info()
    files = [info["files"][role] for role in SAMPLE_ROLES]
    names = [entry["file"] for entry in files]
    return {
        "category": SAMPLE_CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [(CASE_DIR / name).as_uri() for name in names],
        "fileNames": names,
        "nodeNames": [name[: -len(".nii.gz")] for name in names],
        "loadFileType": ["VolumeFile"] * (len(SAMPLE_ROLES) - 1) + ["SegmentationFile"],
        "checksums": [f"SHA256:{entry['sha256']}" for entry in files],
    }


def model_set_offered_for(volume_names: Sequence[str]) -> Path | None:
    """The demo manifest when every input volume is the shipped demo case (node names as Sample Data gives them,
    e.g. ``DemoPhantom-777-t1c``) and the demo set is installed, else None: the demo models know only phantoms, so
    the Slicer module never offers them for other images."""
    manifest = demo_model_set()
    if manifest is None or not volume_names or not CASE_INFO.is_file():
        return None
    case_id = demo_case_info()["case_id"]
    return manifest if all(name.startswith(f"{case_id}-") for name in volume_names) else None
